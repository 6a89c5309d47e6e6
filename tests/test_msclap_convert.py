"""convert/msclap.py on small synthetic state dicts: key mapping and layouts (a round trip from a narrow
MLX model through the released msclap layout), the explicit missing/unexpected/dropped accounting that
msclap's `strict=False` load lacks, version detection, and clear errors (offline tokenizer, bad files).

The full-size conversion of real msclap-built checkpoints is exercised by test_msclap_parity.py.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from mlx.utils import tree_flatten
from test_msclap_api import tiny_config

from mlx_clap.convert.msclap import (
    MEL_KEY,
    check_stft_kernels,
    detect_version,
    msclap_state_to_mlx,
    read_msclap_state,
    reconcile,
    resolve_tokenizer_dir,
    write_tokenizer_json,
)
from mlx_clap.dsp import periodic_hann
from mlx_clap.io.folder import WeightsError
from mlx_clap.models.msclap.model import MsClapModel

# HF -> LAION names inside HTSAT (the inverse of the converter's renames), most specific first.
HF_TO_LAION = (
    ("attention.output.dense", "attn.proj"),
    ("attention.self.", "attn."),
    ("intermediate.dense", "mlp.fc1"),
    ("output.dense", "mlp.fc2"),
    ("layernorm_before", "norm1"),
    ("layernorm_after", "norm2"),
    ("batch_norm", "bn0"),
)


def mlx_params(config) -> dict[str, np.ndarray]:
    model = MsClapModel(config)
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def to_msclap_layout(params: dict[str, np.ndarray], version: str) -> dict[str, np.ndarray]:
    """Write MLX parameters the way msclap's state dict holds them (names, layouts, fused qkv)."""
    state: dict[str, np.ndarray] = {}
    qkv: dict[str, dict[str, np.ndarray]] = {}
    for key, value in params.items():
        if key == MEL_KEY:
            key = "audio_encoder.base.htsat.logmel_extractor.melW" if version == "2023" else key
        elif key.startswith("audio_encoder.base.htsat."):
            m = re.match(r"(.*)\.attention\.self\.(query|key|value)\.(weight|bias)$", key)
            if m:
                qkv.setdefault(f"{m.group(1)}.attn.qkv.{m.group(3)}", {})[m.group(2)] = value
                continue
            for old, new in HF_TO_LAION:
                key = key.replace(old, new)
        if re.search(r"\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$", key):
            value = value.T
        elif value.ndim == 4:
            value = value.transpose(0, 3, 1, 2)
        state[key] = value
    for key, parts in qkv.items():
        state[key] = np.concatenate([parts["query"], parts["key"], parts["value"]], axis=0)
    return state


def stft_kernels() -> tuple[np.ndarray, np.ndarray]:
    n = np.arange(1024)
    angle = 2 * np.pi * np.outer(np.arange(513), n) / 1024
    win = periodic_hann(1024).astype(np.float64)
    return (np.cos(angle) * win)[:, None].astype(np.float32), (-np.sin(angle) * win)[:, None].astype(
        np.float32
    )


EXTRAS = {
    "2023": {
        "audio_encoder.base.htsat.bn0.num_batches_tracked": np.array(3),
        "audio_encoder.base.htsat.tscam_conv.weight": np.zeros((5, 128, 2, 3), np.float32),
        "audio_encoder.base.htsat.head.bias": np.zeros(5, np.float32),
        "audio_encoder.base.htsat.layers.0.blocks.0.attn.relative_position_index": np.zeros(
            (64, 64), np.int64
        ),
        "audio_encoder.base.htsat.layers.0.blocks.0.attn_mask": np.zeros((64, 64, 64), np.float32),
        "caption_encoder.base.h.0.attn.bias": np.ones((1, 1, 8, 8), bool),
        "caption_encoder.base.h.0.attn.masked_bias": np.array(-1e4, np.float32),
    },
    "2022": {
        "audio_encoder.base.bn0.num_batches_tracked": np.array(3),
        "audio_encoder.base.fc_audioset.weight": np.zeros((5, 24), np.float32),
        "caption_encoder.base.pooler.dense.weight": np.zeros((32, 32), np.float32),
        "caption_encoder.base.embeddings.position_ids": np.arange(256)[None],
    },
}


@pytest.mark.parametrize("version", ["2023", "2022"])
def test_round_trip_through_the_msclap_layout(version):
    config = tiny_config(version)
    params = mlx_params(config)
    state = to_msclap_layout(params, version)
    real, imag = stft_kernels()
    prefix = "audio_encoder.base.htsat." if version == "2023" else "audio_encoder.base."
    state[prefix + "spectrogram_extractor.stft.conv_real.weight"] = real
    state[prefix + "spectrogram_extractor.stft.conv_imag.weight"] = imag
    state.update(EXTRAS[version])
    assert detect_version(state) == version
    check_stft_kernels(state)
    weights, dropped = msclap_state_to_mlx(state)
    assert set(dropped) == set(EXTRAS[version]) | {
        prefix + "spectrogram_extractor.stft.conv_real.weight",
        prefix + "spectrogram_extractor.stft.conv_imag.weight",
    }
    assert all(dropped.values())  # every dropped tensor has its reason
    weights, notes, unexpected = reconcile(weights, config)
    assert notes == [] and unexpected == []
    assert set(weights) == set(params)
    for key, value in params.items():
        np.testing.assert_array_equal(weights[key], value, err_msg=key)


def test_missing_unexpected_and_shape_errors():
    config = tiny_config("2022")
    params = mlx_params(config)
    weights = dict(params)
    del weights["caption_encoder.projection.linear2.weight"]
    with pytest.raises(WeightsError, match="1 missing tensors: caption_encoder.projection.linear2.weight"):
        reconcile(dict(weights), config)
    extra = {**params, "audio_encoder.base.surprise.weight": np.zeros(3, np.float32)}
    with pytest.raises(WeightsError, match="unexpected tensors: audio_encoder.base.surprise.weight"):
        reconcile(dict(extra), config)
    kept, _, unexpected = reconcile(dict(extra), config, allow_unexpected=True)
    assert (
        unexpected == ["audio_encoder.base.surprise.weight"]
        and "audio_encoder.base.surprise.weight" not in kept
    )
    wrong = {**params, "logit_scale": np.zeros((1, 1), np.float32)}
    with pytest.raises(WeightsError, match="logit_scale: shape"):
        reconcile(wrong, config)


def test_missing_filterbank_is_rebuilt_and_noted():
    config = tiny_config("2023")
    weights = mlx_params(config)
    del weights[MEL_KEY]
    weights, notes, _ = reconcile(weights, config)
    assert weights[MEL_KEY].shape == (513, 64)
    assert len(notes) == 1 and "32000 Hz design rate" in notes[0]


def test_version_detection():
    with pytest.raises(WeightsError, match="clapcap"):
        detect_version({"clap_project.0.weight": 0, "gpt.transformer.wte.weight": 0})
    with pytest.raises(WeightsError, match="not a msclap CLAP checkpoint"):
        detect_version({"text_branch.x": 0})


def test_non_float_tensor_is_an_error():
    with pytest.raises(WeightsError, match="dtype"):
        msclap_state_to_mlx({"caption_encoder.base.wte.weight": np.zeros((2, 2), np.int64)})


def test_other_stft_kernels_are_refused():
    real, imag = stft_kernels()
    state = {"x.stft.conv_real.weight": real, "x.stft.conv_imag.weight": imag + 1e-3}
    with pytest.raises(WeightsError, match="periodic-Hann"):
        check_stft_kernels(state)


def test_bad_checkpoint_files(tmp_path):
    import torch

    path = tmp_path / "x.pth"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(WeightsError, match="'model'"):
        read_msclap_state(path)
    path.write_bytes(b"not a pickle")
    with pytest.raises(WeightsError, match="cannot load"):
        read_msclap_state(path)

    from mlx_clap.convert.msclap import convert_msclap, main

    with pytest.raises(WeightsError, match="no such checkpoint"):
        convert_msclap(tmp_path / "missing.pth", tmp_path / "out")
    with pytest.raises(SystemExit, match="error: .*no such checkpoint"):
        main([str(tmp_path / "missing.pth"), str(tmp_path / "out")])


def test_tokenizer_is_not_downloaded_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="--tokenizer"):
        resolve_tokenizer_dir("gpt2", None, cache_dir=tmp_path / "empty-cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no tokenizer files"):
        resolve_tokenizer_dir("gpt2", tmp_path / "empty")


def test_tokenizer_checks(tmp_path):
    import transformers  # noqa: F401
    from fixtures import train_bpe_files
    from msclap_reference import train_gpt2_files

    roberta_like = tmp_path / "roberta"
    train_bpe_files(roberta_like)  # <s>=0, so '!' is not id 0
    with pytest.raises(WeightsError, match="'!' is not token 0"):
        write_tokenizer_json(roberta_like, "gpt2", tmp_path / "a.json")
    gpt = train_gpt2_files(tmp_path / "gpt")
    with pytest.raises(WeightsError, match="checkpoint embeds 100"):
        write_tokenizer_json(gpt, "gpt2", tmp_path / "b.json", vocab_size=100)
    with pytest.raises(WeightsError, match="no bert-base-uncased tokenizer files"):
        write_tokenizer_json(gpt, "bert-base-uncased", tmp_path / "c.json")


def test_cli_convert_routes_pth_files_to_the_msclap_converter(tmp_path):
    """`mlx-clap convert` sends CLAP_weights_*.pth to mlx_clap.convert.msclap; --family laion overrides."""
    import torch
    from click.testing import CliRunner

    from mlx_clap.cli import main

    path = tmp_path / "CLAP_weights_2023.pth"
    torch.save({"model": {"logit_scale": torch.tensor(1.0)}}, path)
    runner = CliRunner()
    r = runner.invoke(main, ["convert", str(path), str(tmp_path / "out")])
    assert r.exit_code != 0
    assert "msclap" in r.output.lower() and str(path) in r.output  # the msclap converter's own error
    r = runner.invoke(main, ["convert", str(path), str(tmp_path / "out2"), "--family", "laion"])
    assert r.exit_code != 0
    assert "--family msclap" in r.output  # the LAION reader recognises the layout and says what to do
