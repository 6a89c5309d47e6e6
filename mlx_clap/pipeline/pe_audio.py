"""The Perception Encoder Audio family: raw 48-kHz samples of any length, ModernBERT tokens, sigmoid scores.

What it adds to the shared pipeline (`mlx_clap.pipeline.Embedder`):

- Windows. The model takes a whole clip of any length (transformers' reference: one pass). Its codec
  runs in tiles (models/pe_audio/encoder.py: the same frames, bounded memory), but attention is
  quadratic in frames (14 heads x frames^2 x 4 bytes per layer: 32 MB at 30 s, 450 MB at 2 min), so the
  windowed modes cut clips longer than `WINDOW_SECONDS` (30 s, 750 frames) into windows as for the other
  families ("windows-mean" by default). A clip up to one window is one pass, unpadded: exactly the
  reference. "reference" passes every clip whole (attention memory grows with the clip's square).
- Padded batches. Clips of different lengths share a model call with their lengths; the model masks past
  them, so a vector never depends on the batch (transformers' padded batches do leak, see
  models/pe_audio/dac.py).
- Scores. `scores` is the model's own sigmoid(scale * cosine + bias) per (audio, text) pair; the
  Embedder's `classify` uses it (independent probabilities, not a softmax over labels).
- Frames (`embed_frames`, frame-level checkpoints): one unit vector every hop (40 ms) with its time.
  Clips longer than `chunk_seconds` + 2 * `context_seconds` are run in chunks that each see
  `context_seconds` of audio on both sides (the frames of the context are dropped), so memory is bounded
  by one batch of chunks and a streamed file is never decoded whole. A chunk is not the whole clip: the
  patch embedder's GroupNorm statistics and attention cover the chunk only (cost measured in
  `embed_frames`). Likewise "windows-mean" of a 60-s clip (two 30-s windows) against the one pass:
  cosine 0.99986 on the random full-size model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_clap.io.folder import WeightsError
from mlx_clap.models.pe_audio.config import FRAME_LEVEL, POOLED
from mlx_clap.models.pe_audio.model import PeAudioModel
from mlx_clap.pipeline.family_base import FamilyBase
from mlx_clap.preprocess.features import check_waveform
from mlx_clap.preprocess.pe_audio_features import (
    batch_waveforms,
    check_frame_length,
    prepare_waveform,
    reflect_pad,
)

# Labels as given: PE-A was trained on free-form captions ("glass breaking", "somebody speaking").
DEFAULT_TEMPLATE = "{}"
LONG_AUDIO_MODES = ("windows-mean", "head", "center", "reference")
# Window of the windowed modes (a whole number of frames at the model's hop).
WINDOW_SECONDS = 30.0
# embed_frames: frames kept per chunk, and the audio each chunk sees on either side of them. Clips up
# to 30 + 2 * 5 = 40 s are one pass (the reference).
CHUNK_SECONDS = 30.0
CONTEXT_SECONDS = 5.0


@dataclass
class FrameEmbedding:
    """Frame-level embeddings of one clip (`Embedder.embed_frames`).

    Row i of `vectors` is the frame [starts[i], starts[i] + hop_seconds) in seconds (the last one may run
    past the clip's end: the clip is reflect-padded to whole frames, as transformers does).
    """

    starts: np.ndarray  # float64 (T,) seconds: i * hop / sampling_rate
    vectors: np.ndarray  # float32 (T, D), unit rows
    hop_seconds: float
    duration: float  # seconds of audio the frames cover before padding
    chunks: int  # model passes the frames came from (1 = one pass over the whole clip, the reference)


@dataclass
class FrameScores:
    """A text's score on every frame of one clip (`PeAudioFamily.frame_scores`)."""

    starts: np.ndarray  # float64 (T,) seconds
    ends: np.ndarray  # float64 (T,) seconds: start + hop, the last one clipped to the clip's end
    cosines: np.ndarray  # float32 (T,)
    probabilities: np.ndarray  # float32 (T,): sigmoid(scale * cosine + bias)
    hop_seconds: float
    duration: float

    def spans(self, threshold: float = 0.5) -> list[tuple[float, float, float]]:
        """(start, end, best probability) of each run of consecutive frames whose probability is at
        least `threshold`, in time order. 0.5 is the model's own decision (scale * cosine + bias >= 0)."""
        keep = np.r_[False, self.probabilities >= threshold, False].astype(np.int8)
        edges = np.diff(keep)
        firsts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        return [
            (float(self.starts[a]), float(self.ends[b - 1]), float(self.probabilities[a:b].max()))
            for a, b in zip(firsts, ends, strict=True)
        ]


@dataclass
class FrameSegments:
    """Segments pooled from frames (`PeAudioFamily.embed_segments`): the fields of the pipeline's
    `SegmentEmbedding`, which this module cannot import (the pipeline package imports it)."""

    starts: np.ndarray  # float64 (K,) seconds
    ends: np.ndarray  # float64 (K,) seconds
    vectors: np.ndarray  # float32 (K, D), unit rows
    file_vector: np.ndarray  # float32 (D,), unit


class PeAudioFamily(FamilyBase):
    """`pipeline.Family` for `PeAudioModel` (pooled or frame level)."""

    name = "pe_audio"
    default_template = DEFAULT_TEMPLATE
    long_audio_modes = LONG_AUDIO_MODES
    # "reference" is the whole clip, not a crop of it.
    reference_crops = False
    missing_tokenizer_hint = (
        "this PE-Audio model has no tokenizer: its folder lacks tokenizer.json; use a folder that has "
        "the checkpoint's tokenizer.json (convert/pe_audio.py --tokenizer DIR)"
    )

    def __init__(self, model: PeAudioModel, source_dir: Path | None = None, tokenizer: Any = None):
        config = model.config
        self.sampling_rate = int(config.sampling_rate)
        self.hop = int(config.hop_length)
        self.clip_samples = self._whole_frames(WINDOW_SECONDS)
        self.audio_modules = [model.audio_encoder, model.audio_head]
        self.text_modules = [model.text_model, model.text_audio_head]
        # Last, as the tokenizer is read here: a bad config fails before a bad tokenizer file is reported.
        super().__init__(model, source_dir, tokenizer)

    def _whole_frames(self, seconds: float) -> int:
        """Samples of at least one frame, a whole number of frames, nearest to `seconds`."""
        return max(1, round(seconds * self.sampling_rate / self.hop)) * self.hop

    def read_tokenizer(self, folder: Path) -> Any:
        from mlx_clap.preprocess.pe_audio_tokenizer import load_pe_audio_tokenizer
        from mlx_clap.preprocess.tokenizer import TokenizerError

        try:
            return load_pe_audio_tokenizer(folder, self.model.config.text_config)
        except TokenizerError as exc:
            raise WeightsError(f"the tokenizer does not fit this model: {exc}") from exc

    def describe(self) -> dict[str, Any]:
        """Architecture summary for `mlx-clap info`."""
        c = self.model.config
        a, t = c.audio_config, c.text_config
        return {
            "fused": False,
            "architecture": c.architecture,
            "frame_level": c.is_frame_level,
            "audio": f"DAC encoder (ratios {list(a.dac_config.downsampling_ratios)}, hop {c.hop_length}) + "
            f"transformer {a.num_hidden_layers} x {a.hidden_size}",
            "text": f"ModernBERT {t.num_hidden_layers} x {t.hidden_size}",
            "sampling_rate": c.sampling_rate,
            "window_seconds": self.clip_samples / self.sampling_rate,
        }

    # ----------------------------------------------------------------------------------- audio in
    def check_options(self, options: dict[str, Any]) -> None:
        # The commands pass quantize_int16 (a LAION reference mode) for every family: off, it means nothing.
        if options.get("quantize_int16"):
            raise ValueError(
                "quantize_int16 is a LAION reference mode; PE-Audio takes float samples as they are"
            )
        unknown = sorted(set(options) - {"quantize_int16"})
        if unknown:
            raise TypeError(f"unknown option(s) for a PE-Audio model: {', '.join(unknown)} (none known)")

    def load_file(self, path: str | Path, **options: Any) -> np.ndarray:
        from mlx_clap.preprocess.audio import load_audio

        return load_audio(path, self.sampling_rate).samples

    def prepare_waveform(self, wave: Any, index: int, **options: Any) -> np.ndarray:
        """The checked mono clip (padding to whole frames happens per model input, `window_inputs`)."""
        x = check_waveform(wave, index)
        check_frame_length(x.shape[0], index, self.hop, self.sampling_rate)
        return x

    def window_inputs(self, clips: list[np.ndarray]) -> list[mx.array | None]:
        padded = [prepare_waveform(c, i, self.hop, self.sampling_rate) for i, c in enumerate(clips)]
        values, lengths = batch_waveforms(padded, self.hop)
        return [mx.array(values), mx.array(lengths)]

    def random_source(self, seed: int | None) -> None:
        return None  # nothing is drawn: "reference" is the whole clip

    def reference_start(self, n: int, rng: Any) -> int:
        raise NotImplementedError("PE-Audio's reference mode is the whole clip, not a crop")

    def whole_inputs(
        self, waves: list[np.ndarray], mode: str, rng: Any
    ) -> tuple[list[mx.array | None], np.ndarray]:
        """ "reference": every clip whole, in one pass (as transformers; memory grows with the clip)."""
        return self.window_inputs(waves), np.arange(len(waves), dtype=np.int64)

    def audio_features(self, input_values: mx.array, lengths: mx.array | None = None) -> mx.array:
        return self.model.get_audio_features(input_values, lengths)

    # ------------------------------------------------------------------------------------ text in
    def text_inputs(self, texts: list[str], max_length: int | None = None) -> list[mx.array | None]:
        ids, mask = self.tokenizer(texts, max_length=max_length)
        return [mx.array(ids), mx.array(mask)]

    def text_features(self, input_ids: mx.array, attention_mask: mx.array | None = None) -> mx.array:
        return self.model.get_text_features(input_ids, attention_mask)

    def scores(self, audio_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
        """sigmoid(scale * cosine + bias) (Na, Nt) for unit vectors: the model's own match probability."""
        return np.array(self.model.scores(mx.array(audio_embeds), mx.array(text_embeds)))

    # ------------------------------------------------------------------------------------- frames
    def embed_frames(
        self,
        audio: str | Path | np.ndarray | Iterable[np.ndarray],
        *,
        chunk_seconds: float = CHUNK_SECONDS,
        context_seconds: float = CONTEXT_SECONDS,
        batch_size: int = 1,
    ) -> FrameEmbedding:
        """Unit frame embeddings (T, D) of one clip with each frame's start time (frame-level models).

        `audio` is a path (streamed: never decoded whole), a mono array at the model's rate, or an
        iterable of consecutive 1-D blocks. A clip of at most `chunk_seconds` + 2 * `context_seconds`
        is one pass (the reference). Longer ones run in chunks of `chunk_seconds` of kept frames, each
        seeing `context_seconds` more on both sides (clipped at the clip's ends), `batch_size` chunks per
        model call: the frames then differ from one pass, because each chunk's GroupNorm statistics and
        attention cover the chunk only. Measured on the full-size model with random weights, a 60-s clip:
        30-s chunks + 5 s of context give per-frame cosines to the one pass of 0.998 and up (median
        0.9985) for 1.05x the time; 10 s + 2 s give 0.988 and up (median 0.995) for 1.34x; memory stays
        about 1 GB above the weights either way (the one pass too: the codec runs in tiles).
        """
        info: dict[str, int] = {}
        starts: list[np.ndarray] = []
        rows: list[np.ndarray] = []
        for frame0, vecs in self._frame_rows(audio, chunk_seconds, context_seconds, batch_size, info):
            starts.append(np.arange(frame0, frame0 + vecs.shape[0]))
            rows.append(vecs)
        hop_s = self.hop / self.sampling_rate
        return FrameEmbedding(
            starts=np.concatenate(starts).astype(np.float64) * hop_s,
            vectors=np.concatenate(rows).astype(np.float32),
            hop_seconds=hop_s,
            duration=info["samples"] / self.sampling_rate,
            chunks=info["chunks"],
        )

    def _frame_rows(
        self,
        audio: str | Path | np.ndarray | Iterable[np.ndarray],
        chunk_seconds: float,
        context_seconds: float,
        batch_size: int,
        info: dict[str, int],
    ) -> Iterator[tuple[int, np.ndarray]]:
        """(index of the first frame, unit frame vectors (kept, D) float32) per chunk, in order: what
        `embed_frames` collects and `embed_segments` pools as they come. At the end `info` holds
        "samples" (the clip's length) and "chunks" (model passes)."""
        model = self.model
        if not model.config.is_frame_level:
            raise ValueError(
                f"this PE-Audio checkpoint is a {POOLED} (one vector per clip) and gives no frame "
                "embeddings; "
                f"use a frame-level one ({FRAME_LEVEL}, e.g. facebook/pe-a-frame-base)"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not (np.isfinite(chunk_seconds) and chunk_seconds > 0 and np.isfinite(context_seconds)):
            raise ValueError(
                "chunk_seconds must be > 0 and context_seconds finite, "
                f"got {chunk_seconds}, {context_seconds}"
            )
        core = self._whole_frames(chunk_seconds) // self.hop
        context = round(context_seconds * self.sampling_rate / self.hop)
        if context < 0:
            raise ValueError(f"context_seconds must be >= 0, got {context_seconds}")
        if isinstance(audio, (str, Path)):
            from mlx_clap.preprocess.audio import AudioStream

            blocks: Iterable[np.ndarray] = AudioStream(audio, self.sampling_rate)
        elif isinstance(audio, (np.ndarray, mx.array)):
            blocks = [check_waveform(audio, 0)]
        else:
            blocks = audio
        jobs: list[tuple[np.ndarray, int, int, int]] = []  # (samples, first frame, its index in them, kept)
        info["samples"] = info["chunks"] = 0

        def run() -> Iterator[tuple[int, np.ndarray]]:
            values, lengths = batch_waveforms([j[0] for j in jobs], self.hop)
            vecs, _ = model.get_frame_features(mx.array(values), mx.array(lengths))
            vecs = np.array(vecs.astype(mx.float32))
            for row, (_, frame0, first, kept) in enumerate(jobs):
                yield frame0, vecs[row, first : first + kept]
            jobs.clear()

        def whole(clip: np.ndarray) -> np.ndarray:
            return prepare_waveform(clip, 0, self.hop, self.sampling_rate)  # refuses under one frame

        for frame0, samples, first, kept, total in frame_chunks(blocks, self.hop, core, context, whole):
            jobs.append((samples, frame0, first, kept))
            info["samples"], info["chunks"] = total, info["chunks"] + 1
            if len(jobs) == batch_size:
                yield from run()
        if jobs:
            yield from run()
        if info["chunks"] == 0:
            raise ValueError("audio is empty (0 samples)")

    # ------------------------------------------------------------------------------ frames, used
    def frame_scores(self, audio: str | Path | np.ndarray | Iterable[np.ndarray], text: str) -> FrameScores:
        """Each frame's cosine to `text` and the model's own match probability for it,
        sigmoid(scale * cosine + bias), as `classify` scores a clip (frame-level models)."""
        query = self.embed_text_vector(text)
        frames = self.embed_frames(audio)
        cos = frames.vectors @ query
        probs = self.scores(frames.vectors, query[None, :])[:, 0]
        return FrameScores(
            starts=frames.starts,
            ends=np.minimum(frames.starts + frames.hop_seconds, frames.duration),
            cosines=cos.astype(np.float32),
            probabilities=probs.astype(np.float32),
            hop_seconds=frames.hop_seconds,
            duration=frames.duration,
        )

    def embed_text_vector(self, text: str) -> np.ndarray:
        """The unit text embedding (D,) of one string (the pipeline's `embed_text` batches many)."""
        ids, mask = self.text_inputs([text])
        return np.array(self.text_features(ids, mask).astype(mx.float32))[0]

    @property
    def pools_frames(self) -> bool:
        """Whether `embed_segments` pools frames (frame-level checkpoints); the pooled ones have no
        frames, and their segments are windows as for the other families."""
        return bool(self.model.config.is_frame_level)

    def segment_seconds(self, hop_seconds: float) -> float:
        """Length of the segments `embed_segments` stores at `hop_seconds`: the hop in whole frames."""
        return self._segment_frames(hop_seconds) * self.hop / self.sampling_rate

    def _segment_frames(self, hop_seconds: float) -> int:
        if not (np.isfinite(hop_seconds) and hop_seconds > 0):
            raise ValueError(f"hop_seconds must be a positive number of seconds, got {hop_seconds!r}")
        return max(1, round(hop_seconds * self.sampling_rate / self.hop))

    def embed_segments(
        self,
        blocks: str | Path | np.ndarray | Iterable[np.ndarray],
        *,
        hop_seconds: float = 2.0,
        batch_size: int = 8,
        chunk_seconds: float = CHUNK_SECONDS,
        context_seconds: float = CONTEXT_SECONDS,
        **options: Any,
    ) -> FrameSegments:
        """Segments of one clip pooled from its 40-ms frames (frame-level models), for a store.

        Called as `Embedder.embed_segments` is for the windowed families and answering alike (starts,
        ends, vectors, file_vector). Segment k covers frames [k * n, (k + 1) * n), n = `hop_seconds` in
        whole frames (at least one); its vector is the unit mean of those frames' unit vectors, and
        segments do not overlap: the hop is the segment's length. `file_vector` is the unit mean of
        every frame, the frame-level model's own pooling over a single pass (`embed_audio` of a clip
        over 30 s averages 30-s windows instead, so the two differ slightly there). Frames come in
        chunks (`embed_frames` with `chunk_seconds` and `context_seconds`, `batch_size` chunks per model
        call) and are pooled as they come: memory holds one batch of chunks and one segment, whatever
        the clip's length.
        """
        self.check_options(options)
        per = self._segment_frames(hop_seconds)
        info: dict[str, int] = {}
        dim = self.model.embedding_dim
        left = np.zeros((0, dim), dtype=np.float32)  # frames of a segment not complete yet
        total = np.zeros(dim, dtype=np.float64)
        vectors: list[np.ndarray] = []
        for _, vecs in self._frame_rows(blocks, chunk_seconds, context_seconds, batch_size, info):
            total += vecs.sum(axis=0, dtype=np.float64)
            left = np.concatenate([left, vecs]) if left.size else vecs
            full = left.shape[0] // per
            if full:
                vectors.append(_unit(left[: full * per].reshape(full, per, dim).mean(axis=1)))
                left = left[full * per :]
        if left.shape[0]:
            vectors.append(_unit(left.mean(axis=0, keepdims=True)))
        seg = per * self.hop / self.sampling_rate
        duration = info["samples"] / self.sampling_rate
        out = np.concatenate(vectors).astype(np.float32)
        starts = np.arange(out.shape[0], dtype=np.float64) * seg
        return FrameSegments(
            starts=starts,
            ends=np.minimum(starts + seg, duration),
            vectors=out,
            file_vector=_unit(total[None, :])[0].astype(np.float32),
        )


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def frame_chunks(
    blocks: Iterable[np.ndarray],
    hop: int,
    core: int,
    context: int,
    whole: Callable[[np.ndarray], np.ndarray],
) -> Iterator[tuple[int, np.ndarray, int, int, int]]:
    """(first kept frame, chunk samples, index of that frame in the chunk, kept frames, clip samples).

    A clip of at most core + 2 * context frames is one chunk, `whole(clip)`, every frame kept. Longer
    clips are reflect-padded at the end to whole frames (as the feature extractor pads) and chunk k keeps
    frames [k * core, (k + 1) * core) with `context` more frames on each side, clipped to the clip. Holds
    at most core + 2 * context + 1 frames of samples plus one block, whatever the clip's length; the last
    element of each tuple is the clip's length in samples once the stream has ended (else 0).
    """
    it = iter(blocks)
    buf = np.zeros(0, dtype=np.float32)
    base = 0  # sample index of buf[0]
    done = False

    def fill(upto: int) -> None:
        nonlocal buf, done
        parts = [buf]
        have = base + buf.size
        while not done and have < upto:
            block = next(it, None)
            if block is None:
                done = True
                break
            block = np.asarray(block, dtype=np.float32).reshape(-1)
            parts.append(block)
            have += block.size
        if len(parts) > 1:
            buf = np.concatenate(parts)

    single = core + 2 * context
    fill(single * hop + 1)
    if done and buf.size <= single * hop:
        if buf.size:
            clip = whole(buf)
            yield 0, clip, 0, clip.shape[0] // hop, buf.size
        return
    k0 = 0
    while True:
        fill((k0 + core + context) * hop + 1)
        if done:
            total = base + buf.size
            frames = -(-total // hop)
            view = reflect_pad(buf, hop)  # buf reaches back >= one frame: the reflection is the clip's
            end_kept = min(frames, k0 + core)
            hi = min(frames, end_kept + context)
        else:
            total, view = 0, buf
            end_kept = k0 + core
            hi = end_kept + context
        lo = max(0, k0 - context)
        yield k0, view[lo * hop - base : hi * hop - base], k0 - lo, end_kept - k0, total
        k0 = end_kept
        if done and k0 >= frames:
            return
        # Keep from the next chunk's left context (and at least one frame back, for the end's reflection).
        keep = (k0 - max(context, 1)) * hop
        if keep > base:
            buf = buf[keep - base :].copy()
            base = keep


__all__ = [
    "CHUNK_SECONDS",
    "CONTEXT_SECONDS",
    "DEFAULT_TEMPLATE",
    "FrameEmbedding",
    "PeAudioFamily",
    "frame_chunks",
]
