"""msclap's in-model log-mel (torchlibrosa semantics) in MLX: the model holds the filterbank `melW`.

- `N_FFT = 1024` window and FFT size (torchlibrosa `Spectrogram(n_fft=window_size)`; the 2022 yml's
  `n_fft: 1028` is never read);
- `HOP = 320` at 44.1 kHz: 7-s clips (308700 samples) give 965 frames, 5-s clips (220500) give 690;
- periodic Hann window (`mlx_clap.dsp`), reflect padding of 512 on each side, power spectrum, `melW`
  matmul, `10*log10(max(mel, 1e-10))` with ref 1 and no top_db (docs/numerics.md §1.3, §2.1).
"""

from __future__ import annotations

import mlx.core as mx

from mlx_clap.dsp import periodic_hann, stft_log_mel

N_FFT = 1024
HOP = 320


def log_mel(waveforms: mx.array, mel_w: mx.array, hop: int = HOP, n_fft: int = N_FFT) -> mx.array:
    """(B, N) float32 waveforms -> (B, T, n_mels) log-mel in dB, T = 1 + N // hop, torchlibrosa semantics."""
    if waveforms.ndim != 2:
        raise ValueError(f"log_mel wants (batch, samples), got shape {waveforms.shape}")
    x = waveforms.astype(mx.float32)
    pad = n_fft // 2
    if x.shape[1] <= pad:
        raise ValueError(f"log_mel: {x.shape[1]} samples is too short for reflect padding of {pad}")
    x = mx.pad(x, [(0, 0), (pad, pad)], mode="reflect")
    return stft_log_mel(x, mx.array(periodic_hann(n_fft)), mel_w.astype(mx.float32), hop)
