"""msclap models through the public API (`mlx_clap.load`, embed_audio/embed_text/classify/logits) on
narrow random models: shapes, unit norms, long and stereo audio, batching, dtype, bad input, offline errors.

Numerical parity with msclap is in test_msclap_parity.py; these check the plumbing around the towers.
"""

from __future__ import annotations

import json
import random

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[test]')")
import transformers  # noqa: E402,F401  (the converter's tokenizer.json writer)
from fixtures import TINY_AUDIO
from msclap_reference import train_bert_files, train_gpt2_files

import mlx_clap
from mlx_clap.config import ClapAudioConfig
from mlx_clap.io.folder import WeightsError
from mlx_clap.models.msclap.config import BertTextConfig, Cnn14Config, GPT2TextConfig, MsClapConfig
from mlx_clap.models.msclap.model import MsClapModel, save_msclap_folder

SR = 44100


def tiny_config(version: str) -> MsClapConfig:
    cfg = MsClapConfig.for_version(version)
    cfg.d_proj = 16
    cfg.transformer_embed_dim = 32
    cfg.gpt2 = GPT2TextConfig(vocab_size=1300, n_positions=256, n_embd=32, n_layer=2, n_head=2)
    cfg.bert = BertTextConfig(
        vocab_size=1300,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
    )
    cfg.cnn14 = Cnn14Config(channels=(4, 4, 8, 8, 8, 16), out_emb=24)
    cfg.htsat = ClapAudioConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in TINY_AUDIO.items()})
    cfg.out_emb = cfg.htsat.hidden_size if version == "2023" else cfg.cnn14.out_emb
    return cfg


@pytest.fixture(scope="module", params=["2023", "2022"])
def folder(request, tmp_path_factory):
    from mlx_clap.convert.msclap import write_tokenizer_json
    from mlx_clap.dsp import slaney_mel_filterbank

    version = request.param
    tmp = tmp_path_factory.mktemp(f"tiny{version}")
    cfg = tiny_config(version)
    mx.random.seed(int(version))
    model = MsClapModel(cfg)
    model.audio_encoder.base.logmel_extractor.melW = mx.array(
        slaney_mel_filterbank(cfg.mel_sampling_rate, 1024, 64, cfg.fmin, cfg.fmax)
    )
    model.logit_scale = mx.array(3.0)
    save_msclap_folder(model, tmp / "model")
    files = train_gpt2_files(tmp / "tok") if version == "2023" else train_bert_files(tmp / "tok")
    write_tokenizer_json(files, cfg.text_model, tmp / "model" / "tokenizer.json")
    return tmp / "model"


@pytest.fixture(scope="module")
def model(folder):
    return mlx_clap.load(folder)


def signal(seconds: float, seed: int = 0, channels: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (int(seconds * SR),) if channels is None else (channels, int(seconds * SR))
    return (0.1 * rng.standard_normal(shape)).astype(np.float32)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_load_gives_a_msclap_model(model, folder):
    from mlx_clap.pipeline import Embedder
    from mlx_clap.pipeline.msclap import MsClapFamily

    assert isinstance(model, Embedder) and isinstance(model.model, MsClapModel)
    assert isinstance(model.family, MsClapFamily) and model.family.name == "msclap"
    assert model.embedding_dim == 16
    assert model.source_dir == folder
    assert MsClapConfig.from_dict(json.loads((folder / "config.json").read_text())) == model.config


def test_short_clip_is_tiled_and_unit(model):
    wave = signal(1.3)
    emb = model.embed_audio(wave)
    n = model.config.clip_samples
    tiled = np.tile(wave, -(-n // wave.size))[:n]
    direct = np.array(model.get_audio_features(mx.array(tiled[None])))
    assert emb.shape == (1, 16) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(emb, direct, atol=1e-6)


def test_long_audio_modes(model):
    n = model.config.clip_samples
    wave = signal(2.5 * n / SR, seed=1)
    windows = [wave[:n], wave[n : 2 * n], wave[-n:]]
    per_window = np.array(model.get_audio_features(mx.array(np.stack(windows))))
    np.testing.assert_allclose(model.embed_audio(wave), unit(per_window.mean(0, keepdims=True)), atol=1e-6)
    np.testing.assert_allclose(model.embed_audio(wave, long_audio="head"), per_window[:1], atol=1e-6)
    start = random.Random(7).randrange(wave.size - n)
    crop = np.array(model.get_audio_features(mx.array(wave[None, start : start + n])))
    np.testing.assert_allclose(model.embed_audio(wave, long_audio="reference", seed=7), crop, atol=1e-6)


def test_reference_mode_draws_one_stream_per_call(model, monkeypatch):
    # msclap's `random.randrange(N - length)` per long clip, from one stream for the whole call (in clip
    # order, short clips draw nothing), however the clips are batched: not re-seeded per batch.
    n = model.config.clip_samples
    waves = [signal(1.7 * n / SR, seed=11), signal(0.5, seed=12), signal(2.2 * n / SR, seed=13)]
    rng = random.Random(7)
    clips = []
    for wave in waves:
        if wave.size <= n:
            clips.append(np.tile(wave, -(-n // wave.size))[:n])
        else:
            start = rng.randrange(wave.size - n)
            clips.append(wave[start : start + n])
    clips = np.stack(clips)
    expected = np.array(model.get_audio_features(mx.array(clips)))

    fed: list[np.ndarray] = []  # the clips the family hands to the model, batch by batch
    whole_inputs = model.family.whole_inputs

    def spy(*args, **kwargs):
        inputs, owner = whole_inputs(*args, **kwargs)
        fed.append(np.array(inputs[0]))
        return inputs, owner

    monkeypatch.setattr(model.family, "whole_inputs", spy)
    for batch_size in (1, 2, 3):
        fed.clear()
        got = model.embed_audio(waves, long_audio="reference", seed=7, batch_size=batch_size)
        assert len(fed) == -(-len(waves) // batch_size)
        np.testing.assert_array_equal(np.concatenate(fed), clips, err_msg=f"batch_size {batch_size}")
        np.testing.assert_allclose(got, expected, atol=1e-6, err_msg=f"batch_size {batch_size}")
    # Re-seeded per batch, the third clip would be cropped with the first draw: another window.
    first = random.Random(7).randrange(waves[2].size - n)
    assert np.abs(clips[2] - waves[2][first : first + n]).max() > 0.1
    # Without a seed: Python's global `random`, one stream too (replayable with random.seed).
    fed.clear()
    random.seed(7)
    unseeded = model.embed_audio(waves, long_audio="reference", batch_size=1)
    np.testing.assert_array_equal(np.concatenate(fed), clips)
    np.testing.assert_allclose(unseeded, expected, atol=1e-6)


def test_streaming_windows_equal_embed_audio(model):
    n = model.config.clip_samples
    wave = signal(2.5 * n / SR, seed=9)
    blocks = np.array_split(wave, 7)
    np.testing.assert_allclose(
        model.embed_windows(iter(blocks), batch_size=2), model.embed_audio(wave)[0], atol=1e-6
    )
    short = signal(0.7, seed=10)
    np.testing.assert_allclose(model.embed_windows([short]), model.embed_audio(short)[0], atol=1e-6)
    with pytest.raises(ValueError, match="empty"):
        model.embed_windows(iter([]))


def test_stereo_and_batching(model):
    stereo = signal(2.0, seed=2, channels=2)
    mono = stereo.mean(axis=0)
    batch = model.embed_audio([stereo, mono, signal(0.5, seed=3)], batch_size=2)
    np.testing.assert_allclose(batch[0], batch[1], atol=1e-6)
    np.testing.assert_allclose(batch[2:], model.embed_audio(signal(0.5, seed=3)), atol=1e-6)
    concat = model.embed_audio(stereo, stereo="concat")
    # The reference mode plays the channels one after the other, as msclap's reshape(-1).
    np.testing.assert_allclose(concat, model.embed_audio(stereo.reshape(-1)), atol=1e-6)


def test_audio_file_input(model, tmp_path):
    import soundfile as sf

    wave = signal(1.0, seed=4)
    path = tmp_path / "clip.wav"
    sf.write(path, wave, SR, subtype="FLOAT")
    np.testing.assert_allclose(model.embed_audio(path), model.embed_audio(wave), atol=1e-6)
    with pytest.raises(ValueError):
        model.embed_audio(tmp_path / "missing.wav")


@pytest.mark.parametrize(
    "bad, kwargs, exc, match",
    [
        (np.zeros(0, np.float32), {}, ValueError, "empty"),
        (np.full(100, np.nan, np.float32), {}, ValueError, "NaN"),
        (np.zeros((2, 2, 2), np.float32), {}, ValueError, "1-D"),
        (np.ones(100, np.float32), {"long_audio": "middle"}, ValueError, "long_audio"),
        (np.ones(100, np.float32), {"stereo": "left"}, ValueError, "stereo"),
        (np.ones(100, np.float32), {"batch_size": 0}, ValueError, "batch_size"),
        (np.ones(100, np.float32), {"quantize_int16": True}, ValueError, "LAION"),
    ],
)
def test_bad_audio_input(model, bad, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        model.embed_audio([np.ones(10, np.float32), bad], **kwargs)


def test_get_audio_embeddings_wants_whole_clips(model):
    with pytest.raises(ValueError, match="embed_audio"):
        model.get_audio_embeddings(mx.zeros((1, 1000)))


def test_text_embeddings(model):
    texts = ["a dog barks!", "rain on a roof", ""]
    emb = model.embed_text(texts)
    assert emb.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-6)
    one_by_one = np.concatenate([model.embed_text(t) for t in texts])
    np.testing.assert_allclose(emb, one_by_one, atol=1e-5)
    assert model.embed_text([]).shape == (0, 16)
    with pytest.raises(TypeError, match="item 1"):
        model.embed_text(["ok", None])


def test_logits_and_classify(model):
    audio = model.embed_audio([signal(1.0, seed=5), signal(1.0, seed=6)])
    text = model.embed_text(["dog", "rain", "engine"])
    per_audio, per_text = model.logits(mx.array(audio), mx.array(text))
    np.testing.assert_allclose(np.array(per_audio), np.exp(3.0) * audio @ text.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.array(per_text), np.array(per_audio).T)
    # Un-normalized inputs are normalized first, as msclap's compute_similarity.
    np.testing.assert_allclose(
        np.array(model.logits(mx.array(5 * audio), mx.array(text))[0]), np.array(per_audio), rtol=1e-5
    )
    probs = model.classify(audio, ["dog", "rain", "engine"])
    assert probs.shape == (2, 3)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="no labels"):
        model.classify(audio, [])


def test_half_precision_keeps_the_frontend_in_float32(folder, model):
    half = mlx_clap.load(folder, dtype="float16")
    assert half.audio_encoder.base.logmel_extractor.melW.dtype == mx.float32
    wave = signal(1.0, seed=8)
    a32, a16 = model.embed_audio(wave), half.embed_audio(wave)
    assert np.isfinite(a16).all()
    assert float((a32 * a16).sum()) >= 0.99


def test_folder_without_tokenizer(folder, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    (bare / "tokenizer.json").unlink()
    m = mlx_clap.load(bare)
    assert m.embed_audio(signal(0.2)).shape == (1, 16)  # audio still works
    with pytest.raises(RuntimeError, match="tokenizer.json"):
        m.embed_text("a dog")


def test_corrupt_folders(folder, tmp_path):
    import re
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    config_file, weights_file = re.escape(str(bad / "config.json")), re.escape(str(bad / "model.safetensors"))

    def refused(match: str) -> None:
        # The bare module (MsClapModel.from_pretrained) and the public load() give the same error.
        with pytest.raises(WeightsError, match=match):
            MsClapModel.from_pretrained(bad)
        with pytest.raises(WeightsError, match=match):
            mlx_clap.load(bad)

    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "format_version": 99}))
    refused(f"{config_file}: format_version 99")
    (bad / "config.json").write_text(json.dumps({**cfg, "version": "2031"}))
    refused(f"{config_file}: .*2031")
    (bad / "config.json").write_text(json.dumps({**cfg, "d_proj": 32}))
    refused(f"{weights_file}: weights do not match the model config: .*shape")
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "tokenizer.json").write_text("{not json")
    # The tokenizer is the family adapter's (the module loads without it); load() names the file.
    assert isinstance(MsClapModel.from_pretrained(bad), MsClapModel)
    with pytest.raises(WeightsError, match=f"{re.escape(str(bad / 'tokenizer.json'))}: cannot use it"):
        mlx_clap.load(bad)
    (bad / "tokenizer.json").unlink()
    (bad / "model.safetensors").write_bytes(b"\x00" * 16)
    refused(f"{weights_file}: cannot read safetensors")
    (bad / "model.safetensors").unlink()
    refused(f"{re.escape(str(bad))}: no model.safetensors")


def test_runtime_does_not_import_torch(folder):
    import subprocess
    import sys

    code = (
        "import sys, numpy as np, mlx_clap\n"
        f"m = mlx_clap.load({str(folder)!r})\n"
        "m.embed_audio(np.zeros(1000, np.float32)); m.embed_text(['a dog'])\n"
        "bad = [k for k in sys.modules if k.split('.')[0] in ('torch', 'transformers', 'msclap')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_embed_and_classify_with_a_msclap_folder(model, folder, tmp_path):
    """`mlx-clap embed --model <msclap folder>` decodes at 44.1 kHz and writes what embed_audio gives."""
    import soundfile as sf
    from click.testing import CliRunner

    from mlx_clap.cli import main

    stereo_48k = np.stack([signal(2.5, seed=7, channels=None), signal(2.5, seed=8)])
    path = tmp_path / "clip.flac"
    sf.write(path, stereo_48k.T, 48000)
    r = CliRunner().invoke(main, ["embed", str(path), "--model", str(folder), "-q"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.stdout.splitlines()[0])
    np.testing.assert_allclose(row["embedding"], model.embed_audio(path)[0], atol=1e-5)
    args = ["classify", str(path), "--labels", "dog,rain", "--model", str(folder), "--json"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
