"""Fast GELU, softmax and attention for MLX's CPU backend (used on any device; fast paths on the CPU only).

On the CPU MLX evaluates `erf` and `exp` one element at a time (about 40x and 15x the cost of a multiply
here), so exact GELU and the attention softmax, not the matmuls, dominate the HTSAT tower once the
matmuls run on OpenBLAS (see mlx_clap/blas.py). `mx.compile` fuses plain arithmetic into one vectorized
C++ loop, so the same functions written as polynomials run 5-12x faster:

- `erf`: the rational approximation on [-4, 4] used for float32 by Eigen/XLA (max |error| 4e-7, equal to
  `mx.erf`'s 5e-7 on the CPU);
- `exp`: Cody-Waite range reduction and the Cephes degree-6 polynomial, 2^n assembled in the exponent
  bits (max relative error 1e-7; `mx.exp` on the CPU: 4e-6);
- `softmax` = max, subtract-and-exp, sum, multiply by the reciprocal; `attention` is SDPA with an
  additive mask built on it (float32: the mask is the GEMM's C operand, normalization after the PV
  product).

Each function is cut by hand into compiled kernels shallow enough for MLX to fuse each one whole, and
clamps go through the int32 bits (see the comments below): on one thread, a 1.57 M-value GELU 3.5 -> 1.7
ms and a 1 M-score softmax 7.3 -> 2.1 ms against the single compiled function of each.

Every function falls back to the MLX primitive when the default device is not the CPU (Metal and CUDA
have fast transcendental kernels and a fused SDPA) or when `MLX_CLAP_CPU_KERNELS=off` or
`MLX_CLAP_CPU_OPTIMIZATIONS=off` (`ops.device.cpu_kernels_on`), and computes in
float32 for half-precision inputs. htsat.py calls `gelu` and `attention` (for `nn.gelu` and
`mx.fast.scaled_dot_product_attention`), text.py calls `gelu`.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_clap.ops.device import cpu_kernels_on

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
_SQRT1_2 = 0.7071067811865476
# The primitives, held here so that the fallbacks stay right even if a caller patches mlx.nn / mx.fast.
_mx_gelu = nn.gelu
_mx_sdpa = mx.fast.scaled_dot_product_attention


# Clamping through the int32 bit pattern: MLX's float minimum/maximum/where check for NaN per element and
# compile to branches, which mispredict when clamped and unclamped values mix (a stage-1 GELU or masked
# softmax: 18 ms instead of 2 ms for 3 M values); an integer minimum on the magnitude bits is branch-free.
_SIGN_BIT = -(2**31)
_MAGNITUDE_BITS = 2**31 - 1


def _f32_bits(value: float) -> int:
    return int(np.array(value, dtype=np.float32).view(np.int32))


def _abs_clamp(x: mx.array, bound: float) -> mx.array:
    """min(|x|, bound) for bound > 0 (NaN -> bound)."""
    magnitude = mx.bitwise_and(mx.view(x, mx.int32), _MAGNITUDE_BITS)
    return mx.view(mx.minimum(magnitude, _f32_bits(bound)), mx.float32)


def _clamp(x: mx.array, bound: float) -> mx.array:
    """clip(x, -bound, bound) for bound > 0, branch-free (NaN -> ±bound)."""
    bits = mx.view(x, mx.int32)
    magnitude = mx.minimum(mx.bitwise_and(bits, _MAGNITUDE_BITS), _f32_bits(bound))
    return mx.view(mx.bitwise_or(mx.bitwise_and(bits, _SIGN_BIT), magnitude), mx.float32)


def _erf_ratio(x: mx.array, in_scale: float) -> mx.array:
    """R = P(z²) / Q(z²), erf(z) = z·R, for z = clip(x·in_scale, ±4).

    in_scale is folded into the coefficients (z² = in_scale²·xc², xc = clip(x, ±4 / in_scale)) and both
    polynomials are evaluated Estrin-style, which keeps this kernel within MLX's fusion depth.
    """
    a = _abs_clamp(x, 4.0 / in_scale)
    w = a * a
    w2 = w * w
    s2 = in_scale * in_scale
    p0, p1, p2, p3, p4, p5, p6 = (c * s2 ** (6 - i) for i, c in enumerate(_ERF_P))
    p = ((w * p5 + p6) + w2 * (w * p3 + p4)) + (w2 * w2) * ((w * p1 + p2) + w2 * p0)
    q0, q1, q2, q3, q4 = (c * s2 ** (4 - i) for i, c in enumerate(_ERF_Q))
    q = (w * q3 + q4) + w2 * ((w * q1 + q2) + w2 * q0)
    return p / q


def _erf_finish(x: mx.array, ratio: mx.array, in_scale: float) -> mx.array:
    """erf(x·in_scale) from `_erf_ratio`'s R."""
    return (in_scale * _clamp(x, 4.0 / in_scale)) * ratio


def _gelu_finish(x: mx.array, ratio: mx.array) -> mx.array:
    """0.5·x·(1 + erf(x / sqrt 2)) from `_erf_ratio(x, 1 / sqrt 2)`'s R."""
    return 0.5 * x + ((0.5 * _SQRT1_2) * x * _clamp(x, 4.0 / _SQRT1_2)) * ratio


# 1.5 * 2**23: adding it rounds a float32 of magnitude < 2**22 to an integer (round to nearest) and
# leaves that integer in the low mantissa bits, so one add replaces a float -> int -> float round trip.
_ROUND_MAGIC = 12582912.0


def _exp_arg(x: mx.array, shift: mx.array | float) -> mx.array:
    """c = clip(x - shift, ±88). Below -87.3 exp is not a normal float32; there the result flushes to 0."""
    return _clamp(x - shift, 88.0)


def _exp_reduce(c: mx.array) -> mx.array:
    """r = c - n·ln 2 with n = round(c / ln 2), |r| <= ln 2 / 2."""
    n = (c * _LOG2E + _ROUND_MAGIC) - _ROUND_MAGIC
    return (c - n * _LN2_HI) - n * _LN2_LO


def _exp_pow2(c: mx.array) -> mx.array:
    """2^n for the same n as `_exp_reduce`, assembled in the exponent bits (n = -127 gives 0)."""
    # The low bits of (c / ln 2 + magic) are n; shifting them into the exponent drops the magic's bits.
    n_bits = mx.view(c * _LOG2E + _ROUND_MAGIC, mx.int32)
    return mx.view(mx.left_shift(n_bits + 127, 23), mx.float32)


def _exp_poly_r(r: mx.array, two_n: mx.array) -> mx.array:
    """exp(r)·2^n: the Cephes polynomial evaluated Estrin-style (depth 10 instead of Horner's 15)."""
    r2 = r * r
    high = (r * _EXP_P[2] + _EXP_P[3]) + r2 * (r * _EXP_P[0] + _EXP_P[1])
    inner = (r * _EXP_P[4] + _EXP_P[5]) + r2 * high
    return (inner * r2 + r + 1.0) * two_n


def _exp_poly(x: mx.array) -> mx.array:
    c = _exp_arg(x, 0.0)
    return _exp_poly_r(_exp_reduce(c), _exp_pow2(c))


# Each elementwise function is split by hand into compiled kernels within MLX's fusion depth (11). A
# single compiled function deeper than that is cut by MLX into several kernels whose boundaries pass
# arrays with several consumers; those cannot reuse (donate) a buffer, so each is a fresh allocation and,
# above glibc's 32 MB mmap ceiling, fresh zero-filled pages every call. Cut by hand, GELU writes one new
# array (R) and exp one (r), the other pieces write into an input's buffer. One thread, batch-8 stage-1
# sizes: exp of 7.9 M scores 69 -> 22 ms (27,000 -> 0 page faults), GELU of 12.6 M values 97 -> 58 ms.
_erf_ratio_c = mx.compile(_erf_ratio)
_erf_finish_c = mx.compile(_erf_finish)
_gelu_finish_c = mx.compile(_gelu_finish)
_exp_arg_c = mx.compile(_exp_arg)
_exp_reduce_c = mx.compile(_exp_reduce)
_exp_pow2_c = mx.compile(_exp_pow2)
_exp_poly_r_c = mx.compile(_exp_poly_r)


def _sub_exp_c(x: mx.array, shift: mx.array | float = 0.0) -> mx.array:
    """exp(x - shift) in float32: clamp, reduction, 2^n and polynomial as four kernels (see above).

    The clamp writes into x's buffer when nothing else needs x, 2^n into the clamp's, the polynomial into
    one of its inputs: one new array per call.
    """
    c = _exp_arg_c(x, shift)
    return _exp_poly_r_c(_exp_reduce_c(c), _exp_pow2_c(c))


def _nan_rows(row_max: mx.array) -> mx.array:
    """0 per row, NaN where the row max is NaN or +inf (as exp(x - max) gives without the clamp).

    The exp's clamp maps NaN to a finite value; the (small) row max still carries it, so adding this to
    the normalizer keeps a softmax row with a NaN score NaN.
    """
    return row_max - row_max


def erf(x: mx.array) -> mx.array:
    """erf(x); a compiled polynomial on the CPU, `mx.erf` elsewhere."""
    if not cpu_kernels_on():
        return mx.erf(x)
    x32 = x.astype(mx.float32)
    y = _erf_finish_c(x32, _erf_ratio_c(x32, 1.0), 1.0)
    return mx.where(mx.isnan(x32), x32, y).astype(x.dtype)  # the clamp maps NaN to ±4


def exp(x: mx.array) -> mx.array:
    """exp(x); a compiled polynomial on the CPU, `mx.exp` elsewhere."""
    if not cpu_kernels_on():
        return mx.exp(x)
    x32 = x.astype(mx.float32)
    return mx.where(mx.isnan(x32), x32, _sub_exp_c(x32)).astype(x.dtype)  # the clamp maps NaN to ±88


def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU, as `nn.gelu`, computed in float32 on the CPU."""
    if not cpu_kernels_on():
        return _mx_gelu(x)
    x32 = x.astype(mx.float32)
    return _gelu_finish_c(x32, _erf_ratio_c(x32, _SQRT1_2)).astype(x.dtype)


def softmax(x: mx.array, axis: int = -1) -> mx.array:
    """Softmax in float32 (as `mx.softmax(..., precise=True)`), cast back to the input dtype."""
    if not cpu_kernels_on():
        return mx.softmax(x, axis=axis, precise=True)
    x32 = x.astype(mx.float32)
    m = mx.max(x32, axis=axis, keepdims=True)
    e = _sub_exp_c(x32, m)
    return (e * (mx.reciprocal(mx.sum(e, axis=axis, keepdims=True)) + _nan_rows(m))).astype(x.dtype)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None = None) -> mx.array:
    """`mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)` for an additive mask.

    q, k, v: (B, heads, n, d). On the CPU the scores and the softmax are float32.
    """
    if not cpu_kernels_on():
        return _mx_sdpa(q, k, v, scale=scale, mask=mask)
    if q.dtype != mx.float32 or (mask is not None and mask.dtype != mx.float32):
        # Half precision: scores in the input dtype, softmax in float32 (MLX's half matmuls skip BLAS
        # on the CPU anyway, so this path is about numerics, not speed).
        scores = ((q * scale) @ k.swapaxes(-1, -2)).astype(mx.float32)
        if mask is not None:
            scores = scores + mask.astype(mx.float32)
        return softmax(scores, axis=-1).astype(v.dtype) @ v
    # float32: the mask is the GEMM's C operand (sgemm with beta = 1) instead of a pass over the scores,
    # and the softmax is normalized after the product with v: (e @ v) / sum(e) scales the (n, d) output
    # rather than the (n, n) probabilities. Fewer full-size score arrays also means fewer fresh pages.
    qs = q * scale
    kt = k.swapaxes(-1, -2)
    scores = qs @ kt if mask is None else mx.addmm(mask, qs, kt)
    m = mx.max(scores, axis=-1, keepdims=True)
    e = _sub_exp_c(scores, m)
    return (e @ v) * (mx.reciprocal(mx.sum(e, axis=-1, keepdims=True)) + _nan_rows(m))
