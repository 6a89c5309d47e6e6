"""Tokenizer parity: our `ClapTokenizer` against transformers' `RobertaTokenizer` and against a port of the
slow (pure-Python) byte-level BPE algorithm, on the same offline-trained vocab.json + merges.txt.

No hub: a RoBERTa-style BPE (special ids <s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4) is trained in the
test. docs/numerics.md §5.1, §9 (token ids and mask exact).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from fixtures import TINY_TEXT, TOKENIZER_TEXTS, train_bpe_files

from mlx_clap.config import ClapTextConfig
from mlx_clap.preprocess.tokenizer import ClapTokenizer, TokenizerError, load_tokenizer

CFG = ClapTextConfig(**TINY_TEXT)
SPECIAL_TEXT = "a <mask> b <s>x</s> c"


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bpe")
    train_bpe_files(folder, vocab_size=CFG.vocab_size)
    return folder


@pytest.fixture(scope="module")
def hf_tok(bpe_folder):
    from transformers import RobertaTokenizer

    tok = RobertaTokenizer.from_pretrained(str(bpe_folder))
    # Offline, transformers can hand back a 5-token placeholder; a reference like that proves nothing.
    assert len(tok) == CFG.vocab_size, f"reference tokenizer did not load the files: {len(tok)} tokens"
    assert tok.convert_tokens_to_ids(["<s>", "<pad>", "</s>"]) == [0, 1, 2]
    return tok


@pytest.fixture(scope="module")
def ours(bpe_folder) -> ClapTokenizer:
    tok = load_tokenizer(bpe_folder, CFG)
    assert tok is not None
    return tok


# ----------------------------------------------------------------- port of the slow RobertaTokenizer
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (transformers' bytes_to_unicode)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


class SlowRobertaReference:
    """The algorithm of transformers 4.x's Python `RobertaTokenizer` (LAION's tokenizer): split on special
    tokens (<mask> strips the whitespace on its left), GPT-2 regex pre-tokenization, byte map, greedy
    lowest-rank BPE merges, then `<s> ... </s>` and truncation of the content to max_length - 2."""

    PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]

    def __init__(self, vocab_file: Path, merges_file: Path):
        import regex

        self.encoder = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
        lines = Path(merges_file).read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:] if line.strip()]
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.byte_encoder = _bytes_to_unicode()
        self.pat = regex.compile(self.PATTERN)
        self.split = regex.compile("(" + "|".join(regex.escape(s) for s in self.SPECIALS) + ")")

    @cache  # noqa: B019 - test-only helper, lives as long as the module
    def bpe(self, token: str) -> tuple[str, ...]:
        word = tuple(token)
        while len(word) > 1:
            pairs = set(zip(word, word[1:], strict=False))
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def __call__(self, text: str, max_length: int | None = 77) -> list[int]:
        pieces = self.split.split(text)
        ids: list[int] = []
        for k, piece in enumerate(pieces):
            if piece in self.SPECIALS:
                ids.append(self.encoder[piece])
                continue
            if k + 1 < len(pieces) and pieces[k + 1] == "<mask>":
                piece = piece.rstrip()  # <mask> is an AddedToken with lstrip=True
            for word in self.pat.findall(piece):
                mapped = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
                ids.extend(self.encoder[t] for t in self.bpe(mapped))
        if max_length is not None:
            ids = ids[: max_length - 2]
        return [self.encoder["<s>"], *ids, self.encoder["</s>"]]


# ------------------------------------------------------------------------------------------- tests
def test_fixture_covers_truncation(ours):
    lengths = [len(s) for s in ours.encode(TOKENIZER_TEXTS, policy="hf")]
    assert max(lengths) > 77, "the fixture list needs a text longer than 77 tokens"
    assert lengths[0] == 2  # the empty string is <s></s>


def test_ids_equal_transformers_laion_policy(ours, hf_tok):
    ref = hf_tok(TOKENIZER_TEXTS, padding="max_length", truncation=True, max_length=77, return_tensors="np")
    ids, mask = ours(TOKENIZER_TEXTS, padding="max_length")
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(mask, ref["attention_mask"])


def test_ids_equal_slow_python_bpe(ours, bpe_folder):
    slow = SlowRobertaReference(bpe_folder / "vocab.json", bpe_folder / "merges.txt")
    for text in [*TOKENIZER_TEXTS, SPECIAL_TEXT]:
        assert ours.encode([text])[0] == slow(text), repr(text)
        assert ours.encode([text], policy="hf")[0] == slow(text, max_length=None), repr(text)


def test_hf_policy_no_truncation_pad_longest(ours, hf_tok):
    ref = hf_tok(TOKENIZER_TEXTS, padding=True, return_tensors="np")
    ids, mask = ours(TOKENIZER_TEXTS, policy="hf")
    assert ids.shape[1] > 77
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(mask, ref["attention_mask"])


def test_hf_policy_errors_beyond_positions(ours):
    long_text = " ".join(f"w{i}" for i in range(600))
    with pytest.raises(ValueError, match="positions"):
        ours([long_text], policy="hf")
    ids, _ = ours([long_text], policy="hf", max_length=512)
    assert ids.shape == (1, 512) and ids[0, -1] == CFG.eos_token_id
    ids, _ = ours([long_text])
    assert ids.shape == (1, 77) and ids[0, 0] == CFG.bos_token_id and ids[0, -1] == CFG.eos_token_id


def test_laion_policy_pads_per_batch(ours, hf_tok):
    short = ["dog", "a cat"]
    ids, mask = ours(short)
    ref = hf_tok(short, padding="max_length", truncation=True, max_length=77, return_tensors="np")
    width = ids.shape[1]
    assert width == int(ref["attention_mask"].sum(1).max()) < 77
    np.testing.assert_array_equal(ids, ref["input_ids"][:, :width])
    np.testing.assert_array_equal(mask, ref["attention_mask"][:, :width])
    assert not ref["attention_mask"][:, width:].any()
    empty_ids, empty_mask = ours([])
    assert empty_ids.shape == (0, 0) and empty_mask.shape == (0, 0)


def test_tokenizer_json_loading(ours, hf_tok, tmp_path):
    hf_tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    from_json = load_tokenizer(tmp_path, CFG)
    assert from_json is not None and from_json.source.endswith("tokenizer.json")
    for a, b in zip(from_json(TOKENIZER_TEXTS), ours(TOKENIZER_TEXTS), strict=True):
        np.testing.assert_array_equal(a, b)


def test_tokenizer_json_without_post_processor_gets_roberta_wrapping(bpe_folder, ours, tmp_path):
    from tokenizers import ByteLevelBPETokenizer

    raw = ByteLevelBPETokenizer(str(bpe_folder / "vocab.json"), str(bpe_folder / "merges.txt"))
    raw.add_special_tokens(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path, CFG)
    np.testing.assert_array_equal(tok(TOKENIZER_TEXTS)[0], ours(TOKENIZER_TEXTS)[0])


def test_load_tokenizer_none_without_files(tmp_path):
    assert load_tokenizer(tmp_path, CFG) is None
    (tmp_path / "vocab.json").write_text("{}")
    assert load_tokenizer(tmp_path, CFG) is None  # vocab.json alone is not a tokenizer


def test_placeholder_tokenizer_is_an_error(tmp_path):
    """transformers' 5-token placeholder (what an offline load can silently give) must not tokenize."""
    from transformers import RobertaTokenizer

    placeholder = RobertaTokenizer()
    assert len(placeholder) == 5
    placeholder.save_pretrained(tmp_path)
    with pytest.raises(TokenizerError, match="5 tokens"):
        load_tokenizer(tmp_path, CFG)


def test_vocabulary_mismatch_is_an_error(bpe_folder):
    with pytest.raises(TokenizerError, match="embedding table"):
        load_tokenizer(bpe_folder, ClapTextConfig(**{**TINY_TEXT, "vocab_size": 50265}))
    with pytest.raises(TokenizerError, match="special token"):
        load_tokenizer(bpe_folder, ClapTextConfig(**{**TINY_TEXT, "pad_token_id": 3}))


def test_corrupt_files_are_errors(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(tmp_path, CFG)


@pytest.mark.parametrize(
    "bad, where",
    [(["ok", None], "item 1"), ([3], "item 0"), (["a", "b", b"bytes"], "item 2"), (None, "None")],
)
def test_bad_input_types(ours, bad, where):
    with pytest.raises(TypeError, match=where):
        ours(bad)


def test_single_string_and_bad_options(ours):
    ids, mask = ours("dog")
    np.testing.assert_array_equal(ids, ours(["dog"])[0])
    with pytest.raises(ValueError, match="policy"):
        ours(["dog"], policy="openai")
    with pytest.raises(ValueError, match="padding"):
        ours(["dog"], padding="right")
    with pytest.raises(ValueError, match="max_length"):
        ours(["dog"], max_length=1)
