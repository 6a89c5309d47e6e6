"""The RoBERTa text tower of LAION CLAP (HF `ClapTextModel`), in MLX.

Attribute names equal the HF state-dict keys under `text_model.*` (docs/numerics.md §6.2), so converted
weights load by name. Semantics follow docs/numerics.md §5.1:

- position ids = cumsum(ids != pad) * (ids != pad) + pad: real tokens start at pad + 1 = 2, pads get 1;
- token types are all zero (type_vocab_size 1);
- post-LN (BERT-style) blocks, exact GELU, additive attention mask on padded keys;
- pooler_output = tanh(dense(h[:, 0])), the pooler on `<s>` (not the raw CLS state, not a mean).

In half precision the weights and matmuls run in the model dtype, while LayerNorm and the attention
softmax run in float32 (STYLE.md: keep numerics in float32 where precision matters).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from mlx_clap.config import ClapTextConfig
from mlx_clap.models.layers import layer_norm
from mlx_clap.ops import kernels

# Added to the scores of padded keys. Finite, so a row never turns into NaN; exp() of it is exactly 0
# in float32, as with HF's finfo.min.
MASK_VALUE = -1e9

_ACTIVATIONS = {
    "gelu": kernels.gelu,  # exact (erf) GELU, as torch's ACT2FN["gelu"]; nn.gelu off the CPU
    "relu": nn.relu,
    "gelu_new": nn.gelu_approx,
    "gelu_pytorch_tanh": nn.gelu_approx,
}


def _activation(name: str):
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported text hidden_act {name!r}; known: {', '.join(_ACTIVATIONS)}") from None


def roberta_position_ids(input_ids: mx.array, pad_token_id: int) -> mx.array:
    """RoBERTa positions: cumsum(ids != pad) * (ids != pad) + pad (HF create_position_ids_from_input_ids)."""
    not_pad = (input_ids != pad_token_id).astype(mx.int32)
    return mx.cumsum(not_pad, axis=1) * not_pad + pad_token_id


@dataclass
class ClapTextOutput:
    """What `ClapTextModel.forward` returns.

    `hidden_states` (when requested) holds the embeddings output, then each layer's output, as HF's
    `output_hidden_states=True` does: num_hidden_layers + 1 arrays of shape (B, L, hidden).
    """

    last_hidden_state: mx.array
    pooler_output: mx.array
    hidden_states: list[mx.array] = field(default_factory=list)


class ClapTextEmbeddings(nn.Module):
    def __init__(self, config: ClapTextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pad_token_id = config.pad_token_id

    def __call__(self, input_ids: mx.array) -> mx.array:
        position_ids = roberta_position_ids(input_ids, self.pad_token_id)
        # Token types are all zero (HF gathers its all-zero buffer), so row 0 is added everywhere.
        # Summation order as HF: (word + token_type) + position, then LayerNorm.
        x = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0]
        x = x + self.position_embeddings(position_ids)
        return layer_norm(self.LayerNorm, x)


class ClapTextSelfAttention(nn.Module):
    def __init__(self, config: ClapTextConfig):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"text hidden_size {config.hidden_size} is not a multiple of "
                f"num_attention_heads {config.num_attention_heads}"
            )
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)

    def __call__(
        self, x: mx.array, additive_mask: mx.array | None, queries: mx.array | None = None
    ) -> mx.array:
        """Attention of `queries` (default: every position of x) over the keys and values of x."""
        B = x.shape[0]
        queries = x if queries is None else queries

        def heads(t: mx.array) -> mx.array:
            return t.reshape(B, t.shape[1], self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

        q, k, v = heads(self.query(queries)), heads(self.key(x)), heads(self.value(x))
        # (q k^T) * scale as HF's eager path; scores, mask and softmax in float32 even in half mode.
        scores = (q @ k.transpose(0, 1, 3, 2)).astype(mx.float32) * self.scale
        if additive_mask is not None:
            scores = scores + additive_mask
        probs = mx.softmax(scores, axis=-1).astype(v.dtype)
        return (probs @ v).transpose(0, 2, 1, 3).reshape(B, queries.shape[1], -1)


class ClapTextSelfOutput(nn.Module):
    def __init__(self, config: ClapTextConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, x: mx.array, residual: mx.array) -> mx.array:
        return layer_norm(self.LayerNorm, self.dense(x) + residual)


class ClapTextAttention(nn.Module):
    def __init__(self, config: ClapTextConfig):
        super().__init__()
        # `self.self` mirrors the HF key `attention.self.{query,key,value}`.
        self.self = ClapTextSelfAttention(config)
        self.output = ClapTextSelfOutput(config)

    def __call__(
        self, x: mx.array, additive_mask: mx.array | None, queries: mx.array | None = None
    ) -> mx.array:
        return self.output(self.self(x, additive_mask, queries), x if queries is None else queries)


class ClapTextIntermediate(nn.Module):
    def __init__(self, config: ClapTextConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = _activation(config.hidden_act)

    def __call__(self, x: mx.array) -> mx.array:
        return self.act(self.dense(x))


class ClapTextOutputLayer(nn.Module):
    """HF `ClapTextOutput`: dense back to hidden, residual, post-LN."""

    def __init__(self, config: ClapTextConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, x: mx.array, residual: mx.array) -> mx.array:
        return layer_norm(self.LayerNorm, self.dense(x) + residual)


class ClapTextLayer(nn.Module):
    def __init__(self, config: ClapTextConfig):
        super().__init__()
        self.attention = ClapTextAttention(config)
        self.intermediate = ClapTextIntermediate(config)
        self.output = ClapTextOutputLayer(config)

    def __call__(
        self, x: mx.array, additive_mask: mx.array | None, queries: mx.array | None = None
    ) -> mx.array:
        """The layer's output at the positions of `queries` (default: every position of x).

        Positions are independent after attention, so the output at a subset needs the attention of
        that subset only, over all of x's keys and values, and the feed-forward of that subset."""
        h = self.attention(x, additive_mask, queries)
        return self.output(self.intermediate(h), h)


class ClapTextEncoder(nn.Module):
    def __init__(self, config: ClapTextConfig):
        super().__init__()
        self.layer = [ClapTextLayer(config) for _ in range(config.num_hidden_layers)]


class ClapTextPooler(nn.Module):
    def __init__(self, config: ClapTextConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def __call__(self, hidden: mx.array) -> mx.array:
        return mx.tanh(self.dense(hidden[:, 0]))


class ClapTextModel(nn.Module):
    """RoBERTa encoder + pooler; `model(input_ids, attention_mask)` returns pooler_output (B, hidden)."""

    def __init__(self, config: ClapTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = ClapTextEmbeddings(config)
        self.encoder = ClapTextEncoder(config)
        self.pooler = ClapTextPooler(config)

    @property
    def max_tokens(self) -> int:
        """Longest sequence the position table allows: positions run from pad + 1 to L + pad."""
        return self.config.max_position_embeddings - self.config.pad_token_id - 1

    def forward(
        self,
        input_ids: mx.array,
        attention_mask: mx.array | None = None,
        output_hidden_states: bool = False,
    ) -> ClapTextOutput:
        """Full forward: last hidden state, pooler output and (optionally) every hidden state.

        input_ids: (B, L) integer token ids; attention_mask: (B, L), nonzero for real tokens
        (None means all ones, as HF).
        """
        input_ids, additive = self._checked_inputs(input_ids, attention_mask)
        h = self.embeddings(input_ids)
        states = [h] if output_hidden_states else []
        for layer in self.encoder.layer:
            h = layer(h, additive)
            if output_hidden_states:
                states.append(h)
        return ClapTextOutput(last_hidden_state=h, pooler_output=self.pooler(h), hidden_states=states)

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None) -> mx.array:
        """pooler_output (B, hidden) = tanh(dense(h[:, 0])) for token ids (B, L) and mask (B, L).

        The pooler reads position 0 only, so the last layer runs for position 0 alone (its queries,
        output and feed-forward; keys and values still come from every position): the same numbers as
        `forward(...).pooler_output`, with 1/num_hidden_layers less work per extra token."""
        input_ids, additive = self._checked_inputs(input_ids, attention_mask)
        h = self.embeddings(input_ids)
        *layers, last = self.encoder.layer
        for layer in layers:
            h = layer(h, additive)
        return self.pooler(last(h, additive, queries=h[:, :1]))

    def _checked_inputs(
        self, input_ids: mx.array, attention_mask: mx.array | None
    ) -> tuple[mx.array, mx.array | None]:
        """input_ids checked against the model, and the additive key mask (None without a mask)."""
        input_ids = mx.array(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length); got shape {tuple(input_ids.shape)}")
        if not mx.issubdtype(input_ids.dtype, mx.integer):
            raise TypeError(f"input_ids must be integers; got {input_ids.dtype}")
        # MLX gathers do not bounds-check: an id outside the table would read garbage, not raise.
        if input_ids.size and mx.any((input_ids < 0) | (input_ids >= self.config.vocab_size)).item():
            raise ValueError(f"input_ids hold ids outside the vocabulary [0, {self.config.vocab_size})")
        if input_ids.shape[1] > self.max_tokens:
            raise ValueError(
                f"{input_ids.shape[1]} tokens is more than the text model's {self.max_tokens} positions"
            )
        if attention_mask is None:
            return input_ids, None
        attention_mask = mx.array(attention_mask)
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                f"{tuple(input_ids.shape)}"
            )
        # (B, 1, 1, L): masks padded keys for every head and query.
        return input_ids, mx.where(attention_mask[:, None, None, :] != 0, 0.0, MASK_VALUE).astype(mx.float32)
