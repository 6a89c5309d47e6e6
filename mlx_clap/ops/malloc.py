"""glibc allocator tuning for MLX's CPU intermediates (Linux, CPU fast paths only).

Process-wide, so it runs only on an explicit call: `mlx_clap.load()` on a Linux CPU and the `mlx-clap`
command (through `ops.setup.prepare_cpu`), never at import. `MLX_CLAP_MALLOC=off` (or
`MLX_CLAP_CPU_OPTIMIZATIONS=off`) opts out.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1  # malloc.h
_M_MMAP_MAX = -4
_malloc_tuned = False


def tune_malloc(trim_threshold: int = 1 << 30) -> bool:
    """Keep freed memory in glibc's heap so MLX's CPU intermediates stop page-faulting.

    MLX allocates every intermediate of a lazy graph afresh; glibc serves blocks over its mmap threshold
    (128 KB to 32 MB) with mmap and unmaps them on free, so every call faults and zero-fills them again
    (on a batch-8 HTSAT GELU, 37,000 faults and 2/3 of the time). Turning mmap off (M_MMAP_MAX = 0) and
    raising the trim threshold keeps that memory for reuse: the same as MALLOC_MMAP_MAX_=0
    MALLOC_TRIM_THRESHOLD_=<bytes>. It is process-wide and keeps up to `trim_threshold` bytes of freed
    memory, so it runs only on an explicit call (`ops.setup.prepare_cpu`, which `load()` and the CLI make on a
    Linux CPU unless MLX_CLAP_MALLOC=off). Returns whether glibc accepted both settings.
    """
    global _malloc_tuned
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    trim = int(min(trim_threshold, 2**31 - 1))
    ok = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, trim))
    _malloc_tuned = _malloc_tuned or ok
    return ok


def malloc_tuned() -> bool:
    return _malloc_tuned
