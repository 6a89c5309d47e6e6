"""Configuration dataclasses, fully resolved.

Field names follow the Hugging Face `ClapConfig` / `ClapAudioConfig` / `ClapTextConfig` and the hub
`preprocessor_config.json`, so a hub `config.json` loads with `from_dict` and unknown keys are ignored.
A converted folder's `config.json` holds every field (nothing is left to a class default), tagged with
`model_type` and `format_version`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

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


_Config = TypeVar("_Config", bound="DictSerializable")


class DictSerializable:
    """`from_dict` / `to_dict` of a config dataclass: the JSON a config.json section holds.

    Defined once for the config classes here and in `models.msclap.config`; a class with nested sections
    overrides `from_dict` to build each section with its own class.
    """

    @classmethod
    def from_dict(cls: type[_Config], data: dict[str, Any] | None) -> _Config:
        """The config from a dict: unknown keys ignored, lists turned into tuples, missing keys defaulted."""
        return _from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        """Every field, keys sorted, nested configs as dicts and tuples as lists."""
        return _to_dict(self)


# ------------------------------------------------------------------ validation
# Bounds are generous (every released LAION, HF and msclap model sits far inside them) but finite, so a
# hostile or damaged config.json is refused by name before any array is sized by it.
MAX_WIDTH = 8192
MAX_DEPTH = 64
MAX_STAGES = 8
MAX_VOCAB = 1_000_000
MAX_POSITIONS = 65536
MIN_RATE, MAX_RATE = 8000, 192000


def check_int(where: str, value: Any, low: int, high: int) -> int:
    """`value` as an int in [low, high]; a ValueError naming the field otherwise (bools are not ints)."""
    if type(value) is not int:
        raise ValueError(f"{where} must be an integer, not {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{where} = {value} is out of range (allowed {low}..{high})")
    return value


def check_float(where: str, value: Any, low: float, high: float, low_open: bool = False) -> float:
    """`value` as a finite number in [low, high] ((low, high] with `low_open`)."""
    if type(value) not in (int, float) or value != value:
        raise ValueError(f"{where} must be a number, not {value!r}")
    if value > high or value < low or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise ValueError(f"{where} = {value} is out of range (allowed {bracket}{low}, {high}])")
    return float(value)


def check_bool(where: str, value: Any) -> bool:
    if type(value) is not bool:
        raise ValueError(f"{where} must be true or false, not {value!r}")
    return value


def check_choice(where: str, value: Any, choices: tuple) -> Any:
    if value not in choices:
        raise ValueError(f"{where} = {value!r} is not one of {', '.join(repr(c) for c in choices)}")
    return value


def check_int_list(where: str, value: Any, low: int, high: int, length: tuple[int, int]) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not length[0] <= len(value) <= length[1]:
        raise ValueError(f"{where} must be a list of {length[0]}..{length[1]} integers, not {value!r}")
    return tuple(check_int(f"{where}[{i}]", v, low, high) for i, v in enumerate(value))


def check_heads(where: str, width: int, heads: int) -> None:
    """Attention splits the width evenly across heads."""
    if width % heads:
        raise ValueError(f"{where} = {heads} does not divide the width {width}")


def check_text_tower(prefix: str, cfg: Any, token_ids: tuple[str, ...] = ()) -> None:
    """The shape of a BERT-like text tower, in the field names RoBERTa, BERT and ModernBERT share:
    vocabulary, width, depth, heads that divide the width, FFN width, positions; then the special token
    ids named in `token_ids`, each inside the vocabulary. ValueError naming the first bad field."""
    p = prefix + "."
    vocab = check_int(p + "vocab_size", cfg.vocab_size, 1, MAX_VOCAB)
    width = check_int(p + "hidden_size", cfg.hidden_size, 1, MAX_WIDTH)
    check_int(p + "num_hidden_layers", cfg.num_hidden_layers, 1, MAX_DEPTH)
    heads = check_int(p + "num_attention_heads", cfg.num_attention_heads, 1, width)
    check_heads(p + "num_attention_heads", width, heads)
    check_int(p + "intermediate_size", cfg.intermediate_size, 1, 4 * MAX_WIDTH)
    check_int(p + "max_position_embeddings", cfg.max_position_embeddings, 1, MAX_POSITIONS)
    for name in token_ids:
        check_int(p + name, getattr(cfg, name), 0, vocab - 1)


@dataclass
class FeatureConfig(DictSerializable):
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

    def validate(self, prefix: str = "feature_config") -> None:
        """ValueError naming the first field outside its type or sane bounds."""
        p = prefix + "."
        check_int(p + "feature_size", self.feature_size, 1, 1024)
        check_int(p + "sampling_rate", self.sampling_rate, MIN_RATE, MAX_RATE)
        check_int(p + "fft_window_size", self.fft_window_size, 16, 65536)
        check_int(p + "hop_length", self.hop_length, 1, self.fft_window_size)
        check_float(p + "frequency_min", self.frequency_min, 0.0, self.sampling_rate / 2)
        check_float(p + "frequency_max", self.frequency_max, self.frequency_min, self.sampling_rate / 2, True)
        check_float(p + "max_length_s", self.max_length_s, 0.0, 600.0, low_open=True)
        check_choice(p + "padding", self.padding, ("repeatpad", "repeat", "pad"))
        check_choice(p + "truncation", self.truncation, ("rand_trunc", "fusion"))
        if self.top_db is not None:
            check_float(p + "top_db", self.top_db, 0.0, 1000.0, low_open=True)

    @property
    def nb_max_samples(self) -> int:
        return int(self.max_length_s * self.sampling_rate)

    @property
    def nb_max_frames(self) -> int:
        return self.nb_max_samples // self.hop_length + 1


@dataclass
class ClapAudioConfig(DictSerializable):
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

    def validate(self, prefix: str = "audio_config") -> None:
        """ValueError naming the first field outside its type or sane bounds (HTSAT's shape rules too)."""
        p = prefix + "."
        check_int(p + "window_size", self.window_size, 1, 64)
        check_int(p + "num_mel_bins", self.num_mel_bins, 1, 1024)
        check_int(p + "spec_size", self.spec_size, 1, 4096)
        check_int(p + "patch_size", self.patch_size, 1, 64)
        stride = (
            self.patch_stride if isinstance(self.patch_stride, (list, tuple)) else (self.patch_stride,) * 2
        )
        check_int_list(p + "patch_stride", stride, 1, 64, (2, 2))
        depths = check_int_list(p + "depths", self.depths, 1, MAX_DEPTH, (1, MAX_STAGES))
        heads = check_int_list(p + "num_attention_heads", self.num_attention_heads, 1, 1024, (1, MAX_STAGES))
        if len(heads) != len(depths):
            raise ValueError(f"{p}num_attention_heads has {len(heads)} entries but depths has {len(depths)}")
        embed = check_int(p + "patch_embeds_hidden_size", self.patch_embeds_hidden_size, 1, MAX_WIDTH)
        # Swin doubles the width at every stage; the last stage's width feeds the projection.
        if embed * 2 ** (len(depths) - 1) > MAX_WIDTH:
            raise ValueError(
                f"{p}patch_embeds_hidden_size {embed} doubled over {len(depths)} stages exceeds {MAX_WIDTH}"
            )
        for i, h in enumerate(heads):
            check_heads(f"{p}num_attention_heads[{i}]", embed * 2**i, h)
        check_int(p + "hidden_size", self.hidden_size, 1, MAX_WIDTH)
        if self.hidden_size != embed * 2 ** (len(depths) - 1):
            raise ValueError(
                f"{p}hidden_size = {self.hidden_size} is not the last stage's width "
                f"{embed * 2 ** (len(depths) - 1)} (patch_embeds_hidden_size * 2^(stages-1))"
            )
        check_int(p + "projection_dim", self.projection_dim, 1, MAX_WIDTH)
        check_bool(p + "enable_fusion", self.enable_fusion)
        check_choice(p + "fusion_type", self.fusion_type, (None, "aff_2d"))
        check_int(p + "patch_embed_input_channels", self.patch_embed_input_channels, 1, 16)
        check_bool(p + "flatten_patch_embeds", self.flatten_patch_embeds)
        check_bool(p + "enable_patch_layer_norm", self.enable_patch_layer_norm)
        check_float(p + "mlp_ratio", self.mlp_ratio, 0.0, 16.0, low_open=True)
        check_int(p + "aff_block_r", self.aff_block_r, 1, 1024)
        check_bool(p + "qkv_bias", self.qkv_bias)
        check_float(p + "layer_norm_eps", self.layer_norm_eps, 0.0, 1.0, low_open=True)


@dataclass
class ClapTextConfig(DictSerializable):
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

    def validate(self, prefix: str = "text_config") -> None:
        """ValueError naming the first field outside its type or sane bounds."""
        p = prefix + "."
        check_text_tower(prefix, self, ("pad_token_id", "bos_token_id", "eos_token_id"))
        check_int(p + "type_vocab_size", self.type_vocab_size, 1, 1024)
        check_float(p + "layer_norm_eps", self.layer_norm_eps, 0.0, 1.0, low_open=True)
        check_int(p + "projection_dim", self.projection_dim, 1, MAX_WIDTH)
        check_int(p + "max_length", self.max_length, 1, self.max_position_embeddings)


@dataclass
class ClapConfig(DictSerializable):
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
        cfg = super().from_dict({k: v for k, v in data.items() if not k.endswith("_config")})
        cfg.audio_config = ClapAudioConfig.from_dict(data.get("audio_config"))
        cfg.text_config = ClapTextConfig.from_dict(data.get("text_config"))
        cfg.feature_config = FeatureConfig.from_dict(data.get("feature_config"))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """ValueError naming the first field (as `audio_config.depths[2]`) outside its type or bounds.

        Called before a model is built from the config, so a config.json asking for millions of layers
        is refused instead of allocating gigabytes.
        """
        for name, cls in (
            ("audio_config", ClapAudioConfig),
            ("text_config", ClapTextConfig),
            ("feature_config", FeatureConfig),
        ):
            if not isinstance(getattr(self, name), cls):
                raise ValueError(f"{name} must be a JSON object")
        self.audio_config.validate()
        self.text_config.validate()
        self.feature_config.validate()
        check_int("projection_dim", self.projection_dim, 1, MAX_WIDTH)
        check_float("logit_scale_init_value", self.logit_scale_init_value, 0.0, 1e6, low_open=True)


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
    config.validate()
    return config
