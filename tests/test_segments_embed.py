"""Per-window ("segment") embeddings for time-resolved search: `segment_windows` and `embed_segments`.

Covers: which windows are cut (starts and set flags) for hops that divide the window and hops that do
not, short clips, exact multiples; blocks of any size give the same windows as one block; bounded memory
on a long stream; on tiny random models (LAION and msclap), segment vectors equal each window embedded
alone and the file vector equals `embed_windows`; a planted sine burst is found by its segments.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from fixtures import TINY_AUDIO, TINY_TEXT

from mlx_clap.preprocess.windows import segment_windows, sliding_windows

SR = 48000
WINDOW = 480000  # LAION: 10 s at 48 kHz


# ------------------------------------------------------------------------------------------ helpers
def expected_windows(n: int, length: int, hop: int) -> list[tuple[int, bool, bool]]:
    """(start, is_segment, is_mean) written straight from the definition, knowing n up front."""
    if n == 0:
        return []
    if n <= length:
        return [(0, True, True)]
    segments = {k * hop for k in range((n - length) // hop + 1)} | {n - length}
    means = {k * length for k in range((n - length) // length + 1)}
    if n % length:
        means.add(n - length)
    return [(s, s in segments, s in means) for s in sorted(segments | means)]


def split(x: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    """`x` cut into consecutive blocks whose sizes cycle through `sizes` (zeros give empty blocks)."""
    blocks, i, k = [], 0, 0
    while i < x.size:
        size = sizes[k % len(sizes)]
        blocks.append(x[i : i + size])
        i += size
        k += 1
    return blocks


def ramp(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.float32)  # every sample is its own index: a window shows where it came from


# ---------------------------------------------------------------------------------- which windows
@pytest.mark.parametrize(
    ("n", "hop", "want"),
    [
        # hop 4 does not divide 10: segments 0 4 8 12 and the end-aligned 15; means 0 10 and 15.
        (25, 4, [(0, True, True), (4, True, False), (8, True, False), (10, False, True), (12, True, False),
                 (15, True, True)]),
        # hop 5 divides 10: the means are segments; the end window at 10 is a regular start of both.
        (20, 5, [(0, True, True), (5, True, False), (10, True, True)]),
        # hop 5, remainder: segments 0 5 10 and end 13; means 0 and end 13.
        (23, 5, [(0, True, True), (5, True, False), (10, True, True), (13, True, True)]),
        # a hop longer than the window leaves gaps between segments; the means still cover everything.
        (40, 15, [(0, True, True), (10, False, True), (15, True, False), (20, False, True),
                  (30, True, True)]),
        (10, 3, [(0, True, True)]),  # exactly one window
        (7, 3, [(0, True, True)]),  # shorter than one window: itself, unpadded
        (11, 3, [(0, True, True), (1, True, True)]),
    ],
)  # fmt: skip
def test_starts_and_flags_for_hand_worked_cases(n, hop, want):
    got = [(s, seg, mean) for s, _, seg, mean in segment_windows([ramp(n)], 10, hop)]
    assert got == want
    assert got == expected_windows(n, 10, hop)


@pytest.mark.parametrize("hop", [1, 2, 3, 5, 7, 10, 12, 25])
def test_windows_match_the_definition_and_sliding_windows_for_many_lengths(hop):
    length = 10
    for n in [0, 1, 9, 10, 11, 19, 20, 21, 29, 30, 31, 47, 50, 99, 100]:
        x = ramp(n)
        out = list(segment_windows([x], length, hop))
        assert [(s, seg, mean) for s, _, seg, mean in out] == expected_windows(n, length, hop), n
        for s, w, _, _ in out:
            assert w.dtype == np.float32
            np.testing.assert_array_equal(w, x[s : s + length])
        # The mean set is exactly what sliding_windows cuts, sample for sample, in the same order.
        means = [w for _, w, _, is_mean in out if is_mean]
        reference = list(sliding_windows([x], length))
        assert len(means) == len(reference), n
        for a, b in zip(means, reference, strict=True):
            np.testing.assert_array_equal(a, b)


def test_any_block_sizes_give_the_windows_of_one_block():
    rng = np.random.default_rng(0)
    length, hop = 100, 30
    for n in [0, 1, 57, 100, 101, 300, 333, 1000, 1013]:
        x = rng.standard_normal(n).astype(np.float32)
        whole = list(segment_windows([x], length, hop))
        for sizes in ([1], [7, 0, 13], [99], [100], [101, 3], [250], [5000]):
            streamed = list(segment_windows(iter(split(x, sizes)), length, hop))
            assert [(s, a, b) for s, _, a, b in streamed] == [(s, a, b) for s, _, a, b in whole], (n, sizes)
            for (_, w1, _, _), (_, w2, _, _) in zip(streamed, whole, strict=True):
                np.testing.assert_array_equal(w1, w2)


def test_empty_blocks_only_yield_nothing_and_bad_sizes_are_refused():
    assert list(segment_windows([], 10, 3)) == []
    assert list(segment_windows([np.zeros(0), np.zeros(0)], 10, 3)) == []
    for length, hop in [(0, 3), (10, 0), (10, -1)]:
        with pytest.raises(ValueError, match="length and hop must be >= 1"):
            list(segment_windows([ramp(20)], length, hop))


# --------------------------------------------------------------------------------- bounded memory
def counted_blocks(n_blocks: int, size: int, consumed: list[int]):
    """Fresh random blocks, made on demand; `consumed[0]` is how many samples have been handed out."""
    rng = np.random.default_rng(1)
    for _ in range(n_blocks):
        consumed[0] += size
        yield rng.standard_normal(size).astype(np.float32)


def test_windows_come_out_while_the_stream_is_read():
    length, hop, size, n_blocks = 4000, 1500, 777, 300
    consumed = [0]
    out = []
    for start, window, _, _ in segment_windows(counted_blocks(n_blocks, size, consumed), length, hop):
        out.append((start, consumed[0]))
        assert window.size == length
    n = n_blocks * size
    assert out[-1][0] == n - length
    # Every window but the end-aligned one is cut by the block that first reaches past its end.
    for start, seen in out[:-1]:
        assert start + length < seen <= start + length + size, start


def test_memory_stays_bounded_on_a_long_stream():
    length, hop, size, n_blocks = 4000, 1500, 777, 600  # a 1.9 MB stream, held in pieces of ~25 kB
    consumed = [0]
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        count = sum(1 for _ in segment_windows(counted_blocks(n_blocks, size, consumed), length, hop))
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert count > (n_blocks * size - length) // hop
    stream_bytes = n_blocks * size * 4
    bound = 8 * (length + hop + size) * 4
    assert bound < stream_bytes / 8  # the bound is far below holding the stream
    assert peak < bound, f"peak {peak} bytes over {bound} for a {stream_bytes}-byte stream"


# ---------------------------------------------------------------------------------- the tiny model
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    import mlx.core as mx

    from mlx_clap.config import ClapAudioConfig, ClapConfig, ClapTextConfig
    from mlx_clap.io.folder import save_converted
    from mlx_clap.models.clap import ClapModel

    folder = tmp_path_factory.mktemp("tiny_model")
    mx.random.seed(0)
    model = ClapModel(
        ClapConfig(
            audio_config=ClapAudioConfig.from_dict(TINY_AUDIO),
            text_config=ClapTextConfig.from_dict(TINY_TEXT),
        )
    )
    save_converted(model, folder)
    try:
        from fixtures import train_bpe_files

        train_bpe_files(folder)
    except ImportError:
        pass
    return folder


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    import mlx_clap

    return mlx_clap.load(tiny_model_dir)


def noise(seconds: float, seed: int, sr: int = SR) -> np.ndarray:
    """Noise plus a tone that steps up every second, so windows at different starts embed differently."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    tone = np.sin(2 * np.pi * (200 + 40 * seed + 150 * np.floor(t)) * t)
    return (0.1 * rng.standard_normal(t.size) + 0.3 * tone).astype(np.float32)


def check_against_alone(model, x: np.ndarray, got, hop_seconds: float) -> None:
    """Segment rows equal each window embedded alone; the file vector equals `embed_windows`."""
    length = model.family.clip_samples
    sr = model.family.sampling_rate
    hop = round(hop_seconds * sr)
    want = [s for s, seg, _ in expected_windows(x.size, length, hop) if seg]
    np.testing.assert_array_equal(got.starts, np.array(want) / sr)
    np.testing.assert_array_equal(got.ends, np.minimum(np.array(want) + length, x.size) / sr)
    assert got.starts.dtype == got.ends.dtype == np.float64
    assert got.vectors.dtype == got.file_vector.dtype == np.float32
    assert got.vectors.shape == (len(want), model.embedding_dim)
    np.testing.assert_allclose(np.linalg.norm(got.vectors, axis=1), 1.0, atol=1e-5)
    alone = model.embed_waveforms([x[s : s + length] for s in want], batch_size=1)
    np.testing.assert_allclose(got.vectors, alone, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got.file_vector, model.embed_windows([x]), rtol=0, atol=1e-5)


def count_clips(monkeypatch, model) -> list[int]:
    """Wrap the family's `window_inputs` so each model call's clip count is recorded."""
    calls: list[int] = []
    real = model.family.window_inputs

    def counting(clips):
        calls.append(len(clips))
        return real(clips)

    monkeypatch.setattr(model.family, "window_inputs", counting)
    return calls


def test_hop_not_dividing_the_window_embeds_the_mean_only_windows_too(tiny_model, monkeypatch):
    x = noise(23, seed=1)  # segments 0 4 8 12 13 s; means 0 10 13 s: window 10 s is mean-only
    calls = count_clips(monkeypatch, tiny_model)
    got = tiny_model.embed_segments(split(x, [70001, 3]), hop_seconds=4.0, batch_size=4)
    assert calls == [4, 2]  # six windows, each once, in batches of 4
    monkeypatch.undo()
    check_against_alone(tiny_model, x, got, 4.0)


def test_hop_dividing_the_window_costs_no_extra_model_calls(tiny_model, monkeypatch):
    x = noise(23, seed=2)  # segments every 2 s to 12 s, and 13 s: the means 0, 10, 13 s are among them
    calls = count_clips(monkeypatch, tiny_model)
    got = tiny_model.embed_segments(iter(split(x, [SR * 3])), batch_size=3)  # the default hop, 2 s
    assert sum(calls) == len(got.starts) == 8
    monkeypatch.undo()
    check_against_alone(tiny_model, x, got, 2.0)


def test_a_clip_shorter_than_a_window_is_one_segment(tiny_model):
    x = noise(3.5, seed=3)
    got = tiny_model.embed_segments([x[:50000], x[50000:]], hop_seconds=1.0)
    assert got.starts.tolist() == [0.0] and got.ends.tolist() == [x.size / SR]
    check_against_alone(tiny_model, x, got, 1.0)
    np.testing.assert_allclose(got.vectors[0], got.file_vector, atol=1e-6)


def test_bad_calls_are_refused(tiny_model):
    with pytest.raises(ValueError, match=r"audio is empty \(0 samples\)"):
        tiny_model.embed_segments([np.zeros(0, np.float32)])
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="hop_seconds must be a positive"):
            tiny_model.embed_segments([noise(1, 0)], hop_seconds=bad)
    with pytest.raises(ValueError, match="under one sample"):
        tiny_model.embed_segments([noise(1, 0)], hop_seconds=1e-6)
    with pytest.raises(ValueError, match="batch_size"):
        tiny_model.embed_segments([noise(1, 0)], batch_size=0)
    with pytest.raises(TypeError, match="unknown option"):
        tiny_model.embed_segments([noise(1, 0)], stereo="mean")


def test_a_planted_burst_is_found_by_its_segments(tiny_model):
    # A loud 1 kHz tone one window long, 21 s into 40 s of quiet noise (off the 2-s hop grid). The
    # segments that overlap it most must score highest against the tone's own embedding.
    rng = np.random.default_rng(4)
    x = (0.05 * rng.standard_normal(40 * SR)).astype(np.float32)
    t = np.arange(WINDOW) / SR
    burst = (0.8 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    offset = 21.0
    x[int(offset * SR) : int(offset * SR) + WINDOW] += burst
    got = tiny_model.embed_segments(split(x, [100003]), hop_seconds=2.0)
    scores = got.vectors @ tiny_model.embed_waveforms([burst])[0]
    best = int(np.argmax(scores))
    assert abs(got.starts[best] - offset) <= 2.0, (got.starts[best], scores.round(4).tolist())
    apart = (got.ends <= offset) | (got.starts >= offset + WINDOW / SR)
    assert apart.any() and scores[best] > scores[apart].max()


# ---------------------------------------------------------------------------------- msclap family
def test_msclap_segments_use_the_same_protocol():
    import mlx.core as mx

    from mlx_clap.config import ClapAudioConfig
    from mlx_clap.dsp import slaney_mel_filterbank
    from mlx_clap.models.msclap.config import GPT2TextConfig, MsClapConfig
    from mlx_clap.models.msclap.model import MsClapModel
    from mlx_clap.pipeline import embedder_for

    # The 2023 layout (HTSAT audio): a tiny random Cnn14 (2022) gives nearly the same vector for any input,
    # which would hide a wrong file vector.
    cfg = MsClapConfig.for_version("2023")
    cfg.d_proj = 16
    cfg.transformer_embed_dim = 32
    cfg.gpt2 = GPT2TextConfig(vocab_size=1300, n_positions=256, n_embd=32, n_layer=2, n_head=2)
    cfg.htsat = ClapAudioConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in TINY_AUDIO.items()})
    cfg.out_emb = cfg.htsat.hidden_size
    mx.random.seed(2023)
    net = MsClapModel(cfg)
    net.audio_encoder.base.logmel_extractor.melW = mx.array(
        slaney_mel_filterbank(cfg.mel_sampling_rate, 1024, 64, cfg.fmin, cfg.fmax)
    )
    model = embedder_for(net)
    assert model.family.name == "msclap"
    sr = model.family.sampling_rate
    x = noise(
        2.5 * model.family.clip_samples / sr, seed=5, sr=sr
    )  # 17.5 s: the mean window at 7 s is no segment
    got = model.embed_segments(split(x, [sr + 1]), hop_seconds=1.5, batch_size=4)
    check_against_alone(model, x, got, 1.5)
