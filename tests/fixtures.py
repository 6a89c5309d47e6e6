"""Small shared test fixtures: tiny model configs and a converted tiny model folder.

The tiny configs keep the real frontend (1001 x 64 mels, spec_size 256, window 8) so every code path
runs, with narrow layers so a forward pass takes milliseconds.
"""

from __future__ import annotations

from pathlib import Path

TINY_AUDIO = dict(
    patch_embeds_hidden_size=16,
    depths=[1, 1, 1, 1],
    num_attention_heads=[1, 2, 4, 8],
    hidden_size=128,
)
TINY_TEXT = dict(
    vocab_size=1000,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
)


# ------------------------------------------------------------------------------------------ tokenizer
# Texts for tokenizer equality tests (docs/numerics.md §9): empty, one word, punctuation, unicode, emoji,
# newlines, leading/trailing spaces, contractions, digits, and one longer than 77 tokens (truncation).
TOKENIZER_TEXTS = [
    "",
    "dog",
    "This is a sound of a dog barking.",
    "Hello, world!!! What's that?! (a cat; maybe...) -- 'quoted' \"double\"",
    "Café naïve façade — Straße, Ωμέγα, 東京の音, Привет",
    "emoji 🐶🔊🎵 and 👩‍👩‍👧 family",
    "line one\nline two\r\n\ttabbed\n\n",
    "   leading and trailing spaces   ",
    " x",
    "I'm sure they'll say it's 1234 or 3.14159 times 42",
    " ".join(f"word{i} and sound" for i in range(40)),
]


def _bpe_corpus(n_words: int = 6000, seed: int = 0) -> list[str]:
    """A deterministic corpus with enough distinct pairs for ~1000 byte-level BPE tokens."""
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    words = ["".join(rng.choice(letters, size=int(rng.integers(2, 9)))) for _ in range(n_words)]
    lines = [" ".join(words[i : i + 12]) for i in range(0, n_words, 12)]
    lines += [t for t in TOKENIZER_TEXTS if t] * 3
    lines += ["This is a sound of a dog barking.", "This audio is a jazz song.", "a cat meows loudly"] * 20
    return lines


def train_bpe_files(folder: Path, vocab_size: int = 1000) -> tuple[Path, Path]:
    """Train a RoBERTa-style byte-level BPE offline and save vocab.json + merges.txt in `folder`.

    Special tokens get RoBERTa's ids: <s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4.
    """
    from tokenizers import ByteLevelBPETokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        _bpe_corpus(),
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        show_progress=False,
    )
    bpe.save_model(str(folder))
    return folder / "vocab.json", folder / "merges.txt"
