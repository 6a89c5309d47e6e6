"""Exact top-k by dot product over a matrix of vectors, read in the dtype it is stored in.

A query against 1M x 512 float16 vectors is bound by reading the 1 GB once, so the matrix is never
converted as a whole: a kernel made for the dtype scores it block by block, and only rows that could be
in the top k are scored again in float64. The result equals a float64 brute force (scores to ~1e-16),
with ties broken by row number, whatever kernel, block size or thread count produced it.

How the two stages stay exact: the kernel's score of row x differs from the float64 dot product by at
most `eps = R * |q - q_k| + (dim * u_acc + u_out) * R * |q_k|` (times 2 for safety), where q_k is the
query in the kernel's dtype, u_acc and u_out the unit roundoff of its accumulation and output, and R a
bound on the rows' norms (`max_norm`, 1 for the store's unit vectors). A row whose kernel score is below
(k-th best exact score so far - eps) cannot reach the top k; every other row is rescored in float64.

Kernels (`KERNELS`), chosen per dtype by `choose_kernel` from docs/performance.md's measurements
("Exact search in the stored dtype"):
- "numkong": NumKong's dot products (f16 x f16 with float32 accumulation; f32 x f32, measured with float64
  accumulation here, assumed float32 by the margin; row by row for one query, packed matrix products for
  several), SIMD for the CPU at hand (x86 AVX-512/AVX2, Arm NEON/SVE); blocks on `threads` threads (it
  releases the GIL).
- "numpy": BLAS in float32 (float16 blocks converted one block at a time): one float32 query, and the
  fallback without NumKong.
- "mlx": `mx.matmul` in the stored dtype on MLX's default device, for rows already held as an `mx.array`
  (resident on Metal/CUDA). Blocks read from a store are host memory on every device: copying them to
  an accelerator moves more bytes than the CPU reads to score them, so they go to NumKong everywhere,
  with `MLX_CLAP_CPU_OPTIMIZATIONS=off` (the Metal/CUDA code path) too.

`all_scores` gives every row's score instead of the top k (segment search calibrates on all of them),
float32 and as accurate as a float32 product: float16 rows are scored against the query split into
two float16 parts (high and low), one packed product, no conversion of the rows.
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

KERNELS = ("numkong", "numpy", "mlx")
DEFAULT_BLOCK_ROWS = 16384  # 16 MiB of float16 x 512: few Python steps per GB, small score tiles
_SAFETY = 2.0  # the error bounds above are first-order; doubling covers the higher-order terms


class TopK(NamedTuple):
    """The k best rows of each query: `rows` (m, k) int64, `scores` (m, k) float64 exact dot products,
    best first, ties by row; rows -1 and scores -inf where fewer than k rows could be returned."""

    rows: np.ndarray
    scores: np.ndarray


@functools.cache
def _numkong() -> Any | None:
    """NumKong if installed (it comes with usearch and is a runtime dependency), else None."""
    try:
        import numkong
    except ImportError:
        return None
    return numkong


def available_kernels() -> list[str]:
    """The kernels this process can run."""
    return [name for name in KERNELS if name != "numkong" or _numkong() is not None]


def choose_kernel(dtype: Any, queries: int = 1, *, on_device: bool = False) -> str:
    """The kernel for `queries` queries against vectors of `dtype`, as measured (docs/performance.md,
    "Exact search in the stored dtype"): "mlx" for rows held as an `mx.array` (`on_device`); for host
    memory, on any device, "numkong" for float16 (the only kernel near the read floor) and for batches
    of float32 queries, "numpy" (BLAS sgemv) for one float32 query and for every dtype when NumKong is
    missing."""
    if on_device:
        return "mlx"
    name = _dtype_name(dtype)
    if _numkong() is None or name not in ("float16", "float32") or (name == "float32" and queries == 1):
        return "numpy"
    return "numkong"


def default_threads() -> int:
    """Scoring threads: `MLX_CLAP_CPU_THREADS`, else the cores this process may use (at most 8). Not
    tied to `MLX_CLAP_CPU_OPTIMIZATIONS`: that switch is about MLX's CPU work, while exact search scores
    host memory on the CPU on every device (a Mac's cores included)."""
    import os

    from mlx_clap import settings

    chosen = settings.current().cpu_threads
    if chosen is not None:
        return max(1, chosen)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def _is_mlx(block: Any) -> bool:
    return type(block).__module__.startswith("mlx")


def _dtype_name(dtype: Any) -> str:
    try:
        return np.dtype(dtype).name
    except TypeError:  # an MLX dtype prints as "mlx.core.float16"
        return str(dtype).rsplit(".", 1)[-1]


# ------------------------------------------------------------------------------------------ kernels
class _Kernel:
    """Scores a block of rows against the queries, with a bound on each query's score error."""

    threaded = True

    def __init__(self, queries: np.ndarray, dtype: str, max_norm: float):
        self.dim = queries.shape[1]
        self.max_norm = max_norm
        # Scale each query by a power of two (exact) into [0.5, 1) so that float16 neither overflows
        # nor loses small queries to subnormals; scores are scaled back exactly.
        peak = np.max(np.abs(queries), axis=1)
        self.scale = np.ldexp(1.0, np.frexp(np.where(peak > 0, peak, 1.0))[1]).astype(np.float64)
        self.q64 = queries / self.scale[:, None]
        self.prepare(dtype)

    def prepare(self, dtype: str) -> None:
        raise NotImplementedError

    def error(self, q_kernel: np.ndarray, u_acc: float, u_out: float) -> np.ndarray:
        """Per-query bound on |kernel score - float64 score| (in the caller's scale)."""
        r = self.max_norm * (1 + 2.0**-9)  # stored float16 unit vectors are unit to ~2^-11
        q_k = q_kernel.astype(np.float64)
        rounding = np.linalg.norm(self.q64 - q_k, axis=1)
        arithmetic = (self.dim * u_acc + u_out) * np.linalg.norm(q_k, axis=1)
        return _SAFETY * r * (rounding + arithmetic) * self.scale

    def scores(self, block: Any) -> np.ndarray:
        """(rows, m) float32 or float64 scores of the scaled queries (times `scale` is the caller's
        scale), a numpy array the caller may modify."""
        raise NotImplementedError

    def rows64(self, block: Any, rows: np.ndarray) -> np.ndarray:
        return np.asarray(block[rows], dtype=np.float64)


class _NumKong(_Kernel):
    def prepare(self, dtype: str) -> None:
        nk = _numkong()
        if nk is None:
            raise RuntimeError("the numkong kernel needs numkong: pip install numkong")
        if dtype == "float16":
            q = self.q64.astype(np.float16)
            self.eps = self.error(q, 2.0**-24, 2.0**-24)  # float32 accumulation and output
        elif dtype == "float32":
            q = self.q64.astype(np.float32)
            # Measured: float64 accumulation here (Sapphire Rapids); float32 is assumed, for other CPUs.
            self.eps = self.error(q, 2.0**-24, 2.0**-53)
        else:
            raise ValueError(f"the numkong kernel scores float16 or float32 vectors, not {dtype}")
        self.dtype = np.dtype(dtype)
        self.nk = nk
        # One query: row-by-row dot products (`cdist`) run at the float16 read floor, the packed
        # product at ~1.5x it; from two queries on, the packed (GEMM-like) product is faster.
        self.q = q
        self.packed = nk.dots_pack(q) if q.shape[0] > 1 else None

    def scores(self, block: Any) -> np.ndarray:
        block = np.ascontiguousarray(block, dtype=self.dtype)  # a view when it already is
        if self.packed is None:
            out = self.nk.cdist(block, self.q, metric="dot")
        else:
            out = self.nk.dots_packed(block, self.packed)
        out = np.asarray(out)  # shares the tensor's memory
        return out if out.flags.writeable else out.copy()


class _NumPy(_Kernel):
    def prepare(self, dtype: str) -> None:
        self.compute = np.float64 if dtype == "float64" else np.float32
        # BLAS threads its own products (workers on top of it were slower: 139 vs 96 ms for one float32
        # query over 1M rows); the float16 conversion is single-threaded, so there workers pay.
        self.threaded = np.dtype(dtype) != self.compute
        self.q = self.q64.astype(self.compute)
        u = float(np.finfo(self.compute).eps) / 2
        self.eps = self.error(self.q, u, u)

    def scores(self, block: Any) -> np.ndarray:
        # Only this block is converted (numpy 1.26 converts float16 at ~4 ns a value, one core).
        tile = np.asarray(block, dtype=self.compute)
        return tile @ self.q.T


class _MLX(_Kernel):
    threaded = False  # one device; MLX schedules it

    def prepare(self, dtype: str) -> None:
        import mlx.core as mx

        self.mx = mx
        half = dtype == "float16"
        self.mx_dtype = mx.float16 if half else mx.float32
        q = self.q64.astype(np.float16 if half else np.float32)
        # Metal, CUDA and MLX's CPU accumulate float16 products in float32 (checked on the CPU with a
        # 4096-term sum); the float16 output is rounded once. Other dtypes are scored in float32
        # (float64 rows rounded to it: one more float32 rounding).
        self.eps = self.error(q, 2.0**-24, 2.0**-11 if half else 2.0**-22)
        self.q = mx.array(q.astype(np.float32)).astype(self.mx_dtype)

    def scores(self, block: Any) -> np.ndarray:
        mx = self.mx
        b = block if isinstance(block, mx.array) else mx.array(np.ascontiguousarray(block))
        s = mx.matmul(b.astype(self.mx_dtype), self.q.T).astype(mx.float32)
        return np.array(s)

    def rows64(self, block: Any, rows: np.ndarray) -> np.ndarray:
        if isinstance(block, self.mx.array):
            picked = block[self.mx.array(rows.astype(np.int32))].astype(self.mx.float32)
            return np.array(picked, dtype=np.float64)
        return np.asarray(block[rows], dtype=np.float64)


_KERNEL_CLASSES: dict[str, type[_Kernel]] = {"numkong": _NumKong, "numpy": _NumPy, "mlx": _MLX}


# --------------------------------------------------------------------------------------- selection
class _Best:
    """One worker's k best (exact score desc, row asc) per query, and the rescoring it did."""

    def __init__(self, m: int, k: int):
        self.k = k
        self.rows = np.full((m, k), -1, dtype=np.int64)
        self.scores = np.full((m, k), -np.inf, dtype=np.float64)
        self.rescored = 0

    def merge(self, j: int, rows: np.ndarray, scores: np.ndarray) -> None:
        keep = np.isfinite(scores)
        rows = np.concatenate([self.rows[j], rows[keep]])
        scores = np.concatenate([self.scores[j], scores[keep]])
        order = np.lexsort((np.where(rows < 0, np.iinfo(np.int64).max, rows), -scores))[: self.k]
        self.rows[j], self.scores[j] = rows[order], scores[order]

    def combine(self, other: _Best) -> None:
        for j in range(self.rows.shape[0]):
            self.merge(j, other.rows[j], other.scores[j])
        self.rescored += other.rescored


def _allowed(first: int, b: int, mask: np.ndarray | None, exclude: np.ndarray | None) -> np.ndarray | None:
    """The rows of block [first, first+b) that may be returned (None: all)."""
    keep = None if mask is None else np.asarray(mask[first : first + b], dtype=bool).copy()
    if keep is not None and keep.shape != (b,):
        raise ValueError(f"mask has {len(mask)} rows; the vectors have at least {first + b}")
    if exclude is not None:
        lo, hi = np.searchsorted(exclude, [first, first + b])
        if hi > lo:
            keep = np.ones(b, dtype=bool) if keep is None else keep
            keep[exclude[lo:hi] - first] = False
    return keep


def _scan_block(kernel: _Kernel, best: _Best, first: int, block: Any, keep: np.ndarray | None) -> None:
    approx = kernel.scores(block)  # (b, m), scaled queries, ours to modify
    b, m = approx.shape
    if keep is not None:
        approx[~keep] = -np.inf
    picked_rows: list[np.ndarray] = []
    picked_q: list[np.ndarray] = []
    # Until a worker holds k exact scores for a query there is no threshold: take the block's k best
    # kernel scores as a start (marking them so the threshold pass does not take them again).
    for j in np.flatnonzero(np.isneginf(best.scores[:, -1])):
        col = approx[:, j]
        kk = min(best.k, b)
        top = np.argpartition(-col, kk - 1)[:kk] if kk < b else np.arange(b)
        top = top[np.isfinite(col[top])]
        picked_rows.append(top)
        picked_q.append(np.full(top.size, j))
        col[top] = -np.inf
    if picked_rows:
        _rescore(kernel, best, first, block, np.concatenate(picked_rows), np.concatenate(picked_q))
    # Queries still without k rows have used up this block's finite scores (+inf: take nothing more).
    # Compared in the kernel's dtype and scale: the threshold is rounded down, so no row is lost.
    kth = best.scores[:, -1]
    threshold = np.where(np.isfinite(kth), (kth - kernel.eps) / kernel.scale, np.inf)
    threshold = np.nextafter(threshold.astype(approx.dtype), approx.dtype.type(-np.inf))
    hits = np.flatnonzero(approx >= threshold)
    if hits.size:
        _rescore(kernel, best, first, block, hits // m, hits % m)


def _rescore(kernel: _Kernel, best: _Best, first: int, block: Any, r: np.ndarray, j: np.ndarray) -> None:
    """Float64 scores of block rows `r` against queries `j` (pairs), merged into `best`."""
    uniq, inverse = np.unique(r, return_inverse=True)
    vectors = kernel.rows64(block, uniq)
    exact = np.einsum("ij,ij->i", vectors[inverse], kernel.q64[j]) * kernel.scale[j]
    best.rescored += r.size
    for q in np.unique(j):
        sel = j == q
        best.merge(int(q), r[sel].astype(np.int64) + first, exact[sel])


def top_k_blocks(
    blocks: Iterable[tuple[int, Any]],
    queries: np.ndarray,
    k: int = 10,
    *,
    threads: int | None = None,
    mask: np.ndarray | None = None,
    exclude: Sequence[int] | np.ndarray | None = None,
    kernel: str = "auto",
    max_norm: float = 1.0,
    stats: dict[str, Any] | None = None,
) -> TopK:
    """Exact top-k by dot product over `(first_row, rows)` blocks (numpy arrays, memory maps or MLX
    arrays, all of one dtype), for stores bigger than memory: each block is read once, in its dtype.

    `queries`: (dim,) or (m, dim), any float dtype, not normalized here. `mask`: bool per row (global
    row numbers), True where a row may be returned; `exclude`: row numbers never returned. `threads`
    workers take blocks in turn (default: `MLX_CLAP_CPU_THREADS`, 1 when the CPU fast paths are off).
    `kernel`: "auto" (`choose_kernel`) or one of `KERNELS`. `max_norm`: a bound on the rows' norms (the
    store's rows are unit vectors); exactness is guaranteed for rows within it. `stats`, when given,
    receives the kernel name and how many (row, query) pairs were rescored.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1 (got {k})")
    if kernel != "auto" and kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose from {', '.join(KERNELS)}")
    q = np.asarray(queries, dtype=np.float64)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[0] == 0 or not np.all(np.isfinite(q)):
        raise ValueError(f"queries must be a finite (dim,) or (m, dim) array, not shape {np.shape(queries)}")
    it: Iterator[tuple[int, Any]] = iter(blocks)
    head = next(it, None)
    best = _Best(q.shape[0], k)
    if head is None:
        return TopK(best.rows, best.scores)
    dim = head[1].shape[1]
    if q.shape[1] != dim:
        raise ValueError(f"queries have {q.shape[1]} dimensions; the vectors have {dim}")
    dtype = _dtype_name(head[1].dtype)
    if kernel == "auto":
        kernel = choose_kernel(dtype, q.shape[0], on_device=_is_mlx(head[1]))
    name = kernel
    scorer = _KERNEL_CLASSES[name](q, dtype, max_norm)
    excluded = None if exclude is None else np.unique(np.asarray(exclude, dtype=np.int64))
    it = itertools.chain([head], it)
    workers = max(1, default_threads() if threads is None else threads) if scorer.threaded else 1

    def work(local: _Best) -> None:
        while True:
            with lock:
                item = next(it, None)
            if item is None:
                return
            first, block = item
            _scan_block(scorer, local, first, block, _allowed(first, block.shape[0], mask, excluded))

    lock = threading.Lock()
    if workers == 1:
        work(best)
    else:
        _run_workers(work, [_Best(q.shape[0], k) for _ in range(workers)], best)
    if stats is not None:
        stats.update(kernel=name, threads=workers, rescored=best.rescored, eps=scorer.eps.tolist())
    return TopK(best.rows, best.scores)


def _run_workers(work: Callable[[_Best], None], locals_: list[_Best], into: _Best) -> None:
    """Run `work` on one thread per local state, then merge the states."""
    _run_threads(work, locals_)
    for local in locals_:
        into.combine(local)


def _run_threads(work: Callable[[Any], None], locals_: Sequence[Any]) -> None:
    """Run `work(local)` on one thread per local state; the first error is raised here. Plain threads,
    not the MLX worker pool: they run no MLX graphs (NumKong and BLAS release the GIL), so they may exit."""
    errors: list[BaseException] = []

    def run(local: Any) -> None:
        try:
            work(local)
        except BaseException as exc:  # re-raised on the calling thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,), name="mlx-clap-exact", daemon=True) for s in locals_]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


# ------------------------------------------------------------------------------------ every score
CONVERT_ROWS = 8192  # float16 -> float32 conversion chunk of the fallback: 16 MiB at 512-d stays in cache
_LOW_SHIFT = 2.0**11  # the low float16 part of a query, lifted by this out of float16's subnormals


class _Scorer:
    """Every row's float32 score against the queries, for blocks of one dtype (see `all_scores`)."""

    def __init__(self, queries: np.ndarray, dtype: str):
        self.m = queries.shape[0]
        self.threaded = True
        nk = _numkong()
        if dtype == "float16" and nk is not None:
            # q = hi + lo / 2^11 with hi, lo float16: their sum holds q to ~2^-22 relative, so the
            # float32-accumulated products give float32-product accuracy without converting a row.
            # A power-of-two scale per query (exact) keeps the parts inside float16's range.
            peak = np.max(np.abs(queries), axis=1)
            self.scale = np.ldexp(1.0, np.frexp(np.where(peak > 0, peak, 1.0))[1]).astype(np.float32)
            scaled = queries / self.scale[:, None].astype(np.float64)
            hi = scaled.astype(np.float16)
            lo = ((scaled - hi.astype(np.float64)) * _LOW_SHIFT).astype(np.float16)
            self.nk = nk
            self.packed = nk.dots_pack(np.concatenate([hi, lo]))
            self.score = self._numkong_split
        elif dtype == "float32":
            # BLAS threads its own product (sgemv for one query, on the OpenBLAS MLX uses).
            self.q = np.ascontiguousarray(queries, dtype=np.float32)
            self.threaded = False
            self.score = self._blas
        else:
            self.q = np.ascontiguousarray(queries.T, dtype=np.float32)
            self.score = self._converted

    def _numkong_split(self, block: Any) -> np.ndarray:
        s = np.asarray(self.nk.dots_packed(np.ascontiguousarray(block), self.packed), dtype=np.float32)
        return (s[:, : self.m] + s[:, self.m :] * np.float32(1 / _LOW_SHIFT)) * self.scale

    def _blas(self, block: Any) -> np.ndarray:
        block = np.asarray(block, dtype=np.float32)
        if self.m == 1:
            from mlx_clap.ops.blas import matvec

            return matvec(np.ascontiguousarray(block), self.q[0])[:, None]
        return block @ self.q.T

    def _converted(self, block: Any) -> np.ndarray:
        # Only a chunk at a time is converted (numpy converts float16 at ~4 ns a value, one core).
        out = np.empty((block.shape[0], self.m), dtype=np.float32)
        for i in range(0, block.shape[0], CONVERT_ROWS):
            out[i : i + CONVERT_ROWS] = np.asarray(block[i : i + CONVERT_ROWS], dtype=np.float32) @ self.q
        return out


def all_scores(
    blocks: Iterable[tuple[int, Any]],
    queries: np.ndarray,
    rows: int,
    *,
    threads: int | None = None,
) -> np.ndarray:
    """(m, rows) float32 dot products of each query with every row, from `(first_row, rows)` blocks that
    cover rows 0 .. `rows`-1 (numpy arrays or memory maps of one dtype), each read once in its dtype.

    float16 rows go through NumKong with the query split in two float16 parts (no row converted); float32
    rows through BLAS; other dtypes, or float16 without NumKong, are converted a chunk at a time. The
    scores are as accurate as a float32 product of the rows and the query (~1e-7 for unit vectors).
    `threads` workers take blocks in turn (default `default_threads()`)."""
    q = np.asarray(queries, dtype=np.float64)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[0] == 0 or not np.all(np.isfinite(q)):
        raise ValueError(f"queries must be a finite (dim,) or (m, dim) array, not shape {np.shape(queries)}")
    out = np.empty((q.shape[0], rows), dtype=np.float32)
    it: Iterator[tuple[int, Any]] = iter(blocks)
    head = next(it, None)
    if head is None:
        if rows:
            raise ValueError(f"the blocks hold no rows; {rows} were expected")
        return out
    if head[1].shape[1] != q.shape[1]:
        raise ValueError(f"queries have {q.shape[1]} dimensions; the vectors have {head[1].shape[1]}")
    scorer = _Scorer(q, _dtype_name(head[1].dtype))
    it = itertools.chain([head], it)
    lock = threading.Lock()
    done = [0]

    def work(_: None) -> None:
        while True:
            with lock:
                item = next(it, None)
            if item is None:
                return
            first, block = item
            b = block.shape[0]
            if first < 0 or first + b > rows:
                raise ValueError(f"a block covers rows {first}..{first + b - 1}; there are {rows}")
            out[:, first : first + b] = scorer.score(block).T
            with lock:
                done[0] += b

    workers = max(1, default_threads() if threads is None else threads) if scorer.threaded else 1
    if workers == 1:
        work(None)
    else:
        _run_threads(work, [None] * workers)
    if done[0] != rows:
        raise ValueError(f"the blocks hold {done[0]} rows; {rows} were expected")
    return out


def row_blocks(matrix: Any, block_rows: int = DEFAULT_BLOCK_ROWS) -> Iterator[tuple[int, Any]]:
    """(first_row, view) blocks of `block_rows` rows of a 2-D array (numpy, memory map or MLX)."""
    n = matrix.shape[0]
    for start in range(0, n, block_rows):
        yield start, matrix[start : min(n, start + block_rows)]


def top_k(
    matrix: Any,
    queries: np.ndarray,
    k: int = 10,
    *,
    threads: int | None = None,
    mask: np.ndarray | None = None,
    exclude: Sequence[int] | np.ndarray | None = None,
    kernel: str = "auto",
    max_norm: float = 1.0,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    stats: dict[str, Any] | None = None,
) -> TopK:
    """Exact top-k rows of `matrix` (n, dim) by dot product with each query, read in the matrix's own
    dtype (float16 or float32: no per-query conversion of the whole matrix). See `top_k_blocks` for the
    arguments; the result equals a float64 brute force, ties broken by the lower row."""
    if getattr(matrix, "ndim", 2) != 2:
        raise ValueError(f"matrix must be 2-D (n, dim), not shape {tuple(matrix.shape)}")
    if block_rows < 1 or not math.isfinite(block_rows):
        raise ValueError(f"block_rows must be at least 1 (got {block_rows})")
    return top_k_blocks(
        row_blocks(matrix, block_rows),
        queries,
        k,
        threads=threads,
        mask=mask,
        exclude=exclude,
        kernel=kernel,
        max_norm=max_norm,
        stats=stats,
    )


__all__ = [
    "DEFAULT_BLOCK_ROWS",
    "KERNELS",
    "TopK",
    "all_scores",
    "available_kernels",
    "choose_kernel",
    "default_threads",
    "row_blocks",
    "top_k",
    "top_k_blocks",
]
