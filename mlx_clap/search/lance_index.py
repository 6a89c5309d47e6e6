"""Approximate search from the store's own Lance vector index (IVF_RQ over the `vector` column).

One index covers file rows and segment rows alike: both kinds live in one `vector` column, Lance's
query API cannot pick between two indexes on one column, and a row-address prefilter restricts a search
to one kind (and to a path filter) before the top k is taken rather than filtering afterwards (its cost
is measured in docs/performance.md). The index lives inside the dataset
(`_indices/`, named by the version that committed it), so every Lance reader sees it and a `kill -9`
during a build leaves the last committed version.

- `build_index` (`mlx-clap index STORE`): trains the index once; after appends it adds the new
  fragments to it (`optimize_indices`, merged into the trained partitions: a second or so where a
  retrain takes minutes); `rebuild=True` trains again. Compactions remap it (Lance does).
- `coverage` says how many of a snapshot's rows the index covers. Rows appended since are searched
  exactly by Lance in the same query and merged (we never set `fast_search`), and deleted rows are
  never returned (Lance applies the deletion files), so an index that lags the store is still used.
- `LanceIndex.search` (files) has `FlatIndex`'s contract; `ann_segment_search` answers
  `search --segments`. Candidates are rescored exactly from their vectors (float32), so a row has the
  same score whichever backend found it.

Settings (docs/performance.md, benchmarks/bench_lance_ann.py): IVF_RQ, metric "dot", Lance's default
partition count, nprobes 20 (wider only when those partitions hold fewer than k of the rows a prefilter
keeps), refine_factor 10.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlx_clap.search import calibration
from mlx_clap.search.calibration import Calibration, calibrate_query
from mlx_clap.search.index import FlatIndex, SearchError, SearchResult, unit_queries
from mlx_clap.store.schema import FILE, SEGMENT, VECTOR

INDEX_TYPE = "IVF_RQ"
METRIC = "dot"
NPROBES = 20  # partitions probed (more, 4x at a time, when they hold fewer than k of the rows asked for)
REFINE_FACTOR = 10  # k * 10 candidates re-ranked on the full vectors: recall@10 0.998 at 1M (bench)
MAX_FIXED_PROBES = 320  # past this, Lance widens on its own until k rows are found
EXACT_SUBSET_ROWS = 20_000  # a filter keeping this few rows is scored exactly (cheaper than the index)
SEGMENT_CANDIDATES = 64  # windows asked of the index per wanted segment (neighbours crowd the top)
MIN_SEGMENT_CANDIDATES = 1024


@dataclass
class Coverage:
    """How a Lance vector index covers one snapshot: `indexed` of `total` rows (of the kind asked)."""

    name: str
    index_type: str
    indexed: int
    total: int
    kind: str = FILE

    @property
    def appended(self) -> int:
        return self.total - self.indexed

    def note(self) -> str:
        """What a search says about the backend, e.g. "ANN: Lance IVF_RQ index over 990,000 of
        1,000,000 rows; 10,000 appended rows searched exactly and merged"."""
        what = "windows" if self.kind == SEGMENT else "rows"
        text = f"ANN: Lance {self.index_type} index over {self.indexed:,} of {self.total:,} {what}"
        if self.appended:
            text += (
                f"; {self.appended:,} appended {what} searched exactly and merged "
                "(`mlx-clap index STORE` adds them to the index)"
            )
        return text


def _vector_index(ds: Any) -> Any | None:
    """The description of the vector index on the `vector` column, or None."""
    try:
        found = ds.describe_indices()
    except (OSError, ValueError, RuntimeError) as exc:
        raise SearchError(f"cannot read the store's indexes: {exc}") from exc
    for desc in found:
        if list(desc.field_names) == [VECTOR] and "IVF" in str(desc.index_type).upper():
            return desc
    return None


def _positions(store: Any, kind: str) -> np.ndarray:
    """Scan positions of the snapshot's rows of `kind` (the numbering of `store._addr`)."""
    return store._file_pos if kind == FILE else store._seg_pos


def coverage(store: Any, kind: str = FILE) -> Coverage | None:
    """The index's coverage of `store`'s rows of `kind`, or None when the store has no vector index."""
    desc = _vector_index(store.dataset)
    if desc is None:
        return None
    frags: set[int] = set()
    for seg in desc.segments:
        frags |= {int(f) for f in seg.fragment_ids}
    addr = store._addr[_positions(store, kind)]
    in_index = np.isin((addr >> np.uint64(32)).astype(np.int64), np.fromiter(frags, dtype=np.int64))
    return Coverage(str(desc.name), str(desc.index_type), int(in_index.sum()), int(addr.size), kind)


# ------------------------------------------------------------------------------------------- build
@dataclass
class BuildReport:
    """What `build_index` did: "built", "updated" (appended rows added) or "none" (already covering)."""

    action: str
    coverage: Coverage
    seconds: float = 0.0
    store: Any = None  # the store's snapshot after the build (a reader)


def build_index(
    store: Any,
    *,
    rebuild: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> BuildReport:
    """Bring the store's vector index up to date: train one (none yet, or `rebuild`), add the rows
    appended since (`optimize_indices`), or nothing when it covers every row. `store` must be open for
    writing (it holds the writer lock, so no sync commits meanwhile); returns the report, with the
    store's new snapshot in `report.store`. `progress(stage, done, total)` follows Lance's stages.

    The commit is Lance's own: a kill before it leaves the store as it was, plus unreferenced index
    files that the next compaction's cleanup removes."""
    import time

    from mlx_clap.store import Store
    from mlx_clap.store.errors import lance_failure

    if store.read_only:
        raise SearchError(f"{store.location}: open the store for writing to build its index")
    store.refresh()  # a writer: StoreBusyError when another process committed since it was opened
    rows = int(store._addr.size)
    if rows == 0:
        raise SearchError(f"{store.location}: the store is empty; embed some audio into it first")
    before = coverage(store, FILE)
    every = _coverage_all(store)
    t0 = time.perf_counter()

    def on_event(event: Any) -> None:
        if progress is not None and event.total:
            progress(str(event.stage), int(event.completed or 0), int(event.total))

    try:
        if before is None or rebuild:
            action = "built"
            store.dataset.create_index(
                VECTOR, INDEX_TYPE, metric=METRIC, replace=True, progress_callback=on_event
            )
        elif every < rows:
            action = "updated"
            # Merged into the existing index: a delta beside it (Lance's default) made every query
            # search two indexes, ~4x slower (16.8 against 3.8 ms, 20k rows; docs/performance.md).
            merge = max(1, len(_vector_index(store.dataset).segments))
            store.dataset.optimize.optimize_indices(index_names=[before.name], num_indices_to_merge=merge)
        else:
            return BuildReport("none", before, 0.0, store)
    except (OSError, ValueError, RuntimeError) as exc:
        raise SearchError(f"{store.location}: cannot build the vector index: {lance_failure(exc)}") from exc
    seconds = time.perf_counter() - t0
    fresh = Store.open(store.location)
    after = coverage(fresh, FILE)
    if after is None:
        raise SearchError(f"{store.location}: the vector index was not committed")
    return BuildReport(action, after, seconds, fresh)


def _coverage_all(store: Any) -> int:
    """Rows of any kind in indexed fragments."""
    desc = _vector_index(store.dataset)
    if desc is None:
        return 0
    frags = np.fromiter({int(f) for seg in desc.segments for f in seg.fragment_ids}, dtype=np.int64)
    return int(np.isin((store._addr >> np.uint64(32)).astype(np.int64), frags).sum())


# ------------------------------------------------------------------------------------------ search
def _serialize(addresses: np.ndarray) -> bytes:
    from lance.dataset import serialize_row_addrs

    return serialize_row_addrs(np.asarray(addresses, dtype=np.uint64).tolist())


class _Knn:
    """Nearest rows of one kind through the index: scan positions in, exact float32 scores out."""

    def __init__(self, store: Any, kind: str, *, nprobes: int = NPROBES, refine_factor: int = REFINE_FACTOR):
        self.store = store
        self.kind = kind
        self.nprobes = nprobes
        self.refine_factor = refine_factor
        self.positions = _positions(store, kind)
        addr = store._addr
        self._order = np.argsort(addr, kind="stable")
        self._sorted = addr[self._order]
        self._kind_mask: Any = False  # False: not computed yet (see _kind_filter)
        self._lock = threading.Lock()

    def _lookup(self, found: np.ndarray) -> np.ndarray:
        """Scan positions of row addresses Lance returned (-1 for one not in the snapshot)."""
        i = np.searchsorted(self._sorted, found)
        i = np.minimum(i, self._sorted.size - 1)
        ok = self._sorted[i] == found
        return np.where(ok, self._order[i], -1)

    def _kind_filter(self) -> tuple[str, np.ndarray, bytes] | None:
        """The rows of this kind as a prefilter, cached (a million addresses take ~0.1 s to encode):
        ("allow", its addresses, bytes) when this kind is the smaller part of the store, else
        ("block", the other rows' addresses, bytes); None when every row is of this kind."""
        with self._lock:
            if self._kind_mask is False:
                addr = self.store._addr
                other = np.setdiff1d(np.arange(addr.size), self.positions, assume_unique=True)
                if other.size == 0:
                    self._kind_mask = None
                elif self.positions.size <= other.size:
                    self._kind_mask = ("allow", addr[self.positions], _serialize(addr[self.positions]))
                else:
                    self._kind_mask = ("block", addr[other], _serialize(addr[other]))
            return self._kind_mask  # type: ignore[return-value]

    def _prefilter(self, allowed: np.ndarray | None, excluded: np.ndarray | None) -> dict[str, bytes]:
        """Lance's row-address prefilter: the rows of this kind, or only `allowed` (scan positions, a
        filter), less `excluded` (a few scan positions: the query's own row or file)."""
        addr = self.store._addr
        gone = (
            np.zeros(0, dtype=np.uint64) if excluded is None else addr[np.asarray(excluded, dtype=np.int64)]
        )
        if allowed is not None:
            if allowed.size <= addr.size - allowed.size:
                out = {"row_addr_allowlist": _serialize(addr[allowed])}
                return {**out, "row_addr_blocklist": _serialize(gone)} if gone.size else out
            keep = np.zeros(addr.size, dtype=bool)
            keep[allowed] = True
            return {"row_addr_blocklist": _serialize(np.concatenate([addr[~keep], gone]))}
        kind = self._kind_filter()
        if kind is None:
            return {"row_addr_blocklist": _serialize(gone)} if gone.size else {}
        how, addresses, encoded = kind
        if how == "allow":
            out = {"row_addr_allowlist": encoded}
            return {**out, "row_addr_blocklist": _serialize(gone)} if gone.size else out
        return {"row_addr_blocklist": _serialize(np.concatenate([addresses, gone])) if gone.size else encoded}

    def query(
        self, q: np.ndarray, k: int, allowed: np.ndarray | None = None, excluded: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scan positions, exact scores) of up to k rows nearest to the unit query `q`, best first."""
        from mlx_clap.store.errors import lance_failure
        from mlx_clap.store.schema import vectors_of

        # How many rows can come back: the rows of this kind (or `allowed`) less `excluded`.
        reachable = (self.positions.size if allowed is None else allowed.size) - (
            0 if excluded is None else len(excluded)
        )
        want = min(int(k), max(reachable, 0))
        prefilter = self._prefilter(allowed, excluded)
        probes: int | None = self.nprobes
        while True:
            # A fixed number of partitions: left open (Lance's default), a prefiltered query widened
            # to 144 of 244 partitions at 1M rows (43 ms instead of 7; docs/performance.md). Widened
            # here only when the probed partitions hold fewer than k of the rows asked for.
            nearest = {
                "column": VECTOR,
                "q": np.asarray(q, dtype=np.float32),
                "k": int(k),
                "minimum_nprobes": self.nprobes if probes is None else probes,
                "maximum_nprobes": probes,
                "refine_factor": self.refine_factor,
            }
            try:
                table = self.store.dataset.scanner(
                    columns=[VECTOR],
                    nearest=nearest,
                    with_row_address=True,
                    prefilter=True,
                    disable_scoring_autoprojection=True,
                    **prefilter,
                ).to_table()
            except (OSError, ValueError, RuntimeError) as exc:
                raise SearchError(
                    f"{self.store.location}: index search failed: {lance_failure(exc)}"
                ) from exc
            if table.num_rows >= want or probes is None:
                break
            probes = None if probes >= MAX_FIXED_PROBES else probes * 4
        pos = self._lookup(table.column("_rowaddr").to_numpy())
        if (pos < 0).any():
            raise SearchError(f"{self.store.location}: the index returned rows outside this snapshot")
        scores = vectors_of(table.column(VECTOR), self.store.dim).astype(np.float32, copy=False) @ q
        return pos, scores.astype(np.float32)


def _finish_one(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best k by score (desc), then row (asc), padded with (-inf, -1) to k."""
    order = np.lexsort((rows, -scores))[:k]
    s = np.full(k, -np.inf, dtype=np.float32)
    r = np.full(k, -1, dtype=np.int64)
    s[: order.size], r[: order.size] = scores[order], rows[order]
    return s, r


class LanceIndex:
    """Search over the file rows through the store's Lance vector index; `FlatIndex`'s contract
    (`search(queries, k, mask=None, exclude=None) -> SearchResult`). SearchError when the store has no
    index (`mlx-clap index STORE` builds one)."""

    name = "ann"

    def __init__(self, store: Any, *, nprobes: int = NPROBES, refine_factor: int = REFINE_FACTOR):
        if len(store) == 0:
            raise SearchError(f"{store.path}: the store is empty; embed some audio into it first")
        cov = coverage(store, FILE)
        if cov is None:
            raise SearchError(
                f"{store.path}: the store has no ANN index; build it with: mlx-clap index {store.path} "
                "(or search with --backend flat)"
            )
        self.store = store
        self.coverage = cov
        self.notes = [cov.note()]
        self._knn = _Knn(store, FILE, nprobes=nprobes, refine_factor=refine_factor)

    def __len__(self) -> int:
        return len(self.store)

    def search(
        self,
        queries: np.ndarray,
        k: int = 10,
        *,
        mask: np.ndarray | None = None,
        exclude: Sequence[int] | None = None,
    ) -> SearchResult:
        """Top-k file rows by cosine per query; `mask` (bool per row) and `exclude` (rows) are applied
        before the k nearest are taken (a prefilter). A filter keeping few rows is scored exactly."""
        n = len(self.store)
        q = unit_queries(queries, self.store.dim)
        keep = None if mask is None else np.asarray(mask, dtype=bool).copy()
        if exclude:
            keep = np.ones(n, dtype=bool) if keep is None else keep
            keep[np.asarray(list(exclude), dtype=np.int64)] = False
        notes: list[str] = []
        available = n if keep is None else int(keep.sum())
        if available == 0:
            raise SearchError("no rows in the store match the filter")
        if k < 1:
            raise SearchError(f"k must be at least 1 (got {k})")
        if k > available:
            notes.append(f"k={k} is more than the {available} candidate rows; returning {available}")
            k = available
        out_s = np.empty((q.shape[0], k), dtype=np.float32)
        out_r = np.empty((q.shape[0], k), dtype=np.int64)
        rows_kept = None if mask is None else np.nonzero(keep)[0]
        if rows_kept is not None and rows_kept.size <= EXACT_SUBSET_ROWS:
            vecs = np.asarray(self.store.take(rows_kept), dtype=np.float32)
            for i, qi in enumerate(q):
                out_s[i], out_r[i] = _finish_one(vecs @ qi, rows_kept, k)
            notes.append(f"the filter keeps {rows_kept.size:,} rows: scored exactly")
            return SearchResult(out_s, out_r, notes)
        file_pos = self.store._file_pos
        allowed = None if rows_kept is None else file_pos[rows_kept]
        # Without a filter, excluded rows are a blocklist beside the cached one of the other kind.
        excluded = file_pos[np.asarray(list(exclude), dtype=np.int64)] if exclude and mask is None else None
        for i, qi in enumerate(q):
            pos, scores = self._knn.query(qi, k, allowed, excluded)
            rows = np.searchsorted(file_pos, pos)
            out_s[i], out_r[i] = _finish_one(scores, rows.astype(np.int64), k)
        return SearchResult(out_s, out_r, notes)


def open_index(store: Any, backend: str = "auto", **kwargs: Any) -> FlatIndex | LanceIndex:
    """ "flat" (exact), "ann" (the store's Lance vector index: SearchError when it has none) or "auto"
    (that index when the store has one, else flat). A search never builds an index (`mlx-clap index
    STORE` does: minutes per million vectors). `kwargs` are `LanceIndex` options (nprobes,
    refine_factor)."""
    if backend == "flat":
        return FlatIndex(store)  # ANN options in kwargs do not apply
    if backend not in ("ann", "auto"):
        raise SearchError(f"unknown backend {backend!r}: use flat, ann or auto")
    if not hasattr(store, "dataset"):  # a stand-in store (tests, old readers): no Lance index
        if backend == "ann":
            raise SearchError(f"{store.path}: no ANN index (not a Lance store); search with --backend flat")
        return FlatIndex(store)
    if backend == "auto" and coverage(store) is None:
        return FlatIndex(store)
    return LanceIndex(store, **kwargs)


# ------------------------------------------------------------------------------------------- serve
@dataclass
class Ranked:
    """One query's best rows (or segments), best first, with its calibration and `scores_of(a, b)`
    (exact scores of indexes a..b-1): the shape `mlx_clap.serve.engine.ExactSearch.search` returns."""

    rows: np.ndarray
    scores: np.ndarray
    calibration: Calibration
    scores_of: Callable[[int, int], np.ndarray]


class AnnSearch:
    """`serve`'s search over the file rows (`kind` FILE) or the windows (SEGMENT, indexes of the
    store's SegmentView) through the Lance index; the interface of `serve.engine.ExactSearch`.
    The calibration sample's vectors are read once (`sample` rows, as ExactSearch draws them)."""

    def __init__(self, store: Any, kind: str, take: Callable[[np.ndarray], np.ndarray], sample: int):
        from mlx_clap.search.calibration import sample_rows

        cov = coverage(store, kind)
        if cov is None:
            raise SearchError(f"{store.path}: the store has no ANN index")
        self.coverage = cov
        self.notes = [cov.note()]
        self.kind, self.take = kind, take
        self._knn = _Knn(store, kind)
        if kind == FILE:
            self.n = len(store)
            self._index_of = np.full(int(store._addr.size), -1, dtype=np.int64)
            self._index_of[store._file_pos] = np.arange(self.n)
        else:
            view = store.segment_view()
            self.n = len(view)
            self._index_of = np.full(int(store._addr.size), -1, dtype=np.int64)
            self._index_of[view.positions] = np.arange(self.n)
        self._position = np.empty(self.n, dtype=np.int64)
        self._position[self._index_of[self._index_of >= 0]] = np.nonzero(self._index_of >= 0)[0]
        self.sample_vectors = np.asarray(take(sample_rows(self.n, sample)), dtype=np.float32)

    def search(self, q: np.ndarray, k: int, exclude: tuple[int, int] = (0, 0)) -> Ranked:
        """The k best for the unit query `q`, leaving out indexes exclude[0] .. exclude[1] - 1."""
        lo, hi = exclude
        excluded = self._position[lo:hi] if hi > lo else None
        pos, scores = self._knn.query(np.asarray(q, dtype=np.float32), k, None, excluded)
        idx = self._index_of[pos]
        order = np.lexsort((idx, -scores))
        return Ranked(
            idx[order],
            scores[order],
            Calibration.fit(self.sample_vectors @ q),
            lambda a, b: np.asarray(self.take(np.arange(a, b, dtype=np.int64)), dtype=np.float32) @ q,
        )


def ann_search(
    store: Any, kind: str, take: Callable[[np.ndarray], np.ndarray], sample: int
) -> AnnSearch | None:
    """`AnnSearch` over `kind` when the store has a vector index, else None (serve then searches exactly)."""
    if not hasattr(store, "dataset") or coverage(store, kind) is None:
        return None
    return AnnSearch(store, kind, take, sample)


# ---------------------------------------------------------------------------------- segment search
def ann_segment_search(
    store: Any,
    view: Any,
    query: np.ndarray,
    *,
    k: int = 10,
    threshold: float | None = None,
    min_z: float | None = None,
    min_percentile: float | None = None,
    gap: float,
    min_length: float = 0.0,
    file_mask: np.ndarray | None = None,
    nprobes: int = NPROBES,
    refine_factor: int = REFINE_FACTOR,
) -> tuple[Any, list[str]]:
    """`search --segments` through the index: (a `SegmentResult`, notes).

    The query is calibrated on a sample of the windows (`calibrate_query`, as file search does), the
    index gives the windows nearest to it, and each file they fall in has all its windows scored
    exactly, so a segment's extent, best window and window count are those an exact search gives.
    Segments are ranked by their best window; files are looked at in the order of their best
    candidate until k segments score at least the next candidate (more candidates are asked for while
    every one of them reaches the threshold)."""
    from mlx_clap.search.segments import SegmentResult, merge_kept, score_threshold

    if k < 1:
        raise SearchError(f"k must be at least 1 (got {k})")
    cov = coverage(store, SEGMENT)
    if cov is None:
        raise SearchError(
            f"{store.path}: the store has no ANN index; build it with: mlx-clap index {store.path} "
            "(or search with --backend flat)"
        )
    q = unit_queries(query, view.dim)[0]
    total = len(view)
    sample = calibration.DEFAULT_SAMPLE  # read now: `timeline` calibrates on the same sample
    cal = Calibration.fit(np.zeros(1)) if total == 0 else calibrate_query(view.take, total, q, limit=sample)
    cut = score_threshold(cal, threshold, min_z, min_percentile)
    fi = np.asarray(view.file_index)
    allowed_w = None
    if file_mask is not None:
        fm = np.asarray(file_mask, dtype=bool)
        allowed_w = np.nonzero(fm[fi])[0]
    n_allowed = total if allowed_w is None else int(allowed_w.size)
    notes = [cov.note(), f"z and percentile calibrated on a sample of {min(total, sample):,} windows"]
    if n_allowed == 0:
        return SegmentResult([], cal, cut, 0, -np.inf), notes
    # scan position -> index in the view, for the windows Lance returns
    by_pos = np.full(int(store._addr.size), -1, dtype=np.int64)
    by_pos[view.positions] = np.arange(total)
    knn = _Knn(store, SEGMENT, nprobes=nprobes, refine_factor=refine_factor)
    allowed_pos = None if allowed_w is None else np.asarray(view.positions)[allowed_w]
    want = min(n_allowed, max(MIN_SEGMENT_CANDIDATES, SEGMENT_CANDIDATES * k))
    file_segments: dict[int, list[Any]] = {}
    found: list[Any] = []
    while True:
        pos, scores = knn.query(q, want, allowed_pos)
        widx = by_pos[pos]
        order = np.lexsort((widx, -scores))
        widx, scores = widx[order], scores[order]
        best = float(scores[0]) if scores.size else -np.inf
        settled = False
        for w, s in zip(widx, scores, strict=True):
            # A file not looked at yet has no window above this one (the index's answer, best first),
            # so once k segments score at least this much, they are the top k.
            if s < cut or (len(found) >= k and found[k - 1].score >= s):
                settled = True
                break
            f = int(fi[w])
            if f not in file_segments:
                file_segments[f] = _file_segments(view, f, q, cal, cut, gap, min_length, merge_kept)
                found = sorted((seg for segs in file_segments.values() for seg in segs), key=_seg_key)
        passed = int(np.sum(scores >= cut))
        if settled or want >= n_allowed:
            break
        want = min(n_allowed, want * 4)
    if passed >= want and want < n_allowed:
        notes.append(
            f"at least {passed:,} windows reached the threshold (the {want:,} nearest were looked at)"
        )
    return SegmentResult(found[:k], cal, cut, passed, best), notes


def _seg_key(seg: Any) -> tuple[float, int, float]:
    return (-seg.score, seg.file_index, seg.start)


def _file_segments(
    view: Any, f: int, q: np.ndarray, cal: Calibration, cut: float, gap: float, min_length: float, merge: Any
) -> list[Any]:
    """Every segment of file `f`: its windows scored exactly, merged as `segment_search` merges them."""
    idx = view.of_file(f)
    scores = np.asarray(view.take(idx), dtype=np.float32) @ q

    class _One:  # the file's windows in the shape merge_kept reads
        file_index = np.asarray(view.file_index)[idx]
        start = np.asarray(view.start)[idx]
        end = np.asarray(view.end)[idx]

    return merge(_One, scores, scores >= cut, cal, gap=gap, min_length=min_length)
