"""Configuration of Perception Encoder Audio (PE-A): the DAC-style codec encoder, the audio transformer,
the ModernBERT text tower, fully resolved in a converted folder's config.json.

Field names follow transformers 5.25 (`PeAudioConfig`, `PeAudioEncoderConfig`, `DacConfig`,
`ModernBertConfig`), and so do the defaults a hub `config.json` may leave out: `PeAudioConfig`'s own
text defaults (ModernBERT-large: 1024 wide, 22 layers, 16 heads, FFN 2624) over `ModernBertConfig`'s, and
`PeAudioEncoderConfig`'s DAC defaults (ratios 2, 8, 10, 12, width 64, codebook 128). `from_hf` reads a
hub folder's `config.json` (+ `preprocessor_config.json`); `from_dict` reads our converted one. Only the
audio-text checkpoints (model_type `pe_audio`) are supported: the audio-video and video ones are refused
by name (`UnsupportedCheckpoint`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from mlx_clap.config import (
    FORMAT_VERSION,
    MAX_DEPTH,
    MAX_POSITIONS,
    MAX_RATE,
    MAX_WIDTH,
    MIN_RATE,
    DictSerializable,
    check_bool,
    check_choice,
    check_float,
    check_heads,
    check_int,
    check_int_list,
    check_text_tower,
)

FAMILY = "pe_audio"
MODEL_TYPE = "pe_audio"
# The two heads transformers builds on the same weights: a pooled (class-token) embedding per clip, or one
# embedding per 40-ms frame. A checkpoint says which it was trained as in `architectures`.
POOLED, FRAME_LEVEL = "PeAudioModel", "PeAudioFrameLevelModel"
ARCHITECTURES = (POOLED, FRAME_LEVEL)
SUPPORTED = (
    "PE audio-text checkpoints (model_type 'pe_audio': PeAudioModel, PeAudioFrameLevelModel, "
    "e.g. facebook/pe-a-frame-base)"
)
# Checkpoints of the same family that are not audio-text models, and what they are.
OTHER_PE_TYPES = {
    "pe_audio_video": "a PE audio-video checkpoint (PeAudioVideoModel, e.g. facebook/pe-av-large)",
    "pe_audio_video_encoder": "a PE audio-video encoder without a text tower",
    "pe_video": "a PE video checkpoint (PeVideoModel)",
    "pe_video_encoder": "a PE video encoder without a text tower",
    "pe_audio_encoder": "a PE audio encoder without a text tower",
}
ACTIVATIONS = ("gelu", "silu", "relu", "gelu_new", "gelu_pytorch_tanh")

# PeAudioConfig's own text defaults (ModernBERT-large), applied before ModernBertConfig's class defaults.
PE_TEXT_DEFAULTS = {
    "hidden_size": 1024,
    "intermediate_size": 2624,
    "num_hidden_layers": 22,
    "num_attention_heads": 16,
}


class UnsupportedCheckpoint(ValueError):
    """A Perception Encoder checkpoint of a kind mlx-clap does not run (video, audio-video, encoder-only)."""


@dataclass
class DacEncoderConfig(DictSerializable):
    """The codec encoder (transformers `DacConfig` names; only what the encoder uses)."""

    encoder_hidden_size: int = 64
    downsampling_ratios: tuple[int, ...] = (2, 8, 10, 12)
    # The codec's latent width (DAC's `hidden_size`), then the bottleneck to `codebook_dim`.
    hidden_size: int = 1024
    codebook_dim: int = 128

    @property
    def hop_length(self) -> int:
        """Samples per frame: the product of the strides (1920 = 40 ms at 48 kHz)."""
        return int(math.prod(self.downsampling_ratios))

    def validate(self, prefix: str) -> None:
        p = prefix + "."
        check_int(p + "encoder_hidden_size", self.encoder_hidden_size, 1, MAX_WIDTH)
        ratios = check_int_list(p + "downsampling_ratios", self.downsampling_ratios, 1, 64, (1, 8))
        check_int(
            p + "encoder_hidden_size * 2**len(ratios)", self.encoder_hidden_size * 2 ** len(ratios), 1, 16384
        )
        check_int(p + "hidden_size", self.hidden_size, 1, MAX_WIDTH)
        check_int(p + "codebook_dim", self.codebook_dim, 1, MAX_WIDTH)


@dataclass
class PeAudioEncoderConfig(DictSerializable):
    """The audio tower after the codec: patch embedder, RoPE transformer (RMSNorm, gated MLP), output."""

    dac_config: DacEncoderConfig = field(default_factory=DacEncoderConfig)
    hidden_size: int = 1792
    intermediate_size: int = 4800
    num_hidden_layers: int = 6
    num_attention_heads: int = 14
    num_key_value_heads: int = 14
    head_dim: int = 128
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 20000.0
    attention_bias: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> PeAudioEncoderConfig:
        data = dict(data or {})
        cfg = super().from_dict({k: v for k, v in data.items() if k != "dac_config"})
        cfg.dac_config = DacEncoderConfig.from_dict(data.get("dac_config"))
        return cfg

    def validate(self, prefix: str = "audio_config") -> None:
        p = prefix + "."
        if not isinstance(self.dac_config, DacEncoderConfig):
            raise ValueError(f"{p}dac_config must be a JSON object")
        self.dac_config.validate(p + "dac_config")
        check_int(p + "hidden_size", self.hidden_size, 1, MAX_WIDTH)
        check_int(p + "intermediate_size", self.intermediate_size, 1, 4 * MAX_WIDTH)
        check_int(p + "num_hidden_layers", self.num_hidden_layers, 1, MAX_DEPTH)
        heads = check_int(p + "num_attention_heads", self.num_attention_heads, 1, MAX_WIDTH)
        kv = check_int(p + "num_key_value_heads", self.num_key_value_heads, 1, heads)
        check_heads(p + "num_key_value_heads", heads, kv)  # grouped-query: kv heads divide the heads
        head_dim = check_int(p + "head_dim", self.head_dim, 2, 1024)
        if head_dim % 2:
            raise ValueError(f"{p}head_dim = {head_dim} must be even (rotary embeddings rotate pairs)")
        check_choice(p + "hidden_act", self.hidden_act, ACTIVATIONS)
        check_float(p + "rms_norm_eps", self.rms_norm_eps, 0.0, 1.0, low_open=True)
        check_float(p + "rope_theta", self.rope_theta, 1.0, 1e9)
        check_bool(p + "attention_bias", self.attention_bias)


@dataclass
class ModernBertConfig(DictSerializable):
    """The ModernBERT text tower (transformers `ModernBertConfig` names)."""

    vocab_size: int = 50368
    hidden_size: int = 1024
    intermediate_size: int = 2624
    num_hidden_layers: int = 22
    num_attention_heads: int = 16
    hidden_activation: str = "gelu"
    max_position_embeddings: int = 8192
    norm_eps: float = 1e-5
    norm_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    # "full_attention" or "sliding_attention" per layer (every third layer global, from the first).
    layer_types: tuple[str, ...] = ()
    # Total window of the sliding layers: a token sees those at most local_attention // 2 away.
    local_attention: int = 128
    global_rope_theta: float = 160000.0
    local_rope_theta: float = 10000.0
    pad_token_id: int = 50283
    cls_token_id: int = 50281
    sep_token_id: int = 50282

    def __post_init__(self) -> None:
        if not self.layer_types and isinstance(self.num_hidden_layers, int) and self.num_hidden_layers > 0:
            self.layer_types = default_layer_types(self.num_hidden_layers, 3)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def sliding_window(self) -> int:
        """Largest |query - key| distance a sliding layer attends (transformers: local_attention // 2)."""
        return self.local_attention // 2

    def validate(self, prefix: str = "text_config") -> None:
        p = prefix + "."
        check_text_tower(prefix, self, ("pad_token_id", "cls_token_id", "sep_token_id"))
        layers = self.num_hidden_layers
        if self.head_dim % 2:
            raise ValueError(f"{p}head width {self.head_dim} must be even (rotary embeddings rotate pairs)")
        check_choice(p + "hidden_activation", self.hidden_activation, ACTIVATIONS)
        check_float(p + "norm_eps", self.norm_eps, 0.0, 1.0, low_open=True)
        for name in ("norm_bias", "attention_bias", "mlp_bias"):
            check_bool(p + name, getattr(self, name))
        if not isinstance(self.layer_types, (list, tuple)) or len(self.layer_types) != layers:
            raise ValueError(f"{p}layer_types must list {layers} layer types, not {self.layer_types!r}")
        for i, kind in enumerate(self.layer_types):
            check_choice(f"{p}layer_types[{i}]", kind, ("full_attention", "sliding_attention"))
        check_int(p + "local_attention", self.local_attention, 2, MAX_POSITIONS)
        check_float(p + "global_rope_theta", self.global_rope_theta, 1.0, 1e9)
        check_float(p + "local_rope_theta", self.local_rope_theta, 1.0, 1e9)


@dataclass
class PeAudioFeatureConfig(DictSerializable):
    """What the pipeline and tools read about the input side (there is no mel: the model takes samples).

    Shaped like the CLAP `FeatureConfig` where the fields mean the same (`sampling_rate`, `truncation`),
    so code that reports a model's frontend reads either family.
    """

    sampling_rate: int = 48000
    hop_length: int = 1920
    # Whole clips go through the model; there is no crop.
    truncation: str = "none"


@dataclass
class PeAudioConfig(DictSerializable):
    """A whole PE-A model: audio tower, text tower, contrastive heads, the sigmoid scale and bias."""

    audio_config: PeAudioEncoderConfig = field(default_factory=PeAudioEncoderConfig)
    text_config: ModernBertConfig = field(default_factory=ModernBertConfig)
    architecture: str = POOLED
    sampling_rate: int = 48000
    model_type: str = MODEL_TYPE
    family: str = FAMILY
    format_version: int = FORMAT_VERSION
    # Where the weights came from (hub id, folder); informational.
    source: str = ""

    @property
    def is_frame_level(self) -> bool:
        return self.architecture == FRAME_LEVEL

    @property
    def hop_length(self) -> int:
        return self.audio_config.dac_config.hop_length

    @property
    def projection_dim(self) -> int:
        """Width of the joint space: both heads project to the text tower's width."""
        return self.text_config.hidden_size

    @property
    def feature_config(self) -> PeAudioFeatureConfig:
        return PeAudioFeatureConfig(sampling_rate=self.sampling_rate, hop_length=self.hop_length)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> PeAudioConfig:
        """A converted folder's config.json (every field present); validated."""
        data = dict(data or {})
        nested = ("audio_config", "text_config", "feature_config")
        cfg = super().from_dict({k: v for k, v in data.items() if k not in nested})
        cfg.audio_config = PeAudioEncoderConfig.from_dict(data.get("audio_config"))
        cfg.text_config = ModernBertConfig.from_dict(data.get("text_config"))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """ValueError naming the first field outside its type or sane bounds, before a model is built."""
        if not isinstance(self.audio_config, PeAudioEncoderConfig):
            raise ValueError("audio_config must be a JSON object")
        if not isinstance(self.text_config, ModernBertConfig):
            raise ValueError("text_config must be a JSON object")
        self.audio_config.validate()
        self.text_config.validate()
        check_choice("architecture", self.architecture, ARCHITECTURES)
        check_int("sampling_rate", self.sampling_rate, MIN_RATE, MAX_RATE)
        check_choice("model_type", self.model_type, (MODEL_TYPE,))
        check_choice("family", self.family, (FAMILY,))

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        # The shared converted-folder marker (io.folder.is_converted_folder) and what tools report.
        out["feature_config"] = self.feature_config.to_dict()
        return dict(sorted(out.items()))


def default_layer_types(layers: int, every: int) -> tuple[str, ...]:
    """ModernBERT's pattern: layer i is global when i % every == 0, else sliding."""
    return tuple("sliding_attention" if i % every else "full_attention" for i in range(layers))


def check_pe_model_type(data: Any, where: str) -> None:
    """Refuse anything but a `pe_audio` config, naming what it is and what is supported."""
    kind = data.get("model_type") if isinstance(data, dict) else None
    if kind == MODEL_TYPE:
        return
    if kind in OTHER_PE_TYPES:
        raise UnsupportedCheckpoint(
            f"{where}: {OTHER_PE_TYPES[kind]} (model_type {kind!r}); mlx-clap supports {SUPPORTED}"
        )
    raise UnsupportedCheckpoint(
        f"{where}: model_type {kind!r} is not a PE audio model; mlx-clap supports {SUPPORTED}"
    )


def _rope_theta(raw: dict[str, Any], key: str | None, legacy: str, default: float) -> float:
    """The rope theta of an HF config: `rope_parameters[key]` (or the flat one), else a legacy key.

    Only the default rotary type is implemented; a scaled one (linear, yarn, ...) is refused by name.
    """
    params = raw.get("rope_parameters") or raw.get("rope_scaling")
    if isinstance(params, dict) and key is not None and isinstance(params.get(key), dict):
        params = params[key]
    if isinstance(params, dict):
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise ValueError(f"rope type {kind!r} is not supported (only 'default')")
        if "rope_theta" in params:
            return params["rope_theta"]
    return raw.get(legacy, default)


def text_config_from_hf(raw: dict[str, Any] | None) -> ModernBertConfig:
    """`ModernBertConfig` from an HF `text_config`, with PeAudioConfig's defaults for missing keys."""
    raw = {**PE_TEXT_DEFAULTS, **dict(raw or {})}
    model_type = raw.get("model_type", "modernbert")
    if model_type != "modernbert":
        raise ValueError(f"text_config.model_type {model_type!r}: only a ModernBERT text tower is supported")
    layers = raw["num_hidden_layers"]
    layer_types = raw.get("layer_types")
    if not layer_types and isinstance(layers, int):
        layer_types = default_layer_types(layers, raw.get("global_attn_every_n_layers", 3))
    cfg = ModernBertConfig.from_dict({k: v for k, v in raw.items() if k != "layer_types"})
    cfg.layer_types = tuple(layer_types or ())
    cfg.global_rope_theta = _rope_theta(raw, "full_attention", "global_rope_theta", 160000.0)
    cfg.local_rope_theta = _rope_theta(raw, "sliding_attention", "local_rope_theta", 10000.0)
    return cfg


def audio_config_from_hf(raw: dict[str, Any] | None) -> PeAudioEncoderConfig:
    """`PeAudioEncoderConfig` from an HF `audio_config` (num_key_value_heads defaults to the heads)."""
    raw = dict(raw or {})
    if raw.get("model_type", "pe_audio_encoder") != "pe_audio_encoder":
        raise ValueError(f"audio_config.model_type {raw.get('model_type')!r} is not 'pe_audio_encoder'")
    if raw.get("num_key_value_heads") is None:
        raw["num_key_value_heads"] = raw.get("num_attention_heads", PeAudioEncoderConfig.num_attention_heads)
    dac = {"encoder_hidden_size": 64, "downsampling_ratios": [2, 8, 10, 12], "codebook_dim": 128}
    dac.update(raw.get("dac_config") or {})
    cfg = PeAudioEncoderConfig.from_dict({k: v for k, v in raw.items() if k != "dac_config"})
    cfg.dac_config = DacEncoderConfig.from_dict(dac)
    cfg.rope_theta = _rope_theta(raw, None, "rope_theta", 20000.0)
    return cfg


def config_from_hf(
    config_json: dict[str, Any],
    preprocessor: dict[str, Any] | None = None,
    source: str = "",
    where: str = "config.json",
) -> PeAudioConfig:
    """A fully resolved `PeAudioConfig` from an HF `config.json` (+ `preprocessor_config.json`).

    UnsupportedCheckpoint for the other Perception Encoder kinds; ValueError for a field out of range.
    """
    check_pe_model_type(config_json, where)
    archs = config_json.get("architectures") or [POOLED]
    known = [a for a in archs if a in ARCHITECTURES]
    if not known:
        raise UnsupportedCheckpoint(
            f"{where}: architectures {archs} are not ones mlx-clap runs; it supports {SUPPORTED}"
        )
    audio = audio_config_from_hf(config_json.get("audio_config"))
    pre = preprocessor or {}
    hop = pre.get("hop_length")
    if hop is not None and hop != audio.dac_config.hop_length:
        raise ValueError(
            f"preprocessor hop_length {hop} differs from the codec's {audio.dac_config.hop_length} "
            "(the product of its downsampling ratios)"
        )
    cfg = PeAudioConfig(
        audio_config=audio,
        text_config=text_config_from_hf(config_json.get("text_config")),
        architecture=known[0],
        sampling_rate=pre.get("sampling_rate", 48000),
        source=source,
    )
    cfg.validate()
    return cfg


__all__ = [
    "ARCHITECTURES",
    "FAMILY",
    "FRAME_LEVEL",
    "POOLED",
    "SUPPORTED",
    "DacEncoderConfig",
    "ModernBertConfig",
    "PeAudioConfig",
    "PeAudioEncoderConfig",
    "PeAudioFeatureConfig",
    "UnsupportedCheckpoint",
    "audio_config_from_hf",
    "check_pe_model_type",
    "config_from_hf",
    "text_config_from_hf",
]
