"""The explicit step that applies the process-wide CPU choices: BLAS rebinding and malloc tuning.

Importing mlx_clap changes nothing in the process. `prepare_cpu()` is called by `mlx_clap.load()` and by
the `mlx-clap` command; it is idempotent and does nothing unless MLX's default device is the CPU and
`MLX_CLAP_CPU_OPTIMIZATIONS` is on (so Metal, CUDA and the switched-off CPU run MLX as it ships).
"""

from __future__ import annotations

from mlx_clap import settings as _settings
from mlx_clap.ops import blas, malloc
from mlx_clap.ops.device import cpu_fast_paths


def prepare_cpu(settings: _settings.Settings | None = None) -> dict[str, object]:
    """Rebind MLX's CBLAS to OpenBLAS (`MLX_CLAP_BLAS`) and tune glibc (`MLX_CLAP_MALLOC`), as set.

    Returns what is in force: {"blas": blas_info(), "malloc_tuned": bool}.
    """
    s = settings if settings is not None else _settings.current()
    if cpu_fast_paths(s):
        blas.setup_blas(s)  # records "off" when MLX_CLAP_BLAS=off
        if s.use_blas and s.blas_threads is not None:
            blas.set_num_threads(s.blas_threads)
        if s.use_malloc_tuning:
            malloc.tune_malloc()
    return {"blas": blas.blas_info(), "malloc_tuned": malloc.malloc_tuned()}


__all__ = ["prepare_cpu"]
