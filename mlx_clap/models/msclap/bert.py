"""BERT text tower of msclap 2022 (transformers `BertModel`, bert-base-uncased), in MLX.

Attribute names equal the `caption_encoder.base.` state-dict keys (`embeddings.word_embeddings`,
`encoder.layer.{k}.attention.self.query`, ...). msclap pools the raw `[CLS]` hidden state
(`last_hidden_state[:, 0]`), so the pooler is not built and its weights are dropped at conversion.
Post-LN blocks, exact GELU, LayerNorm eps 1e-12, absolute positions 0..L-1, token types as given.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlx_clap.models.msclap.config import BertTextConfig
from mlx_clap.models.roberta import ClapTextEncoder

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


class BertModel(nn.Module):
    """Token ids, token types and mask (B, L) -> last hidden state (B, L, hidden)."""

    def __init__(self, config: BertTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        # BERT and RoBERTa share the post-LN encoder layer (same keys, exact GELU): one implementation.
        self.encoder = ClapTextEncoder(config)

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
            x = layer(x, mask)
            if capture is not None:
                capture[f"encoder.layer.{i}"] = x
        return x
