"""`Embedder.embed_waveforms` batching: clips of any length in one call give each clip's own embedding.

The windows of all clips share model calls, `batch_size` windows at a time, whatever clip they belong
to; `embed_windows` gives the same windows from a stream of blocks. Either way a clip's vector is the
renormalized mean of its windows' unit embeddings, computed here one clip at a time with the lazy
`get_audio_features` as the reference. "reference" mode draws its crops from one random stream per call,
across batches.
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
    # batch_size 3: 1 + 3 + 1 + 5 + 2 + 1 windows, so model calls mix windows of different clips and the
    # 47-s clip's 5 windows span two calls.
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


def test_reference_mode_draws_one_stream_per_call(model):
    """Crops of "reference" mode come from one random stream for the whole call, in clip order, across
    batches: equal to featurizing all clips at once with that stream (LAION's draw order), and not
    re-seeded per batch of `batch_size` clips."""
    waves = [clip(25, 7), clip(3, 8), clip(14, 9), clip(31, 10), clip(12, 11)]
    fx = model.feature_extractor

    def embed_all(rng):
        feats, longer = fx(waves, rng=rng)
        return np.array(model.get_audio_features(feats, longer))

    got = model.embed_waveforms(waves, batch_size=2, long_audio="reference", seed=3)
    np.testing.assert_allclose(got, embed_all(np.random.RandomState(3)), rtol=0, atol=2e-6)
    np.testing.assert_array_equal(
        got, model.embed_waveforms(waves, batch_size=2, long_audio="reference", seed=3)
    )
    # The batch size does not change which crops are drawn.
    np.testing.assert_allclose(
        model.embed_waveforms(waves, batch_size=5, long_audio="reference", seed=3), got, rtol=0, atol=2e-6
    )
    # Re-seeding per batch of 2 would crop clips 2 and 3 (14 s, 31 s) with the first draws again.
    reseeded = []
    for start in range(0, len(waves), 2):
        feats, longer = fx(waves[start : start + 2], rng=np.random.RandomState(3))
        reseeded.append(np.array(model.get_audio_features(feats, longer)))
    assert np.abs(got - np.concatenate(reseeded)).max() > 1e-3
    # Without a seed: numpy's global RNG, one stream too (replayable with np.random.seed).
    np.random.seed(4)
    unseeded = model.embed_waveforms(waves, batch_size=2, long_audio="reference")
    np.random.seed(4)
    np.testing.assert_allclose(unseeded, embed_all(None), rtol=0, atol=2e-6)
