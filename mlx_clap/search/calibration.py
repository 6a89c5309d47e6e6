"""Score calibration: what a raw cosine means for one query against one store.

Raw CLAP cosines are not comparable between models, nor between a text query and an audio query of the
same model (text-to-audio cosines of a good match sit around 0.3-0.5, audio-to-audio ones near 0.9). So
every score is reported with a calibration fitted on the query's own scores against the store (or a
random sample of it): a z-score (standard deviations above the query's mean score) and a percentile
(the share of the store scoring at or below it, scores within float rounding, SCORE_TOL, counting as
equal: the best item is at 100 % whichever backend computed its score). Both have an inverse, so a
threshold can be given in either unit and turned into a cosine once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

TAKE_ROWS = 16384  # rows read per call while scoring a sample (bounds the float32 copy)
DEFAULT_SAMPLE = 100_000  # rows a calibration needs at most: percentiles to 0.001, z to ~0.3%
# Spread used when a sample has (almost) none: one row, or every score equal. z is then ~0 at the
# mean and large anywhere else, instead of a division by zero.
MIN_STD = 1e-6
# Two float32 cosines of the same pair of vectors computed by different code (MLX for the flat scan,
# BLAS for the calibration sample) differ by a few 1e-7 at 512-d; a sample score within this of a
# reported score counts as equal, so an item never ranks below its own copy in the sample.
SCORE_TOL = 1e-6


def sample_rows(n: int, limit: int = DEFAULT_SAMPLE, seed: int = 0) -> np.ndarray:
    """Sorted int64 row indices: every row when n <= limit, else `limit` distinct rows drawn with
    `seed` (the same rows for the same (n, limit, seed); sorted, which a memory map reads best)."""
    if n < 0 or limit < 1:
        raise ValueError(f"sample_rows needs n >= 0 and limit >= 1 (got n={n}, limit={limit})")
    if n <= limit:
        return np.arange(n, dtype=np.int64)
    rows = np.random.default_rng(seed).choice(n, size=limit, replace=False)
    return np.sort(rows).astype(np.int64)


@dataclass(frozen=True)
class Calibration:
    """A query's score distribution: mean, std and the sample (sorted on first use, for percentiles:
    a page that shows z-scores only never pays for the sort)."""

    mean: float
    std: float
    scores: np.ndarray  # float64, the sample in any order

    @classmethod
    def fit(cls, sample_scores: np.ndarray) -> Calibration:
        """Fit on one query's scores (1-D; any finite values). An empty sample is an error."""
        s = np.asarray(sample_scores, dtype=np.float64).ravel()
        if s.size == 0:
            raise ValueError("cannot calibrate scores from an empty sample")
        lo, hi = s.min(), s.max()
        if not (np.isfinite(lo) and np.isfinite(hi)):  # min/max propagate NaN, and inf is an end
            raise ValueError("cannot calibrate: the sample holds non-finite scores")
        if lo == hi:  # one value: exactly that mean and no spread (summing would add rounding)
            return cls(float(lo), 0.0, s)
        return cls(float(s.mean()), float(s.std()), s)

    @cached_property
    def sorted_scores(self) -> np.ndarray:
        """The sample, ascending."""
        return np.sort(self.scores)

    @cached_property
    def _lowered(self) -> np.ndarray:
        """The sorted sample minus SCORE_TOL (still ascending): what `percentile` compares against, and
        where `score_for_percentile` takes its thresholds from, so the two agree exactly."""
        return self.sorted_scores - SCORE_TOL

    @property
    def n(self) -> int:
        return int(self.scores.size)

    @property
    def scale(self) -> float:
        """The std z divides by (at least MIN_STD)."""
        return max(self.std, MIN_STD)

    def z(self, score: float | np.ndarray) -> float | np.ndarray:
        """Standard deviations above the mean (float for a float, array for an array)."""
        out = (np.asarray(score, dtype=np.float64) - self.mean) / self.scale
        return float(out) if out.ndim == 0 else out

    def percentile(self, score: float | np.ndarray) -> float | np.ndarray:
        """0-100: the share of the sample scoring at or below `score` (within SCORE_TOL), so the
        store's best item is at 100."""
        below = np.searchsorted(self._lowered, np.asarray(score, dtype=np.float64), side="right")
        out = 100.0 * below / self.n
        return float(out) if np.ndim(out) == 0 else out

    def score_for_z(self, z: float) -> float:
        """The cosine at `z` standard deviations above the mean (inverse of `z`)."""
        return float(self.mean + float(z) * self.scale)

    def score_for_percentile(self, p: float) -> float:
        """The lowest cosine threshold t such that `percentile(s) >= p` exactly when `s >= t`:
        -inf for p <= 0 (every score passes), +inf above 100 (none does)."""
        # The smallest count c of sample values <= s with 100 * c / n >= p, computed with the same
        # float expression `percentile` uses, so the threshold and the percentile never disagree.
        counts = 100.0 * np.arange(self.n + 1) / self.n
        c = int(np.searchsorted(counts, float(p), side="left"))
        if c == 0:
            return float("-inf")
        if c > self.n:
            return float("inf")
        return float(self._lowered[c - 1])

    def to_dict(self) -> dict[str, float | int]:
        """Mean, std and sample size (for JSON output)."""
        return {"mean": round(self.mean, 6), "std": round(self.std, 6), "sample": self.n}


def calibrate_query(
    take: Callable[[np.ndarray], np.ndarray],
    n: int,
    query: np.ndarray,
    *,
    limit: int = DEFAULT_SAMPLE,
    seed: int = 0,
) -> Calibration:
    """Fit `query` (dim,; made unit) on its cosines against `sample_rows(n, limit, seed)`, read through
    `take(rows) -> (len(rows), dim)` (e.g. `SegmentView.take`, `RowReader.take`) a chunk at a time."""
    if n < 1:
        raise ValueError("cannot calibrate against an empty store")
    q = np.asarray(query, dtype=np.float32).ravel()
    norm = float(np.linalg.norm(q))
    if not np.isfinite(norm) or norm == 0:
        raise ValueError("cannot calibrate a zero or non-finite query")
    q = q / norm  # the scores it calibrates are cosines
    rows = sample_rows(n, limit, seed)
    scores = np.empty(rows.size, dtype=np.float32)
    for i in range(0, rows.size, TAKE_ROWS):
        scores[i : i + TAKE_ROWS] = np.asarray(take(rows[i : i + TAKE_ROWS]), dtype=np.float32) @ q
    return Calibration.fit(scores)


def zscores(
    store: Any, query: np.ndarray, scores: np.ndarray, *, segments: bool = False, limit: int = DEFAULT_SAMPLE
) -> np.ndarray:
    """z of `scores` (cosines of `query` against `store`) calibrated on a sample of the store's file
    vectors, or of its segment windows with `segments=True`."""
    if segments:
        view = store.segment_view()
        cal = calibrate_query(view.take, len(view), query, limit=limit)
    else:
        from mlx_clap.search.index import RowReader

        cal = calibrate_query(RowReader(store).take, len(store), query, limit=limit)
    return np.atleast_1d(cal.z(np.asarray(scores, dtype=np.float64)))
