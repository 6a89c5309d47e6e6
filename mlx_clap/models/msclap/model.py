"""MsClapModel: Microsoft CLAP 2022 (Cnn14 + BERT) and 2023 (HTSAT-tiny + GPT-2) in MLX.

Attribute names equal msclap's `models.clap.CLAP` state-dict keys (`audio_encoder.base.*`,
`audio_encoder.projection.*`, `caption_encoder.base.*`, `caption_encoder.projection.*`, `logit_scale`),
with three layout exceptions handled by `convert/msclap.py`:
- HTSAT lives at `audio_encoder.base.htsat` with the HF names of `mlx_clap.models.htsat.ClapAudioEncoder`
  (msclap uses LAION's names there);
- the filterbank is `audio_encoder.base.logmel_extractor.melW` for both versions (msclap 2023 has it at
  `audio_encoder.base.htsat.logmel_extractor.melW`); the STFT kernels are replaced by an rfft;
- unused heads (`fc_audioset`, `tscam_conv`, `head`, BERT's pooler) are dropped.

Outputs. The towers (`get_audio_embeddings`, `get_text_embeddings`) return msclap's **un-normalized**
1024-d projections, as `CLAPWrapper.get_*_embeddings` does. The public helpers (`embed_audio`,
`embed_text`, `get_*_features`) return **L2-normalized** vectors, like the LAION models, and
`logits` normalizes its inputs and scales by the single `exp(logit_scale)`, as `compute_similarity`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_clap.ops import parallel as cpu_parallel
from mlx_clap.models.clap import (
    CPU_CLIPS_PER_BLOCK,
    CPU_TEXTS_PER_BLOCK,
    as_text_list,
    l2_normalize,
    pool_windows,
    zero_shot_probabilities,
)
from mlx_clap.models.msclap.cnn14 import Cnn14
from mlx_clap.models.msclap.config import MsClapConfig
from mlx_clap.preprocess.msclap_frontend import fit_clip, log_mel, prepare_batch, to_mono
from mlx_clap.preprocess.msclap_tokenizer import MsClapTokenizer

# msclap's README and examples prompt with "this is the sound of <class>".
DEFAULT_TEMPLATE = "this is the sound of {}"


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
        self._tokenizer: MsClapTokenizer | None = None
        self.source_dir: Path | None = None
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

    def embed_audio_inputs(self, waveforms: mx.array) -> mx.array:
        """Unit embeddings of (B, clip_samples) clips: `get_audio_features`, evaluated, on all CPU cores.

        As `mlx_clap.models.clap.ClapModel.embed_audio_inputs` (`cpu_parallel.eval_batched`); it evaluates as it
        goes, so it cannot run under `mx.compile`.
        """
        return cpu_parallel.eval_batched(
            self.get_audio_features, [waveforms], CPU_CLIPS_PER_BLOCK, ready=[self.audio_encoder]
        )

    def embed_text_inputs(
        self,
        input_ids: mx.array,
        attention_mask: mx.array | None = None,
        token_type_ids: mx.array | None = None,
    ) -> mx.array:
        """Unit embeddings of token ids: `get_text_features`, evaluated, big batches on all CPU cores."""
        return cpu_parallel.eval_batched(
            self.get_text_features,
            [input_ids, attention_mask, token_type_ids],
            CPU_TEXTS_PER_BLOCK,
            ready=[self.caption_encoder],
        )

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

    # ------------------------------------------------------------------------------ files and strings in
    @property
    def tokenizer(self) -> MsClapTokenizer:
        if self._tokenizer is None:
            raise RuntimeError(
                "this msclap model has no tokenizer: its folder lacks tokenizer.json; convert it again "
                "with the text model's tokenizer files (convert/msclap.py --tokenizer DIR)"
            )
        return self._tokenizer

    @property
    def embedding_dim(self) -> int:
        return self.config.d_proj

    def embed_audio(
        self,
        inputs: Sequence[str | Path | np.ndarray] | str | Path | np.ndarray,
        *,
        batch_size: int = 8,
        long_audio: str = "windows-mean",
        seed: int | None = None,
        stereo: str = "mean",
        quantize_int16: bool = False,
    ) -> np.ndarray:
        """Unit audio embeddings (N, 1024) for files or arrays at 44.1 kHz ((N,) or (channels, N)).

        Clips shorter than the model's 5/7 s are tiled as msclap does. Longer clips: `long_audio` is
        "windows-mean" (default, deterministic: consecutive clip-length windows, mean of the unit
        embeddings, renormalized), "head", "center", or "reference" (msclap's random crop, seedable with
        `seed`). `stereo="concat"` reproduces msclap's channel concatenation (a reference mode; the
        default averages channels). Files are decoded and resampled to 44.1 kHz by `mlx_clap.preprocess.audio`.
        `quantize_int16` exists for API symmetry with the LAION models; msclap never applies it.
        """
        if isinstance(inputs, (str, Path, np.ndarray)):
            inputs = [inputs]
        waves = []
        for item in inputs:
            if isinstance(item, (str, Path)):
                waves.append(self._load_file(item, stereo))
            else:
                waves.append(np.asarray(item))
        return self.embed_waveforms(
            waves,
            batch_size=batch_size,
            long_audio=long_audio,
            seed=seed,
            stereo=stereo,
            quantize_int16=quantize_int16,
        )

    def _load_file(self, path: str | Path, stereo: str) -> np.ndarray:
        from mlx_clap.preprocess.audio import load_audio

        if stereo == "concat":
            return _load_channels(path, self.config.sampling_rate)
        return load_audio(path, self.config.sampling_rate).samples

    def embed_waveforms(
        self,
        waveforms: Sequence[np.ndarray],
        *,
        batch_size: int = 8,
        long_audio: str = "windows-mean",
        seed: int | None = None,
        stereo: str = "mean",
        quantize_int16: bool = False,
    ) -> np.ndarray:
        """Unit embeddings (N, 1024) for decoded 44.1 kHz waveforms; see `embed_audio`."""
        if quantize_int16:
            raise ValueError("quantize_int16 is a LAION reference mode; msclap feeds float audio unchanged")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        clips, owner = prepare_batch(
            list(waveforms), self.config.clip_samples, long_audio=long_audio, stereo=stereo, seed=seed
        )
        out = np.zeros((len(waveforms), self.embedding_dim), dtype=np.float32)
        if not len(waveforms):
            return out
        rows = []
        for r in range(0, clips.shape[0], batch_size):
            emb = self.embed_audio_inputs(mx.array(clips[r : r + batch_size]))
            rows.append(np.array(emb.astype(mx.float32)))
        return pool_windows(np.concatenate(rows, axis=0), owner, len(waveforms))

    def embed_windows(
        self, blocks: Iterable[np.ndarray], *, batch_size: int = 8, quantize_int16: bool = False
    ) -> np.ndarray:
        """Unit "windows-mean" embedding (1024,) of one mono clip given as consecutive 1-D blocks at 44.1 kHz.

        The same windows as `embed_audio(long_audio="windows-mean")` (`mlx_clap.models.clap.sliding_windows`),
        embedded `batch_size` at a time, so memory stays bounded for any length (used by the CLI).
        """
        from mlx_clap.models.clap import sliding_windows

        if quantize_int16:
            raise ValueError("quantize_int16 is a LAION reference mode; msclap feeds float audio unchanged")
        length = self.config.clip_samples
        total = np.zeros(self.embedding_dim, dtype=np.float64)
        group: list[np.ndarray] = []
        seen = False

        def flush() -> None:
            nonlocal total
            clips = np.stack([fit_clip(to_mono(w), length)[0] for w in group])
            emb = self.embed_audio_inputs(mx.array(clips))
            for row in np.array(emb.astype(mx.float32)).astype(np.float64):
                total += row  # row by row, as pool_windows sums
            group.clear()

        for window in sliding_windows(blocks, length):
            seen = True
            group.append(window)
            if len(group) == batch_size:
                flush()
        if group:
            flush()
        if not seen:
            raise ValueError("audio is empty (0 samples)")
        return (total / max(np.linalg.norm(total), 1e-12)).astype(np.float32)

    def embed_text(self, texts: Sequence[str] | str, *, batch_size: int = 64) -> np.ndarray:
        """Unit text embeddings (N, 1024), tokenized as msclap does (see `msclap.tokenizer`)."""
        texts = as_text_list(texts)
        out = np.zeros((len(texts), self.embedding_dim), dtype=np.float32)
        tok = self.tokenizer
        for start in range(0, len(texts), batch_size):
            enc = tok(texts[start : start + batch_size])
            emb = self.embed_text_inputs(
                mx.array(enc["input_ids"]),
                mx.array(enc["attention_mask"]),
                mx.array(enc["token_type_ids"]) if "token_type_ids" in enc else None,
            )
            out[start : start + len(enc["input_ids"])] = np.array(emb.astype(mx.float32))
        return out

    def classify(
        self,
        audio: Sequence[str | Path | np.ndarray] | np.ndarray | str | Path,
        labels: Sequence[str],
        template: str | None = DEFAULT_TEMPLATE,
        **embed_kwargs: Any,
    ) -> np.ndarray:
        """Zero-shot probabilities (N, len(labels)): softmax over labels of `logits_per_audio`.

        `audio` is anything `embed_audio` takes, or an (N, 1024) array of audio embeddings.
        """
        return zero_shot_probabilities(self, audio, labels, template, **embed_kwargs)

    # ---------------------------------------------------------------------------------------- loading
    @staticmethod
    def from_pretrained(path: str | Path, dtype: Any = None) -> MsClapModel:
        """Load a converted msclap folder (config.json + model.safetensors [+ tokenizer.json])."""
        return load_msclap_folder(Path(path), dtype=dtype)


def _load_channels(path: str | Path, sr: int) -> np.ndarray:
    """(C, N) float32 at `sr` for the channel-concatenation reference mode (soundfile + soxr)."""
    import soundfile as sf
    import soxr

    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises several types; report the file and the cause
        raise ValueError(f"{path}: cannot decode ({exc})") from exc
    if rate != sr:
        data = soxr.resample(data, rate, sr, quality="HQ").astype(np.float32)
    return np.ascontiguousarray(data.T)


def load_msclap_folder(folder: Path, dtype: Any = None) -> MsClapModel:
    """Load a converted msclap folder with strict key and shape checks."""
    import json

    from mlx.utils import tree_flatten

    from mlx_clap.config import FORMAT_VERSION
    from mlx_clap.io.folder import (
        CONFIG_NAME,
        WEIGHTS_NAME,
        WeightsError,
        _read_safetensors,
        check_weights,
        parse_dtype,
    )

    folder = Path(folder)
    try:
        data = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{folder / CONFIG_NAME}: cannot read ({exc})") from exc
    if not isinstance(data, dict) or data.get("family") != "msclap":
        raise WeightsError(f"{folder / CONFIG_NAME}: not a msclap config (family must be 'msclap')")
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise WeightsError(f"{folder / CONFIG_NAME}: format_version {version!r} is not one mlx-clap reads")
    if not (folder / WEIGHTS_NAME).is_file():
        raise WeightsError(f"{folder}: no {WEIGHTS_NAME}")
    try:
        config = MsClapConfig.from_dict(data)
    except ValueError as exc:
        raise WeightsError(f"{folder / CONFIG_NAME}: {exc}") from exc
    model = MsClapModel(config)
    weights = _read_safetensors(folder / WEIGHTS_NAME)
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    check_weights(expected, weights, folder / WEIGHTS_NAME)
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    target = parse_dtype(dtype)
    if target != mx.float32:
        # The frontend stays float32: melW is only ever used in the fp32 log-mel.
        mel_w = model.audio_encoder.base.logmel_extractor.melW
        model.set_dtype(target)
        model.audio_encoder.base.logmel_extractor.melW = mel_w
    model.eval()
    model.source_dir = folder
    try:
        max_pos = config.gpt2.n_positions if config.is_gpt2 else config.bert.max_position_embeddings
        model._tokenizer = MsClapTokenizer.from_folder(folder, config.text_model, config.text_len, max_pos)
    except FileNotFoundError:
        model._tokenizer = None
    except Exception as exc:  # tokenizers raises its own types for a corrupt or foreign file
        raise WeightsError(
            f"{folder / 'tokenizer.json'}: cannot use it as the {config.text_model} tokenizer ({exc})"
        ) from exc
    return model


def save_msclap_folder(model: MsClapModel, folder: Path) -> None:
    """Write config.json and model.safetensors (float32) for an MLX MsClapModel."""
    from mlx.utils import tree_flatten
    from safetensors.numpy import save

    from mlx_clap.io.files import atomic_write_bytes, atomic_write_json
    from mlx_clap.io.folder import CONFIG_NAME, WEIGHTS_NAME

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    flat = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}
    atomic_write_bytes(folder / WEIGHTS_NAME, save(flat, metadata={"format": "mlx"}))
    atomic_write_json(folder / CONFIG_NAME, model.config.to_dict())
