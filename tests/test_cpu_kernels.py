"""The polynomial GELU/softmax/attention of mlx_clap.ops.kernels against float64 references and MLX."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_clap import settings
from mlx_clap.ops import kernels as ck
from mlx_clap.ops.device import cpu_kernels_on

_erf64 = np.vectorize(math.erf)


@pytest.fixture(autouse=True)
def _cpu():
    with mx.stream(mx.cpu):
        old = mx.default_device()
        mx.set_default_device(mx.cpu)
        yield
        mx.set_default_device(old)


@pytest.fixture
def polynomial_kernels():
    """Skip tests of the polynomial kernels' own accuracy where they are switched off (the fallbacks are
    MLX's primitives then, checked by test_switches_select_the_mlx_primitives)."""
    if not cpu_kernels_on():
        s = settings.current()
        pytest.skip(
            "the polynomial CPU kernels are off in this environment "
            f"(MLX_CLAP_CPU_OPTIMIZATIONS={'on' if s.cpu_optimizations else 'off'}, "
            f"MLX_CLAP_CPU_KERNELS={'on' if s.cpu_kernels else 'off'})"
        )


def test_erf_and_gelu_match_float64(polynomial_kernels):
    x = np.linspace(-12, 12, 200_001).astype(np.float32)
    x64 = x.astype(np.float64)
    erf = _erf64(x64)
    assert np.abs(np.array(ck.erf(mx.array(x))) - erf).max() < 1e-6
    gelu = 0.5 * x64 * (1 + _erf64(x64 / math.sqrt(2)))
    got = np.array(ck.gelu(mx.array(x)))
    assert np.abs(got - gelu).max() <= 2e-6
    assert np.abs(got - gelu).max() <= 4 * np.abs(np.array(nn.gelu(mx.array(x))) - gelu).max() + 1e-6


def test_exp_matches_float64(polynomial_kernels):
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


# In a fresh interpreter on the CPU: each kernel next to its MLX primitive, and which primitives each
# kernel called (the primitives are wrapped by spies after the reference results are computed).
SWITCH_PROBE = r"""
import json
import mlx.core as mx, mlx.nn as nn, numpy as np
mx.set_default_device(mx.cpu)
from mlx_clap.ops import kernels as ck
from mlx_clap.ops.device import cpu_kernels_on

rng = np.random.default_rng(0)
x = mx.array(np.linspace(-6, 6, 100_001).astype(np.float32))
e = mx.array(np.linspace(-80, 80, 100_001).astype(np.float32))
rows = mx.array((4 * rng.standard_normal((16, 300))).astype(np.float32))
q, k, v = (mx.array(rng.standard_normal((2, 3, 64, 24)).astype(np.float32)) for _ in range(3))
mask = np.where(rng.random((3, 64, 64)) < 0.2, -100.0, rng.standard_normal((3, 64, 64)))
mask = mx.array(mask.astype(np.float32))
scale = 24 ** -0.5
calls = {
    "erf": lambda: ck.erf(x), "exp": lambda: ck.exp(e), "gelu": lambda: ck.gelu(x),
    "softmax": lambda: ck.softmax(rows), "attention": lambda: ck.attention(q, k, v, scale, mask),
}
primitives = {
    "erf": mx.erf(x), "exp": mx.exp(e), "gelu": nn.gelu(x),
    "softmax": mx.softmax(rows, axis=-1, precise=True),
    "attention": mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask),
}
used = []

def spy(name, fn):
    def wrapped(*args, **kwargs):
        used.append(name)
        return fn(*args, **kwargs)
    return wrapped

mx.erf, mx.exp, mx.softmax = spy("mx.erf", mx.erf), spy("mx.exp", mx.exp), spy("mx.softmax", mx.softmax)
ck._mx_gelu, ck._mx_sdpa = spy("nn.gelu", ck._mx_gelu), spy("sdpa", ck._mx_sdpa)
report = {"kernels_on": cpu_kernels_on()}
for name, call in calls.items():
    used.clear()
    got = np.array(call())
    want = np.array(primitives[name])
    report[name] = {
        "used": sorted(set(used)),
        "identical": bool(np.array_equal(got.view(np.uint32), want.view(np.uint32))),
        "differing": int((got != want).sum()),
        "max_abs": float(np.abs(got.astype(np.float64) - want).max()),
        "max_rel": float((np.abs(got.astype(np.float64) - want) / np.abs(want))[want != 0].max()),
    }
print(json.dumps(report))
"""
PRIMITIVE_OF = {
    "erf": "mx.erf",
    "exp": "mx.exp",
    "gelu": "nn.gelu",
    "softmax": "mx.softmax",
    "attention": "sdpa",
}


def _switch_probe(**variables: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_CLAP_")}
    env.update(variables)
    cmd = [sys.executable, "-c", SWITCH_PROBE]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("switch", ["MLX_CLAP_CPU_KERNELS", "MLX_CLAP_CPU_OPTIMIZATIONS"])
def test_switches_select_the_mlx_primitives(switch):
    """Either switch off: every kernel is its MLX primitive, called, with the primitive's bits."""
    report = _switch_probe(**{switch: "off"})
    assert report["kernels_on"] is False
    for name, primitive in PRIMITIVE_OF.items():
        r = report[name]
        assert primitive in r["used"], (name, r)
        assert r["identical"], (name, r)


def test_default_cpu_uses_the_polynomial_kernels():
    """By default on the CPU no kernel calls its primitive, and each differs from it within tolerance."""
    report = _switch_probe()
    assert report["kernels_on"] is True
    tolerance = {"erf": ("max_abs", 1e-6), "gelu": ("max_abs", 2e-6), "exp": ("max_rel", 1e-5),
                 "softmax": ("max_abs", 1e-6), "attention": ("max_abs", 2e-6)}  # fmt: skip
    for name, (kind, tol) in tolerance.items():
        r = report[name]
        assert r["used"] == [], (name, r)
        assert not r["identical"] and r["differing"] > 0, (name, r)
        assert r[kind] <= tol, (name, r)


def test_switches_are_read_at_call_time(monkeypatch):
    """The kernels ask the settings on every call, so a changed environment takes effect after reset()."""
    x = mx.array(np.linspace(-6, 6, 10_001).astype(np.float32))
    monkeypatch.setenv("MLX_CLAP_CPU_OPTIMIZATIONS", "on")
    monkeypatch.setenv("MLX_CLAP_CPU_KERNELS", "on")
    settings.reset()
    poly = np.array(ck.gelu(x))
    assert not np.array_equal(poly, np.array(nn.gelu(x)))
    monkeypatch.setenv("MLX_CLAP_CPU_KERNELS", "off")
    settings.reset()
    np.testing.assert_array_equal(np.array(ck.gelu(x)), np.array(nn.gelu(x)))


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
