"""Search inside files: which stretches of which files match a query, and a per-window timeline.

A store made with `--segments` keeps one vector per analysis window (`window` seconds long, `hop`
seconds apart, so neighbouring windows overlap). `search_segments` scores every window against the
queries in one streaming pass, calibrates each query on all of its scores (`Calibration`: z-score and
percentile, since raw cosines differ between models and between text and audio queries), keeps the
windows above a threshold, and merges the kept windows of one file that overlap or lie within `gap`
seconds of each other into segments. `timeline` lists every window of one file with its score, and
`format_timeline` writes that as JSON, CSV or an Audacity label track.

Everything here reads a `SegmentViewLike` (what `Store.segment_view()` returns) and numpy
arrays; memory is the S scores per query plus one block of vectors.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np

from mlx_clap.search import exact
from mlx_clap.search.calibration import Calibration, calibrate_query
from mlx_clap.search.index import SearchError, clip_cosine, unit_queries

DEFAULT_MIN_Z = 2.0
BLOCK_ROWS = 65536  # vectors asked of the view at a time
TIMELINE_FORMATS = ("json", "csv", "audacity")
NO_SEGMENTS = "the store has no segments (made without --segments; embed again with --segments)"


class SegmentViewLike(Protocol):
    """What segment search reads (`mlx_clap.store.SegmentView`): per window the file it belongs
    to (index into `store.items`), its start and end in seconds, and its vector. Windows of one file are
    contiguous and sorted by start."""

    file_index: np.ndarray
    start: np.ndarray
    end: np.ndarray
    dim: int

    def __len__(self) -> int: ...

    def iter_blocks(self, block_rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]: ...

    def take(self, idx: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class Segment:
    """A stretch of one file whose windows match a query: from the first kept window's start to the
    last one's end. `score` is the best window's cosine (at `best_start`), `z` and `percentile` that
    score's calibration, `windows` how many windows were merged."""

    file_index: int
    start: float
    end: float
    score: float
    z: float
    percentile: float
    windows: int
    best_start: float

    @property
    def length(self) -> float:
        return self.end - self.start

    def to_dict(self, items: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
        """JSON-ready fields (with the file's "path" when the store's items are given)."""
        out: dict[str, Any] = {"path": str(items[self.file_index]["path"])} if items is not None else {}
        out.update(
            file_index=self.file_index,
            start=round(self.start, 6),
            end=round(self.end, 6),
            best_start=round(self.best_start, 6),
            windows=self.windows,
            score=round(clip_cosine(self.score), 6),
            z=round(self.z, 4),
            percentile=round(self.percentile, 4),
        )
        return out


class TimelineRow(NamedTuple):
    """One window of a file's timeline."""

    start: float
    end: float
    score: float
    z: float


# ------------------------------------------------------------------------------------------ helpers
def window_geometry(view: SegmentViewLike) -> tuple[float, float]:
    """(window, hop) seconds as the view's windows show them: the median window length and the median
    step between consecutive windows of one file (the window length when no file has two)."""
    if len(view) == 0:
        raise SearchError(NO_SEGMENTS)
    start = np.asarray(view.start, dtype=np.float64)
    window = float(np.median(np.asarray(view.end, dtype=np.float64) - start))
    same = np.asarray(view.file_index)[1:] == np.asarray(view.file_index)[:-1]
    steps = np.diff(start)[same]
    steps = steps[steps > 0]
    hop = float(np.median(steps)) if steps.size else window
    return window, hop


def merge_gap(view: SegmentViewLike, settings: dict[str, Any] | None = None) -> float:
    """The default gap (seconds) within which kept windows of one file merge: the hop the store
    recorded (`settings`, its segment settings), else the hop the view's times show."""
    if settings and settings.get("hop") is not None:
        return float(settings["hop"])
    return window_geometry(view)[1]


def run_ids(file_index: np.ndarray, start: np.ndarray, end: np.ndarray, gap: float) -> np.ndarray:
    """Run id (0, 1, ...) per window of a list sorted like a view (files contiguous, starts ascending):
    a window joins the previous run when it is of the same file and starts at most `gap` seconds after
    the run's end so far (overlapping and touching windows always join)."""
    n = len(start)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    start = np.asarray(start, dtype=np.float64)
    end = np.asarray(end, dtype=np.float64)
    fi = np.asarray(file_index)
    new_file = np.ones(n, dtype=bool)
    new_file[1:] = fi[1:] != fi[:-1]
    # Running max of the ends within each file, vectorised: shifting file f's ends by f * span makes
    # them increase across files, so one maximum.accumulate never carries an end into the next file.
    span = float(end.max() - min(start.min(), 0.0)) + gap + 1.0
    offset = (np.cumsum(new_file) - 1) * span
    run_end = np.maximum.accumulate(end + offset) - offset
    brk = new_file
    brk[1:] |= start[1:] > run_end[:-1] + gap
    return np.cumsum(brk) - 1


class Runs(NamedTuple):
    """Windows merged into runs (`merge_runs`): per window its run id; per run the index of its first
    window, its start (earliest window start), end (latest window end) and window count."""

    ids: np.ndarray
    firsts: np.ndarray
    start: np.ndarray
    end: np.ndarray
    windows: np.ndarray


def merge_runs(file_index: np.ndarray, start: np.ndarray, end: np.ndarray, gap: float) -> Runs:
    """The runs `run_ids` forms over a non-empty list of windows (sorted like a view), with their
    spans: what segment search, timelines and recurring groups all report."""
    start = np.asarray(start, dtype=np.float64)
    end = np.asarray(end, dtype=np.float64)
    ids = run_ids(file_index, start, end, gap)
    firsts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    return Runs(
        ids,
        firsts,
        np.minimum.reduceat(start, firsts),
        np.maximum.reduceat(end, firsts),
        np.diff(np.r_[firsts, ids.size]),
    )


def score_windows(
    view: SegmentViewLike, queries: np.ndarray, *, block_rows: int = BLOCK_ROWS, threads: int | None = None
) -> np.ndarray:
    """Cosines (m, S) float32 of unit queries (m, dim) against every window, in one pass over the view:
    each block scored as it is read, in the stored dtype (`exact.all_scores`: float16 windows are never
    converted; float32-product accuracy), on `threads` threads (default `exact.default_threads()`)."""
    q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    return exact.all_scores(view.iter_blocks(block_rows), q, len(view), threads=threads)


def score_threshold(
    cal: Calibration,
    threshold: float | None = None,
    min_z: float | None = None,
    min_percentile: float | None = None,
) -> float:
    """The cosine a window must reach, from at most one of: a cosine, a z-score, a percentile
    (none given: z >= DEFAULT_MIN_Z)."""
    options = {"threshold": threshold, "min_z": min_z, "min_percentile": min_percentile}
    given = [name for name, v in options.items() if v is not None]
    if len(given) > 1:
        raise SearchError(f"give at most one of threshold, min_z, min_percentile (got {', '.join(given)})")
    if threshold is not None:
        if not -1.0 <= threshold <= 1.0:
            raise SearchError(f"threshold must be a cosine between -1 and 1 (got {threshold})")
        return float(threshold)
    if min_percentile is not None:
        if not 0.0 <= min_percentile <= 100.0:
            raise SearchError(f"min_percentile must be between 0 and 100 (got {min_percentile})")
        return cal.score_for_percentile(min_percentile)
    return cal.score_for_z(DEFAULT_MIN_Z if min_z is None else min_z)


def merge_kept(
    view: SegmentViewLike,
    scores: np.ndarray,
    keep: np.ndarray,
    cal: Calibration,
    *,
    gap: float,
    min_length: float = 0.0,
) -> list[Segment]:
    """Segments from the windows where `keep` is True (1-D over the view), best first (score, then file
    and start); runs shorter than `min_length` seconds are dropped."""
    idx = np.flatnonzero(keep)
    if idx.size == 0:
        return []
    fi = np.asarray(view.file_index)[idx]
    st = np.asarray(view.start, dtype=np.float64)[idx]
    en = np.asarray(view.end, dtype=np.float64)[idx]
    sc = np.asarray(scores, dtype=np.float64)[idx]
    runs = merge_runs(fi, st, en, gap)
    firsts, seg_start, seg_end = runs.firsts, runs.start, runs.end
    # The best window of each run: sorted by run, then score descending (stable: earliest on a tie).
    order = np.lexsort((-sc, runs.ids))
    best = order[firsts]
    long_enough = seg_end - seg_start >= min_length
    sel = np.flatnonzero(long_enough)
    ranked = sel[np.lexsort((seg_start[sel], fi[firsts][sel], -sc[best][sel]))]
    z = cal.z(sc[best])
    pct = cal.percentile(sc[best])
    return [
        Segment(
            file_index=int(fi[firsts[r]]),
            start=float(seg_start[r]),
            end=float(seg_end[r]),
            score=float(sc[best[r]]),
            z=float(z[r]),
            percentile=float(pct[r]),
            windows=int(runs.windows[r]),
            best_start=float(st[best[r]]),
        )
        for r in ranked
    ]


def stretch_around(
    start: np.ndarray, end: np.ndarray, scores: np.ndarray, best: int, threshold: float, gap: float
) -> tuple[float, float, int]:
    """(start, end, windows) of the stretch of one file's windows around window `best`: the run that
    `search_segments` would merge there (windows scoring >= `threshold`, joined when they overlap or
    lie within `gap` seconds), or the best window alone when it scores below the threshold."""
    keep = np.asarray(scores) >= threshold
    keep[best] = True
    idx = np.flatnonzero(keep)
    runs = merge_runs(np.zeros(idx.size, dtype=np.int64), np.asarray(start)[idx], np.asarray(end)[idx], gap)
    r = int(runs.ids[np.searchsorted(idx, best)])
    return float(runs.start[r]), float(runs.end[r]), int(runs.windows[r])


def _check_options(k: int | None, gap: float | None, min_length: float) -> None:
    if k is not None and k < 1:
        raise SearchError(f"k must be at least 1 (got {k})")
    if gap is not None and not gap >= 0:
        raise SearchError(f"gap must be 0 or more seconds (got {gap})")
    if not min_length >= 0:
        raise SearchError(f"min_length must be 0 or more seconds (got {min_length})")


def _window_mask(view: SegmentViewLike, file_mask: np.ndarray | None) -> np.ndarray | None:
    """Per window: whether its file passes `file_mask` (a bool per file of the store)."""
    if file_mask is None:
        return None
    fm = np.asarray(file_mask, dtype=bool)
    fi = np.asarray(view.file_index)
    if fi.size and fm.size <= int(fi.max()):
        raise SearchError(f"file_mask has {fm.size} entries but the segments name file {int(fi.max())}")
    return fm[fi]


# ------------------------------------------------------------------------------------------- search
@dataclass(frozen=True)
class SegmentResult:
    """One query's segment search: its `segments` (best first), the `calibration` its z and percentile
    come from, the cosine `threshold` a window had to reach, how many windows `passed` it (inside the
    file filter) and the best window score there (`best_score`, -inf when the filter left none), so an
    empty answer can say how close the query came."""

    segments: list[Segment]
    calibration: Calibration
    threshold: float
    passed: int
    best_score: float

    @property
    def best_z(self) -> float:
        """The best window's z-score (-inf when there was no window to score)."""
        return float(self.calibration.z(self.best_score)) if np.isfinite(self.best_score) else -np.inf


def segment_search(
    view: SegmentViewLike,
    queries: np.ndarray,
    *,
    k: int | None = 10,
    threshold: float | None = None,
    min_z: float | None = None,
    min_percentile: float | None = None,
    gap: float | None = None,
    min_length: float = 0.0,
    file_mask: np.ndarray | None = None,
    block_rows: int = BLOCK_ROWS,
) -> list[SegmentResult]:
    """`search_segments` with each query's calibration and threshold kept (`SegmentResult`)."""
    _check_options(k, gap, min_length)
    if len(view) == 0:
        raise SearchError(NO_SEGMENTS)
    q = unit_queries(queries, view.dim)
    if gap is None:
        gap = window_geometry(view)[1]
    allowed = _window_mask(view, file_mask)
    scores = score_windows(view, q, block_rows=block_rows)
    out = []
    for s in scores:
        cal = Calibration.fit(s)
        cut = score_threshold(cal, threshold, min_z, min_percentile)
        keep = s >= cut
        eligible = s if allowed is None else s[allowed]
        if allowed is not None:
            keep &= allowed
        segs = merge_kept(view, s, keep, cal, gap=gap, min_length=min_length)
        best = float(eligible.max()) if eligible.size else -np.inf
        out.append(SegmentResult(segs if k is None else segs[:k], cal, cut, int(keep.sum()), best))
    return out


def search_segments(
    view: SegmentViewLike,
    queries: np.ndarray,
    *,
    k: int | None = 10,
    threshold: float | None = None,
    min_z: float | None = None,
    min_percentile: float | None = None,
    gap: float | None = None,
    min_length: float = 0.0,
    file_mask: np.ndarray | None = None,
    block_rows: int = BLOCK_ROWS,
) -> list[list[Segment]]:
    """Per query (rows of `queries`, (m, dim) or (dim,)), up to `k` segments, best first.

    A window is kept when its cosine reaches `threshold`, or its z-score `min_z`, or its percentile
    `min_percentile` (at most one; default z >= 2). z and percentile are calibrated on the query's
    scores against every window of the store, whatever `file_mask` (a bool per store file) leaves in,
    so a filter does not change what a score means. Kept windows of one file merge when they overlap
    or lie within `gap` seconds (default: the hop); segments shorter than `min_length` are dropped.
    k=None returns every segment. Segment search is exact: every window is scored.
    """
    opts = dict(threshold=threshold, min_z=min_z, min_percentile=min_percentile, gap=gap)
    results = segment_search(
        view, queries, k=k, **opts, min_length=min_length, file_mask=file_mask, block_rows=block_rows
    )
    return [r.segments for r in results]


# ----------------------------------------------------------------------------------------- timeline
def timeline(
    view: SegmentViewLike,
    file_index: int,
    query: np.ndarray,
    *,
    calibration: Calibration | None = None,
    sample: int | None = None,
    seed: int = 0,
) -> list[TimelineRow]:
    """Every window of one file (`file_index` into the store's items) with its cosine to `query`
    and that cosine's z-score. z is calibrated as `search_segments` calibrates it, on the query's
    scores against every window of the store (one pass over it), so a window's z here and in a
    search agree; `sample` calibrates on that many windows instead (faster on a huge store), and a
    given `calibration` is used as it is."""
    if len(view) == 0:
        raise SearchError(NO_SEGMENTS)
    q = unit_queries(query, view.dim)[0]
    idx = np.flatnonzero(np.asarray(view.file_index) == int(file_index))
    if idx.size == 0:
        return []
    if calibration is None and (sample is None or sample >= len(view)):
        every = score_windows(view, q[None, :])[0]
        calibration, scores = Calibration.fit(every), every[idx]
    else:
        if calibration is None:
            calibration = calibrate_query(view.take, len(view), q, limit=sample, seed=seed)
        scores = np.asarray(view.take(idx), dtype=np.float32) @ q
    z = calibration.z(scores.astype(np.float64))
    st = np.asarray(view.start, dtype=np.float64)[idx]
    en = np.asarray(view.end, dtype=np.float64)[idx]
    return [
        TimelineRow(float(a), float(b), float(c), float(d))
        for a, b, c, d in zip(st, en, scores, z, strict=True)
    ]


def timeline_segments(
    rows: Sequence[TimelineRow],
    *,
    min_z: float | None = None,
    threshold: float | None = None,
    gap: float | None = None,
) -> list[tuple[float, float, float]]:
    """(start, end, best score) of the merged runs of a timeline's windows at or above `threshold`
    (a cosine) or else `min_z` (default DEFAULT_MIN_Z), in time order; `gap` defaults to the hop."""
    if threshold is not None and min_z is not None:
        raise SearchError("give at most one of threshold, min_z")
    if not rows:
        return []
    st = np.array([r.start for r in rows], dtype=np.float64)
    en = np.array([r.end for r in rows], dtype=np.float64)
    sc = np.array([r.score for r in rows], dtype=np.float64)
    zz = np.array([r.z for r in rows], dtype=np.float64)
    keep = sc >= threshold if threshold is not None else zz >= (DEFAULT_MIN_Z if min_z is None else min_z)
    if gap is None:
        steps = np.diff(st)
        steps = steps[steps > 0]
        gap = float(np.median(steps)) if steps.size else 0.0
    idx = np.flatnonzero(keep)
    if idx.size == 0:
        return []
    runs = merge_runs(np.zeros(idx.size, dtype=np.int64), st[idx], en[idx], gap)
    best = np.maximum.reduceat(sc[idx], runs.firsts)
    return [(float(a), float(b), float(c)) for a, b, c in zip(runs.start, runs.end, best, strict=True)]


def _label_text(label: str) -> str:
    # A label track is tab-separated, one label per line: tabs and line breaks in a label would
    # split it, so they become spaces.
    return " ".join(str(label).split())


def format_timeline(
    rows: Sequence[TimelineRow],
    fmt: str,
    *,
    label: str = "",
    min_z: float | None = None,
    threshold: float | None = None,
    gap: float | None = None,
    meta: dict[str, Any] | None = None,
) -> str:
    """A timeline as text: "json" (an object: `meta`'s fields and "windows", every window), "csv"
    (header start,end,score,z; every window) or "audacity" (a label track: start<TAB>end<TAB>label per
    merged segment at or above `threshold` / `min_z`, seconds with 6 decimals, label "<label> <score>")."""
    if fmt == "json":
        windows = [
            {
                "start": round(r.start, 6),
                "end": round(r.end, 6),
                "score": round(clip_cosine(r.score), 6),
                "z": round(r.z, 4),
            }
            for r in rows
        ]
        return json.dumps({**(meta or {}), "windows": windows}, indent=2, ensure_ascii=False) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["start", "end", "score", "z"])
        for r in rows:
            writer.writerow([f"{r.start:.6f}", f"{r.end:.6f}", f"{clip_cosine(r.score):.6f}", f"{r.z:.4f}"])
        return buf.getvalue()
    if fmt == "audacity":
        text = _label_text(label)
        lines = [
            f"{a:.6f}\t{b:.6f}\t{(text + ' ' if text else '')}{clip_cosine(s):.3f}"
            for a, b, s in timeline_segments(rows, min_z=min_z, threshold=threshold, gap=gap)
        ]
        return "".join(line + "\n" for line in lines)
    raise SearchError(f"unknown timeline format {fmt!r} (one of {', '.join(TIMELINE_FORMATS)})")
