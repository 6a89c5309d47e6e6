"""CPU multi-core paths: `cpu_parallel.map_blocks`, the blocked mel frontend and `embed_audio_inputs`.

The parallel paths must give the serial numbers (the frontend bit for bit, the tower within float32
rounding, since BLAS blocks a 2-clip product differently from an 8-clip one), keep the golden
transformers parity, and leave the process able to exit cleanly. Parallel blocks run OpenBLAS on one
thread, and OpenBLAS rounds a product differently with one thread than with two, so the serial side of
an exact comparison runs under `blas_threads(1)` as well.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_clap.ops import blas
from mlx_clap.ops import parallel as cpu_parallel
from mlx_clap.preprocess.features import ClapFeatureExtractor, log_mel

GOLDEN = Path(__file__).resolve().parent / "golden" / "tiny-unfused"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def threads(monkeypatch):
    def set_threads(n: int) -> None:
        monkeypatch.setenv(cpu_parallel.THREADS_VAR, str(n))

    return set_threads


def test_worker_count_reads_the_environment(threads, monkeypatch):
    threads(3)
    assert cpu_parallel.worker_count() == 3
    threads(0)
    assert cpu_parallel.worker_count() == 1
    monkeypatch.setenv(cpu_parallel.THREADS_VAR, "many")
    with pytest.raises(ValueError, match="MLX_CLAP_CPU_THREADS"):
        cpu_parallel.worker_count()


def test_map_blocks_keeps_order_and_runs_on_workers(threads):
    threads(2)
    names: list[str] = []

    def block(i: int) -> mx.array:
        import threading

        names.append(threading.current_thread().name)
        return mx.full((3,), float(i)) * 2

    out = cpu_parallel.map_blocks(block, list(range(7)))
    assert [float(o[0]) for o in out] == [2.0 * i for i in range(7)]
    assert all(name.startswith("mlx-clap-cpu") for name in names)


def test_map_blocks_raises_a_block_error_after_all_blocks_finish(threads):
    threads(2)
    finished: list[int] = []

    def block(i: int) -> mx.array:
        if i == 1:
            raise RuntimeError("block 1 failed")
        finished.append(i)
        return mx.array([i])

    with pytest.raises(RuntimeError, match="block 1 failed"):
        cpu_parallel.map_blocks(block, [0, 1, 2, 3])
    assert sorted(finished) == [0, 2, 3]


def test_map_blocks_restores_the_blas_thread_count(threads):
    before = blas.get_num_threads()
    if before is None:
        pytest.skip("no OpenBLAS active (MLX_CLAP_BLAS=off or no library): nothing to restore")
    threads(2)
    seen: list[int | None] = []

    def block(i: int) -> mx.array:
        seen.append(blas.get_num_threads())
        a = mx.ones((64, 64))
        return a @ a

    cpu_parallel.map_blocks(block, [0, 1, 2])
    assert set(seen) == {1}, "OpenBLAS must run single-threaded inside parallel blocks"
    assert blas.get_num_threads() == before


def test_blocked_frontend_equals_one_clip_at_a_time(threads):
    rng = np.random.default_rng(0)
    waves = [(0.1 * rng.standard_normal(480000)).astype(np.float32) for _ in range(5)]
    with cpu_parallel.blas_threads(1):
        one_by_one = np.concatenate([np.array(log_mel(w)) for w in waves])
        threads(1)
        serial = np.array(log_mel(np.stack(waves)))
    threads(2)
    parallel = np.array(log_mel(np.stack(waves)))
    from_list = np.array(log_mel(waves))
    np.testing.assert_array_equal(parallel, one_by_one)
    np.testing.assert_array_equal(from_list, one_by_one)
    np.testing.assert_array_equal(serial, one_by_one)


def test_long_row_frame_blocks_equal_the_serial_blocks_and_the_unblocked_stft(threads):
    # 40 s = 4001 frames: four frame blocks on the CPU, run on two workers.
    rng = np.random.default_rng(1)
    wave = (0.1 * rng.standard_normal(40 * 48000)).astype(np.float32)
    threads(2)
    blocked = np.array(log_mel(wave))
    threads(1)
    with cpu_parallel.blas_threads(1):
        serial = np.array(log_mel(wave))
    np.testing.assert_array_equal(blocked, serial)
    # One 4001-frame STFT: pocketfft vectorizes rows in groups, so a row's rounding depends on where it
    # sits in the batch; the blocks agree with it to float32 rounding (a few ulp of the dB values).
    with mx.stream(mx.cpu), cpu_parallel.blas_threads(1):
        from mlx_clap.preprocess import features

        frontend = features.MelFrontend(features.FeatureConfig())
        fb, core = frontend._mx_filterbank("slaney")
        whole = np.array(core(frontend._padded(wave[None], 0, 1), frontend.window, fb))
    np.testing.assert_allclose(blocked, whole, rtol=1e-6, atol=1e-5)


def test_extractor_accepts_mx_input_under_the_parallel_path(threads):
    threads(2)
    rng = np.random.default_rng(2)
    batch = (0.1 * rng.standard_normal((3, 480000))).astype(np.float32)
    lazy = mx.array(batch) * 1.0  # an unevaluated graph on this thread's stream
    np.testing.assert_array_equal(np.array(log_mel(lazy)), np.array(log_mel(batch)))


def _golden_batch() -> tuple[object, mx.array, np.ndarray]:
    from mlx_clap.io.folder import load_model

    ref = np.load(GOLDEN / "reference.npz")
    model = load_model(GOLDEN)  # lazily loaded weights: embed_audio_inputs must evaluate them first
    feats = ref["input_features"].astype(np.float32)
    rng = np.random.default_rng(3)
    extra = (rng.standard_normal((3,) + feats.shape[1:]) * 20 - 40).astype(np.float32)
    return model, mx.array(np.concatenate([feats, extra])), ref["audio_embeds"]


def test_audio_embeddings_match_the_batched_tower_and_the_reference(threads):
    threads(2)
    model, feats, ref_embeds = _golden_batch()
    parallel = np.array(model.embed_audio_inputs(feats))
    batched = np.array(model.get_audio_features(feats))
    assert parallel.shape == batched.shape == (5, ref_embeds.shape[1])
    np.testing.assert_allclose(parallel, batched, rtol=0, atol=1e-6)
    from_numpy = np.array(model.embed_audio_inputs(np.array(feats)))
    np.testing.assert_allclose(from_numpy, parallel, rtol=0, atol=1e-6)
    # The first two rows are the golden clips: transformers' numbers (tests/golden/make_golden.py).
    np.testing.assert_allclose(parallel[:2], ref_embeds, rtol=0, atol=1e-5)


def test_audio_embeddings_with_one_thread_is_the_batched_call(threads):
    threads(1)
    model, feats, _ = _golden_batch()
    np.testing.assert_array_equal(
        np.array(model.embed_audio_inputs(feats)), np.array(model.get_audio_features(feats))
    )


def test_process_exits_cleanly_after_parallel_compiled_work():
    # Workers that ran mx.compile'd kernels abort the interpreter if they exit (MLX 0.32); the pool's
    # daemon workers never do. Run the frontend and the tower in parallel, then exit normally.
    script = textwrap.dedent(
        f"""
        import numpy as np, mlx.core as mx
        from mlx_clap.preprocess.features import ClapFeatureExtractor
        from mlx_clap.io.folder import load_model
        fx = ClapFeatureExtractor()
        waves = [np.random.default_rng(i).standard_normal(480000).astype(np.float32) * 0.1 for i in range(4)]
        feats, _ = fx(waves, sampling_rate=48000)
        model = load_model({str(GOLDEN)!r})
        print(model.embed_audio_inputs(feats).shape)
        """
    )
    env = {"MLX_CLAP_CPU_THREADS": "2", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert "(4, " in proc.stdout


def test_extractor_output_is_independent_of_the_thread_count(threads):
    rng = np.random.default_rng(4)
    waves = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (48000, 480000, 700000, 200000)]
    fx = ClapFeatureExtractor()
    threads(1)
    with cpu_parallel.blas_threads(1):
        serial = np.array(fx(waves, sampling_rate=48000, rng=np.random.RandomState(0))[0])
    threads(2)
    parallel = np.array(fx(waves, sampling_rate=48000, rng=np.random.RandomState(0))[0])
    np.testing.assert_array_equal(parallel, serial)


@pytest.mark.parametrize("version", ["2023", "2022"])
def test_msclap_embed_inputs_match_the_batched_tower(version, threads):
    from test_msclap_api import tiny_config

    from mlx_clap.preprocess.msclap_frontend import slaney_mel_filterbank
    from mlx_clap.models.msclap.model import MsClapModel

    cfg = tiny_config(version)
    mx.random.seed(5)
    model = MsClapModel(cfg)  # random init: lazy arrays the workers could not run themselves
    model.audio_encoder.base.logmel_extractor.melW = mx.array(
        slaney_mel_filterbank(cfg.mel_sampling_rate, 1024, 64, cfg.fmin, cfg.fmax)
    )
    rng = np.random.default_rng(6)
    clips = mx.array((0.1 * rng.standard_normal((3, cfg.clip_samples))).astype(np.float32))
    threads(2)
    parallel = np.array(model.embed_audio_inputs(clips))
    batched = np.array(model.get_audio_features(clips))
    np.testing.assert_allclose(parallel, batched, rtol=0, atol=1e-6)
    threads(1)
    np.testing.assert_array_equal(np.array(model.embed_audio_inputs(clips)), batched)


def test_text_inputs_in_blocks_match_the_batched_tower(threads):
    from mlx_clap.models.clap import CPU_TEXTS_PER_BLOCK
    from mlx_clap.io.folder import load_model

    model = load_model(GOLDEN)
    vocab = model.config.text_config.vocab_size
    rng = np.random.default_rng(7)
    batch = 2 * CPU_TEXTS_PER_BLOCK + 5  # three blocks
    ids = rng.integers(3, vocab, (batch, 12)).astype(np.int32)
    ids[:, 0] = 0
    mask = np.ones_like(ids)
    mask[::3, 9:] = 0  # some padded rows
    threads(2)
    blocks = np.array(model.embed_text_inputs(mx.array(ids), mx.array(mask)))
    batched = np.array(model.get_text_features(mx.array(ids), mx.array(mask)))
    np.testing.assert_allclose(blocks, batched, rtol=0, atol=1e-6)


def test_nested_map_blocks_run_in_place(threads):
    threads(2)

    def inner(i: int) -> mx.array:
        return mx.array([i])

    def outer(i: int) -> mx.array:
        parts = cpu_parallel.map_blocks(inner, [10 * i, 10 * i + 1, 10 * i + 2])
        return mx.concatenate(parts)

    out = cpu_parallel.map_blocks(outer, [0, 1, 2, 3])
    assert [np.array(o).tolist() for o in out] == [[10 * i, 10 * i + 1, 10 * i + 2] for i in range(4)]


def test_log_mel_list_input_errors():
    with pytest.raises(ValueError, match="equal-length 1-D"):
        log_mel([])
    with pytest.raises(ValueError, match="equal-length 1-D"):
        log_mel([np.zeros(1000, np.float32), np.zeros(1200, np.float32)])


def test_threads_option_rejects_zero():
    from click.testing import CliRunner

    from mlx_clap.cli import main

    r = CliRunner().invoke(main, ["--threads", "0", "info"])
    assert r.exit_code == 2 and "--threads" in r.output
