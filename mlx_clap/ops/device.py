"""The one answer to "which code path runs?": MLX's default device, and whether the CPU fast paths are on.

Every CPU-only optimization (polynomial kernels, worker threads, clip-by-clip Swin stages, one-clip mel
blocks) asks `cpu_fast_paths()`. On Metal and CUDA it is False, and `MLX_CLAP_CPU_OPTIMIZATIONS=off`
makes it False on the CPU too, so the CPU then runs exactly the code the GPUs run.
"""

from __future__ import annotations

import mlx.core as mx

from mlx_clap import settings as _settings


def on_cpu() -> bool:
    """True when MLX's default device is the CPU."""
    return mx.default_device().type == mx.DeviceType.cpu


def cpu_fast_paths(settings: _settings.Settings | None = None) -> bool:
    """True when the CPU-only code paths run: the default device is the CPU and they are not switched off."""
    s = settings if settings is not None else _settings.current()
    return s.cpu_optimizations and on_cpu()


def cpu_kernels_on(settings: _settings.Settings | None = None) -> bool:
    """True when the polynomial CPU kernels replace MLX's primitives (`ops.kernels`)."""
    s = settings if settings is not None else _settings.current()
    return s.use_cpu_kernels and on_cpu()


__all__ = ["cpu_fast_paths", "cpu_kernels_on", "on_cpu"]
