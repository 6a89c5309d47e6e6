"""Run independent MLX CPU blocks on several cores at once.

MLX's CPU backend runs each stream's work on one thread, and its CPU FFT runs on the thread that calls
`mx.eval`, so a batch of clips through the mel frontend uses one core however many there are. Python
threads that each own a CPU stream do run in parallel (`mx.eval` releases the GIL): on the 2-core
benchmark machine the frontend goes from 1.78 to 1.36 ms a clip and the batch-8 audio tower from about
960 to 730 ms (benchmarks/README.md, "Multi-core").

While blocks run in parallel, OpenBLAS is held to one thread: each worker already has a core, and
OpenBLAS threads on top of them oversubscribe the machine (measured slower than one worker).

`MLX_CLAP_CPU_THREADS=N` (`Settings.cpu_threads`) sets the worker count (default: the cores this process
may use, at most 8); `1` turns the parallel path off, and so does `MLX_CLAP_CPU_OPTIMIZATIONS=off`
(`ops.device.cpu_fast_paths`).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, wait
from typing import TypeVar

import mlx.core as mx
import numpy as np

from mlx_clap import settings as _settings
from mlx_clap.ops import blas
from mlx_clap.ops.device import cpu_fast_paths

MAX_DEFAULT_WORKERS = 8

T = TypeVar("T")
R = TypeVar("R")

_pools: dict[int, _DaemonPool] = {}
_pools_lock = threading.Lock()
_local = threading.local()
# Building a graph may trace an `mx.compile`d function; MLX's compile cache is not meant to be filled
# from two threads at once, so graph building is serialized. Evaluation, the costly part, is not.
graph_lock = threading.Lock()


def worker_count() -> int:
    """Threads used for parallel CPU blocks (1 means: run on the calling thread)."""
    s = _settings.current()
    if not s.cpu_optimizations:
        return 1
    if s.cpu_threads is not None:
        return s.cpu_threads
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_DEFAULT_WORKERS))


def worker_stream() -> mx.Stream:
    """This thread's own CPU stream (MLX streams belong to the thread that made them)."""
    stream = getattr(_local, "stream", None)
    if stream is None:
        stream = _local.stream = mx.new_stream(mx.cpu)
    return stream


@contextlib.contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """Hold OpenBLAS to `n` threads inside the block (no-op without an active OpenBLAS)."""
    before = blas.get_num_threads()
    if before is None or before == n:
        yield
        return
    blas.set_num_threads(n)
    try:
        yield
    finally:
        blas.set_num_threads(before)


class _DaemonPool:
    """Worker threads that live as long as the process.

    Not `ThreadPoolExecutor`: its workers exit (and are joined) at interpreter shutdown, and a thread
    that has run an `mx.compile`d function aborts the process when it exits ("terminate called without
    an active exception", MLX 0.32). Daemon workers blocked on an empty queue never exit.
    """

    def __init__(self, workers: int):
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(workers):
            threading.Thread(target=self._work, name=f"mlx-clap-cpu-{i}", daemon=True).start()

    def _work(self) -> None:
        _local.is_worker = True
        while True:
            fn, item, future = self.tasks.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(item))
            except BaseException as exc:  # handed to the caller by Future.result()
                future.set_exception(exc)

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        futures: list[Future] = []
        for item in items:
            future: Future = Future()
            self.tasks.put((fn, item, future))
            futures.append(future)
        wait(futures)  # every block finished (or failed) before the caller goes on
        return [f.result() for f in futures]


def _pool(workers: int) -> _DaemonPool:
    with _pools_lock:
        if workers not in _pools:
            _pools[workers] = _DaemonPool(workers)
        return _pools[workers]


def can_split() -> bool:
    """Whether `map_blocks` would run blocks side by side here: several workers, the CPU fast paths on,
    and not already inside a block (blocks of blocks run in place)."""
    return worker_count() > 1 and cpu_fast_paths() and not getattr(_local, "is_worker", False)


def map_blocks(fn: Callable[[T], mx.array], items: Sequence[T]) -> list[mx.array]:
    """`fn(item)` for every item, each evaluated, in order; on several threads when it pays.

    `fn` builds its graph under `graph_lock` itself if it calls compiled functions; it runs inside
    `mx.stream(worker_stream())` on its thread.
    """
    workers = min(worker_count(), len(items))
    # A block that itself maps blocks runs them in place: waiting on its own pool could deadlock.
    if workers <= 1 or not cpu_fast_paths() or getattr(_local, "is_worker", False):
        out = []
        for item in items:
            result = fn(item)
            mx.eval(result)
            out.append(result)
        return out

    def run(item: T) -> mx.array:
        with mx.stream(worker_stream()):
            result = fn(item)
            mx.eval(result)
        return result

    with blas_threads(1):
        return _pool(workers).map(run, items)


def eval_batched(
    fn: Callable[..., mx.array],
    arrays: Sequence[mx.array | np.ndarray | None],
    rows_per_block: int,
    ready: Sequence = (),
) -> mx.array:
    """`fn(*arrays)`, evaluated; on a multi-core CPU the batch is cut into blocks run side by side.

    `arrays` (MLX or numpy) share their first (batch) axis (None entries pass through); every block gets rows
    a..b of each and `fn`'s row r must depend only on row r of the inputs, so the result equals the
    single call up to BLAS rounding. `ready`: what `fn` reads besides `arrays` (modules, arrays),
    evaluated here first, since workers cannot run graph nodes queued on this thread's stream (lazily
    loaded weights, the caller's slicing). The graph of each block is built under `graph_lock` (`fn`
    may call `mx.compile`d kernels); evaluation runs in parallel.
    """
    arrays = [a if a is None or isinstance(a, mx.array) else mx.array(a) for a in arrays]
    batch = next(a for a in arrays if a is not None).shape[0]
    if batch <= rows_per_block or worker_count() < 2 or not cpu_fast_paths():
        out = fn(*arrays)
        mx.eval(out)
        return out
    mx.eval(*ready, *[a for a in arrays if a is not None])
    spans = [(s, min(batch, s + rows_per_block)) for s in range(0, batch, rows_per_block)]

    def block(span: tuple[int, int]) -> mx.array:
        a, b = span
        with graph_lock:
            return fn(*(None if x is None else x[a:b] for x in arrays))

    return mx.concatenate(map_blocks(block, spans), axis=0)


__all__ = [
    "blas_threads",
    "can_split",
    "eval_batched",
    "graph_lock",
    "map_blocks",
    "worker_count",
    "worker_stream",
]
