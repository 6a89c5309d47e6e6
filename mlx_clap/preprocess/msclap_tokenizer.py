"""msclap's text preprocessing (`CLAPWrapper.preprocess_text`) on the `tokenizers` package, no torch.

- GPT-2 (2023): `" <|endoftext|>"` is appended to each text; `!` (id 0) is registered as the special pad
  token exactly as `tokenizer.add_special_tokens({'pad_token': '!'})` does, so a literal `!` is split out
  as its own token (and then counts as padding in the pooling index, see `gpt2.last_token_index`).
- BERT (2022): `[CLS] ... [SEP]`, token type ids, pad id 0.
- Both pad to `text_len` (77 / 100) and **do not truncate**: msclap calls
  `encode_plus(max_length=text_len, padding='max_length')` without `truncation`, and transformers only
  turns `max_length` into truncation when `padding` is False. A longer text therefore keeps all its
  tokens (the batch is padded to the longest), up to the text model's position limit, past which msclap
  fails and this raises a ValueError.

The converter writes the tokenizer as a `tokenizer.json` (the HF fast tokenizer's own backend file).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

TOKENIZER_NAME = "tokenizer.json"
GPT2_SUFFIX = " <|endoftext|>"
GPT2_PAD = "!"


class MsClapTokenizer:
    """Callable: list of texts -> dict of (B, text_len) int64 arrays (`input_ids`, `attention_mask`, ...)."""

    def __init__(self, tokenizer, text_model: str, text_len: int, max_positions: int | None = None):
        from tokenizers import AddedToken

        self.text_model = text_model
        self.text_len = int(text_len)
        self.max_positions = max_positions
        self.is_gpt2 = "gpt" in text_model
        tok = tokenizer
        if self.is_gpt2:
            # Idempotent when the file already has it (files written by the converter do).
            tok.add_special_tokens([AddedToken(GPT2_PAD, special=True, normalized=False)])
            pad_token = GPT2_PAD
        else:
            pad_token = "[PAD]"
        pad_id = tok.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"tokenizer has no pad token {pad_token!r}")
        if self.is_gpt2 and pad_id != 0:
            raise ValueError(f"GPT-2 tokenizer maps {GPT2_PAD!r} to id {pad_id}; msclap assumes 0")
        tok.no_padding()
        tok.no_truncation()
        self._tok = tok
        self.pad_id = pad_id

    @classmethod
    def from_folder(
        cls, folder: Path, text_model: str, text_len: int, max_positions: int | None = None
    ) -> MsClapTokenizer:
        from tokenizers import Tokenizer

        path = Path(folder) / TOKENIZER_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: no {TOKENIZER_NAME}")
        return cls(Tokenizer.from_file(str(path)), text_model, text_len, max_positions)

    @property
    def keys(self) -> tuple[str, ...]:
        """The inputs msclap passes to the text model (`CLAPWrapper.token_keys`)."""
        if self.is_gpt2:
            return ("input_ids", "attention_mask")
        return ("input_ids", "token_type_ids", "attention_mask")

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"text item {i} is {type(t).__name__}, not str")
        if self.is_gpt2:
            texts = [t + GPT2_SUFFIX for t in texts]
        encs = self._tok.encode_batch(texts, add_special_tokens=True)
        longest = max((len(e.ids) for e in encs), default=0)
        if self.max_positions is not None and longest > self.max_positions:
            i = max(range(len(encs)), key=lambda j: len(encs[j].ids))
            raise ValueError(
                f"text item {i} has {longest} tokens; the {self.text_model} text model takes at most "
                f"{self.max_positions} (msclap does not truncate)"
            )
        width = max(self.text_len, longest)
        n = len(texts)
        out = {
            "input_ids": np.full((n, width), self.pad_id, dtype=np.int64),
            "attention_mask": np.zeros((n, width), dtype=np.int64),
        }
        if not self.is_gpt2:
            out["token_type_ids"] = np.zeros((n, width), dtype=np.int64)
        for row, enc in enumerate(encs):
            k = len(enc.ids)
            out["input_ids"][row, :k] = enc.ids
            out["attention_mask"][row, :k] = enc.attention_mask
            if not self.is_gpt2:
                out["token_type_ids"][row, :k] = enc.type_ids
        return out
