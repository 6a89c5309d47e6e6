"""Spherical k-means on synthetic clustered vectors: recovery, determinism, medoids, the saved file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fixtures import create_store
from test_index import make_store, unit

from mlx_clap.search.cluster import ClusterError, spherical_kmeans, write_assignments


def blobs(n: int, dim: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((k, dim)))
    truth = rng.integers(0, k, n)
    return unit(centres[truth] + 0.05 * rng.standard_normal((n, dim))), truth


def test_recovers_separated_clusters_and_medoids(tmp_path, monkeypatch):
    vecs, truth = blobs(3000, 32, 8, seed=0)
    store = make_store(tmp_path / "s", vecs, dtype="float16", shard_size=500)
    res = spherical_kmeans(store, 8, seed=1, block_rows=700)
    assert res.converged and res.k == 8
    # Each found cluster is exactly one true cluster.
    for c in range(8):
        assert len(set(truth[res.labels == c])) == 1
    assert list(res.sizes) == sorted(res.sizes, reverse=True) and res.sizes.sum() == 3000
    assert np.allclose(np.linalg.norm(res.centroids, axis=1), 1, atol=1e-5)
    m = store.matrix()
    for c in range(8):
        members = np.nonzero(res.labels == c)[0]
        sims = m[members] @ res.centroids[c]
        assert res.medoids[c] == members[np.argmax(sims)]
        # The medoid is also the member with the highest total similarity to the others.
        totals = (m[members] @ m[members].T).sum(axis=1)
        assert res.medoids[c] == members[np.argmax(totals)]
    again = spherical_kmeans(store, 8, seed=1)
    np.testing.assert_array_equal(again.labels, res.labels)
    # Seeding on a sample (as for big stores) finds the same partition here.
    monkeypatch.setattr("mlx_clap.search.cluster.INIT_SAMPLE", 500)
    sampled = spherical_kmeans(store, 8, seed=1)
    assert all(len(set(truth[sampled.labels == c])) == 1 for c in range(8))

    path = write_assignments(store, res)
    doc = json.loads(path.read_text())
    assert path.name == "clusters.json" and doc["k"] == 8 and len(doc["labels"]) == 3000
    assert doc["clusters"][0]["medoid_path"] == store.items[doc["clusters"][0]["medoid_row"]]["path"]
    assert not list(tmp_path.glob("s/.clusters*"))  # no temp file left behind


def test_bad_k_and_empty_store(tmp_path):
    vecs, _ = blobs(10, 8, 2, seed=2)
    store = make_store(tmp_path / "s", vecs)
    with pytest.raises(ClusterError, match="between 1 and the number of vectors"):
        spherical_kmeans(store, 11)
    with pytest.raises(ClusterError, match="between 1"):
        spherical_kmeans(store, 0)
    same = np.repeat(vecs[:1], 5, axis=0)
    with pytest.raises(ClusterError, match="distinct"):
        spherical_kmeans(same, 2)
    empty = create_store(tmp_path / "e", {"model": {"id": "x"}}, 8)
    with pytest.raises(ClusterError, match="empty"):
        spherical_kmeans(empty, 2)
    assert spherical_kmeans(vecs, 10).sizes.tolist() == [1] * 10
