"""The embedding pipeline: files, waveforms and strings in, unit vectors out, for any model family.

`Embedder` is what `mlx_clap.load()` returns. It owns everything around the model: decoding, input
checks, windowing (`preprocess.windows`, one implementation for both families), prompt templates,
batching, and the CPU block scheduling (`ops.parallel`). What differs between model families is behind
the small `Family` protocol (`pipeline.laion`, `pipeline.msclap`): how a clip becomes model inputs, how
text becomes token arrays, and what the model does with them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx
import numpy as np

from mlx_clap.ops import parallel
from mlx_clap.preprocess.windows import (
    WINDOWED_MODES,
    WindowMean,
    clip_windows,
    segment_windows,
    sliding_windows,
)

# Clips per parallel block of `embed_audio_inputs` on the CPU. Batch 8 of HTSAT-tiny on 2 cores (one call:
# 962 ms): blocks of 1 clip 774 ms, of 2 clips 748 ms, of 4 clips 807 ms.
CPU_CLIPS_PER_BLOCK = 2
# Sentences per parallel block of `embed_text_inputs`. RoBERTa at batch 64 (32 tokens) on 2 cores: one call
# 2005 ms, blocks of 16 1730 ms, of 32 1653 ms; up to batch 32 one call is as fast.
CPU_TEXTS_PER_BLOCK = 32

# `classify(template=FAMILY_TEMPLATE)`: the family's own prompt ("This is a sound of {}." for LAION,
# "this is the sound of {}" for msclap); None uses the labels as they are.
FAMILY_TEMPLATE = "<family template>"


class Family(Protocol):
    """What the pipeline needs to know about a model family."""

    name: str  # "laion" or "msclap": the `family` field of a converted folder's config.json
    sampling_rate: int  # Hz of the waveforms the model takes
    clip_samples: int  # samples per model input (one window)
    default_template: str  # zero-shot prompt, "{}" stands for the label
    long_audio_modes: tuple[str, ...]  # windowed modes plus the family's own whole-clip ones
    audio_modules: list  # what `audio_features` reads besides its inputs (evaluated before workers run)
    text_modules: list
    reference_crops: bool  # "reference" takes one window of a long clip (so decoding can stop there)

    def check_options(self, options: dict[str, Any]) -> None: ...
    def load_file(self, path: str | Path, **options: Any) -> np.ndarray: ...
    def prepare_waveform(self, wave: Any, index: int, **options: Any) -> np.ndarray: ...
    def window_inputs(self, clips: list[np.ndarray]) -> list[mx.array | None]: ...
    def random_source(self, seed: int | None) -> Any: ...
    def reference_start(self, n: int, rng: Any) -> int: ...
    def whole_inputs(
        self, waves: list[np.ndarray], mode: str, rng: Any
    ) -> tuple[list[mx.array | None], np.ndarray]: ...
    def audio_features(self, *inputs: mx.array | None) -> mx.array: ...
    def text_inputs(self, texts: list[str], **options: Any) -> list[mx.array | None]: ...
    def text_features(self, *inputs: mx.array | None) -> mx.array: ...


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


@dataclass
class SegmentEmbedding:
    """Per-window embeddings of one clip (`Embedder.embed_segments`), for time-resolved search.

    Row i of `vectors` is the window [starts[i], ends[i]) in seconds; windows overlap when the hop is
    shorter than the model's clip, and a clip shorter than one window is one segment ending at its end.
    `file_vector` is the clip's "windows-mean" embedding, the vector `embed_windows` gives.
    """

    starts: np.ndarray  # float64 (K,) seconds
    ends: np.ndarray  # float64 (K,) seconds: min(start + window, clip length)
    vectors: np.ndarray  # float32 (K, D), unit rows
    file_vector: np.ndarray  # float32 (D,), unit


class Embedder:
    """A loaded model with its family adapter: `embed_audio`, `embed_text`, `classify`, `logits`.

    `model` is the MLX module (`models.clap.ClapModel` or `models.msclap.model.MsClapModel`) for research
    code; `get_audio_features` / `get_text_features` are its tensor-level calls, and any other attribute
    not defined here (`audio_model`, `parameters()`, ...) is the model's, so code written against the
    module keeps working on what `load()` returns.
    """

    def __init__(self, model: Any, family: Family, source_dir: Path | None = None):
        self.model = model
        self.family = family
        self.source_dir = source_dir

    def __getattr__(self, name: str) -> Any:
        # Only called for names not found on the Embedder itself: the model's attributes.
        if name in ("model", "family", "source_dir"):
            raise AttributeError(name)
        return getattr(self.model, name)

    # ---------------------------------------------------------------------------------- the model
    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def embedding_dim(self) -> int:
        return int(self.model.embedding_dim)

    @property
    def tokenizer(self) -> Any:
        return self.family.tokenizer

    @property
    def feature_extractor(self) -> Any:
        """The LAION mel frontend (`preprocess.features.ClapFeatureExtractor`); msclap's is in-model."""
        fx = getattr(self.family, "feature_extractor", None)
        if fx is None:
            raise AttributeError(f"a {self.family.name} model has no separate feature extractor")
        return fx

    def get_audio_features(self, *inputs: mx.array | None) -> mx.array:
        return self.model.get_audio_features(*inputs)

    def get_text_features(self, *inputs: mx.array | None) -> mx.array:
        return self.model.get_text_features(*inputs)

    def logits(self, audio_embeds: Any, text_embeds: Any) -> tuple[mx.array, mx.array]:
        """(logits_per_audio, logits_per_text) with the model's learned scale(s)."""
        return self.model.logits(mx.array(audio_embeds), mx.array(text_embeds))

    # ------------------------------------------------------------------------------ model inputs in
    def embed_audio_inputs(self, *inputs: mx.array | np.ndarray | None) -> mx.array:
        """Unit embeddings of model inputs, evaluated; on a multi-core CPU in blocks on worker threads.

        Each row is computed by the same operations as one `get_audio_features` call (equal up to BLAS
        rounding). A single clip is one call: cutting its wide Swin blocks into bands of window rows on two
        workers measured slower end to end (docs/performance.md).
        """
        return parallel.eval_batched(
            self.family.audio_features, list(inputs), CPU_CLIPS_PER_BLOCK, ready=self.family.audio_modules
        )

    def embed_text_inputs(self, *inputs: mx.array | np.ndarray | None) -> mx.array:
        """Unit embeddings of token arrays, evaluated; big batches in blocks on the CPU workers."""
        return parallel.eval_batched(
            self.family.text_features, list(inputs), CPU_TEXTS_PER_BLOCK, ready=self.family.text_modules
        )

    def _rows(self, inputs: list[mx.array | None], batch_size: int) -> np.ndarray:
        n = next(a for a in inputs if a is not None).shape[0]
        rows = []
        for r in range(0, n, batch_size):
            part = [None if a is None else a[r : r + batch_size] for a in inputs]
            rows.append(np.array(self.embed_audio_inputs(*part).astype(mx.float32)))
        return np.concatenate(rows, axis=0)

    # ---------------------------------------------------------------------------- files and arrays in
    def embed_audio(
        self,
        inputs: Sequence[str | Path | np.ndarray] | str | Path | np.ndarray,
        *,
        batch_size: int = 8,
        long_audio: str = "windows-mean",
        seed: int | None = None,
        **options: Any,
    ) -> np.ndarray:
        """Unit audio embeddings (N, D) as numpy float32 for paths or float arrays at the model's rate.

        `long_audio` decides what happens past one window: "windows-mean" (default, deterministic:
        consecutive windows, mean of the unit embeddings, renormalized), "head", "center", or the
        family's own modes: "reference" (the original's random crop / truncation, seedable with `seed`)
        and, for fused LAION models, "fusion" (deterministic picks). Family options: LAION
        `quantize_int16=True` (LAION's int16 round trip); msclap `stereo="concat"` (its channel
        concatenation, a reference mode; the default averages channels).
        """
        self.family.check_options(options)
        if isinstance(inputs, (str, Path, np.ndarray)):
            inputs = [inputs]
        inputs = list(inputs)
        self._check_call(batch_size, long_audio)
        # Paths in a windowed mode are streamed (msclap's stereo="concat" needs the channels: decoded).
        if long_audio in WINDOWED_MODES and options.get("stereo", "mean") != "concat":
            if any(isinstance(item, (str, Path)) for item in inputs):
                return self._embed_streamed(inputs, batch_size, long_audio, options)
        # "reference" crops of files only: an array among them would take its draw out of order.
        if long_audio == "reference" and self.family.reference_crops and options.get("stereo") != "concat":
            if inputs and all(isinstance(item, (str, Path)) for item in inputs):
                return self._embed_reference_crops(inputs, batch_size, seed, options)
        waves = [
            self.family.load_file(item, **options) if isinstance(item, (str, Path)) else item
            for item in inputs
        ]
        return self.embed_waveforms(waves, batch_size=batch_size, long_audio=long_audio, seed=seed, **options)

    def _check_call(self, batch_size: int, long_audio: str) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if long_audio not in self.family.long_audio_modes:
            raise ValueError(f"long_audio must be one of {self.family.long_audio_modes}, not {long_audio!r}")

    def _embed_streamed(
        self, inputs: list[Any], batch_size: int, long_audio: str, options: dict[str, Any]
    ) -> np.ndarray:
        """`embed_audio` for a windowed mode, reading each path in bounded memory.

        "head" / "center" read only their window (`AudioStream.read_window`); "windows-mean" streams a
        file longer than `batch_size` windows through `embed_windows`. Short clips and arrays are pooled
        into shared `embed_waveforms` calls as before, so the vectors are those of the decoded arrays.
        """
        from mlx_clap.preprocess.audio import AudioStream

        fam = self.family
        out = np.zeros((len(inputs), self.embedding_dim), dtype=np.float32)
        idx: list[int] = []
        waves: list[np.ndarray] = []
        held = 0

        def flush() -> None:
            nonlocal held
            if waves:
                vecs = self.embed_waveforms(waves, batch_size=batch_size, long_audio=long_audio, **options)
                out[idx] = vecs
            idx.clear()
            waves.clear()
            held = 0

        for i, item in enumerate(inputs):
            if not isinstance(item, (str, Path)):
                fam.prepare_waveform(item, i, **options)  # a bad array is named by its place in `inputs`
                idx.append(i)
                waves.append(item)
                continue
            stream = AudioStream(item, fam.sampling_rate)
            if long_audio != "windows-mean":
                wave = stream.read_window(fam.clip_samples, long_audio)
            else:
                wave, rest = _head_or_stream(stream, batch_size * fam.clip_samples)
                if rest is not None:
                    out[i] = self.embed_windows(rest, batch_size=batch_size, **options)
                    continue
            idx.append(i)
            waves.append(wave)
            held += wave.size
            if held >= batch_size * fam.clip_samples:  # keep a bounded number of clips waiting
                flush()
        flush()
        return out

    def _embed_reference_crops(
        self, paths: list[str | Path], batch_size: int, seed: int | None, options: dict[str, Any]
    ) -> np.ndarray:
        """`embed_audio` of files in "reference" mode, decoding only each file's random crop.

        The draws come from one random stream in input order, as `embed_waveforms` draws them from the
        decoded arrays, and the crops are the same samples (`AudioStream.read_crop`); a crop is one window,
        so `embed_waveforms` draws nothing more for it, and batches hold the same clips as before.
        """
        from mlx_clap.preprocess.audio import AudioStream

        fam = self.family
        rng = fam.random_source(seed)
        parts: list[np.ndarray] = []
        waves: list[np.ndarray] = []

        def flush() -> None:
            parts.append(
                self.embed_waveforms(waves, batch_size=batch_size, long_audio="reference", **options)
            )
            waves.clear()

        for path in paths:
            stream = AudioStream(path, fam.sampling_rate)
            waves.append(stream.read_crop(fam.clip_samples, lambda n: fam.reference_start(n, rng)))
            if len(waves) == batch_size:
                flush()
        if waves:
            flush()
        return np.concatenate(parts, axis=0)

    def embed_waveforms(
        self,
        waveforms: Sequence[np.ndarray],
        *,
        batch_size: int = 8,
        long_audio: str = "windows-mean",
        seed: int | None = None,
        **options: Any,
    ) -> np.ndarray:
        """Unit embeddings (N, D) for decoded waveforms at the model's rate; see `embed_audio`."""
        fam = self.family
        fam.check_options(options)
        self._check_call(batch_size, long_audio)
        waveforms = list(waveforms)
        if len(waveforms) and isinstance(waveforms[0], (int, float, np.number)):
            waveforms = [np.asarray(waveforms)]  # a plain list of samples is one waveform
        waves = [fam.prepare_waveform(w, i, **options) for i, w in enumerate(waveforms)]
        acc = WindowMean(len(waves), self.embedding_dim)
        if long_audio in WINDOWED_MODES:
            # Windows of all clips share model calls, `batch_size` at a time: memory stays bounded by one
            # batch of windows however long a clip is, and short clips do not run the tower alone.
            group: list[np.ndarray] = []
            owner: list[int] = []

            def flush() -> None:
                acc.add(self._rows(fam.window_inputs(group), batch_size), owner)
                group.clear()
                owner.clear()

            for i, wave in enumerate(waves):
                for clip in clip_windows(wave, fam.clip_samples, long_audio):
                    group.append(clip)
                    owner.append(i)
                    if len(group) == batch_size:
                        flush()
            if group:
                flush()
        else:
            rng = fam.random_source(seed)  # one random stream for the whole call, as the references draw
            for start in range(0, len(waves), batch_size):
                inputs, owner_rows = fam.whole_inputs(waves[start : start + batch_size], long_audio, rng)
                acc.add(self._rows(inputs, batch_size), owner_rows + start)
        return acc.result()

    def embed_windows(
        self, blocks: Iterable[np.ndarray], *, batch_size: int = 8, **options: Any
    ) -> np.ndarray:
        """Unit "windows-mean" embedding (D,) of one mono clip given as consecutive 1-D blocks.

        The same windows as `embed_audio(long_audio="windows-mean")`, embedded `batch_size` at a time, so
        memory stays bounded for any length; `blocks` may be a streaming decoder
        (`mlx_clap.preprocess.audio.AudioStream`).
        """
        fam = self.family
        fam.check_options(options)
        acc = WindowMean(1, self.embedding_dim)
        group: list[np.ndarray] = []
        for window in sliding_windows(blocks, fam.clip_samples):
            group.append(fam.prepare_waveform(window, 0, **options))
            if len(group) == batch_size:
                acc.add(self._rows(fam.window_inputs(group), batch_size), [0] * len(group))
                group.clear()
        if group:
            acc.add(self._rows(fam.window_inputs(group), batch_size), [0] * len(group))
        if acc.counts[0] == 0:
            raise ValueError("audio is empty (0 samples)")
        return acc.result()[0]

    def embed_segments(
        self,
        blocks: Iterable[np.ndarray],
        *,
        hop_seconds: float = 2.0,
        batch_size: int = 8,
        **options: Any,
    ) -> SegmentEmbedding:
        """Embeddings of one mono clip's windows every `hop_seconds`, and its "windows-mean" vector.

        `blocks` are consecutive 1-D blocks at the model's rate (a streaming decoder is fine: memory stays
        bounded by about two windows plus one block and one batch). Segment windows are one model clip
        long, start every hop (rounded to samples), and a last one is aligned to the clip's end. Each
        window of either set is embedded once, `batch_size` per model call; when the hop divides the
        window (the default 2 s does for LAION's 10-s and msclap 2022's 5-s windows, not for msclap
        2023's 7-s ones) the mean windows are a subset of the segments and cost no extra model calls. A
        segment's vector is what `embed_waveforms` gives for that window alone; `file_vector` is what
        `embed_windows` gives for the clip.
        """
        fam = self.family
        fam.check_options(options)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not (math.isfinite(hop_seconds) and hop_seconds > 0):
            raise ValueError(f"hop_seconds must be a positive number of seconds, got {hop_seconds!r}")
        hop = round(hop_seconds * fam.sampling_rate)
        if hop < 1:
            raise ValueError(f"hop_seconds={hop_seconds!r} is under one sample at {fam.sampling_rate} Hz")
        acc = WindowMean(1, self.embedding_dim)
        starts: list[int] = []
        vectors: list[np.ndarray] = []
        group: list[np.ndarray] = []
        flags: list[tuple[int, bool, bool]] = []
        n = 0

        def flush() -> None:
            rows = self._rows(fam.window_inputs(group), batch_size)
            # Mean rows go into the running sum in start order, as `embed_windows` adds them.
            for row, (start, is_segment, is_mean) in zip(rows, flags, strict=True):
                if is_mean:
                    acc.add(row[None], [0])
                if is_segment:
                    starts.append(start)
                    vectors.append(row)
            group.clear()
            flags.clear()

        for start, window, is_segment, is_mean in segment_windows(blocks, fam.clip_samples, hop):
            group.append(fam.prepare_waveform(window, 0, **options))
            flags.append((start, is_segment, is_mean))
            n = start + window.size  # the last window ends at the clip's end
            if len(group) == batch_size:
                flush()
        if group:
            flush()
        if acc.counts[0] == 0:
            raise ValueError("audio is empty (0 samples)")
        start_samples = np.array(starts, dtype=np.int64)
        sr = float(fam.sampling_rate)
        return SegmentEmbedding(
            starts=start_samples / sr,
            ends=np.minimum(start_samples + fam.clip_samples, n) / sr,
            vectors=np.stack(vectors).astype(np.float32),
            file_vector=acc.result()[0],
        )

    def embed_frames(self, audio: Any, **options: Any) -> Any:
        """Per-frame unit embeddings with their times, for frame-level models (PE-Audio frame level:
        `pipeline.pe_audio.PeAudioFamily.embed_frames`); other families raise TypeError."""
        frames = getattr(self.family, "embed_frames", None)
        if frames is None:
            raise TypeError(f"a {self.family.name} model gives no frame embeddings")
        return frames(audio, **options)

    # ------------------------------------------------------------------------------------ strings in
    def embed_text(self, texts: Sequence[str] | str, *, batch_size: int = 64, **options: Any) -> np.ndarray:
        """Unit text embeddings (N, D) as numpy float32, batched by length.

        LAION option `policy`: "laion" (default) truncates to 77 tokens as LAION trained; "hf" keeps up to
        512 as the HF processor does (longer is an error). Each batch is padded only to its own longest
        text; padding is masked, so the vectors equal the fixed-length layouts.
        """
        if batch_size < 1:
            raise ValueError(f"embed_text: batch_size must be >= 1, got {batch_size}")
        texts = as_text_list(texts)
        out = np.zeros((len(texts), self.embedding_dim), dtype=np.float32)
        if not texts:
            return out
        # Sort by length so each batch pads to a similar length; results go back in input order.
        order = np.argsort(-np.array([len(t) for t in texts]), kind="stable")
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            inputs = self.family.text_inputs([texts[i] for i in idx], **options)
            out[idx] = np.array(self.embed_text_inputs(*inputs).astype(mx.float32))
        return out

    def classify(
        self,
        audio: Sequence[str | Path | np.ndarray] | np.ndarray | str | Path,
        labels: Sequence[str],
        template: str | None = FAMILY_TEMPLATE,
        **embed_options: Any,
    ) -> np.ndarray:
        """Zero-shot probabilities (N, len(labels)): softmax over labels of logits_per_audio, or for a
        family with its own `scores` (PE-Audio: sigmoid of scale * cosine + bias) each pair's own score.

        `audio` is anything `embed_audio` takes, or an (N, D) array of unit audio embeddings. `template`
        defaults to the family's prompt; None uses the labels as given. With one label every row is 1.0.
        """
        labels = list(labels)
        if not labels:
            raise ValueError("classify: no labels given")
        if template == FAMILY_TEMPLATE:
            template = self.family.default_template
        if isinstance(audio, np.ndarray) and audio.ndim == 2 and audio.shape[1] == self.embedding_dim:
            audio_emb = audio
        else:
            audio_emb = self.embed_audio(audio, **embed_options)
        prompts = [template.format(label) if template else label for label in labels]
        text_emb = self.embed_text(prompts)
        scores = getattr(self.family, "scores", None)
        if scores is not None:  # sigmoid-trained models (PE-Audio) score each pair on its own
            return scores(audio_emb, text_emb)
        logits_per_audio, _ = self.logits(audio_emb, text_emb)
        return np.array(mx.softmax(logits_per_audio, axis=-1))


def _head_or_stream(stream: Any, limit: int) -> tuple[np.ndarray | None, Iterator[np.ndarray] | None]:
    """(whole clip, None) when `stream` ends within `limit` samples, else (None, all its blocks)."""
    it = iter(stream)
    head: list[np.ndarray] = []
    n = 0
    for block in it:
        head.append(block)
        n += block.size
        if n > limit:
            return None, itertools.chain(head, it)
    return (np.concatenate(head) if len(head) != 1 else head[0]), None


def embedder_for(model: Any, source_dir: Path | None = None) -> Embedder:
    """The Embedder of a loaded model (its family adapter and the folder's tokenizer)."""
    from mlx_clap.models.clap import ClapModel

    if isinstance(model, ClapModel):
        from mlx_clap.pipeline.laion import LaionFamily

        return Embedder(model, LaionFamily(model, source_dir), source_dir)
    from mlx_clap.models.pe_audio.model import PeAudioModel

    if isinstance(model, PeAudioModel):
        from mlx_clap.pipeline.pe_audio import PeAudioFamily

        return Embedder(model, PeAudioFamily(model, source_dir), source_dir)
    from mlx_clap.pipeline.msclap import MsClapFamily

    return Embedder(model, MsClapFamily(model, source_dir), source_dir)


__all__ = [
    "CPU_CLIPS_PER_BLOCK",
    "CPU_TEXTS_PER_BLOCK",
    "Embedder",
    "Family",
    "SegmentEmbedding",
    "as_text_list",
    "embedder_for",
]
