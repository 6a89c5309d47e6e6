"""The polynomial GELU/softmax/attention of mlx_clap.ops.kernels against float64 references and MLX."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_clap.ops import kernels as ck

_erf64 = np.vectorize(math.erf)


@pytest.fixture(autouse=True)
def _cpu():
    with mx.stream(mx.cpu):
        old = mx.default_device()
        mx.set_default_device(mx.cpu)
        yield
        mx.set_default_device(old)


def test_erf_and_gelu_match_float64():
    x = np.linspace(-12, 12, 200_001).astype(np.float32)
    x64 = x.astype(np.float64)
    erf = _erf64(x64)
    assert np.abs(np.array(ck.erf(mx.array(x))) - erf).max() < 1e-6
    gelu = 0.5 * x64 * (1 + _erf64(x64 / math.sqrt(2)))
    got = np.array(ck.gelu(mx.array(x)))
    assert np.abs(got - gelu).max() <= 2e-6
    assert np.abs(got - gelu).max() <= 4 * np.abs(np.array(nn.gelu(mx.array(x))) - gelu).max() + 1e-6


def test_exp_matches_float64():
    x = np.linspace(-87, 88, 100_001).astype(np.float32)
    ref = np.exp(x.astype(np.float64))
    got = np.array(ck.exp(mx.array(x))).astype(np.float64)
    assert (np.abs(got - ref) / ref).max() < 3e-7


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_attention_matches_sdpa(dtype):
    rng = np.random.default_rng(0)
    q, k, v = (
        mx.array(rng.standard_normal((2, 6, 64, 24)).astype(np.float32)).astype(dtype) for _ in range(3)
    )
    mask = mx.array(np.where(rng.random((6, 64, 64)) < 0.2, -100.0, rng.standard_normal((6, 64, 64))))
    mask = mask.astype(mx.float32)
    want = mx.fast.scaled_dot_product_attention(
        q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32), scale=24**-0.5, mask=mask
    )
    got = ck.attention(q, k, v, 24**-0.5, mask.astype(dtype))
    assert got.dtype == dtype
    tol = 2e-6 if dtype == mx.float32 else 3e-2
    assert np.abs(np.array(got.astype(mx.float32)) - np.array(want)).max() < tol


def test_softmax_rows_sum_to_one_and_handle_large_negatives():
    x = mx.array(np.array([[0.0, -1e4, 3.0, -100.0], [50.0, 50.0, 50.0, 50.0]], dtype=np.float32))
    got = np.array(ck.softmax(x))
    x64 = np.array(x).astype(np.float64)
    e = np.exp(x64 - x64.max(-1, keepdims=True))
    np.testing.assert_allclose(got, e / e.sum(-1, keepdims=True), rtol=1e-6, atol=1e-12)


def test_opt_out_uses_the_mlx_primitives():
    code = "from mlx_clap.ops import kernels as ck; print(ck.on_cpu())"
    env = dict(os.environ, MLX_CLAP_CPU_KERNELS="off")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
    assert ck.on_cpu() == ck.ENABLED


def test_nan_propagates_like_the_mlx_primitives():
    """The branch-free clamps must not turn a NaN into a finite number (a bad input stays visible)."""
    x = mx.array([0.5, float("nan"), -3.0], dtype=mx.float32)
    assert np.isnan(np.array(ck.exp(x))[1]) and np.isfinite(np.array(ck.exp(x))[[0, 2]]).all()
    assert np.isnan(np.array(ck.erf(x))[1]) and np.isnan(np.array(ck.gelu(x))[1])
    rows = mx.array([[0.1, 0.2, 0.3], [0.1, float("nan"), 0.3]], dtype=mx.float32)
    sm = np.array(ck.softmax(rows))
    assert np.isfinite(sm[0]).all() and np.isnan(sm[1]).all()
    rng = np.random.default_rng(1)
    q, k, v = (mx.array(rng.standard_normal((1, 2, 64, 24)).astype(np.float32)) for _ in range(3))
    q = mx.array(np.where(np.arange(64)[None, None, :, None] == 5, np.nan, np.array(q)).astype(np.float32))
    out = np.array(ck.attention(q, k, v, 24**-0.5, None))
    want = np.array(mx.fast.scaled_dot_product_attention(q, k, v, scale=24**-0.5))
    np.testing.assert_array_equal(np.isnan(out), np.isnan(want))
