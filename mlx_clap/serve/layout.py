"""The 2-D map of a library: one point per stored file, placed by PCA of the vectors, coloured by cluster.

PCA: the covariance of the vectors is summed block by block (float64, so memory stays at one block
for any store size) and its leading eigenvectors give the axes; the map shows the first two. Colours:
the cluster labels of an up-to-date `clusters.json` (what `mlx-clap cluster` wrote) when there is one,
else spherical k-means (`mlx_clap.search.cluster`) with a small k on the first CLUSTER_DIMS principal
components: colours then separate what the two drawn axes overlap, and 100k files cluster in seconds
(k-means on the 512-d vectors took 20-30 s on 2 cores). The result is cached beside the store as `map.json`,
valid while the store's row count and items digest are unchanged; a store folder that cannot be
written gets its map computed again on each start.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

MAP_NAME = "map.json"
MAP_VERSION = 1
MAX_CLUSTERS = 12
CLUSTER_DIMS = 16
BLOCK_ROWS = 65536


def store_key(store: Any) -> dict[str, Any]:
    """What a cached map is valid for: the store's row count and the sha256 of its items.jsonl."""
    from mlx_clap.search.index import store_fingerprint

    fp = store_fingerprint(store)
    return {"rows": int(fp["rows"]), "items_sha256": fp["items_sha256"]}


def pca(store: Any, dims: int) -> np.ndarray:
    """(n, dims) float32 coordinates: the centred vectors projected on their `dims` main axes."""
    from mlx_clap.search.index import iter_blocks

    n, dim = len(store), store.dim
    total = np.zeros(dim, dtype=np.float64)
    gram = np.zeros((dim, dim), dtype=np.float64)
    for _, block in iter_blocks(store, BLOCK_ROWS):
        b = np.asarray(block, dtype=np.float64)
        total += b.sum(axis=0)
        gram += b.T @ b
    mean = total / n
    cov = gram / n - np.outer(mean, mean)
    _, vecs = np.linalg.eigh(cov)  # ascending eigenvalues: the last columns are the main axes
    dims = min(dims, dim)
    axes = vecs[:, ::-1][:, :dims]
    # An eigenvector's sign is arbitrary: fix it (largest entry positive) so the map does not flip.
    axes *= np.sign(axes[np.abs(axes).argmax(axis=0), np.arange(dims)])
    out = np.empty((n, dims), dtype=np.float32)
    for first, block in iter_blocks(store, BLOCK_ROWS):
        out[first : first + block.shape[0]] = (np.asarray(block, dtype=np.float64) - mean) @ axes
    return out


def cluster_count(n: int) -> int:
    """A k that gives a readable map: about sqrt(n / 2), from 1 to MAX_CLUSTERS."""
    return int(min(MAX_CLUSTERS, max(1, round(math.sqrt(n / 2)))))


def saved_clusters(store: Any, key: dict[str, Any]) -> np.ndarray | None:
    """The labels of the store's clusters.json when it was computed for this very store, else None."""
    from mlx_clap.search.cluster import CLUSTERS_NAME

    path = Path(store.path) / CLUSTERS_NAME
    if not path.is_file() or path.is_symlink():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        labels = np.asarray(doc["labels"], dtype=np.int64)
        same = doc.get("store", {}).get("items_sha256") == key["items_sha256"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return labels if same and labels.shape == (key["rows"],) and labels.min(initial=0) >= 0 else None


def cluster_labels(store: Any, key: dict[str, Any], coords: np.ndarray) -> tuple[np.ndarray, str]:
    """Cluster id per row and where it came from; `coords` are the rows' principal components."""
    from mlx_clap.search.cluster import ClusterError, spherical_kmeans

    labels = saved_clusters(store, key)
    if labels is not None:
        return labels, "clusters.json"
    norms = np.linalg.norm(coords, axis=1, keepdims=True)
    # Directions in PCA space (spherical k-means wants unit rows; a row at the mean gets any direction).
    units = np.where(norms > 1e-12, coords / np.maximum(norms, 1e-12), 1.0 / np.sqrt(coords.shape[1]))
    k = cluster_count(len(store))
    while k > 1:
        try:
            found = spherical_kmeans(units.astype(np.float32), k, seed=0, max_iter=30)
            return found.labels, f"k-means on {coords.shape[1]} principal components, k={k}"
        except ClusterError:  # fewer distinct vectors than k
            k //= 2
    return np.zeros(len(store), dtype=np.int64), "one cluster"


def build_map(store: Any, key: dict[str, Any]) -> dict[str, Any]:
    """The map document: coordinates scaled into [-1, 1] (one scale for both axes) and cluster ids."""
    coords = pca(store, CLUSTER_DIMS)
    xy = coords[:, :2]
    scale = float(np.abs(xy).max()) or 1.0
    xy = xy / scale
    labels, source = cluster_labels(store, key, coords)
    return {
        "version": MAP_VERSION,
        **key,
        "clusters_from": source,
        "k": int(labels.max(initial=0)) + 1,
        "x": [round(float(v), 4) for v in xy[:, 0]],
        "y": [round(float(v), 4) for v in xy[:, 1]],
        "cluster": [int(v) for v in labels],
    }


def cached_map(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The map saved at `path` when it is valid for `key` (a link or an unreadable file is ignored)."""
    if not path.is_file() or path.is_symlink():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("version") != MAP_VERSION:
        return None
    if any(doc.get(k) != v for k, v in key.items()):
        return None
    if not all(isinstance(doc.get(k), list) and len(doc[k]) == key["rows"] for k in ("x", "y", "cluster")):
        return None
    return doc


def library_map(store: Any) -> tuple[dict[str, Any], list[str]]:
    """The map of `store` (from map.json when valid, else computed and saved) and notes for the user."""
    from mlx_clap.io.files import atomic_write_bytes, write_failure

    key = store_key(store)
    path = Path(store.path) / MAP_NAME
    doc = cached_map(path, key)
    if doc is not None:
        return doc, []
    doc = build_map(store, key)
    if path.is_symlink() or path.is_dir():
        return doc, [f"{path}: is a link or a folder; the map is not cached"]
    try:
        # Compact (not atomic_write_json's indented form): 100k points stay about 2 MB.
        atomic_write_bytes(path, json.dumps(doc, separators=(",", ":")).encode("utf-8"))
    except OSError as exc:
        return doc, [f"{path}: cannot cache the map ({write_failure(exc)}); it is computed on each start"]
    return doc, []
