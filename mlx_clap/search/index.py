"""Search over an embedding store: exact flat search, the store's own ANN index, near-duplicates.

Every vector in a store is a unit vector, so cosine similarity is a dot product.

- `FlatIndex` streams the store's vectors in blocks and scores each block as it is read, in the stored
  dtype (`mlx_clap.search.exact`), keeping a running top-k: exact, no build step, memory bounded by
  the block size, near the time of reading the vectors once (docs/performance.md, "Exact search").
- The approximate backend is the Lance vector index inside the store (`mlx_clap.search.lance_index`:
  `mlx-clap index STORE` builds it, its `open_index` uses it when the store has one). Candidates are
  rescored exactly, so both backends report the same scores for the same rows.
- `near_duplicates` finds groups of items whose cosine is at least a threshold: the self-similarity
  matrix is computed in tiles (never n x n) and the pairs merged with union-find.

Both indexes share one interface: `search(queries, k, mask=None, exclude=None) -> SearchResult`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx
import numpy as np

from mlx_clap.search import exact

DEFAULT_BLOCK_ROWS = 65536  # 64 MiB of float16 x 512 a block: few Python steps per GB
DEDUPE_TILE = 4096  # rows per tile side when comparing the store with itself


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


def _exclusion_mask(n: int, mask: np.ndarray | None, exclude: Sequence[int] | None) -> np.ndarray | None:
    if not exclude:
        return mask
    mask = np.ones(n, dtype=bool) if mask is None else mask.copy()
    mask[np.asarray(list(exclude), dtype=np.int64)] = False
    return mask


# --------------------------------------------------------------------------------------------- flat
class FlatIndex:
    """Exact search: every stored vector is scored against the queries as its block is read from the
    store, in the stored dtype (`mlx_clap.search.exact.top_k_blocks`: NumKong for float16, no per-query
    conversion, on `threads` threads); the result equals a float64 brute force, ties by row.

    `resident=True` keeps the blocks in memory as read (the stored dtype) after the first pass, for many
    queries in one process (2 bytes per value for float16: 1 GiB for 1M x 512); the default reads the
    store again for each search.
    """

    name = "flat"

    def __init__(
        self,
        store: StoreLike,
        *,
        block_rows: int = DEFAULT_BLOCK_ROWS,
        resident: bool = False,
        threads: int | None = None,
    ):
        if len(store) == 0:
            raise SearchError(f"{store.path}: the store is empty; embed some audio into it first")
        self.store = store
        self.block_rows = block_rows
        self.resident = resident
        self.threads = threads
        self._blocks: list[tuple[int, np.ndarray]] | None = None
        self.notes: list[str] = []  # why this backend answered, when that needs saying
        self.stats: dict[str, Any] = {}  # the last search's kernel, threads and rescored pairs

    def __len__(self) -> int:
        return len(self.store)

    def _iter_blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        if self._blocks is not None:
            yield from self._blocks
            return
        kept = []
        for first, block in iter_blocks(self.store, self.block_rows):
            if self.resident:
                kept.append((first, block))
            yield first, block
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
        with a note in the result. A batch of queries is one matrix product per block."""
        n = len(self.store)
        q = unit_queries(queries, self.store.dim)
        mask = _exclusion_mask(n, mask, exclude)
        notes: list[str] = []
        available = n if mask is None else int(mask.sum())
        if available == 0:
            raise SearchError("no rows in the store match the filter")
        k = _clamp_k(k, available, notes)
        stats: dict[str, Any] = {}
        best = exact.top_k_blocks(self._iter_blocks(), q, k, threads=self.threads, mask=mask, stats=stats)
        self.stats = stats
        scores = best.scores.astype(np.float32)
        return SearchResult(scores, np.where(np.isfinite(scores), best.rows, -1), notes)


# ------------------------------------------------------------------------------------- fingerprints
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
