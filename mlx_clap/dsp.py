"""Signal processing shared by both frontends: the periodic Hann window, the mel filterbanks, the STFT
log-mel.

The window and filterbanks are numpy float64, cached. The LAION frontend (`preprocess.features`), msclap's
in-model log-mel (`models.msclap.logmel`) and the msclap converter (which rebuilds `melW` when a checkpoint
lacks it) all use these, so there is one window, one Slaney filterbank and one float32 STFT log-mel in the
package (docs/numerics.md §2).
"""

from __future__ import annotations

import functools

import mlx.core as mx
import numpy as np

# Floor of the power mel before the log (librosa/torchaudio `amin`, HF `mel_floor`): gives -100 dB.
AMIN = 1e-10


def hz_to_mel(freq: np.ndarray | float, mel_scale: str = "slaney") -> np.ndarray:
    """Hertz to mels on the Slaney (librosa default) or HTK (torchaudio default) scale, in float64."""
    f = np.asarray(freq, dtype=np.float64)
    if mel_scale == "htk":
        return 2595.0 * np.log10(1.0 + f / 700.0)
    if mel_scale != "slaney":
        raise ValueError(f"mel_scale must be 'slaney' or 'htk', not {mel_scale!r}")
    # Linear below 1 kHz (200/3 Hz per mel), logarithmic above.
    mels = 3.0 * f / 200.0
    log_region = f >= 1000.0
    return np.where(log_region, 15.0 + np.log(np.maximum(f, 1e-300) / 1000.0) * (27.0 / np.log(6.4)), mels)


def mel_to_hz(mels: np.ndarray | float, mel_scale: str = "slaney") -> np.ndarray:
    """Inverse of `hz_to_mel`, in float64."""
    m = np.asarray(mels, dtype=np.float64)
    if mel_scale == "htk":
        return 700.0 * (np.power(10.0, m / 2595.0) - 1.0)
    if mel_scale != "slaney":
        raise ValueError(f"mel_scale must be 'slaney' or 'htk', not {mel_scale!r}")
    freqs = 200.0 * m / 3.0
    return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0)), freqs)


@functools.lru_cache(maxsize=16)
def _mel_filterbank_cached(
    sampling_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float, mel_scale: str, norm: str | None
) -> np.ndarray:
    if not 0.0 <= fmin < fmax:
        raise ValueError(f"need 0 <= frequency_min < frequency_max, got {fmin} and {fmax}")
    if fmax > sampling_rate / 2:
        # Filters above Nyquist would be empty and give -100 dB rows (NVIDIA/audio-flamingo#33).
        raise ValueError(f"frequency_max {fmax} Hz is above the Nyquist frequency {sampling_rate / 2} Hz")
    if norm not in (None, "slaney"):
        raise ValueError(f"norm must be None or 'slaney', not {norm!r}")
    fft_freqs = np.linspace(0.0, sampling_rate / 2, n_fft // 2 + 1)
    mel_pts = np.linspace(hz_to_mel(fmin, mel_scale), hz_to_mel(fmax, mel_scale), n_mels + 2)
    filter_freqs = mel_to_hz(mel_pts, mel_scale)
    # Triangles: rising edge from point m to m+1, falling edge from m+1 to m+2 (librosa/torchaudio form).
    fdiff = np.diff(filter_freqs)
    slopes = filter_freqs[None, :] - fft_freqs[:, None]
    down = -slopes[:, :-2] / fdiff[:-1]
    up = slopes[:, 2:] / fdiff[1:]
    fb = np.maximum(0.0, np.minimum(down, up))
    if norm == "slaney":
        fb *= 2.0 / (filter_freqs[2 : n_mels + 2] - filter_freqs[:n_mels])
    fb.setflags(write=False)
    return fb


def mel_filterbank(
    sampling_rate: int = 48000,
    n_fft: int = 1024,
    n_mels: int = 64,
    fmin: float = 50.0,
    fmax: float = 14000.0,
    mel_scale: str = "slaney",
    norm: str | None = "slaney",
) -> np.ndarray:
    """Mel filterbank (n_fft // 2 + 1, n_mels) in float64 (read-only, cached).

    `mel_scale="slaney", norm="slaney"` equals `librosa.filters.mel(sr, n_fft, n_mels, fmin, fmax)`.T
    (LAION's `melW`); `mel_scale="htk", norm=None` equals torchaudio's `melscale_fbanks` and HF's
    `mel_filter_bank(norm=None, mel_scale="htk")`. Raises ValueError if fmax is above sampling_rate / 2.
    """
    return _mel_filterbank_cached(
        int(sampling_rate), int(n_fft), int(n_mels), float(fmin), float(fmax), mel_scale, norm
    )


def periodic_hann(n: int) -> np.ndarray:
    """Periodic Hann window of length n in float64: 0.5 - 0.5 cos(2 pi k / n), k = 0..n-1."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)


def slaney_mel_filterbank(sr: float, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """librosa.filters.mel defaults (Slaney scale and area norm) as (n_fft//2+1, n_mels) float32: msclap's
    `melW`, rebuilt for a checkpoint that lacks it."""
    return mel_filterbank(sr, n_fft, n_mels, fmin, fmax, "slaney", "slaney").astype(np.float32)


def stft_log_mel(
    padded: mx.array, window: mx.array, fb: mx.array, hop: int, lo: int = 0, hi: int | None = None
) -> mx.array:
    """(B, L) reflect-padded float32 waveforms -> (B, 1 + (L - n_fft) // hop, n_mels) log-mel in dB.

    Frames of `len(window)` at `hop`, windowed rfft, power re² + im², mel matmul, 10·log10(max(x, 1e-10))
    (reference 1, no top_db: the floor is -100 dB). `fb` holds filterbank rows lo..hi-1 (the FFT bins
    under some filter); the default is every bin.
    """
    n_fft = window.shape[0]
    b, length = padded.shape
    n_frames = 1 + (length - n_fft) // hop
    frames = mx.as_strided(padded, (b, n_frames, n_fft), (length, hop, 1))
    spec = mx.fft.rfft(frames * window, axis=-1)
    if lo or hi is not None:
        spec = spec[..., lo:hi]
    power = mx.square(mx.real(spec)) + mx.square(mx.imag(spec))
    return 10.0 * mx.log10(mx.maximum(power @ fb, AMIN))
