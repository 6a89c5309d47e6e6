"""Model files as untrusted input: pickles, `convert --force`, config bounds, safetensors headers, float
weights, already converted sources, tokenizer size, store model paths and hub hints.

Every test here failed on the code before the hardening (see the report of the "model" task).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import shutil
import struct
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from fixtures import TINY_AUDIO, TINY_TEXT

from mlx_clap.cli import main
from mlx_clap.io.folder import WeightsError

MODEL_COMMANDS = ("embed", "embed-text", "info", "search", "classify", "convert")


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A converted tiny random-init model with a 1000-token BPE tokenizer (as tests/test_cli_embed.py)."""
    from fixtures import train_bpe_files

    from mlx_clap.config import ClapAudioConfig, ClapConfig, ClapTextConfig
    from mlx_clap.io.folder import save_converted
    from mlx_clap.models.clap import ClapModel

    folder = tmp_path_factory.mktemp("tiny_model") / "tiny"
    mx.random.seed(0)
    model = ClapModel(
        ClapConfig(
            audio_config=ClapAudioConfig.from_dict(TINY_AUDIO),
            text_config=ClapTextConfig.from_dict(TINY_TEXT),
        )
    )
    save_converted(model, folder)
    (folder / "manifest.json").write_text(json.dumps({"format_version": 1, "converter": "test"}))
    train_bpe_files(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_params(tiny_model_dir) -> dict[str, np.ndarray]:
    """The tiny model's parameters (MLX names = HF names, MLX layouts)."""
    return {k: np.array(v) for k, v in mx.load(str(tiny_model_dir / "model.safetensors")).items()}


def _hf_layout(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """MLX layouts back to torch's: convolutions OHWI -> OIHW."""
    return {k: (v.transpose(0, 3, 1, 2) if v.ndim == 4 else v) for k, v in params.items()}


@pytest.fixture(scope="module")
def tiny_hf_dir(tiny_params, tmp_path_factory) -> Path:
    """The tiny model as a Hugging Face folder (hub config.json, torch-layout model.safetensors)."""
    from safetensors.numpy import save_file

    folder = tmp_path_factory.mktemp("tiny_hf") / "hf"
    folder.mkdir()
    config = {
        "model_type": "clap",
        "audio_config": TINY_AUDIO,
        "text_config": TINY_TEXT,
        "projection_dim": 512,
    }
    (folder / "config.json").write_text(json.dumps(config))
    save_file(
        {k: np.ascontiguousarray(v) for k, v in _hf_layout(tiny_params).items()},
        str(folder / "model.safetensors"),
    )
    return folder


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    """$MLX_CLAP_CACHE pointed at an empty test folder, in force now (settings are parsed once)."""
    from mlx_clap import settings

    cache = tmp_path / "cache"
    monkeypatch.setenv("MLX_CLAP_CACHE", str(cache))
    settings.reset()
    yield cache
    settings.reset()


@pytest.fixture
def wav(tmp_path) -> Path:
    path = tmp_path / "a.wav"
    sf.write(path, 0.1 * np.sin(np.arange(48_000) / 7.0).astype(np.float32), 48_000)
    return path


def _hf_to_laion(hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of `laion_state_to_hf` for the tensors the MLX model has (qkv merged, LAION names)."""
    out: dict[str, np.ndarray] = {}
    for key, value in hf.items():
        if key.startswith("text_model."):
            out["text_branch." + key[len("text_model.") :]] = value
            continue
        if key.startswith("audio_projection.") or key.startswith("text_projection."):
            out[key.replace(".linear1.", ".0.").replace(".linear2.", ".2.")] = value
            continue
        if not key.startswith("audio_model.audio_encoder."):
            out[key] = value  # logit scales
            continue
        new = "audio_branch." + key[len("audio_model.audio_encoder.") :]
        if re.search(r"\.attention\.self\.(key|value)\.", new):
            continue  # merged with the query below
        if ".attention.self.query." in new:
            parts = [hf[key.replace(".query.", f".{p}.")] for p in ("query", "key", "value")]
            out[new.replace(".attention.self.query.", ".attn.qkv.")] = np.concatenate(parts, axis=0)
            continue
        for old, repl in (
            (".attention.self.", ".attn."),
            (".attention.output.dense.", ".attn.proj."),
            (".intermediate.dense.", ".mlp.fc1."),
            (".output.dense.", ".mlp.fc2."),
            (".layernorm_before.", ".norm1."),
            (".layernorm_after.", ".norm2."),
            ("batch_norm.", "bn0."),
        ):
            new = new.replace(old, repl)
        out[new] = value
    return out


@pytest.fixture(scope="module")
def laion_state(tiny_params) -> dict:
    """A LAION-CLAP state dict ("module." prefix, torch tensors) of the tiny model; its HF renaming is
    checked to give the tiny model's tensors back, so the `.pt` files below are faithful."""
    import torch

    from mlx_clap.convert.laion_pt import laion_state_to_hf

    hf = _hf_layout(tiny_params)
    laion = _hf_to_laion(hf)
    back = laion_state_to_hf(laion)
    assert set(back) == set(hf)
    for key in hf:
        np.testing.assert_array_equal(back[key], hf[key], err_msg=key)
    return {f"module.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in laion.items()}


@pytest.fixture
def real_pt(laion_state, tmp_path) -> Path:
    """Like a released LAION file: numpy scalars and the training arguments pickled next to the weights,
    which torch's weights-only unpickler refuses."""
    import torch

    path = tmp_path / "630k-tiny.pt"
    obj = {"epoch": np.int64(3), "args": argparse.Namespace(amodel="HTSAT-tiny"), "state_dict": laion_state}
    torch.save(obj, path)
    return path


class Touch:
    """Unpickling this creates `marker` (what an attacker's `__reduce__` would do, harmlessly)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.fixture
def evil_pt(laion_state, tmp_path) -> tuple[Path, Path]:
    """A LAION-looking `.pt` whose unpickling would create a marker file."""
    import torch

    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    torch.save({"epoch": 1, "state_dict": laion_state, "payload": Touch(marker)}, path)
    return path, marker


# ---------------------------------------------------------------------------- 2: pickled checkpoints
def test_malicious_pt_is_refused_by_the_converter_and_load(evil_pt, tmp_path, cache_dir):
    import mlx_clap
    from mlx_clap.convert.laion_pt import convert_laion_pt

    path, marker = evil_pt
    with pytest.raises(WeightsError, match=r"evil\.pt: .*refused.*--trust-pickle.*trust_pickle=True"):
        convert_laion_pt(path, tmp_path / "out")
    with pytest.raises(WeightsError, match=r"evil\.pt: .*--trust-pickle"):
        mlx_clap.load(path)
    from mlx_clap.loading import convert_to_cache

    with pytest.raises(WeightsError, match="--trust-pickle"):
        convert_to_cache(path)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_the_malicious_fixture_really_runs_code_when_trusted(evil_pt, tmp_path):
    # Proves the test above can fail: with the explicit opt-in the payload does run.
    from mlx_clap.convert.common import torch_state_dict

    path, marker = evil_pt
    torch_state_dict(path, "LAION .pt", trust_pickle=True)
    assert marker.exists()


@pytest.mark.parametrize("command", ["embed", "embed-text", "info", "classify", "convert"])
def test_malicious_pt_is_refused_by_every_command(command, evil_pt, tmp_path, wav, cache_dir):
    path, marker = evil_pt
    args = {
        "embed": ["embed", str(wav), "--model", str(path)],
        "embed-text": ["embed-text", "a dog", "--model", str(path)],
        "info": ["info", "--model", str(path)],
        "classify": ["classify", str(wav), "--labels", "dog,rain", "--model", str(path)],
        "convert": ["convert", str(path), str(tmp_path / "out")],
    }[command]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1, res.output
    assert "--trust-pickle" in res.output and "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert not marker.exists()


def test_malicious_pt_is_refused_by_search(evil_pt, tiny_model_dir, wav, tmp_path, cache_dir):
    path, marker = evil_pt
    runner = CliRunner()
    res = runner.invoke(
        main, ["embed", str(wav), "--model", str(tiny_model_dir), "--out", str(tmp_path / "s")]
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["search", str(tmp_path / "s"), "--text", "dog", "--model", str(path)])
    assert res.exit_code == 1 and "--trust-pickle" in res.output, res.output
    assert not marker.exists()


def test_real_laion_pt_converts_with_trust_pickle(real_pt, tiny_model_dir, tmp_path, cache_dir):
    import mlx_clap
    from mlx_clap.convert.laion_pt import convert_laion_pt

    with pytest.raises(WeightsError, match="--trust-pickle"):
        convert_laion_pt(real_pt, tmp_path / "refused")
    out = convert_laion_pt(real_pt, tmp_path / "out", trust_pickle=True)
    converted = mlx_clap.load(out)
    reference = mlx_clap.load(tiny_model_dir)
    waves = [0.1 * np.random.default_rng(1).standard_normal(48_000).astype(np.float32)]
    np.testing.assert_allclose(converted.embed_audio(waves), reference.embed_audio(waves), atol=1e-5)
    # The load path and the command line take the same opt-in.
    assert mlx_clap.load(real_pt, trust_pickle=True).embedding_dim == 512
    res = CliRunner().invoke(main, ["convert", str(real_pt), str(tmp_path / "cli"), "--trust-pickle"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["info", "--model", str(real_pt), "--trust-pickle", "--json"])
    assert res.exit_code == 0 and "error" not in json.loads(res.output)["model"], res.output


def test_plain_tensor_pickles_need_no_opt_in(laion_state, tmp_path, cache_dir):
    # What weights_only=True can read (tensors, ints, dicts) converts without --trust-pickle.
    import torch

    from mlx_clap.convert.laion_pt import convert_laion_pt

    torch.save({"epoch": 1, "state_dict": laion_state}, tmp_path / "plain.pt")
    assert (convert_laion_pt(tmp_path / "plain.pt", tmp_path / "out") / "model.safetensors").is_file()


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_help_names_trust_pickle(command):
    res = CliRunner().invoke(main, [command, "--help"])
    assert res.exit_code == 0 and "--trust-pickle" in res.output and "trust" in res.output


# ------------------------------------------------------------------------------------ 3: --force
def test_force_refuses_a_folder_that_is_not_ours(tiny_hf_dir, tmp_path):
    victim = tmp_path / "home"
    victim.mkdir()
    (victim / "thesis.txt").write_text("years of work")
    (victim / "sub").mkdir()
    (victim / "sub" / "data.bin").write_bytes(b"x")
    res = CliRunner().invoke(main, ["convert", str(tiny_hf_dir), str(victim), "--force"])
    assert res.exit_code == 1 and "not an mlx-clap converted folder" in res.output, res.output
    assert "Traceback" not in res.output
    assert (victim / "thesis.txt").read_text() == "years of work" and (victim / "sub" / "data.bin").is_file()
    # The Python converter refuses too.
    from mlx_clap.convert.hf import convert_hf_folder

    with pytest.raises(WeightsError, match="refusing to replace"):
        convert_hf_folder(tiny_hf_dir, victim)
    assert (victim / "thesis.txt").is_file()


def test_force_replaces_an_earlier_converted_folder_or_an_empty_one(tiny_hf_dir, tmp_path):
    runner = CliRunner()
    dest = tmp_path / "out"
    assert runner.invoke(main, ["convert", str(tiny_hf_dir), str(dest)]).exit_code == 0
    (dest / "stale.txt").write_text("old")
    res = runner.invoke(main, ["convert", str(tiny_hf_dir), str(dest), "--force"])
    assert res.exit_code == 0, res.output
    assert not (dest / "stale.txt").exists() and (dest / "manifest.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging or old folder left
    empty = tmp_path / "empty"
    empty.mkdir()
    assert runner.invoke(main, ["convert", str(tiny_hf_dir), str(empty), "--force"]).exit_code == 0
    afile = tmp_path / "file"
    afile.write_text("x")
    res = runner.invoke(main, ["convert", str(tiny_hf_dir), str(afile), "--force"])
    assert res.exit_code != 0 and afile.read_text() == "x"


# --------------------------------------------------------------------------------- 7: config bounds
BAD_FIELDS = [
    ("audio_config", "depths", [10**6, 1, 1, 1], r"audio_config\.depths\[0\]"),
    ("audio_config", "depths", "2262", r"audio_config\.depths"),
    ("audio_config", "num_attention_heads", [3, 2, 4, 8], r"audio_config\.num_attention_heads\[0\].*divide"),
    ("audio_config", "hidden_size", 10**6, r"audio_config\.hidden_size"),
    ("audio_config", "window_size", 0, r"audio_config\.window_size"),
    ("text_config", "vocab_size", 2_000_000, r"text_config\.vocab_size"),
    ("text_config", "num_hidden_layers", 10**6, r"text_config\.num_hidden_layers"),
    ("text_config", "num_attention_heads", 3, r"text_config\.num_attention_heads.*divide"),
    ("text_config", "hidden_size", 32.5, r"text_config\.hidden_size.*integer"),
    ("feature_config", "sampling_rate", 1000, r"feature_config\.sampling_rate"),
    ("feature_config", "hop_length", -480, r"feature_config\.hop_length"),
]


def _ids(cases: list) -> list[str]:
    return [f"{section}.{field}={str(value)[:12]}" for section, field, value, _ in cases]


@pytest.mark.parametrize(("section", "field", "value", "pattern"), BAD_FIELDS, ids=_ids(BAD_FIELDS))
def test_converted_config_out_of_bounds_is_refused_before_allocating(
    tiny_model_dir, tmp_path, section, field, value, pattern
):
    import mlx_clap

    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config[section][field] = value
    (folder / "config.json").write_text(json.dumps(config))
    started = time.perf_counter()
    with pytest.raises(WeightsError, match=rf"m/config\.json: .*{pattern}"):
        mlx_clap.load(folder)
    assert time.perf_counter() - started < 5  # refused up front, nothing sized by the bad value


@pytest.mark.parametrize(
    ("section", "field", "value", "pattern"),
    BAD_FIELDS[:3] + BAD_FIELDS[5:8],
    ids=_ids(BAD_FIELDS[:3] + BAD_FIELDS[5:8]),
)
def test_hf_config_out_of_bounds_is_refused_by_load_and_convert(
    tiny_hf_dir, tmp_path, section, field, value, pattern
):
    import mlx_clap
    from mlx_clap.convert.hf import convert_hf_folder

    folder = tmp_path / "hf"
    shutil.copytree(tiny_hf_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config[section][field] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=rf"hf/config\.json: .*{pattern}"):
        mlx_clap.load(folder)
    with pytest.raises(WeightsError, match=rf"hf/config\.json: .*{pattern}"):
        convert_hf_folder(folder, tmp_path / "out")
    res = CliRunner().invoke(main, ["convert", str(folder), str(tmp_path / "out")])
    assert res.exit_code == 1 and "config.json" in res.output and "Traceback" not in res.output


def test_msclap_config_out_of_bounds_is_refused(tmp_path):
    from mlx_clap.models.msclap.config import MsClapConfig
    from mlx_clap.models.msclap.model import MsClapModel

    for field, value, pattern in (
        ("n_layer", 10**6, r"gpt2\.n_layer"),
        ("n_head", 7, r"gpt2\.n_head.*divide"),
        ("vocab_size", 10**7, r"gpt2\.vocab_size"),
    ):
        data = MsClapConfig().to_dict()
        data["gpt2"][field] = value
        (tmp_path / "config.json").write_text(json.dumps(data))
        with pytest.raises(WeightsError, match=rf"config\.json: .*{pattern}"):
            MsClapModel.from_pretrained(tmp_path)
    data = MsClapConfig().to_dict()
    data["sampling_rate"] = 10**7
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(WeightsError, match=r"config\.json: .*sampling_rate"):
        MsClapModel.from_pretrained(tmp_path)


def test_laion_architecture_read_off_tensors_is_checked():
    from mlx_clap.convert.laion_pt import config_from_laion_state

    enc = "audio_model.audio_encoder."
    state = {
        enc + "batch_norm.weight": np.zeros(64, np.float32),
        enc + "patch_embed.proj.weight": np.zeros((8, 1, 4, 4), np.float32),
        "audio_projection.linear1.weight": np.zeros((512, 64), np.float32),
        "audio_projection.linear2.weight": np.zeros((512, 512), np.float32),
        "text_projection.linear2.weight": np.zeros((512, 512), np.float32),
        "text_model.embeddings.word_embeddings.weight": np.zeros((100, 64), np.float32),
        "text_model.embeddings.position_embeddings.weight": np.zeros((80, 64), np.float32),
        "text_model.embeddings.token_type_embeddings.weight": np.zeros((1, 64), np.float32),
        "text_model.encoder.layer.0.intermediate.dense.weight": np.zeros((128, 64), np.float32),
    }
    for i, heads in enumerate((3, 2, 4, 8)):  # 3 heads cannot split stage 0's width of 8
        state[enc + f"layers.{i}.blocks.0.attention.self.relative_position_bias_table"] = np.zeros(
            (225, heads), np.float32
        )
    with pytest.raises(WeightsError, match=r"audio_config\.num_attention_heads\[0\] = 3 does not divide"):
        config_from_laion_state(state)


def test_released_model_configs_are_inside_the_bounds():
    from mlx_clap.config import ClapAudioConfig, ClapConfig, ClapTextConfig, config_from_hf
    from mlx_clap.models.msclap.config import MsClapConfig

    ClapConfig().validate()  # HTSAT-tiny, roberta-base (clap-htsat-unfused / fused)
    base = ClapAudioConfig(
        patch_embeds_hidden_size=128,
        depths=(2, 2, 12, 2),
        hidden_size=1024,
        enable_fusion=True,
        fusion_type="aff_2d",
    )
    ClapConfig(audio_config=base, text_config=ClapTextConfig()).validate()  # larger_clap_*, HTSAT-base
    for version in ("2022", "2023"):
        MsClapConfig.for_version(version).validate()
    hub = {
        "model_type": "clap",
        "audio_config": {"patch_stride": [4, 4], "depths": [2, 2, 6, 2], "fusion_type": None},
        "text_config": {"vocab_size": 50265, "max_length": 20},
    }
    pre = {
        "feature_size": 64,
        "sampling_rate": 48000,
        "hop_length": 480,
        "top_db": None,
        "truncation": "fusion",
    }
    config_from_hf(hub, pre)


# -------------------------------------------------------------------------- 7: safetensors headers
def _safetensors(header: object, body: bytes, length: int | None = None) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
BAD_HEADERS = {
    "length-past-end": (_safetensors({"a": F32}, b"\0" * 8, length=10**12), "header length"),
    "length-zero": (_safetensors({"a": F32}, b"\0" * 8, length=0), "header length"),
    "short-file": (b"\x01\x02", "shorter than"),
    "not-json": (_safetensors(b"{not json", b""), "not valid JSON"),
    "not-an-object": (_safetensors([1, 2], b""), "not a JSON object"),
    "offsets-past-end": (_safetensors({"a": {**F32, "data_offsets": [0, 800]}}, b"\0" * 8), "past the end"),
    "offsets-reversed": (_safetensors({"a": {**F32, "data_offsets": [8, 0]}}, b"\0" * 8), "data_offsets"),
    "overlapping": (
        _safetensors({"a": F32, "b": {**F32, "data_offsets": [4, 12]}}, b"\0" * 12),
        "overlap",
    ),
    "size-mismatch": (_safetensors({"a": {**F32, "shape": [3]}}, b"\0" * 8), "bytes of data for shape"),
    "bad-shape": (_safetensors({"a": {**F32, "shape": [-2]}}, b"\0" * 8), "shape"),
    "bad-dtype": (_safetensors({"a": {**F32, "dtype": "X9"}}, b"\0" * 8), "unsupported dtype"),
    "entry-not-object": (_safetensors({"a": 5}, b""), "not an object"),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_malformed_safetensors_header_is_a_weights_error_in_both_readers(case, tmp_path):
    from mlx_clap.convert.common import read_safetensors as read_numpy
    from mlx_clap.io.folder import read_safetensors as read_mlx

    data, cause = BAD_HEADERS[case]
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    for reader in (read_mlx, read_numpy):
        with pytest.raises(WeightsError, match=rf"model\.safetensors: .*{re.escape(cause)}"):
            reader(path)


def test_malformed_safetensors_in_convert_is_a_clean_error(tiny_hf_dir, tmp_path):
    folder = tmp_path / "hf"
    shutil.copytree(tiny_hf_dir, folder)
    (folder / "model.safetensors").write_bytes(BAD_HEADERS["not-an-object"][0])
    res = CliRunner().invoke(main, ["convert", str(folder), str(tmp_path / "out")])
    assert res.exit_code == 1 and "model.safetensors" in res.output and "JSON object" in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.output


def test_good_safetensors_still_read(tiny_model_dir):
    from mlx_clap.convert.common import read_safetensors as read_numpy
    from mlx_clap.io.folder import read_safetensors as read_mlx

    a, b = read_mlx(tiny_model_dir / "model.safetensors"), read_numpy(tiny_model_dir / "model.safetensors")
    assert set(a) == set(b) and len(a) > 10


# ------------------------------------------------------------------------------ 7: float weights
def test_int_weights_in_a_converted_folder_are_refused(tiny_model_dir, tmp_path):
    from safetensors.numpy import save_file

    import mlx_clap

    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    weights = {k: np.array(v) for k, v in mx.load(str(folder / "model.safetensors")).items()}
    key = "text_projection.linear1.weight"
    weights[key] = weights[key].astype(np.int32)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "mlx"})
    with pytest.raises(WeightsError, match=rf"m/model\.safetensors: tensor {re.escape(key)} has dtype int32"):
        mlx_clap.load(folder)


def test_int_weights_in_a_converter_source_are_refused_by_name(tiny_hf_dir, tmp_path):
    from safetensors.numpy import save_file

    from mlx_clap.convert.hf import convert_hf_folder

    folder = tmp_path / "hf"
    shutil.copytree(tiny_hf_dir, folder)
    weights = {k: np.array(v) for k, v in mx.load(str(folder / "model.safetensors")).items()}
    weights["audio_projection.linear2.bias"] = weights["audio_projection.linear2.bias"].astype(np.int32)
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"hf/model\.safetensors: tensor audio_projection\.linear2\.bias"):
        convert_hf_folder(folder, tmp_path / "out")


# ------------------------------------------------------------------ 6: converted source, tokenizer
def test_converting_a_converted_folder_says_so(tiny_model_dir, tmp_path):
    res = CliRunner().invoke(main, ["convert", str(tiny_model_dir), str(tmp_path / "out")])
    assert res.exit_code == 1 and "already converted" in res.output, res.output
    assert "shape" not in res.output and not (tmp_path / "out").exists()


def test_a_converted_folder_that_lost_format_version_is_reported_damaged(tiny_model_dir, tmp_path):
    import mlx_clap

    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "manifest.json").unlink()  # only the weights' {"format": "mlx"} metadata is left to tell
    config = json.loads((folder / "config.json").read_text())
    del config["format_version"]
    (folder / "config.json").write_text(json.dumps(config))
    res = CliRunner().invoke(main, ["convert", str(folder), str(tmp_path / "out")])
    assert res.exit_code == 1 and "damaged converted mlx-clap folder" in res.output, res.output
    assert "weights do not match" not in res.output
    with pytest.raises(WeightsError, match="damaged converted mlx-clap folder"):
        mlx_clap.load(folder)


def test_convert_refuses_a_tokenizer_that_does_not_fit_the_embeddings(tiny_hf_dir, tmp_path):
    from fixtures import train_bpe_files

    tok = tmp_path / "tok"
    train_bpe_files(tok, vocab_size=600)
    n = len(json.loads((tok / "vocab.json").read_text()))
    assert n != TINY_TEXT["vocab_size"]
    res = CliRunner().invoke(
        main, ["convert", str(tiny_hf_dir), str(tmp_path / "out"), "--tokenizer", str(tok)]
    )
    assert res.exit_code == 1, res.output
    assert f"{n} tokens" in res.output and str(TINY_TEXT["vocab_size"]) in res.output
    assert not (tmp_path / "out").exists()
    # The right tokenizer still converts.
    train_bpe_files(tmp_path / "good", vocab_size=TINY_TEXT["vocab_size"])
    res = CliRunner().invoke(
        main, ["convert", str(tiny_hf_dir), str(tmp_path / "out"), "--tokenizer", str(tmp_path / "good")]
    )
    assert res.exit_code == 0, res.output


def test_laion_convert_refuses_a_tokenizer_that_does_not_fit(laion_state, tmp_path):
    import torch
    from fixtures import train_bpe_files

    from mlx_clap.convert.laion_pt import convert_laion_pt

    torch.save({"state_dict": laion_state}, tmp_path / "plain.pt")
    train_bpe_files(tmp_path / "tok", vocab_size=600)
    with pytest.raises(
        WeightsError, match=rf"tokens but the model's embedding table has {TINY_TEXT['vocab_size']}"
    ):
        convert_laion_pt(tmp_path / "plain.pt", tmp_path / "out", tokenizer_dir=tmp_path / "tok")


# ---------------------------------------------------------------------- 12: store paths, hub hints
def test_store_records_the_absolute_model_path_and_old_relative_ones_resolve(
    tiny_model_dir, wav, tmp_path, monkeypatch
):
    from mlx_clap.store import Store

    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    shutil.copytree(tiny_model_dir, work / "models" / "tiny")
    monkeypatch.chdir(work)
    runner = CliRunner()
    res = runner.invoke(main, ["embed", str(wav), "--model", "models/tiny", "--out", "store"])
    assert res.exit_code == 0, res.output
    assert Store.open(work / "store").manifest["model"] == str((work / "models" / "tiny").resolve())
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(main, ["search", str(work / "store"), "--text", "a dog", "--json"])
    assert res.exit_code == 0, res.output
    # A store written before the fix recorded the path as typed: found beside the store.
    with Store.open(work / "store", write=True) as w:
        w.update_manifest({"model": "models/tiny"})
    res = runner.invoke(main, ["search", str(work / "store"), "--text", "a dog", "--json"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("spec", ["/nope/model", "models/missing", "x/y.pt"])
def test_a_missing_local_model_gets_no_hub_hint(spec, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    res = CliRunner().invoke(main, ["embed-text", "a dog", "--model", spec])
    assert res.exit_code == 1 and "no such file or folder" in res.output, res.output
    assert "hub" not in res.output.lower() and "hf download" not in res.output


def test_offline_hub_id_gives_one_exact_next_command(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = CliRunner().invoke(main, ["embed-text", "a dog", "--model", "nobody-xyz/clap-missing"])
    assert res.exit_code == 1, res.output
    out = " ".join(res.output.split())
    assert "HF_HUB_OFFLINE is set" in out and out.count("HF_HUB_OFFLINE") == 1
    assert "hf download nobody-xyz/clap-missing --local-dir clap-missing" in out
    assert "pass `--model clap-missing/` (it loads in place)" in out and "mlx-clap random-model" in out
    assert out.count("--model") == 1  # one hint, not two overlapping ones


def test_int_weights_in_a_converted_msclap_folder_are_refused(tmp_path):
    from safetensors.numpy import save_file

    from mlx_clap.models.msclap.config import MsClapConfig
    from mlx_clap.models.msclap.model import MsClapModel

    (tmp_path / "config.json").write_text(json.dumps(MsClapConfig().to_dict()))
    save_file(
        {"logit_scale": np.zeros((), np.int32)},
        str(tmp_path / "model.safetensors"),
        metadata={"format": "mlx"},
    )
    with pytest.raises(WeightsError, match=r"model\.safetensors: tensor logit_scale has dtype int32"):
        MsClapModel.from_pretrained(tmp_path)
