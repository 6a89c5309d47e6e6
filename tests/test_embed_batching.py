"""`ClapModel.embed_waveforms` batching: clips of any length in one call give each clip's own embedding.

Clips up to `batch_size` windows share model calls with their neighbours; longer ones stream through
`embed_windows`. Either way a clip's vector is the renormalized mean of its windows' unit embeddings,
computed here one clip at a time with the lazy `get_audio_features` as the reference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

GOLDEN = Path(__file__).resolve().parent / "golden" / "tiny-unfused"
SR = 48000


@pytest.fixture(scope="module")
def model():
    from mlx_clap.loading import load as load_model

    return load_model(GOLDEN)


def one_clip(model, wave: np.ndarray) -> np.ndarray:
    feats, longer, _ = model.feature_extractor.extract_for_embedding([wave])
    rows = np.array(model.get_audio_features(feats, longer)).astype(np.float64)
    mean = rows.mean(axis=0)
    return (mean / np.linalg.norm(mean)).astype(np.float32)


def clip(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    return (0.1 * rng.standard_normal(t.size) + 0.2 * np.sin(2 * np.pi * (300 + 50 * seed) * t)).astype(
        np.float32
    )


def test_mixed_lengths_in_one_call_equal_each_clip_alone(model):
    # batch_size 3: the 12-s and 25-s clips (2 and 3 windows) are batched with the short ones, the
    # 47-s clip (5 windows) streams through embed_windows.
    waves = [clip(5, 0), clip(25, 1), clip(3.5, 2), clip(47, 3), clip(12, 4), clip(10, 5)]
    got = model.embed_waveforms(waves, batch_size=3)
    for i, wave in enumerate(waves):
        np.testing.assert_allclose(got[i], one_clip(model, wave), rtol=0, atol=2e-6, err_msg=f"clip {i}")


def test_streamed_blocks_equal_the_batched_path(model):
    wave = clip(25, 6)
    blocks = [wave[i : i + 70001] for i in range(0, wave.size, 70001)]
    streamed = model.embed_windows(iter(blocks), batch_size=2)
    batched = model.embed_waveforms([wave], batch_size=8)[0]
    np.testing.assert_allclose(streamed, batched, rtol=0, atol=2e-6)


def test_unit_norm_and_order_kept(model):
    waves = [clip(s, k) for k, s in enumerate((30, 2, 11, 4))]
    got = model.embed_waveforms(waves, batch_size=2)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    alone = np.stack([model.embed_waveforms([w], batch_size=2)[0] for w in waves])
    np.testing.assert_allclose(got, alone, rtol=0, atol=2e-6)
