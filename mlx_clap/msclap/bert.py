"""BERT text tower of msclap 2022 (transformers `BertModel`, bert-base-uncased), in MLX.

Attribute names equal the `caption_encoder.base.` state-dict keys (`embeddings.word_embeddings`,
`encoder.layer.{k}.attention.self.query`, ...). msclap pools the raw `[CLS]` hidden state
(`last_hidden_state[:, 0]`), so the pooler is not built and its weights are dropped at conversion.
Post-LN blocks, exact GELU, LayerNorm eps 1e-12, absolute positions 0..L-1, token types as given.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .config import BertTextConfig

MASK_VALUE = -3.4028234663852886e38


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertTextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, input_ids: mx.array, token_type_ids: mx.array) -> mx.array:
        length = input_ids.shape[1]
        x = (
            self.word_embeddings(input_ids)
            + self.token_type_embeddings(token_type_ids)
            + self.position_embeddings(mx.arange(length))[None]
        )
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertTextConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        b, length, d = x.shape

        def heads(t: mx.array) -> mx.array:
            return t.reshape(b, length, self.num_heads, d // self.num_heads).transpose(0, 2, 1, 3)

        scale = 1.0 / math.sqrt(d // self.num_heads)
        out = mx.fast.scaled_dot_product_attention(
            heads(self.query(x)), heads(self.key(x)), heads(self.value(x)), scale=scale, mask=mask
        )
        return out.transpose(0, 2, 1, 3).reshape(b, length, d)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertTextConfig, in_dim: int):
        super().__init__()
        self.dense = nn.Linear(in_dim, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, h: mx.array, residual: mx.array) -> mx.array:
        return self.LayerNorm(self.dense(h) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertTextConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config, config.hidden_size)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertTextConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def __call__(self, x: mx.array) -> mx.array:
        return nn.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, config: BertTextConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertSelfOutput(config, config.intermediate_size)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        a = self.attention(x, mask)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    def __init__(self, config: BertTextConfig):
        super().__init__()
        self.layer = [BertLayer(config) for _ in range(config.num_hidden_layers)]


class BertModel(nn.Module):
    """Token ids, token types and mask (B, L) -> last hidden state (B, L, hidden)."""

    def __init__(self, config: BertTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    def __call__(
        self,
        input_ids: mx.array,
        attention_mask: mx.array | None = None,
        token_type_ids: mx.array | None = None,
        capture: dict | None = None,
    ) -> mx.array:
        b, length = input_ids.shape
        if length > self.config.max_position_embeddings:
            raise ValueError(f"BERT takes at most {self.config.max_position_embeddings} tokens, got {length}")
        if token_type_ids is None:
            token_type_ids = mx.zeros_like(input_ids)
        if attention_mask is None:
            attention_mask = mx.ones_like(input_ids)
        mask = mx.where(attention_mask[:, None, None, :] != 0, 0.0, MASK_VALUE).astype(mx.float32)
        x = self.embeddings(input_ids, token_type_ids)
        if capture is not None:
            capture["embeddings"] = x
        for i, layer in enumerate(self.encoder.layer):
            x = layer(x, mask.astype(x.dtype))
            if capture is not None:
                capture[f"encoder.layer.{i}"] = x
        return x
