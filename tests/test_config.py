"""Config round-trips: hub config.json fields load, unknown keys are ignored, nothing is left implicit."""

from __future__ import annotations

import json

import pytest

from mlx_clap.config import FORMAT_VERSION, ClapConfig, ClapTextConfig, FeatureConfig


def test_hub_style_config_loads_and_ignores_unknown_keys():
    hub = {
        "model_type": "clap",
        "architectures": ["ClapModel"],
        "audio_config": {
            "depths": [2, 2, 12, 2],
            "patch_embeds_hidden_size": 128,
            "hidden_size": 1024,
            "enable_fusion": False,
            "some_future_field": 3,
        },
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


# The three BERT-like text towers share one shape check (config.check_text_tower): each bad field is named
# with the tower's own prefix.
def _roberta(**bad):
    return ClapTextConfig(**bad).validate


def _modernbert(**bad):
    from mlx_clap.models.pe_audio.config import ModernBertConfig

    return ModernBertConfig(**bad).validate


def _msclap_bert(**bad):
    from mlx_clap.models.msclap.config import BertTextConfig, MsClapConfig

    return MsClapConfig(bert=BertTextConfig(**bad)).validate


TOWERS = [(_roberta, "text_config"), (_modernbert, "text_config"), (_msclap_bert, "bert")]
BAD_TOWER_FIELDS = [
    ({"vocab_size": 0}, "vocab_size = 0 is out of range (allowed 1..1000000)"),
    ({"hidden_size": 32.0}, "hidden_size must be an integer, not 32.0"),
    ({"num_hidden_layers": 65}, "num_hidden_layers = 65 is out of range (allowed 1..64)"),
    (
        {"hidden_size": 32, "num_attention_heads": 33},
        "num_attention_heads = 33 is out of range (allowed 1..32)",
    ),
    ({"hidden_size": 32, "num_attention_heads": 5}, "num_attention_heads = 5 does not divide the width 32"),
    ({"intermediate_size": 0}, "intermediate_size = 0 is out of range (allowed 1..32768)"),
    ({"max_position_embeddings": True}, "max_position_embeddings must be an integer, not True"),
    ({"vocab_size": 8, "pad_token_id": 8}, "pad_token_id = 8 is out of range (allowed 0..7)"),
]


@pytest.mark.parametrize("bad, message", BAD_TOWER_FIELDS)
@pytest.mark.parametrize("tower, prefix", TOWERS, ids=["roberta", "modernbert", "msclap_bert"])
def test_text_tower_fields_are_checked_by_name(tower, prefix, bad, message):
    with pytest.raises(ValueError) as err:
        tower(**bad)()
    assert str(err.value) == f"{prefix}.{message}"


def test_text_tower_special_ids_and_rotary_width():
    from mlx_clap.models.pe_audio.config import ModernBertConfig

    cases = [
        (ClapTextConfig(vocab_size=9, eos_token_id=9), "eos_token_id = 9 is out of range (allowed 0..8)"),
        (
            ModernBertConfig(vocab_size=9, pad_token_id=0, cls_token_id=1, sep_token_id=9),
            "sep_token_id = 9 is out of range (allowed 0..8)",
        ),
        (
            ModernBertConfig(hidden_size=36, num_attention_heads=4),
            "head width 9 must be even (rotary embeddings rotate pairs)",
        ),
        (ClapTextConfig(max_length=600), "max_length = 600 is out of range (allowed 1..514)"),
    ]
    for config, message in cases:
        with pytest.raises(ValueError) as err:
            config.validate()
        assert str(err.value) == f"text_config.{message}"
