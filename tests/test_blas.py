"""The optimized BLAS that `mlx_clap.ops.blas` routes MLX's CPU matmuls to, and the process-wide CPU setup.

Importing mlx_clap changes nothing in the process; `mlx_clap.ops.setup.prepare_cpu()` (which `load()` and
the CLI call) rebinds libmlx's CBLAS import slots and tunes glibc's malloc, each with its opt-out. BLAS setup
happens once per process, so every test of an environment-dependent choice runs a fresh interpreter
(`_probe`) with exactly the MLX_CLAP_* variables it names; the probe reads libmlx's GOT slots itself and asks
glibc whether a big block is still served by mmap, so the checks do not rest on the module's own flags.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_clap import settings
from mlx_clap.ops import blas
from mlx_clap.ops.device import on_cpu

LINUX = sys.platform.startswith("linux")
HAS_WHEEL = importlib.util.find_spec("scipy_openblas32") is not None
GOLDEN = Path(__file__).resolve().parent / "golden" / "tiny-unfused"
REPO = Path(__file__).resolve().parents[1]
_LIBMLX = blas._find_libmlx() if LINUX else None
# The slots the rebinding writes: all three gemms on the mlx-cpu wheel (a build that links BLAS statically
# has none, and then there is nothing to rebind or to check).
REBINDABLE = _LIBMLX is not None and set(blas._got_slots(_LIBMLX, blas.REBOUND_SYMBOLS)) == set(
    blas.REBOUND_SYMBOLS
)


needs_linux = pytest.mark.skipif(
    not REBINDABLE,
    reason=f"the BLAS rebinding and glibc malloc tuning run on Linux, where libmlx.so imports "
    f"{', '.join(blas.REBOUND_SYMBOLS)} (here: {sys.platform}, {_LIBMLX})",
)
needs_wheel = pytest.mark.skipif(
    not (REBINDABLE and HAS_WHEEL),
    reason="needs Linux (libmlx.so importing the CBLAS gemms) and the scipy-openblas32 wheel "
    "(pip install scipy-openblas32)",
)

# Run in a fresh interpreter: record libmlx's CBLAS GOT slots and glibc's behaviour after `import mlx.core`
# (plus the helpers), after importing every mlx_clap entry point, and after the action named in argv[1]
# ("import": nothing more, "prepare": prepare_cpu(), "setup_blas": setup_blas(), "load": mlx_clap.load()).
PROBE = r"""
import ctypes, json, os, sys
import mlx.core as mx, numpy as np
mx.set_default_device(mx.cpu)
from mlx_clap.ops import blas

lib = blas._find_libmlx()
offsets = blas._got_slots(lib, blas.REBOUND_SYMBOLS)
bias = blas._load_bias(lib)
libc = ctypes.CDLL(None)

def slots():
    return {name: ctypes.c_void_p.from_address(bias + off).value or 0 for name, off in offsets.items()}

class DlInfo(ctypes.Structure):
    _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p), ("sname", ctypes.c_char_p),
                ("saddr", ctypes.c_void_p)]

libc.dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(DlInfo)]

def owners(values):
    # The shared object each slot points into (libmlx's own PLT stub before the first call, MLX's
    # bundled libblas after it, the OpenBLAS library once rebound).
    out = {}
    for name, value in values.items():
        info = DlInfo()
        ok = value and libc.dladdr(ctypes.c_void_p(value), ctypes.byref(info)) and info.fname
        out[name] = os.path.realpath(info.fname.decode()) if ok else None
    return out

FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in FIELDS.split()]

libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def big_block_is_mmapped():
    # Untuned glibc serves a 64 MB malloc with its own mmap (hblks + 1); with M_MMAP_MAX = 0 the heap does.
    before = libc.mallinfo2().hblks
    p = libc.malloc(64 << 20)
    during = libc.mallinfo2().hblks
    libc.free(p)
    return during > before

from mlx_clap.ops import malloc
report = {"slots_start": slots(), "owners_start": owners(slots()),
          "threads_before_setup": blas.get_num_threads(), "set_threads_before_setup": blas.set_num_threads(2)}

import mlx_clap, mlx_clap.cli, mlx_clap.loading, mlx_clap.pipeline
import mlx_clap.ops.kernels, mlx_clap.ops.parallel, mlx_clap.ops.setup
report.update(slots_imported=slots(), info_imported=blas.blas_info(), tuned_imported=malloc.malloc_tuned(),
              mmapped_imported=big_block_is_mmapped())

action = sys.argv[1]
if action == "prepare":
    report["prepared"] = mlx_clap.ops.setup.prepare_cpu()
elif action == "setup_blas":
    blas.setup_blas()
elif action == "load":
    mlx_clap.load(sys.argv[2])
else:
    assert action == "import", action
after = slots()
report.update(slots_after=after, owners_after=owners(after), info=blas.blas_info(),
              tuned=malloc.malloc_tuned(), mmapped=big_block_is_mmapped(), threads=blas.get_num_threads())

a = np.random.default_rng(1).standard_normal((300, 200)).astype(np.float32)
got = np.array(mx.array(a) @ mx.array(a).T)
report["err"] = float(np.abs(got - a.astype(np.float64) @ a.T.astype(np.float64)).max())
m, v = a[:, :64].copy(), a[0, :64].copy()
report["matvec_gemv"] = blas._active("cblas_sgemv") is not None
report["matvec_err"] = float(np.abs(blas.matvec(m, v) - m.astype(np.float64) @ v.astype(np.float64)).max())
print(json.dumps(report))
"""


def _child_env(**variables: str) -> dict[str, str]:
    """This environment without any MLX_CLAP_*, OpenBLAS or glibc malloc variable, plus `variables`."""
    drop = ("MLX_CLAP_", "OPENBLAS_", "MALLOC_", "GLIBC_TUNABLES")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(variables)
    return env


def _probe(action: str = "prepare", *args: str, **variables: str) -> dict:
    cmd = [sys.executable, "-c", PROBE, action, *args]
    out = subprocess.run(
        cmd, cwd=REPO, env=_child_env(**variables), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    # Whatever the action, importing mlx_clap's entry points must have changed nothing.
    assert report["slots_imported"] == report["slots_start"], report
    assert report["info_imported"]["status"] == "not set up", report["info_imported"]
    assert report["tuned_imported"] is False
    assert report["mmapped_imported"] is True, "glibc malloc was tuned by an import"
    assert set(report["slots_start"]) == set(blas.REBOUND_SYMBOLS), report["slots_start"]
    return report


def _openblas_in(owner_paths: dict) -> list[str]:
    return [name for name, path in owner_paths.items() if path and "openblas" in Path(path).name]


def _assert_untouched(report: dict) -> None:
    """MLX's BLAS as it ships: the slots as before any setup, none of them pointing into an OpenBLAS."""
    assert report["slots_after"] == report["slots_start"], report
    assert not _openblas_in(report["owners_after"]), report["owners_after"]
    assert report["err"] < 1e-3


# ------------------------------------------------------------------------------------------- import / setup
@needs_linux
def test_import_touches_neither_blas_nor_malloc():
    r = _probe("import")  # _probe checks the slots, blas_info and malloc after the imports
    _assert_untouched(r)
    assert r["info"]["status"] == "not set up"
    assert "has not run" in r["info"]["reason"]
    assert r["tuned"] is False and r["mmapped"] is True
    # Before setup there is no OpenBLAS to ask or to change.
    assert r["threads_before_setup"] is None and r["set_threads_before_setup"] is False
    assert r["threads"] is None


@needs_linux
def test_malloc_variable_alone_no_longer_tunes_at_import():
    r = _probe("import", MLX_CLAP_MALLOC="tune")
    assert r["tuned"] is False and r["mmapped"] is True


@needs_wheel
def test_prepare_cpu_rebinds_blas_and_tunes_malloc():
    r = _probe("prepare")
    info = r["info"]
    assert info["status"] == "active", info
    assert info["source"] == "scipy-openblas32", info
    assert info["symbols"] == ["scipy_" + s for s in blas.REBOUND_SYMBOLS], info
    assert r["prepared"] == {"blas": info, "malloc_tuned": True}
    # Every slot now points into the library blas_info names, and nowhere it pointed before.
    library = os.path.realpath(info["library"])
    assert r["owners_after"] == {name: library for name in blas.REBOUND_SYMBOLS}, r["owners_after"]
    assert all(r["slots_after"][n] != r["slots_start"][n] for n in blas.REBOUND_SYMBOLS)
    assert r["tuned"] is True
    assert r["mmapped"] is False, "glibc still serves a 64 MB block with mmap after tune_malloc"
    assert isinstance(r["threads"], int) and r["threads"] >= 1
    assert r["err"] < 1e-3
    # matvec runs on the same library (one thread pool), with float32 accuracy.
    assert r["matvec_gemv"] is True
    assert r["matvec_err"] < 1e-4


@needs_wheel
def test_load_and_the_cli_prepare_the_cpu():
    r = _probe("load", str(GOLDEN))
    assert r["info"]["status"] == "active", r["info"]
    assert _openblas_in(r["owners_after"]) == list(blas.REBOUND_SYMBOLS)
    assert r["tuned"] is True and r["mmapped"] is False
    cmd = [sys.executable, "-m", "mlx_clap.cli", "info", "--json", "--model", str(GOLDEN)]
    out = subprocess.run(cmd, cwd=REPO, env=_child_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    cpu = json.loads(out.stdout)["cpu"]
    assert cpu["fast_paths"] is True, cpu
    assert "OpenBLAS" in str(cpu["blas"]), cpu
    assert cpu["malloc_tuned"] is True, cpu


@needs_linux
def test_cpu_optimizations_off_leaves_the_process_as_mlx_ships():
    r = _probe("prepare", MLX_CLAP_CPU_OPTIMIZATIONS="off")
    _assert_untouched(r)
    assert r["info"]["status"] == "not set up", r["info"]
    assert r["prepared"] == {"blas": r["info"], "malloc_tuned": False}
    assert r["tuned"] is False and r["mmapped"] is True
    assert r["threads"] is None
    assert r["matvec_gemv"] is False and r["matvec_err"] < 1e-4  # numpy's product
    # Called directly, setup_blas records the switch instead of rebinding.
    direct = _probe("setup_blas", MLX_CLAP_CPU_OPTIMIZATIONS="off")
    _assert_untouched(direct)
    assert direct["info"]["status"] == "off", direct["info"]
    assert "MLX_CLAP_CPU_OPTIMIZATIONS" in direct["info"]["reason"]
    assert direct["tuned"] is False


@needs_linux
def test_opt_out_keeps_mlx_blas():
    off = _probe("prepare", MLX_CLAP_BLAS="off")
    _assert_untouched(off)
    assert off["info"]["status"] != "active", off["info"]
    assert off["threads"] is None
    # The BLAS switch does not turn off the (independent) malloc tuning.
    assert off["tuned"] is True and off["mmapped"] is False
    direct = _probe("setup_blas", MLX_CLAP_BLAS="off")
    _assert_untouched(direct)
    assert direct["info"]["status"] == "off", direct["info"]
    assert "MLX_CLAP_BLAS=off" in direct["info"]["reason"]


@needs_linux
def test_prepare_cpu_records_the_blas_opt_out():
    off = _probe("prepare", MLX_CLAP_BLAS="off")
    assert off["info"]["status"] == "off", off["info"]
    assert "MLX_CLAP_BLAS=off" in off["info"]["reason"]


@needs_linux
def test_malloc_opt_out():
    r = _probe("prepare", MLX_CLAP_MALLOC="off")
    assert r["tuned"] is False and r["mmapped"] is True
    assert r["prepared"]["malloc_tuned"] is False
    if HAS_WHEEL:  # the malloc switch leaves the BLAS choice alone
        assert r["info"]["status"] == "active", r["info"]


@needs_wheel
def test_thread_cap():
    capped = _probe("prepare", MLX_CLAP_BLAS_THREADS="1")
    assert capped["info"]["status"] == "active", capped["info"]
    assert capped["info"]["config"].endswith(", 1 thread"), capped["info"]
    assert capped["threads"] == 1
    assert capped["err"] < 1e-3


@needs_linux
def test_bad_path_fails_softly():
    bad = _probe("prepare", MLX_CLAP_BLAS="/nonexistent/libopenblas.so")
    _assert_untouched(bad)
    assert bad["info"]["status"] == "failed", bad["info"]
    assert "no such file" in bad["info"]["reason"]


# ------------------------------------------------------------------------------------------- in this process
@pytest.fixture(scope="module")
def prepared() -> dict:
    """prepare_cpu() in this process (what load() does; idempotent) and what it left in force."""
    from mlx_clap.ops.setup import prepare_cpu

    return prepare_cpu()["blas"]


def _expect_active() -> bool:
    s = settings.current()
    return REBINDABLE and HAS_WHEEL and on_cpu() and s.use_blas and s.blas == "auto"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(1, 7, 5, 3), (3, 129, 65, 257), (2, 512, 384, 96)])
def test_matmul_matches_numpy(dtype: str, shape: tuple[int, int, int, int], prepared: dict):
    if _expect_active():
        assert prepared["status"] == "active", prepared
    batch, m, k, n = shape
    rng = np.random.default_rng(sum(shape))
    a = rng.standard_normal((batch, m, k))
    b = rng.standard_normal((batch, n, k))
    want = a @ b.transpose(0, 2, 1)
    with mx.stream(mx.cpu):
        ma, mb = mx.array(a, dtype=getattr(mx, dtype)), mx.array(b, dtype=getattr(mx, dtype))
        plain = np.array(ma @ mb.transpose(0, 2, 1))
        # A transposed view as the left operand (k-major storage) exercises the other CBLAS transpose flag.
        at = mx.array(np.ascontiguousarray(a.transpose(0, 2, 1)), dtype=getattr(mx, dtype))
        trans = np.array(mx.swapaxes(at, 1, 2) @ mb.transpose(0, 2, 1))
    tol = (2e-5 if dtype == "float32" else 1e-12) * np.sqrt(k) * np.abs(want).max()
    assert np.abs(plain - want).max() <= tol
    assert np.abs(trans - want).max() <= tol


def test_set_num_threads_round_trip(prepared: dict):
    if prepared["status"] != "active":
        if _expect_active():
            pytest.fail(f"OpenBLAS should be active here: {prepared}")
        s = settings.current()
        why = "MLX_CLAP_CPU_OPTIMIZATIONS=off" if not s.cpu_optimizations else f"MLX_CLAP_BLAS={s.blas}"
        pytest.skip(f"no OpenBLAS active in this process ({why}; {prepared['status']}: {prepared['reason']})")
    before = blas.get_num_threads()
    assert isinstance(before, int) and before >= 1
    other = 2 if before == 1 else 1
    try:
        assert blas.set_num_threads(other) is True
        assert blas.get_num_threads() == other
    finally:
        assert blas.set_num_threads(before) is True
    assert blas.get_num_threads() == before


def test_matvec_equals_numpy_for_any_input():
    """The sgemv path (when an OpenBLAS is active here) and numpy's product for what it does not take."""
    rng = np.random.default_rng(4)
    m = rng.standard_normal((513, 77)).astype(np.float32)
    v = rng.standard_normal(77).astype(np.float32)
    exact = m.astype(np.float64) @ v.astype(np.float64)
    assert blas.matvec(m, v).dtype == np.float32
    assert np.abs(blas.matvec(m, v) - exact).max() < 1e-4
    # Not taken by sgemv: float64, a strided matrix, a strided vector. Each equals numpy's product.
    for mm, vv in ((m.astype(np.float64), v.astype(np.float64)), (m[::2], v), (m[:, ::2], v[::2])):
        np.testing.assert_array_equal(blas.matvec(mm, vv), mm @ vv)
    with pytest.raises(ValueError):
        blas.matvec(m, v[:10])  # a shape mismatch is numpy's error
