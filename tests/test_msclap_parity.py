"""msclap parity: our MLX models against msclap 1.3.4's own classes, full size, every weight randomized.

For each version the reference `CLAP` is built the way `CLAPWrapper.load_clap` builds it (offline: random
text model, small trained tokenizer; see msclap_reference.py), saved in the released `{'model': ...}`
layout, converted by `convert/msclap.py` and loaded with `mlx_clap.load`. Inputs: two clips (a 3-s clip
through msclap's own tiling, and a full-length clip with tones, noise, a -60 dB part and silence) and
two texts (one with a `!`). Tolerances: docs/numerics.md §9 (audio stages 1e-4 relative, text 1e-5, unit
embeddings max abs 1e-5 and cosine >= 0.99999, log-mel 1e-3 dB).
"""

from __future__ import annotations

import importlib.util
import json

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[test]')")
pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[test]')")
import torch  # noqa: E402
import transformers  # noqa: E402,F401

if importlib.util.find_spec("msclap") is None:  # importing it needs the torchaudio stand-in first
    pytest.skip("msclap 1.3.4 is not installed: pip install --no-deps msclap==1.3.4", allow_module_level=True)

from msclap_reference import (  # noqa: E402
    clip_loader,
    cosine,
    make_signal,
    random_msclap,
    rel_err,
    torch_audio_stages,
    torch_text_stages,
    train_bert_files,
    train_gpt2_files,
)

import mlx_clap  # noqa: E402
from mlx_clap.models.layers import l2_normalize  # noqa: E402
from mlx_clap.models.msclap.gpt2 import last_token_index  # noqa: E402
from mlx_clap.preprocess.msclap_frontend import prepare_batch  # noqa: E402

SR = 44100
TEXTS = ["a dog barks! then it runs", "this is the sound of rain"]


def reference_clip(wrapper, wave: np.ndarray) -> np.ndarray:
    """msclap's `load_audio_into_tensor` on an in-memory clip."""
    with clip_loader(wave, SR):
        return wrapper.load_audio_into_tensor("clip.wav", wrapper.args.duration, resample=False).numpy()


def _np(tree: dict) -> dict:
    return {k: np.array(v.astype(mx.float32)) if isinstance(v, mx.array) else v for k, v in tree.items()}


@pytest.fixture(scope="module", params=["2023", "2022"])
def case(request, tmp_path_factory):
    version = request.param
    tmp = tmp_path_factory.mktemp(f"msclap{version}")
    tokdir = train_gpt2_files(tmp / "tok") if version == "2023" else train_bert_files(tmp / "tok")
    wrapper = random_msclap(version, tokdir, seed=int(version), checkpoint=tmp / "ckpt.pth")
    from mlx_clap.convert.msclap import convert_msclap

    convert_msclap(tmp / "ckpt.pth", tmp / "model", tokenizer=tokdir)
    (tmp / "ckpt.pth").unlink()
    model = mlx_clap.load(tmp / "model")
    n = model.config.clip_samples

    short, full = make_signal(3 * SR, seed=1), make_signal(n, seed=2)
    ref_clips = np.stack([reference_clip(wrapper, short), reference_clip(wrapper, full)])
    our_clips, _ = prepare_batch([short, full], n)
    ref_audio = torch_audio_stages(wrapper.clap, ref_clips)
    cap: dict = {}
    projected = model.audio_encoder(mx.array(our_clips), capture=cap)
    cap["projected"] = projected
    our_audio = _np(cap)

    ref_text = torch_text_stages(wrapper, TEXTS)
    tokens = model.tokenizer(TEXTS)
    tcap: dict = {}
    tproj = model.caption_encoder(
        mx.array(tokens["input_ids"]),
        mx.array(tokens["attention_mask"]),
        mx.array(tokens["token_type_ids"]) if "token_type_ids" in tokens else None,
        capture=tcap,
    )
    tcap["projected"] = tproj
    our_text = _np(tcap)
    manifest = json.loads((tmp / "model" / "manifest.json").read_text())
    yield dict(
        manifest=manifest,
        state_keys=list(wrapper.clap.state_dict()),
        version=version,
        wrapper=wrapper,
        model=model,
        ref_clips=ref_clips,
        our_clips=our_clips,
        ref_audio=ref_audio,
        our_audio=our_audio,
        ref_text=ref_text,
        our_text=our_text,
        tokens=tokens,
    )


def test_model_is_the_released_architecture(case):
    model, wrapper = case["model"], case["wrapper"]
    n_ref = sum(p.numel() for p in wrapper.clap.parameters())
    assert model.config.version == case["version"]
    assert model.embedding_dim == 1024
    assert n_ref > 150_000_000  # full size, not a toy configuration


def test_manifest_accounts_for_every_tensor(case):
    manifest, keys = case["manifest"], case["state_keys"]
    assert manifest["version"] == case["version"] and manifest["unexpected_ignored"] == []
    assert set(manifest["dropped"]) <= set(keys)
    reasons = " ".join(manifest["dropped"].values())
    assert "STFT kernels" in reasons and "step counter" in reasons
    assert ("AudioSet heads" if case["version"] == "2023" else "BERT pooler") in reasons
    # Every other tensor was mapped: the converter refuses missing/unexpected keys and the load is strict.


def test_waveform_preparation_is_bit_exact(case):
    np.testing.assert_array_equal(case["our_clips"], case["ref_clips"])


def test_logmel_matches_torchlibrosa(case):
    ref, ours = case["ref_audio"]["logmel"], case["our_audio"]["logmel"]
    assert ref.shape == ours.shape == (2, 1 + case["model"].config.clip_samples // 320, 64)
    assert np.abs(ref - ours).max() <= 1e-3
    floor = ref <= -100.0 + 1e-6
    assert floor.any()  # the silent section reaches the -100 dB floor
    np.testing.assert_array_equal(ours[floor], ref[floor])


def test_audio_stages(case):
    ref, ours = case["ref_audio"], case["our_audio"]
    if case["version"] == "2023":
        stages = ["patch_embed", "layers.0", "layers.1", "layers.2", "layers.3", "norm"]
    else:
        stages = ["bn0"] + [f"conv_block{i}" for i in range(1, 7)]
    for name in stages:
        r, o = ref[name], ours[name]
        o = o.reshape(r.shape)  # HTSAT: (B, H, W, C) -> (B, H*W, C), row-major as torch's flatten
        assert rel_err(r, o) <= 1e-4, name
    assert rel_err(ref["embedding"], ours["embedding"]) <= 1e-4
    assert rel_err(ref["projected"], ours["projected"]) <= 1e-4


def test_audio_unit_embeddings(case):
    ref = torch.nn.functional.normalize(torch.from_numpy(case["ref_audio"]["projected"]), dim=-1).numpy()
    ours = np.array(l2_normalize(mx.array(case["our_audio"]["projected"])))  # as get_audio_features
    assert np.abs(ref - ours).max() <= 1e-5
    assert cosine(ref, ours).min() >= 0.99999


def test_tokens_equal(case):
    ref = case["ref_text"]["tokens"]
    assert set(ref) == set(case["tokens"])
    for key, value in ref.items():
        np.testing.assert_array_equal(case["tokens"][key], value, err_msg=key)


def test_text_stages(case):
    ref, ours = case["ref_text"], case["our_text"]
    hidden = ref["hidden_states"]
    n_layers = len(hidden) - 1
    if case["version"] == "2023":
        # HF GPT-2 reports ln_f(last block) as its last hidden state; the others are block outputs.
        names = ["embeddings"] + [f"h.{i}" for i in range(n_layers - 1)]
        assert rel_err(hidden[-1], ours["last_hidden_state"]) <= 1e-5
    else:
        names = ["embeddings"] + [f"encoder.layer.{i}" for i in range(n_layers)]
    for i, name in enumerate(names):
        assert rel_err(hidden[i], ours[name]) <= 1e-5, name
    assert rel_err(ref["last_hidden_state"], ours["last_hidden_state"]) <= 1e-5
    assert rel_err(ref["pooled"], ours["pooled"]) <= 1e-5
    assert rel_err(ref["projected"], ours["projected"]) <= 1e-5
    ref_unit = torch.nn.functional.normalize(torch.from_numpy(ref["projected"]), dim=-1).numpy()
    our_unit = ours["projected"] / np.linalg.norm(ours["projected"], axis=-1, keepdims=True)
    assert np.abs(ref_unit - our_unit).max() <= 1e-5
    assert cosine(ref_unit, our_unit).min() >= 0.99999


def test_pooling_position(case):
    tokens, ours = case["tokens"], case["our_text"]
    if case["version"] == "2022":
        # BERT: the raw [CLS] state, no pooler.
        np.testing.assert_array_equal(ours["pooled"], ours["last_hidden_state"][:, 0])
        return
    # GPT-2: count(ids != 0) - 1, where `!` (id 0) counts as padding.
    index = np.array(last_token_index(mx.array(tokens["input_ids"])))
    np.testing.assert_array_equal(index, case["ref_text"]["index"])
    real = tokens["attention_mask"].sum(-1) - 1
    # The text with "!" is pooled one token before its <|endoftext|>; the other one at it.
    assert index[0] == real[0] - 1 and index[1] == real[1]
    rows = np.arange(len(index))
    np.testing.assert_array_equal(ours["pooled"], ours["last_hidden_state"][rows, index])


def test_similarity_matches_compute_similarity(case):
    wrapper, model = case["wrapper"], case["model"]
    ref = (
        wrapper.compute_similarity(
            torch.from_numpy(case["ref_audio"]["projected"]), torch.from_numpy(case["ref_text"]["projected"])
        )
        .detach()
        .numpy()
    )
    per_audio, per_text = model.logits(
        mx.array(case["our_audio"]["projected"]), mx.array(case["our_text"]["projected"])
    )
    scale = float(np.exp(wrapper.clap.logit_scale.item()))
    assert np.abs(np.array(per_audio) - ref).max() <= scale * 2e-4
    np.testing.assert_array_equal(np.array(per_text), np.array(per_audio).T)
