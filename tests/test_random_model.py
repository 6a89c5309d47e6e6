"""`mlx-clap random-model`: a random-init model in the converted layout, to try and test everything offline.

The toy architecture (small towers, real frontend, roberta-base-sized tokenizer) carries the end-to-end
CLI runs; one full-size htsat-tiny run checks the real layout and that writing it takes seconds.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from mlx_clap.cli import main

VOCAB = 50265
RANDOM_LINE = "weights:  RANDOM (not a trained model"
WARNING = "has RANDOM weights"


def _run(args: list[str]):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def _unit_distinct(vectors: np.ndarray) -> None:
    """Finite unit rows, pairwise clearly distinct (not one vector for every input)."""
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cos = vectors @ vectors.T
    off = cos[~np.eye(len(vectors), dtype=bool)]
    assert off.max() < 0.9999, np.round(cos, 6)


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("random") / "toy"
    result = _run(["random-model", str(dest), "--arch", "toy", "--seed", "7"])
    assert result.exit_code == 0, result.output
    assert "RANDOM" in result.output
    return dest


# ------------------------------------------------------------------------------------------ tokenizer
def test_placeholder_tokenizer_is_roberta_sized_with_roberta_specials(tmp_path):
    from mlx_clap.config import ClapTextConfig
    from mlx_clap.convert.placeholder_tokenizer import generated_vocab, write_placeholder_tokenizer
    from mlx_clap.preprocess.tokenizer import load_tokenizer

    vocab, merges = generated_vocab()
    assert len(vocab) == VOCAB and sorted(vocab.values()) == list(range(VOCAB))
    assert [vocab[t] for t in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")] == [0, 1, 2, 3, VOCAB - 1]
    assert len(set(merges)) == len(merges) == VOCAB - 5 - 256
    start = time.perf_counter()
    write_placeholder_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path, ClapTextConfig())  # the loader's own RoBERTa path and size checks
    assert time.perf_counter() - start < 10  # generated, not trained: well under a second here
    assert tok.vocab_size == VOCAB
    ids = tok.encode("a dog barking")[0]
    assert ids[0] == 0 and ids[-1] == 2 and len(ids) > 3
    assert all(0 <= i < VOCAB for i in ids)
    assert tok.decode(ids) == "a dog barking"
    assert tok.encode("x <mask>")[0][-2] == VOCAB - 1
    first = (tmp_path / "merges.txt").read_bytes()
    write_placeholder_tokenizer(tmp_path / "again")
    assert (tmp_path / "again" / "merges.txt").read_bytes() == first  # deterministic


# ------------------------------------------------------------------------------------------- weights
def test_random_weights_have_realistic_scales_and_follow_the_seed():
    import mlx.nn as nn

    from mlx_clap.convert.random_init import architecture_config, random_weights
    from mlx_clap.models.clap import ClapModel

    config = architecture_config("toy", seed=3)
    weights = random_weights(config, seed=3)
    assert set(weights) == set(ClapModel.parameter_shapes(config))
    assert all(w.dtype == np.float32 and np.isfinite(w).all() for w in weights.values())
    for key in ("logit_scale_a", "logit_scale_t"):
        assert float(weights[key]) == pytest.approx(math.log(1 / 0.07), rel=1e-6)
    bn = "audio_model.audio_encoder.batch_norm."
    assert -50 <= weights[bn + "running_mean"].min() and weights[bn + "running_mean"].max() <= -20
    assert weights[bn + "running_var"].min() >= 100  # log-mel dB scale, not the unit default
    modules = dict(ClapModel(config).named_modules())
    for name, w in weights.items():
        owner, leaf = modules[name.rpartition(".")[0]], name.rpartition(".")[2]
        if isinstance(owner, nn.LayerNorm) and leaf == "weight":
            assert abs(float(w.mean()) - 1.0) < 0.05 and w.std() > 0, name
        elif isinstance(owner, nn.Linear) and leaf == "weight":
            assert w.std() == pytest.approx(1 / math.sqrt(w.shape[1]), rel=0.2), name
        elif name.endswith("word_embeddings.weight"):
            assert w.std() == pytest.approx(0.02, rel=0.05)
    again = random_weights(config, seed=3)
    other = random_weights(config, seed=4)
    key = "text_model.embeddings.word_embeddings.weight"
    np.testing.assert_array_equal(weights[key], again[key])
    assert not np.array_equal(weights[key], other[key])


# --------------------------------------------------------------------------------------- layout, info
def test_random_model_folder_is_a_converted_layout_marked_random(toy_dir):
    import mlx_clap
    from mlx_clap.io.folder import is_converted_folder

    assert is_converted_folder(toy_dir)
    names = {p.name for p in toy_dir.iterdir()}
    assert {"config.json", "model.safetensors", "manifest.json", "vocab.json", "merges.txt"} <= names
    manifest = json.loads((toy_dir / "manifest.json").read_text())
    assert manifest["random_weights"] is True and manifest["seed"] == 7
    assert manifest["architecture"] == "toy" and manifest["source_format"] == "random-init"
    assert "random init" in manifest["source"] and "NOT a trained model" in manifest["source"]
    assert set(manifest["files"]) == names - {"manifest.json"}
    config = json.loads((toy_dir / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == VOCAB and config["source"] == manifest["source"]

    model = mlx_clap.load(toy_dir)
    assert "NOT a trained model" in model.config.source  # the loaded object says so too
    assert model.tokenizer.vocab_size == VOCAB
    _unit_distinct(model.embed_text(["a dog barking", "rain on a tin roof", "jazz"]))


def test_info_says_random_and_a_trained_looking_folder_does_not(toy_dir, tmp_path):
    result = _run(["info", "--model", str(toy_dir)])
    assert result.exit_code == 0, result.output
    assert RANDOM_LINE in result.stdout
    report = json.loads(_run(["info", "--model", str(toy_dir), "--json"]).stdout)
    assert report["model"]["random_weights"] is True
    assert "NOT a trained model" in report["model"]["source"]

    # The same folder without the manifest mark: no RANDOM line, no warning (the mark is what is read).
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(toy_dir, plain)
    manifest = json.loads((plain / "manifest.json").read_text())
    del manifest["random_weights"]
    (plain / "manifest.json").write_text(json.dumps(manifest))
    result = _run(["info", "--model", str(plain)])
    assert result.exit_code == 0 and "RANDOM" not in result.stdout
    report = json.loads(_run(["info", "--model", str(plain), "--json"]).stdout)
    assert report["model"]["random_weights"] is False
    text = _run(["embed-text", "a dog", "--model", str(plain)])
    assert text.exit_code == 0 and WARNING not in text.stderr


# ------------------------------------------------------------------------------------ end to end
def test_embed_and_search_run_end_to_end_on_the_random_model(toy_dir, tmp_path):
    import mlx_clap

    src = tmp_path / "clips"
    src.mkdir()
    sr = 48000
    t = np.arange(2 * sr) / sr
    sf.write(src / "tone.wav", 0.3 * np.sin(2 * np.pi * 440 * t), sr)
    sf.write(src / "noise.wav", 0.1 * np.random.default_rng(0).standard_normal(2 * sr), sr)
    out = tmp_path / "vectors"

    result = _run(["embed", str(src), "--out", str(out), "--model", str(toy_dir)])
    assert result.exit_code == 0, result.output
    assert result.stderr.count(WARNING) == 1  # one line on stderr, naming the folder
    assert str(toy_dir) in result.stderr

    result = _run(["search", str(out), "--text", "a dog barking", "-k", "2", "--json"])
    assert result.exit_code == 0, result.output
    assert WARNING in result.stderr
    hits = json.loads(result.stdout)["results"]
    assert sorted(Path(h["path"]).name for h in hits) == ["noise.wav", "tone.wav"]

    # The scores are the model's own: the text vector against each file's vector, from the Python API.
    model = mlx_clap.load(toy_dir)
    query = model.embed_text(["a dog barking"])[0]
    files = [Path(h["path"]) for h in hits]
    audio = model.embed_audio(files)
    _unit_distinct(audio)
    np.testing.assert_allclose([h["score"] for h in hits], audio @ query, atol=1e-5)


def test_full_size_htsat_tiny_is_the_real_architecture_and_fast(tmp_path):
    import mlx_clap
    from mlx_clap.config import ClapConfig

    dest = tmp_path / "htsat-tiny"
    start = time.perf_counter()
    result = _run(["random-model", str(dest)])  # default --arch htsat-tiny
    took = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    assert took < 60, f"writing the full-size model took {took:.1f} s"  # ~10 s on a shared 2-core CPU

    config = json.loads((dest / "config.json").read_text())
    expected = ClapConfig().to_dict()  # laion/clap-htsat-unfused's architecture: HTSAT-tiny + roberta-base
    for section in ("audio_config", "text_config", "feature_config"):
        assert config[section] == expected[section], section
    assert config["projection_dim"] == 512
    assert (dest / "model.safetensors").stat().st_size > 550e6  # ~153M float32 parameters

    model = mlx_clap.load(dest)
    _unit_distinct(model.embed_text(["a dog barking", "rain on a tin roof", "a dog barking."]))
    sr = 48000
    t = np.arange(sr) / sr
    clips = [0.3 * np.sin(2 * np.pi * 440 * t), 0.1 * np.random.default_rng(1).standard_normal(sr)]
    _unit_distinct(model.embed_audio([c.astype(np.float32) for c in clips]))


def test_help_has_a_runnable_example():
    result = _run(["random-model", "--help"])
    assert result.exit_code == 0 and "Example" in result.output and "mlx-clap random-model " in result.output


def test_random_model_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = _run(["random-model", str(tmp_path), "--arch", "toy", "--force"])
    assert result.exit_code != 0 and "refusing to replace it" in result.output
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_random_model_needs_no_torch_or_transformers(tmp_path):
    """Runs in a process where importing torch or transformers fails: the command, loading and a text
    embedding succeed, and neither module was ever imported."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        "sys.modules['transformers'] = None\n"
        "from mlx_clap.cli import main\n"
        "main(['random-model', sys.argv[1], '--arch', 'toy'], standalone_mode=False)\n"
        "import mlx_clap\n"
        "v = mlx_clap.load(sys.argv[1]).embed_text(['a dog barking'])\n"
        "assert v.shape == (1, 512), v.shape\n"
        "assert sys.modules['torch'] is None and sys.modules['transformers'] is None\n"
        "print('clean')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "m")], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and "clean" in out.stdout, out.stderr
    assert json.loads((tmp_path / "m" / "manifest.json").read_text())["random_weights"] is True
