"""PANNs Cnn14 as msclap 2022 uses it (msclap `models/audio.py`), channels-last (NHWC) in MLX.

Attribute names equal msclap's state-dict keys under `audio_encoder.base.` (`bn0`, `conv_block{1..6}`,
`fc1`), so a converted checkpoint loads by name. Convolution weights are stored OHWI (converted from
PyTorch's OIHW); BatchNorm keeps its running statistics (the module must be in eval mode).
The classification head `fc_audioset` is not used by the embeddings and is dropped at conversion.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlx_clap.models.msclap.config import Cnn14Config


def avg_pool_2x2(x: mx.array) -> mx.array:
    """F.avg_pool2d(kernel 2) on NHWC with floor mode: an odd last row/column is dropped."""
    b, h, w, c = x.shape
    h2, w2 = h // 2, w // 2
    x = x[:, : 2 * h2, : 2 * w2, :].reshape(b, h2, 2, w2, 2, c)
    return x.mean(axis=(2, 4))


class ConvBlock(nn.Module):
    """conv3x3 -> BN -> ReLU, twice (no conv bias), then optional 2x2 average pooling."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm(out_channels)
        self.bn2 = nn.BatchNorm(out_channels)

    def __call__(self, x: mx.array, pool: bool = True) -> mx.array:
        x = nn.relu(self.bn1(self.conv1(x)))
        x = nn.relu(self.bn2(self.conv2(x)))
        return avg_pool_2x2(x) if pool else x


class Cnn14(nn.Module):
    """Log-mel (B, T, 64) -> 2048-d embedding `relu(fc1(max_t + mean_t of mean_f(features)))`."""

    def __init__(self, config: Cnn14Config):
        super().__init__()
        self.config = config
        # bn0 normalizes over the 64 mel bins (msclap transposes mel to the channel axis around it).
        self.bn0 = nn.BatchNorm(config.mel_bins)
        chans = (1, *config.channels)
        for i in range(len(config.channels)):
            setattr(self, f"conv_block{i + 1}", ConvBlock(chans[i], chans[i + 1]))
        self.fc1 = nn.Linear(config.channels[-1], config.out_emb)

    def blocks(self) -> list[ConvBlock]:
        return [getattr(self, f"conv_block{i + 1}") for i in range(len(self.config.channels))]

    def __call__(self, mel: mx.array, capture: dict | None = None) -> mx.array:
        """`mel` (B, T, mel_bins); `capture` (optional) receives named intermediate stages."""
        x = self.bn0(mel)[..., None]  # (B, T, F, 1): time is height, mel is width, as in PyTorch
        if capture is not None:
            capture["bn0"] = x
        blocks = self.blocks()
        for i, block in enumerate(blocks):
            # The last block uses pool_size (1, 1): no pooling.
            x = block(x, pool=i < len(blocks) - 1)
            if capture is not None:
                capture[f"conv_block{i + 1}"] = x
        x = x.mean(axis=2)  # over frequency
        x = x.max(axis=1) + x.mean(axis=1)  # over time
        return nn.relu(self.fc1(x))
