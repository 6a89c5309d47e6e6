"""RoBERTa byte-level BPE tokenizer for CLAP, on the `tokenizers` package (no torch, no transformers).

Built from a hub `tokenizer.json`, or from `vocab.json` + `merges.txt` set up as transformers'
`RobertaTokenizer` does (ByteLevel pre-tokenizer without prefix space, RoBERTa post-processing
`<s> ... </s>`, `<mask>` with lstrip). docs/numerics.md §5.1:

- LAION tokenizes with `padding="max_length", truncation=True, max_length=77`;
- HF's processor does not truncate at 77 (model_max_length 512) and pads to the longest.

Padding is masked in the model, so padding a batch to its own longest sequence (the default here)
gives the same embeddings as padding to 77, at a fraction of the cost for short texts.

`TextTokenizer` is the part every text tower's tokenizer shares (PE-Audio's `PeAudioTokenizer` too); each
subclass keeps its own checks and truncation policy.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from mlx_clap.config import ClapTextConfig

TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
TOKENIZER_FILES = (TOKENIZER_FILE, VOCAB_FILE, MERGES_FILE)

BOS, PAD, EOS, UNK, MASK = "<s>", "<pad>", "</s>", "<unk>", "<mask>"
POLICIES = ("laion", "hf")


class TokenizerError(ValueError):
    """A tokenizer that does not fit the model (wrong or empty vocabulary, wrong special tokens)."""


def _check_texts(texts: Sequence[str] | str) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if texts is None:
        raise TypeError("texts is None; pass a list of strings")
    try:
        items = list(texts)
    except TypeError:
        raise TypeError(f"texts must be a list of strings, not {type(texts).__name__}") from None
    for i, t in enumerate(items):
        if not isinstance(t, str):
            raise TypeError(f"text item {i} is {type(t).__name__}, not str")
    return items


_Tokenizer = TypeVar("_Tokenizer", bound="TextTokenizer")


class TextTokenizer:
    """What every text tower's tokenizer here shares: the `tokenizers` object, truncation set per encode
    under a lock, `from_file`, padding to (B, L) int32 ids and mask, `decode`.

    A subclass owns its policy: `_validate` (checked on construction), `max_tokens` and `encode`, which
    calls `_encode_batch` and `_check_positions`.
    """

    def __init__(self, tokenizer: Tokenizer, text_config: Any, source: str = ""):
        self.text_config = text_config
        self.source = source
        # Our own truncation and padding decide the layout; ignore any stored in tokenizer.json.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tok = tokenizer
        self._truncation: int | None = None
        # Truncation is state on the shared `tokenizers` object: set-and-encode must not interleave.
        self._lock = threading.Lock()
        self._validate()

    @classmethod
    def from_file(cls: type[_Tokenizer], path: str | Path, text_config: Any = None) -> _Tokenizer:
        """From a `tokenizer.json` (the hub's fast-tokenizer file)."""
        path = Path(path)
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"{path}: cannot read tokenizer ({exc})") from exc
        return cls(tok, text_config, source=str(path))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def max_tokens(self) -> int:
        """Longest sequence (specials included) the model's position table allows."""
        raise NotImplementedError

    def _validate(self) -> None:
        raise NotImplementedError

    def _encode_batch(self, items: list[str], max_length: int | None) -> list[list[int]]:
        """Id lists with the special tokens, truncated to `max_length` (specials counted) when given."""
        with self._lock:
            if max_length != self._truncation:
                if max_length is None:
                    self._tok.no_truncation()
                else:
                    # Counts the special tokens: `max_length` is the total, as transformers' max_length.
                    self._tok.enable_truncation(max_length=max_length)
                self._truncation = max_length
            encodings = self._tok.encode_batch(items, add_special_tokens=True)
        return [enc.ids for enc in encodings]

    def _check_positions(self, ids: list[list[int]], hint: str) -> None:
        """ValueError naming the first text longer than the model's positions; `hint` says what to do."""
        for i, seq in enumerate(ids):
            if len(seq) > self.max_tokens:
                raise ValueError(
                    f"text item {i} has {len(seq)} tokens, more than the model's {self.max_tokens} "
                    f"positions; {hint}"
                )

    def _pad(self, seqs: list[list[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), int32 (B, length): `pad_token_id` after each text, mask 0 there."""
        input_ids = np.full((len(seqs), length), self.text_config.pad_token_id, dtype=np.int32)
        attention_mask = np.zeros((len(seqs), length), dtype=np.int32)
        for row, seq in enumerate(seqs):
            input_ids[row, : len(seq)] = seq
            attention_mask[row, : len(seq)] = 1
        return input_ids, attention_mask

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Ids back to text (for debugging and messages)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


class ClapTokenizer(TextTokenizer):
    """Text -> (input_ids, attention_mask) as int32 numpy arrays, RoBERTa style.

    `text_config` gives the special ids, the vocabulary size the model's embedding table has, the LAION
    length (77) and the position limit; the tokenizer is checked against it on construction.
    """

    def __init__(self, tokenizer: Tokenizer, text_config: ClapTextConfig | None = None, source: str = ""):
        super().__init__(tokenizer, text_config or ClapTextConfig(), source)

    # ------------------------------------------------------------------------------------- building
    @classmethod
    def from_vocab_merges(
        cls, vocab: str | Path, merges: str | Path, text_config: ClapTextConfig | None = None
    ) -> ClapTokenizer:
        """From `vocab.json` + `merges.txt`, set up as transformers' `RobertaTokenizer`."""
        cfg = text_config or ClapTextConfig()
        try:
            bpe = BPE.from_file(
                str(vocab), str(merges), continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False
            )
        except Exception as exc:
            raise TokenizerError(f"{vocab}, {merges}: cannot read BPE files ({exc})") from exc
        tok = Tokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        # Special tokens are matched in the raw text, as in RobertaTokenizer; <mask> eats a space before it.
        tok.add_special_tokens(
            [
                AddedToken(BOS, special=True),
                AddedToken(PAD, special=True),
                AddedToken(EOS, special=True),
                AddedToken(UNK, special=True),
                AddedToken(MASK, lstrip=True, special=True),
            ]
        )
        tok.post_processor = processors.RobertaProcessing(
            (EOS, cfg.eos_token_id), (BOS, cfg.bos_token_id), trim_offsets=True, add_prefix_space=False
        )
        return cls(tok, cfg, source=str(Path(vocab).parent))

    # ----------------------------------------------------------------------------------- properties
    @property
    def max_tokens(self) -> int:
        """Longest sequence (specials included) the model's position table allows (514 - 2 = 512)."""
        cfg = self.text_config
        return cfg.max_position_embeddings - cfg.pad_token_id - 1

    def _validate(self) -> None:
        cfg, where = self.text_config, self.source or "tokenizer"
        # An empty or foreign vocabulary would give ids that index the wrong (or no) embedding rows;
        # transformers offline can hand back a 5-token placeholder tokenizer, which this catches.
        if self.vocab_size != cfg.vocab_size:
            raise TokenizerError(
                f"{where}: tokenizer has {self.vocab_size} tokens but the model's embedding table has "
                f"{cfg.vocab_size}; the tokenizer files do not belong to this model (or are empty)"
            )
        for name, want in ((BOS, cfg.bos_token_id), (PAD, cfg.pad_token_id), (EOS, cfg.eos_token_id)):
            got = self._tok.token_to_id(name)
            if got != want:
                raise TokenizerError(f"{where}: special token {name} has id {got}, the model expects {want}")
        if not self._wraps():
            # A bare BPE file (no post-processor, or a ByteLevel one): CLAP's text tower always reads
            # RoBERTa's `<s> ... </s>` layout, so install it rather than feed unwrapped ids.
            self._tok.post_processor = processors.RobertaProcessing(
                (EOS, cfg.eos_token_id), (BOS, cfg.bos_token_id), trim_offsets=True, add_prefix_space=False
            )
        if not self._wraps():
            probe = self._tok.encode("a").ids
            raise TokenizerError(f"{where}: post-processing does not wrap text as <s> ... </s> (got {probe})")

    def _wraps(self) -> bool:
        probe = self._tok.encode("a").ids
        cfg = self.text_config
        return len(probe) >= 3 and probe[0] == cfg.bos_token_id and probe[-1] == cfg.eos_token_id

    # --------------------------------------------------------------------------------------- encoding
    def encode(
        self, texts: Sequence[str] | str, max_length: int | None = None, policy: str = "laion"
    ) -> list[list[int]]:
        """Token id lists (with `<s>`/`</s>`), truncated as the policy says, not padded."""
        items = _check_texts(texts)
        if policy not in POLICIES:
            raise ValueError(f"unknown tokenizer policy {policy!r}: use one of {', '.join(POLICIES)}")
        if max_length is None and policy == "laion":
            max_length = self.text_config.max_length
        if max_length is not None:
            if max_length < 2:
                raise ValueError(f"max_length {max_length} leaves no room for <s> and </s>")
            if max_length > self.max_tokens:
                raise ValueError(f"max_length {max_length} exceeds the model's {self.max_tokens} positions")
        ids = self._encode_batch(items, max_length)
        self._check_positions(ids, "use policy='laion' (truncates to 77) or pass max_length")
        return ids

    def __call__(
        self,
        texts: Sequence[str] | str,
        max_length: int | None = None,
        policy: str = "laion",
        padding: str = "longest",
    ) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), both int32 (B, L).

        policy="laion": truncate to `max_length` (default `text_config.max_length`, 77) tokens.
        policy="hf": no truncation unless `max_length` is given; more than the model's positions
        (512) is an error. padding="longest" pads to the batch's longest sequence; "max_length"
        pads to `max_length` (LAION's exact layout: 77 columns).
        """
        if padding not in ("longest", "max_length"):
            raise ValueError(f"unknown padding {padding!r}: use 'longest' or 'max_length'")
        seqs = self.encode(texts, max_length=max_length, policy=policy)
        length = max((len(s) for s in seqs), default=0)
        if padding == "max_length":
            target = max_length if max_length is not None else self.text_config.max_length
            length = max(length, target)
        return self._pad(seqs, length)


def has_tokenizer_files(folder: str | Path) -> bool:
    """True when `folder` holds tokenizer.json, or vocab.json + merges.txt."""
    folder = Path(folder)
    return (folder / TOKENIZER_FILE).is_file() or (
        (folder / VOCAB_FILE).is_file() and (folder / MERGES_FILE).is_file()
    )


def load_tokenizer(folder: str | Path, text_config: ClapTextConfig | None = None) -> ClapTokenizer | None:
    """The folder's tokenizer (tokenizer.json preferred, else vocab.json + merges.txt), or None if none."""
    folder = Path(folder)
    if (folder / TOKENIZER_FILE).is_file():
        return ClapTokenizer.from_file(folder / TOKENIZER_FILE, text_config)
    if (folder / VOCAB_FILE).is_file() and (folder / MERGES_FILE).is_file():
        try:
            json.loads((folder / VOCAB_FILE).read_text(encoding="utf-8"))
        except ValueError as exc:
            raise TokenizerError(f"{folder / VOCAB_FILE}: not valid JSON ({exc})") from exc
        return ClapTokenizer.from_vocab_merges(folder / VOCAB_FILE, folder / MERGES_FILE, text_config)
    return None
