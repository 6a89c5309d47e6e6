"""Configuration dataclasses, fully resolved.

Field names follow the Hugging Face `ClapConfig` / `ClapAudioConfig` / `ClapTextConfig` and the hub
`preprocessor_config.json`, so a hub `config.json` loads with `from_dict` and unknown keys are ignored.
A converted folder's `config.json` holds every field (nothing is left to a class default), tagged with
`model_type` and `format_version`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

FORMAT_VERSION = 1


def _from_dict(cls, data: dict[str, Any] | None):
    """Build a dataclass from a dict, ignoring unknown keys and turning lists into tuples."""
    data = dict(data or {})
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key in names:
            kwargs[key] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


def _to_dict(obj) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            value = _to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return dict(sorted(out.items()))


@dataclass
class FeatureConfig:
    """Mel frontend settings, named as in the hub `preprocessor_config.json` (docs/numerics.md §1.1, §2)."""

    feature_size: int = 64
    sampling_rate: int = 48000
    hop_length: int = 480
    fft_window_size: int = 1024
    frequency_min: float = 50.0
    frequency_max: float = 14000.0
    max_length_s: int = 10
    padding: str = "repeatpad"
    truncation: str = "rand_trunc"
    top_db: float | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> FeatureConfig:
        return _from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    @property
    def nb_max_samples(self) -> int:
        return int(self.max_length_s * self.sampling_rate)

    @property
    def nb_max_frames(self) -> int:
        return self.nb_max_samples // self.hop_length + 1


@dataclass
class ClapAudioConfig:
    """HTSAT audio tower (HF `ClapAudioConfig` names; docs/numerics.md §1.2)."""

    window_size: int = 8
    num_mel_bins: int = 64
    spec_size: int = 256
    patch_size: int = 4
    patch_stride: tuple[int, int] = (4, 4)
    hidden_size: int = 768
    projection_dim: int = 512
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_attention_heads: tuple[int, ...] = (4, 8, 16, 32)
    enable_fusion: bool = False
    fusion_type: str | None = None
    patch_embed_input_channels: int = 1
    flatten_patch_embeds: bool = True
    patch_embeds_hidden_size: int = 96
    enable_patch_layer_norm: bool = True
    mlp_ratio: float = 4.0
    aff_block_r: int = 4
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-5
    projection_hidden_act: str = "relu"

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ClapAudioConfig:
        return _from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)


@dataclass
class ClapTextConfig:
    """RoBERTa text tower (HF `ClapTextConfig` names; docs/numerics.md §5.1)."""

    vocab_size: int = 50265
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    # The hub text_config omits layer_norm_eps, so HF uses 1e-12; LAION's RobertaModel uses 1e-5.
    layer_norm_eps: float = 1e-12
    projection_dim: int = 512
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    projection_hidden_act: str = "relu"
    # LAION trained with 77 tokens (LAION-AI/CLAP#125); the tokenizer pads and truncates to this.
    max_length: int = 77

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ClapTextConfig:
        return _from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)


@dataclass
class ClapConfig:
    """A whole CLAP model: both towers, the joint space and the frontend."""

    audio_config: ClapAudioConfig = field(default_factory=ClapAudioConfig)
    text_config: ClapTextConfig = field(default_factory=ClapTextConfig)
    feature_config: FeatureConfig = field(default_factory=FeatureConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 1 / 0.07
    model_type: str = "clap"
    # "laion" for the LAION-CLAP families (HF laion/* repos and .pt checkpoints).
    family: str = "laion"
    format_version: int = FORMAT_VERSION
    # Where the weights came from (hub id, folder or checkpoint file name); informational.
    source: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ClapConfig:
        data = dict(data or {})
        cfg = _from_dict(cls, {k: v for k, v in data.items() if not k.endswith("_config")})
        cfg.audio_config = ClapAudioConfig.from_dict(data.get("audio_config"))
        cfg.text_config = ClapTextConfig.from_dict(data.get("text_config"))
        cfg.feature_config = FeatureConfig.from_dict(data.get("feature_config"))
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)


# ------------------------------------------------------------------ Hugging Face config translation
def feature_config_from_hf(preprocessor: dict[str, Any] | None, enable_fusion: bool) -> FeatureConfig:
    """The frontend settings: the hub `preprocessor_config.json` when present, else the LAION defaults.

    Without a preprocessor file the truncation follows the model: `fusion` for fused models,
    `rand_trunc` otherwise; 50-14000 Hz as every LAION checkpoint (not HF's class default fmin 0).
    """
    if preprocessor:
        return FeatureConfig.from_dict(preprocessor)
    return FeatureConfig(
        truncation="fusion" if enable_fusion else "rand_trunc", frequency_min=50.0, frequency_max=14000.0
    )


def config_from_hf(
    config_json: dict[str, Any], preprocessor: dict[str, Any] | None = None, source: str = ""
) -> ClapConfig:
    """A fully resolved `ClapConfig` from an HF `config.json` (unknown keys ignored)."""
    if not isinstance(config_json, dict) or config_json.get("model_type") != "clap":
        kind = config_json.get("model_type") if isinstance(config_json, dict) else type(config_json).__name__
        raise ValueError(f"config.json has model_type {kind!r}; a CLAP model (model_type 'clap') is needed")
    audio = ClapAudioConfig.from_dict(config_json.get("audio_config"))
    text_raw = dict(config_json.get("text_config") or {})
    # Configs saved by transformers 4.x carry the generation default max_length=20 in every sub-config;
    # it is not the tokenizer length (ours: LAION's 77), so it must not override it.
    text_raw.pop("max_length", None)
    text = ClapTextConfig.from_dict(text_raw)
    top = {k: v for k, v in config_json.items() if k in ("projection_dim", "logit_scale_init_value")}
    config = ClapConfig.from_dict(top)
    config.audio_config, config.text_config = audio, text
    config.feature_config = feature_config_from_hf(preprocessor, audio.enable_fusion)
    config.family, config.source = "laion", source
    return config
