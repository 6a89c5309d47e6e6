"""msclap's waveform handling before the model: channels to mono, the fill of short clips, random crops.

The log-mel itself is part of the msclap model (`models.msclap.logmel`, with the checkpoint's `melW`);
`mlx_clap.dsp.slaney_mel_filterbank` rebuilds librosa's default filterbank when a checkpoint lacks it.

Waveform fitting follows `CLAPWrapper.load_audio_into_tensor`: clips up to the clip length are tiled
(`repeat`) and cut; longer clips are windowed deterministically by default, or randomly cropped with
Python's `random` module in the "reference" mode.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np

from mlx_clap.preprocess.windows import clip_windows

LONG_AUDIO_MODES = ("windows-mean", "head", "center", "reference")
STEREO_MODES = ("mean", "concat")


# ------------------------------------------------------------------------------------ waveform fitting


def to_mono(wave: np.ndarray, stereo: str = "mean") -> np.ndarray:
    """1-D float32 from (N,) or (C, N) audio: channel mean by default.

    `stereo="concat"` reproduces the original `torchaudio.load(...).reshape(-1)`, which plays the channels
    one after the other (microsoft/CLAP#42); it exists only as a reference mode.
    """
    if stereo not in STEREO_MODES:
        raise ValueError(f"stereo must be one of {', '.join(STEREO_MODES)}, not {stereo!r}")
    arr = np.asarray(wave)
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"audio must be numeric, got dtype {arr.dtype}")
    if arr.ndim == 1:
        out = arr
    elif arr.ndim == 2:
        if arr.shape[0] > arr.shape[1]:
            raise ValueError(
                f"2-D audio must be (channels, samples); got {arr.shape}, which looks like "
                "(samples, channels)"
            )
        out = arr.reshape(-1) if stereo == "concat" else arr.astype(np.float64).mean(axis=0)
    else:
        raise ValueError(f"audio must be 1-D (samples) or 2-D (channels, samples), got shape {arr.shape}")
    out = np.ascontiguousarray(out, dtype=np.float32)
    if out.size == 0:
        raise ValueError("audio is empty (0 samples)")
    if not np.all(np.isfinite(out)):
        raise ValueError("audio contains NaN or infinite samples")
    return out


def repeat_to_length(wave: np.ndarray, length: int) -> np.ndarray:
    """msclap's fill for short clips: tile ceil(length/N) times and cut to `length`."""
    reps = int(math.ceil(length / wave.shape[0]))
    return np.tile(wave, reps)[:length]


def fit_clip(
    wave: np.ndarray, length: int, long_audio: str = "windows-mean", rng: random.Random | None = None
) -> list[np.ndarray]:
    """The clip(s) of exactly `length` samples that stand for one waveform.

    - up to `length` samples: one clip, tiled as the original does;
    - longer, by `long_audio`: "windows-mean" (consecutive windows; the last one ends at the end of the
      audio), "head", "center", or "reference" (the original's `random.randrange(N - length)` start,
      drawn from `rng` or Python's global `random`).
    """
    if long_audio not in LONG_AUDIO_MODES:
        raise ValueError(f"long_audio must be one of {', '.join(LONG_AUDIO_MODES)}, not {long_audio!r}")
    n = wave.shape[0]
    if length >= n:
        return [repeat_to_length(wave, length)]
    if long_audio == "reference":
        start = (rng or random).randrange(n - length)
        return [wave[start : start + length]]
    return list(clip_windows(wave, length, long_audio))


def prepare_batch(
    waves: Sequence[np.ndarray],
    length: int,
    long_audio: str = "windows-mean",
    stereo: str = "mean",
    seed: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Clips (M, length) float32 and owner (M,) int: clip m belongs to input owner[m]."""
    rng = random.Random(seed) if seed is not None else None
    clips: list[np.ndarray] = []
    owner: list[int] = []
    for i, wave in enumerate(waves):
        try:
            mono = to_mono(wave, stereo)
        except ValueError as exc:
            raise ValueError(f"audio item {i}: {exc}") from exc
        for clip in fit_clip(mono, length, long_audio, rng):
            clips.append(clip)
            owner.append(i)
    if not clips:
        return np.zeros((0, length), np.float32), np.zeros((0,), np.int64)
    return np.stack(clips).astype(np.float32), np.array(owner, dtype=np.int64)


def load_channels(path, sr: int) -> np.ndarray:
    """(C, N) float32 at `sr` for msclap's channel-concatenation reference mode (soundfile + soxr)."""
    import warnings

    import soundfile as sf
    import soxr

    from mlx_clap.preprocess.audio import decoder_stderr

    said: list[str] = []  # libmpg123's own fd-2 lines, attributed to the file below
    try:
        with decoder_stderr(said):
            data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises several types; report the file and the cause
        raise ValueError(f"{path}: cannot decode ({exc}{''.join(f'; {w}' for w in said)})") from exc
    for w in said:
        warnings.warn(f"{path}: {w}", stacklevel=2)
    if rate != sr:
        data = soxr.resample(data, rate, sr, quality="HQ").astype(np.float32)
    return np.ascontiguousarray(data.T)
