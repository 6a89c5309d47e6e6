"""A RoBERTa-shaped byte-level BPE tokenizer built without a corpus, for random-init models.

`mlx-clap random-model` needs tokenizer files of the right size (roberta-base's 50265 ids, with
RoBERTa's special ids <s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=50264) so that text embedding runs end to
end offline. Training a BPE on a corpus takes minutes and a corpus; a random-weight model gains nothing
from learned merges, so the vocabulary here is generated: the 256 byte-level symbols, then merges of
symbol pairs in a fixed order (common ASCII first), up to the size asked for. Any text tokenizes (byte
level covers every input) into in-range ids; the token boundaries are not meaningful.

The files are the ones transformers' `RobertaTokenizer` and `mlx_clap.preprocess.tokenizer` read:
vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from tokenizers import pre_tokenizers

from mlx_clap.io.files import atomic_write_bytes, atomic_write_json

ROBERTA_VOCAB_SIZE = 50265
# RoBERTa's special tokens: the first four ids, <mask> the last one.
LEADING_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
MASK = "<mask>"
SPACE = "Ġ"  # the byte-level symbol of " " (GPT-2's bytes_to_unicode)
MERGES_HEADER = "#version: 0.2"


def byte_symbols() -> list[str]:
    """The 256 byte-level symbols, in a fixed order: space, letters, digits, ASCII punctuation first."""
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())  # the library's own byte -> symbol table
    preferred = [SPACE, *string.ascii_lowercase, *string.ascii_uppercase, *string.digits, *string.punctuation]
    first = [s for s in preferred if s in alphabet]
    rest = sorted(alphabet - set(first))
    symbols = first + rest
    if len(symbols) != 256:
        raise RuntimeError(f"tokenizers' ByteLevel alphabet has {len(symbols)} symbols, expected 256")
    return symbols


def generated_vocab(vocab_size: int = ROBERTA_VOCAB_SIZE) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a byte-level BPE with RoBERTa's special ids and exactly `vocab_size` entries.

    Merges join two byte symbols; pairs of the most common symbols come first (ordered by the later of
    the two symbols' ranks), and pairs ending in the space symbol are skipped (the ByteLevel
    pre-tokenizer puts spaces only at the start of a word, so they never apply).
    """
    symbols = byte_symbols()
    n_merges = vocab_size - len(LEADING_SPECIALS) - 1 - len(symbols)
    pairs = [
        (max(i, j), i, j) for i in range(len(symbols)) for j in range(len(symbols)) if symbols[j] != SPACE
    ]
    if not 0 <= n_merges <= len(pairs):
        raise ValueError(f"vocab_size {vocab_size} is out of range for a one-level byte-pair vocabulary")
    merges = [(symbols[i], symbols[j]) for _, i, j in sorted(pairs)[:n_merges]]
    tokens = [*LEADING_SPECIALS, *symbols, *(a + b for a, b in merges), MASK]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def write_placeholder_tokenizer(folder: str | Path, vocab_size: int = ROBERTA_VOCAB_SIZE) -> list[Path]:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json into `folder`.

    Returns the paths written. Deterministic: the same `vocab_size` gives the same bytes.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = generated_vocab(vocab_size)
    specials = {
        "bos_token": "<s>",
        "cls_token": "<s>",
        "eos_token": "</s>",
        "sep_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        # As roberta-base's: <mask> absorbs the space before it.
        "mask_token": {"content": MASK, "lstrip": True, "normalized": False, "rstrip": False},
    }
    written = [folder / "vocab.json", folder / "merges.txt"]
    atomic_write_bytes(written[0], json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
    merges_text = "\n".join([MERGES_HEADER, *(f"{a} {b}" for a, b in merges)]) + "\n"
    atomic_write_bytes(written[1], merges_text.encode("utf-8"))
    config = {
        "tokenizer_class": "RobertaTokenizer",
        "model_max_length": 512,
        "add_prefix_space": False,
        "errors": "replace",
        **specials,
    }
    for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", specials)):
        atomic_write_json(folder / name, data)
        written.append(folder / name)
    return written


__all__ = [
    "ROBERTA_VOCAB_SIZE",
    "byte_symbols",
    "generated_vocab",
    "write_placeholder_tokenizer",
]
