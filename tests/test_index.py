"""Flat search against brute-force numpy, near-duplicates (the Lance ANN index: test_lance_index.py)."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures import create_store

from mlx_clap.search.index import FlatIndex, SearchError, near_duplicates, path_mask
from mlx_clap.store import Store

MANIFEST = {"model": {"id": "test/random", "weights_sha256": "0" * 64}}


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, dim: int, centers: int, within: float, seed: int) -> np.ndarray:
    """Unit vectors around random centres, two members of a cluster having cosine ~`within` (the
    shape real embedding collections have: similar sounds at 0.5-0.9)."""
    rng = np.random.default_rng(seed)
    spread = np.sqrt((1 / within - 1) / dim)
    c = unit(rng.standard_normal((centers, dim)))
    return unit(c[rng.integers(0, centers, n)] + spread * rng.standard_normal((n, dim)))


def make_store(path, vectors: np.ndarray, dtype: str = "float32", shard_size: int = 1000, names=None):
    store = create_store(path, MANIFEST, vectors.shape[1], dtype=dtype, shard_size=shard_size)
    names = names or [f"clips/{i:06d}.wav" for i in range(len(vectors))]
    store.write([{"path": p, "size": 1, "mtime": 0.0} for p in names], vectors)
    return Store.open(path)


def brute_force(matrix: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = q @ matrix.T
    order = np.stack([np.lexsort((np.arange(s.shape[1]), -row)) for row in s])[:, :k]
    return np.take_along_axis(s, order, axis=1), order


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_flat_equals_brute_force(tmp_path, dtype):
    vecs = unit(np.random.default_rng(0).standard_normal((2500, 48)))
    store = make_store(tmp_path / "s", vecs, dtype=dtype, shard_size=700)
    q = unit(np.random.default_rng(1).standard_normal((5, 48)))
    # Small blocks so the running top-k merges across blocks and shard boundaries.
    res = FlatIndex(store, block_rows=256).search(q, k=10)
    want_s, want_r = brute_force(store.matrix(np.float32), q, 10)
    np.testing.assert_array_equal(res.rows, want_r)
    np.testing.assert_allclose(res.scores, want_s, rtol=0, atol=2e-6)
    assert res.notes == []


def test_flat_filters_exclude_and_clamp(tmp_path):
    vecs = unit(np.random.default_rng(2).standard_normal((300, 16)))
    names = [f"{'dogs' if i % 3 == 0 else 'rain'}/{i}.{'mp3' if i % 2 else 'wav'}" for i in range(300)]
    store = make_store(tmp_path / "s", vecs, names=names, shard_size=64)
    mask = path_mask(store.items, globs=["*.mp3"], contains=["dogs/"])
    assert mask.sum() == 50
    q = vecs[3]
    res = FlatIndex(store, block_rows=100).search(q, k=5, mask=mask, exclude=[3])
    hits = res.hits(store.items)
    assert len(hits) == 5 and all(h.path.startswith("dogs/") and h.path.endswith(".mp3") for h in hits)
    assert 3 not in res.rows
    allowed = np.setdiff1d(np.nonzero(mask)[0], [3])
    _, want = brute_force(vecs[allowed], q[None], 5)
    np.testing.assert_array_equal(res.rows[0], allowed[want[0]])
    # k above the candidates: clamped with a note, not an error.
    big = FlatIndex(store).search(q, k=80, mask=mask)
    assert big.rows.shape[1] == 50 and "50" in big.notes[0]
    with pytest.raises(SearchError, match="match the filter"):
        FlatIndex(store).search(q, k=3, mask=np.zeros(300, bool))
    with pytest.raises(SearchError, match="16-d"):
        FlatIndex(store).search(np.ones(17), k=3)


def test_empty_store_is_an_error(tmp_path):
    store = create_store(tmp_path / "e", MANIFEST, 8)
    with pytest.raises(SearchError, match="empty"):
        FlatIndex(store)
    with pytest.raises(SearchError, match="empty"):
        near_duplicates(store)


def test_near_duplicates_groups_and_ranking(tmp_path):
    rng = np.random.default_rng(5)
    base = unit(rng.standard_normal((700, 32)))
    vecs = base.copy()
    # group A: rows 10, 300, 650 (three near copies); group B: rows 20, 21; a chain 40-41-42.
    vecs[300] = unit(base[10][None] + 0.02 * rng.standard_normal((1, 32)))[0]
    vecs[650] = unit(base[10][None] + 0.02 * rng.standard_normal((1, 32)))[0]
    vecs[21] = unit(base[20][None] + 0.01 * rng.standard_normal((1, 32)))[0]
    d = unit(rng.standard_normal((1, 32)))[0]
    vecs[41] = unit((vecs[40] + 0.25 * d)[None])[0]
    vecs[42] = unit((vecs[41] + 0.25 * d)[None])[0]
    store = make_store(tmp_path / "s", vecs, shard_size=128)
    groups = near_duplicates(store, threshold=0.97, tile=100)
    got = [g.rows for g in groups]
    assert got[:2] in ([[10, 300, 650], [40, 41, 42]], [[40, 41, 42], [10, 300, 650]])
    assert got[2:] == [[20, 21]]
    for g in groups:
        m = vecs[g.rows] @ vecs[g.rows].T
        assert g.min_score >= 0.97 - 1e-6 and g.score <= 1.0 + 1e-6
        assert m[np.triu_indices(len(g.rows), 1)].max() >= 0.97
    # Chain 40-42 is linked through 41 even though 40 and 42 may be below the threshold.
    assert groups == near_duplicates(store, threshold=0.97, tile=4096)
    with pytest.raises(SearchError, match="threshold"):
        near_duplicates(store, threshold=1.5)


class _Shards:
    """A stand-in store whose shards hold their own row numbers."""

    def __init__(self, sizes: list[int]):
        self.sizes = sizes

    def iter_shards(self):
        first = 0
        for n in self.sizes:
            yield first, np.arange(first, first + n)[:, None]
            first += n


@pytest.mark.parametrize(
    "sizes,block", [([5, 5, 5], 4), ([3, 3, 3, 2], 5), ([10], 3), ([2, 2], 10), ([4, 4], 4)]
)
def test_iter_blocks_spans_shards(sizes, block):
    from mlx_clap.search.index import iter_blocks

    out = list(iter_blocks(_Shards(sizes), block))
    rows = np.concatenate([b for _, b in out])[:, 0]
    np.testing.assert_array_equal(rows, np.arange(sum(sizes)))
    assert all(b[0, 0] == first for first, b in out)
    assert all(len(b) == block for _, b in out[:-1])
