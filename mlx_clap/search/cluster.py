"""Spherical k-means over an embedding store, in MLX, with one medoid item per cluster.

Vectors and centroids live on the unit sphere and similarity is the dot product (cosine):
assignment is argmax of X @ C^T, and each centroid is the normalized sum of its members.
Initialisation is k-means++ (D^2 sampling with D = 1 - cosine), seeded, so a run is reproducible.

The medoid of a cluster is the member with the highest cosine to its centroid. Under cosine
similarity that is exact, not an approximation: sum_j x_i . x_j = x_i . (sum_j x_j) = |s| (x_i . c),
so the member nearest the normalized mean is the one most similar to all the others.

`write_assignments` saves the result next to the store as `clusters.json` (atomically).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_clap.search.index import SearchError, StoreLike, iter_blocks

CLUSTERS_NAME = "clusters.json"
BLOCK_ROWS = 65536
INIT_SAMPLE = 100_000  # rows seen by k-means++ seeding (at least 50 per cluster)


class ClusterError(SearchError):
    """Clustering that cannot run (empty store, k out of range); the message says why."""


@dataclass
class Clustering:
    """Result of `spherical_kmeans`; cluster ids are ordered by size (0 = largest)."""

    labels: np.ndarray  # (n,) int, cluster id of each row
    centroids: np.ndarray  # (k, dim) unit float32
    sizes: np.ndarray  # (k,)
    medoids: np.ndarray  # (k,) row of each cluster's medoid
    medoid_scores: np.ndarray  # (k,) cosine of the medoid to its centroid
    mean_cosine: np.ndarray  # (k,) mean cosine of the members to their centroid
    iterations: int
    converged: bool
    seed: int

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    def summary(self, items: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """One dict per cluster: id, size, medoid row (and path when `items` is given), cosines."""
        out = []
        for c in range(self.k):
            d = {
                "id": c,
                "size": int(self.sizes[c]),
                "medoid_row": int(self.medoids[c]),
                "medoid_score": round(float(self.medoid_scores[c]), 6),
                "mean_cosine": round(float(self.mean_cosine[c]), 6),
            }
            if items is not None:
                d["medoid_path"] = str(items[int(self.medoids[c])]["path"])
            out.append(d)
        return out


class _Blocks(list):
    """MLX blocks of rows in their stored dtype (float16 stays float16 until multiplied)."""

    starts: np.ndarray

    def take(self, rows: np.ndarray) -> np.ndarray:
        """float32 rows by global index, in the order given."""
        rows = np.asarray(rows, dtype=np.int64)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        out = np.empty((rows.size, self[0].shape[1]), dtype=np.float32)
        for w in np.unique(which):
            sel = np.nonzero(which == w)[0]
            local = mx.array(rows[sel] - self.starts[w])
            out[sel] = np.array(mx.take(self[w], local, axis=0).astype(mx.float32))
        return out


def _mx_blocks(data: StoreLike | np.ndarray, block_rows: int) -> _Blocks:
    """The vectors as MLX blocks, with the first row of each."""
    if isinstance(data, np.ndarray):
        it: Iterator[tuple[int, np.ndarray]] = (
            (s, data[s : s + block_rows]) for s in range(0, data.shape[0], block_rows)
        )
    else:
        it = iter_blocks(data, block_rows)
    blocks = _Blocks()
    starts = []
    for first, b in it:
        _check_finite(data, first, b)
        starts.append(first)
        blocks.append(mx.array(np.ascontiguousarray(b)))
    mx.eval(list(blocks))
    blocks.starts = np.asarray(starts, dtype=np.int64)
    return blocks


def _check_finite(data: StoreLike | np.ndarray, first: int, block: np.ndarray) -> None:
    """ClusterError naming the first row with NaN or Inf: one such row would poison every centroid."""
    bad = np.nonzero(~np.all(np.isfinite(np.asarray(block, dtype=np.float32)), axis=1))[0]
    if bad.size == 0:
        return
    row = first + int(bad[0])
    if isinstance(data, np.ndarray):
        raise ClusterError(f"input: row {row} holds NaN or Inf values; clustering needs finite vectors")
    name = data.items[row].get("path") if row < len(data.items) else None
    raise ClusterError(
        f"{data.path}: row {row} ({name}) holds NaN or Inf values ({bad.size} such row(s) in its block); "
        "run `mlx-clap check STORE --repair` and embed again"
    )


def _assign(blocks: list[mx.array], centroids: mx.array) -> tuple[np.ndarray, np.ndarray]:
    labels, best = [], []
    for b in blocks:
        s = b.astype(mx.float32) @ centroids.T
        lab = mx.argmax(s, axis=1)
        labels.append(lab)
        best.append(mx.max(s, axis=1))
        mx.eval(labels[-1], best[-1])
    return (
        np.concatenate([np.array(x) for x in labels]).astype(np.int64),
        np.concatenate([np.array(x) for x in best]).astype(np.float32),
    )


def _sums(blocks: list[mx.array], labels: np.ndarray, k: int, dim: int) -> np.ndarray:
    sums = mx.zeros((k, dim), dtype=mx.float32)
    start = 0
    for b in blocks:
        lab = mx.array(labels[start : start + b.shape[0]])
        sums = sums.at[lab].add(b.astype(mx.float32))
        start += b.shape[0]
    mx.eval(sums)
    return np.array(sums)


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def _kmeans_pp(blocks: _Blocks, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeding (as scikit-learn): draw 2 + log(k) candidates with probability
    proportional to D = 1 - max cosine to the chosen centres, keep the one that lowers sum(D) most."""
    trials = 2 + int(np.log(k))
    first = int(rng.integers(n))
    centers = [blocks.take(np.array([first]))[0]]

    def dist_to(vecs: np.ndarray) -> np.ndarray:  # (n, len(vecs)) of 1 - cosine
        c = mx.array(vecs)
        return np.concatenate([np.array(1.0 - b.astype(mx.float32) @ c.T) for b in blocks])

    dist = np.maximum(dist_to(centers[0][None])[:, 0], 0.0)
    for _ in range(1, k):
        total = float(dist.sum(dtype=np.float64))
        if total <= 1e-6:
            raise ClusterError(f"k={k} is more than the number of distinct vectors ({len(centers)})")
        cand = rng.choice(n, size=trials, p=dist / total)
        vecs = blocks.take(cand)
        pots = np.minimum(dist[:, None], np.maximum(dist_to(vecs), 0.0))
        best = int(np.argmin(pots.sum(axis=0, dtype=np.float64)))
        centers.append(vecs[best])
        dist = pots[:, best]
    return _unit(np.stack(centers))


def spherical_kmeans(
    data: StoreLike | np.ndarray,
    k: int,
    *,
    seed: int = 0,
    max_iter: int = 100,
    block_rows: int = BLOCK_ROWS,
    progress: Callable[[int, int], None] | None = None,
) -> Clustering:
    """Cluster unit vectors (a store, or an (n, dim) array) into k groups on the sphere.

    Stops when no assignment changes or after `max_iter` Lloyd steps. An emptied cluster is
    re-seeded with the row farthest from its centroid. Raises ClusterError for an empty input or
    k outside [1, n].
    """
    n = data.shape[0] if isinstance(data, np.ndarray) else len(data)
    where = "input" if isinstance(data, np.ndarray) else str(data.path)
    if n == 0:
        raise ClusterError(f"{where}: the store is empty; embed some audio into it first")
    if not 1 <= k <= n:
        raise ClusterError(f"{where}: k must be between 1 and the number of vectors ({n}); got {k}")
    dim = data.shape[1] if isinstance(data, np.ndarray) else data.dim
    rng = np.random.default_rng(seed)
    blocks = _mx_blocks(data, block_rows)
    sample = min(n, max(INIT_SAMPLE, 50 * k))
    if sample < n:
        # Seeding costs k passes over the data; a sample of 50+ rows per cluster seeds as well.
        rows = np.sort(rng.choice(n, size=sample, replace=False))
        seed_blocks = _mx_blocks(blocks.take(rows), block_rows)
        centroids = _kmeans_pp(seed_blocks, sample, k, rng)
    else:
        centroids = _kmeans_pp(blocks, n, k, rng)
    labels = np.full(n, -1, dtype=np.int64)
    converged = False
    it = 0
    for it in range(1, max_iter + 1):
        new_labels, best = _assign(blocks, mx.array(centroids))
        changed = int((new_labels != labels).sum())
        labels = new_labels
        if progress:
            progress(it, changed)
        counts = np.bincount(labels, minlength=k)
        empty = np.nonzero(counts == 0)[0]
        if changed == 0 and empty.size == 0:
            converged = True
            break
        sums = _sums(blocks, labels, k, dim)
        if empty.size:
            # Re-seed empty clusters with the worst-fitting rows (distinct ones).
            far = np.argsort(best, kind="stable")[: empty.size]
            sums[empty] = blocks.take(far)
            labels[far] = -1  # forces another pass
        centroids = _unit(sums)
    labels, best = _assign(blocks, mx.array(centroids))
    return _finish(labels, best, centroids, k, it, converged, seed)


def _finish(labels, best, centroids, k, iterations, converged, seed) -> Clustering:
    sizes = np.bincount(labels, minlength=k)
    # Relabel by size (desc), ties by old id, so ids are stable and meaningful.
    order = np.lexsort((np.arange(k), -sizes))
    remap = np.empty(k, dtype=np.int64)
    remap[order] = np.arange(k)
    labels = remap[labels]
    centroids = centroids[order]
    sizes = sizes[order]
    medoids = np.full(k, -1, dtype=np.int64)
    medoid_scores = np.full(k, np.nan, dtype=np.float32)
    mean_cos = np.full(k, np.nan, dtype=np.float32)
    # Best member per cluster: sort by (cluster, -score, row) and take each cluster's first row.
    srt = np.lexsort((np.arange(labels.size), -best, labels))
    first = np.unique(labels[srt], return_index=True)[1]
    present = labels[srt][first]
    medoids[present] = srt[first]
    medoid_scores[present] = best[srt[first]]
    sums = np.bincount(labels, weights=best, minlength=k)
    mean_cos[sizes > 0] = (sums[sizes > 0] / sizes[sizes > 0]).astype(np.float32)
    return Clustering(labels, centroids, sizes, medoids, medoid_scores, mean_cos, iterations, converged, seed)


def write_assignments(store: StoreLike, result: Clustering, name: str = CLUSTERS_NAME) -> Path | str:
    """Write `clusters.json` next to the store (temp file + rename; one object on an object store, named
    by its URI in the return value): parameters, per-cluster summary
    with medoid paths, and `labels` (cluster id per row, in the row order of items.jsonl)."""
    from mlx_clap.io.files import atomic_write_json
    from mlx_clap.search.index import store_fingerprint

    fp = store_fingerprint(store)
    doc = {
        "k": result.k,
        "seed": result.seed,
        "iterations": result.iterations,
        "converged": result.converged,
        "rows": int(result.labels.size),
        "store": {"manifest_sha256": fp["manifest_sha256"], "items_sha256": fp["items_sha256"]},
        "clusters": result.summary(store.items),
        "labels": result.labels.tolist(),
    }
    from mlx_clap.store.location import location_of

    loc = location_of(store)
    if loc.local is None:  # an object store: one PUT replaces it whole
        from mlx_clap.store.errors import StoreError

        side = loc.side(name)
        try:
            side.write_json(doc)
        except StoreError as exc:
            raise ClusterError(f"cannot write the cluster assignments: {exc}") from exc
        return str(side)
    path = loc.local / name
    if path.is_dir() or path.is_symlink():
        raise ClusterError(
            f"{path}: is a folder or a symbolic link; move it away so clusters.json can be written"
        )
    try:
        atomic_write_json(path, doc)
    except OSError as exc:  # read-only store folder, full disk
        raise ClusterError(f"{path}: cannot write the cluster assignments ({exc.strerror or exc})") from exc
    return path
