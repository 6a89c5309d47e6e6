"""PE-Audio's ModernBERT tokenizer on its own (no model, no torch): `[CLS] ... [SEP]`, truncation set per
encode, the errors that name the file or the text, padding. It shares its skeleton with `ClapTokenizer`
(`TextTokenizer`); the parity of its ids with transformers is in tests/test_pe_audio_model.py.
"""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest
from pe_audio_reference import SPECIALS, TINY_TEXT, modernbert_tokenizer

from mlx_clap.models.pe_audio.config import ModernBertConfig
from mlx_clap.preprocess.pe_audio_tokenizer import PeAudioTokenizer, load_pe_audio_tokenizer
from mlx_clap.preprocess.tokenizer import ClapTokenizer, TextTokenizer, TokenizerError

CFG = ModernBertConfig(**TINY_TEXT)
CLS, SEP, PAD = SPECIALS["[CLS]"], SPECIALS["[SEP]"], SPECIALS["[PAD]"]
LONG = "a dog barks in the distance while rain falls on a tin roof"


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> PeAudioTokenizer:
    """The tokenizer as a converted folder holds it (tokenizer.json), read back by the loader."""
    folder = tmp_path_factory.mktemp("pe_tok")
    modernbert_tokenizer().save(str(folder / "tokenizer.json"))
    loaded = load_pe_audio_tokenizer(folder, CFG)
    assert loaded is not None and loaded.source == str(folder / "tokenizer.json")
    return loaded


def test_both_tokenizers_share_one_skeleton(tok):
    assert isinstance(tok, TextTokenizer) and issubclass(ClapTokenizer, TextTokenizer)
    assert type(PeAudioTokenizer.from_file(tok.source, CFG)) is PeAudioTokenizer


def test_wraps_pads_and_masks(tok):
    full = tok.encode(LONG)[0]
    assert full[0] == CLS and full[-1] == SEP and len(full) > 6
    ids, mask = tok(["x", LONG])
    assert ids.dtype == mask.dtype == np.int32 and ids.shape == mask.shape == (2, len(full))
    short = tok.encode("x")[0]
    assert ids[0, : len(short)].tolist() == short and (ids[0, len(short) :] == PAD).all()
    assert mask[0].sum() == len(short) and mask[1].all()
    assert tok.decode(full) == LONG
    assert tok([])[0].shape == (0, 0)


def test_truncation_is_set_for_each_encode(tok):
    full = tok.encode(LONG)[0]
    assert tok.encode(LONG, max_length=4) == [full[:3] + [SEP]]
    # The truncation of the call before does not stick to the next one.
    assert tok.encode(LONG) == [full]
    assert tok.encode(LONG, max_length=2) == [[CLS, SEP]]


def test_concurrent_encodes_keep_their_own_truncation(tok):
    full = tok.encode(LONG)[0]
    wrong: list[int] = []

    def work(max_length: int | None) -> None:
        want = len(full) if max_length is None else max_length
        for _ in range(200):
            got = len(tok.encode([LONG] * 4, max_length=max_length)[0])
            if got != want:
                wrong.append(got)

    threads = [threading.Thread(target=work, args=(m,)) for m in (None, 4, 5, None)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong


def test_errors_name_the_cause(tok, tmp_path):
    with pytest.raises(ValueError, match=r"max_length must be in \[2, 8192\], got 1"):
        tok.encode("x", max_length=1)
    with pytest.raises(ValueError, match="got 8193"):
        tok.encode("x", max_length=8193)
    with pytest.raises(
        ValueError, match="text item 1 has .* more than the model's 8192 positions; pass max_length"
    ):
        tok.encode(["x", "word " * 9000])
    with pytest.raises(TypeError, match="text item 1 is int"):
        tok.encode(["x", 3])
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match=re.escape(f"{bad}: cannot read tokenizer")):
        PeAudioTokenizer.from_file(bad, CFG)
    with pytest.raises(
        TokenizerError, match="tokenizer has 50368 tokens but the model's embedding table has 50304"
    ):
        PeAudioTokenizer.from_file(tok.source, ModernBertConfig(**{**TINY_TEXT, "vocab_size": 50304}))
    other = ModernBertConfig(**{**TINY_TEXT, "cls_token_id": SEP, "sep_token_id": CLS})
    with pytest.raises(TokenizerError, match=r"does not wrap text as \[CLS\] ... \[SEP\]"):
        PeAudioTokenizer.from_file(tok.source, other)
    assert load_pe_audio_tokenizer(tmp_path / "none", CFG) is None
