"""ClapModel: the LAION/HF CLAP towers, their projections and the logit scales.

Attribute names equal the Hugging Face `ClapModel` state-dict keys (`audio_model.audio_encoder.*`,
`text_model.*`, `audio_projection.linear1`, `logit_scale_a`, ...), so a checkpoint loads with no mapping
table: `sanitize()` owns the few layout fixes (as ml-explore/mlx-examples `clip/model.py` does), and a
Hugging Face folder loads straight from its own safetensors. This module is the model only: files,
strings, windows and batching are the pipeline's (`mlx_clap.pipeline`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_clap.config import ClapConfig, config_from_hf
from mlx_clap.io import folder as fmt
from mlx_clap.models.htsat import ClapAudioModel
from mlx_clap.models.layers import l2_normalize
from mlx_clap.models.roberta import ClapTextModel

# Buffers that HF/LAION state dicts carry but the MLX model derives or never uses (docs/numerics.md §6.2,
# §6.4).
DROPPED_SUFFIXES = (
    "num_batches_tracked",
    "relative_position_index",
    "position_ids",
    "token_type_ids",
    "attn_mask",
)
# Parameters that stay float32 when a model is loaded in half precision: bn0 normalizes raw log-mels
# (values near -100 dB, where float16 steps are 0.06) and the logit scales are exponentiated.
KEEP_FLOAT32 = ("audio_model.audio_encoder.batch_norm.", "logit_scale_a", "logit_scale_t")


class ClapProjectionLayer(nn.Module):
    """Linear -> ReLU -> Linear, with biases (LAION `*_projection`, HF `ClapProjectionLayer`)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear1 = nn.Linear(in_dim, out_dim)
        self.linear2 = nn.Linear(out_dim, out_dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear2(nn.relu(self.linear1(x)))


class ClapModel(nn.Module):
    def __init__(self, config: ClapConfig):
        super().__init__()
        self.config = config
        self.audio_model = ClapAudioModel(config.audio_config)
        self.text_model = ClapTextModel(config.text_config)
        self.audio_projection = ClapProjectionLayer(config.audio_config.hidden_size, config.projection_dim)
        self.text_projection = ClapProjectionLayer(config.text_config.hidden_size, config.projection_dim)
        init = math.log(config.logit_scale_init_value)
        self.logit_scale_a = mx.array(init, dtype=mx.float32)
        self.logit_scale_t = mx.array(init, dtype=mx.float32)
        self.eval()

    def get_audio_features(self, input_features: mx.array, is_longer: mx.array | None = None) -> mx.array:
        """HF layout (B, C, 1001, 64) log-mels (+ (B, 1) is_longer for fused models) -> unit (B, D)."""
        pooled = self.audio_model(input_features, is_longer)
        return l2_normalize(self.audio_projection(pooled))

    def get_text_features(self, input_ids: mx.array, attention_mask: mx.array | None = None) -> mx.array:
        """Token ids (B, L) and mask (B, L) -> unit (B, D), from RoBERTa's pooler output."""
        pooled = self.text_model(input_ids, attention_mask)
        return l2_normalize(self.text_projection(pooled))

    def logits(self, audio_embeds: mx.array, text_embeds: mx.array) -> tuple[mx.array, mx.array]:
        """(logits_per_audio, logits_per_text) with the learned scales, as HF ClapModel.forward."""
        a = audio_embeds.astype(mx.float32)
        t = text_embeds.astype(mx.float32)
        logits_per_text = (t @ a.T) * mx.exp(self.logit_scale_t.astype(mx.float32))
        logits_per_audio = (a @ t.T) * mx.exp(self.logit_scale_a.astype(mx.float32))
        return logits_per_audio, logits_per_text

    @property
    def embedding_dim(self) -> int:
        return self.config.projection_dim

    # ---------------------------------------------------------------------------------------- loading
    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """An HF/LAION-named state dict (torch layouts) -> this model's parameters.

        Derived buffers are dropped, convolutions go from OIHW to OHWI, the (1,)-shaped logit scales of
        HF become scalars. Integer tensors other than the dropped buffers are an error (a wrong file).
        """
        out = {}
        for key, value in weights.items():
            if key.endswith(DROPPED_SUFFIXES):
                continue
            if not mx.issubdtype(value.dtype, mx.floating):
                raise fmt.WeightsError(
                    f"tensor {key} has dtype {value.dtype}; only float weights are expected"
                )
            if value.ndim == 4:
                value = value.transpose(0, 2, 3, 1)
            elif key.startswith("logit_scale") and value.size == 1:
                value = value.reshape(())  # HF stores (1,), LAION a 0-d tensor
            out[key] = value
        return out

    @staticmethod
    def parameter_shapes(config: ClapConfig) -> dict[str, tuple]:
        """Parameter name -> shape for `config` (the arrays are lazy: nothing is computed)."""
        return {k: tuple(v.shape) for k, v in tree_flatten(ClapModel(config).parameters())}

    @staticmethod
    def from_pretrained(path: str | Path, dtype: Any = None) -> ClapModel:
        """Load a converted mlx-clap folder or a Hugging Face CLAP folder with safetensors weights.

        Strict: every missing, unexpected or misshapen tensor is named. `dtype` float16/bfloat16 casts the
        weights except `KEEP_FLOAT32`; the numerically sensitive steps (mel side, LayerNorm, softmax)
        stay float32 anyway.
        """
        folder = Path(path)
        target = fmt.parse_dtype(dtype)
        if fmt.is_converted_folder(folder):
            config = fmt.read_config(folder)
            files = [folder / fmt.WEIGHTS_NAME]
            weights = fmt.read_safetensors(files[0])
            fmt.check_float_weights(weights, files[0])  # converters write float32 only
        else:
            config = read_hf_config(folder)
            files = fmt.hf_safetensors_files(folder)
            weights = {}
            for f in files:
                weights.update(fmt.read_safetensors(f))
            try:
                weights = ClapModel.sanitize(weights)
            except fmt.WeightsError as exc:
                raise fmt.WeightsError(f"{files[0]}: {exc}") from exc
        model = ClapModel(config)
        fmt.check_weights(ClapModel.parameter_shapes(config), weights, files[0])
        arrays = []
        for key, arr in weights.items():
            if (
                target != mx.float32
                and mx.issubdtype(arr.dtype, mx.floating)
                and not key.startswith(KEEP_FLOAT32)
            ):
                arr = arr.astype(target)
            elif arr.dtype != mx.float32 and (target == mx.float32 or key.startswith(KEEP_FLOAT32)):
                arr = arr.astype(mx.float32)  # bf16/f16 hub files load as float32 unless asked otherwise
            arrays.append((key, arr))
        model.load_weights(arrays, strict=True)
        model.eval()
        return model


def read_hf_config(folder: Path) -> ClapConfig:
    """The resolved `ClapConfig` of a Hugging Face CLAP folder (config.json + preprocessor_config.json)."""
    cfg_path = folder / fmt.CONFIG_NAME
    data = fmt.read_json(cfg_path)
    if data is None:
        raise fmt.WeightsError(f"{folder}: no {fmt.CONFIG_NAME} (not a Hugging Face model folder)")
    pre = fmt.read_json(folder / "preprocessor_config.json")
    try:
        return config_from_hf(data, pre, str(folder))
    except (TypeError, ValueError) as exc:
        raise fmt.WeightsError(f"{cfg_path}: {exc}") from exc


__all__ = ["ClapModel", "ClapProjectionLayer", "DROPPED_SUFFIXES", "KEEP_FLOAT32", "read_hf_config"]
