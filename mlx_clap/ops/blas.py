"""Fast matrix products for MLX's Linux CPU backend.

The `mlx-cpu` wheel links the netlib *reference* BLAS it bundles (`mlx_cpu.libs/libblas-*.so`): a 2048 x 2048
float32 matmul runs at a few GFLOP/s there, 20-40x below OpenBLAS on the same cores. `libmlx.so` imports
only `cblas_sgemm`, `cblas_dgemm` and `cblas_cgemm` from it, through its PLT, as unversioned symbols.

`setup_blas()` points those three import slots (`.got.plt` entries of `libmlx.so`) at an optimized BLAS with
the same CBLAS ABI (LP64, 32-bit ints). This is what the dynamic linker would do for an `LD_PRELOAD`ed
library, done by name so that it also works for libraries whose symbols carry a prefix, and after
`mlx.core` is imported. A library is looked for in this order:

1. `MLX_CLAP_BLAS=/path/to/libopenblas.so` (any CBLAS library; a `scipy_` prefix is detected);
2. the `scipy-openblas32` wheel (an mlx-clap dependency on Linux; its symbols are `scipy_cblas_*`);
3. a system OpenBLAS (`libopenblas.so.0`, e.g. Debian/Ubuntu `libopenblas0-pthread`).

After rebinding, a small matmul is checked against numpy in float64; on a mismatch the original pointers are
restored and a warning is logged. `MLX_CLAP_BLAS=off` keeps MLX's own BLAS. OpenBLAS uses one thread per
core; `MLX_CLAP_BLAS_THREADS=N` (or `OPENBLAS_NUM_THREADS`) caps it, which helps on oversubscribed machines
where its spinning threads compete with other processes. On macOS (Accelerate) and
where `libmlx.so` imports no CBLAS symbols (e.g. builds that link BLAS statically) nothing is done.
The choice is logged at INFO on the `mlx_clap.ops.blas` logger, and printed to stderr when
`MLX_CLAP_VERBOSE=1`. `blas_info()` returns it as a dict (the benchmarks record it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import os
import struct
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlx_clap import settings as _settings
from mlx_clap.settings import Settings

logger = logging.getLogger(__name__)

ENV_VAR = "MLX_CLAP_BLAS"
REBOUND_SYMBOLS = ("cblas_sgemm", "cblas_dgemm", "cblas_cgemm")

# ELF constants (elf.h).
_SHT_RELA = 4
_SHT_DYNSYM = 11
_PT_GNU_RELRO = 0x6474E552
_EM_X86_64 = 62
_EM_AARCH64 = 183
# Relocations that fill a GOT slot with a symbol's address: (JUMP_SLOT, GLOB_DAT) per machine.
_GOT_RELOCS = {_EM_X86_64: (7, 6), _EM_AARCH64: (1026, 1025)}
_RTLD_NOLOAD = 4
_RTLD_DI_LINKMAP = 2


@dataclass
class BlasInfo:
    """What `setup_blas` did: `status` is one of active, off, skipped, failed."""

    status: str = "skipped"
    library: str | None = None
    source: str | None = None
    config: str | None = None
    symbols: list[str] = field(default_factory=list)
    reason: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


_info: BlasInfo | None = None
_keepalive: list[ctypes.CDLL] = []
_original: dict[int, int] = {}


def blas_info() -> dict:
    """What `setup_blas()` did, without doing it: status "not set up" until something called it."""
    if _info is None:
        return BlasInfo(status="not set up", reason="setup_blas() has not run in this process").as_dict()
    return _info.as_dict()


def setup_blas(settings: Settings | None = None) -> BlasInfo:
    """Point MLX's CPU matmuls at an optimized BLAS when one is available (idempotent; see module doc).

    Called by `mlx_clap.load()` and the CLI (through `ops.setup.prepare_cpu`), never at import.
    """
    global _info
    if _info is not None:
        return _info
    s = settings if settings is not None else _settings.current()
    try:
        _info = _setup(s)
    except Exception as exc:  # never let an optimization break loading a model
        _info = BlasInfo(status="failed", reason=f"{type(exc).__name__}: {exc}")
    _report(_info, s)
    return _info


def _report(info: BlasInfo, settings: Settings) -> None:
    if info.status == "active":
        line = (
            f"mlx_clap: MLX CPU matmuls use {info.config or info.library} ({info.source}: {info.library}); "
            f"set {ENV_VAR}=off to keep MLX's bundled BLAS"
        )
    else:
        line = f"mlx_clap: MLX's own BLAS is used ({info.status}: {info.reason})"
    level = logging.WARNING if info.status == "failed" else logging.INFO
    logger.log(level, line)
    if settings.verbose:
        print(line, file=sys.stderr)


def _setup(settings: Settings) -> BlasInfo:
    choice = settings.blas
    if not settings.cpu_optimizations:
        return BlasInfo(status="off", reason="MLX_CLAP_CPU_OPTIMIZATIONS=off")
    if choice == "off":
        return BlasInfo(status="off", reason=f"{ENV_VAR}=off")
    if not sys.platform.startswith("linux"):
        return BlasInfo(status="skipped", reason=f"not needed on {sys.platform}")
    import mlx.core as mx  # noqa: F401  (libmlx.so must be loaded before its slots can be rebound)

    libmlx = _find_libmlx()
    if libmlx is None:
        return BlasInfo(status="skipped", reason="libmlx.so not found next to mlx.core")
    slots = _got_slots(libmlx, REBOUND_SYMBOLS)
    if not slots:
        return BlasInfo(status="skipped", reason=f"{libmlx.name} imports no CBLAS gemm symbols")
    candidates = _candidates(choice)
    if not candidates:
        return BlasInfo(status="skipped", reason="no optimized BLAS found (pip install scipy-openblas32)")
    failures = []
    for path, source in candidates:
        try:
            info = _rebind(libmlx, slots, path, source, settings)
        except OSError as exc:
            failures.append(f"{path}: {exc}")
            continue
        if info is not None:
            return info
        failures.append(f"{path}: wrong matmul results")
    return BlasInfo(status="failed", reason="; ".join(failures))


def _find_libmlx() -> Path | None:
    import mlx.core as mx

    core = Path(mx.__file__).resolve()
    for candidate in [core.parent / "lib" / "libmlx.so", *sorted(core.parent.glob("lib/libmlx*.so*"))]:
        if candidate.is_file():
            return candidate
    return None


def _candidates(choice: str) -> list[tuple[Path, str]]:
    if choice.lower() not in ("", "auto", "on", "1", "yes", "true"):
        path = Path(choice).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{ENV_VAR}={choice}: no such file")
        return [(path, ENV_VAR)]
    found: list[tuple[Path, str]] = []
    try:
        import importlib.util

        spec = importlib.util.find_spec("scipy_openblas32")
        if spec is not None and spec.origin:
            libdir = Path(spec.origin).parent / "lib"
            found += [(p, "scipy-openblas32") for p in sorted(libdir.glob("libscipy_openblas*.so*"))]
    except (ImportError, ValueError):
        pass
    system = ctypes.util.find_library("openblas")
    if system:
        found.append((Path(system), "system OpenBLAS"))
    for folder in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib"):
        path = Path(folder) / "libopenblas.so.0"
        if path.exists() and all(path.resolve() != p.resolve() for p, _ in found):
            found.append((path, "system OpenBLAS"))
    return found


def _rebind(
    libmlx: Path, slots: dict[str, int], path: Path, source: str, settings: Settings
) -> BlasInfo | None:
    """Point libmlx's GOT slots at `path`'s gemms; verify; restore and return None when results are wrong."""
    lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_LOCAL)
    prefix = next((p for p in ("", "scipy_") if hasattr(lib, f"{p}cblas_sgemm")), None)
    if prefix is None:
        raise OSError("exports no cblas_sgemm")
    bias = _load_bias(libmlx)
    relro = _relro_range(libmlx)
    rebound = []
    for name, offset in slots.items():
        target = getattr(lib, prefix + name, None)
        if target is None:
            continue
        address = bias + offset
        _original.setdefault(address, ctypes.c_void_p.from_address(address).value or 0)
        _write_pointer(address, ctypes.cast(target, ctypes.c_void_p).value or 0, relro, bias)
        rebound.append(name)
    _keepalive.append(lib)
    _set_threads(lib, prefix, settings)
    if not _matmul_ok():
        for address, value in _original.items():
            _write_pointer(address, value, relro, bias)
        return None
    return BlasInfo(
        status="active",
        library=str(path),
        source=source,
        config=_openblas_config(lib, prefix),
        symbols=[prefix + s for s in rebound],
    )


def _active(symbol: str) -> Any:
    """The function `symbol` (e.g. "cblas_sgemv") of the OpenBLAS MLX's matmuls use, prefix included;
    None when no OpenBLAS is active."""
    info = _info
    if info is None or info.status != "active" or not _keepalive:
        return None
    prefix = "scipy_" if any(s.startswith("scipy_") for s in info.symbols) else ""
    return getattr(_keepalive[-1], prefix + symbol, None)


def set_num_threads(n: int) -> bool:
    """Set the selected OpenBLAS's thread count at run time; False when no OpenBLAS is active."""
    fn = _active("openblas_set_num_threads")
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int]
    fn(max(1, int(n)))
    return True


def get_num_threads() -> int | None:
    """The selected OpenBLAS's current thread count, or None when no OpenBLAS is active."""
    fn = _active("openblas_get_num_threads")
    if fn is None:
        return None
    fn.restype = ctypes.c_int
    return int(fn())


_CBLAS_ROW_MAJOR, _CBLAS_NO_TRANS = 101, 111


def matvec(matrix: Any, vector: Any) -> Any:
    """`matrix @ vector` for a float32 (N, D) matrix and (D,) vector, on the OpenBLAS MLX uses.

    numpy links an OpenBLAS of its own. After an MLX model call, the other library's threads still
    spin for a while on the same cores, and a numpy product right after runs ~1.7x slower (a 100k x
    512 search: 14 -> 23 ms on 2 cores, benchmarks/serve_latency.py). Calling `sgemv` of the library
    MLX uses keeps one thread pool. Anything else (no active OpenBLAS, other dtypes or layouts) is
    numpy's product.
    """
    import numpy as np

    gemv = _active("cblas_sgemv")
    ok = (
        gemv is not None
        and isinstance(matrix, np.ndarray)
        and isinstance(vector, np.ndarray)
        and matrix.ndim == 2
        and vector.shape == (matrix.shape[1],)
        and matrix.dtype == vector.dtype == np.float32
        and matrix.flags.c_contiguous
        and vector.flags.c_contiguous
        and 0 < matrix.shape[0] < 2**31
        and 0 < matrix.shape[1] < 2**31
    )
    if not ok:
        return matrix @ vector
    rows, cols = matrix.shape
    out = np.empty(rows, dtype=np.float32)
    f32p = ctypes.POINTER(ctypes.c_float)
    gemv.restype = None
    gemv.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float, f32p,
                     ctypes.c_int, f32p, ctypes.c_int, ctypes.c_float, f32p, ctypes.c_int]  # fmt: skip
    gemv(_CBLAS_ROW_MAJOR, _CBLAS_NO_TRANS, rows, cols, 1.0, matrix.ctypes.data_as(f32p), cols,
         vector.ctypes.data_as(f32p), 1, 0.0, out.ctypes.data_as(f32p), 1)  # fmt: skip
    return out


def _set_threads(lib: ctypes.CDLL, prefix: str, settings: Settings) -> None:
    """Apply MLX_CLAP_BLAS_THREADS (OpenBLAS itself reads OPENBLAS_NUM_THREADS at load)."""
    value = settings.blas_threads
    fn = getattr(lib, f"{prefix}openblas_set_num_threads", None)
    if value is not None and fn is not None:
        fn.argtypes = [ctypes.c_int]
        fn(value)


def _openblas_config(lib: ctypes.CDLL, prefix: str) -> str | None:
    fn = getattr(lib, f"{prefix}openblas_get_config", None)
    if fn is None:
        return None
    fn.restype = ctypes.c_char_p
    text = fn().decode("utf-8", "replace").strip()
    threads = getattr(lib, f"{prefix}openblas_get_num_threads", None)
    if threads is not None:
        threads.restype = ctypes.c_int
        n = threads()
        text += f", {n} thread{'s' if n != 1 else ''}"
    return text


def _matmul_ok() -> bool:
    """A float32 and a float64 product (with a transposed operand) against numpy's float64."""
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((67, 45))
    b = rng.standard_normal((33, 45))
    want = a @ b.T
    with mx.stream(mx.cpu):
        got32 = np.array(mx.matmul(mx.array(a, dtype=mx.float32), mx.array(b, dtype=mx.float32).T))
        got64 = np.array(mx.matmul(mx.array(a, dtype=mx.float64), mx.array(b, dtype=mx.float64).T))
    scale = np.abs(want).max()
    return bool(np.abs(got32 - want).max() <= 1e-4 * scale and np.abs(got64 - want).max() <= 1e-10 * scale)


# ---------------------------------------------------------------------------------------------- ELF / ld.so
def _got_slots(path: Path, names: tuple[str, ...]) -> dict[str, int]:
    """{symbol: GOT slot offset (a vaddr)} for the JUMP_SLOT/GLOB_DAT relocations of `names` in `path`."""
    with open(path, "rb") as fh:  # mapped, not read: the CUDA build of libmlx.so is 145 MB
        data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return {}  # only 64-bit little-endian ELF
    machine = struct.unpack_from("<H", data, 18)[0]
    kinds = _GOT_RELOCS.get(machine)
    if kinds is None:
        return {}
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    wanted = set(names)
    slots: dict[str, int] = {}
    for sh in sections:
        sh_type, sh_offset, sh_size, sh_link, sh_entsize = sh[1], sh[4], sh[5], sh[6], sh[9]
        if sh_type != _SHT_RELA or sh_link >= len(sections) or sections[sh_link][1] != _SHT_DYNSYM:
            continue
        symtab = sections[sh_link]
        strtab = sections[symtab[6]]
        for off in range(sh_offset, sh_offset + sh_size, sh_entsize or 24):
            r_offset, r_info = struct.unpack_from("<QQ", data, off)
            if (r_info & 0xFFFFFFFF) not in kinds:
                continue
            st_name = struct.unpack_from("<I", data, symtab[4] + (r_info >> 32) * 24)[0]
            start = strtab[4] + st_name
            name = data[start : data.find(b"\0", start)].decode("ascii", "replace")
            if name in wanted:
                slots[name] = r_offset
    return slots


def _relro_range(path: Path) -> tuple[int, int] | None:
    with open(path, "rb") as fh:
        data = fh.read(65536)
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, _, _, p_vaddr, _, _, p_memsz, _ = struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize)
        if p_type == _PT_GNU_RELRO:
            return p_vaddr, p_vaddr + p_memsz
    return None


def _load_bias(path: Path) -> int:
    """l_addr of the already loaded `path`, from its link_map (dlopen with RTLD_NOLOAD, then dlinfo)."""
    handle = ctypes.CDLL(str(path), mode=_RTLD_NOLOAD | os.RTLD_LAZY)._handle
    if not handle:
        raise OSError(f"{path} is not loaded")
    for libname in (None, ctypes.util.find_library("dl")):
        dlinfo = getattr(ctypes.CDLL(libname), "dlinfo", None)
        if dlinfo is None:
            continue
        link_map = ctypes.c_void_p()
        dlinfo.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        if dlinfo(handle, _RTLD_DI_LINKMAP, ctypes.byref(link_map)) != 0:
            raise OSError("dlinfo(RTLD_DI_LINKMAP) failed")
        return ctypes.c_size_t.from_address(link_map.value).value  # struct link_map starts with l_addr
    raise OSError("dlinfo not available")


def _write_pointer(address: int, value: int, relro: tuple[int, int] | None, bias: int) -> None:
    """Store a pointer; a slot under RELRO (read-only after relocation) is unprotected around the store."""
    in_relro = relro is not None and relro[0] + bias <= address < relro[1] + bias
    if in_relro:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        page = os.sysconf("SC_PAGE_SIZE")
        start = address & ~(page - 1)
        if libc.mprotect(start, page, 0x1 | 0x2) != 0:  # PROT_READ | PROT_WRITE
            raise OSError(ctypes.get_errno(), "mprotect failed")
        ctypes.c_void_p.from_address(address).value = value
        libc.mprotect(start, page, 0x1)
    else:
        ctypes.c_void_p.from_address(address).value = value
