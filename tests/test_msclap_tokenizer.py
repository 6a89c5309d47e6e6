"""msclap text preprocessing on `tokenizers` against msclap's own `CLAPWrapper.preprocess_text`.

The transformers tokenizers are built from small vocabularies trained offline in the gpt2 / bert-base-uncased
layouts (msclap_reference.py) and go through the converter's tokenizer.json writer, as a real conversion does.
"""

from __future__ import annotations

import importlib.util

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[test]')")
import transformers  # noqa: E402,F401
from msclap_reference import MSCLAP_TEXTS, hf_tokenizer, train_bert_files, train_gpt2_files

from mlx_clap.models.msclap.gpt2 import last_token_index
from mlx_clap.preprocess.msclap_tokenizer import MsClapTokenizer

if importlib.util.find_spec("msclap") is None:
    pytest.skip("msclap 1.3.4 is not installed: pip install --no-deps msclap==1.3.4", allow_module_level=True)

MODELS = {"gpt2": 77, "bert-base-uncased": 100}


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request, tmp_path_factory):
    """(msclap wrapper with the HF tokenizer, our tokenizer from the converter's tokenizer.json)."""
    from msclap_reference import import_msclap

    from mlx_clap.convert.msclap import write_tokenizer_json

    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    files = train_gpt2_files(tmp / "src") if "gpt" in name else train_bert_files(tmp / "src")
    _, CLAPWrapper = import_msclap({name: files})
    wrapper = CLAPWrapper.__new__(CLAPWrapper)
    wrapper.use_cuda = False
    wrapper.args = wrapper.read_config_as_args(
        f"text_model: {name}\ntext_len: {MODELS[name]}\n", is_config_str=True
    )
    tok = hf_tokenizer(files, name)
    if "gpt" in name:
        tok.add_special_tokens({"pad_token": "!"})  # as CLAPWrapper.load_clap
    tok.encode_plus = tok.__call__  # transformers 5 dropped encode_plus; msclap pins <5
    wrapper.tokenizer = tok
    wrapper.token_keys = (
        ["input_ids", "attention_mask"]
        if "gpt" in name
        else ["input_ids", "token_type_ids", "attention_mask"]
    )
    out = tmp / "converted"
    out.mkdir()
    write_tokenizer_json(files, name, out / "tokenizer.json")
    ours = MsClapTokenizer.from_folder(out, name, MODELS[name], 1024 if "gpt" in name else 512)
    return wrapper, ours


def test_ids_equal_msclap_one_by_one(pair):
    wrapper, ours = pair
    long_seen = False
    for text in MSCLAP_TEXTS:
        ref = wrapper.preprocess_text([text])
        got = ours([text])
        assert set(got) == set(wrapper.token_keys)
        for key in wrapper.token_keys:
            np.testing.assert_array_equal(got[key], ref[key].numpy(), err_msg=f"{key} for {text!r}")
        long_seen |= got["input_ids"].shape[1] > ours.text_len
    # msclap pads to text_len but never truncates: the long fixture keeps all its tokens.
    assert long_seen


def test_batch_pads_to_the_longest_without_truncating(pair):
    wrapper, ours = pair
    batch = ours(MSCLAP_TEXTS)
    width = batch["input_ids"].shape[1]
    assert width > ours.text_len
    for row, text in enumerate(MSCLAP_TEXTS):
        single = ours([text])
        n = single["input_ids"].shape[1]
        np.testing.assert_array_equal(batch["input_ids"][row, :n], single["input_ids"][0])
        assert (batch["input_ids"][row, n:] == ours.pad_id).all()
        assert (batch["attention_mask"][row, n:] == 0).all()


def test_gpt2_bang_counts_as_padding(pair):
    wrapper, ours = pair
    if not ours.is_gpt2:
        assert ours(["a dog barks!"])["input_ids"][0, 0] == ours._tok.token_to_id("[CLS]")
        return
    enc = ours(["a dog barks", "a dog barks!", "wow!! !x"])
    index = np.array(last_token_index(mx.array(enc["input_ids"])))
    last_real = enc["attention_mask"].sum(-1) - 1
    assert index[0] == last_real[0]  # no "!": the <|endoftext|> token
    assert index[1] == last_real[1] - 1  # one "!" (id 0) in the text
    assert index[2] == last_real[2] - 3  # "!!" is split into two `!` by the special pad token, then " !"
    eot = ours._tok.token_to_id("<|endoftext|>")
    assert (enc["input_ids"][np.arange(3), last_real] == eot).all()


def test_too_long_and_bad_types(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="at most"):
        ours(["word " * 2000])
    with pytest.raises(TypeError, match="item 1"):
        ours(["ok", 3])
    assert ours([])["input_ids"].shape == (0, ours.text_len)


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        MsClapTokenizer.from_folder(tmp_path, "gpt2", 77)
