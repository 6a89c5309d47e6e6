"""The HTSAT audio tower (LAION-CLAP / HF `ClapAudioModel`) in MLX.

Attribute names equal the HF `ClapModel` state-dict keys under `audio_model.audio_encoder.*`, so a
converted checkpoint loads by name. Layout: tokens are channels-last (B, H, W, C) and convolutions are
NHWC with OHWI weights (docs/numerics.md §6.4).

Pipeline (docs/numerics.md §4): bn0 over the mel bins (running stats) -> bicubic 1001 -> 1024 frames
(align_corners, A = -0.75) -> fold into a 256 x 256 image (4 time quarters stacked along frequency) ->
patch embed (+ AFF fusion for clips flagged longer) -> 4 Swin stages -> LayerNorm -> mean of the tokens.

Numerics: bn0, the interpolation, LayerNorms and softmax run in float32 whatever the weight dtype, so a
float16/bfloat16 model stays close to the float32 reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_clap.config import ClapAudioConfig
from mlx_clap.models.layers import layer_norm
from mlx_clap.ops import kernels
from mlx_clap.ops.device import cpu_fast_paths

# Value added to attention scores between tokens of different shift regions (Swin uses -100, not -inf).
SHIFT_MASK_VALUE = -100.0
# Keys' cubic convolution constant used by torch's bicubic interpolation (not PIL's -0.5).
CUBIC_A = -0.75
# On the CPU, Swin stages with at least this many tokens per clip (HTSAT stages 1-2: 64x64 and 32x32) run
# clip by clip; see ClapAudioStage.
PER_SAMPLE_MIN_TOKENS = 1024


def _pair(value) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def _batch_norm(bn: nn.BatchNorm, x: mx.array) -> mx.array:
    """Eval-mode BatchNorm over the last axis with running statistics, in float32."""
    x32 = x.astype(mx.float32)
    scale = bn.weight.astype(mx.float32) * mx.rsqrt(bn.running_var.astype(mx.float32) + bn.eps)
    out = (x32 - bn.running_mean.astype(mx.float32)) * scale + bn.bias.astype(mx.float32)
    return out.astype(x.dtype)


def bicubic_taps(in_len: int, out_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (out_len, 4) and weights (out_len, 4) of torch's bicubic resize with align_corners=True.

    This is the (out_len x in_len) interpolation matrix stored sparsely: each output frame mixes 4
    clamped input frames. Scale, source position and weights are computed in float32 exactly as
    torch's CPU kernel does, so the result matches it to the last bit or two.
    """
    scale = np.float32((in_len - 1) / (out_len - 1)) if out_len > 1 else np.float32(0)
    src = (scale * np.arange(out_len, dtype=np.float32)).astype(np.float32)
    base = np.floor(src).astype(np.int64)
    t = (src - base.astype(np.float32)).astype(np.float32)
    a = np.float32(CUBIC_A)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    one = np.float32(1)
    weights = np.stack([far(t + one), near(t), near(one - t), far(2 * one - t)], axis=1).astype(np.float32)
    idx = np.clip(base[:, None] + np.arange(-1, 3)[None, :], 0, in_len - 1)
    return idx.astype(np.int32), weights


# ------------------------------------------------------------------------------------------- fusion
class ClapAudioAFFBlock(nn.Module):
    """Attentional feature fusion (aff_2d): out = 2·g·w + 2·l·(1 − w), w = sigmoid(local + global)."""

    def __init__(self, config: ClapAudioConfig):
        super().__init__()
        channels = config.patch_embeds_hidden_size
        inter = int(channels // config.aff_block_r)
        # Lists (not nn.Sequential) so the keys are local_att.{0,1,3,4} / global_att.{1,2,4,5} as in HF;
        # index 0 of global_att is the average pool, done in __call__.
        self.local_att = [
            nn.Conv2d(channels, inter, kernel_size=1),
            nn.BatchNorm(inter),
            nn.ReLU(),
            nn.Conv2d(inter, channels, kernel_size=1),
            nn.BatchNorm(channels),
        ]
        self.global_att = [
            nn.Identity(),
            nn.Conv2d(channels, inter, kernel_size=1),
            nn.BatchNorm(inter),
            nn.ReLU(),
            nn.Conv2d(inter, channels, kernel_size=1),
            nn.BatchNorm(channels),
        ]

    @staticmethod
    def _branch(layers, x: mx.array) -> mx.array:
        for layer in layers:
            x = _batch_norm(layer, x) if isinstance(layer, nn.BatchNorm) else layer(x)
        return x

    def __call__(self, hidden: mx.array, residual: mx.array) -> mx.array:
        a = hidden + residual
        pooled = mx.mean(a, axis=(1, 2), keepdims=True)  # AdaptiveAvgPool2d(1), NHWC
        w = mx.sigmoid(self._branch(self.local_att, a) + self._branch(self.global_att[1:], pooled))
        return 2 * hidden * w + 2 * residual * (1 - w)


class ClapAudioPatchEmbed(nn.Module):
    """Conv patch embedding (k = stride = 4) + LayerNorm; fused models add `mel_conv2d` and AFF."""

    def __init__(self, config: ClapAudioConfig):
        super().__init__()
        patch = _pair(config.patch_size)
        stride = _pair(config.patch_stride)
        if patch != stride:
            raise ValueError(f"patch_size {patch} != patch_stride {stride} is not supported")
        if config.enable_fusion and config.fusion_type not in (None, "aff_2d"):
            raise ValueError(f"fusion_type {config.fusion_type!r}: only aff_2d is used by released models")
        self.enable_fusion = config.enable_fusion
        self.img_size = (config.spec_size, config.spec_size)
        self.grid_size = (config.spec_size // stride[0], config.spec_size // stride[1])
        dim = config.patch_embeds_hidden_size
        self.proj = nn.Conv2d(config.patch_embed_input_channels, dim, kernel_size=patch, stride=stride)
        self.norm = nn.LayerNorm(dim, eps=1e-5) if config.enable_patch_layer_norm else None
        if self.enable_fusion:
            self.fusion_model = ClapAudioAFFBlock(config)
            wide = (patch[0], patch[1] * 3)
            self.mel_conv2d = nn.Conv2d(
                config.patch_embed_input_channels, dim, kernel_size=wide, stride=(stride[0], stride[1] * 3)
            )

    def __call__(self, image: mx.array, is_longer: mx.array | None) -> mx.array:
        """image (B, 256, 256, C) NHWC; is_longer (B,) bool or None -> tokens grid (B, 64, 64, dim)."""
        if image.shape[1:3] != self.img_size:
            raise ValueError(f"input image {image.shape[1:3]} does not match the model {self.img_size}")
        if not self.enable_fusion:
            wanted = self.proj.weight.shape[-1]
            if image.shape[-1] != wanted:
                raise ValueError(f"this unfused model takes {wanted} mel channel(s), got {image.shape[-1]}")
            return self._norm(self.proj(image))
        glob = self.proj(image[..., 0:1])
        if is_longer is not None:
            if image.shape[-1] < 4:
                raise ValueError("clips flagged is_longer need 4 input channels (whole clip + 3 chunks)")
            batch, height, width, _ = image.shape
            # Each of the 3 chunk channels goes through mel_conv2d separately (channels -> batch).
            local = image[..., 1:4].transpose(0, 3, 1, 2).reshape(batch * 3, height, width, 1)
            local = self.mel_conv2d(local)  # (3B, 64, 21, dim)
            _, h, w, dim = local.shape
            local = local.reshape(batch, 3, h, w, dim).transpose(0, 2, 1, 3, 4).reshape(batch, h, 3 * w, dim)
            out_w = glob.shape[2]
            if 3 * w < out_w:
                local = mx.pad(local, [(0, 0), (0, 0), (0, out_w - 3 * w), (0, 0)])
            else:
                local = local[:, :, :out_w]
            # Fusing every clip and selecting equals HF's indexed write: eval BN is per sample.
            fused = self.fusion_model(glob, local)
            glob = mx.where(is_longer[:, None, None, None], fused, glob)
        return self._norm(glob)

    def _norm(self, x: mx.array) -> mx.array:
        return layer_norm(self.norm, x) if self.norm is not None else x


# ---------------------------------------------------------------------------------------------- Swin
class ClapAudioSelfAttention(nn.Module):
    """q/k/v projections and the (225, heads) relative-position table of one window-attention block."""

    def __init__(self, config: ClapAudioConfig, dim: int, num_heads: int, window: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not a multiple of {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        cfg_window = config.window_size
        # Sized by the configured window, as HF allocates it; a stage window differs from it only when a
        # grid is smaller than one window, which no released config has (stage 4 is exactly 8 x 8).
        self.relative_position_bias_table = mx.zeros(((2 * cfg_window - 1) ** 2, num_heads))
        self.query = nn.Linear(dim, dim, bias=config.qkv_bias)
        self.key = nn.Linear(dim, dim, bias=config.qkv_bias)
        self.value = nn.Linear(dim, dim, bias=config.qkv_bias)
        # Derived, not loaded: the underscore keeps it out of parameters().
        self._relative_index = mx.array(relative_position_index(window, cfg_window).reshape(-1))

    def bias(self, n_tokens: int) -> mx.array:
        """Gathered relative-position bias (heads, n, n)."""
        table = self.relative_position_bias_table[self._relative_index]
        return table.reshape(n_tokens, n_tokens, self.num_heads).transpose(2, 0, 1)


class ClapAudioSelfOutput(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dense = nn.Linear(dim, dim)


class ClapAudioAttention(nn.Module):
    def __init__(self, config: ClapAudioConfig, dim: int, num_heads: int, window: int):
        super().__init__()
        self.self = ClapAudioSelfAttention(config, dim, num_heads, window)
        self.output = ClapAudioSelfOutput(dim)


class ClapAudioIntermediate(nn.Module):
    def __init__(self, config: ClapAudioConfig, dim: int):
        super().__init__()
        self.dense = nn.Linear(dim, int(config.mlp_ratio * dim))


class ClapAudioOutput(nn.Module):
    def __init__(self, config: ClapAudioConfig, dim: int):
        super().__init__()
        self.dense = nn.Linear(int(config.mlp_ratio * dim), dim)


def relative_position_index(window: int, table_window: int | None = None) -> np.ndarray:
    """(n, n) index into the relative-position table, n = window², as Swin builds it."""
    table_window = table_window or window
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
    rel = coords[:, :, None] - coords[:, None, :]
    return (rel[0] + table_window - 1) * (2 * table_window - 1) + (rel[1] + table_window - 1)


def shift_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
    """(nW, n, n) additive mask of a cyclically shifted window layer: -100 across shift regions."""
    h_region = (np.arange(height) >= height - window).astype(np.int64) + (np.arange(height) >= height - shift)
    w_region = (np.arange(width) >= width - window).astype(np.int64) + (np.arange(width) >= width - shift)
    labels = h_region[:, None] * 3 + w_region[None, :]
    windows = labels.reshape(height // window, window, width // window, window).transpose(0, 2, 1, 3)
    windows = windows.reshape(-1, window * window)
    diff = windows[:, None, :] - windows[:, :, None]
    return np.where(diff != 0, SHIFT_MASK_VALUE, 0.0).astype(np.float32)


class ClapAudioLayer(nn.Module):
    """One Swin block: LN -> (shifted) window attention -> residual -> LN -> MLP (exact GELU) -> residual."""

    def __init__(
        self, config: ClapAudioConfig, dim: int, resolution: tuple[int, int], num_heads: int, shift: int
    ):
        super().__init__()
        window = config.window_size
        if min(resolution) <= window:
            # The grid fits one window: attend globally and never shift (stage 4 of HTSAT).
            window, shift = min(resolution), 0
        if resolution[0] % window or resolution[1] % window:
            raise ValueError(f"resolution {resolution} is not a multiple of the window {window}")
        self.window = window
        self.shift = shift
        self.resolution = resolution
        self.layernorm_before = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attention = ClapAudioAttention(config, dim, num_heads, window)
        self.layernorm_after = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.intermediate = ClapAudioIntermediate(config, dim)
        self.output = ClapAudioOutput(config, dim)
        n_windows = (resolution[0] // window) * (resolution[1] // window)
        self._n_windows = n_windows
        self._mask = mx.array(shift_mask(*resolution, window, shift))[:, None] if shift else None

    def _additive_mask(self, dtype: mx.Dtype) -> mx.array:
        """Bias + shift mask as (nW·heads, n, n): windows and heads both act as attention 'heads'."""
        n = self.window * self.window
        bias = self.attention.self.bias(n).astype(mx.float32)[None]  # (1, heads, n, n)
        if self._mask is not None:
            bias = bias + self._mask
        else:
            bias = mx.broadcast_to(bias, (self._n_windows,) + bias.shape[1:])
        return bias.reshape(-1, n, n).astype(dtype)

    def _attention(self, x: mx.array) -> mx.array:
        batch, height, width, dim = x.shape
        win, heads = self.window, self.attention.self.num_heads
        head_dim = dim // heads
        if self.shift:
            x = mx.roll(x, shift=(-self.shift, -self.shift), axis=(1, 2))
        # Window partition: (B, H, W, C) -> (B, nW, n, C), windows in row-major order.
        x = x.reshape(batch, height // win, win, width // win, win, dim).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(batch, -1, win * win, dim)
        n_windows, n = x.shape[1], x.shape[2]
        attn = self.attention.self

        def heads_first(t):  # (B, nW, n, C) -> (B, nW·heads, n, d)
            t = t.reshape(batch, n_windows, n, heads, head_dim).transpose(0, 1, 3, 2, 4)
            return t.reshape(batch, n_windows * heads, n, head_dim)

        q, k, v = heads_first(attn.query(x)), heads_first(attn.key(x)), heads_first(attn.value(x))
        # SDPA; on the CPU a compiled polynomial softmax (cpu_kernels), MLX's own kernel elsewhere.
        out = kernels.attention(q, k, v, head_dim**-0.5, self._additive_mask(q.dtype))
        out = out.reshape(batch, n_windows, heads, n, head_dim).transpose(0, 1, 3, 2, 4)
        out = self.attention.output.dense(out.reshape(batch, n_windows, n, dim))
        # Window reverse and undo the cyclic shift.
        out = out.reshape(batch, height // win, width // win, win, win, dim).transpose(0, 1, 3, 2, 4, 5)
        out = out.reshape(batch, height, width, dim)
        if self.shift:
            out = mx.roll(out, shift=(self.shift, self.shift), axis=(1, 2))
        return out

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self._attention(layer_norm(self.layernorm_before, x))
        h = kernels.gelu(self.intermediate.dense(layer_norm(self.layernorm_after, x)))
        return x + self.output.dense(h)


class ClapAudioPatchMerging(nn.Module):
    """2x2 merge: concat (0,0), (1,0), (0,1), (1,1) along channels -> LayerNorm(4C) -> Linear(4C, 2C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def __call__(self, x: mx.array) -> mx.array:
        if x.shape[1] % 2 or x.shape[2] % 2:
            raise ValueError(f"patch merging needs an even grid, got {x.shape[1:3]}")
        x = mx.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
        return self.reduction(layer_norm(self.norm, x))


class ClapAudioStage(nn.Module):
    def __init__(
        self, config: ClapAudioConfig, dim: int, resolution, depth: int, num_heads: int, merge: bool
    ):
        super().__init__()
        self.blocks = [
            ClapAudioLayer(
                config, dim, resolution, num_heads, shift=0 if i % 2 == 0 else config.window_size // 2
            )
            for i in range(depth)
        ]
        self.downsample = ClapAudioPatchMerging(dim) if merge else None

    def __call__(self, x: mx.array) -> mx.array:
        if x.shape[0] > 1 and x.shape[1] * x.shape[2] >= PER_SAMPLE_MIN_TOKENS and cpu_fast_paths():
            # On the CPU the wide stages run one clip at a time. Batched, their big intermediates (window
            # scores, MLP hidden) exceed glibc's 32 MB mmap ceiling, so every call gets fresh zero-filled
            # pages; per clip they are ~4-6 MB and reuse freed heap memory, while the GEMMs keep >= 1024
            # rows. Batch 8, one thread: tower 1571 -> 1322 ms (page faults 148k -> 35k per call). Stage 3
            # per clip (256-row GEMMs) measured a wash: faster with the default malloc, slower with
            # MLX_CLAP_MALLOC=tune.
            return mx.concatenate([self._forward(x[i : i + 1]) for i in range(x.shape[0])])
        return self._forward(x)

    def _forward(self, x: mx.array) -> mx.array:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


# ------------------------------------------------------------------------------------------- encoder
@dataclass
class HTSATOutput:
    """What `ClapAudioModel(..., output_hidden_states=True)` returns.

    hidden_states: patch-embed output then each stage's output (after merging), each (B, H, W, C), the
    same tensors as HF's `hidden_states` (which are (B, C, H, W)). last_hidden_state: the final
    LayerNorm'd tokens (B, H, W, C). pooler_output: their mean (B, hidden).
    """

    pooler_output: mx.array
    last_hidden_state: mx.array
    hidden_states: tuple[mx.array, ...]


class ClapAudioEncoder(nn.Module):
    """bn0 -> bicubic -> fold -> patch embed -> Swin stages -> final norm (HF `ClapAudioEncoder`)."""

    def __init__(self, config: ClapAudioConfig):
        super().__init__()
        self.config = config
        self.patch_embed = ClapAudioPatchEmbed(config)
        self.enable_fusion = config.enable_fusion
        self.freq_ratio = config.spec_size // config.num_mel_bins
        n_stages = len(config.depths)
        grid = self.patch_embed.grid_size
        self.layers = [
            ClapAudioStage(
                config,
                dim=int(config.patch_embeds_hidden_size * 2**i),
                resolution=(grid[0] // 2**i, grid[1] // 2**i),
                depth=config.depths[i],
                num_heads=config.num_attention_heads[i],
                merge=i < n_stages - 1,
            )
            for i in range(n_stages)
        ]
        self.num_features = int(config.patch_embeds_hidden_size * 2 ** (n_stages - 1))
        self.batch_norm = nn.BatchNorm(config.num_mel_bins)
        self.norm = nn.LayerNorm(self.num_features)
        self._taps: dict[int, tuple[mx.array, mx.array]] = {}

    def _interp_taps(self, frames: int) -> tuple[mx.array, mx.array]:
        if frames not in self._taps:
            idx, w = bicubic_taps(frames, self.config.spec_size * self.freq_ratio)
            self._taps[frames] = (mx.array(idx), mx.array(w))
        return self._taps[frames]

    def mel_to_image(self, input_features: mx.array) -> mx.array:
        """(B, C, T, 64) log-mels -> bn0 -> bicubic to 1024 frames -> fold -> (B, 256, 256, C), float32."""
        x = mx.array(input_features).astype(mx.float32)
        batch, channels, frames, mels = x.shape
        target = self.config.spec_size * self.freq_ratio
        if mels != self.config.num_mel_bins:
            raise ValueError(f"input has {mels} mel bins, the model wants {self.config.num_mel_bins}")
        if frames > target:
            raise ValueError(f"input has {frames} frames; at most {target} fit the model")
        x = _batch_norm(self.batch_norm, x)
        if frames < target:
            idx, w = self._interp_taps(frames)
            taps = x[:, :, idx, :]  # (B, C, target, 4, mels)
            w = w[:, :, None]
            # Left-to-right sum, as torch's cubic_interp1d.
            x = taps[..., 0, :] * w[:, 0] + taps[..., 1, :] * w[:, 1] + taps[..., 2, :] * w[:, 2]
            x = x + taps[..., 3, :] * w[:, 3]
        # image[q·mels + m, t'] = mel[q·(target/ratio) + t', m]; channels last.
        quarter = target // self.freq_ratio
        x = x.reshape(batch, channels, self.freq_ratio, quarter, mels).transpose(0, 2, 4, 3, 1)
        return x.reshape(batch, self.freq_ratio * mels, quarter, channels)

    def __call__(
        self, input_features: mx.array, is_longer=None, output_hidden_states: bool = False
    ) -> mx.array | HTSATOutput:
        dtype = self.patch_embed.proj.weight.dtype
        longer = self._longer_mask(is_longer, input_features.shape[0])
        image = self.mel_to_image(input_features).astype(dtype)
        x = self.patch_embed(image, longer)
        hidden = [x]
        for stage in self.layers:
            x = stage(x)
            hidden.append(x)
        last = layer_norm(self.norm, x)
        # HF regroups the 8x8 tokens before AdaptiveAvgPool1d; the mean over all of them is the same.
        pooled = mx.mean(last.astype(mx.float32), axis=(1, 2)).astype(dtype)
        if output_hidden_states:
            return HTSATOutput(pooled, last, tuple(hidden))
        return pooled

    def _longer_mask(self, is_longer, batch: int) -> mx.array | None:
        """(B,) bool for fused models when at least one clip is flagged, else None (plain path).

        As in LAION's eval forward, a batch with no clip flagged longer never runs the fusion branch.
        """
        if not self.enable_fusion or is_longer is None:
            return None
        flags = np.asarray(is_longer).astype(bool).reshape(-1)
        if flags.shape[0] != batch:
            raise ValueError(f"is_longer has {flags.shape[0]} entries for a batch of {batch}")
        return mx.array(flags) if flags.any() else None


class ClapAudioModel(nn.Module):
    """HF `ClapAudioModel`: holds `audio_encoder`; returns the pooled (B, hidden) audio vector."""

    def __init__(self, config: ClapAudioConfig):
        super().__init__()
        self.config = config
        self.audio_encoder = ClapAudioEncoder(config)

    def __call__(
        self, input_features: mx.array, is_longer=None, output_hidden_states: bool = False
    ) -> mx.array | HTSATOutput:
        """input_features (B, C, T<=1024, 64) log-mels; is_longer (B, 1) bool (fused models) or None.

        Returns the pooled (B, hidden) vector, or a `HTSATOutput` with per-stage hidden states when
        `output_hidden_states` is set.
        """
        return self.audio_encoder(input_features, is_longer, output_hidden_states)
