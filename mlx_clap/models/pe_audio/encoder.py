"""The PE-Audio audio tower (transformers `PeAudioEncoder`), in MLX.

Attribute names equal the checkpoint keys under `audio_encoder.*`:

- `embedder`: the codec encoder (`dac.py`), a k1 `bottleneck` conv to `codebook_dim`, `data_proj` to the
  transformer width: one token per `hop` samples (1920 = 40 ms at 48 kHz);
- `patch_embedder`: a learned `class_embedding` prepended, then a ResNet block of two
  (GroupNorm(1 group) -> SiLU -> Conv k3 "same") units with a residual. The GroupNorm statistics span
  every channel and every (valid) frame of the clip;
- `layers`: pre-norm transformer layers: RMSNorm -> attention with per-head RMSNorm on q and k and
  interleaved-pair rotary embeddings (theta 20000, positions 0..T with the class token at 0) -> residual ->
  RMSNorm -> gated MLP down(silu(gate(x)) * up(x)) -> residual;
- `norm` (RMSNorm) and `output` (Linear, no bias). Row 0 is the pooled state, rows 1.. the frames.

Padded batches: `lengths` gives each clip's samples; the codec runs on each clip's own samples (long ones
in exact tiles, see `PeAudioEncoderEmbedder`), the GroupNorm takes its statistics over the clip's own
frames (as transformers' masked GroupNorm) and attention masks the padded keys, so each clip's outputs
equal those of the clip alone (transformers' padded batches do not: its codec sees the padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_clap.models.pe_audio.config import PeAudioEncoderConfig
from mlx_clap.models.pe_audio.dac import Conv1d, PeAudioDacEncoder, receptive_halo
from mlx_clap.ops import kernels, parallel

# Added to the scores of padded keys; exp() of it is exactly 0 in float32 (HF uses finfo.min).
MASK_VALUE = -1e9
# Codec frames per tile for long clips (5.12 s): with the 6-frame halos, 9% of the codec is computed twice.
TILE_FRAMES = 128


def rms_norm(norm: nn.RMSNorm, x: mx.array) -> mx.array:
    """RMSNorm in float32 whatever the model dtype (as transformers' `PeAudioEncoderRMSNorm`)."""
    out = mx.fast.rms_norm(x.astype(mx.float32), norm.weight.astype(mx.float32), norm.eps)
    return out.astype(x.dtype)


def activation(name: str):
    """The elementwise activation of an HF `hidden_act` name (exact GELU through `ops.kernels`)."""
    return {
        "silu": nn.silu,
        "gelu": kernels.gelu,
        "relu": nn.relu,
        "gelu_new": nn.gelu_approx,
        "gelu_pytorch_tanh": nn.gelu_approx,
    }[name]


def rope_tables(n: int, dim: int, theta: float) -> tuple[mx.array, mx.array]:
    """(cos, sin), each (n, dim / 2) float32, for positions 0..n-1, computed as transformers does.

    inv_freq = 1 / theta^(2i / dim) and position * inv_freq are float32 products (as torch's), then
    cos/sin are taken in float64 and rounded: the angles match the reference's bit for bit, so long clips
    (angles in the thousands of radians) do not drift.
    """
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)
    angles = np.arange(n, dtype=np.float32)[:, None] * inv_freq[None, :]
    angles64 = angles.astype(np.float64)
    return mx.array(np.cos(angles64).astype(np.float32)), mx.array(np.sin(angles64).astype(np.float32))


def rope_interleaved(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate pairs (x[2i], x[2i+1]) by angle i of each position; x (B, heads, n, dim)."""
    B, H, n, d = x.shape
    pairs = x.astype(mx.float32).reshape(B, H, n, d // 2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    out = mx.stack([a * cos - b * sin, a * sin + b * cos], axis=-1)
    return out.reshape(B, H, n, d).astype(x.dtype)


class PeAudioEncoderEmbedder(nn.Module):
    """Codec, bottleneck and projection: one token per frame.

    The codec runs clip by clip, each on its own samples only (no padding to mask), and a clip longer
    than `TILE_FRAMES` in tiles of that many frames, each computed with `receptive_halo` frames of the
    neighbouring samples on both sides and cut back: every frame sees all the samples it depends on,
    so the tiles give the frames of one pass (up to float rounding) while the codec's activations (about
    0.1 GB per second of audio, from the 64-channel full-rate first stage) stay those of one tile (one
    per CPU worker: the tiles run side by side there, see `_codec_parallel`; a clip with fewer tiles than
    workers is cut into one per worker, see `_tile_counts`).
    """

    def __init__(self, config: PeAudioEncoderConfig):
        super().__init__()
        dac = config.dac_config
        self.dac_encoder = PeAudioDacEncoder(dac)
        self.bottleneck = Conv1d(dac.hidden_size, dac.codebook_dim, 1)
        self.data_proj = nn.Linear(dac.codebook_dim, config.hidden_size)
        self.hop_length = dac.hop_length
        self.halo = receptive_halo(dac)

    def codec(
        self, input_values: mx.array, lengths: mx.array | None, capture: dict | None = None
    ) -> mx.array:
        """(B, N) samples -> (B, N / hop, codebook_dim) codec features (zero past each row's frames).

        `capture` records the codec's stages of untiled rows, zero-padded to the batch's longest.
        """
        hop = self.hop_length
        B, N = input_values.shape
        n_frames = N // hop
        valid = [n_frames] * B if lengths is None else (np.array(lengths) // hop).tolist()
        split = capture is None and parallel.can_split()
        # (row, first frame, end frame, first kept frame, end kept frame) of each codec call.
        pieces: list[tuple[int, int, int, int, int]] = []
        for b, (frames, n) in enumerate(zip(valid, self._tile_counts(valid, split), strict=True)):
            if n == 1:
                pieces.append((b, 0, frames, 0, frames))
                continue
            size = -(-frames // n)  # tiles of equal length (the last shorter), not a short remainder
            for f0 in range(0, frames, size):
                f1 = min(frames, f0 + size)
                pieces.append((b, max(0, f0 - self.halo), min(frames, f1 + self.halo), f0, f1))
        if split and len(pieces) > 1:
            outs = self._codec_parallel(input_values, pieces)
        else:
            outs = []
            stages: list[dict | None] = []
            for piece in pieces:
                whole = piece[1:3] == piece[3:5]
                cap = {} if capture is not None and whole else None
                outs.append(self._piece(input_values, piece, cap))
                stages.append(cap)
            if capture is not None and all(s is not None for s in stages):
                for name in stages[0]:
                    longest = max(s[name].shape[1] for s in stages)
                    capture[name] = mx.concatenate([_pad_frames(s[name], longest) for s in stages])
        rows = []
        for b in range(B):
            parts = [out for piece, out in zip(pieces, outs, strict=True) if piece[0] == b]
            rows.append(_pad_frames(parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1), n_frames))
        return rows[0] if B == 1 else mx.concatenate(rows)

    def _tile_counts(self, valid: list[int], split: bool) -> list[int]:
        """Codec calls per row: one up to `TILE_FRAMES` (and its halos), else tiles of at most that many.

        When the calls run side by side (`split`) and there are fewer than workers, the rows are cut
        further so that every worker has one (a 3-s clip: two tiles, 2 x 12 frames of halo on 75, on two
        cores), down to tiles of `2 * halo` frames, below which the halos would more than double the work.
        """
        counts = [1 if f <= TILE_FRAMES + 2 * self.halo else -(-f // TILE_FRAMES) for f in valid]
        workers = parallel.worker_count() if split else 1
        if sum(counts) >= workers:
            return counts
        want = -(-workers // len(valid))
        return [max(c, min(want, f // max(1, 2 * self.halo))) for c, f in zip(counts, valid, strict=True)]

    def _codec_parallel(
        self, input_values: mx.array, pieces: list[tuple[int, int, int, int, int]]
    ) -> list[mx.array]:
        """The codec calls of `pieces` side by side on the CPU workers, each evaluated.

        MLX runs a stream's elementwise work on one thread and OpenBLAS is held to one thread per worker,
        so one codec call uses one core; the tiles are independent (halos), so they run on all cores.
        Same operations per tile as the sequential path: the same numbers.
        """
        # Workers cannot run nodes queued on this thread's stream: inputs and weights evaluated here.
        mx.eval(input_values, self.dac_encoder.parameters(), self.bottleneck.parameters())

        def tile(piece: tuple[int, int, int, int, int]) -> mx.array:
            with parallel.graph_lock:
                return self._piece(input_values, piece)

        return parallel.map_blocks(tile, pieces)

    def _piece(
        self, input_values: mx.array, piece: tuple[int, int, int, int, int], capture: dict | None = None
    ) -> mx.array:
        """One codec call: row b's frames [lo, hi) of samples, cut back to the kept frames [f0, f1)."""
        b, lo, hi, f0, f1 = piece
        hop = self.hop_length
        x = input_values[b : b + 1, lo * hop : hi * hop, None]
        return self.bottleneck(self.dac_encoder(x, capture))[:, f0 - lo : f1 - lo]

    def __call__(
        self, input_values: mx.array, lengths: mx.array | None, capture: dict | None = None
    ) -> tuple[mx.array, mx.array | None]:
        """(B, N) samples -> (B, N / hop, hidden) tokens and the valid frames per row."""
        codec = self.codec(input_values, lengths, capture)
        frames = None if lengths is None else lengths // self.hop_length
        tokens = self.data_proj(codec)
        if capture is not None:
            capture["codec_features"] = codec
            capture["embedder"] = tokens
        return tokens, frames


def length_mask(lengths: mx.array | None, n: int) -> mx.array | None:
    """(B, n, 1) float32 ones where position < length, zeros past it; None (no masking) without lengths."""
    if lengths is None:
        return None
    return (mx.arange(n)[None, :] < lengths[:, None]).astype(mx.float32)[..., None]


def _pad_frames(x: mx.array, n: int) -> mx.array:
    """(1, t, C) zero-padded to (1, n, C) along time."""
    return x if x.shape[1] == n else mx.pad(x, [(0, 0), (0, n - x.shape[1]), (0, 0)])


class PeAudioMaskedGroupNorm(nn.Module):
    """GroupNorm with one group (statistics over all channels and valid frames), affine, eps 1e-5."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.weight = mx.ones((channels,))
        self.bias = mx.zeros((channels,))
        self.eps = eps

    def __call__(self, x: mx.array, mask: mx.array | None) -> mx.array:
        x32 = x.astype(mx.float32)
        if mask is None:
            mean = mx.mean(x32, axis=(1, 2), keepdims=True)
            var = mx.mean(mx.square(x32 - mean), axis=(1, 2), keepdims=True)
            return ((x32 - mean) * mx.rsqrt(var + self.eps) * self.weight + self.bias).astype(x.dtype)
        count = mx.sum(mask, axis=(1, 2), keepdims=True) * x.shape[-1]
        mean = mx.sum(x32 * mask, axis=(1, 2), keepdims=True) / count
        var = mx.sum(mx.square((x32 - mean) * mask), axis=(1, 2), keepdims=True) / count
        out = (x32 - mean) * mx.rsqrt(var + self.eps) * self.weight + self.bias
        return (out * mask).astype(x.dtype)


class PeAudioConvBlock1d(nn.Module):
    def __init__(self, config: PeAudioEncoderConfig):
        super().__init__()
        self.groupnorm = PeAudioMaskedGroupNorm(config.hidden_size)
        self.project = Conv1d(config.hidden_size, config.hidden_size, 3, padding=1)

    def __call__(self, x: mx.array, mask: mx.array | None) -> mx.array:
        return self.project(nn.silu(self.groupnorm(x, mask)))


class PeAudioResnetBlock1d(nn.Module):
    def __init__(self, config: PeAudioEncoderConfig):
        super().__init__()
        self.block1 = PeAudioConvBlock1d(config)
        self.block2 = PeAudioConvBlock1d(config)

    def __call__(self, x: mx.array, mask: mx.array | None) -> mx.array:
        return x + self.block2(self.block1(x, mask), mask)


class PeAudioEncoderPatchEmbedder(nn.Module):
    def __init__(self, config: PeAudioEncoderConfig):
        super().__init__()
        self.resnet_block = PeAudioResnetBlock1d(config)
        self.class_embedding = mx.zeros((1, 1, config.hidden_size))

    def __call__(self, tokens: mx.array, frames: mx.array | None) -> tuple[mx.array, mx.array | None]:
        """Prepend the class token; returns the states and the valid positions per row (class token in)."""
        # The codec side may be float32 in a half-precision model (model.KEEP_FLOAT32): join in this dtype.
        tokens = tokens.astype(self.class_embedding.dtype)
        cls = mx.broadcast_to(self.class_embedding, (tokens.shape[0], 1, tokens.shape[2]))
        x = mx.concatenate([cls, tokens], axis=1)
        positions = None if frames is None else frames + 1
        return self.resnet_block(x, length_mask(positions, x.shape[1])), positions


class PeAudioEncoderAttention(nn.Module):
    def __init__(self, config: PeAudioEncoderConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        # Over each head's width only (as transformers' q_norm/k_norm).
        self.q_norm = nn.RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def __call__(self, x: mx.array, rope: tuple[mx.array, mx.array], mask: mx.array | None) -> mx.array:
        B, n, _ = x.shape

        def heads(t: mx.array, count: int) -> mx.array:
            return t.reshape(B, n, count, self.head_dim)

        q = rms_norm(self.q_norm, heads(self.q_proj(x), self.num_heads)).transpose(0, 2, 1, 3)
        k = rms_norm(self.k_norm, heads(self.k_proj(x), self.num_kv_heads)).transpose(0, 2, 1, 3)
        v = heads(self.v_proj(x), self.num_kv_heads).transpose(0, 2, 1, 3)
        q, k = rope_interleaved(q, *rope), rope_interleaved(k, *rope)
        if self.num_kv_heads != self.num_heads:  # grouped-query: head h reads kv head h // group
            group = self.num_heads // self.num_kv_heads
            k, v = mx.repeat(k, group, axis=1), mx.repeat(v, group, axis=1)
        if mask is not None and mask.dtype != q.dtype:
            # mx.fast's attention wants the output dtype; -1e9 is -inf in float16, harmless as the class
            # token keeps every row some real key.
            mask = mask.astype(q.dtype)
        out = kernels.attention(q, k, v, self.scale, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, n, -1))


class PeAudioEncoderMLP(nn.Module):
    def __init__(self, config: PeAudioEncoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = activation(config.hidden_act)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class PeAudioEncoderLayer(nn.Module):
    def __init__(self, config: PeAudioEncoderConfig):
        super().__init__()
        self.self_attn = PeAudioEncoderAttention(config)
        self.mlp = PeAudioEncoderMLP(config)
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def __call__(self, x: mx.array, rope: tuple[mx.array, mx.array], mask: mx.array | None) -> mx.array:
        x = x + self.self_attn(rms_norm(self.input_layernorm, x), rope, mask)
        return x + self.mlp(rms_norm(self.post_attention_layernorm, x))


@dataclass
class PeAudioEncoderOutput:
    """`pooler_output` (B, hidden): the class token; `last_hidden_state` (B, T, hidden): the frames;
    `frames` (B,) valid frames per row (None when every row is full length)."""

    pooler_output: mx.array
    last_hidden_state: mx.array
    frames: mx.array | None


class PeAudioEncoder(nn.Module):
    """(B, N) 48-kHz samples (N a multiple of the hop) -> pooled state and one state per frame."""

    def __init__(self, config: PeAudioEncoderConfig):
        super().__init__()
        self.config = config
        self.embedder = PeAudioEncoderEmbedder(config)
        self.patch_embedder = PeAudioEncoderPatchEmbedder(config)
        self.layers = [PeAudioEncoderLayer(config) for _ in range(config.num_hidden_layers)]
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.output = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def __call__(
        self, input_values: mx.array, lengths: mx.array | None = None, capture: dict | None = None
    ) -> PeAudioEncoderOutput:
        tokens, frames = self.embedder(input_values, lengths, capture)
        x, positions = self.patch_embedder(tokens, frames)
        if capture is not None:
            capture["patch_embedder"] = x
        n = x.shape[1]
        rope = rope_tables(n, self.config.head_dim, self.config.rope_theta)
        # (B, 1, 1, n): padded keys masked for every head and query.
        mask = None
        if positions is not None:
            mask = mx.where(mx.arange(n)[None, :] < positions[:, None], 0.0, MASK_VALUE)[:, None, None, :]
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask)
            if capture is not None:
                capture[f"layers.{i}"] = x
        x = self.output(rms_norm(self.norm, x))
        if capture is not None:
            capture["output"] = x
        return PeAudioEncoderOutput(pooler_output=x[:, 0], last_hidden_state=x[:, 1:], frames=frames)


__all__ = ["MASK_VALUE", "PeAudioEncoder", "PeAudioEncoderOutput", "rms_norm", "rope_tables"]
