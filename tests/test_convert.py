"""Converters: HF/LAION key mapping on tiny synthetic state dicts, config resolution, the CLI, the cache.

Fast: tiny configs only (the full-size conversions run in test_htsat_parity.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mlx_clap.config import config_from_hf
from mlx_clap.convert.common import hf_state_to_mlx, read_safetensors
from mlx_clap.convert.hf import convert_hf_folder
from mlx_clap.convert.laion_pt import config_from_laion_state, laion_state_to_hf
from mlx_clap.io.folder import WeightsError
from mlx_clap.loading import load as load_model

load_converted = load_model

TOKENIZER_NAMES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def arr(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------------------------- synthetic mappings
def test_hf_state_to_mlx_layouts_and_dropped_buffers():
    conv = arr(8, 1, 4, 4)
    state = {
        "audio_model.audio_encoder.patch_embed.proj.weight": conv,
        "audio_model.audio_encoder.patch_embed.fusion_model.local_att.0.weight": arr(2, 8, 1, 1),
        "audio_model.audio_encoder.batch_norm.running_var": arr(64),
        "audio_model.audio_encoder.batch_norm.num_batches_tracked": np.array(3, dtype=np.int64),
        "audio_model.audio_encoder.layers.0.blocks.0.attention.self.relative_position_index": np.zeros(
            (64, 64), dtype=np.int64
        ),
        "audio_model.audio_encoder.layers.0.blocks.0.attention.self.query.weight": arr(8, 8),
        "text_model.embeddings.position_ids": np.arange(10)[None],
        "text_model.embeddings.token_type_ids": np.zeros((1, 10), dtype=np.int64),
        "text_model.embeddings.token_type_embeddings.weight": arr(1, 4),
        "logit_scale_a": np.array([2.5], dtype=np.float32),
        "logit_scale_t": np.array(3.0, dtype=np.float32),
    }
    out = hf_state_to_mlx(state)
    assert set(out) == {
        "audio_model.audio_encoder.patch_embed.proj.weight",
        "audio_model.audio_encoder.patch_embed.fusion_model.local_att.0.weight",
        "audio_model.audio_encoder.batch_norm.running_var",
        "audio_model.audio_encoder.layers.0.blocks.0.attention.self.query.weight",
        "text_model.embeddings.token_type_embeddings.weight",
        "logit_scale_a",
        "logit_scale_t",
    }
    # OIHW -> OHWI
    np.testing.assert_array_equal(
        out["audio_model.audio_encoder.patch_embed.proj.weight"], conv.transpose(0, 2, 3, 1)
    )
    assert out["audio_model.audio_encoder.patch_embed.fusion_model.local_att.0.weight"].shape == (2, 1, 1, 8)
    # Linear and BN tensors unchanged; logit scales become scalars.
    np.testing.assert_array_equal(
        out["audio_model.audio_encoder.layers.0.blocks.0.attention.self.query.weight"],
        state["audio_model.audio_encoder.layers.0.blocks.0.attention.self.query.weight"],
    )
    assert out["logit_scale_a"].shape == () and float(out["logit_scale_a"]) == 2.5
    assert out["logit_scale_t"].shape == ()


def test_laion_state_to_hf_renames_and_qkv_split():
    qkv_w, qkv_b = arr(24, 8, seed=1), arr(24, seed=2)
    state = {
        "audio_branch.bn0.running_mean": arr(64),
        "audio_branch.layers.1.blocks.0.attn.qkv.weight": qkv_w,
        "audio_branch.layers.1.blocks.0.attn.qkv.bias": qkv_b,
        "audio_branch.layers.1.blocks.0.attn.proj.weight": arr(8, 8),
        "audio_branch.layers.1.blocks.0.attn.relative_position_bias_table": arr(225, 2),
        "audio_branch.layers.1.blocks.1.attn_mask": arr(4, 64, 64),
        "audio_branch.layers.1.blocks.0.norm1.weight": arr(8),
        "audio_branch.layers.1.blocks.0.norm2.bias": arr(8),
        "audio_branch.layers.1.blocks.0.mlp.fc1.weight": arr(32, 8),
        "audio_branch.layers.1.blocks.0.mlp.fc2.weight": arr(8, 32),
        "audio_branch.layers.0.downsample.reduction.weight": arr(16, 32),
        "audio_branch.patch_embed.fusion_model.global_att.1.weight": arr(2, 8, 1, 1),
        "audio_branch.spectrogram_extractor.stft.conv_real.weight": arr(513, 1, 1024),
        "audio_branch.logmel_extractor.melW": arr(513, 64),
        "audio_branch.tscam_conv.weight": arr(527, 768, 2, 3),
        "audio_branch.head.weight": arr(527, 527),
        "audio_transform.sequential.0.weight": arr(512, 512),
        "text_transform.sequential.3.bias": arr(512),
        "audio_projection.0.weight": arr(512, 768),
        "audio_projection.2.bias": arr(512),
        "text_projection.0.bias": arr(512),
        "text_branch.encoder.layer.0.attention.self.query.weight": arr(4, 4),
        "text_branch.pooler.dense.weight": arr(4, 4),
        "logit_scale_a": np.array(2.0, dtype=np.float32),
    }
    out = laion_state_to_hf(state)
    enc = "audio_model.audio_encoder."
    blk = enc + "layers.1.blocks.0."
    np.testing.assert_array_equal(out[blk + "attention.self.query.weight"], qkv_w[:8])
    np.testing.assert_array_equal(out[blk + "attention.self.key.weight"], qkv_w[8:16])
    np.testing.assert_array_equal(out[blk + "attention.self.value.weight"], qkv_w[16:])
    np.testing.assert_array_equal(out[blk + "attention.self.value.bias"], qkv_b[16:])
    expected = {
        enc + "batch_norm.running_mean",
        blk + "attention.output.dense.weight",
        blk + "attention.self.relative_position_bias_table",
        enc + "layers.1.blocks.1.attn_mask",  # renamed like HF, dropped later by hf_state_to_mlx
        blk + "layernorm_before.weight",
        blk + "layernorm_after.bias",
        blk + "intermediate.dense.weight",
        blk + "output.dense.weight",
        enc + "layers.0.downsample.reduction.weight",
        enc + "patch_embed.fusion_model.global_att.1.weight",
        "audio_projection.linear1.weight",
        "audio_projection.linear2.bias",
        "text_projection.linear1.bias",
        "text_model.encoder.layer.0.attention.self.query.weight",
        "text_model.pooler.dense.weight",
        "logit_scale_a",
    }
    qkv = {blk + f"attention.self.{p}.{t}" for p in ("query", "key", "value") for t in ("weight", "bias")}
    assert set(out) == expected | qkv
    assert enc + "layers.1.blocks.1.attn_mask" not in hf_state_to_mlx(out)


def _laion_like_state(embed=8, depths=(2, 2, 3, 1), heads=(1, 2, 4, 8), fused=False, text_hidden=128) -> dict:
    """HF-named state dict with the shapes a LAION checkpoint of that architecture would have."""
    enc = "audio_model.audio_encoder."
    s = {
        enc + "batch_norm.weight": arr(64),
        enc + "patch_embed.proj.weight": arr(embed, 1, 4, 4),
        enc + "patch_embed.norm.weight": arr(embed),
        "audio_projection.linear1.weight": arr(512, embed * 8),
        "audio_projection.linear2.weight": arr(512, 512),
        "text_projection.linear2.weight": arr(512, 512),
        "text_model.embeddings.word_embeddings.weight": arr(50265, 4)[:, :1].repeat(text_hidden, 1),
        "text_model.embeddings.position_embeddings.weight": arr(514, text_hidden),
        "text_model.embeddings.token_type_embeddings.weight": arr(1, text_hidden),
    }
    for i in range(3):
        s[f"text_model.encoder.layer.{i}.intermediate.dense.weight"] = arr(4 * text_hidden, text_hidden)
    for i, (d, h) in enumerate(zip(depths, heads, strict=True)):
        for j in range(d):
            s[enc + f"layers.{i}.blocks.{j}.attention.self.relative_position_bias_table"] = arr(225, h)
    if fused:
        s[enc + "patch_embed.mel_conv2d.weight"] = arr(embed, 1, 4, 12)
    return s


@pytest.mark.parametrize("fused", [False, True])
def test_config_from_laion_state_infers_architecture(fused):
    cfg = config_from_laion_state(_laion_like_state(fused=fused), source="x.pt")
    a, t = cfg.audio_config, cfg.text_config
    assert (
        a.patch_embeds_hidden_size == 8 and a.depths == (2, 2, 3, 1) and a.num_attention_heads == (1, 2, 4, 8)
    )
    assert a.window_size == 8 and a.hidden_size == 64 and a.num_mel_bins == 64 and a.patch_size == 4
    assert a.enable_fusion is fused and a.fusion_type == ("aff_2d" if fused else None)
    assert cfg.feature_config.truncation == ("fusion" if fused else "rand_trunc")
    assert cfg.feature_config.frequency_min == 50 and cfg.feature_config.frequency_max == 14000
    assert t.vocab_size == 50265 and t.hidden_size == 128 and t.num_hidden_layers == 3
    assert t.num_attention_heads == 2 and t.intermediate_size == 512 and t.max_position_embeddings == 514
    assert t.layer_norm_eps == 1e-5  # LAION's roberta-base config, not HF's 1e-12
    assert cfg.projection_dim == 512 and cfg.source == "x.pt"


def test_config_from_laion_state_base():
    cfg = config_from_laion_state(_laion_like_state(embed=128, depths=(2, 2, 12, 2), heads=(4, 8, 16, 32)))
    assert cfg.audio_config.depths == (2, 2, 12, 2) and cfg.audio_config.hidden_size == 1024


def test_config_from_laion_state_rejects_other_checkpoints():
    with pytest.raises(WeightsError, match="not a LAION-CLAP"):
        config_from_laion_state({"encoder.weight": arr(2, 2)})


# ------------------------------------------------------------------------------------- HF config.json
def test_config_from_hf_ignores_unknown_keys_and_resolves_features():
    raw = {
        "model_type": "clap",
        "projection_dim": 512,
        "some_future_key": 1,
        "audio_config": {"enable_fusion": True, "depths": [2, 2, 12, 2], "unknown": "x"},
        "text_config": {"vocab_size": 50265},
    }
    cfg = config_from_hf(raw)
    assert cfg.audio_config.depths == (2, 2, 12, 2) and cfg.audio_config.enable_fusion
    assert cfg.feature_config.truncation == "fusion" and cfg.feature_config.frequency_min == 50
    raw["audio_config"]["enable_fusion"] = False
    assert config_from_hf(raw).feature_config.truncation == "rand_trunc"
    # transformers 4.x wrote the generation default max_length=20 into sub-configs: not a token length.
    raw["text_config"]["max_length"] = 20
    assert config_from_hf(raw).text_config.max_length == 77
    pre = {"truncation": "fusion", "frequency_min": 50, "frequency_max": 14000, "feature_extractor_type": "x"}
    assert config_from_hf(raw, pre).feature_config.truncation == "fusion"


@pytest.mark.parametrize("raw", [{"model_type": "bert"}, {"architectures": ["X"]}, ["not", "a", "dict"]])
def test_config_from_hf_rejects_other_families(raw, tmp_path):
    # The config parser knows no files: a plain ValueError. The converter and the loader, which read
    # config.json, turn it into a WeightsError naming that file.
    with pytest.raises(ValueError, match="CLAP") as info:
        config_from_hf(raw)
    assert not isinstance(info.value, WeightsError)
    folder = tmp_path / "notclap"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(raw))
    (folder / "model.safetensors").write_bytes(b"")  # never read: the config is rejected first
    cfg_name = str(folder / "config.json")
    with pytest.raises(WeightsError, match="CLAP") as info:
        convert_hf_folder(folder, tmp_path / "out")
    assert cfg_name in str(info.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(WeightsError, match="CLAP") as info:
        load_model(folder)
    assert cfg_name in str(info.value)


# --------------------------------------------------------------------------------- tiny HF hub folders
@pytest.fixture(scope="module")
def tiny_ref():
    import torch
    from fixtures import TINY_AUDIO, TINY_TEXT
    from reference_models import random_hf_clap

    torch.set_num_threads(1)
    return random_hf_clap(audio=TINY_AUDIO, text=TINY_TEXT, seed=5)


@pytest.fixture(scope="module")
def tiny_hub(tiny_ref, tmp_path_factory) -> Path:
    from reference_models import save_hub_folder

    folder = save_hub_folder(tiny_ref, tmp_path_factory.mktemp("tiny") / "hub")
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {"feature_size": 64, "truncation": "rand_trunc", "frequency_min": 50, "padding": "repeatpad"}
        )
    )
    for name in TOKENIZER_NAMES[2:]:
        (folder / name).write_text("{}\n" if name.endswith(".json") else "#version: 0.2\n")
    return folder


def test_convert_hf_folder_writes_folder_and_manifest(tiny_hub, tmp_path):
    out = convert_hf_folder(tiny_hub, tmp_path / "out", source_name="org/tiny", revision="abc123")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "manifest.json"} <= names
    assert {"merges.txt", "tokenizer_config.json", "special_tokens_map.json"} <= names
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "org/tiny" and manifest["revision"] == "abc123"
    assert manifest["converter"] == "mlx_clap.convert.hf" and manifest["converter_version"]
    assert set(manifest["source_files"]) == {"config.json", "model.safetensors", "preprocessor_config.json"}
    import hashlib

    for name, digest in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "clap" and cfg["format_version"] == 1
    assert list(cfg) == sorted(cfg) and cfg["audio_config"]["patch_embeds_hidden_size"] == 16
    weights = read_safetensors(out / "model.safetensors")
    assert all(v.dtype == np.float32 for v in weights.values())
    assert not any(
        k.endswith(("num_batches_tracked", "relative_position_index", "position_ids")) for k in weights
    )


def _bin_folder(model, folder: Path) -> Path:
    """A hub folder in the older layout: config.json + pytorch_model.bin (a pickled state dict)."""
    import torch

    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def test_pytorch_model_bin_converts_like_safetensors(tiny_ref, tiny_hub, tmp_path):
    bin_folder = _bin_folder(tiny_ref, tmp_path / "bin")
    assert (bin_folder / "pytorch_model.bin").is_file() and not (bin_folder / "model.safetensors").exists()
    a = read_safetensors(convert_hf_folder(bin_folder, tmp_path / "a") / "model.safetensors")
    b = read_safetensors(convert_hf_folder(tiny_hub, tmp_path / "b") / "model.safetensors")
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_pytorch_model_bin_without_torch_is_a_clear_error(tiny_ref, tmp_path, monkeypatch):
    import sys

    bin_folder = _bin_folder(tiny_ref, tmp_path / "bin")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(WeightsError, match=r"pytorch_model.bin.*needs PyTorch.*pip install"):
        convert_hf_folder(bin_folder, tmp_path / "out")


def test_laion_pickle_with_training_objects_loads(tmp_path):
    # Released LAION files also pickle numpy scalars and the training arguments next to the weights.
    import argparse

    import torch

    from mlx_clap.convert.common import torch_state_dict

    obj = {"epoch": np.int64(3), "args": argparse.Namespace(amodel="HTSAT-tiny"), "state_dict": {}}
    torch.save(obj, tmp_path / "x.pt")
    assert torch_state_dict(tmp_path / "x.pt", "LAION .pt", weights_only=False)["args"].amodel == "HTSAT-tiny"


def test_msclap_checkpoint_is_pointed_to_its_converter(tmp_path):
    import torch

    from mlx_clap.convert.laion_pt import convert_laion_pt

    torch.save({"model": {"logit_scale": torch.tensor(1.0)}}, tmp_path / "CLAP_weights_2023.pth")
    with pytest.raises(WeightsError, match="msclap checkpoint.*mlx_clap.convert.msclap"):
        convert_laion_pt(tmp_path / "CLAP_weights_2023.pth", tmp_path / "out")


def test_bfloat16_safetensors_source(tmp_path):
    import torch
    from safetensors.torch import save_file

    t = torch.randn(3, 5).to(torch.bfloat16)
    save_file({"w": t, "h": torch.randn(2).half()}, str(tmp_path / "m.safetensors"))
    got = read_safetensors(tmp_path / "m.safetensors")
    np.testing.assert_array_equal(got["w"], t.float().numpy())
    assert got["h"].dtype == np.float16


def test_truncated_source_safetensors(tiny_hub, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_hub, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated"):
        convert_hf_folder(bad, tmp_path / "out")


def test_source_with_unexpected_tensor_is_rejected(tiny_hub, tmp_path):
    import shutil

    from safetensors.numpy import save_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny_hub, bad)
    state = read_safetensors(bad / "model.safetensors")
    state["audio_model.audio_encoder.extra.weight"] = arr(2, 2)
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(WeightsError, match="unexpected keys: audio_model.audio_encoder.extra.weight"):
        convert_hf_folder(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_convert(tiny_hub, tmp_path):
    from mlx_clap.cli import main

    runner = CliRunner()
    res = runner.invoke(main, ["convert", str(tiny_hub), str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "converted" in res.output
    model = load_converted(tmp_path / "out")
    assert model.config.audio_config.patch_embeds_hidden_size == 16
    # Non-empty destination needs --force; --json prints the manifest.
    res = runner.invoke(main, ["convert", str(tiny_hub), str(tmp_path / "out")])
    assert res.exit_code == 1 and "not empty" in res.output
    res = runner.invoke(main, ["convert", str(tiny_hub), str(tmp_path / "out"), "--force", "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["converter"] == "mlx_clap.convert.hf"


def test_cli_convert_with_tokenizer_folder_embeds_text(tiny_hub, tmp_path):
    from fixtures import train_bpe_files

    from mlx_clap.cli import main

    train_bpe_files(tmp_path / "bpe", vocab_size=1000)
    res = CliRunner().invoke(
        main, ["convert", str(tiny_hub), str(tmp_path / "out"), "--tokenizer", str(tmp_path / "bpe")]
    )
    assert res.exit_code == 0, res.output
    assert "tokenizer: vocab.json, merges.txt" in res.output
    model = load_model(tmp_path / "out")
    emb = model.embed_text(["a dog barking", "rain"])
    assert emb.shape == (2, 512) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_cli_convert_errors_name_the_file(tmp_path, monkeypatch):
    from mlx_clap.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))

    runner = CliRunner()
    res = runner.invoke(main, ["convert", str(tmp_path / "missing"), str(tmp_path / "out")])
    assert res.exit_code == 1 and "missing: no such file or folder" in res.output
    (tmp_path / "notclap").mkdir()
    (tmp_path / "notclap" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    res = runner.invoke(main, ["convert", str(tmp_path / "notclap"), str(tmp_path / "out")])
    assert res.exit_code == 1 and "notclap/config.json" in res.output and "'bert'" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(main, ["convert", "laion/clap-htsat-unfused", str(tmp_path / "out")])
    assert res.exit_code == 1 and "laion/clap-htsat-unfused: could not download" in res.output


def test_cli_convert_help_has_example():
    from mlx_clap.cli import main

    res = CliRunner().invoke(main, ["convert", "--help"])
    assert res.exit_code == 0 and "mlx-clap convert laion/clap-htsat-fused" in res.output


# -------------------------------------------------------------------------------------- load_model
@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    """$MLX_CLAP_CACHE pointed at an empty test folder, in force now (settings are parsed once)."""
    from mlx_clap import settings

    cache = tmp_path / "cache"
    monkeypatch.setenv("MLX_CLAP_CACHE", str(cache))
    settings.reset()
    assert settings.current().cache_dir == cache
    yield cache
    settings.reset()  # runs before monkeypatch restores the environment: the next test parses it anew


def _assert_same_model(loaded, reference) -> None:
    """Same parameters (bit for bit) and the same audio and text embeddings as the reference Embedder."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    ours = dict(tree_flatten(loaded.model.parameters()))
    ref = dict(tree_flatten(reference.model.parameters()))
    assert set(ours) == set(ref)
    for key in ref:
        np.testing.assert_array_equal(np.array(ours[key]), np.array(ref[key]), err_msg=key)
    assert loaded.config.to_dict() == {**reference.config.to_dict(), "source": loaded.config.source}
    rng = np.random.default_rng(3)
    waves = [0.1 * rng.standard_normal(n).astype(np.float32) for n in (48_000, 600_000)]  # 1 s, 12.5 s
    a = loaded.embed_audio(waves)
    assert a.shape == (2, loaded.embedding_dim)
    np.testing.assert_array_equal(a, reference.embed_audio(waves))
    ids = mx.array(rng.integers(5, 1000, size=(3, 9)))
    mask = mx.array((np.arange(9)[None] < np.array([[9], [4], [1]])).astype(np.int64))
    np.testing.assert_array_equal(
        np.array(loaded.embed_text_inputs(ids, mask)), np.array(reference.embed_text_inputs(ids, mask))
    )


def test_load_model_loads_safetensors_hf_folder_in_place(tiny_hub, tmp_path, cache_dir):
    """A Hugging Face folder with model.safetensors loads where it is: nothing is written to the cache,
    and the model equals the one `convert_hf_folder` writes."""
    cache = cache_dir
    model = load_model(tiny_hub)
    assert model.source_dir == tiny_hub
    assert not cache.exists() or not any(cache.iterdir())
    converted = load_model(convert_hf_folder(tiny_hub, tmp_path / "converted"))
    _assert_same_model(model, converted)
    again = load_model(tiny_hub)
    assert again.source_dir == tiny_hub
    assert not cache.exists() or not any(cache.iterdir())


def test_load_model_converts_bin_folder_into_cache_once(tiny_ref, tiny_hub, tmp_path, cache_dir):
    """A folder with only pytorch_model.bin is converted (with torch) into the cache once, then loaded."""
    cache = cache_dir
    bin_folder = _bin_folder(tiny_ref, tmp_path / "bin")
    model = load_model(bin_folder)
    entries = list(cache.iterdir())
    assert len(entries) == 1 and entries[0].name.startswith("bin-")
    assert model.source_dir == entries[0]
    manifest = json.loads((entries[0] / "manifest.json").read_text())
    assert manifest["source"] == str(bin_folder.resolve())
    assert set(manifest["source_files"]) == {"config.json", "pytorch_model.bin"}
    stamp = (entries[0] / "model.safetensors").stat().st_mtime_ns
    again = load_model(bin_folder)
    assert (entries[0] / "model.safetensors").stat().st_mtime_ns == stamp  # not converted again
    assert again.source_dir == model.source_dir == entries[0]
    assert list(cache.iterdir()) == entries
    _assert_same_model(model, load_model(convert_hf_folder(tiny_hub, tmp_path / "converted")))


def test_load_model_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch, cache_dir):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(WeightsError) as info:
        load_model("laion/clap-htsat-unfused")
    msg = str(info.value)
    assert "laion/clap-htsat-unfused: could not download" in msg
    assert "offline" in msg.lower() and "--model clap-htsat-unfused/" in msg and "random-model" in msg
    # The README says the same (the user's door must agree with what the command tells them).
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for step in (
        "hf download laion/clap-htsat-unfused --local-dir clap-htsat-unfused",
        "--model clap-htsat-unfused/",
        "mlx-clap random-model",
    ):
        assert step in readme and step in msg, step


def test_load_model_unknown_source(tmp_path):
    with pytest.raises(WeightsError, match="no such file or folder"):
        load_model(str(tmp_path / "nothing-here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no config.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(WeightsError, match="not a model folder"):
        load_model(tmp_path / "w.npz")


def test_load_model_hub_id_from_a_hub_cache_layout(tiny_hub, tmp_path, monkeypatch, cache_dir):
    """The real hub path, offline: huggingface_hub resolves the id from a cache laid out as a download
    leaves it (models--org--name/refs/main + snapshots/<commit>/); the safetensors snapshot loads in place
    (nothing written to our cache), labelled with the hub id, equal to the explicitly converted folder."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub-cache" / "models--laion--tiny-clap"
    shutil.copytree(tiny_hub, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    from huggingface_hub import constants

    # huggingface_hub reads its environment at import time: point its constants at the test cache.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cache = cache_dir
    model = load_model("laion/tiny-clap")
    snapshot = repo / "snapshots" / commit
    assert Path(model.source_dir).resolve() == snapshot.resolve()
    assert model.config.source == "laion/tiny-clap"
    assert not cache.exists() or not any(cache.iterdir())
    _assert_same_model(model, load_model(convert_hf_folder(tiny_hub, tmp_path / "converted")))
    again = load_model("laion/tiny-clap")
    assert again.source_dir == model.source_dir
    assert not cache.exists() or not any(cache.iterdir())


# ------------------------------------------------------- the steps the Hugging Face converters share
def _convert_pe_audio_folder(*args, **kwargs):
    from mlx_clap.convert.pe_audio import convert_pe_audio_folder

    return convert_pe_audio_folder(*args, **kwargs)


HF_CONVERTERS = pytest.mark.parametrize(
    "convert", [convert_hf_folder, _convert_pe_audio_folder], ids=["clap", "pe_audio"]
)


@HF_CONVERTERS
def test_hf_converters_check_their_source_alike(convert, tmp_path):
    with pytest.raises(WeightsError, match=re.escape(f"{tmp_path / 'missing'}: not a folder")):
        convert(tmp_path / "missing", tmp_path / "out")
    done = tmp_path / "done"
    done.mkdir()
    (done / "config.json").write_text(json.dumps({"format_version": 1, "feature_config": {}}))
    (done / "model.safetensors").write_bytes(b"")
    empty = tmp_path / "empty"
    empty.mkdir()
    # An explicit tokenizer folder is checked first, then whether the source is already converted.
    with pytest.raises(WeightsError, match=re.escape(f"{empty}: no tokenizer files")):
        convert(done, tmp_path / "out", tokenizer_dir=empty)
    with pytest.raises(WeightsError, match=re.escape(f"{done}: this folder is already converted")):
        convert(done, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hf_manifest_hashes_config_weights_and_preprocessor(tmp_path):
    from mlx_clap.convert.hf import hf_manifest
    from mlx_clap.io.files import sha256_file

    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_text(name)
    weights = [tmp_path / "model.safetensors"]
    manifest = hf_manifest("conv", "conv 1", "org/name", tmp_path, weights, revision="r", architecture="A")
    assert manifest == {
        "converter": "conv",
        "converter_version": "conv 1",
        "source": "org/name",
        "source_format": "huggingface",
        "source_files": {n: sha256_file(tmp_path / n) for n in ("config.json", "model.safetensors")},
        "revision": "r",
        "architecture": "A",
    }
    (tmp_path / "preprocessor_config.json").write_text("{}")
    files = hf_manifest("conv", "conv 1", "org/name", tmp_path, weights)["source_files"]
    assert list(files) == ["config.json", "model.safetensors", "preprocessor_config.json"]
