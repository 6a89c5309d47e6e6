"""ClapModel: the two towers, their projections and the logit scales, plus the embedding helpers.

Attribute names equal the Hugging Face `ClapModel` state-dict keys (`audio_model.audio_encoder.*`,
`text_model.*`, `audio_projection.linear1`, `logit_scale_a`, ...), so a converted checkpoint loads with
no mapping table and stage-by-stage comparisons match by name.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_clap.ops import parallel as cpu_parallel
from mlx_clap.config import ClapConfig

if TYPE_CHECKING:
    from mlx_clap.preprocess.tokenizer import ClapTokenizer

DEFAULT_TEMPLATE = "This is a sound of {}."
# Clips per parallel block of `ClapModel.embed_audio_inputs` on the CPU. Batch 8 of HTSAT-tiny on 2 cores
# (one call: 962 ms): blocks of 1 clip 774 ms, of 2 clips 748 ms, of 4 clips 807 ms.
CPU_CLIPS_PER_BLOCK = 2
# Sentences per parallel block of `embed_text_inputs`. RoBERTa at batch 64 (32 tokens) on 2 cores: one call
# 2005 ms, blocks of 16 1730 ms, of 32 1653 ms; up to batch 32 one call is as fast.
CPU_TEXTS_PER_BLOCK = 32


def l2_normalize(x: mx.array, eps: float = 1e-12) -> mx.array:
    """x / max(||x||, eps) along the last axis, in float32 (as torch.nn.functional.normalize)."""
    x32 = x.astype(mx.float32)
    norm = mx.sqrt(mx.sum(x32 * x32, axis=-1, keepdims=True))
    return x32 / mx.maximum(norm, eps)


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
        from mlx_clap.models.htsat import ClapAudioModel
        from mlx_clap.models.roberta import ClapTextModel

        self.config = config
        self.audio_model = ClapAudioModel(config.audio_config)
        self.text_model = ClapTextModel(config.text_config)
        self.audio_projection = ClapProjectionLayer(config.audio_config.hidden_size, config.projection_dim)
        self.text_projection = ClapProjectionLayer(config.text_config.hidden_size, config.projection_dim)
        init = math.log(config.logit_scale_init_value)
        self.logit_scale_a = mx.array(init, dtype=mx.float32)
        self.logit_scale_t = mx.array(init, dtype=mx.float32)
        # Set by from_pretrained when the folder carries tokenizer files; not a module parameter.
        self._tokenizer: ClapTokenizer | None = None
        self._feature_extractor = None
        self.source_dir: Path | None = None
        self.eval()

    # ------------------------------------------------------------------------------------ tensors in
    def get_audio_features(self, input_features: mx.array, is_longer: mx.array | None = None) -> mx.array:
        """HF layout (B, C, 1001, 64) log-mels (+ (B, 1) is_longer for fused models) -> unit (B, D)."""
        pooled = self.audio_model(input_features, is_longer)
        return l2_normalize(self.audio_projection(pooled))

    def embed_audio_inputs(self, input_features: mx.array, is_longer: mx.array | None = None) -> mx.array:
        """Unit embeddings of model inputs: `get_audio_features`, evaluated, on all CPU cores at once.

        MLX's CPU backend does everything but the BLAS calls on one thread, so one batched call leaves
        the other cores idle through the tower's elementwise, softmax and layout work. Here a batch is
        cut into blocks of `CPU_CLIPS_PER_BLOCK` clips that worker threads run side by side
        (`cpu_parallel`), each with single-threaded BLAS. Each row is computed by the same operations
        as in `get_audio_features` (equal up to BLAS rounding). Unlike `get_audio_features` this
        evaluates as it goes, so it cannot run under `mx.compile`. A single clip is one call: cutting
        its wide Swin blocks into bands of window rows on two workers measured slower end to end
        (OpenBLAS's helper threads keep spinning after the two-thread GEMMs around the bands).
        """
        return cpu_parallel.eval_batched(
            self.get_audio_features,
            [input_features, is_longer],
            CPU_CLIPS_PER_BLOCK,
            ready=[self.audio_model, self.audio_projection],
        )

    def embed_text_inputs(self, input_ids: mx.array, attention_mask: mx.array | None = None) -> mx.array:
        """Unit embeddings of token ids: `get_text_features`, evaluated, big batches on all CPU cores."""
        return cpu_parallel.eval_batched(
            self.get_text_features,
            [input_ids, attention_mask],
            CPU_TEXTS_PER_BLOCK,
            ready=[self.text_model, self.text_projection],
        )

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

    # ------------------------------------------------------------------------------ files and strings in
    @property
    def feature_extractor(self):
        if self._feature_extractor is None:
            from mlx_clap.preprocess.features import ClapFeatureExtractor

            self._feature_extractor = ClapFeatureExtractor(self.config.feature_config)
        return self._feature_extractor

    @property
    def tokenizer(self) -> ClapTokenizer:
        if self._tokenizer is None:
            raise RuntimeError(
                "this model has no tokenizer: its folder lacks tokenizer.json (or vocab.json + merges.txt); "
                "convert it again from a source that has the tokenizer files"
            )
        return self._tokenizer

    @property
    def embedding_dim(self) -> int:
        return self.config.projection_dim

    def embed_audio(
        self,
        inputs: Sequence[str | Path | np.ndarray] | str | Path | np.ndarray,
        *,
        batch_size: int = 8,
        long_audio: str = "windows-mean",
        seed: int | None = None,
        quantize_int16: bool = False,
    ) -> np.ndarray:
        """Unit audio embeddings (N, D) as numpy float32 for paths or 1-D float arrays at 48 kHz.

        `long_audio` decides what happens past 10 s: "windows-mean" (default, deterministic: consecutive
        10-s windows, mean of the unit embeddings, renormalized), "head", "center", or "reference"
        (the model's own random `rand_trunc`/`fusion` as LAION/HF do it, seedable with `seed`).
        """
        from mlx_clap.preprocess.audio import load_audio

        if isinstance(inputs, (str, Path, np.ndarray)):
            inputs = [inputs]
        waves = []
        for item in inputs:
            if isinstance(item, (str, Path)):
                waves.append(load_audio(item, self.config.feature_config.sampling_rate).samples)
            else:
                waves.append(item)
        return self.embed_waveforms(
            waves, batch_size=batch_size, long_audio=long_audio, seed=seed, quantize_int16=quantize_int16
        )

    def embed_waveforms(
        self,
        waveforms: Sequence[np.ndarray],
        *,
        batch_size: int = 8,
        long_audio: str = "windows-mean",
        seed: int | None = None,
        quantize_int16: bool = False,
    ) -> np.ndarray:
        """Unit embeddings (N, D) for decoded mono 48 kHz waveforms; see `embed_audio`."""
        fx = self.feature_extractor
        out = np.zeros((len(waveforms), self.embedding_dim), dtype=np.float32)
        if long_audio == "windows-mean":
            # Clips with more windows than a batch go window-group by window-group (embed_windows), so
            # a 2-hour file never has all its 720 windows' features in memory at once. Shorter ones,
            # 10-s windows included, share model calls with their neighbours: one by one, a folder of
            # 15-s files would run the tower two windows at a time.
            from mlx_clap.preprocess.features import as_waveform_list

            waveforms = as_waveform_list(list(waveforms)) if len(waveforms) else []
            most = batch_size * fx.max_samples
            long_idx = [i for i, w in enumerate(waveforms) if w.shape[0] > most]
            for i in long_idx:
                out[i] = self.embed_windows(
                    [waveforms[i]], batch_size=batch_size, quantize_int16=quantize_int16
                )
            if long_idx:
                short = [i for i in range(len(waveforms)) if i not in set(long_idx)]
                if short:
                    out[short] = self.embed_waveforms(
                        [waveforms[i] for i in short],
                        batch_size=batch_size,
                        long_audio=long_audio,
                        quantize_int16=quantize_int16,
                    )
                return out
        for start in range(0, len(waveforms), batch_size):
            chunk = list(waveforms[start : start + batch_size])
            feats, is_longer, owner = fx.extract_for_embedding(
                chunk, long_audio=long_audio, seed=seed, quantize_int16=quantize_int16
            )
            rows = []
            for r in range(0, feats.shape[0], batch_size):
                emb = self.embed_audio_inputs(feats[r : r + batch_size], is_longer[r : r + batch_size])
                rows.append(np.array(emb.astype(mx.float32)))
            rows_np = np.concatenate(rows, axis=0)
            out[start : start + len(chunk)] = pool_windows(rows_np, owner, len(chunk))
        return out

    def embed_windows(
        self, blocks: Iterable[np.ndarray], *, batch_size: int = 8, quantize_int16: bool = False
    ) -> np.ndarray:
        """Unit "windows-mean" embedding (D,) of one clip given as consecutive 1-D blocks at 48 kHz.

        Same windows as `extract_for_embedding(long_audio="windows-mean")`: 10-s windows with a 10-s hop,
        plus one end-aligned window for a remainder; a clip of at most 10 s gives its one padded row.
        Windows are featurized and embedded `batch_size` at a time, so memory stays bounded for any
        length; `blocks` may be a streaming decoder (`mlx_clap.preprocess.audio.AudioStream`).
        """
        fx = self.feature_extractor
        total = np.zeros(self.embedding_dim, dtype=np.float64)
        group: list[np.ndarray] = []

        def flush() -> None:
            nonlocal total
            feats, is_longer, _ = fx.extract_for_embedding(group, quantize_int16=quantize_int16)
            emb = self.embed_audio_inputs(feats, is_longer)
            for row in np.array(emb.astype(mx.float32)).astype(np.float64):
                total += row  # row by row, as pool_windows' np.add.at sums
            group.clear()

        for window in sliding_windows(blocks, fx.max_samples):
            group.append(window)
            if len(group) == batch_size:
                flush()
        if group:
            flush()
        return (total / max(np.linalg.norm(total), 1e-12)).astype(np.float32)

    def embed_text(
        self, texts: Sequence[str] | str, *, batch_size: int = 64, policy: str = "laion"
    ) -> np.ndarray:
        """Unit text embeddings (N, D) as numpy float32, batched by length.

        policy="laion" (default) truncates to 77 tokens as LAION trained; "hf" keeps up to 512 as the
        HF processor does (longer is an error). Each batch is padded only to its own longest text;
        padding is masked, so the vectors equal LAION's pad-to-77 layout.
        """
        if batch_size < 1:
            raise ValueError(f"embed_text: batch_size must be >= 1, got {batch_size}")
        texts = as_text_list(texts)
        out = np.zeros((len(texts), self.embedding_dim), dtype=np.float32)
        if not texts:
            return out
        tok = self.tokenizer
        # Sort by length so each batch pads to a similar length; results go back in input order.
        lengths = np.array([len(t) for t in texts])
        order = np.argsort(-lengths, kind="stable")
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = tok([texts[i] for i in idx], policy=policy)
            emb = self.embed_text_inputs(mx.array(ids), mx.array(mask))
            out[idx] = np.array(emb.astype(mx.float32))
        return out

    def classify(
        self,
        audio: Sequence[str | Path | np.ndarray] | np.ndarray | str | Path,
        labels: Sequence[str],
        template: str | None = DEFAULT_TEMPLATE,
        **embed_kwargs: Any,
    ) -> np.ndarray:
        """Zero-shot probabilities (N, len(labels)): softmax over labels of logits_per_audio.

        `audio` is anything `embed_audio` takes, or an (N, D) array of unit audio embeddings.
        """
        return zero_shot_probabilities(self, audio, labels, template, **embed_kwargs)

    # ---------------------------------------------------------------------------------------- loading
    @staticmethod
    def from_pretrained(path: str | Path, dtype: mx.Dtype = mx.float32) -> ClapModel:
        """Load a converted folder (config.json + model.safetensors [+ tokenizer files])."""
        from mlx_clap.io.folder import load_converted

        return load_converted(Path(path), dtype=dtype)


def sliding_windows(blocks: Iterable[np.ndarray], length: int) -> Iterator[np.ndarray]:
    """Cut a stream of 1-D blocks into windows of `length` at hop `length`, plus an end-aligned last one.

    A stream of at most `length` samples yields itself once (unpadded); an empty stream yields nothing.
    Holds about two windows of samples (plus one block), whatever the stream's length.
    """
    buf = np.zeros(0, dtype=np.float32)
    prev: np.ndarray | None = None  # the last window yielded
    total = 0
    for block in blocks:
        block = np.asarray(block, dtype=np.float32).reshape(-1)
        total += block.size
        buf = np.concatenate([buf, block]) if buf.size else block
        # A full window stays in `buf` until more data arrives: it may be the last one.
        while buf.size > length:
            prev = buf[:length].copy()
            yield prev
            buf = buf[length:]
    if total == 0:
        return
    if prev is None or buf.size == length:
        yield buf
    else:
        # A remainder: the last window ends at the stream's end and overlaps the previous one.
        yield np.concatenate([prev, buf])[-length:]


def pool_windows(rows: np.ndarray, owner: np.ndarray, n_items: int) -> np.ndarray:
    """Mean of the unit embeddings that belong to each item, renormalized (one row per item)."""
    dim = rows.shape[1]
    sums = np.zeros((n_items, dim), dtype=np.float64)
    np.add.at(sums, owner, rows.astype(np.float64))
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return (sums / np.maximum(norms, 1e-12)).astype(np.float32)


def as_text_list(texts: Sequence[str] | str) -> list[str]:
    """A list of strings from one string or a sequence of them; anything else is a TypeError naming it."""
    if texts is None:
        raise TypeError("embed_text: texts is None; pass a string or a list of strings")
    if isinstance(texts, str):
        return [texts]
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"embed_text: item {i} is {type(t).__name__}, not str")
    return texts


def zero_shot_probabilities(
    model: Any,
    audio: Sequence[str | Path | np.ndarray] | np.ndarray | str | Path,
    labels: Sequence[str],
    template: str | None = DEFAULT_TEMPLATE,
    **embed_kwargs: Any,
) -> np.ndarray:
    """Softmax over labels of `model.logits(audio, prompts)[0]`, for any model with embed_audio,
    embed_text, logits and embedding_dim (the LAION and the msclap models).

    `audio` is anything `model.embed_audio` takes, or an (N, D) array of audio embeddings.
    """
    labels = list(labels)
    if not labels:
        raise ValueError("classify: no labels given")
    if isinstance(audio, np.ndarray) and audio.ndim == 2 and audio.shape[1] == model.embedding_dim:
        audio_emb = audio
    else:
        audio_emb = model.embed_audio(audio, **embed_kwargs)
    prompts = [template.format(label) if template else label for label in labels]
    text_emb = model.embed_text(prompts)
    logits_per_audio, _ = model.logits(mx.array(audio_emb), mx.array(text_emb))
    return np.array(mx.softmax(logits_per_audio, axis=-1))
