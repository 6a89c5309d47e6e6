"""Recurring segments: stretches of audio that occur more than once (jingles, music beds, idents, ads),
in different files or at different times of one file.

Over a store's window vectors (`SegmentViewLike`):

1. pairs of windows whose cosine reaches a threshold are found: exactly (every pair, in tiles: O(S^2),
   for small stores); or within k-means partitions ("ivf": each window is compared exactly with the
   windows of its `IVF_PROBES` nearest partitions and of any as near within `PROBE_MARGIN`, as an IVF
   index answers a query, so a pair is missed only when neither window's probed partitions hold the
   other's nearest; 1M windows in minutes on 2 cores,
   docs/performance.md "Recurring segments at 1M windows"); or through each window's k nearest in a
   usearch HNSW graph ("ann", the optional `ann` extra: slower at 1M, and it caps the pairs per window);
2. trivial pairs are dropped: a window and its overlapping neighbours in the same file
   (|t1 - t2| < window seconds) are alike because they share audio, not because it recurs;
3. the windows left in some pair are merged, per file, into runs of adjacent windows (occurrences);
4. occurrences linked by a pair are joined with union-find; groups of at least `min_occurrences`
   occurrences are returned, largest first.

A stretch that is only like itself (a long steady sound whose distant windows match each other) is
one run linked to itself, so it is not reported unless something else separates its occurrences.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlx_clap.extras import install_hint
from mlx_clap.search.calibration import Calibration, sample_rows
from mlx_clap.search.index import SearchError, UnionFind, clip_cosine
from mlx_clap.search.segments import NO_SEGMENTS, SegmentViewLike, merge_runs, window_geometry

DEFAULT_THRESHOLD = 0.9
EXACT_AUTO_WINDOWS = 20_000  # "auto" compares every pair up to this many windows (seconds on 2 cores)
EXACT_TILE = 4096  # rows per tile side of the exact self-comparison
ANN_ADD_ROWS = 16384
ANN_SEARCH_ROWS = 16384
# HNSW settings: `mlx-clap index`'s connectivity with a lighter build and search (16/128/256 there). A
# recurrence is a near-copy spanning several windows, so a graph that misses some of its pairs still
# finds it. Overlapping windows make chains of near neighbours that a connectivity of 8 fills its links
# with (recall@10 0.4 on 200k clustered windows, bench_segments.py); 16 gives 0.8-0.87 for 1.5x the build.
ANN_PARAMS = {"connectivity": 16, "expansion_add": 64, "expansion_search": 64, "dtype": "f16"}
RESCORE_MARGIN = 0.02  # ANN candidates within this of the threshold are rescored exactly (f16 distances)
PAIR_SAMPLE = 2000  # windows whose pairwise cosines calibrate a min_z threshold (~2M pairs)
# IVF settings (benchmarks/bench_recurring.py, docs/performance.md). Each window is compared with the
# windows of its IVF_PROBES nearest partitions; sqrt(S * probes) partitions balance the assignment
# (S x partitions products) against the comparisons (S x probes x S / partitions).
IVF_PROBES = 3
# A window far from every centroid (rare content: the jingles recurrence looks for) scores them all
# alike, so two near-copies of it may pick different nearest partitions: it also probes every partition
# within PROBE_MARGIN of its nearest, up to MAX_PROBES. At 1M windows this lifted the recall of planted
# pairs from 0.95 to 1.0 for 0.03 extra probes a window on average (docs/performance.md).
PROBE_MARGIN = 0.05
MAX_PROBES = 32
KMEANS_ROWS_PER_PARTITION = 64  # training sample for the centroids (Lance trains its IVF on 256)
KMEANS_ITERS = 20
# The store's Lance index partitions serve when their count is within this factor of the balanced
# one (then the work is at most ~1.25x that of k-means partitions, with no training).
INDEX_PARTITIONS_RATIO = 2.0
ASSIGN_ROWS = 16384  # windows assigned to partitions at a time (S x partitions float32 scores)
BACKENDS = ("auto", "ivf", "ann", "exact")


@dataclass(frozen=True)
class Occurrence:
    """One occurrence: seconds [start, end) of file `file_index`, made of `windows` matching windows."""

    file_index: int
    start: float
    end: float
    windows: int

    def to_dict(self, items: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"path": str(items[self.file_index]["path"])} if items is not None else {}
        out.update(file_index=self.file_index, start=round(self.start, 6), end=round(self.end, 6),
                   windows=self.windows)  # fmt: skip
        return out


@dataclass(frozen=True)
class Group:
    """Occurrences of one recurring stretch, in (file, start) order; `score` is the mean cosine of the
    window pairs linking them, `max_score` the best, `links` how many pairs there were."""

    occurrences: list[Occurrence]
    score: float
    max_score: float
    links: int

    def to_dict(self, items: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
        return {
            "size": len(self.occurrences),
            "files": len({o.file_index for o in self.occurrences}),
            "score": round(clip_cosine(self.score), 6),
            "max_score": round(clip_cosine(self.max_score), 6),
            "links": self.links,
            "occurrences": [o.to_dict(items) for o in self.occurrences],
        }


# -------------------------------------------------------------------------------------------- pairs
def _non_trivial(view_fi: np.ndarray, view_start: np.ndarray, i: np.ndarray, j: np.ndarray, window: float):
    """Mask of pairs that are not a window and its overlapping neighbour in the same file (nor itself)."""
    same_file = view_fi[i] == view_fi[j]
    # A hair under `window`: windows one window-length apart touch but share no audio.
    near = np.abs(view_start[i] - view_start[j]) < window * (1 - 1e-9)
    return ~(same_file & near)


def _pair_threshold(view: SegmentViewLike, window: float, min_z: float, seed: int = 0) -> Calibration:
    """Calibration of the cosine between two random (non-trivial) windows of the store."""
    rows = sample_rows(len(view), PAIR_SAMPLE, seed)
    x = np.asarray(view.take(rows), dtype=np.float32)
    sims = x @ x.T
    ii, jj = np.triu_indices(rows.size, k=1)
    ok = _non_trivial(np.asarray(view.file_index), np.asarray(view.start), rows[ii], rows[jj], window)
    if not ok.any():
        raise SearchError("min_z needs at least two windows that do not overlap; give a cosine threshold")
    return Calibration.fit(sims[ii[ok], jj[ok]])


def exact_pairs(
    view: SegmentViewLike,
    threshold: float,
    window: float,
    *,
    tile: int = EXACT_TILE,
    progress: Callable[[str], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every non-trivial pair (i < j) with cosine >= threshold: (i, j, cosine), by comparing the windows
    with each other in (tile x tile) blocks of the upper triangle (float32 blocks kept: 4 bytes a value)."""
    fi, st = np.asarray(view.file_index), np.asarray(view.start, dtype=np.float64)
    blocks = [(first, np.asarray(b, dtype=np.float32)) for first, b in view.iter_blocks(tile)]
    out_i, out_j, out_s = [], [], []
    total = len(blocks) * (len(blocks) + 1) // 2
    done = 0
    for bi, (f0, x0) in enumerate(blocks):
        for f1, x1 in blocks[bi:]:
            s = x0 @ x1.T
            if f0 == f1:
                s[np.tril_indices(s.shape[0])] = -np.inf  # pairs i < j only, and not a window with itself
            ii, jj = np.nonzero(s >= threshold)
            if ii.size:
                gi, gj = ii.astype(np.int64) + f0, jj.astype(np.int64) + f1
                ok = _non_trivial(fi, st, gi, gj, window)
                out_i.append(gi[ok])
                out_j.append(gj[ok])
                out_s.append(s[ii[ok], jj[ok]])
            done += 1
        if progress:
            progress(f"exact pairs: {done}/{total} tiles")
    if not out_i:
        z = np.zeros(0, dtype=np.int64)
        return z, z.copy(), np.zeros(0, dtype=np.float32)
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s).astype(np.float32)


def _require_usearch() -> Any:
    try:
        from usearch.index import Index
    except ImportError as exc:
        raise SearchError(
            f"the approximate (ANN) backend needs usearch: {install_hint('ann')}; or use --backend exact"
        ) from exc
    return Index


def build_window_index(
    view: SegmentViewLike, *, progress: Callable[[str], None] | None = None, **params: Any
) -> Any:
    """A usearch HNSW index (inner product) over every window vector, keys = window indices;
    `params` override ANN_PARAMS (connectivity, expansion_add, expansion_search, dtype)."""
    Index = _require_usearch()
    p = {**ANN_PARAMS, **params}
    index = Index(ndim=view.dim, metric="ip", **p)
    n = len(view)
    for first, block in view.iter_blocks(ANN_ADD_ROWS):
        keys = np.arange(first, first + block.shape[0], dtype=np.uint64)
        index.add(keys, np.ascontiguousarray(block, dtype=np.float32), threads=0)
        if progress:
            progress(f"ANN graph: {first + block.shape[0]}/{n} windows")
    return index


def ann_pairs(
    view: SegmentViewLike,
    threshold: float,
    window: float,
    hop: float,
    *,
    k_neighbors: int = 10,
    index: Any | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Non-trivial pairs (i < j, cosine >= threshold) among each window's `k_neighbors` approximate
    nearest non-trivial neighbours; cosines near the threshold are rescored exactly from the view."""
    if index is None:
        index = build_window_index(view, progress=progress)
    fi, st = np.asarray(view.file_index), np.asarray(view.start, dtype=np.float64)
    # The query's own overlapping windows come first among its neighbours: ask for them too.
    trivial = 2 * math.ceil(window / hop) - 1 if hop > 0 else 1
    kq = min(len(view), k_neighbors + trivial)
    out_i, out_j, out_s = [], [], []
    n = len(view)
    for first, block in view.iter_blocks(ANN_SEARCH_ROWS):
        x = np.ascontiguousarray(block, dtype=np.float32)
        res = index.search(x, kq, threads=0)
        keys = np.atleast_2d(np.asarray(res.keys)).astype(np.int64)
        cos = 1.0 - np.atleast_2d(np.asarray(res.distances, dtype=np.float32))
        counts = np.atleast_1d(np.asarray(res.counts))
        valid = np.arange(keys.shape[1])[None, :] < counts[:, None]
        qi = np.broadcast_to(np.arange(first, first + x.shape[0])[:, None], keys.shape)
        cand = valid & (cos >= threshold - RESCORE_MARGIN) & (keys != qi)
        a, b = qi[cand], keys[cand]
        ok = _non_trivial(fi, st, a, b, window)
        a, b, c = a[ok], b[ok], cos[cand][ok]
        # Rescore the doubtful ones exactly (f16 graph distances are off by ~1e-3).
        doubt = np.flatnonzero(c < threshold + RESCORE_MARGIN)
        if doubt.size:
            c = c.copy()
            c[doubt] = np.einsum("ij,ij->i", x[a[doubt] - first], view.take(b[doubt]))
        keep = c >= threshold
        out_i.append(np.minimum(a[keep], b[keep]))
        out_j.append(np.maximum(a[keep], b[keep]))
        out_s.append(c[keep])
        if progress:
            progress(f"ANN neighbours: {first + x.shape[0]}/{n} windows")
    i, j, s = np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s).astype(np.float32)
    # Both ends of a pair may have found it: keep it once.
    _, first_of = np.unique(i * n + j, return_index=True)
    return i[first_of], j[first_of], s[first_of]


# ---------------------------------------------------------------------------------------------- ivf
def ivf_partitions(windows: int, probes: int = IVF_PROBES) -> int:
    """Partitions for `windows` windows each probing `probes`: sqrt(windows x probes), at least 1."""
    return max(1, min(windows, round(math.sqrt(windows * probes))))


def window_matrix(view: SegmentViewLike) -> np.ndarray:
    """Every window vector, in the view's stored dtype when it is float16 (1 GB at 1M x 512), else
    float32: the comparisons read each window several times, so it is read from the store once."""
    out: np.ndarray | None = None
    for first, block in view.iter_blocks(ANN_ADD_ROWS):
        b = np.asarray(block)
        if out is None:
            out = np.empty((len(view), view.dim), dtype=np.float16 if b.dtype == np.float16 else np.float32)
        out[first : first + b.shape[0]] = b
    return np.zeros((0, view.dim), dtype=np.float32) if out is None else out


def train_centroids(x: np.ndarray, partitions: int, *, seed: int = 0) -> np.ndarray:
    """(partitions, dim) float32 unit centroids: Lance's k-means ("dot") over a sample of the rows of x.
    Lance's k-means starts from random centroids, so two runs may partition differently."""
    if partitions <= 1:
        c = np.asarray(x, dtype=np.float64).sum(axis=0, keepdims=True)
        return (c / max(float(np.linalg.norm(c)), 1e-12)).astype(np.float32)
    from lance.util import KMeans

    sample = np.ascontiguousarray(
        x[sample_rows(len(x), KMEANS_ROWS_PER_PARTITION * partitions, seed)], dtype=np.float32
    )
    km = KMeans(partitions, metric_type="dot", max_iters=KMEANS_ITERS)
    km.fit(sample)
    return _unit_rows(km.centroids.storage.flatten().to_numpy().reshape(-1, x.shape[1]))


def _unit_rows(c: np.ndarray) -> np.ndarray:
    c = np.asarray(c, dtype=np.float32)
    return c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)


def lance_index_centroids(view: SegmentViewLike) -> tuple[np.ndarray, str] | None:
    """The IVF centroids of the store's Lance vector index (`mlx-clap index`) and a note saying so, or
    None when the view's store has no such index. The centroids partition the whole store as of the
    build; windows appended since are assigned to them like the others, so any coverage serves."""
    store = getattr(view, "store", None)
    ds = getattr(store, "dataset", None)
    if ds is None:
        return None
    from mlx_clap.search.lance_index import coverage
    from mlx_clap.store.schema import SEGMENT

    cov = coverage(store, SEGMENT)
    if cov is None:
        return None
    # index_stats carries the centroids (and warns that it will stop unless this asks for them).
    os.environ.setdefault("LANCE_INCLUDE_VECTOR_CENTROIDS", "true")
    try:
        stats = ds.stats.index_stats(cov.name)
        found = [seg.get("centroids") for seg in stats.get("segments") or stats.get("indices") or []]
    except (OSError, ValueError, RuntimeError, AttributeError) as exc:
        raise SearchError(f"cannot read the centroids of the store's {cov.index_type} index: {exc}") from exc
    found = [c for c in found if c is not None and len(c)]
    if not found:
        return None
    # Segments added by `optimize_indices` (appends) share the first one's trained partitions.
    centroids = _unit_rows(np.asarray(found[0], dtype=np.float32))
    note = (
        f"partitions: the store's Lance {cov.index_type} index ({len(centroids):,} "
        f"partition{'s' if len(centroids) != 1 else ''}, over {cov.indexed:,} of {cov.total:,} windows)"
    )
    return centroids, note


def nearest_partitions(
    x: np.ndarray, centroids: np.ndarray, probes: int, *, margin: float = 0.0, most: int | None = None
) -> np.ndarray:
    """(len(x), width) int32: each row's `probes` nearest centroids by dot product, nearest first, and
    after them up to `most` in all that score within `margin` of its nearest; -1 pads the rest."""
    most = min(max(probes, most or probes), len(centroids))
    probes = min(probes, len(centroids))
    out = np.full((len(x), most), -1, dtype=np.int32)  # 128 MB at 1M x 32
    ct = np.ascontiguousarray(centroids.T, dtype=np.float32)
    for first in range(0, len(x), ASSIGN_ROWS):
        s = np.asarray(x[first : first + ASSIGN_ROWS], dtype=np.float32) @ ct
        if most < s.shape[1]:
            top = np.argpartition(-s, most - 1, axis=1)[:, :most]
        else:
            top = np.broadcast_to(np.arange(s.shape[1]), s.shape)
        top_s = np.take_along_axis(s, top, axis=1)
        order = np.argsort(-top_s, axis=1, kind="stable")
        top, top_s = np.take_along_axis(top, order, axis=1), np.take_along_axis(top_s, order, axis=1)
        keep = (np.arange(most) < probes) | (top_s >= top_s[:, :1] - margin)
        out[first : first + s.shape[0]] = np.where(keep, top, -1)
    return out


def ivf_pairs(
    view: SegmentViewLike,
    threshold: float,
    window: float,
    *,
    probes: int = IVF_PROBES,
    partitions: int | None = None,
    centroids: np.ndarray | None = None,
    x: np.ndarray | None = None,
    progress: Callable[[str], None] | None = None,
    stats: dict[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Non-trivial pairs (i < j, cosine >= threshold) found within partitions: every window is compared
    exactly (float32 products, as `exact_pairs`) with the windows whose nearest partition is among its
    own `probes` nearest (or within PROBE_MARGIN of its nearest, up to MAX_PROBES). `centroids` (e.g.
    `lance_index_centroids`) default to a k-means of `partitions` (default `ivf_partitions`) over the
    windows; `x` is `window_matrix(view)` if already read. `stats` gets partitions, probes, the mean
    probes a window and seconds per stage."""
    stats = {} if stats is None else stats
    n = len(view)
    fi, st = np.asarray(view.file_index), np.asarray(view.start, dtype=np.float64)
    t = time.perf_counter()
    x = window_matrix(view) if x is None else x
    stats["read_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    if centroids is None:
        centroids = train_centroids(x, ivf_partitions(n, probes) if partitions is None else partitions)
        stats["kmeans_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    near = nearest_partitions(x, centroids, probes, margin=PROBE_MARGIN, most=MAX_PROBES)
    stats["assign_s"] = round(time.perf_counter() - t, 3)
    n_part = len(centroids)
    flat = near.ravel()
    stats.update(
        partitions=n_part,
        probes=min(probes, n_part),
        mean_probes=round(float(np.mean(flat >= 0)) * near.shape[1], 3),
    )
    t = time.perf_counter()
    # Windows in order of their nearest partition (members), and the (partition, window) probes.
    order = np.argsort(near[:, 0], kind="stable")
    bounds = np.searchsorted(near[order, 0], np.arange(n_part + 1))
    used = np.flatnonzero(flat >= 0)
    probe_order = used[np.argsort(flat[used], kind="stable")]
    probe_bounds = np.searchsorted(flat[probe_order], np.arange(n_part + 1))
    probe_window = probe_order // near.shape[1]
    stats["largest_partition"] = int(np.diff(bounds).max(initial=0))
    out_i, out_j, out_s = [], [], []
    last = time.monotonic()
    for p in range(n_part):
        lo, hi = bounds[p], bounds[p + 1]
        q_ids = probe_window[probe_bounds[p] : probe_bounds[p + 1]]
        if hi == lo or q_ids.size == 0:
            continue
        s = np.asarray(x[q_ids], dtype=np.float32) @ np.asarray(x[order[lo:hi]], dtype=np.float32).T
        a, b = np.nonzero(s >= threshold)
        if a.size:
            gi, gj = q_ids[a], order[lo + b]
            ok = (gi != gj) & _non_trivial(fi, st, gi, gj, window)
            out_i.append(np.minimum(gi[ok], gj[ok]))
            out_j.append(np.maximum(gi[ok], gj[ok]))
            out_s.append(s[a[ok], b[ok]])
        if progress and time.monotonic() - last >= 1.0:
            last = time.monotonic()
            progress(f"IVF pairs: {p + 1}/{n_part} partitions")
    stats["compare_s"] = round(time.perf_counter() - t, 3)
    if not out_i:
        z = np.zeros(0, dtype=np.int64)
        return z, z.copy(), np.zeros(0, dtype=np.float32)
    i, j, s = np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s).astype(np.float32)
    # A pair is found from both ends when each lies in the other's probed partitions: keep it once.
    _, first_of = np.unique(i * n + j, return_index=True)
    return i[first_of], j[first_of], s[first_of]


# ------------------------------------------------------------------------------------------- groups
def group_pairs(
    view: SegmentViewLike,
    i: np.ndarray,
    j: np.ndarray,
    scores: np.ndarray,
    *,
    min_occurrences: int = 2,
    gap: float = 0.0,
) -> list[Group]:
    """Groups of occurrences from window pairs (i, j, cosine): matched windows merged into runs per
    file, runs linked by a pair joined; groups of >= min_occurrences runs, largest first."""
    if i.size == 0:
        return []
    fi = np.asarray(view.file_index)
    st = np.asarray(view.start, dtype=np.float64)
    en = np.asarray(view.end, dtype=np.float64)
    matched = np.unique(np.concatenate([i, j]))
    runs = merge_runs(fi[matched], st[matched], en[matched], gap)
    rid = runs.ids
    ri = rid[np.searchsorted(matched, i)]
    rj = rid[np.searchsorted(matched, j)]
    cross = ri != rj  # a pair inside one run links nothing
    ri, rj, sc = ri[cross], rj[cross], np.asarray(scores, dtype=np.float64)[cross]
    n_runs = int(rid[-1]) + 1
    uf = UnionFind(n_runs)
    uf.union(ri, rj)
    label = uf.labels()
    run_file = fi[matched[runs.firsts]]
    size = np.bincount(label, minlength=n_runs)
    link_label = label[ri]
    link_sum = np.bincount(link_label, weights=sc, minlength=n_runs)
    link_cnt = np.bincount(link_label, minlength=n_runs)
    link_max = np.full(n_runs, -np.inf)
    np.maximum.at(link_max, link_label, sc)
    groups = []
    for root in np.flatnonzero(size >= max(min_occurrences, 2)):
        members = np.flatnonzero(label == root)  # run order = (file, start) order
        occ = [
            Occurrence(int(run_file[r]), float(runs.start[r]), float(runs.end[r]), int(runs.windows[r]))
            for r in members
        ]
        groups.append(
            Group(occ, float(link_sum[root] / link_cnt[root]), float(link_max[root]), int(link_cnt[root]))
        )
    groups.sort(
        key=lambda g: (-len(g.occurrences), -g.score, g.occurrences[0].file_index, g.occurrences[0].start)
    )
    return groups


def find_recurring(
    view: SegmentViewLike,
    *,
    threshold: float | None = None,
    min_z: float | None = None,
    min_occurrences: int = 2,
    k_neighbors: int = 10,
    backend: str = "auto",
    window: float | None = None,
    hop: float | None = None,
    gap: float = 0.0,
    index: Any | None = None,
    probes: int = IVF_PROBES,
    partitions: int | None = None,
    use_store_index: bool = True,
    progress: Callable[[str], None] | None = None,
    stats: dict[str, Any] | None = None,
) -> list[Group]:
    """Groups of recurring stretches, largest first (see the module docstring).

    Two windows match when their cosine reaches `threshold` (default 0.9), or, with `min_z`, when it is
    that many standard deviations above the cosine of two random windows of the store. backend "exact"
    compares every pair; "ivf" compares each window with those of its `probes` nearest k-means
    partitions (`partitions` of them, default sqrt(windows x probes); with `use_store_index` the
    centroids of the store's Lance IVF index when it has one with about that many partitions, within
    INDEX_PARTITIONS_RATIO; `stats["notes"]` says which partitions served); "ann" asks
    a usearch graph (`index`, else one built now) for each window's `k_neighbors` nearest; "auto" is
    exact up to EXACT_AUTO_WINDOWS windows, else ivf.
    `window` / `hop` default to what the view's times show; matched windows of one file merge into one
    occurrence when they overlap or lie within `gap` seconds. `stats`, when given, is filled with the
    backend used, the threshold, counts and seconds per stage.
    """
    if backend not in BACKENDS:
        raise SearchError(f"backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
    if threshold is not None and min_z is not None:
        raise SearchError("give at most one of threshold, min_z")
    if threshold is not None and not -1.0 <= threshold <= 1.0:
        raise SearchError(f"threshold must be a cosine between -1 and 1 (got {threshold})")
    if min_occurrences < 2:
        raise SearchError(f"min_occurrences must be at least 2 (got {min_occurrences})")
    if k_neighbors < 1:
        raise SearchError(f"k_neighbors must be at least 1 (got {k_neighbors})")
    if probes < 1:
        raise SearchError(f"probes must be at least 1 (got {probes})")
    if partitions is not None and partitions < 1:
        raise SearchError(f"partitions must be at least 1 (got {partitions})")
    if not gap >= 0:
        raise SearchError(f"gap must be 0 or more seconds (got {gap})")
    if len(view) == 0:
        raise SearchError(NO_SEGMENTS)
    stats = {} if stats is None else stats
    notes: list[str] = stats.setdefault("notes", [])
    seen_window, seen_hop = window_geometry(view)
    window = seen_window if window is None else float(window)
    hop = seen_hop if hop is None else float(hop)
    t0 = time.perf_counter()
    if min_z is not None:
        cal = _pair_threshold(view, window, min_z)
        threshold = min(cal.score_for_z(min_z), 1.0)
        stats["pair_calibration"] = cal.to_dict()
    threshold = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    if backend == "auto":
        backend = "exact" if len(view) <= EXACT_AUTO_WINDOWS else "ivf"
    stats.update(backend=backend, threshold=round(threshold, 6), windows=len(view), window=window, hop=hop)
    if backend == "exact":
        i, j, s = exact_pairs(view, threshold, window, progress=progress)
    elif backend == "ivf":
        centroids, where = None, ""
        from_index = lance_index_centroids(view) if use_store_index and partitions is None else None
        if from_index is not None:
            # A search index's partitions are sized for queries (Lance: ~N/4096 rows each); comparing
            # every window with its partitions' costs S x probes x S / partitions, so coarser ones
            # than half the balanced count cost more than training k-means (docs/performance.md).
            wanted = ivf_partitions(len(view), probes)
            if wanted / INDEX_PARTITIONS_RATIO <= len(from_index[0]) <= wanted * INDEX_PARTITIONS_RATIO:
                centroids, where = from_index
            else:
                have = len(from_index[0])
                notes.append(
                    f"the store's Lance index has {have:,} partition{'s' if have != 1 else ''}, too "
                    f"{'coarse' if have < wanted else 'fine'} to compare windows within them cheaply; "
                    f"training {wanted:,} instead"
                )
        stats["partitions_from"] = "kmeans" if centroids is None else "lance-index"
        t = time.perf_counter()
        i, j, s = ivf_pairs(
            view, threshold, window, probes=probes, partitions=partitions, centroids=centroids,
            progress=progress, stats=stats,
        )  # fmt: skip
        stats["ivf_s"] = round(time.perf_counter() - t, 3)
        if centroids is None:
            where = f"partitions: k-means ({stats['partitions']:,}) over the windows"
        near = f"{stats['probes']} nearest partition{'s' if stats['probes'] != 1 else ''}"
        notes.append(
            f"{where}; each window compared exactly with the windows of its {near} (and of those about as "
            f"near: {stats['mean_probes']:.2f} a window on average)"
        )
    else:
        if index is None:
            t = time.perf_counter()
            index = build_window_index(view, progress=progress)
            stats["ann_build_s"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        i, j, s = ann_pairs(
            view, threshold, window, hop, k_neighbors=k_neighbors, index=index, progress=progress
        )
        stats["ann_search_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    groups = group_pairs(view, i, j, s, min_occurrences=min_occurrences, gap=gap)
    stats.update(
        pairs=int(i.size),
        groups=len(groups),
        group_s=round(time.perf_counter() - t, 3),
        total_s=round(time.perf_counter() - t0, 3),
    )
    return groups
