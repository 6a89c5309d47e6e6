"""The library map of `mlx-clap serve` (mlx_clap/serve/layout.py): neighbours kept together, outliers that
do not squash the rest, a PCA fallback that says so, and a map.json cache keyed on what made it.

Stores here hold synthetic unit vectors (no model): clusters that are curved low-dimensional sheets, so a
file's nearest neighbours mean something, as they do for sounds of one kind.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest

from mlx_clap.serve import layout
from mlx_clap.store import Store

DIM = 64
K = 10


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def sheets(n: int, clusters: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` unit vectors in `clusters` clusters, each a curved 2-d sheet around its centre (PCA's two main
    axes overlap 20 such clusters; a neighbour projection keeps them apart)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % clusters
    centres = unit(rng.standard_normal((clusters, DIM)))
    basis = rng.standard_normal((clusters, 4, DIM)) / np.sqrt(DIM)
    z = rng.uniform(-1, 1, (n, 2))
    feats = np.concatenate([z, np.sin(2 * z)], axis=1)
    x = centres[labels] + 0.5 * np.einsum("nf,nfd->nd", feats, basis[labels])
    return unit(x + 0.002 * rng.standard_normal(x.shape)), labels


def make_store(path, vectors: np.ndarray) -> Store:
    with Store.create(path, {"model": "synthetic"}, dim=vectors.shape[1], dtype="float32") as store:
        store.write(
            [{"path": f"/lib/{i:05d}.wav", "size": 1, "mtime": 0.0} for i in range(len(vectors))], vectors
        )
    return Store.open(path)


def knn(x: np.ndarray, k: int = K) -> np.ndarray:
    sq = (x * x).sum(axis=1)
    d = sq[:, None] + sq[None, :] - 2 * (x @ x.T)
    np.fill_diagonal(d, np.inf)
    return np.argpartition(d, k, axis=1)[:, :k]


def kept_neighbours(vectors: np.ndarray, xy: np.ndarray) -> float:
    """Share of each point's 10 nearest neighbours (by vector) that are among its 10 nearest on the map."""
    a, b = knn(vectors.astype(np.float64)), knn(xy)
    return float(np.mean([len(set(p) & set(q)) / K for p, q in zip(a, b, strict=True)]))


def map_xy(doc: dict) -> np.ndarray:
    return np.column_stack([doc["x"], doc["y"]]).astype(np.float64)


@pytest.fixture
def without_pacmap(monkeypatch):
    """pacmap uninstalled, as far as `import pacmap` can tell (a None entry in sys.modules fails it)."""
    monkeypatch.setitem(sys.modules, "pacmap", None)


# ------------------------------------------------------------------------------------- scaling
def test_outliers_do_not_squash_the_library_into_a_blob(tmp_path, without_pacmap):
    """The audit's map: 278 files in one small blob, a few outliers across the canvas. Embeddings share a
    large common direction; 5 files (silent or broken ones, say) point away from it. The old scaling
    (divide by the largest |coordinate|) left the bulk's middle 90% within 0.4 of the canvas's 2; robust
    scaling spreads it over most of [-1, 1] and puts the outliers on the rim, in order."""
    sheet, _ = sheets(278, 6)
    rng = np.random.default_rng(1)
    common = unit(rng.standard_normal((1, DIM)))
    bulk = unit(2.0 * common + sheet)
    far = unit(-common + 0.3 * rng.standard_normal((5, DIM)))
    store = make_store(tmp_path / "s", np.concatenate([bulk, far]))
    doc = layout.build_map(store, layout.store_key(store))
    assert doc["projection"] == "pca"
    xy = map_xy(doc)
    assert np.abs(xy).max() <= 1.0
    spread = np.percentile(xy[:278], 95, axis=0) - np.percentile(xy[:278], 5, axis=0)
    assert spread.max() > 1.2, spread  # old scaling: 0.38
    assert (np.abs(xy[278:]).max(axis=1) > layout.INNER).all()
    # Same projection before scaling: the scaling keeps every point's order on both axes.
    raw = layout.pca(store, 2)
    for axis in range(2):
        order = np.argsort(raw[:, axis], kind="stable")
        assert np.all(np.diff(xy[order, axis]) >= -1e-4)


def test_robust_scale_edge_cases():
    assert np.array_equal(layout.robust_scale(np.zeros((5, 2))), np.zeros((5, 2)))
    one_off = np.zeros((300, 2))
    one_off[7] = [3.0, -4.0]  # 299 points in one place and a single other: the largest spread sets the scale
    got = layout.robust_scale(one_off)
    assert np.isfinite(got).all() and np.abs(got).max() <= 1.0 and np.abs(got[7]).max() > 0.5
    line = np.column_stack([np.linspace(-10, 10, 201), np.zeros(201)])
    got = layout.robust_scale(line)
    # One scale for both axes: the flat axis stays flat, the long one spans the canvas.
    assert np.allclose(got[:, 1], 0) and got[:, 0].min() < -0.9 and got[:, 0].max() > 0.9


# ---------------------------------------------------------------------------------- projection
def test_neighbour_projection_keeps_neighbours_together(tmp_path):
    """With pacmap installed (the serve and test extras) the map keeps most of each file's nearest
    neighbours next to it and the clusters apart; PCA's two axes (the old map) overlap the clusters."""
    if importlib.util.find_spec("pacmap") is None:
        pytest.skip("pacmap is not installed (pip install -e '.[serve]'): the neighbour map is not tested")
    vectors, labels = sheets(400, 20)
    store = make_store(tmp_path / "s", vectors)
    key = layout.store_key(store)
    assert key["projection"] == "pacmap"
    doc = layout.build_map(store, key)
    assert doc["projection"] == "pacmap" and "PaCMAP" in doc["projection_note"]
    xy = map_xy(doc)
    pca_xy = layout.pca(store, 2).astype(np.float64)
    kept, kept_pca = kept_neighbours(vectors, xy), kept_neighbours(vectors, pca_xy)
    purity, purity_pca = (float(np.mean(labels[knn(m)] == labels[:, None])) for m in (xy, pca_xy))
    # Measured: PaCMAP keeps 0.78 of the neighbours, purity 1.0; PCA 0.50 and 0.59.
    assert kept > 0.65 and kept > kept_pca + 0.15, (kept, kept_pca)
    assert purity > 0.95 and purity_pca < 0.8, (purity, purity_pca)
    # Reproducible: a recomputed map (map.json deleted, store moved) puts the files where they were.
    coords = layout.pca(store, layout.PROJECTION_DIMS)[:60]
    assert np.array_equal(layout.neighbour_projection(coords), layout.neighbour_projection(coords))


def test_without_pacmap_the_map_is_pca_and_says_so(tmp_path, without_pacmap):
    vectors, _ = sheets(100, 4)
    store = make_store(tmp_path / "s", vectors)
    doc, notes = layout.library_map(store)
    assert notes == []
    assert doc["projection"] == "pca" and "install pacmap" in doc["projection_note"]
    assert len(doc["x"]) == len(doc["y"]) == len(doc["cluster"]) == 100


def test_a_store_too_small_for_a_neighbour_graph_gets_pca(tmp_path):
    vectors, _ = sheets(layout.MIN_NEIGHBOUR_ROWS - 1, 2)
    store = make_store(tmp_path / "s", vectors)
    doc, _ = layout.library_map(store)
    assert doc["projection"] == "pca"
    assert np.abs(map_xy(doc)).max() <= 1.0


# ---------------------------------------------------------------------------------------- cache
def test_map_cache_is_keyed_on_version_and_projection(tmp_path, monkeypatch, without_pacmap):
    vectors, _ = sheets(60, 3)
    store = make_store(tmp_path / "s", vectors)
    path = tmp_path / "s" / layout.MAP_NAME
    key = layout.store_key(store)
    # A version-1 map.json (PCA scaled by its largest value) for this very store is recomputed.
    old = {"version": 1, "rows": key["rows"], "items_sha256": key["items_sha256"], "clusters_from": "old",
           "k": 1, "x": [0.0] * 60, "y": [0.0] * 60, "cluster": [0] * 60}  # fmt: skip
    path.write_text(json.dumps(old))
    doc, _ = layout.library_map(store)
    assert (
        doc["version"] == layout.MAP_VERSION and doc["projection"] == "pca" and doc["clusters_from"] != "old"
    )
    saved = json.loads(path.read_text())
    assert saved["version"] == layout.MAP_VERSION and saved["projection"] == "pca"
    # Valid while nothing changed: served from map.json.
    monkeypatch.setattr(layout, "build_map", lambda *a: pytest.fail("recomputed a valid map"))
    assert layout.library_map(store)[0] == saved
    # pacmap installed since: the PCA map is out of date (a neighbour map is computed).
    monkeypatch.setattr(layout, "projection_for", lambda rows: "pacmap")
    monkeypatch.setattr(layout, "build_map", lambda store, key, _: {**key, "version": layout.MAP_VERSION})
    assert layout.library_map(store)[0]["projection"] == "pacmap"
