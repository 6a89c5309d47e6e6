"""The DAC-style codec encoder of PE-Audio (transformers `PeAudioDacEncoder`), in MLX, channels last.

Attribute names equal the checkpoint keys under `audio_encoder.embedder.dac_encoder.*` (`conv1`,
`block.{i}.res_unit{1,2,3}.{snake1,conv1,snake2,conv2}`, `block.{i}.{snake1,conv1}`, `snake1`, `conv2`);
convolution weights are stored (out, kernel, in) as `mx.conv1d` takes them, Snake's `alpha` as (channels,).

- Snake: x + 1/(alpha + 1e-9) * sin(alpha * x)^2, per channel.
- Residual unit: Snake -> Conv(k7, dilation 1/3/9, "same") -> Snake -> Conv(k1), plus the input.
- Block: three residual units -> Snake -> Conv(k = 2 * stride, stride, padding ceil(stride / 2)), which
  doubles the channels and divides the length by the stride (exactly, for lengths that are multiples of
  the stride product, as the feature extractor pads them).

Padded batches. transformers runs the codec over the zero-padded batch, so a clip's last frames see the
padding of the longest clip in the batch (its vector depends on what else is in the batch). The encoder
here (`encoder.PeAudioEncoderEmbedder`) runs the codec on each clip's own samples instead, and long clips
in tiles with `receptive_halo` frames of context: a clip gives the same numbers in any batch.

Convolutions are matrix products (`conv1d`): MLX's CPU `conv1d` runs dilated kernels 20-70x slower than
BLAS (a 64-channel k7 dilation-9 layer over 3 s: 13-19 s against 0.6-0.8 s as products), so the same
product form runs on every device.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_clap.models.pe_audio.config import DacEncoderConfig
from mlx_clap.ops.device import cpu_kernels_on

# sin(y)^2 has period pi: y = n * pi + r with |r| <= pi / 2, pi split in three (the first with 8 significant
# bits, so n * _PI_A is exact for |n| < 2^16) so that r keeps float32 accuracy for large |y|.
_PI_A = 3.140625
_PI_B = float(np.float32(np.pi - _PI_A))
_PI_C = float(np.float32(np.pi - _PI_A - _PI_B))
_INV_PI = 1.0 / np.pi
_ROUND_MAGIC = 12582912.0  # 1.5 * 2^23: adding it rounds a float32 below 2^22 to an integer
# Taylor coefficients of sin(r) / r - 1 in r^2, through r^12: below 1e-9 absolute error on [-pi/2, pi/2].
_SIN_C = tuple((-1) ** k / math.factorial(2 * k + 1) for k in range(1, 7))


def _snake_reduce(x: mx.array, alpha: mx.array) -> mx.array:
    y = x * alpha
    n = (y * _INV_PI + _ROUND_MAGIC) - _ROUND_MAGIC
    return ((y - n * _PI_A) - n * _PI_B) - n * _PI_C


def _snake_finish(x: mx.array, r: mx.array, inv_alpha: mx.array) -> mx.array:
    r2 = r * r
    r4 = r2 * r2
    c1, c3, c5, c7, c9, c11 = _SIN_C
    p = (c1 + r2 * c3) + r4 * ((c5 + r2 * c7) + r4 * (c9 + r2 * c11))
    s = r + (r * r2) * p
    return x + inv_alpha * (s * s)


# Two kernels, each within MLX's fusion depth (see ops/kernels.py): on one CPU thread a 9.2 M-value Snake
# takes 0.13 s against 0.57 s with `mx.sin` (MLX evaluates sin one element at a time on the CPU).
_snake_reduce_c = mx.compile(_snake_reduce)
_snake_finish_c = mx.compile(_snake_finish)


def snake(x: mx.array, alpha: mx.array) -> mx.array:
    """x + 1/(alpha + 1e-9) * sin(alpha * x)^2 (alpha broadcast over the last axis), in float32.

    On the CPU sin^2 is a compiled polynomial (max error 5e-7 of the result on activations of a few
    units; |alpha * x| must stay below 1.3e7, far above any activation); elsewhere `mx.sin`.
    """
    x32 = x.astype(mx.float32)
    a = alpha.astype(mx.float32)
    inv = mx.reciprocal(a + 1e-9)  # as torch: (alpha + 1e-9).reciprocal(), then the product
    if not cpu_kernels_on():
        return (x32 + inv * mx.square(mx.sin(a * x32))).astype(x.dtype)
    return _snake_finish_c(x32, _snake_reduce_c(x32, a), inv).astype(x.dtype)


def conv1d(
    x: mx.array,
    weight: mx.array,
    bias: mx.array | None = None,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    taps: mx.array | None = None,
) -> mx.array:
    """torch's Conv1d (zero padding) on channels-last x (B, L, in) with weight (out, K, in).

    Stride 1: one accumulated product per tap (`addmm` over shifted views), no im2col copy (7x the
    input for k7), so memory stays at input + output. Stride s with K = m * s: the input cut into frames
    of s samples, m products. Tiny inputs (K * in <= 64, the first layer) go through `mx.conv1d`.
    `taps`: the same weight laid out (K, in, out), row-contiguous (`Conv1d.arrange`), so that each
    product takes a contiguous matrix; without it the products copy strided slices of `weight` per call.
    """
    B, L, cin = x.shape
    cout, K, _ = weight.shape
    if taps is None:
        taps = weight.transpose(1, 2, 0)  # a view: the products copy what they need, as before
    if K == 1 and stride == 1 and padding == 0:
        y = x @ taps[0]
    elif K * cin <= 64 and dilation == 1:
        y = mx.conv1d(x, weight, stride=stride, padding=padding)
    elif stride == 1:
        xp = mx.pad(x, [(0, 0), (padding, padding), (0, 0)]) if padding else x
        n_out = L + 2 * padding - dilation * (K - 1)
        y = None
        for k in range(K):
            tap = xp[:, k * dilation : k * dilation + n_out]
            y = tap @ taps[k] if y is None else mx.addmm(y, tap, taps[k])
    elif K % stride == 0 and dilation == 1:
        m = K // stride
        n_out = (L + 2 * padding - K) // stride + 1
        need = (n_out + m - 1) * stride
        right = max(0, need - (L + padding))
        xp = mx.pad(x, [(0, 0), (padding, right), (0, 0)])[:, :need]
        frames = xp.reshape(B, n_out + m - 1, stride * cin)
        w = taps.reshape(m, stride * cin, cout)  # tap j: rows (sample in frame, channel) of frame j
        y = None
        for j in range(m):
            tap = frames[:, j : j + n_out]
            y = tap @ w[j] if y is None else mx.addmm(y, tap, w[j])
    else:
        y = mx.conv1d(x, weight, stride=stride, padding=padding, dilation=dilation)
    return y if bias is None else y + bias


class Conv1d(nn.Module):
    """A torch-layout Conv1d's parameters (weight stored (out, K, in)) and its call through `conv1d`.

    `arrange()` (done at load) keeps the weight's memory in per-tap order (K, in, out): `weight` is then a
    transposed view of it, the same parameter (name, shape, values) to `parameters()`, saving and
    conversion, while the products read contiguous matrices. Without it, block 3's strided convolution
    (50 MB) copied its weight into that order on every call (0.25 -> 0.09 s, docs/performance.md).
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        bias: bool = True,
    ):
        super().__init__()
        self.weight = mx.zeros((cout, kernel, cin))
        if bias:
            self.bias = mx.zeros((cout,))
        self.stride, self.padding, self.dilation = stride, padding, dilation

    def arrange(self) -> mx.array:
        """Lay the weight out per tap (see the class docstring); returns the arranged array, unevaluated."""
        taps = mx.contiguous(self.weight.transpose(1, 2, 0))
        self.weight = taps.transpose(2, 0, 1)
        # Private (a leading "_" keeps it out of `parameters()`), and tied to this weight array: a weight
        # loaded or cast later is not this object, and the call falls back to the strided views.
        self._arranged = (self.weight, taps)
        return taps

    def __call__(self, x: mx.array) -> mx.array:
        arranged = self.get("_arranged")
        taps = arranged[1] if arranged is not None and arranged[0] is self.weight else None
        return conv1d(x, self.weight, self.get("bias"), self.stride, self.padding, self.dilation, taps)


class Snake1d(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.alpha = mx.ones((channels,))

    def __call__(self, x: mx.array) -> mx.array:
        return snake(x, self.alpha)


class PeAudioDacResidualUnit(nn.Module):
    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.snake1 = Snake1d(channels)
        self.conv1 = Conv1d(channels, channels, 7, padding=3 * dilation, dilation=dilation)
        self.snake2 = Snake1d(channels)
        self.conv2 = Conv1d(channels, channels, 1)

    def __call__(self, x: mx.array) -> mx.array:
        return x + self.conv2(self.snake2(self.conv1(self.snake1(x))))


class PeAudioDacEncoderBlock(nn.Module):
    def __init__(self, channels: int, stride: int):
        super().__init__()
        half = channels // 2
        self.res_unit1 = PeAudioDacResidualUnit(half, 1)
        self.res_unit2 = PeAudioDacResidualUnit(half, 3)
        self.res_unit3 = PeAudioDacResidualUnit(half, 9)
        self.snake1 = Snake1d(half)
        self.conv1 = Conv1d(half, channels, 2 * stride, stride=stride, padding=math.ceil(stride / 2))

    def __call__(self, x: mx.array) -> mx.array:
        x = self.res_unit3(self.res_unit2(self.res_unit1(x)))
        return self.conv1(self.snake1(x))


class PeAudioDacEncoder(nn.Module):
    """(B, N, 1) waveforms (N a multiple of the hop) -> (B, N / hop, hidden_size) codec latents."""

    def __init__(self, config: DacEncoderConfig):
        super().__init__()
        width = config.encoder_hidden_size
        self.conv1 = Conv1d(1, width, 7, padding=3)
        self.block = [
            PeAudioDacEncoderBlock(width * 2**i, stride)
            for i, stride in enumerate(config.downsampling_ratios, 1)
        ]
        d_model = width * 2 ** len(config.downsampling_ratios)
        self.snake1 = Snake1d(d_model)
        self.conv2 = Conv1d(d_model, config.hidden_size, 3, padding=1)

    def __call__(self, x: mx.array, capture: dict | None = None) -> mx.array:
        x = self.conv1(x)
        if capture is not None:
            capture["dac.conv1"] = x
        for i, block in enumerate(self.block):
            x = block(x)
            if capture is not None:
                capture[f"dac.block.{i}"] = x
        x = self.conv2(self.snake1(x))
        if capture is not None:
            capture["dac.conv2"] = x
        return x


def arrange_convs(module: nn.Module) -> None:
    """`Conv1d.arrange` every convolution under `module` and evaluate them (call after loading weights)."""
    convs = [m for _, m in module.named_modules() if isinstance(m, Conv1d)]
    mx.eval([c.arrange() for c in convs], [c.weight for c in convs])


def receptive_halo(config: DacEncoderConfig) -> int:
    """Frames on each side of a codec frame whose samples can change it (its receptive field), rounded up.

    Composed from the top: a layer (kernel K, stride s, padding p, dilation d) maps the input span
    [a, b] of an output position to [a * s - p, b * s - p + d * (K - 1)]. For the released codec a frame
    sees 9953 samples (5.2 frames) beyond its own on each side: 6.
    """
    layers = [(3, 1, 1, 1)]  # conv2, top first; Snake and the k1 convs are pointwise
    for stride in reversed(config.downsampling_ratios):
        layers.append((2 * stride, stride, math.ceil(stride / 2), 1))
        layers += [(7, 1, 3 * d, d) for d in (9, 3, 1)]  # res_unit3, 2, 1 (their residual adds nothing)
    layers.append((7, 1, 3, 1))  # conv1
    a = b = 0
    for kernel, stride, padding, dilation in layers:
        a, b = a * stride - padding, b * stride - padding + dilation * (kernel - 1)
    hop = config.hop_length
    return math.ceil(max(-a, b - (hop - 1)) / hop)


__all__ = ["Conv1d", "PeAudioDacEncoder", "Snake1d", "arrange_convs", "conv1d", "receptive_halo", "snake"]
