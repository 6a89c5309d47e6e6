"""msclap's waveform handling and torchlibrosa log-mel frontend, in MLX and numpy.

Constants and their reference (docs/numerics.md §1.3, §2.1):
- `N_FFT = 1024` window and FFT size (torchlibrosa `Spectrogram(n_fft=window_size)`; the 2022 yml's
  `n_fft: 1028` is never read);
- `HOP = 320` at 44.1 kHz: 7-s clips (308700 samples) give 965 frames, 5-s clips (220500) give 690;
- periodic Hann window, reflect padding of 512 on each side, power spectrum, `melW` matmul,
  `10*log10(max(mel, 1e-10))` with ref 1 and no top_db.

The filterbank is taken from the checkpoint (`logmel_extractor.melW`) when it has one; otherwise
`slaney_mel_filterbank` rebuilds librosa's default filterbank for the design rate the original uses.

Waveform fitting follows `CLAPWrapper.load_audio_into_tensor`: clips up to the clip length are tiled
(`repeat`) and cut; longer clips are windowed deterministically by default, or randomly cropped with
Python's `random` module in the "reference" mode.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import mlx.core as mx
import numpy as np

N_FFT = 1024
HOP = 320
AMIN = 1e-10
LONG_AUDIO_MODES = ("windows-mean", "head", "center", "reference")
STEREO_MODES = ("mean", "concat")


def periodic_hann(n: int = N_FFT) -> np.ndarray:
    """librosa `get_window('hann', n, fftbins=True)`: the periodic form, not `mx.hanning`'s symmetric one."""
    k = np.arange(n, dtype=np.float64)
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * k / n)).astype(np.float32)


def _hz_to_mel_slaney(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    f_sp = 200.0 / 3
    mels = f / f_sp
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-12) / min_log_hz) / logstep, mels)


def _mel_to_hz_slaney(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp = 200.0 / 3
    freqs = f_sp * m
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), freqs)


def slaney_mel_filterbank(sr: float, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """librosa.filters.mel defaults (Slaney scale, Slaney area norm) as a (n_fft//2+1, n_mels) float32 matrix.

    Used only when a checkpoint lacks `melW`; the parity test compares it with librosa.
    """
    if fmax > sr / 2:
        raise ValueError(f"fmax {fmax} Hz is above the Nyquist rate of the design rate {sr} Hz")
    fftfreqs = np.fft.rfftfreq(n_fft, d=1.0 / sr)
    mel_f = _mel_to_hz_slaney(np.linspace(_hz_to_mel_slaney(fmin), _hz_to_mel_slaney(fmax), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fftfreqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels]))[:, None]
    return weights.T.astype(np.float32)


def log_mel(waveforms: mx.array, mel_w: mx.array, hop: int = HOP, n_fft: int = N_FFT) -> mx.array:
    """(B, N) float32 waveforms -> (B, T, n_mels) log-mel in dB, T = 1 + N // hop, torchlibrosa semantics."""
    if waveforms.ndim != 2:
        raise ValueError(f"log_mel wants (batch, samples), got shape {waveforms.shape}")
    x = waveforms.astype(mx.float32)
    pad = n_fft // 2
    if x.shape[1] <= pad:
        raise ValueError(f"log_mel: {x.shape[1]} samples is too short for reflect padding of {pad}")
    x = mx.pad(x, [(0, 0), (pad, pad)], mode="reflect")
    batch, length = x.shape
    n_frames = 1 + (length - n_fft) // hop
    frames = mx.as_strided(x, shape=(batch, n_frames, n_fft), strides=(length, hop, 1))
    spec = mx.fft.rfft(frames * mx.array(periodic_hann(n_fft)), axis=-1)
    power = mx.square(mx.real(spec)) + mx.square(mx.imag(spec))
    mel = power @ mel_w.astype(mx.float32)
    return 10.0 * mx.log10(mx.maximum(mel, AMIN))


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
    if long_audio == "head":
        return [wave[:length]]
    if long_audio == "center":
        start = (n - length) // 2
        return [wave[start : start + length]]
    if long_audio == "reference":
        start = (rng or random).randrange(n - length)
        return [wave[start : start + length]]
    starts = sorted({min(i * length, n - length) for i in range(int(math.ceil(n / length)))})
    return [wave[s : s + length] for s in starts]


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
