"""PE-Audio's input side: raw 48-kHz samples, reflect-padded to whole frames, batched with their lengths.

transformers' `PeAudioFeatureExtractor` reflect-pads each clip to a multiple of the hop (1920 samples =
40 ms; `np.pad(wave, (0, hop - n % hop), "reflect")`, the edge sample not repeated), then zero-pads the
batch to its longest clip with a sample mask. The model takes the same layout here, with `lengths`
(valid samples per row) in place of the mask; the model masks past them, so a clip's vector does not
depend on the batch (see models/pe_audio/dac.py).

A clip shorter than one frame is refused: transformers would reflect it into a frame that is mostly its
own mirror image, and the one vector it gives says little about the clip.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mlx_clap.preprocess.features import AudioInputError, check_waveform


def frame_count(n: int, hop: int) -> int:
    """Frames the model gives for `n` samples (the clip reflect-padded to whole frames)."""
    return -(-n // hop)


def prepare_waveform(wave: Any, index: int, hop: int, sampling_rate: int) -> np.ndarray:
    """One mono float32 clip, checked (AudioInputError naming item `index`), reflect-padded to whole
    frames."""
    x = check_waveform(wave, index)
    check_frame_length(x.shape[0], index, hop, sampling_rate)
    return reflect_pad(x, hop)


def check_frame_length(n: int, index: int, hop: int, sampling_rate: int) -> None:
    """AudioInputError naming item `index` when `n` samples are less than one frame."""
    if n < hop:
        raise AudioInputError(
            f"audio item {index}: {n} samples is shorter than one PE-Audio frame ({hop} samples, "
            f"{1000 * hop / sampling_rate:g} ms at {sampling_rate} Hz)"
        )


def reflect_pad(x: np.ndarray, hop: int) -> np.ndarray:
    """`x` reflect-padded at the end to a multiple of `hop` (as PeAudioFeatureExtractor._reflect_pad)."""
    rest = x.shape[0] % hop
    return x if rest == 0 else np.pad(x, (0, hop - rest), mode="reflect")


def batch_waveforms(waves: list[np.ndarray], hop: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_values (B, N) float32, lengths (B,) int32) for clips already padded to whole frames.

    Rows are zero-padded to the longest clip; `lengths` are each row's own samples.
    """
    if not waves:
        raise ValueError("no clips to batch")
    lengths = np.array([w.shape[0] for w in waves], dtype=np.int32)
    if np.any(lengths % hop) or np.any(lengths == 0):
        raise ValueError(f"clips must be whole frames of {hop} samples (use prepare_waveform); got {lengths}")
    out = np.zeros((len(waves), int(lengths.max())), dtype=np.float32)
    for row, w in enumerate(waves):
        out[row, : w.shape[0]] = w
    return out, lengths


__all__ = ["batch_waveforms", "check_frame_length", "frame_count", "prepare_waveform", "reflect_pad"]
