"""Search over an embedding store: exact flat search, an approximate (usearch) backend, near-duplicates.

Every vector in a store is a unit vector, so cosine similarity is a dot product.

- `FlatIndex` streams the memory-mapped shards in blocks, multiplies each block by the queries in
  MLX (on the Apple GPU on a Mac) and keeps a running top-k: exact, no build step, memory bounded by
  the block size. Use it up to about a million vectors.
- `AnnIndex` wraps a usearch HNSW graph (optional extra `ann`), built by an explicit step
  (`AnnIndex.open`, `mlx-clap index STORE`) and saved next to the store as `ann.usearch` + `ann.json`;
  that step rebuilds it when the store changed (rows appended to an otherwise unchanged store are added
  to the saved graph instead) and does nothing when it is up to date. Searching never builds one:
  `open_index` uses a saved graph only when it matches the store (`AnnIndex.load`). Candidates are
  rescored exactly from the store, so both backends report the same scores for the same rows.
- `near_duplicates` finds groups of items whose cosine is at least a threshold: the self-similarity
  matrix is computed in tiles (never n x n) and the pairs merged with union-find.

Both indexes share one interface: `search(queries, k, mask=None, exclude=None) -> SearchResult`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx
import numpy as np

from mlx_clap.extras import install_hint

DEFAULT_BLOCK_ROWS = 65536  # 65536 x 512 float32 = 128 MiB of scores per query batch of 1
SCORE_BUDGET = 1 << 25  # floats in one (queries x block) score matrix: 128 MiB
DEDUPE_TILE = 4096  # rows per tile side when comparing the store with itself
ANN_AUTO_ROWS = 1_000_000  # "auto" uses an up-to-date ANN index from this many vectors on
ANN_STATES = {
    "missing": "no ANN index saved (or an unreadable one)",
    "stale": "the store changed since its ANN index was built",
    "partial": "its ANN index build was interrupted",
}
ANN_CHECKPOINT_S = 120.0  # a long build saves its progress this often, so Ctrl-C loses at most this
ANN_ADD_ROWS = 4096  # rows added to the graph per call, so a progress bar moves during a long build
ANN_FILE = "ann.usearch"
ANN_META = "ann.json"
ANN_VERSION = 1


class SearchError(ValueError):
    """A search that cannot run: empty store, wrong query dimension, missing backend, unknown path."""


class StoreLike(Protocol):
    """What the index needs from `mlx_clap.store.Store`."""

    path: Path
    dim: int
    items: list[dict[str, Any]]
    manifest: dict[str, Any]

    def __len__(self) -> int: ...

    def iter_shards(self) -> Iterator[tuple[int, np.ndarray]]: ...


@dataclass
class Hit:
    """One search result: the store row, its path and the cosine similarity to the query."""

    row: int
    path: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"row": self.row, "path": self.path, "score": round(clip_cosine(self.score), 6)}


@dataclass
class SearchResult:
    """Top-k per query, best first: `scores` (m, k) float32 and `rows` (m, k) int64.

    Where fewer than k rows qualified (a path filter, or `exclude`), the tail holds row -1, score -inf.
    """

    scores: np.ndarray
    rows: np.ndarray
    notes: list[str] = field(default_factory=list)

    def hits(self, items: Sequence[dict[str, Any]], query: int = 0) -> list[Hit]:
        """The hits of one query as `Hit`s, with the paths from the store's items."""
        out = []
        for row, score in zip(self.rows[query], self.scores[query], strict=False):
            if row < 0:
                break
            out.append(Hit(int(row), str(items[int(row)]["path"]), float(score)))
        return out


# ------------------------------------------------------------------------------------------ helpers
def clip_cosine(score: float) -> float:
    """A cosine as reported: clipped to [-1, 1]. Stored unit vectors are unit only to float rounding
    (float16 ones to ~1e-4), so a vector's cosine with its own copy can come out as 1.00001."""
    return min(1.0, max(-1.0, float(score)))


def unit_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    """Queries as a float32 (m, dim) array of unit rows; a zero or non-finite query is an error."""
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != dim:
        raise SearchError(f"query has shape {tuple(np.shape(queries))}; this store holds {dim}-d vectors")
    norms = np.linalg.norm(q, axis=1, keepdims=True)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise SearchError("query vector is zero or not finite")
    return q / norms


def iter_blocks(store: StoreLike, block_rows: int = DEFAULT_BLOCK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
    """(first_row, rows) blocks of `block_rows` rows (the last may be shorter) over the store's shards.

    Blocks inside one shard are views of its memory map; blocks that span shards are copies. Shards
    are often smaller than a good block (4096 rows by default), and each product has a fixed cost.
    """
    pieces: list[np.ndarray] = []
    have = 0
    start = 0
    for first, shard in store.iter_shards():
        pos = 0
        while pos < shard.shape[0]:
            if not pieces and shard.shape[0] - pos >= block_rows:
                yield first + pos, shard[pos : pos + block_rows]
                pos += block_rows
                continue
            if not pieces:
                start = first + pos
            take = min(block_rows - have, shard.shape[0] - pos)
            pieces.append(shard[pos : pos + take])
            have += take
            pos += take
            if have == block_rows:
                yield start, np.concatenate(pieces)
                pieces, have = [], 0
    if pieces:
        yield start, np.concatenate(pieces) if len(pieces) > 1 else pieces[0]


def path_mask(
    items: Sequence[dict[str, Any]], globs: Sequence[str] = (), contains: Sequence[str] = ()
) -> np.ndarray | None:
    """Rows whose path matches any glob (fnmatch on the whole path or on the file name) and contains
    every substring; None when no filter is given (all rows)."""
    if not globs and not contains:
        return None
    mask = np.zeros(len(items), dtype=bool)
    for i, item in enumerate(items):
        p = str(item["path"])
        if globs and not any(fnmatch.fnmatch(p, g) or fnmatch.fnmatch(os.path.basename(p), g) for g in globs):
            continue
        if contains and not all(s in p for s in contains):
            continue
        mask[i] = True
    return mask


class RowReader:
    """Random access to store rows (for rescoring and subset search): the store's own `take` where it
    has one (mlx_clap.store.Store), else the rows of its blocks held in memory (a stand-in store)."""

    def __init__(self, store: StoreLike):
        self.dim = store.dim
        self._take = getattr(store, "take", None)
        self.firsts: list[int] = []
        self.shards: list[np.ndarray] = []
        if self._take is None:
            for first, shard in store.iter_shards():
                self.firsts.append(first)
                self.shards.append(shard)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """float32 (len(rows), dim), in the order given."""
        rows = np.asarray(rows, dtype=np.int64)
        if self._take is not None:
            return np.asarray(self._take(rows), dtype=np.float32)
        out = np.empty((rows.size, self.dim), dtype=np.float32)
        which = np.searchsorted(np.asarray(self.firsts), rows, side="right") - 1
        for s in np.unique(which):
            sel = np.nonzero(which == s)[0]
            out[sel] = self.shards[s][rows[sel] - self.firsts[s]]
        return out


def _clamp_k(k: int, available: int, notes: list[str]) -> int:
    if k < 1:
        raise SearchError(f"k must be at least 1 (got {k})")
    if k > available:
        notes.append(f"k={k} is more than the {available} candidate rows; returning {available}")
        return available
    return k


def _finish(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort each query's candidates by score (desc), then row (asc), and keep k."""
    order = np.lexsort((rows, -scores), axis=-1)
    scores = np.take_along_axis(scores, order, axis=1)[:, :k]
    rows = np.take_along_axis(rows, order, axis=1)[:, :k]
    rows = np.where(np.isfinite(scores), rows, -1)
    return scores, rows


def _exclusion_mask(n: int, mask: np.ndarray | None, exclude: Sequence[int] | None) -> np.ndarray | None:
    if not exclude:
        return mask
    mask = np.ones(n, dtype=bool) if mask is None else mask.copy()
    mask[np.asarray(list(exclude), dtype=np.int64)] = False
    return mask


# --------------------------------------------------------------------------------------------- flat
class FlatIndex:
    """Exact search: every stored vector is scored against the queries, block by block, in MLX.

    `resident=True` keeps the blocks as float32 MLX arrays after the first pass, for many queries in
    one process (4 bytes per value, so 2 GiB for 1M x 512); the default re-reads the memory map each
    time (the OS page cache keeps it warm).
    """

    name = "flat"

    def __init__(self, store: StoreLike, *, block_rows: int = DEFAULT_BLOCK_ROWS, resident: bool = False):
        if len(store) == 0:
            raise SearchError(f"{store.path}: the store is empty; embed some audio into it first")
        self.store = store
        self.block_rows = block_rows
        self.resident = resident
        self._blocks: list[tuple[int, mx.array]] | None = None
        self.notes: list[str] = []  # why this backend answered, when that needs saying

    def __len__(self) -> int:
        return len(self.store)

    def _iter_mx_blocks(self) -> Iterator[tuple[int, mx.array]]:
        if self._blocks is not None:
            yield from self._blocks
            return
        kept = []
        for first, block in iter_blocks(self.store, self.block_rows):
            arr = mx.array(np.ascontiguousarray(block))
            if self.resident:
                # Kept as float32: converting float16 per query dominates on CPU (not on a GPU).
                arr = arr.astype(mx.float32)
                mx.eval(arr)
                kept.append((first, arr))
            yield first, arr
        if self.resident:
            self._blocks = kept

    def search(
        self,
        queries: np.ndarray,
        k: int = 10,
        *,
        mask: np.ndarray | None = None,
        exclude: Sequence[int] | None = None,
    ) -> SearchResult:
        """Top-k rows by cosine for each query; `mask` (bool per row) limits the candidates and
        `exclude` drops rows (e.g. the query's own row). k above the candidate count is clamped,
        with a note in the result."""
        n = len(self.store)
        q = unit_queries(queries, self.store.dim)
        mask = _exclusion_mask(n, mask, exclude)
        notes: list[str] = []
        available = n if mask is None else int(mask.sum())
        if available == 0:
            raise SearchError("no rows in the store match the filter")
        k = _clamp_k(k, available, notes)
        m = q.shape[0]
        best_s = np.full((m, 0), -np.inf, dtype=np.float32)
        best_r = np.full((m, 0), -1, dtype=np.int64)
        qm = mx.array(q)
        neg_inf = mx.array(-np.inf, dtype=mx.float32)
        for first, block in self._iter_mx_blocks():
            b = block.shape[0]
            keep = None
            if mask is not None:
                keep = mask[first : first + b]
                if not keep.any():
                    continue
                keep = mx.array(keep)[None, :]
            block32 = block.astype(mx.float32)
            # Queries in chunks so the (queries x block) score matrix stays under ~128 MiB.
            step = max(1, SCORE_BUDGET // b)
            tops, idxs = [], []
            for q0 in range(0, m, step):
                scores = qm[q0 : q0 + step] @ block32.T  # float32
                if keep is not None:
                    scores = mx.where(keep, scores, neg_inf)
                kk = min(k, b)
                if kk < b:
                    idx = mx.argpartition(-scores, kth=kk - 1, axis=1)[:, :kk]
                    top = mx.take_along_axis(scores, idx, axis=1)
                else:
                    idx = mx.broadcast_to(mx.arange(b)[None, :], scores.shape)
                    top = scores
                mx.eval(idx, top)
                tops.append(np.array(top))
                idxs.append(np.array(idx).astype(np.int64) + first)
            cand_s = np.concatenate([best_s, np.concatenate(tops)], axis=1)
            cand_r = np.concatenate([best_r, np.concatenate(idxs)], axis=1)
            if cand_s.shape[1] > k:
                part = np.argpartition(-cand_s, k - 1, axis=1)[:, :k]
                cand_s = np.take_along_axis(cand_s, part, axis=1)
                cand_r = np.take_along_axis(cand_r, part, axis=1)
            best_s, best_r = cand_s, cand_r
        scores, rows = _finish(best_s, best_r, k)
        return SearchResult(scores, rows, notes)


# ---------------------------------------------------------------------------------------------- ANN
def _require_usearch():
    try:
        from usearch.index import Index
    except ImportError as exc:
        raise SearchError(
            f"the approximate (ANN) backend needs usearch: {install_hint('ann')}; "
            "or search with --backend flat"
        ) from exc
    return Index


def store_fingerprint(store: StoreLike) -> dict[str, Any]:
    """What the saved ANN graph (or a cached map) was built from: row count, dim, manifest digest and a
    digest of the file rows (`_rows_digest`: the rows as stored, so an append-only change is recognised
    by the digest of the old row count's prefix)."""
    manifest = hashlib.sha256(json.dumps(store.manifest, sort_keys=True).encode()).hexdigest()
    return {
        "rows": len(store),
        "dim": store.dim,
        "manifest_sha256": manifest,
        "items_sha256": _rows_digest(store, len(store)),
    }


def _rows_digest(store: StoreLike, rows: int) -> str:
    """sha256 of the first `rows` file rows: their Lance row addresses (mlx_clap.store: a row rewritten
    or compacted gets a new one) and the store's URI; a store without addresses (a stand-in) hashes the
    rows' items."""
    h = hashlib.sha256(str(getattr(store, "uri", store.path)).encode() + b"\0")
    addresses = getattr(store, "row_addresses", None)
    if addresses is not None:
        h.update(np.ascontiguousarray(addresses()[:rows], dtype="<u8").tobytes())
    else:
        for item in store.items[:rows]:
            h.update(json.dumps(item, sort_keys=True).encode() + b"\n")
    return h.hexdigest()


def _checkpoint(
    index: Any,
    store: StoreLike,
    rows: int,
    now: dict[str, Any],
    graph_path: Path,
    meta_path: Path,
    params: dict[str, Any],
    progress: Callable[[str], None] | None,
) -> None:
    """Save a partly built graph (its first `rows` rows) so an interrupted build resumes from it."""
    fingerprint = {**now, "rows": rows, "items_sha256": _rows_digest(store, rows)}
    try:
        _save_graph(index, graph_path, meta_path, {**params, "fingerprint": fingerprint, "partial": True})
    except OSError as exc:
        if progress:
            progress(f"ANN index: checkpoint not saved ({exc})")


def _restore(Index: Any, path: Path) -> Any:
    """The saved graph, or None when it cannot be read (it is then rebuilt)."""
    try:
        return Index.restore(str(path), view=False)
    except (OSError, RuntimeError, ValueError):
        return None


def _save_graph(index: Any, graph_path: Path, meta_path: Path, meta: dict[str, Any]) -> None:
    """Graph first (unique temp file + rename, so concurrent builders never mix bytes), then its
    metadata; a reader that sees new metadata therefore sees the graph it describes."""
    import tempfile

    from mlx_clap.io.files import atomic_write_json

    fd, tmp = tempfile.mkstemp(dir=graph_path.parent, prefix=f".{graph_path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        index.save(tmp)
        os.replace(tmp, graph_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write_json(meta_path, meta)


class AnnIndex:
    """Approximate search with a usearch HNSW graph over the store, saved next to it.

    Candidates (`oversample` x k of them) are rescored exactly from the store's vectors, so scores
    match `FlatIndex` row for row. Use `AnnIndex.open(store)` to load the saved graph, or build it.
    """

    name = "ann"

    def __init__(
        self,
        store: StoreLike,
        index: Any,
        *,
        expansion_search: int = 256,
        oversample: int = 2,
    ):
        self.store = store
        self.index = index
        self.index.expansion_search = expansion_search
        self.oversample = oversample
        self._reader: RowReader | None = None
        self.built_now = False  # whether open() had to build or extend the graph
        self.notes: list[str] = []

    def __len__(self) -> int:
        return len(self.store)

    @property
    def reader(self) -> RowReader:
        if self._reader is None:
            self._reader = RowReader(self.store)
        return self._reader

    # -- building ----------------------------------------------------------------------------------
    @staticmethod
    def paths(store: StoreLike) -> tuple[Path, Path]:
        return Path(store.path) / ANN_FILE, Path(store.path) / ANN_META

    @classmethod
    def open(
        cls,
        store: StoreLike,
        *,
        rebuild: bool = False,
        save: bool = True,
        connectivity: int = 16,
        expansion_add: int = 128,
        expansion_search: int = 256,
        dtype: str = "f16",
        threads: int = 0,
        progress: Callable[[str], None] | None = None,
        on_rows: Callable[[int, int], None] | None = None,
    ) -> AnnIndex:
        """Load the saved graph if it matches the store, extend it if rows were only appended,
        otherwise build it (and save it next to the store unless `save=False`).

        `on_rows(added, to_add)` is called as rows go into the graph (for a progress bar); an
        interrupted build leaves the saved graph as it was, so running it again resumes from there."""
        Index = _require_usearch()
        if len(store) == 0:
            raise SearchError(f"{store.path}: the store is empty; embed some audio into it first")
        graph_path, meta_path = cls.paths(store)
        now = store_fingerprint(store)
        index = None
        start_row = 0
        if not rebuild and graph_path.is_file() and meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
            except ValueError:
                meta = {}
            meta = meta if isinstance(meta, dict) else {}
            old = meta.get("fingerprint") if isinstance(meta.get("fingerprint"), dict) else {}
            same_kind = (
                meta.get("version") == ANN_VERSION
                and old.get("dim") == now["dim"]
                and old.get("manifest_sha256") == now["manifest_sha256"]
                and meta.get("dtype") == dtype
            )
            if same_kind and old == now:
                index = _restore(Index, graph_path)
                start_row = now["rows"]
            elif (
                same_kind
                and old.get("rows", 0) < now["rows"]
                and _rows_digest(store, int(old["rows"])) == old.get("items_sha256")
            ):
                index = _restore(Index, graph_path)
                start_row = int(old["rows"])
                if progress:
                    progress(f"ANN index: adding {now['rows'] - start_row} new rows to {graph_path}")
            if index is None or len(index) != start_row:
                index, start_row = None, 0  # graph and metadata disagree: rebuild
        if index is None:
            if progress:
                progress(
                    f"ANN index: building over {now['rows']} vectors -> {graph_path} "
                    "(once; about 15 min per million 512-d vectors on 2 CPU cores)"
                )
            index = Index(
                ndim=store.dim,
                metric="ip",
                dtype=dtype,
                connectivity=connectivity,
                expansion_add=expansion_add,
                expansion_search=expansion_search,
            )
        built = start_row < now["rows"]
        if built:
            to_add, added = now["rows"] - start_row, 0
            if on_rows:
                on_rows(0, to_add)
            params = {
                "version": ANN_VERSION, "dtype": dtype, "connectivity": connectivity,
                "expansion_add": expansion_add,
            }  # fmt: skip
            last_save = time.monotonic()
            for first, block in iter_blocks(store, ANN_ADD_ROWS):
                end = first + block.shape[0]
                if end <= start_row:
                    continue
                lo = max(start_row - first, 0)
                keys = np.arange(first + lo, end, dtype=np.uint64)
                index.add(keys, np.ascontiguousarray(block[lo:], dtype=np.float32), threads=threads)
                added += end - first - lo
                if on_rows:
                    on_rows(added, to_add)
                if save and end < now["rows"] and time.monotonic() - last_save >= ANN_CHECKPOINT_S:
                    # A checkpoint looks like a graph of a store that had `end` rows: the next build
                    # then only adds the rest (the append-only path above).
                    _checkpoint(index, store, end, now, graph_path, meta_path, params, progress)
                    last_save = time.monotonic()
            if save:
                try:
                    _save_graph(index, graph_path, meta_path, {**params, "fingerprint": now})
                except OSError as exc:  # a read-only store can still be searched
                    if progress:
                        progress(f"ANN index: not saved ({exc}); it will be built again next time")
        out = cls(store, index, expansion_search=expansion_search)
        out.built_now = built
        return out

    @classmethod
    def status(cls, store: StoreLike) -> str:
        """ "current" (the saved graph matches the store), "stale" (the store changed since it was
        built), "partial" (a checkpoint of an interrupted build) or "missing" (none saved, or
        unreadable metadata)."""
        graph_path, meta_path = cls.paths(store)
        if not (graph_path.is_file() and meta_path.is_file()):
            return "missing"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return "missing"
        if not isinstance(meta, dict) or meta.get("version") != ANN_VERSION:
            return "missing"
        if meta.get("partial"):
            return "partial"
        return "current" if meta.get("fingerprint") == store_fingerprint(store) else "stale"

    @classmethod
    def load(cls, store: StoreLike, *, expansion_search: int = 256) -> AnnIndex:
        """The saved graph when it is up to date; SearchError otherwise (a search never builds one)."""
        Index = _require_usearch()
        state = cls.status(store)
        index = _restore(Index, cls.paths(store)[0]) if state == "current" else None
        if index is None or len(index) != len(store):
            raise SearchError(
                f"{ANN_STATES.get(state, ANN_STATES['missing'])}; build it with: mlx-clap index "
                f"{store.path} (or search with --backend flat)"
            )
        return cls(store, index, expansion_search=expansion_search)

    # -- searching ---------------------------------------------------------------------------------
    def search(
        self,
        queries: np.ndarray,
        k: int = 10,
        *,
        mask: np.ndarray | None = None,
        exclude: Sequence[int] | None = None,
    ) -> SearchResult:
        """Same contract as `FlatIndex.search`. With a filter that keeps few rows, the kept rows are
        searched exactly; otherwise the graph is asked for more candidates until k pass the filter."""
        n = len(self.store)
        q = unit_queries(queries, self.store.dim)
        mask = _exclusion_mask(n, mask, exclude)
        notes: list[str] = []
        available = n if mask is None else int(mask.sum())
        if available == 0:
            raise SearchError("no rows in the store match the filter")
        k = _clamp_k(k, available, notes)
        if mask is not None and available <= max(50_000, n // 20):
            rows = np.nonzero(mask)[0]
            return self._exact_subset(q, rows, k, notes)
        # Ask for enough candidates that k of them likely pass the filter, then widen if not.
        frac = available / n
        count = min(n, max(self.oversample * k, k + 16, int(math.ceil(self.oversample * k / frac))))
        while True:
            matches = self.index.search(q, count)
            keys = np.asarray(matches.keys, dtype=np.int64).reshape(q.shape[0], -1)
            # One query comes back as `Matches` (no counts), several as `BatchMatches`.
            counts = np.asarray(getattr(matches, "counts", [keys.shape[1]])).reshape(-1)
            valid = np.arange(keys.shape[1])[None, :] < counts[:, None]
            if mask is not None:
                valid &= mask[np.where(valid, keys, 0)]
            if valid.sum(axis=1).min() >= k or count >= n:
                break
            count = min(n, count * 4)
        scores = np.full(keys.shape, -np.inf, dtype=np.float32)
        for i in range(q.shape[0]):
            cand = keys[i][valid[i]]
            if cand.size:
                scores[i, : cand.size] = self.reader.take(cand) @ q[i]
                keys[i, : cand.size] = cand
            keys[i, cand.size :] = -1
        out_s, out_r = _finish(scores, keys, k)
        return SearchResult(out_s, out_r, notes)

    def _exact_subset(self, q: np.ndarray, rows: np.ndarray, k: int, notes: list[str]) -> SearchResult:
        vecs = mx.array(self.reader.take(rows))
        scores = np.array(mx.array(q) @ vecs.T)
        cand_r = np.broadcast_to(rows[None, :], scores.shape).astype(np.int64)
        out_s, out_r = _finish(scores, cand_r, k)
        return SearchResult(out_s, out_r, notes)


def open_index(store: StoreLike, backend: str = "auto", **kwargs: Any) -> FlatIndex | AnnIndex:
    """ "flat", "ann" (the saved, up-to-date graph: SearchError when there is none), or "auto" (that
    graph from `ANN_AUTO_ROWS` vectors on when it exists and usearch is installed, else flat).

    Building a graph takes minutes per million vectors, so it is never started here: see
    `AnnIndex.open` and `mlx-clap index`. `kwargs` are AnnIndex.load options."""
    if backend == "flat":
        return FlatIndex(store)  # ANN options in kwargs do not apply
    if backend == "ann":
        return AnnIndex.load(store, **kwargs)
    if backend != "auto":
        raise SearchError(f"unknown backend {backend!r}: use flat, ann or auto")
    if len(store) < ANN_AUTO_ROWS:
        return FlatIndex(store)  # exact search is fast enough here, and exact
    try:
        return AnnIndex.load(store, **kwargs)
    except SearchError:
        flat = FlatIndex(store)
        why = ANN_STATES.get(AnnIndex.status(store), ANN_STATES["missing"])
        flat.notes.append(
            f"exact search over {len(store)} vectors ({why}); `mlx-clap index {store.path}` builds one"
        )
        return flat


# ----------------------------------------------------------------------------------- near-duplicates
@dataclass
class DuplicateGroup:
    """Rows whose vectors are linked by cosine >= threshold (directly or through other members).

    `score` is the mean cosine over the linking pairs found, `min_score` the weakest member's best
    link; `rows` are in store order.
    """

    rows: list[int]
    score: float
    min_score: float

    def to_dict(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return {
            "size": len(self.rows),
            "score": round(clip_cosine(self.score), 6),
            "min_score": round(clip_cosine(self.min_score), 6),
            "paths": [str(items[r]["path"]) for r in self.rows],
            "rows": self.rows,
        }


class UnionFind:
    """Vectorised union-find over int rows: union whole arrays of pairs at a time."""

    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, x: np.ndarray) -> np.ndarray:
        root = self.parent[x]
        while True:
            nxt = self.parent[root]
            if np.array_equal(nxt, root):
                break
            root = nxt
        self.parent[x] = root  # path compression for the nodes asked about
        return root

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        while a.size:
            ra, rb = self.find(a), self.find(b)
            diff = ra != rb
            if not diff.any():
                return
            ra, rb = ra[diff], rb[diff]
            lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
            # Several pairs may share a root; minimum.at keeps one link, the loop redoes the rest.
            np.minimum.at(self.parent, hi, lo)
            a, b = lo, hi

    def labels(self) -> np.ndarray:
        return self.find(np.arange(self.parent.size))


def near_duplicates(
    store: StoreLike,
    threshold: float = 0.97,
    *,
    tile: int = DEDUPE_TILE,
    progress: Callable[[int, int], None] | None = None,
) -> list[DuplicateGroup]:
    """Groups of rows linked by cosine >= `threshold`, largest first, then by score.

    The store is compared with itself in (tile x tile) blocks of the upper triangle, so memory stays
    O(tile^2 + n) for any store size; time is O(n^2 d) (about n^2/2 dot products).
    """
    n = len(store)
    if n == 0:
        raise SearchError(f"{store.path}: the store is empty; embed some audio into it first")
    if not -1.0 <= threshold <= 1.0:
        raise SearchError(f"threshold must be a cosine between -1 and 1 (got {threshold})")
    uf = UnionFind(n)
    best = np.full(n, -np.inf, dtype=np.float32)  # each row's strongest link
    edge_sum = np.zeros(n, dtype=np.float64)  # per row: sum and count of its links (to score groups)
    edge_cnt = np.zeros(n, dtype=np.int64)
    # float32 once (2 GiB for 1M x 512): converting float16 tiles again for every pair costs more.
    blocks = [
        (first, mx.array(np.ascontiguousarray(b)).astype(mx.float32)) for first, b in iter_blocks(store, tile)
    ]
    mx.eval([b for _, b in blocks])
    total = len(blocks) * (len(blocks) + 1) // 2
    done = 0
    for bi, (fi, xi) in enumerate(blocks):
        for fj, xj in blocks[bi:]:
            s = xi @ xj.T
            if fi == fj:  # the diagonal tile: only pairs i < j
                ni = s.shape[0]
                upper = mx.arange(ni)[:, None] < mx.arange(ni)[None, :]
                s = mx.where(upper, s, mx.array(-np.inf, dtype=mx.float32))
            rowmax = np.array(mx.max(s, axis=1))
            hot = np.nonzero(rowmax >= threshold)[0]
            done += 1
            if hot.size:
                sub = np.array(s[mx.array(hot)])
                ii, jj = np.nonzero(sub >= threshold)
                vals = sub[ii, jj]
                a = hot[ii].astype(np.int64) + fi
                b = jj.astype(np.int64) + fj
                uf.union(a, b)
                np.maximum.at(best, a, vals)
                np.maximum.at(best, b, vals)
                np.add.at(edge_sum, a, vals)
                np.add.at(edge_cnt, a, 1)
            if progress:
                progress(done, total)
    labels = uf.labels()
    linked = np.nonzero(np.isfinite(best))[0]
    groups: dict[int, list[int]] = {}
    for r in linked:
        groups.setdefault(int(labels[r]), []).append(int(r))
    out = []
    for rows in groups.values():
        rows.sort()
        idx = np.asarray(rows)
        cnt = edge_cnt[idx].sum()
        out.append(DuplicateGroup(rows, float(edge_sum[idx].sum() / max(cnt, 1)), float(best[idx].min())))
    out.sort(key=lambda g: (-len(g.rows), -g.score, g.rows[0]))
    return out
