"""MsClapModel: Microsoft CLAP 2022 (Cnn14 + BERT) and 2023 (HTSAT-tiny + GPT-2) in MLX.

Attribute names equal msclap's `models.clap.CLAP` state-dict keys (`audio_encoder.base.*`,
`audio_encoder.projection.*`, `caption_encoder.base.*`, `caption_encoder.projection.*`, `logit_scale`),
with three layout exceptions handled by `mlx_clap/convert/msclap.py`:
- HTSAT lives at `audio_encoder.base.htsat` with the HF names of `mlx_clap.models.htsat.ClapAudioEncoder`
  (msclap uses LAION's names there);
- the filterbank is `audio_encoder.base.logmel_extractor.melW` for both versions (msclap 2023 has it at
  `audio_encoder.base.htsat.logmel_extractor.melW`); the STFT kernels are replaced by an rfft;
- unused heads (`fc_audioset`, `tscam_conv`, `head`, BERT's pooler) are dropped.

Outputs. The towers (`get_audio_embeddings`, `get_text_embeddings`) return msclap's **un-normalized**
1024-d projections, as `CLAPWrapper.get_*_embeddings` does. `get_*_features` (and the pipeline's
`embed_audio` / `embed_text` built on them, `mlx_clap.pipeline.msclap`) return **L2-normalized** vectors,
like the LAION models, and `logits` normalizes its inputs and scales by the single `exp(logit_scale)`, as
`compute_similarity`. Files, windows, tokens and prompts are the pipeline's; this module is the model.
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
from mlx_clap.models.layers import l2_normalize
from mlx_clap.models.msclap.cnn14 import Cnn14
from mlx_clap.models.msclap.config import MsClapConfig
from mlx_clap.models.msclap.logmel import log_mel


class Projection(nn.Module):
    """msclap `Projection`: e1 = W1 x; LayerNorm(e1 + W2 gelu(e1)); bias-free linears, exact GELU."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear1 = nn.Linear(d_in, d_out, bias=False)
        self.linear2 = nn.Linear(d_out, d_out, bias=False)
        self.layer_norm = nn.LayerNorm(d_out, eps=1e-5)

    def __call__(self, x: mx.array) -> mx.array:
        e1 = self.linear1(x)
        e2 = self.linear2(nn.gelu(e1))
        return self.layer_norm(e1 + e2)


class LogmelExtractor(nn.Module):
    """Holds the (513, n_mels) filterbank `melW` (a checkpoint constant, kept as a parameter)."""

    def __init__(self, n_fft: int, n_mels: int):
        super().__init__()
        self.melW = mx.zeros((n_fft // 2 + 1, n_mels), dtype=mx.float32)


class HTSATWrapper(nn.Module):
    """msclap `HTSATWrapper`: log-mel -> HTSAT-tiny -> mean of the final tokens (768-d `latent_output`)."""

    def __init__(self, config: MsClapConfig):
        super().__init__()
        from mlx_clap.models.htsat import ClapAudioEncoder

        self.logmel_extractor = LogmelExtractor(config.window_size, config.mel_bins)
        self.htsat = ClapAudioEncoder(config.htsat)

    def __call__(self, mel: mx.array, capture: dict | None = None) -> mx.array:
        """`mel` (B, T, 64) -> (B, 768). 965 frames are bicubic-upsampled to 1024 inside the encoder."""
        if capture is None:
            return self.htsat(mel[:, None])
        out = self.htsat(mel[:, None], output_hidden_states=True)
        for i, h in enumerate(out.hidden_states):
            capture["patch_embed" if i == 0 else f"layers.{i - 1}"] = h
        capture["norm"] = out.last_hidden_state
        return out.pooler_output


class Cnn14Wrapper(Cnn14):
    """Cnn14 plus its filterbank, under the msclap names (`audio_encoder.base.*`)."""

    def __init__(self, config: MsClapConfig):
        super().__init__(config.cnn14)
        self.logmel_extractor = LogmelExtractor(config.window_size, config.mel_bins)


class AudioEncoder(nn.Module):
    """msclap `AudioEncoder`: waveform -> log-mel -> Cnn14/HTSAT -> Projection (un-normalized, 1024-d)."""

    def __init__(self, config: MsClapConfig):
        super().__init__()
        self.config = config
        self.base = HTSATWrapper(config) if config.audioenc_name == "HTSAT" else Cnn14Wrapper(config)
        self.projection = Projection(config.out_emb, config.d_proj)

    def log_mel(self, waveforms: mx.array) -> mx.array:
        """(B, N) waveforms -> (B, T, 64) log-mel with the model's filterbank (float32)."""
        return log_mel(
            waveforms,
            self.base.logmel_extractor.melW,
            hop=self.config.hop_size,
            n_fft=self.config.window_size,
        )

    def __call__(self, waveforms: mx.array, capture: dict | None = None) -> mx.array:
        mel = self.log_mel(waveforms)
        if capture is not None:
            capture["logmel"] = mel
        pooled = self.base(mel, capture)
        if capture is not None:
            capture["embedding"] = pooled
        return self.projection(pooled)


class TextEncoder(nn.Module):
    """msclap `TextEncoder`: GPT-2 (last non-`!` token) or BERT (raw [CLS]) -> Projection (un-normalized)."""

    def __init__(self, config: MsClapConfig):
        super().__init__()
        self.config = config
        if config.is_gpt2:
            from mlx_clap.models.msclap.gpt2 import GPT2Model

            self.base = GPT2Model(config.gpt2)
        else:
            from mlx_clap.models.msclap.bert import BertModel

            self.base = BertModel(config.bert)
        self.projection = Projection(config.transformer_embed_dim, config.d_proj)

    def __call__(
        self,
        input_ids: mx.array,
        attention_mask: mx.array | None = None,
        token_type_ids: mx.array | None = None,
        capture: dict | None = None,
    ) -> mx.array:
        if self.config.is_gpt2:
            from mlx_clap.models.msclap.gpt2 import last_token_index

            hidden = self.base(input_ids, attention_mask, capture)
            idx = last_token_index(input_ids)
            # An all-pad row gives -1, which torch's indexing reads as the last position.
            idx = mx.where(idx < 0, idx + input_ids.shape[1], idx)
            pooled = mx.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]
        else:
            hidden = self.base(input_ids, attention_mask, token_type_ids, capture)
            pooled = hidden[:, 0]  # raw [CLS] state, no pooler
        if capture is not None:
            capture["last_hidden_state"] = hidden
            capture["pooled"] = pooled
        return self.projection(pooled)


class MsClapModel(nn.Module):
    """A msclap model with the same public API as `mlx_clap.models.clap.ClapModel`."""

    def __init__(self, config: MsClapConfig):
        super().__init__()
        self.config = config
        self.audio_encoder = AudioEncoder(config)
        self.caption_encoder = TextEncoder(config)
        self.logit_scale = mx.array(np.log(1 / 0.07), dtype=mx.float32)
        self.eval()

    # ------------------------------------------------------------------------------------ tensors in
    def get_audio_embeddings(self, waveforms: mx.array) -> mx.array:
        """(B, clip_samples) 44.1 kHz waveforms -> un-normalized (B, 1024), as msclap's audio encoder."""
        waveforms = mx.array(waveforms)
        if waveforms.ndim != 2 or waveforms.shape[1] != self.config.clip_samples:
            raise ValueError(
                f"waveforms must be (batch, {self.config.clip_samples}) ({self.config.duration} s at "
                f"{self.config.sampling_rate} Hz), got {tuple(waveforms.shape)}; "
                "use embed_audio for any length"
            )
        return self.audio_encoder(waveforms)

    def get_text_embeddings(
        self,
        input_ids: mx.array,
        attention_mask: mx.array | None = None,
        token_type_ids: mx.array | None = None,
    ) -> mx.array:
        """Token ids (B, L) -> un-normalized (B, 1024), as msclap's caption encoder."""
        return self.caption_encoder(mx.array(input_ids), attention_mask, token_type_ids)

    def get_audio_features(self, waveforms: mx.array) -> mx.array:
        """Unit (B, 1024) audio embeddings for (B, clip_samples) waveforms."""
        return l2_normalize(self.get_audio_embeddings(waveforms))

    def get_text_features(
        self,
        input_ids: mx.array,
        attention_mask: mx.array | None = None,
        token_type_ids: mx.array | None = None,
    ) -> mx.array:
        """Unit (B, 1024) text embeddings for token ids."""
        return l2_normalize(self.get_text_embeddings(input_ids, attention_mask, token_type_ids))

    def logits(self, audio_embeds: mx.array, text_embeds: mx.array) -> tuple[mx.array, mx.array]:
        """(logits_per_audio, logits_per_text): cosine similarity times exp(logit_scale).

        Inputs are normalized here (a no-op for unit vectors), as msclap's `compute_similarity`.
        """
        a = l2_normalize(mx.array(audio_embeds))
        t = l2_normalize(mx.array(text_embeds))
        scale = mx.exp(self.logit_scale.astype(mx.float32))
        logits_per_audio = (a @ t.T) * scale
        return logits_per_audio, logits_per_audio.T

    @property
    def embedding_dim(self) -> int:
        return self.config.d_proj

    # ---------------------------------------------------------------------------------------- loading
    @staticmethod
    def from_pretrained(path: str | Path, dtype: Any = None) -> MsClapModel:
        """Load a converted msclap folder (config.json + model.safetensors) with strict key/shape checks."""
        folder = Path(path)
        config = read_msclap_config(folder)
        if not (folder / fmt.WEIGHTS_NAME).is_file():
            raise fmt.WeightsError(f"{folder}: no {fmt.WEIGHTS_NAME}")
        model = MsClapModel(config)
        weights = fmt.read_safetensors(folder / fmt.WEIGHTS_NAME)
        fmt.check_float_weights(weights, folder / fmt.WEIGHTS_NAME)  # converters write float32 only
        expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
        fmt.check_weights(expected, weights, folder / fmt.WEIGHTS_NAME)
        model.load_weights(list(weights.items()), strict=True)
        target = fmt.parse_dtype(dtype)
        if target != mx.float32:
            # The frontend stays float32: melW is only ever used in the fp32 log-mel.
            mel_w = model.audio_encoder.base.logmel_extractor.melW
            model.set_dtype(target)
            model.audio_encoder.base.logmel_extractor.melW = mel_w
        model.eval()
        return model


def is_msclap_folder(folder: str | Path) -> bool:
    """True when `folder/config.json` is a converted msclap config (`"family": "msclap"`); never raises."""
    try:
        data = json.loads((Path(folder) / fmt.CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("family") == "msclap"


def read_msclap_config(folder: Path) -> MsClapConfig:
    """The `MsClapConfig` of a converted msclap folder, with family and format checks."""
    path = Path(folder) / fmt.CONFIG_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise fmt.WeightsError(f"{path}: cannot read ({exc})") from exc
    if not isinstance(data, dict) or data.get("family") != "msclap":
        raise fmt.WeightsError(f"{path}: not a msclap config (family must be 'msclap')")
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise fmt.WeightsError(f"{path}: format_version {version!r} is not one mlx-clap reads")
    try:
        return MsClapConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise fmt.WeightsError(f"{path}: {exc}") from exc


def save_msclap_folder(model: MsClapModel, folder: Path) -> None:
    """Write config.json and model.safetensors (float32) for an MLX MsClapModel."""
    from safetensors.numpy import save

    from mlx_clap.io.files import atomic_write_bytes, atomic_write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    flat = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}
    atomic_write_bytes(folder / fmt.WEIGHTS_NAME, save(flat, metadata={"format": "mlx"}))
    atomic_write_json(folder / fmt.CONFIG_NAME, model.config.to_dict())
