"""GPT-2 text tower of msclap 2023 (transformers `GPT2Model`), in MLX.

Attribute names equal the `caption_encoder.base.` state-dict keys (`wte`, `wpe`, `h.{k}.ln_1`,
`h.{k}.attn.c_attn`, ...). GPT-2's `Conv1D` stores weights as (in, out); the converter transposes them
to `nn.Linear`'s (out, in) and keeps `c_attn` fused (rows: q, k, v). The activation is `gelu_new`, the
tanh approximation (`nn.gelu_approx`); blocks are pre-LN with a final `ln_f`.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from mlx_clap.models.msclap.config import GPT2TextConfig

# The additive mask value for pads, as HF's `torch.finfo(float32).min` (not -inf: no NaN rows).
MASK_VALUE = -3.4028234663852886e38


class GPT2Attention(nn.Module):
    def __init__(self, config: GPT2TextConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        b, length, d = x.shape
        q, k, v = mx.split(self.c_attn(x), 3, axis=-1)

        def heads(t: mx.array) -> mx.array:
            return t.reshape(b, length, self.n_head, d // self.n_head).transpose(0, 2, 1, 3)

        scale = 1.0 / math.sqrt(d // self.n_head)
        out = mx.fast.scaled_dot_product_attention(heads(q), heads(k), heads(v), scale=scale, mask=mask)
        return self.c_proj(out.transpose(0, 2, 1, 3).reshape(b, length, d))


class GPT2MLP(nn.Module):
    def __init__(self, config: GPT2TextConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.intermediate_size)
        self.c_proj = nn.Linear(config.intermediate_size, config.n_embd)

    def __call__(self, x: mx.array) -> mx.array:
        return self.c_proj(nn.gelu_approx(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2TextConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    """Token ids (B, L) + attention mask (B, L) -> last hidden state (B, L, n_embd)."""

    def __init__(self, config: GPT2TextConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = [GPT2Block(config) for _ in range(config.n_layer)]
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    def __call__(
        self, input_ids: mx.array, attention_mask: mx.array | None = None, capture: dict | None = None
    ) -> mx.array:
        b, length = input_ids.shape
        if length > self.config.n_positions:
            raise ValueError(f"GPT-2 takes at most {self.config.n_positions} tokens, got {length}")
        # Causal mask plus padded keys, additive; position ids are 0..L-1 whatever the mask says.
        causal = mx.tril(mx.ones((length, length), dtype=mx.bool_))
        allowed = causal[None, None]
        if attention_mask is not None:
            allowed = mx.logical_and(allowed, (attention_mask != 0)[:, None, None, :])
        mask = mx.where(allowed, mx.array(0.0, mx.float32), mx.array(MASK_VALUE, mx.float32))
        x = self.wte(input_ids) + self.wpe(mx.arange(length))[None]
        if capture is not None:
            capture["embeddings"] = x
        for i, block in enumerate(self.h):
            x = block(x, mask.astype(x.dtype))
            if capture is not None:
                capture[f"h.{i}"] = x
        return self.ln_f(x)


def last_token_index(input_ids: mx.array) -> mx.array:
    """msclap's pooling index `count(ids != 0) - 1`.

    Id 0 is `!` in GPT-2's vocabulary, which msclap also uses as its pad token, so a literal `!` in the
    text counts as padding and moves the index earlier. Reproduced as is, for parity.
    """
    return (input_ids != 0).astype(mx.int32).sum(axis=-1) - 1
