"""Fast GELU, softmax and attention for MLX's CPU backend (used on any device; fast paths on the CPU only).

On the CPU MLX evaluates `erf` and `exp` one element at a time (about 40x and 15x the cost of a multiply
here), so exact GELU and the attention softmax, not the matmuls, dominate the HTSAT tower once the
matmuls run on OpenBLAS (see mlx_clap/blas.py). `mx.compile` fuses plain arithmetic into one vectorized
C++ loop, so the same functions written as polynomials run 5-12x faster:

- `erf`: the rational approximation on [-4, 4] used for float32 by Eigen/XLA (max |error| 4e-7, equal to
  `mx.erf`'s 5e-7 on the CPU);
- `exp`: Cody-Waite range reduction and the Cephes degree-6 polynomial, 2^n assembled in the exponent
  bits (max relative error 1e-7; `mx.exp` on the CPU: 4e-6);
- `softmax` = max, fused subtract-and-exp, sum, multiply by the reciprocal; `attention` is SDPA with an
  additive mask built on it.

Every function falls back to the MLX primitive when the default device is not the CPU (Metal and CUDA
have fast transcendental kernels and a fused SDPA) or when `MLX_CLAP_CPU_KERNELS=off`, and computes in
float32 for half-precision inputs. htsat.py calls `gelu` and `attention` (for `nn.gelu` and
`mx.fast.scaled_dot_product_attention`), text.py calls `gelu`.
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn

_ERF_P = (
    -2.72614225801306e-10,
    2.77068142495902e-08,
    -2.10102402082508e-06,
    -5.69250639462346e-05,
    -7.34990630326855e-04,
    -2.95459980854025e-03,
    -1.60960333262415e-02,
)
_ERF_Q = (
    -1.45660718464996e-05,
    -2.13374055278905e-04,
    -1.68282697438203e-03,
    -7.37332916720468e-03,
    -1.42647390514189e-02,
)
_EXP_P = (
    1.9875691500e-4,
    1.3981999507e-3,
    8.3334519073e-3,
    4.1665795894e-2,
    1.6666665459e-1,
    5.0000001201e-1,
)
_LOG2E = 1.4426950408889634
_LN2_HI = 0.693359375  # ln 2 split so that n · LN2_HI is exact in float32
_LN2_LO = -2.12194440e-4
# The primitives, held here so that the fallbacks stay right even if a caller patches mlx.nn / mx.fast.
_mx_gelu = nn.gelu
_mx_sdpa = mx.fast.scaled_dot_product_attention


ENABLED = os.environ.get("MLX_CLAP_CPU_KERNELS", "on").strip().lower() not in ("off", "0", "no", "false")


def on_cpu() -> bool:
    """Whether the polynomial kernels are used: default device is the CPU and not opted out."""
    return ENABLED and mx.default_device() == mx.cpu


def _erf_poly(x: mx.array) -> mx.array:
    x = mx.clip(x, -4.0, 4.0)
    x2 = x * x
    p = x2 * _ERF_P[0] + _ERF_P[1]
    for c in _ERF_P[2:]:
        p = p * x2 + c
    q = x2 * _ERF_Q[0] + _ERF_Q[1]
    for c in _ERF_Q[2:]:
        q = q * x2 + c
    return x * p / q


def _exp_poly(x: mx.array) -> mx.array:
    x = mx.clip(x, -87.0, 88.0)
    # n = round(x / ln 2) through an int conversion of a positive number (truncation = floor there):
    # `mx.floor` is a scalar libm call inside compiled CPU code, the conversion is one vector instruction.
    n_int = (x * _LOG2E + 128.5).astype(mx.int32) - 128
    n = n_int.astype(mx.float32)
    r = (x - n * _LN2_HI) - n * _LN2_LO
    p = r * _EXP_P[0] + _EXP_P[1]
    for c in _EXP_P[2:]:
        p = p * r + c
    p = p * r * r + r + 1.0
    two_n = mx.view(mx.left_shift(n_int + 127, 23), mx.float32)
    return p * two_n


def _gelu_f32(x: mx.array) -> mx.array:
    return 0.5 * x * (1.0 + _erf_poly(x * 0.7071067811865476))


def _sub_exp(x: mx.array, m: mx.array) -> mx.array:
    return _exp_poly(x - m)


_erf_c = mx.compile(_erf_poly)
_exp_c = mx.compile(_exp_poly)
_gelu_c = mx.compile(_gelu_f32)
_sub_exp_c = mx.compile(_sub_exp)


def erf(x: mx.array) -> mx.array:
    """erf(x); a compiled polynomial on the CPU, `mx.erf` elsewhere."""
    if not on_cpu():
        return mx.erf(x)
    return _erf_c(x.astype(mx.float32)).astype(x.dtype)


def exp(x: mx.array) -> mx.array:
    """exp(x); a compiled polynomial on the CPU, `mx.exp` elsewhere."""
    if not on_cpu():
        return mx.exp(x)
    return _exp_c(x.astype(mx.float32)).astype(x.dtype)


def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU, as `nn.gelu`, computed in float32 on the CPU."""
    if not on_cpu():
        return _mx_gelu(x)
    return _gelu_c(x.astype(mx.float32)).astype(x.dtype)


def softmax(x: mx.array, axis: int = -1) -> mx.array:
    """Softmax in float32 (as `mx.softmax(..., precise=True)`), cast back to the input dtype."""
    if not on_cpu():
        return mx.softmax(x, axis=axis, precise=True)
    x32 = x.astype(mx.float32)
    e = _sub_exp_c(x32, mx.max(x32, axis=axis, keepdims=True))
    return (e * mx.reciprocal(mx.sum(e, axis=axis, keepdims=True))).astype(x.dtype)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None = None) -> mx.array:
    """`mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)` for an additive mask.

    q, k, v: (B, heads, n, d). On the CPU the scores and the softmax are float32.
    """
    if not on_cpu():
        return _mx_sdpa(q, k, v, scale=scale, mask=mask)
    scores = (q * scale) @ k.swapaxes(-1, -2)
    scores = scores.astype(mx.float32)
    if mask is not None:
        scores = scores + mask.astype(mx.float32)
    return softmax(scores, axis=-1).astype(v.dtype) @ v
