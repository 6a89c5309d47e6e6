"""The LAION/HF CLAP family: 48 kHz, 10-s windows, the MLX mel frontend, RoBERTa tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_clap.models.clap import ClapModel
from mlx_clap.pipeline.family_base import FamilyBase
from mlx_clap.preprocess.features import (
    LONG_AUDIO_MODES,
    ClapFeatureExtractor,
    check_waveform,
    quantize_int16,
)

DEFAULT_TEMPLATE = "This is a sound of {}."
OPTIONS = ("quantize_int16",)


class LaionFamily(FamilyBase):
    """`pipeline.Family` for `ClapModel`."""

    name = "laion"
    default_template = DEFAULT_TEMPLATE
    long_audio_modes = LONG_AUDIO_MODES
    missing_tokenizer_hint = (
        "this model has no tokenizer: its folder lacks tokenizer.json (or vocab.json + merges.txt); "
        "convert it again from a source that has the tokenizer files"
    )

    def __init__(self, model: ClapModel, source_dir: Path | None = None, tokenizer: Any = None):
        self.feature_extractor = ClapFeatureExtractor(model.config.feature_config)
        self.sampling_rate = int(model.config.feature_config.sampling_rate)
        self.clip_samples = int(self.feature_extractor.max_samples)
        self.audio_modules = [model.audio_model, model.audio_projection]
        self.text_modules = [model.text_model, model.text_projection]
        # Last, as the tokenizer is read here: a bad config fails before a bad tokenizer file is reported.
        super().__init__(model, source_dir, tokenizer)

    def read_tokenizer(self, folder: Path) -> Any:
        from mlx_clap.preprocess.tokenizer import load_tokenizer

        return load_tokenizer(folder, self.model.config.text_config)

    def describe(self) -> dict[str, Any]:
        """Architecture summary for `mlx-clap info`."""
        c = self.model.config
        return {
            "fused": c.feature_config.truncation == "fusion",
            "audio": f"HTSAT hidden {c.audio_config.hidden_size}, depths {list(c.audio_config.depths)}, "
            f"heads {list(c.audio_config.num_attention_heads)}",
            "text": f"RoBERTa hidden {c.text_config.hidden_size}, {c.text_config.num_hidden_layers} layers, "
            f"{c.text_config.max_length} tokens",
            "features": c.feature_config.to_dict(),
        }

    def check_options(self, options: dict[str, Any]) -> None:
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise TypeError(
                f"unknown option(s) for a LAION model: {', '.join(unknown)} (known: {', '.join(OPTIONS)})"
            )

    def load_file(self, path: str | Path, **options: Any) -> np.ndarray:
        from mlx_clap.preprocess.audio import load_audio

        return load_audio(path, self.sampling_rate).samples

    def prepare_waveform(self, wave: Any, index: int, quantize_int16: bool = False) -> np.ndarray:
        x = check_waveform(wave, index)
        return _quantize(x) if quantize_int16 else x

    def window_inputs(self, clips: list[np.ndarray]) -> list[mx.array | None]:
        return list(self.feature_extractor.window_features(clips))

    def random_source(self, seed: int | None) -> np.random.RandomState | None:
        """`np.random.RandomState(seed)`, or None for numpy's global RNG (replayable with np.random.seed)."""
        return np.random.RandomState(seed) if seed is not None else None

    @property
    def reference_crops(self) -> bool:
        """Whether "reference" takes one window of a long clip (`rand_trunc`), so a file's decoding can
        stop there; the fused models' reference truncation ("fusion") needs the whole clip."""
        return self.feature_extractor.config.truncation == "rand_trunc"

    def reference_start(self, n: int, rng: np.random.RandomState | None) -> int:
        """Start of the `rand_trunc` crop of a clip of `n` > clip_samples samples, drawn as the feature
        extractor draws it (one `randint`; numpy's global RNG when `rng` is None)."""
        return int((rng if rng is not None else np.random).randint(0, n - self.clip_samples + 1))

    def whole_inputs(
        self, waves: list[np.ndarray], mode: str, rng: np.random.RandomState | None
    ) -> tuple[list[mx.array | None], np.ndarray]:
        """ "reference": the config's own truncation and its random draws; "fusion": deterministic picks
        (the middle start of each third), for a fused config only."""
        fx = self.feature_extractor
        owner = np.arange(len(waves), dtype=np.int64)
        if mode == "reference":  # draws as `reference_start` does (one randint per long clip)
            feats, longer = fx(waves, rng=rng)
            return [feats, longer], owner
        return list(fx.fusion_features(waves)), owner

    def audio_features(self, input_features: mx.array, is_longer: mx.array | None = None) -> mx.array:
        return self.model.get_audio_features(input_features, is_longer)

    def text_inputs(self, texts: list[str], policy: str = "laion") -> list[mx.array | None]:
        ids, mask = self.tokenizer(texts, policy=policy)
        return [mx.array(ids), mx.array(mask)]

    def text_features(self, input_ids: mx.array, attention_mask: mx.array | None = None) -> mx.array:
        return self.model.get_text_features(input_ids, attention_mask)


# The keyword argument `quantize_int16` shadows the function inside `prepare_waveform`.
_quantize = quantize_int16

__all__ = ["DEFAULT_TEMPLATE", "LaionFamily"]
