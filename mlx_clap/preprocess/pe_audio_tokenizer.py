"""PE-Audio's ModernBERT tokenizer, on the `tokenizers` package from the checkpoint's `tokenizer.json`.

ModernBERT's tokenizer (OLMo's byte-level BPE, 50368 entries including 83 unused ones, so that the table
is a multiple of 64) wraps a text as `[CLS] ... [SEP]` through its post-processor. The file must fit the
model: as many entries as the embedding table has rows, and a post-processor that starts with the
config's `cls_token_id` and ends with its `sep_token_id`; anything else is refused (`TokenizerError`).

No truncation by default (transformers' processor applies none); a text longer than the model's positions
is an error naming it, and `max_length` truncates (special tokens included, as transformers counts).
Batches are padded to their longest text with `pad_token_id` and a mask: padding is masked in the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from mlx_clap.models.pe_audio.config import ModernBertConfig
from mlx_clap.preprocess.tokenizer import TOKENIZER_FILE, TextTokenizer, TokenizerError, _check_texts


class PeAudioTokenizer(TextTokenizer):
    """Text -> (input_ids, attention_mask), both int32 (B, L), `[CLS] ... [SEP]` per text."""

    text_config: ModernBertConfig

    # The config is required here: a default ModernBERT-large would only hide a missing one.
    def __init__(self, tokenizer: Tokenizer, text_config: ModernBertConfig, source: str = ""):
        super().__init__(tokenizer, text_config, source)

    @property
    def max_tokens(self) -> int:
        return self.text_config.max_position_embeddings

    def _validate(self) -> None:
        cfg, where = self.text_config, self.source or "tokenizer"
        if self.vocab_size != cfg.vocab_size:
            raise TokenizerError(
                f"{where}: tokenizer has {self.vocab_size} tokens but the model's embedding table has "
                f"{cfg.vocab_size}; the tokenizer file does not belong to this model"
            )
        probe = self._tok.encode("a").ids
        if len(probe) < 3 or probe[0] != cfg.cls_token_id or probe[-1] != cfg.sep_token_id:
            raise TokenizerError(
                f"{where}: post-processing does not wrap text as [CLS] ... [SEP] with the model's ids "
                f"{cfg.cls_token_id} ... {cfg.sep_token_id} (got {probe})"
            )

    def encode(self, texts: Sequence[str] | str, max_length: int | None = None) -> list[list[int]]:
        """Token id lists with [CLS]/[SEP], truncated to `max_length` when given, not padded."""
        items = _check_texts(texts)
        if max_length is not None and not 2 <= max_length <= self.max_tokens:
            raise ValueError(f"max_length must be in [2, {self.max_tokens}], got {max_length}")
        ids = self._encode_batch(items, max_length)
        self._check_positions(ids, "pass max_length to truncate")
        return ids

    def __call__(
        self, texts: Sequence[str] | str, max_length: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), int32 (B, L), padded to the batch's longest text."""
        seqs = self.encode(texts, max_length=max_length)
        return self._pad(seqs, max((len(s) for s in seqs), default=0))


def load_pe_audio_tokenizer(folder: str | Path, text_config: ModernBertConfig) -> PeAudioTokenizer | None:
    """The folder's tokenizer.json as a PeAudioTokenizer, or None when the folder has none."""
    path = Path(folder) / TOKENIZER_FILE
    return PeAudioTokenizer.from_file(path, text_config) if path.is_file() else None


__all__ = ["PeAudioTokenizer", "load_pe_audio_tokenizer"]
