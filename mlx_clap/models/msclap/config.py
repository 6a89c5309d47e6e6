"""Configuration of the Microsoft CLAP (msclap) models, fully resolved in a converted folder's config.json.

Values follow msclap 1.3.4's `configs/config_{2022,2023}.yml` and, for HTSAT, `models/config.py`
(docs/numerics.md §1.3). Where the yml is ignored by the original code (`n_fft: 1028`; `fmax: 8000` for
HTSAT), the value the code really uses is stored, and the comment says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mlx_clap.config import (
    FORMAT_VERSION,
    MAX_DEPTH,
    MAX_POSITIONS,
    MAX_RATE,
    MAX_VOCAB,
    MAX_WIDTH,
    MIN_RATE,
    ClapAudioConfig,
    DictSerializable,
    FeatureConfig,
    check_choice,
    check_float,
    check_heads,
    check_int,
    check_int_list,
    check_text_tower,
)

VERSIONS = ("2022", "2023")


@dataclass
class GPT2TextConfig(DictSerializable):
    """GPT-2 small (the `gpt2` hub model): pre-LN blocks, gelu_new, LN eps 1e-5."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5

    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def intermediate_size(self) -> int:
        return self.n_inner or 4 * self.n_embd


@dataclass
class BertTextConfig(DictSerializable):
    """bert-base-uncased: post-LN blocks, exact GELU, LN eps 1e-12, two token types."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    hidden_act: str = "gelu"  # exact (erf) GELU, as bert-base-uncased's config


@dataclass
class Cnn14Config(DictSerializable):
    """PANNs Cnn14 as msclap 2022 builds it (`models/audio.py`)."""

    channels: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)
    out_emb: int = 2048
    mel_bins: int = 64


@dataclass
class MsClapConfig(DictSerializable):
    """A whole msclap model: audio tower, text tower, projections, frontend."""

    version: str = "2023"
    # "HTSAT" (2023) or "Cnn14" (2022)
    audioenc_name: str = "HTSAT"
    # "gpt2" (2023) or "bert-base-uncased" (2022)
    text_model: str = "gpt2"
    # Tokens after padding/truncation: 77 for GPT-2, 100 for BERT.
    text_len: int = 77
    transformer_embed_dim: int = 768
    out_emb: int = 768
    d_proj: int = 1024
    # Input rate and clip length: 44.1 kHz, 7 s (2023) or 5 s (2022).
    sampling_rate: int = 44100
    duration: int = 7
    window_size: int = 1024
    hop_size: int = 320
    mel_bins: int = 64
    fmin: float = 50.0
    fmax: float = 14000.0
    # The rate the mel filterbank was *designed* for. 2023's HTSAT takes it from models/config.py
    # (32 kHz) although the audio is 44.1 kHz (microsoft/CLAP#38); 2022's Cnn14 uses 44.1 kHz.
    mel_sampling_rate: int = 32000
    gpt2: GPT2TextConfig = field(default_factory=GPT2TextConfig)
    bert: BertTextConfig = field(default_factory=BertTextConfig)
    cnn14: Cnn14Config = field(default_factory=Cnn14Config)
    # HTSAT-tiny, as msclap's HTSATWrapper always builds it (docs/numerics.md §1.2).
    htsat: ClapAudioConfig = field(default_factory=ClapAudioConfig)
    model_type: str = "clap"
    family: str = "msclap"
    format_version: int = FORMAT_VERSION
    source: str = ""

    @property
    def clip_samples(self) -> int:
        return int(self.duration * self.sampling_rate)

    @property
    def is_gpt2(self) -> bool:
        return "gpt" in self.text_model

    @property
    def feature_config(self) -> FeatureConfig:
        """The shared frontend description (what `is_converted_folder` and tools read)."""
        return FeatureConfig(
            feature_size=self.mel_bins,
            sampling_rate=self.sampling_rate,
            hop_length=self.hop_size,
            fft_window_size=self.window_size,
            frequency_min=self.fmin,
            frequency_max=self.fmax,
            max_length_s=self.duration,
            padding="repeat",
            truncation="rand_trunc",
            top_db=None,
        )

    @property
    def projection_dim(self) -> int:
        return self.d_proj

    @classmethod
    def for_version(cls, version: str) -> MsClapConfig:
        """The released configuration of a version ("2022" or "2023")."""
        if version == "2023":
            return cls()
        if version == "2022":
            return cls(
                version="2022",
                audioenc_name="Cnn14",
                text_model="bert-base-uncased",
                text_len=100,
                out_emb=2048,
                duration=5,
                mel_sampling_rate=44100,
            )
        raise ValueError(f"unknown msclap version {version!r}: use one of {', '.join(VERSIONS)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> MsClapConfig:
        data = dict(data or {})
        nested = {"gpt2": GPT2TextConfig, "bert": BertTextConfig, "cnn14": Cnn14Config}
        cfg = super().from_dict({k: v for k, v in data.items() if k not in nested and k != "htsat"})
        for name, sub in nested.items():
            setattr(cfg, name, sub.from_dict(data.get(name)))
        cfg.htsat = ClapAudioConfig.from_dict(data.get("htsat"))
        if cfg.version not in VERSIONS:
            raise ValueError(f"unknown msclap version {cfg.version!r}")
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """ValueError naming the first field outside its type or sane bounds, before a model is built."""
        check_choice("version", self.version, VERSIONS)
        check_choice("audioenc_name", self.audioenc_name, ("HTSAT", "Cnn14"))
        check_int("text_len", self.text_len, 1, MAX_POSITIONS)
        for name in ("transformer_embed_dim", "out_emb", "d_proj"):
            check_int(name, getattr(self, name), 1, MAX_WIDTH)
        check_int("sampling_rate", self.sampling_rate, MIN_RATE, MAX_RATE)
        check_int("mel_sampling_rate", self.mel_sampling_rate, MIN_RATE, MAX_RATE)
        check_float("duration", self.duration, 0.0, 600.0, low_open=True)
        check_int("window_size", self.window_size, 16, 65536)
        check_int("hop_size", self.hop_size, 1, self.window_size)
        check_int("mel_bins", self.mel_bins, 1, 1024)
        check_float("fmin", self.fmin, 0.0, self.mel_sampling_rate / 2)
        check_float("fmax", self.fmax, self.fmin, self.mel_sampling_rate / 2, low_open=True)
        g = self.gpt2
        check_int("gpt2.vocab_size", g.vocab_size, 1, MAX_VOCAB)
        check_int("gpt2.n_positions", g.n_positions, 1, MAX_POSITIONS)
        check_int("gpt2.n_embd", g.n_embd, 1, MAX_WIDTH)
        check_int("gpt2.n_layer", g.n_layer, 1, MAX_DEPTH)
        check_heads("gpt2.n_head", g.n_embd, check_int("gpt2.n_head", g.n_head, 1, g.n_embd))
        if g.n_inner is not None:
            check_int("gpt2.n_inner", g.n_inner, 1, 4 * MAX_WIDTH)
        check_float("gpt2.layer_norm_epsilon", g.layer_norm_epsilon, 0.0, 1.0, low_open=True)
        check_text_tower("bert", self.bert, ("pad_token_id",))
        check_int("bert.type_vocab_size", self.bert.type_vocab_size, 1, 1024)
        check_float("bert.layer_norm_eps", self.bert.layer_norm_eps, 0.0, 1.0, low_open=True)
        check_int_list("cnn14.channels", self.cnn14.channels, 1, MAX_WIDTH, (1, 16))
        check_int("cnn14.out_emb", self.cnn14.out_emb, 1, MAX_WIDTH)
        check_int("cnn14.mel_bins", self.cnn14.mel_bins, 1, 1024)
        self.htsat.validate("htsat")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["feature_config"] = self.feature_config.to_dict()
        return dict(sorted(out.items()))
