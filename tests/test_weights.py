"""Loading converted folders: strict checks with errors that name the problem, dtypes, no torch at runtime.

Uses the committed golden folder (tests/golden/tiny-unfused), so nothing here needs torch.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mlx_clap.io.folder import WeightsError, read_config
from mlx_clap.loading import load as load_model
from mlx_clap.models.clap import KEEP_FLOAT32

load_converted = load_model

GOLDEN = Path(__file__).resolve().parent / "golden" / "tiny-unfused"
QUERY = "audio_model.audio_encoder.layers.0.blocks.0.attention.self.query.weight"


@pytest.fixture
def folder(tmp_path) -> Path:
    dest = tmp_path / "model"
    shutil.copytree(GOLDEN, dest)
    return dest


def _edit_weights(folder: Path, fn) -> None:
    weights = load_file(str(folder / "model.safetensors"))
    fn(weights)
    save_file(weights, str(folder / "model.safetensors"))


def _edit_config(folder: Path, fn) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_loads_golden_folder(folder):
    model = load_model(folder)
    assert model.source_dir == folder
    assert model.config.audio_config.depths == (2, 2, 2, 2)
    assert not model.audio_model.audio_encoder.batch_norm.training  # eval mode: running statistics


def test_missing_key(folder):
    _edit_weights(folder, lambda w: w.pop(QUERY))
    with pytest.raises(WeightsError, match=f"model.safetensors.*missing keys: {QUERY}"):
        load_converted(folder)


def test_extra_key(folder):
    extra = {"audio_model.audio_encoder.tscam_conv.weight": np.zeros((2, 2), np.float32)}
    _edit_weights(folder, lambda w: w.update(extra))
    with pytest.raises(WeightsError, match="unexpected keys: audio_model.audio_encoder.tscam_conv.weight"):
        load_converted(folder)


def test_wrong_shape(folder):
    _edit_weights(folder, lambda w: w.update({QUERY: w[QUERY][:, :4]}))
    with pytest.raises(WeightsError, match=rf"{QUERY}: shape \(8, 4\) in file, model wants \(8, 8\)"):
        load_converted(folder)


def test_truncated_safetensors(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(WeightsError, match="model.safetensors: cannot read safetensors.*truncated"):
        load_converted(folder)


def test_missing_safetensors(folder):
    (folder / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no model.safetensors"):
        load_converted(folder)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(model_type="bert"), "model_type 'bert' is not a CLAP model"),
        (lambda c: c.update(family="whisper"), "model family 'whisper' is not supported"),
        (lambda c: c.update(format_version=99), "format_version 99"),
    ],
)
def test_config_for_another_family_or_format(folder, edit, message):
    _edit_config(folder, edit)
    with pytest.raises(WeightsError, match=message):
        load_converted(folder)


# The MLX-layout 4-d tensors of a converted folder, as the sanitizer of an HF folder would transpose them.
PATCH_CONV = "audio_model.audio_encoder.patch_embed.proj.weight"


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda c: c.pop("format_version"), id="no-format-version"),
        pytest.param(lambda c: c.pop("feature_config"), id="no-feature-config"),
    ],
)
def test_converted_folder_without_format_tags(folder, edit):
    # Without its format tags the folder is not a converted one: the format reader refuses, naming the
    # fix; `load()` then takes it as a Hugging Face folder, whose torch-layout sanitizing cannot fit the
    # MLX-layout weights: the error names the weights file and the mismatching tensor.
    _edit_config(folder, edit)
    with pytest.raises(WeightsError, match="not a converted mlx-clap folder.*run `mlx-clap convert` first"):
        read_config(folder)
    with pytest.raises(
        WeightsError,
        match=rf"model/model.safetensors: weights do not match the model config: .*{PATCH_CONV}: shape",
    ):
        load_converted(folder)


def test_hf_config_is_not_a_converted_folder(folder):
    # A plain transformers config.json (no format_version): not a converted folder (the format reader
    # names the fix); loaded as a Hugging Face folder, its default architecture does not fit these
    # weights, and the error names the weights file and the missing and misshapen tensors.
    (folder / "config.json").write_text(json.dumps({"model_type": "clap", "audio_config": {}}))
    with pytest.raises(WeightsError, match="run `mlx-clap convert` first"):
        read_config(folder)
    with pytest.raises(WeightsError) as info:
        load_converted(folder)
    msg = str(info.value)
    assert msg.startswith(f"{folder / 'model.safetensors'}: weights do not match the model config")
    assert "missing keys: " in msg and f"{QUERY}: shape (8, 8) in file, model wants (96, 96)" in msg


def test_non_clap_hf_folder_through_load_model(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_CLAP_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "bert"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 768}))
    (src / "model.safetensors").write_bytes(b"")
    with pytest.raises(WeightsError, match=r"bert/config.json.*model_type 'bert'.*CLAP"):
        load_model(src)


def test_invalid_json_config(folder):
    (folder / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match="config.json: not valid JSON"):
        load_converted(folder)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_keeps_sensitive_parameters_float32(dtype):
    model = load_converted(GOLDEN, dtype=dtype)
    from mlx.utils import tree_flatten

    for key, value in tree_flatten(model.parameters()):
        want = mx.float32 if key.startswith(KEEP_FLOAT32) else getattr(mx, dtype)
        assert value.dtype == want, key
    ref = np.load(GOLDEN / "reference.npz")
    emb = np.array(model.get_audio_features(mx.array(ref["input_features"].astype(np.float32))))
    cos = np.sum(emb * ref["audio_embeds"], axis=-1)
    assert emb.dtype == np.float32 and cos.min() >= 0.999


def test_unknown_dtype():
    with pytest.raises(ValueError, match="unknown dtype"):
        load_converted(GOLDEN, dtype="int8")


def test_runtime_never_imports_torch_or_transformers():
    code = f"""
import sys
import mlx_clap
assert "mlx_clap.models.clap" not in sys.modules, "import mlx_clap should stay light"
import numpy as np
import mlx.core as mx
model = mlx_clap.load({str(GOLDEN)!r})
ref = np.load({str(GOLDEN / "reference.npz")!r})
emb = np.array(model.get_audio_features(mx.array(ref["input_features"].astype(np.float32))))
assert np.abs(emb - ref["audio_embeds"]).max() <= 1e-5
heavy = sorted(m for m in ("torch", "transformers", "laion_clap", "convert") if m in sys.modules)
assert not heavy, heavy
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
