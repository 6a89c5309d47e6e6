"""Perception Encoder Audio (PE-A): the DAC-style codec encoder, the RoPE audio transformer, the
ModernBERT text tower and the sigmoid-scored contrastive heads (transformers `PeAudioModel`,
`PeAudioFrameLevelModel`)."""

from mlx_clap.models.pe_audio.config import PeAudioConfig, UnsupportedCheckpoint
from mlx_clap.models.pe_audio.model import PeAudioModel, UnsupportedPeCheckpoint, is_pe_folder

__all__ = [
    "PeAudioConfig",
    "PeAudioModel",
    "UnsupportedCheckpoint",
    "UnsupportedPeCheckpoint",
    "is_pe_folder",
]
