"""The Microsoft CLAP family: 44.1 kHz, 5/7-s clips tiled when short, in-model log-mel, GPT-2/BERT tokens."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_clap.io.folder import WeightsError
from mlx_clap.models.msclap.model import MsClapModel
from mlx_clap.pipeline.family_base import FamilyBase
from mlx_clap.preprocess.msclap_frontend import STEREO_MODES, repeat_to_length, to_mono

# msclap's README and examples prompt with "this is the sound of <class>".
DEFAULT_TEMPLATE = "this is the sound of {}"
LONG_AUDIO_MODES = ("windows-mean", "head", "center", "reference")


class MsClapFamily(FamilyBase):
    """`pipeline.Family` for `MsClapModel`."""

    name = "msclap"
    default_template = DEFAULT_TEMPLATE
    long_audio_modes = LONG_AUDIO_MODES
    missing_tokenizer_hint = (
        "this msclap model has no tokenizer: its folder lacks tokenizer.json; convert it again "
        "with the text model's tokenizer files (convert/msclap.py --tokenizer DIR)"
    )

    def __init__(self, model: MsClapModel, source_dir: Path | None = None, tokenizer: Any = None):
        self.sampling_rate = int(model.config.sampling_rate)
        self.clip_samples = int(model.config.clip_samples)
        self.audio_modules = [model.audio_encoder]
        self.text_modules = [model.caption_encoder]
        # Last, as the tokenizer is read here: a bad config fails before a bad tokenizer file is reported.
        super().__init__(model, source_dir, tokenizer)

    def read_tokenizer(self, folder: Path) -> Any:
        from mlx_clap.preprocess.msclap_tokenizer import MsClapTokenizer

        config = self.model.config
        try:
            max_pos = config.gpt2.n_positions if config.is_gpt2 else config.bert.max_position_embeddings
            return MsClapTokenizer.from_folder(folder, config.text_model, config.text_len, max_pos)
        except FileNotFoundError:
            return None
        except Exception as exc:  # tokenizers raises its own types for a corrupt or foreign file
            raise WeightsError(
                f"{folder / 'tokenizer.json'}: cannot use it as the {config.text_model} tokenizer ({exc})"
            ) from exc

    def describe(self) -> dict[str, Any]:
        """Architecture summary for `mlx-clap info`."""
        c = self.model.config
        return {
            "fused": False,
            "audio": f"{c.audioenc_name} -> {c.d_proj}-d projection",
            "text": f"{c.text_model}, {c.text_len} tokens",
            "version": getattr(c, "version", None),
        }

    def check_options(self, options: dict[str, Any]) -> None:
        if options.get("quantize_int16"):
            raise ValueError("quantize_int16 is a LAION reference mode; msclap feeds float audio unchanged")
        unknown = sorted(set(options) - {"stereo", "quantize_int16"})
        if unknown:
            raise TypeError(f"unknown option(s) for a msclap model: {', '.join(unknown)} (known: stereo)")
        stereo = options.get("stereo", "mean")
        if stereo not in STEREO_MODES:
            raise ValueError(f"stereo must be one of {', '.join(STEREO_MODES)}, not {stereo!r}")

    def load_file(self, path: str | Path, stereo: str = "mean", **_: Any) -> np.ndarray:
        if stereo == "concat":
            from mlx_clap.preprocess.msclap_frontend import load_channels

            return load_channels(path, self.sampling_rate)
        from mlx_clap.preprocess.audio import load_audio

        return load_audio(path, self.sampling_rate).samples

    def prepare_waveform(self, wave: Any, index: int, stereo: str = "mean", **_: Any) -> np.ndarray:
        try:
            return to_mono(wave, stereo)
        except ValueError as exc:
            raise ValueError(f"audio item {index}: {exc}") from exc

    def _fill(self, clip: np.ndarray) -> np.ndarray:
        return clip if clip.shape[0] == self.clip_samples else repeat_to_length(clip, self.clip_samples)

    def window_inputs(self, clips: list[np.ndarray]) -> list[mx.array | None]:
        return [mx.array(np.stack([self._fill(c) for c in clips]).astype(np.float32))]

    def random_source(self, seed: int | None) -> Any:
        """`random.Random(seed)`, or Python's global `random` module as msclap draws."""
        return random.Random(seed) if seed is not None else random

    # "reference" is one window of a long clip: a file's decoding can stop there.
    reference_crops = True

    def reference_start(self, n: int, rng: Any) -> int:
        """Start of msclap's crop of a clip of `n` > clip_samples samples: `rng.randrange(n - length)`."""
        return int(rng.randrange(n - self.clip_samples))

    def whole_inputs(
        self, waves: list[np.ndarray], mode: str, rng: Any
    ) -> tuple[list[mx.array | None], np.ndarray]:
        """ "reference": msclap's `random.randrange(N - length)` crop of each long clip."""
        n = self.clip_samples
        clips = []
        for wave in waves:
            if wave.shape[0] <= n:
                clips.append(self._fill(wave))
            else:
                start = self.reference_start(wave.shape[0], rng)
                clips.append(wave[start : start + n])
        return [mx.array(np.stack(clips).astype(np.float32))], np.arange(len(waves), dtype=np.int64)

    def audio_features(self, waveforms: mx.array) -> mx.array:
        return self.model.get_audio_features(waveforms)

    def text_inputs(self, texts: list[str], **_: Any) -> list[mx.array | None]:
        enc = self.tokenizer(texts)
        types = mx.array(enc["token_type_ids"]) if "token_type_ids" in enc else None
        return [mx.array(enc["input_ids"]), mx.array(enc["attention_mask"]), types]

    def text_features(
        self,
        input_ids: mx.array,
        attention_mask: mx.array | None = None,
        token_type_ids: mx.array | None = None,
    ) -> mx.array:
        return self.model.get_text_features(input_ids, attention_mask, token_type_ids)


__all__ = ["DEFAULT_TEMPLATE", "MsClapFamily"]
