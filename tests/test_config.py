"""Config round-trips: hub config.json fields load, unknown keys are ignored, nothing is left implicit."""

from __future__ import annotations

import json

from mlx_clap.config import FORMAT_VERSION, ClapConfig, FeatureConfig


def test_hub_style_config_loads_and_ignores_unknown_keys():
    hub = {
        "model_type": "clap",
        "architectures": ["ClapModel"],
        "audio_config": {"depths": [2, 2, 12, 2], "patch_embeds_hidden_size": 128, "hidden_size": 1024,
                         "enable_fusion": False, "some_future_field": 3},
        "text_config": {"vocab_size": 50265, "unknown": "x"},
        "projection_dim": 512,
        "torch_dtype": "float32",
    }
    cfg = ClapConfig.from_dict(hub)
    assert cfg.audio_config.depths == (2, 2, 12, 2)
    assert cfg.audio_config.hidden_size == 1024
    assert cfg.text_config.vocab_size == 50265
    assert cfg.format_version == FORMAT_VERSION


def test_round_trip_is_fully_resolved_and_sorted():
    cfg = ClapConfig()
    data = cfg.to_dict()
    assert list(data) == sorted(data)
    # Every field is written, including nested ones, so a converted folder never depends on defaults.
    assert set(data["audio_config"]) >= {"depths", "num_attention_heads", "enable_fusion", "layer_norm_eps"}
    assert set(data["feature_config"]) >= {"frequency_min", "frequency_max", "truncation", "padding"}
    again = ClapConfig.from_dict(json.loads(json.dumps(data)))
    assert again == cfg


def test_feature_config_derived_sizes():
    fc = FeatureConfig.from_dict({"sampling_rate": 48000, "hop_length": 480, "max_length_s": 10})
    assert fc.nb_max_samples == 480000
    assert fc.nb_max_frames == 1001
