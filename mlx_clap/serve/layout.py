"""The 2-D map of a library: one point per stored file, placed so that neighbours stay together.

Placement: PCA first (the covariance summed block by block in float64, so memory stays at one block for any
store size), then PaCMAP (`pacmap`, an optional dependency in the `serve` extra) on the leading
PROJECTION_DIMS components, a projection that keeps each file's nearest neighbours near it; PCA's first two
axes alone squash a library into one blob around its mean. Without pacmap, or for a store too small for a
neighbour graph, the map is those two axes and says so (`projection`). benchmarks/bench_map.py compares
PaCMAP with umap-learn and openTSNE (docs/performance.md has the figures). Either way the positions are
scaled robustly (`robust_scale`): the 2nd-98th percentile box fills the canvas and outliers are squeezed
into its rim, so a few far points (silent or broken files, say) cannot shrink the rest into a blob.

Colours: the cluster labels of an up-to-date `clusters.json` (what `mlx-clap cluster` wrote) when there is
one, else spherical k-means (`mlx_clap.search.cluster`) with a small k on the first CLUSTER_DIMS principal
components (100k files cluster in seconds; k-means on the 512-d vectors took 20-30 s on 2 cores). The result
is cached beside the store as `map.json`, valid while the store's row count and items digest, the map
format (MAP_VERSION) and the projection available are unchanged; a store folder that cannot be written
gets its map computed again on each start.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from mlx_clap.store.location import SideFile

MAP_NAME = "map.json"
MAP_VERSION = 2  # 2: neighbour-preserving projection and robust scaling (version 1 maps are recomputed)
MAX_CLUSTERS = 12
CLUSTER_DIMS = 16
PROJECTION_DIMS = 50  # PaCMAP's neighbour search reads these components, not 512-d vectors
MIN_NEIGHBOUR_ROWS = 40  # below this a neighbour graph (about 10 per point) shows nothing PCA does not
BLOCK_ROWS = 65536
INNER = 0.9  # robust_scale: the 2nd-98th percentile box spans [-INNER, INNER]; outliers get the rim


def projection_for(rows: int) -> str:
    """The projection a map of `rows` files gets here: "pacmap" when installed and useful, else "pca"."""
    if rows < MIN_NEIGHBOUR_ROWS:
        return "pca"
    try:
        import pacmap  # noqa: F401
    except (ImportError, OSError):  # also a broken install (its faiss or numba fails to load): fall back
        return "pca"
    return "pacmap"


def neighbour_projection(coords: np.ndarray, seed: int = 0) -> np.ndarray:
    """(n, 2) PaCMAP positions of `coords` (rows of principal components), reproducible for a `seed`."""
    import pacmap

    # Its warnings ("random state is set", "data is high-dimensional") are notes to a developer, not the user.
    logging.getLogger("pacmap").setLevel(logging.ERROR)
    # n_neighbors=None: PaCMAP's own choice, 10 up to 10k points, 25 at 100k. The seed
    # keeps a recomputed map where it was (PaCMAP's kNN search then runs on one thread).
    model = pacmap.PaCMAP(n_components=2, n_neighbors=None, random_state=seed, apply_pca=False)
    return np.asarray(model.fit_transform(np.ascontiguousarray(coords, dtype=np.float32)), dtype=np.float64)


def robust_scale(xy: np.ndarray, low: float = 2.0, high: float = 98.0) -> np.ndarray:
    """`xy` in [-1, 1]: the `low`-`high` percentile box spans [-INNER, INNER] (one scale for both axes, so
    distances keep their ratios) and points beyond it are squeezed into the rim, in order (tanh). Up to 2% of
    the files on each side can be far off (1% let 5 outliers of 283 shrink the rest to a quarter)."""
    lo, hi = np.percentile(xy, [low, high], axis=0)
    half = float(np.max(hi - lo)) / 2
    if not half > 0:  # every point in one place (or under 2% elsewhere): the largest spread, else any
        half = float(np.abs(xy - np.median(xy, axis=0)).max()) or 1.0
    u = (xy - (lo + hi) / 2) * (INNER / half)
    a = np.abs(u)
    rim = INNER + (1 - INNER) * np.tanh((a - INNER) / (1 - INNER))
    return np.where(a <= INNER, u, np.sign(u) * rim)


def store_key(store: Any) -> dict[str, Any]:
    """What a cached map is valid for: the store's row count, the sha256 of its items.jsonl and the
    projection available now (installing pacmap later makes a PCA map out of date)."""
    from mlx_clap.search.index import store_fingerprint

    fp = store_fingerprint(store)
    rows = int(fp["rows"])
    return {"rows": rows, "items_sha256": fp["items_sha256"], "projection": projection_for(rows)}


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
    from mlx_clap.store.errors import StoreError
    from mlx_clap.store.location import location_of

    loc = location_of(store)
    if loc.local is not None:
        path = loc.local / CLUSTERS_NAME
        if not path.is_file() or path.is_symlink():
            return None
    try:
        doc = loc.side(CLUSTERS_NAME).read_json()
        labels = np.asarray(doc["labels"], dtype=np.int64)
        same = doc.get("store", {}).get("items_sha256") == key["items_sha256"]
    except (OSError, StoreError, ValueError, KeyError, TypeError, AttributeError):
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


PROJECTION_NOTES = {
    "pacmap": f"PaCMAP of {PROJECTION_DIMS} principal components: near points sound alike",
    "pca": "PCA, the two main axes (install pacmap for a map that keeps neighbours together)",
}


def direct(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def build_map(store: Any, key: dict[str, Any], on_mlx: Callable[..., Any] = direct) -> dict[str, Any]:
    """The map document: positions in [-1, 1] (`robust_scale`), cluster ids, and how both were made."""
    coords = pca(store, max(CLUSTER_DIMS, PROJECTION_DIMS))
    projection = key.get("projection", "pca")
    xy = neighbour_projection(coords) if projection == "pacmap" else coords[:, :2].astype(np.float64)
    xy = robust_scale(xy)
    # Only the k-means runs in MLX: `on_mlx` lets a server run that step on its MLX thread and the minutes of
    # PaCMAP (numpy and numba) elsewhere, so searches are not queued behind a 100k-file map.
    labels, source = on_mlx(cluster_labels, store, key, coords[:, :CLUSTER_DIMS])
    return {
        "version": MAP_VERSION,
        **key,
        "projection_note": PROJECTION_NOTES[projection],
        "clusters_from": source,
        "k": int(labels.max(initial=0)) + 1,
        "x": [round(float(v), 4) for v in xy[:, 0]],
        "y": [round(float(v), 4) for v in xy[:, 1]],
        "cluster": [int(v) for v in labels],
    }


def cached_map(path: Path | SideFile, key: dict[str, Any]) -> dict[str, Any] | None:
    """The map saved at `path` (a local file, or a side file on an object store) when it is valid for
    `key` (a link or an unreadable file is ignored)."""
    from mlx_clap.store.errors import StoreError

    if isinstance(path, Path) and (not path.is_file() or path.is_symlink()):
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8")) if isinstance(path, Path) else path.read_json()
    except (OSError, StoreError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("version") != MAP_VERSION:
        return None
    if any(doc.get(k) != v for k, v in key.items()):
        return None
    if not all(isinstance(doc.get(k), list) and len(doc[k]) == key["rows"] for k in ("x", "y", "cluster")):
        return None
    return doc


def library_map(store: Any, on_mlx: Callable[..., Any] = direct) -> tuple[dict[str, Any], list[str]]:
    """The map of `store` (from map.json when valid, else computed and saved) and notes for the user.
    `on_mlx(fn, *args)` runs the MLX step (k-means colours), e.g. on a server's MLX thread."""
    from mlx_clap.io.files import atomic_write_bytes, write_failure
    from mlx_clap.store.errors import StoreError
    from mlx_clap.store.location import location_of

    key = store_key(store)
    loc = location_of(store)
    if loc.local is None:  # an object store: the cache is one object, read and replaced whole
        side = loc.side(MAP_NAME)
        doc = cached_map(side, key)
        if doc is not None:
            return doc, []
        doc = build_map(store, key, on_mlx)
        try:
            side.write_json(doc, compact=True)
        except StoreError as exc:
            return doc, [f"{side}: cannot cache the map ({exc}); it is computed on each start"]
        return doc, []
    path = loc.local / MAP_NAME
    doc = cached_map(path, key)
    if doc is not None:
        return doc, []
    doc = build_map(store, key, on_mlx)
    if path.is_symlink() or path.is_dir():
        return doc, [f"{path}: is a link or a folder; the map is not cached"]
    try:
        # Compact (not atomic_write_json's indented form): 100k points stay about 2 MB.
        atomic_write_bytes(path, json.dumps(doc, separators=(",", ":")).encode("utf-8"))
    except OSError as exc:
        return doc, [f"{path}: cannot cache the map ({write_failure(exc)}); it is computed on each start"]
    return doc, []
