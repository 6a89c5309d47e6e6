"""Every `MLX_CLAP_*` environment variable, parsed once into one frozen `Settings` object.

Nothing else in the package reads these variables. `current()` parses the environment on first use and
keeps the result; `configure(**changes)` replaces it (the CLI's `--threads` does, instead of writing into
`os.environ`). Code that needs a setting takes a `Settings` argument or reads `current()` at call time.
`mlx-clap info` prints `current().describe()`.

The one switch that matters for portability is `MLX_CLAP_CPU_OPTIMIZATIONS=off`: it turns off every
CPU-only path (polynomial kernels, worker threads, clip-by-clip Swin stages, BLAS rebinding, malloc
tuning), so the CPU runs exactly the code that Metal and CUDA run (CI tests that path too).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "laion/clap-htsat-unfused"

_ON = ("1", "on", "true", "yes")
_OFF = ("0", "off", "false", "no")


class SettingsError(ValueError):
    """An MLX_CLAP_* variable with a value that means nothing; the message names it."""


@dataclass(frozen=True)
class Settings:
    """The process-wide choices, one field per variable (the variable is named in each comment)."""

    cpu_optimizations: bool = True  # MLX_CLAP_CPU_OPTIMIZATIONS: master switch for every CPU-only path
    cpu_kernels: bool = True  # MLX_CLAP_CPU_KERNELS: polynomial GELU/softmax/attention on the CPU
    cpu_threads: int | None = None  # MLX_CLAP_CPU_THREADS: worker threads (None: every core, at most 8)
    blas: str = "auto"  # MLX_CLAP_BLAS: "auto", "off" or a path to a CBLAS library
    blas_threads: int | None = None  # MLX_CLAP_BLAS_THREADS: OpenBLAS thread cap
    malloc: str = "tune"  # MLX_CLAP_MALLOC: "tune" (keep freed memory in glibc's heap) or "off"
    verbose: bool = False  # MLX_CLAP_VERBOSE: print the BLAS choice to stderr
    cache_dir: Path = Path.home() / ".cache" / "mlx-clap"  # MLX_CLAP_CACHE: converted-model cache
    model: str = DEFAULT_MODEL  # MLX_CLAP_MODEL: the default model of every command and of load()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Parse the variables of `env` (default `os.environ`); a bad value is a SettingsError."""
        env = os.environ if env is None else env

        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        def flag(name: str, default: bool) -> bool:
            value = get(name)
            if value is None:
                return default
            if value.lower() in _ON:
                return True
            if value.lower() in _OFF:
                return False
            raise SettingsError(f"{name} must be on or off, not {value!r}")

        def count(name: str) -> int | None:
            value = get(name)
            if value is None:
                return None
            try:
                n = int(value)
            except ValueError:
                raise SettingsError(f"{name} must be an integer, not {value!r}") from None
            if n < 1:
                raise SettingsError(f"{name} must be at least 1, not {n}")
            return n

        malloc = (get("MLX_CLAP_MALLOC") or "tune").lower()
        if malloc not in ("tune", "off"):
            raise SettingsError(f"MLX_CLAP_MALLOC must be tune or off, not {malloc!r}")
        blas = get("MLX_CLAP_BLAS") or "auto"
        cache = get("MLX_CLAP_CACHE")
        return cls(
            cpu_optimizations=flag("MLX_CLAP_CPU_OPTIMIZATIONS", True),
            cpu_kernels=flag("MLX_CLAP_CPU_KERNELS", True),
            cpu_threads=count("MLX_CLAP_CPU_THREADS"),
            blas=blas if blas.lower() not in ("auto", "off") else blas.lower(),
            blas_threads=count("MLX_CLAP_BLAS_THREADS"),
            malloc=malloc,
            verbose=flag("MLX_CLAP_VERBOSE", False),
            cache_dir=Path(cache).expanduser() if cache else cls.cache_dir,
            model=get("MLX_CLAP_MODEL") or DEFAULT_MODEL,
        )

    # What each CPU-only path sees: the master switch wins over the individual ones.
    @property
    def use_cpu_kernels(self) -> bool:
        return self.cpu_optimizations and self.cpu_kernels

    @property
    def use_blas(self) -> bool:
        return self.cpu_optimizations and self.blas != "off"

    @property
    def use_malloc_tuning(self) -> bool:
        return self.cpu_optimizations and self.malloc == "tune"

    def describe(self) -> dict[str, object]:
        """Field -> value, for `mlx-clap info` and the benchmarks' records."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["cache_dir"] = str(self.cache_dir)
        return out


_lock = threading.Lock()
_current: Settings | None = None


def current() -> Settings:
    """The settings in force: parsed from the environment on first use, then kept."""
    global _current
    with _lock:
        if _current is None:
            _current = Settings.from_env()
        return _current


def configure(**changes: object) -> Settings:
    """Replace some fields of the settings in force (e.g. `configure(cpu_threads=1)`); returns the new
    ones."""
    global _current
    with _lock:
        base = _current if _current is not None else Settings.from_env()
        _current = dataclasses.replace(base, **changes)
        return _current


def reset() -> None:
    """Forget the parsed settings; the next `current()` reads the environment again (for tests)."""
    global _current
    with _lock:
        _current = None


__all__ = ["DEFAULT_MODEL", "Settings", "SettingsError", "configure", "current", "reset"]
