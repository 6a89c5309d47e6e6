"""PeAudioModel: Perception Encoder Audio (transformers `PeAudioModel` / `PeAudioFrameLevelModel`) in MLX.

Attribute names equal the checkpoint keys (`audio_encoder.*`, `text_model.*`, `audio_head.*`,
`text_audio_head.*`, `text_audio_logit_scale`, `text_audio_logit_bias`), so a Hugging Face folder loads
straight from its own safetensors through `sanitize` (convolutions to (out, K, in), Snake's alpha to
(channels,), the (1,)-shaped scale and bias to scalars, weight-normalized convolutions folded).

Outputs. The heads (LayerNorm eps 1e-6 -> Linear, no bias) map the audio tower's class token (pooled) or
each frame (frame level) and the text tower's [CLS] state into the joint space (the text width, 1024).
`get_*_embeds` return these raw, as transformers does; `get_*_features` return unit vectors.
transformers scores raw embeddings, logits = (a . t) * scale + bias with the learned scale and bias (no
exp); `logits` applies exactly that to whatever it is given, so on unit vectors it is the sigmoid-loss
logit scale * cosine + bias that `scores` turns into probabilities. Files, windows and tokens are the
pipeline's (`mlx_clap.pipeline.pe_audio`); this module is the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_clap.config import FORMAT_VERSION
from mlx_clap.io import folder as fmt
from mlx_clap.models.layers import l2_normalize, layer_norm
from mlx_clap.models.pe_audio.config import (
    FAMILY,
    OTHER_PE_TYPES,
    PeAudioConfig,
    UnsupportedCheckpoint,
    config_from_hf,
)
from mlx_clap.models.pe_audio.dac import arrange_convs
from mlx_clap.models.pe_audio.encoder import PeAudioEncoder, PeAudioEncoderOutput
from mlx_clap.models.pe_audio.modernbert import ModernBertModel

# Stay float32 in half precision: the codec (Snake's sin of alpha * x loses all accuracy in 8-11 bit
# mantissas once |alpha * x| passes a few units; it is 5% of the parameters) and the sigmoid scale/bias.
KEEP_FLOAT32 = ("audio_encoder.embedder.", "text_audio_logit_scale", "text_audio_logit_bias")
# Convolutions of the audio tower (torch (out, in, K) -> MLX (out, K, in)).
_CONV_SUFFIXES = (".conv1.weight", ".conv2.weight", ".bottleneck.weight", ".project.weight")


class PeAudioContrastiveHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.layer_norm = nn.LayerNorm(in_dim, eps=1e-6)
        self.proj = nn.Linear(in_dim, out_dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.proj(layer_norm(self.layer_norm, x))


class PeAudioModel(nn.Module):
    """Both PE-A checkpoints (pooled and frame level: the same weights, `config.architecture` says which)."""

    def __init__(self, config: PeAudioConfig):
        super().__init__()
        self.config = config
        self.text_model = ModernBertModel(config.text_config)
        self.audio_encoder = PeAudioEncoder(config.audio_config)
        width = config.text_config.hidden_size
        self.text_audio_head = PeAudioContrastiveHead(width, width)
        self.audio_head = PeAudioContrastiveHead(config.audio_config.hidden_size, width)
        self.text_audio_logit_scale = mx.array(0.0, dtype=mx.float32)
        self.text_audio_logit_bias = mx.array(0.0, dtype=mx.float32)
        self.eval()

    # ------------------------------------------------------------------------------------ tensors in
    def _checked_audio(self, input_values: Any, lengths: Any) -> tuple[mx.array, mx.array | None]:
        x = mx.array(input_values)
        hop = self.config.hop_length
        if x.ndim != 2 or x.shape[1] == 0 or x.shape[1] % hop:
            raise ValueError(
                f"input_values must be (batch, samples) with samples a positive multiple of the hop ({hop}), "
                f"got {tuple(x.shape)}; preprocess.pe_audio_features.batch_waveforms prepares any clips"
            )
        if lengths is None:
            return x.astype(mx.float32), None
        lengths = mx.array(lengths).astype(mx.int32)
        if lengths.shape != (x.shape[0],):
            raise ValueError(f"lengths must be ({x.shape[0]},), got {tuple(lengths.shape)}")
        bad = (lengths < hop) | (lengths > x.shape[1]) | (lengths % hop != 0)
        if mx.any(bad).item():
            raise ValueError(
                f"lengths must be multiples of {hop} in [{hop}, {x.shape[1]}]; got {lengths.tolist()}"
            )
        if mx.all(lengths == x.shape[1]).item():
            lengths = None  # no padding: nothing to mask
        return x.astype(mx.float32), lengths

    def encode_audio(
        self, input_values: Any, lengths: Any = None, capture: dict | None = None
    ) -> PeAudioEncoderOutput:
        """The audio tower's states for (B, N) samples; `lengths` (B,) valid samples of a padded batch."""
        x, lengths = self._checked_audio(input_values, lengths)
        return self.audio_encoder(x, lengths, capture)

    def get_audio_embeds(self, input_values: Any, lengths: Any = None) -> mx.array:
        """Raw pooled embeddings (B, D): audio_head(class token), transformers' `PeAudioModel`."""
        return self.audio_head(self.encode_audio(input_values, lengths).pooler_output)

    def get_frame_embeds(self, input_values: Any, lengths: Any = None) -> tuple[mx.array, mx.array]:
        """Raw frame embeddings (B, T, D) and valid frames per row (B,): `PeAudioFrameLevelModel`'s.

        Frame t covers samples [t * hop, (t + 1) * hop); rows past a clip's frame count are padding.
        """
        out = self.encode_audio(input_values, lengths)
        frames = out.frames
        if frames is None:
            frames = mx.full(
                (out.last_hidden_state.shape[0],), out.last_hidden_state.shape[1], dtype=mx.int32
            )
        return self.audio_head(out.last_hidden_state), frames

    def get_text_embeds(self, input_ids: Any, attention_mask: Any = None) -> mx.array:
        """Raw text embeddings (B, D): text_audio_head(final state of [CLS])."""
        return self.text_audio_head(self.text_model(input_ids, attention_mask)[:, 0])

    def get_audio_features(self, input_values: Any, lengths: Any = None) -> mx.array:
        """Unit audio vectors (B, D), one per clip.

        Pooled model: the normalized class-token embedding. Frame-level model: the normalized mean of
        its unit frame vectors (that checkpoint trains no clip vector; transformers gives only frames).
        """
        if not self.config.is_frame_level:
            return l2_normalize(self.get_audio_embeds(input_values, lengths))
        frames, counts = self.get_frame_features(input_values, lengths)
        valid = (mx.arange(frames.shape[1])[None, :] < counts[:, None]).astype(mx.float32)[..., None]
        return l2_normalize(mx.sum(frames * valid, axis=1))

    def get_frame_features(self, input_values: Any, lengths: Any = None) -> tuple[mx.array, mx.array]:
        """Unit frame vectors (B, T, D) and valid frames per row (B,)."""
        embeds, frames = self.get_frame_embeds(input_values, lengths)
        return l2_normalize(embeds), frames

    def get_text_features(self, input_ids: Any, attention_mask: Any = None) -> mx.array:
        """Unit text vectors (B, D)."""
        return l2_normalize(self.get_text_embeds(input_ids, attention_mask))

    def logits(self, audio_embeds: Any, text_embeds: Any) -> tuple[mx.array, mx.array]:
        """(logits_per_audio (Na, Nt), logits_per_text (Nt, Na)) = (a . t) * scale + bias, float32.

        transformers' `logits_audio_text` on its raw embeddings; on unit vectors, scale * cosine + bias.
        Frame embeddings (Na, T, D) give per-frame logits (Na, Nt, T) as `PeAudioFrameLevelModel`.
        """
        a = mx.array(audio_embeds).astype(mx.float32)
        t = mx.array(text_embeds).astype(mx.float32)
        scale = self.text_audio_logit_scale.astype(mx.float32)
        bias = self.text_audio_logit_bias.astype(mx.float32)
        if a.ndim == 3:
            per_audio = (a @ t.T).transpose(0, 2, 1) * scale + bias
            return per_audio, per_audio.transpose(1, 0, 2)
        per_audio = (a @ t.T) * scale + bias
        return per_audio, per_audio.T

    def scores(self, audio_embeds: Any, text_embeds: Any) -> mx.array:
        """sigmoid(logits_per_audio): the model's own match probability per (audio, text) pair."""
        return mx.sigmoid(self.logits(audio_embeds, text_embeds)[0])

    @property
    def embedding_dim(self) -> int:
        return self.config.projection_dim

    # ---------------------------------------------------------------------------------------- loading
    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """A transformers-named state dict (torch layouts) -> this model's parameters.

        Integer tensors are an error (a wrong file); weight-normalized convolutions (`weight_g`/`weight_v`
        or `parametrizations.weight.original0/1`) are folded to `weight` = g * v / ||v||.
        """
        weights = _fold_weight_norm(dict(weights))
        out = {}
        for key, value in weights.items():
            if not mx.issubdtype(value.dtype, mx.floating):
                raise fmt.WeightsError(
                    f"tensor {key} has dtype {value.dtype}; only float weights are expected"
                )
            if key.startswith("audio_encoder.") and key.endswith(_CONV_SUFFIXES) and value.ndim == 3:
                value = value.transpose(0, 2, 1)
            elif key.endswith(".alpha") and value.ndim == 3:
                value = value.reshape(-1)  # Snake: (1, C, 1) -> (C,)
            elif key in ("text_audio_logit_scale", "text_audio_logit_bias") and value.size == 1:
                value = value.reshape(())
            out[key] = value
        return out

    @staticmethod
    def parameter_shapes(config: PeAudioConfig) -> dict[str, tuple]:
        """Parameter name -> shape for `config` (the arrays are lazy: nothing is computed)."""
        return {k: tuple(v.shape) for k, v in tree_flatten(PeAudioModel(config).parameters())}

    @staticmethod
    def from_pretrained(path: str | Path, dtype: Any = None) -> PeAudioModel:
        """Load a converted mlx-clap PE-A folder or a Hugging Face `pe_audio` folder (safetensors).

        Strict: every missing, unexpected or misshapen tensor is named. float16/bfloat16 cast every weight
        but `KEEP_FLOAT32`; norms, softmax and the codec stay float32 anyway.
        """
        folder = Path(path)
        target = fmt.parse_dtype(dtype)
        config, converted = read_pe_audio_config(folder)
        if converted:
            files = [folder / fmt.WEIGHTS_NAME]
            weights = fmt.read_safetensors(files[0])
            fmt.check_float_weights(weights, files[0])  # the converter writes float32 only
        else:
            if not (folder / fmt.WEIGHTS_NAME).is_file() and (folder / "pytorch_model.bin").is_file():
                raise fmt.WeightsError(
                    f"{folder}: a PE-Audio folder with pytorch_model.bin only; convert it once with "
                    f"`python -m mlx_clap.convert.pe_audio {folder} DEST` (needs torch), then load DEST"
                )
            files = fmt.hf_safetensors_files(folder)
            weights = {}
            for f in files:
                weights.update(fmt.read_safetensors(f))
            try:
                weights = PeAudioModel.sanitize(weights)
            except fmt.WeightsError as exc:
                raise fmt.WeightsError(f"{files[0]}: {exc}") from exc
        model = PeAudioModel(config)
        fmt.check_weights(PeAudioModel.parameter_shapes(config), weights, files[0])
        arrays = []
        for key, arr in weights.items():
            keep = key.startswith(KEEP_FLOAT32)
            want = mx.float32 if keep or target == mx.float32 else target
            arrays.append((key, arr if arr.dtype == want else arr.astype(want)))
        model.load_weights(arrays, strict=True)
        model.eval()
        arrange_convs(model)  # per-tap weight layout for the convolutions' products (dac.Conv1d)
        return model


def _fold_weight_norm(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """weight = g * v / ||v|| (norm over every axis but the first, torch's weight_norm(dim=0))."""
    pairs = {
        ".weight_g": ".weight_v",
        ".parametrizations.weight.original0": ".parametrizations.weight.original1",
    }
    for g_suffix, v_suffix in pairs.items():
        for key in [k for k in weights if k.endswith(g_suffix)]:
            base = key[: -len(g_suffix)]
            v = weights.pop(base + v_suffix, None)
            if v is None:
                raise fmt.WeightsError(f"{key} has no matching {base + v_suffix}")
            g = weights.pop(key).astype(mx.float32)
            v32 = v.astype(mx.float32)
            norm = mx.sqrt(mx.sum(v32 * v32, axis=tuple(range(1, v.ndim)), keepdims=True))
            weights[base + ".weight"] = g * v32 / norm
    return weights


def _config_json(folder: Path) -> Any:
    try:
        return json.loads((Path(folder) / fmt.CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return None


def is_pe_folder(folder: str | Path) -> bool:
    """True when `folder/config.json` is a Perception Encoder config (ours or any transformers PE kind,
    so that the unsupported ones reach a refusal that says what they are); never raises."""
    data = _config_json(Path(folder))
    if not isinstance(data, dict):
        return False
    return data.get("family") == FAMILY or data.get("model_type") in ("pe_audio", *OTHER_PE_TYPES)


def read_pe_audio_config(folder: Path) -> tuple[PeAudioConfig, bool]:
    """(config, converted): a converted PE-A folder's config, or a Hugging Face `pe_audio` folder's.

    WeightsError naming the file for a missing or invalid config, UnsupportedCheckpoint (a WeightsError
    too) for the other Perception Encoder kinds.
    """
    folder = Path(folder)
    path = folder / fmt.CONFIG_NAME
    data = fmt.read_json(path)
    if data is None:
        raise fmt.WeightsError(f"{folder}: no {fmt.CONFIG_NAME}")
    if not isinstance(data, dict):
        raise fmt.WeightsError(f"{path}: expected a JSON object")
    if data.get("family") == FAMILY:
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise fmt.WeightsError(f"{path}: format_version {version!r} is not one this mlx-clap reads")
        if not (folder / fmt.WEIGHTS_NAME).is_file():
            raise fmt.WeightsError(f"{folder}: no {fmt.WEIGHTS_NAME}")
        try:
            return PeAudioConfig.from_dict(data), True
        except (TypeError, ValueError) as exc:
            raise fmt.WeightsError(f"{path}: invalid config ({exc})") from exc
    try:
        config = config_from_hf(
            data, fmt.read_json(folder / "preprocessor_config.json"), str(folder), str(path)
        )
    except UnsupportedCheckpoint as exc:
        raise UnsupportedPeCheckpoint(str(exc)) from exc
    except (TypeError, ValueError) as exc:
        raise fmt.WeightsError(f"{path}: {exc}") from exc
    return config, False


class UnsupportedPeCheckpoint(fmt.WeightsError):
    """A Perception Encoder folder of a kind mlx-clap does not run; the message says what is supported."""


def save_pe_audio_folder(model: PeAudioModel, folder: Path) -> None:
    """Write config.json and model.safetensors (float32, MLX layout) for an MLX PeAudioModel (tests)."""
    from safetensors.numpy import save

    from mlx_clap.io.files import atomic_write_bytes, atomic_write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    flat = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}
    atomic_write_bytes(folder / fmt.WEIGHTS_NAME, save(flat, metadata={"format": "mlx"}))
    atomic_write_json(folder / fmt.CONFIG_NAME, model.config.to_dict())


__all__ = [
    "KEEP_FLOAT32",
    "PeAudioContrastiveHead",
    "PeAudioModel",
    "UnsupportedPeCheckpoint",
    "is_pe_folder",
    "read_pe_audio_config",
    "save_pe_audio_folder",
]
