"""Exact top-k in the stored dtype (mlx_clap.search.exact): every kernel, dtype, thread count and block
size returns what a float64 brute force returns, ties broken by the lower row; the fallback without
NumKong and the Metal/CUDA code path (`MLX_CLAP_CPU_OPTIMIZATIONS=off`) are exact too."""

from __future__ import annotations

import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_clap import settings
from mlx_clap.search import exact

DIM = 64
TIE = 1e-6  # scores within this of the k-th best count as ties (float rounding of the stored vectors)


def clustered(n: int, dtype: type, seed: int = 0) -> np.ndarray:
    """Unit rows around 20 centres; 10% are near-duplicates of another row (cosines 1 - 1e-7 and
    closer, below float16 resolution) and a few exact copies, so ties and near-ties abound."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, DIM))
    x = centres[rng.integers(0, 20, n)] + 0.3 * rng.standard_normal((n, DIM))
    dst = rng.choice(n, n // 10, replace=False)
    x[dst] = x[rng.integers(0, n, dst.size)] + 1e-5 * rng.standard_normal((dst.size, DIM))
    x[[5, 17, 400, n - 1]] = x[42]  # exact copies: equal scores, ordered by row
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(dtype)


def queries_for(x: np.ndarray, m: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = x[rng.integers(0, x.shape[0], m)].astype(np.float64) + 0.05 * rng.standard_normal((m, DIM))
    q[0] = x[42]  # the query whose top rows are exact copies
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def brute_force(x: np.ndarray, q: np.ndarray, k: int, allowed: np.ndarray | None = None):
    s = np.asarray(q, np.float64) @ np.asarray(x, np.float64).T
    if allowed is not None:
        s[:, ~allowed] = -np.inf
    order = np.lexsort((np.broadcast_to(np.arange(x.shape[0]), s.shape), -s), axis=1)[:, :k]
    return order, np.take_along_axis(s, order, axis=1), s


def assert_exact(result: exact.TopK, x: np.ndarray, q: np.ndarray, k: int, allowed=None) -> None:
    """The tie rule: every returned row scores within TIE of the brute force's k-th best, no row twice,
    and the scores equal the brute force's rank by rank."""
    _, want_scores, full = brute_force(x, q, k, allowed)
    assert result.rows.shape == result.scores.shape == (q.shape[0], k)
    for j in range(q.shape[0]):
        rows = result.rows[j]
        assert len(set(rows.tolist())) == k, rows
        assert np.all(full[j, rows] >= want_scores[j, -1] - TIE)
        np.testing.assert_allclose(result.scores[j], full[j, rows], rtol=0, atol=1e-12)
        np.testing.assert_allclose(result.scores[j], want_scores[j], rtol=0, atol=TIE)
        if allowed is not None:
            assert allowed[rows].all()


@pytest.fixture(scope="module")
def data():
    x32 = clustered(6000, np.float32)
    return {"float32": x32, "float16": x32.astype(np.float16)}


@pytest.mark.parametrize("kernel", exact.KERNELS)
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("m", [1, 10])
def test_every_kernel_equals_float64_brute_force(data, kernel, dtype, m):
    if kernel not in exact.available_kernels():
        pytest.skip(f"{kernel} is not installed")
    x = data[dtype]
    q = queries_for(x, m)
    for threads in (1, 2):
        got = exact.top_k(x, q, 10, kernel=kernel, threads=threads, block_rows=1000)
        assert_exact(got, x, q, 10)


def test_ties_are_ordered_by_row_whatever_the_blocks_and_threads(data):
    x = data["float16"]
    q = queries_for(x, 4)
    first = exact.top_k(x, q, 8, threads=1)
    # Query 0 is row 42's vector: its five exact copies tie and come first, lowest row first.
    assert first.rows[0, :5].tolist() == [5, 17, 42, 400, x.shape[0] - 1]
    assert len(set(first.scores[0, :5].tolist())) == 1
    for kernel in exact.available_kernels():
        for threads, block_rows in ((1, 7), (2, 333), (2, 6000), (3, 1)):
            got = exact.top_k(x[:2000], q, 8, kernel=kernel, threads=threads, block_rows=block_rows)
            want = exact.top_k(x[:2000], q, 8, kernel="numpy", threads=1, block_rows=2000)
            np.testing.assert_array_equal(got.rows, want.rows, err_msg=f"{kernel} {threads} {block_rows}")
            np.testing.assert_array_equal(got.scores, want.scores)


@pytest.mark.parametrize("kernel", exact.KERNELS)
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("m", [1, 10])
def test_kernel_error_stays_inside_its_margin(data, kernel, dtype, m):
    """The exactness argument rests on |kernel score - float64 score| <= eps: held against this CPU."""
    if kernel not in exact.available_kernels():
        pytest.skip(f"{kernel} is not installed")
    x = data[dtype]
    q = queries_for(x, m).astype(np.float64)
    scorer = exact._KERNEL_CLASSES[kernel](q, dtype, 1.0)
    err = np.abs(scorer.scores(x) * scorer.scale - x.astype(np.float64) @ q.T).max(axis=0)
    assert np.all(err <= scorer.eps), (err, scorer.eps)
    assert np.all(scorer.eps < 2e-3)  # a useful margin: the rescoring stays small


def test_rows_the_kernel_underrates_within_its_margin_are_still_found(monkeypatch):
    """A kernel off by up to 1e-3 (its stated margin) over rows 3e-6 apart:
    the rescoring still returns the float64 top k (a threshold without the margin misses rows)."""
    rng = np.random.default_rng(3)
    q = rng.standard_normal(DIM)
    q /= np.linalg.norm(q)
    # Scores spread evenly over [0.97, 0.98]: neighbours 3e-6 apart, more than the tie rule's 1e-6.
    s = rng.permutation(np.linspace(0.97, 0.98, 3000))[:, None]
    u = rng.standard_normal((3000, DIM))
    u -= (u @ q)[:, None] * q
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    x = (s * q + np.sqrt(1 - s**2) * u).astype(np.float32)

    class Noisy(exact._NumPy):
        def prepare(self, dtype):
            super().prepare(dtype)
            self.eps = np.full(self.q64.shape[0], 1e-3)

        def scores(self, block):
            s = super().scores(block)  # scores of the queries divided by `scale`
            return s + rng.uniform(-1e-3, 1e-3, s.shape) / self.scale

    monkeypatch.setitem(exact._KERNEL_CLASSES, "numpy", Noisy)
    for threads in (1, 2):
        assert_exact(exact.top_k(x, q, 10, kernel="numpy", threads=threads, block_rows=100), x, q[None], 10)


def test_mask_exclude_and_too_few_rows(data):
    x = data["float32"]
    q = queries_for(x, 3)
    allowed = np.zeros(x.shape[0], dtype=bool)
    allowed[::7] = True
    excluded = [0, 7, 42]
    allowed[excluded] = False
    got = exact.top_k(x, q, 10, mask=allowed | np.isin(np.arange(x.shape[0]), excluded), exclude=excluded)
    assert_exact(got, x, q, 10, allowed)
    # Fewer allowed rows than k: the rest is padded with -1 / -inf.
    few = np.zeros(x.shape[0], dtype=bool)
    few[[3, 4000]] = True
    got = exact.top_k(x, q, 5, mask=few, block_rows=500)
    assert sorted(got.rows[0, :2].tolist()) == [3, 4000]
    assert got.rows[:, 2:].tolist() == [[-1] * 3] * 3
    assert np.isneginf(got.scores[:, 2:]).all()


def test_streaming_blocks_of_any_size_equal_the_whole_matrix(data):
    x = data["float16"]
    q = queries_for(x, 9)
    cuts = [0, 1, 900, 905, 4000, x.shape[0]]
    blocks = ((a, np.array(x[a:b])) for a, b in zip(cuts[:-1], cuts[1:], strict=True))
    got = exact.top_k_blocks(blocks, q, 10, threads=2)
    want = exact.top_k(x, q, 10)
    np.testing.assert_array_equal(got.rows, want.rows)
    assert_exact(got, x, q, 10)


def test_memory_mapped_matrix(tmp_path, data):
    path = tmp_path / "v.npy"
    np.save(path, data["float16"])
    x = np.load(path, mmap_mode="r")
    q = queries_for(data["float16"], 2)
    assert_exact(exact.top_k(x, q, 10, threads=2), data["float16"], q, 10)


def test_fallback_without_numkong(data, monkeypatch):
    """NumKong is optional: without it float16 and float32 go through BLAS, still exact."""
    exact._numkong.cache_clear()
    monkeypatch.setitem(sys.modules, "numkong", None)  # import numkong -> ImportError
    try:
        assert exact._numkong() is None
        assert "numkong" not in exact.available_kernels()
        assert exact.choose_kernel(np.float16) == "numpy"
        x = data["float16"]
        q = queries_for(x, 2)
        stats: dict = {}
        assert_exact(exact.top_k(x, q, 10, stats=stats), x, q, 10)
        assert stats["kernel"] == exact.choose_kernel(x.dtype) != "numkong"
        with pytest.raises(RuntimeError, match="pip install numkong"):
            exact.top_k(x, q, 10, kernel="numkong")
    finally:
        exact._numkong.cache_clear()


def test_gpu_code_path_scores_host_blocks_on_the_cpu_threaded(data, monkeypatch):
    """`MLX_CLAP_CPU_OPTIMIZATIONS=off` (the Metal/CUDA code path): blocks read from a store are host
    memory, scored there by the same kernel on several threads; only rows already held as an mx.array
    go to `mx.matmul` in their dtype, on MLX's device."""
    monkeypatch.setenv("MLX_CLAP_CPU_OPTIMIZATIONS", "off")
    monkeypatch.setenv("MLX_CLAP_CPU_THREADS", "2")
    settings.reset()
    want = "numkong" if "numkong" in exact.available_kernels() else "numpy"
    assert exact.choose_kernel(np.float16) == want
    assert exact.default_threads() == 2
    x = data["float16"]
    q = queries_for(x, 10)
    stats: dict = {}
    assert_exact(exact.top_k(x, q, 10, block_rows=1000, stats=stats), x, q, 10)
    assert stats["kernel"] == want and stats["threads"] == 2
    got = exact.top_k(mx.array(x), q, 10, stats=stats)  # resident on the device, sliced there
    assert stats["kernel"] == "mlx" and stats["threads"] == 1
    assert_exact(got, x, q, 10)
    assert stats["rescored"] < 0.05 * x.size / DIM * q.shape[0]  # the float16 margin keeps it small


def test_choice_of_kernel():
    want = "numkong" if "numkong" in exact.available_kernels() else "numpy"
    assert exact.choose_kernel(np.float16) == want
    assert exact.choose_kernel(np.float16, 10) == want
    assert exact.choose_kernel(np.float32, 1) == "numpy"  # BLAS sgemv
    assert exact.choose_kernel(np.float32, 10) == want
    assert exact.choose_kernel(np.float64) == "numpy"
    assert exact.choose_kernel(np.float16, on_device=True) == "mlx"


def test_bad_input_is_a_clear_error(data):
    x = data["float32"]
    with pytest.raises(ValueError, match="k must be at least 1"):
        exact.top_k(x, x[0], 0)
    with pytest.raises(ValueError, match="queries have 3 dimensions; the vectors have 64"):
        exact.top_k(x, np.ones(3), 5)
    with pytest.raises(ValueError, match="finite"):
        exact.top_k(x, np.full(DIM, np.nan), 5)
    with pytest.raises(ValueError, match="mask has 10 rows; the vectors have at least 6000"):
        exact.top_k(x, x[0], 5, mask=np.ones(10, dtype=bool))
    with pytest.raises(ValueError, match="unknown kernel 'faiss'"):
        exact.top_k(x, x[0], 5, kernel="faiss")


# ------------------------------------------------------------------------------------ every score
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("threads", [1, 2])
def test_all_scores_are_float32_accurate_in_the_stored_dtype(data, dtype, threads):
    """Every row's score within float32 rounding (1e-6) of the float64 product of the stored values: float16
    rows are never converted, and the query is not rounded to float16 (that alone errs by ~1e-4)."""
    x = data["float16"].astype(dtype)
    q = queries_for(data["float16"], 3)
    got = exact.all_scores(exact.row_blocks(x, 777), q, x.shape[0], threads=threads)
    want = np.asarray(q, np.float64) @ np.asarray(x, np.float64).T
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # The test can tell: a query rounded to float16 (the top-k kernel's first pass) misses by far more.
    rounded = np.asarray(q, np.float16).astype(np.float64) @ np.asarray(x, np.float64).T
    assert np.abs(rounded - want).max() > 1e-5


def test_all_scores_without_numkong_and_bad_blocks(data, monkeypatch):
    x = data["float16"]
    q = queries_for(x, 2)
    want = np.asarray(q, np.float64) @ np.asarray(x, np.float64).T
    monkeypatch.setattr(exact, "_numkong", lambda: None)
    np.testing.assert_allclose(exact.all_scores(exact.row_blocks(x, 1000), q, 6000), want, atol=1e-6)
    with pytest.raises(ValueError, match="the blocks hold 1000 rows; 6000 were expected"):
        exact.all_scores([(0, x[:1000])], q, 6000)
    with pytest.raises(ValueError, match="covers rows 5500..6499; there are 6000"):
        exact.all_scores([(5500, x[:1000])], q, 6000)
    with pytest.raises(ValueError, match="queries have 3 dimensions"):
        exact.all_scores([(0, x)], np.ones(3), 6000)


# ---------------------------------------------------------------- the commands, on a float16 store
class KernelSpy:
    """NumKong with its scoring calls recorded: the dtype and row count of every block it scored."""

    def __init__(self, nk):
        self.nk = nk
        self.blocks: list[tuple[str, int]] = []

    def __getattr__(self, name):
        return getattr(self.nk, name)

    def cdist(self, a, b, **kw):
        self.blocks.append((str(a.dtype), a.shape[0]))
        return self.nk.cdist(a, b, **kw)

    def dots_packed(self, a, packed):
        self.blocks.append((str(a.dtype), a.shape[0]))
        return self.nk.dots_packed(a, packed)

    def rows(self) -> int:
        return sum(n for _, n in self.blocks)


@pytest.fixture()
def spy(monkeypatch):
    nk = exact._numkong()
    assert nk is not None, "numkong is a runtime dependency: pip install numkong"
    kernel = KernelSpy(nk)
    monkeypatch.setattr(exact, "_numkong", lambda: kernel)
    return kernel


@pytest.fixture(scope="module")
def float16_store(tmp_path_factory, data):
    """A float16 Lance store: 3000 file rows of `data` (near-duplicates, exact copies) with 2 segments
    each (the file row, and the next file's), so segment scores hold ties too."""
    from fixtures import create_store

    from mlx_clap.store import Store

    path = tmp_path_factory.mktemp("f16") / "store"
    x = data["float32"][:3000]
    store = create_store(path, {"model": {"id": "test/random"}}, DIM, dtype="float16",
                         segments={"hop": 1.0, "window": 2.0})  # fmt: skip
    items = [{"path": f"/sounds/{'dog' if i % 3 else 'rain'}_{i:04d}.wav", "size": 1, "mtime": 0.0,
              "duration": 3.0} for i in range(len(x))]  # fmt: skip
    segs = [(np.array([0.0, 1.0]), np.array([2.0, 3.0]), x[[i, (i + 1) % len(x)]]) for i in range(len(x))]
    store.write(items, x, segments=segs)
    return Store.open(path)


def stored(store) -> np.ndarray:
    return store.take(np.arange(len(store))).astype(np.float64)  # float16 -> float32 is exact


def test_search_command_scores_float16_blocks_as_read(float16_store, spy, tmp_path):
    """`mlx-clap search --like` on a float16 store: every block reaches the kernel as float16 (none
    converted), the ranking equals a float64 brute force (ties within 1e-6), masks and exclusions hold."""
    import json

    from click.testing import CliRunner
    from fixtures import assert_same_ranking

    from mlx_clap.cli import main

    store, x = float16_store, stored(float16_store)
    like = store.items[42]["path"]  # has exact copies at rows 5, 17, 400
    for extra, allowed in (([], np.ones(len(x), bool)), (["--glob", "*rain_*"], np.arange(len(x)) % 3 == 0)):
        spy.blocks.clear()
        r = CliRunner().invoke(main, ["search", str(store.path), "--like", like, "-k", "12", "--json",
                                      "--backend", "flat", *extra])  # fmt: skip
        assert r.exit_code == 0, r.output
        hits = json.loads(r.stdout)["results"]
        assert spy.blocks and {d for d, _ in spy.blocks} == {"float16"} and spy.rows() == len(x)
        scores = x @ (x[42] / np.linalg.norm(x[42]))  # the query as the command normalizes it
        ok = allowed.copy()
        ok[42] = False
        want = np.lexsort((np.arange(len(x)), -np.where(ok, scores, -np.inf)))[:12].tolist()
        assert_same_ranking([h["row"] for h in hits], want, scores)
        assert all(ok[h["row"]] for h in hits)
        reported = np.clip(scores[want], -1, 1)  # printed clipped to [-1, 1], 6 decimals
        np.testing.assert_allclose([h["score"] for h in hits], reported, rtol=0, atol=1e-6)


@pytest.mark.parametrize("optimizations", ["on", "off"])
def test_flat_index_batch_equals_float64_on_every_code_path(float16_store, spy, monkeypatch, optimizations):
    """A batch of 32 queries through FlatIndex (packed product per block) with the CPU fast paths on
    and off (CI's second pass, the Metal/CUDA code path): float16 blocks, multi-threaded, exact."""
    from fixtures import assert_same_ranking

    from mlx_clap.search.index import FlatIndex

    monkeypatch.setenv("MLX_CLAP_CPU_OPTIMIZATIONS", optimizations)
    monkeypatch.setenv("MLX_CLAP_CPU_THREADS", "2")
    settings.reset()
    store, x = float16_store, stored(float16_store)
    q = queries_for(store.take(np.arange(len(store))), 32).astype(np.float64)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    index = FlatIndex(store, block_rows=700)
    res = index.search(q, 10)
    assert index.stats["kernel"] == "numkong" and index.stats["threads"] == 2
    assert {d for d, _ in spy.blocks} == {"float16"} and spy.rows() == len(x)
    full = q.astype(np.float32).astype(np.float64) @ x.T  # the query as FlatIndex normalizes it
    for j in range(32):
        want = np.lexsort((np.arange(len(x)), -full[j]))[:10].tolist()
        assert_same_ranking(res.rows[j].tolist(), want, full[j])
        np.testing.assert_allclose(res.scores[j], full[j][want], rtol=0, atol=1e-6)


def test_segment_scores_and_timeline_read_float16_windows(float16_store, spy):
    """`search --segments` and `timeline` score every window as read (float16), to float32 accuracy,
    and find the same segments as the float32 product of the same stored values."""
    from mlx_clap.search.segments import score_windows, search_segments, timeline

    view = float16_store.segment_view()
    windows = view.take(np.arange(len(view))).astype(np.float64)
    q = windows[7] / np.linalg.norm(windows[7])
    got = score_windows(view, q[None])
    assert {d for d, _ in spy.blocks} == {"float16"} and spy.rows() == len(view)
    np.testing.assert_allclose(got[0], windows @ q, rtol=0, atol=1e-6)

    class Float32View:  # the same windows handed over as float32: what the old conversion scored
        def __init__(self, v):
            self.file_index, self.start, self.end, self.dim, self.v = v.file_index, v.start, v.end, v.dim, v

        def __len__(self):
            return len(self.v)

        def iter_blocks(self, block_rows=65536):
            for first, block in self.v.iter_blocks(block_rows):
                yield first, np.asarray(block, np.float32)

        def take(self, idx):
            return self.v.take(idx)

    want = search_segments(Float32View(view), q, k=None, min_z=3.0)[0]
    segs = search_segments(view, q, k=None, min_z=3.0)[0]
    assert [(s.file_index, s.start, s.end, s.windows) for s in segs] == [
        (s.file_index, s.start, s.end, s.windows) for s in want
    ]
    np.testing.assert_allclose([s.score for s in segs], [s.score for s in want], rtol=0, atol=1e-6)
    rows = timeline(view, 3, q)
    np.testing.assert_allclose([r.score for r in rows], windows[view.of_file(3)] @ q, rtol=0, atol=1e-6)


@pytest.mark.parametrize("resident", [True, False])
def test_serve_exact_search_reads_float16(float16_store, spy, monkeypatch, resident):
    """serve's ExactSearch: the resident matrix stays float16 (half the memory of float32) and the
    streamed path is FlatIndex; both score float16 blocks and rank as a float64 brute force."""
    from fixtures import assert_same_ranking

    from mlx_clap.search.index import RowReader
    from mlx_clap.serve import engine

    if not resident:
        monkeypatch.setattr(engine, "RESIDENT_BYTES", 0)
    store, x = float16_store, stored(float16_store)
    search = engine.ExactSearch(store, RowReader(store).take, None)
    assert (search.matrix is not None) == resident
    if resident:
        assert search.matrix.dtype == np.float16
    q = x[42] / np.linalg.norm(x[42])
    spy.blocks.clear()
    ranked = search.search(q, 12, exclude=(42, 43))
    assert {d for d, _ in spy.blocks} == {"float16"} and spy.rows() == len(x)
    scores = x @ q
    scores[42] = -np.inf
    want = np.lexsort((np.arange(len(x)), -scores))[:12].tolist()
    assert_same_ranking(ranked.rows.tolist(), want, scores)
    np.testing.assert_allclose(ranked.scores, scores[want], rtol=0, atol=1e-6)
