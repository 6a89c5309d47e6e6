"""The ModernBERT text tower of PE-Audio (transformers `ModernBertModel`), in MLX.

Attribute names equal the checkpoint keys under `text_model.*`: `embeddings.{tok_embeddings,norm}`,
`layers.{i}.{attn_norm,attn.Wqkv,attn.Wo,mlp_norm,mlp.Wi,mlp.Wo}`, `final_norm`. Semantics:

- embeddings: token embedding -> LayerNorm (no bias by default); no position embeddings;
- pre-norm layers; layer 0 has no attention norm (transformers' Identity: the embedding norm precedes it);
- attention: fused Wqkv, rotary embeddings of the half-split kind (rotate_half), theta 160000 in the
  global layers and 10000 in the sliding ones; sliding layers see keys at most local_attention // 2 = 64
  positions away (inclusive); padded keys are masked;
- MLP: Wi to 2 x intermediate, split into (input, gate), Wo(act(input) * gate), exact GELU;
- final_norm (LayerNorm) after the last layer. PE-Audio's text vector is the final state of token 0
  ([CLS]): transformers reads `hidden_states[-1][:, 0]`, which is `last_hidden_state` (final_norm applied).

LayerNorm and the attention softmax run in float32 in half precision (STYLE.md).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_clap.models.layers import layer_norm
from mlx_clap.models.pe_audio.config import ModernBertConfig
from mlx_clap.models.pe_audio.encoder import MASK_VALUE, activation
from mlx_clap.ops import kernels


def _norm(norm: nn.LayerNorm, x: mx.array) -> mx.array:
    """A LayerNorm with or without bias, in float32."""
    if "bias" in norm:
        return layer_norm(norm, x)
    out = mx.fast.layer_norm(x.astype(mx.float32), norm.weight.astype(mx.float32), None, norm.eps)
    return out.astype(x.dtype)


def rope_half_tables(n: int, dim: int, theta: float) -> tuple[mx.array, mx.array]:
    """(cos, sin), each (n, dim), as transformers' rotary embedding: angles float32, cat(freqs, freqs)."""
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)
    angles = (np.arange(n, dtype=np.float32)[:, None] * inv_freq[None, :]).astype(np.float64)
    angles = np.concatenate([angles, angles], axis=-1)
    return mx.array(np.cos(angles).astype(np.float32)), mx.array(np.sin(angles).astype(np.float32))


def rope_half(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """x * cos + rotate_half(x) * sin in float32, rotate_half(x) = cat(-x[d/2:], x[:d/2])."""
    x32 = x.astype(mx.float32)
    half = x.shape[-1] // 2
    rotated = mx.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


class ModernBertEmbeddings(nn.Module):
    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)

    def __call__(self, input_ids: mx.array) -> mx.array:
        return _norm(self.norm, self.tok_embeddings(input_ids))


class ModernBertAttention(nn.Module):
    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.Wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.Wo = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)

    def __call__(self, x: mx.array, rope: tuple[mx.array, mx.array], mask: mx.array | None) -> mx.array:
        B, n, _ = x.shape
        # Wqkv's output is (3, heads, head_dim) per token, as transformers' view(..., 3, -1, head_dim).
        qkv = self.Wqkv(x).reshape(B, n, 3, self.num_heads, self.head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q, k = rope_half(q, *rope), rope_half(k, *rope)
        if mask is not None and mask.dtype != q.dtype:
            mask = mask.astype(q.dtype)  # mx.fast's attention wants the output dtype (-1e9: -inf in float16)
        out = kernels.attention(q, k, v, self.head_dim**-0.5, mask)
        return self.Wo(out.transpose(0, 2, 1, 3).reshape(B, n, -1))


class ModernBertMLP(nn.Module):
    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.Wi = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.Wo = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act = activation(config.hidden_activation)

    def __call__(self, x: mx.array) -> mx.array:
        inputs, gate = mx.split(self.Wi(x), 2, axis=-1)
        return self.Wo(self.act(inputs) * gate)


class ModernBertEncoderLayer(nn.Module):
    def __init__(self, config: ModernBertConfig, index: int):
        super().__init__()
        if index > 0:  # layer 0's attention norm is an Identity in transformers: no parameters
            self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)
        self.attn = ModernBertAttention(config)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)
        self.mlp = ModernBertMLP(config)
        self.sliding = config.layer_types[index] == "sliding_attention"

    def __call__(self, x: mx.array, rope: tuple[mx.array, mx.array], mask: mx.array | None) -> mx.array:
        h = _norm(self.attn_norm, x) if "attn_norm" in self else x
        x = x + self.attn(h, rope, mask)
        return x + self.mlp(_norm(self.mlp_norm, x))


class ModernBertModel(nn.Module):
    """Token ids (B, L) and mask (B, L) -> last_hidden_state (B, L, hidden), final_norm applied."""

    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.config = config
        self.embeddings = ModernBertEmbeddings(config)
        self.layers = [ModernBertEncoderLayer(config, i) for i in range(config.num_hidden_layers)]
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)

    def __call__(
        self, input_ids: mx.array, attention_mask: mx.array | None = None, capture: dict | None = None
    ) -> mx.array:
        input_ids, attention_mask = self._checked_inputs(input_ids, attention_mask)
        cfg = self.config
        B, n = input_ids.shape
        x = self.embeddings(input_ids)
        if capture is not None:
            capture["embeddings"] = x
        ropes = {
            False: rope_half_tables(n, cfg.head_dim, cfg.global_rope_theta),
            True: rope_half_tables(n, cfg.head_dim, cfg.local_rope_theta),
        }
        keys = None if attention_mask is None else attention_mask[:, None, None, :] != 0  # (B, 1, 1, n)
        masks = {False: _additive(keys), True: _additive(keys)}
        if n > cfg.sliding_window + 1:  # a window narrower than the text: mask by distance too
            pos = mx.arange(n)
            near = (mx.abs(pos[:, None] - pos[None, :]) <= cfg.sliding_window)[None, None]  # (1, 1, n, n)
            if keys is not None:
                # Padded queries (never read) keep every real key, so no row is fully masked: with an
                # infinite mask value (float16) such a row would be NaN, and NaN values leak into real
                # rows through the product with zero attention weights.
                padded_query = (attention_mask == 0)[:, None, :, None]
                near = keys & (near | padded_query)
            masks[True] = _additive(near)
        for i, layer in enumerate(self.layers):
            x = layer(x, ropes[layer.sliding], masks[layer.sliding])
            if capture is not None:
                capture[f"layers.{i}"] = x
        x = _norm(self.final_norm, x)
        if capture is not None:
            capture["final_norm"] = x
        return x

    def _checked_inputs(
        self, input_ids: mx.array, attention_mask: mx.array | None
    ) -> tuple[mx.array, mx.array | None]:
        input_ids = mx.array(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length); got shape {tuple(input_ids.shape)}")
        if not mx.issubdtype(input_ids.dtype, mx.integer):
            raise TypeError(f"input_ids must be integers; got {input_ids.dtype}")
        # MLX gathers do not bounds-check: an id outside the table would read garbage, not raise.
        if input_ids.size and mx.any((input_ids < 0) | (input_ids >= self.config.vocab_size)).item():
            raise ValueError(f"input_ids hold ids outside the vocabulary [0, {self.config.vocab_size})")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"{input_ids.shape[1]} tokens is more than the text model's "
                f"{self.config.max_position_embeddings} positions"
            )
        if attention_mask is None:
            return input_ids, None
        attention_mask = mx.array(attention_mask)
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != "
                f"input_ids shape {tuple(input_ids.shape)}"
            )
        return input_ids, attention_mask


def _additive(allowed: mx.array | None) -> mx.array | None:
    """0 where attention is allowed, MASK_VALUE elsewhere (float32); None for no mask."""
    return None if allowed is None else mx.where(allowed, 0.0, MASK_VALUE).astype(mx.float32)


__all__ = ["ModernBertModel", "rope_half_tables"]
