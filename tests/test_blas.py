"""The optimized BLAS that `mlx_clap.ops.blas` routes MLX's CPU matmuls to: correct results, and the opt-out."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import mlx_clap  # noqa: F401  (runs setup_blas)
from mlx_clap.ops.blas import blas_info

LINUX = sys.platform.startswith("linux")
HAS_WHEEL = importlib.util.find_spec("scipy_openblas32") is not None

PROBE = (
    "import json, mlx_clap; from mlx_clap.ops.blas import blas_info; import mlx.core as mx, numpy as np;"
    "a = np.random.default_rng(1).standard_normal((300, 200)).astype(np.float32);"
    "d = np.abs(np.array(mx.array(a) @ mx.array(a).T) - a.astype(np.float64) @ a.T.astype(np.float64)).max();"
    "print(json.dumps({**blas_info(), 'err': float(d)}))"
)


def _probe(env_value: str | None, **extra: str) -> dict:
    env = dict(os.environ)
    env.pop("MLX_CLAP_BLAS", None)
    if env_value is not None:
        env["MLX_CLAP_BLAS"] = env_value
    env.update(extra)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not (LINUX and HAS_WHEEL), reason="needs Linux and the scipy-openblas32 wheel")
def test_optimized_blas_is_active():
    info = blas_info()
    if os.environ.get("MLX_CLAP_BLAS", "auto") in ("", "auto"):
        assert info["status"] == "active", info
        assert "cblas_sgemm" in " ".join(info["symbols"])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(1, 7, 5, 3), (3, 129, 65, 257), (2, 512, 384, 96)])
def test_matmul_matches_numpy(dtype: str, shape: tuple[int, int, int, int]):
    import mlx.core as mx

    batch, m, k, n = shape
    rng = np.random.default_rng(sum(shape))
    a = rng.standard_normal((batch, m, k))
    b = rng.standard_normal((batch, n, k))
    want = a @ b.transpose(0, 2, 1)
    with mx.stream(mx.cpu):
        ma, mb = mx.array(a, dtype=getattr(mx, dtype)), mx.array(b, dtype=getattr(mx, dtype))
        plain = np.array(ma @ mb.transpose(0, 2, 1))
        # A strided (transposed) left operand exercises the other CBLAS transpose flag.
        trans = np.array(mx.swapaxes(mx.swapaxes(ma, 1, 2), 1, 2) @ mb.transpose(0, 2, 1))
    tol = (2e-5 if dtype == "float32" else 1e-12) * np.sqrt(k) * np.abs(want).max()
    assert np.abs(plain - want).max() <= tol
    assert np.abs(trans - want).max() <= tol


@pytest.mark.skipif(not LINUX, reason="the rebinding only runs on Linux")
def test_opt_out_keeps_mlx_blas():
    off = _probe("off")
    assert off["status"] == "off"
    assert off["err"] < 1e-3
    if HAS_WHEEL:
        on = _probe(None)
        assert on["status"] == "active"
        assert on["err"] < 1e-3


@pytest.mark.skipif(not (LINUX and HAS_WHEEL), reason="needs Linux and the scipy-openblas32 wheel")
def test_thread_cap():
    capped = _probe(None, MLX_CLAP_BLAS_THREADS="1")
    assert capped["status"] == "active"
    assert capped["config"].endswith(", 1 thread")
    assert capped["err"] < 1e-3


@pytest.mark.skipif(not LINUX, reason="the rebinding only runs on Linux")
def test_bad_path_fails_softly():
    bad = _probe("/nonexistent/libopenblas.so")
    assert bad["status"] == "failed"
    assert "no such file" in bad["reason"]
    assert bad["err"] < 1e-3


@pytest.mark.skipif(not (LINUX and HAS_WHEEL), reason="needs Linux and the scipy-openblas32 wheel")
def test_set_num_threads_round_trip():
    from mlx_clap.ops.blas import get_num_threads, set_num_threads

    before = get_num_threads()
    if before is None:
        pytest.skip("no OpenBLAS active (MLX_CLAP_BLAS set)")
    try:
        assert set_num_threads(1)
        assert get_num_threads() == 1
    finally:
        set_num_threads(before)
    assert get_num_threads() == before


@pytest.mark.skipif(not LINUX, reason="glibc mallopt")
def test_malloc_tuning_is_opt_in():
    code = "import json, mlx_clap; from mlx_clap.ops.blas import malloc_tuned; print(json.dumps(malloc_tuned()))"
    plain = dict(os.environ)
    plain.pop("MLX_CLAP_MALLOC", None)
    tuned = dict(plain, MLX_CLAP_MALLOC="tune")
    for env, want in ((plain, "false"), (tuned, "true")):
        cmd = [sys.executable, "-c", code]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().splitlines()[-1] == want
