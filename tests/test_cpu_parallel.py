"""CPU multi-core paths: `cpu_parallel.map_blocks`, the blocked mel frontend and `embed_audio_inputs`.

The parallel paths must give the serial numbers (the frontend bit for bit, the tower within float32
rounding, since BLAS blocks a 2-clip product differently from an 8-clip one), keep the golden
transformers parity, and leave the process able to exit cleanly. Parallel blocks run OpenBLAS on one
thread, and OpenBLAS rounds a product differently with one thread than with two, so the serial side of
an exact comparison runs under `blas_threads(1)` as well.

With `MLX_CLAP_CPU_OPTIMIZATIONS=off` (or off the CPU) there are no worker threads: the tests of the parallel
paths skip then (fixture `fast_paths`), the ones that hold on any path still run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_clap import settings
from mlx_clap.ops import blas
from mlx_clap.ops import parallel as cpu_parallel
from mlx_clap.ops.device import cpu_fast_paths, on_cpu
from mlx_clap.pipeline import Embedder, embedder_for
from mlx_clap.preprocess.features import ClapFeatureExtractor, log_mel
from mlx_clap.settings import SettingsError

GOLDEN = Path(__file__).resolve().parent / "golden" / "tiny-unfused"
REPO = Path(__file__).resolve().parents[1]


THREADS_VAR = "MLX_CLAP_CPU_THREADS"


@pytest.fixture
def threads(monkeypatch):
    """Set MLX_CLAP_CPU_THREADS for the rest of the test (settings are parsed again on the next use)."""

    def set_threads(n: int) -> None:
        monkeypatch.setenv(THREADS_VAR, str(n))
        settings.reset()

    return set_threads


@pytest.fixture
def fast_paths():
    """Skip a test of the parallel CPU paths where they do not run (they would compare serial to serial)."""
    if not cpu_fast_paths():
        why = "MLX_CLAP_CPU_OPTIMIZATIONS=off" if on_cpu() else "the default device is not the CPU"
        pytest.skip(f"the parallel CPU paths are off here ({why})")


@pytest.fixture
def worker_runs(monkeypatch) -> list[str]:
    """Names of the threads that ran a parallel block (`map_blocks` gives each its worker stream)."""
    names: list[str] = []
    original = cpu_parallel.worker_stream

    def spy() -> mx.Stream:
        names.append(threading.current_thread().name)
        return original()

    monkeypatch.setattr(cpu_parallel, "worker_stream", spy)
    return names


def _check_workers(names: list[str], parallel: bool) -> None:
    """Blocks ran on the pool's workers when the parallel path is expected and on, else on this thread."""
    if parallel and cpu_fast_paths():
        assert names and all(n.startswith("mlx-clap-cpu") for n in names), names
    else:
        assert names == [], names
    names.clear()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def test_worker_count_reads_the_settings(threads, monkeypatch):
    monkeypatch.setenv("MLX_CLAP_CPU_OPTIMIZATIONS", "on")
    threads(3)
    assert cpu_parallel.worker_count() == 3
    monkeypatch.delenv(THREADS_VAR)
    settings.reset()
    assert cpu_parallel.worker_count() == max(1, min(_cores(), cpu_parallel.MAX_DEFAULT_WORKERS))
    # The CLI's --threads replaces the parsed settings instead of the environment.
    settings.configure(cpu_threads=5)
    assert cpu_parallel.worker_count() == 5
    # The master switch turns the workers off whatever the count.
    monkeypatch.setenv("MLX_CLAP_CPU_OPTIMIZATIONS", "off")
    threads(3)
    assert cpu_parallel.worker_count() == 1


@pytest.mark.parametrize("value", ["0", "-2", "many", "2.5"])
def test_bad_thread_count_is_a_settings_error(threads, monkeypatch, value):
    monkeypatch.setenv(THREADS_VAR, value)
    settings.reset()
    with pytest.raises(SettingsError, match="MLX_CLAP_CPU_THREADS") as caught:
        cpu_parallel.worker_count()
    assert isinstance(caught.value, ValueError)
    assert repr(value) in str(caught.value) or value in str(caught.value)


def test_map_blocks_runs_in_place_when_cpu_optimizations_are_off(threads, monkeypatch):
    monkeypatch.setenv("MLX_CLAP_CPU_OPTIMIZATIONS", "off")
    threads(2)
    names: list[str] = []
    finished: list[int] = []

    def block(i: int) -> mx.array:
        names.append(threading.current_thread().name)
        if i == 1:
            raise RuntimeError("block 1 failed")
        finished.append(i)
        return mx.array([i])

    assert [int(o[0]) for o in cpu_parallel.map_blocks(block, [0, 2, 3])] == [0, 2, 3]
    assert set(names) == {threading.current_thread().name}
    with pytest.raises(RuntimeError, match="block 1 failed"):
        cpu_parallel.map_blocks(block, [0, 1, 2, 3])
    assert finished == [0, 2, 3, 0]  # serial: the blocks after the failing one never run


def test_map_blocks_keeps_order_and_runs_on_workers(threads, fast_paths):
    threads(2)
    names: list[str] = []

    def block(i: int) -> mx.array:
        names.append(threading.current_thread().name)
        return mx.full((3,), float(i)) * 2

    out = cpu_parallel.map_blocks(block, list(range(7)))
    assert [float(o[0]) for o in out] == [2.0 * i for i in range(7)]
    assert all(name.startswith("mlx-clap-cpu") for name in names)


def test_map_blocks_raises_a_block_error_after_all_blocks_finish(threads, fast_paths):
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


def test_map_blocks_restores_the_blas_thread_count(threads, fast_paths):
    from mlx_clap.ops.setup import prepare_cpu

    info = prepare_cpu()["blas"]  # what load() does; idempotent
    if info["status"] != "active":
        s = settings.current()
        if sys.platform.startswith("linux") and s.blas == "auto" and blas._candidates("auto"):
            pytest.fail(f"an OpenBLAS is installed but prepare_cpu did not activate it: {info}")
        pytest.skip(f"no OpenBLAS active ({info['status']}: {info['reason']}): nothing to restore")
    original = blas.get_num_threads()
    before = 2 if original == 1 else original  # more than one, or holding it to 1 would change nothing
    assert blas.set_num_threads(before)
    threads(2)
    seen: list[int | None] = []
    try:

        def block(i: int) -> mx.array:
            seen.append(blas.get_num_threads())
            a = mx.ones((64, 64))
            return a @ a

        cpu_parallel.map_blocks(block, [0, 1, 2])
        assert len(seen) == 3
        assert set(seen) == {1}, "OpenBLAS must run single-threaded inside parallel blocks"
        assert blas.get_num_threads() == before
    finally:
        blas.set_num_threads(original)


def test_blocked_frontend_equals_one_clip_at_a_time(threads, fast_paths, worker_runs):
    rng = np.random.default_rng(0)
    waves = [(0.1 * rng.standard_normal(480000)).astype(np.float32) for _ in range(5)]
    with cpu_parallel.blas_threads(1):
        one_by_one = np.concatenate([np.array(log_mel(w)) for w in waves])
        threads(1)
        serial = np.array(log_mel(np.stack(waves)))
    _check_workers(worker_runs, parallel=False)
    threads(2)
    parallel = np.array(log_mel(np.stack(waves)))
    _check_workers(worker_runs, parallel=True)
    from_list = np.array(log_mel(waves))
    _check_workers(worker_runs, parallel=True)
    np.testing.assert_array_equal(parallel, one_by_one)
    np.testing.assert_array_equal(from_list, one_by_one)
    np.testing.assert_array_equal(serial, one_by_one)


def test_long_row_frame_blocks_equal_the_serial_and_the_unblocked_stft(threads, fast_paths, worker_runs):
    # 40 s = 4001 frames: four frame blocks on the CPU, run on two workers.
    rng = np.random.default_rng(1)
    wave = (0.1 * rng.standard_normal(40 * 48000)).astype(np.float32)
    threads(2)
    blocked = np.array(log_mel(wave))
    _check_workers(worker_runs, parallel=True)
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


def test_extractor_accepts_mx_input_under_the_parallel_path(threads, worker_runs):
    threads(2)
    rng = np.random.default_rng(2)
    batch = (0.1 * rng.standard_normal((3, 480000))).astype(np.float32)
    lazy = mx.array(batch) * 1.0  # an unevaluated graph on this thread's stream
    from_lazy = np.array(log_mel(lazy))
    _check_workers(worker_runs, parallel=True)
    np.testing.assert_array_equal(from_lazy, np.array(log_mel(batch)))


def _golden_batch() -> tuple[Embedder, mx.array, np.ndarray]:
    from mlx_clap.loading import load as load_model

    ref = np.load(GOLDEN / "reference.npz")
    model = load_model(GOLDEN)  # lazily loaded weights: embed_audio_inputs must evaluate them first
    assert isinstance(model, Embedder)
    feats = ref["input_features"].astype(np.float32)
    rng = np.random.default_rng(3)
    extra = (rng.standard_normal((3,) + feats.shape[1:]) * 20 - 40).astype(np.float32)
    return model, mx.array(np.concatenate([feats, extra])), ref["audio_embeds"]


def test_audio_embeddings_match_the_batched_tower_and_the_reference(threads, worker_runs):
    threads(2)
    model, feats, ref_embeds = _golden_batch()
    parallel = np.array(model.embed_audio_inputs(feats))
    _check_workers(worker_runs, parallel=True)
    batched = np.array(model.get_audio_features(feats))
    _check_workers(worker_runs, parallel=False)
    assert parallel.shape == batched.shape == (5, ref_embeds.shape[1])
    np.testing.assert_allclose(parallel, batched, rtol=0, atol=1e-6)
    from_numpy = np.array(model.embed_audio_inputs(np.array(feats)))
    np.testing.assert_allclose(from_numpy, parallel, rtol=0, atol=1e-6)
    # The first two rows are the golden clips: transformers' numbers (tests/golden/make_golden.py).
    np.testing.assert_allclose(parallel[:2], ref_embeds, rtol=0, atol=1e-5)


def test_audio_embeddings_with_one_thread_is_the_batched_call(threads, worker_runs):
    threads(1)
    model, feats, _ = _golden_batch()
    np.testing.assert_array_equal(
        np.array(model.embed_audio_inputs(feats)), np.array(model.get_audio_features(feats))
    )
    _check_workers(worker_runs, parallel=False)


def test_process_exits_cleanly_after_parallel_compiled_work():
    # Workers that ran mx.compile'd kernels abort the interpreter if they exit (MLX 0.32); the pool's
    # daemon workers never do. Run the frontend and the tower in parallel, then exit normally.
    script = textwrap.dedent(
        f"""
        import json, threading
        import numpy as np, mlx.core as mx
        mx.set_default_device(mx.cpu)
        from mlx_clap.preprocess.features import ClapFeatureExtractor
        from mlx_clap.loading import load as load_model
        from mlx_clap.ops import parallel
        fx = ClapFeatureExtractor()
        waves = [np.random.default_rng(i).standard_normal(480000).astype(np.float32) * 0.1 for i in range(4)]
        feats, _ = fx(waves, sampling_rate=48000)
        model = load_model({str(GOLDEN)!r})
        out = model.embed_audio_inputs(feats)
        workers = sorted(t.name for t in threading.enumerate() if t.name.startswith("mlx-clap-cpu"))
        print(json.dumps({{"shape": list(out.shape), "workers": workers, "count": parallel.worker_count()}}))
        """
    )
    env = {"MLX_CLAP_CPU_THREADS": "2", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["shape"][0] == 4
    # The parallel path did run (the pool's workers exist) before the interpreter exited.
    assert report["count"] == 2 and report["workers"] == ["mlx-clap-cpu-0", "mlx-clap-cpu-1"], report


def test_extractor_output_is_independent_of_the_thread_count(threads, worker_runs):
    rng = np.random.default_rng(4)
    waves = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (48000, 480000, 700000, 200000)]
    fx = ClapFeatureExtractor()
    threads(1)
    with cpu_parallel.blas_threads(1):
        serial = np.array(fx(waves, sampling_rate=48000, rng=np.random.RandomState(0))[0])
    _check_workers(worker_runs, parallel=False)
    threads(2)
    parallel = np.array(fx(waves, sampling_rate=48000, rng=np.random.RandomState(0))[0])
    _check_workers(worker_runs, parallel=True)
    np.testing.assert_array_equal(parallel, serial)


@pytest.mark.parametrize("version", ["2023", "2022"])
def test_msclap_embed_inputs_match_the_batched_tower(version, threads, worker_runs):
    from test_msclap_api import tiny_config

    from mlx_clap.dsp import slaney_mel_filterbank
    from mlx_clap.models.msclap.model import MsClapModel

    cfg = tiny_config(version)
    mx.random.seed(5)
    module = MsClapModel(cfg)  # random init: lazy arrays the workers could not run themselves
    module.audio_encoder.base.logmel_extractor.melW = mx.array(
        slaney_mel_filterbank(cfg.mel_sampling_rate, 1024, 64, cfg.fmin, cfg.fmax)
    )
    model = embedder_for(module)
    assert model.model is module
    rng = np.random.default_rng(6)
    clips = mx.array((0.1 * rng.standard_normal((3, cfg.clip_samples))).astype(np.float32))
    threads(2)
    parallel = np.array(model.embed_audio_inputs(clips))
    _check_workers(worker_runs, parallel=True)
    batched = np.array(module.get_audio_features(clips))
    np.testing.assert_allclose(parallel, batched, rtol=0, atol=1e-6)
    threads(1)
    np.testing.assert_array_equal(np.array(model.embed_audio_inputs(clips)), batched)
    _check_workers(worker_runs, parallel=False)


def test_text_inputs_in_blocks_match_the_batched_tower(threads, worker_runs):
    from mlx_clap.loading import load as load_model
    from mlx_clap.pipeline import CPU_TEXTS_PER_BLOCK

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
    _check_workers(worker_runs, parallel=True)
    batched = np.array(model.model.get_text_features(mx.array(ids), mx.array(mask)))
    np.testing.assert_allclose(blocks, batched, rtol=0, atol=1e-6)


def test_nested_map_blocks_run_in_place(threads, worker_runs):
    threads(2)
    inner_threads: list[str] = []

    def inner(i: int) -> mx.array:
        inner_threads.append(threading.current_thread().name)
        return mx.array([i])

    def outer(i: int) -> mx.array:
        parts = cpu_parallel.map_blocks(inner, [10 * i, 10 * i + 1, 10 * i + 2])
        return mx.concatenate(parts)

    out = cpu_parallel.map_blocks(outer, [0, 1, 2, 3])
    assert [np.array(o).tolist() for o in out] == [[10 * i, 10 * i + 1, 10 * i + 2] for i in range(4)]
    # Only the outer blocks went to the pool (one worker stream each); the inner ones ran where they were.
    assert len(worker_runs) == (4 if cpu_fast_paths() else 0), worker_runs
    if cpu_fast_paths():
        assert len(inner_threads) == 12 and all(n.startswith("mlx-clap-cpu") for n in inner_threads)


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
