"""Streaming reads and decoder honesty: bounded memory in every long-audio mode, the same vectors as the
fully decoded arrays, warnings for truncated files, no unattributed decoder stderr, a clean Ctrl-C.

All audio is generated here (WAV / FLAC with soundfile, MP3 / M4A with PyAV when its encoder exists).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from conftest import REPO_ROOT
from fixtures import default_sigint, encode_pyav, noise, require_encoder

from mlx_clap.preprocess.audio import AudioStream, load_audio
from mlx_clap.preprocess.decode_ahead import InputFile, _BlockFeed, decode_file

SR = 48000
WINDOW = 480000  # LAION: 10 s at 48 kHz
# mpg123's own stderr formats ("Note: Trying to resync...", "[src/libmpg123/parse.c:...] error: ...").
DECODER_LINE = re.compile(r"^(Note: |Warning: |\[src/|\[[^\]]*mpg123)")


# ------------------------------------------------------------------------------------------ helpers
def _write_long_wav(path: Path, seconds: int, rate: int = 8000) -> Path:
    """A long 16-bit mono WAV written a second at a time (the test itself holds no long array)."""
    one = (0.1 * np.random.default_rng(seconds).standard_normal(rate)).astype(np.float32)
    with sf.SoundFile(str(path), "w", rate, 1, subtype="PCM_16") as f:
        for k in range(seconds):
            f.write(np.roll(one, k * 37))
    return path


def _center(x: np.ndarray, n: int) -> np.ndarray:
    if x.size <= n:
        return x
    s = (x.size - n) // 2
    return x[s : s + n]


def _peak_bytes(fn) -> int:
    """Peak bytes traced by tracemalloc (numpy's buffers included) while `fn()` runs."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Clips of every decoder path: resampled and not, short and long, and a PyAV-only container."""
    root = tmp_path_factory.mktemp("streaming")
    out = {}
    x = noise(44100 * 33, seed=1)
    sf.write(root / "long44.wav", x, 44100, subtype="PCM_16")
    out["wav44"] = root / "long44.wav"
    sf.write(root / "long48.flac", noise(48000 * 32, seed=2), 48000)
    out["flac48"] = root / "long48.flac"
    sf.write(root / "long22.flac", noise(22050 * 34, 1, seed=3), 22050)
    out["flac22"] = root / "long22.flac"
    sf.write(root / "short.wav", noise(16000 * 7, seed=4), 16000)  # under one window
    out["short"] = root / "short.wav"
    sf.write(root / "mid.wav", noise(44100 * 23, seed=5), 44100)  # 1-3 windows: decoded whole
    out["mid"] = root / "mid.wav"
    return out


@pytest.fixture(scope="module")
def mp3(tmp_path_factory) -> Path:
    require_encoder("libmp3lame")
    root = tmp_path_factory.mktemp("mp3")
    return encode_pyav(root / "long.mp3", noise(44100 * 40, seed=6), 44100, "libmp3lame", "mp3")


@pytest.fixture(scope="module")
def m4a(tmp_path_factory) -> Path:
    require_encoder("aac")
    root = tmp_path_factory.mktemp("m4a")
    return encode_pyav(root / "long.m4a", noise(48000 * 32, seed=7), 48000, "aac", "mp4")


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    import mlx_clap

    return mlx_clap.load(tiny_model_dir)


# ---------------------------------------------------------------- one window, equal to the full decode
@pytest.mark.parametrize("name", ["wav44", "flac48", "flac22", "short", "mid"])
def test_read_window_equals_cut_of_full_decode(files, name):
    path = files[name]
    full = load_audio(path).samples
    head = AudioStream(path).read_window(WINDOW, "head")
    np.testing.assert_array_equal(head, full[:WINDOW])  # a prefix of the same stream: bit-identical
    s = AudioStream(path)
    center = s.read_window(WINDOW, "center")
    want = _center(full, WINDOW)
    assert center.shape == want.shape and center.dtype == np.float32
    if sf.info(str(path)).samplerate == SR or full.size <= 3 * WINDOW:
        np.testing.assert_array_equal(center, want)  # no resampler restart: the very same samples
    else:
        # A seek restarts soxr on the full decode's output grid: equal to float rounding.
        np.testing.assert_allclose(center, want, atol=1e-6, rtol=0)
    assert s.duration_s == pytest.approx(load_audio(path).duration_s)
    assert s.warnings == []


def test_read_window_mp3_and_m4a(mp3, m4a):
    """MP3 (libsndfile, seekable) and M4A (PyAV: no trusted count, two-pass scan) give the full cut."""
    for path in (mp3, m4a):
        full = load_audio(path)
        h = AudioStream(path)
        np.testing.assert_array_equal(h.read_window(WINDOW, "head"), full.samples[:WINDOW])
        assert h.duration_s == pytest.approx(full.duration_s, abs=0.1)  # the header's, not 10 s
        s = AudioStream(path)
        center = s.read_window(WINDOW, "center")
        np.testing.assert_allclose(center, _center(full.samples, WINDOW), atol=1e-6, rtol=0)
        assert s.duration_s == pytest.approx(full.duration_s) and s.warnings == full.warnings == []
    # PyAV's path is the exact two-pass scan.
    np.testing.assert_array_equal(
        AudioStream(m4a).read_window(WINDOW, "center"), _center(load_audio(m4a).samples, WINDOW)
    )


def test_center_of_truncated_mp3_scans_twice(mp3, tmp_path):
    """The Xing header claims more frames than a cut MP3 holds: no seek is trusted, the scan is exact."""
    data = mp3.read_bytes()
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(data[: len(data) * 3 // 5])
    full = load_audio(cut)
    s = AudioStream(cut)
    np.testing.assert_array_equal(s.read_window(WINDOW, "center"), _center(full.samples, WINDOW))
    assert s.duration_s == pytest.approx(full.duration_s) and s.warnings == full.warnings
    assert any("the header declares" in w for w in s.warnings), s.warnings


# --------------------------------------------------------------------------------- bounded memory
@pytest.fixture(scope="module")
def long_pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("long")
    return _write_long_wav(root / "ten.wav", 600), _write_long_wav(root / "forty.wav", 2400)


@pytest.mark.parametrize("mode", ["head", "center"])
def test_read_window_memory_does_not_grow_with_length(long_pair, mode):
    ten, forty = (_peak_bytes(lambda p=p: AudioStream(p).read_window(WINDOW, mode)) for p in long_pair)
    # A 40-minute file decoded whole would be 461 MB of float32 at 48 kHz.
    assert forty < 1.25 * ten + (1 << 20), (ten, forty)
    assert forty < 32 << 20, forty


@pytest.mark.parametrize("mode", ["head", "center"])
def test_cli_decoder_memory_does_not_grow_with_length(long_pair, mode):
    """What `mlx-clap embed --long-audio head/center` decodes ahead of the model: one window."""
    peaks = []
    for p in long_pair:
        f = InputFile(p, Path(p.name))
        d = None

        def run(f=f):
            nonlocal d
            d = decode_file(f, SR, False, window=(mode, WINDOW))

        peaks.append(_peak_bytes(run))
        assert d.error is None and d.samples.size == WINDOW
        assert d.stream.duration_s == pytest.approx(600 if p.name == "ten.wav" else 2400)
    assert peaks[1] < 1.25 * peaks[0] + (1 << 20) and peaks[1] < 32 << 20, peaks


def test_cli_head_peak_rss_does_not_grow_with_length(tiny_model_dir, long_pair, tmp_path):
    """End to end, the process's peak RSS: `embed --long-audio head` of a 10- and a 40-minute file."""
    wrapper = (
        "import resource, sys\n"
        "from mlx_clap.cli import main\n"
        "try:\n"
        "    main(sys.argv[2:], standalone_mode=False)\n"
        "finally:\n"
        "    open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    peaks = []
    for p in long_pair:
        rss = tmp_path / f"{p.stem}.rss"
        r = subprocess.run(
            [sys.executable, "-c", wrapper, str(rss), "embed", str(p), "--model", str(tiny_model_dir),
             "--long-audio", "head", "--format", "jsonl", "-q"],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        peaks.append(int(rss.read_text()) * 1024)  # Linux: KiB
    # Decoding the 40-minute file whole would add 461 MB (float32 at 48 kHz) to the 10-minute one's 115.
    assert peaks[1] < peaks[0] + (48 << 20), peaks


@pytest.mark.parametrize("mode", ["head", "center", "windows-mean"])
def test_embed_audio_path_memory_does_not_grow_with_length(tiny_model, long_pair, mode):
    """`embed_audio(path)` (so `search --audio` and `classify`) streams in every windowed mode."""
    if mode == "windows-mean":
        # 240 windows of the model are slow on a shared CPU: a 2- and an 8-minute file show the growth.
        root = long_pair[0].parent
        pair = [_write_long_wav(root / "two.wav", 120), _write_long_wav(root / "eight.wav", 480)]
    else:
        pair = list(long_pair)
    peaks = [_peak_bytes(lambda p=p: tiny_model.embed_audio(p, long_audio=mode, batch_size=4)) for p in pair]
    assert peaks[1] < 1.25 * peaks[0] + (4 << 20) and peaks[1] < 64 << 20, peaks


# ---------------------------------------------------------------------- same vectors as the arrays
@pytest.mark.parametrize("mode", ["windows-mean", "head", "center"])
def test_embed_audio_paths_equal_decoded_arrays(tiny_model, files, mode):
    paths = [files["wav44"], files["short"], files["flac48"], files["mid"], files["flac22"]]
    arrays = [load_audio(p).samples for p in paths]
    # batch_size 2: the 32-34 s files go through embed_windows, the short ones share calls.
    got = tiny_model.embed_audio([str(p) for p in paths], long_audio=mode, batch_size=2)
    want = tiny_model.embed_waveforms(arrays, long_audio=mode, batch_size=2)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    mixed = tiny_model.embed_audio([arrays[1], paths[3], arrays[1]], long_audio=mode, batch_size=2)
    np.testing.assert_allclose(mixed, want[[1, 3, 1]], atol=2e-5, rtol=0)


def test_embed_audio_bad_array_named_by_its_place(tiny_model, files):
    with pytest.raises(ValueError, match="audio item 2"):
        tiny_model.embed_audio([files["short"], np.zeros(100, np.float32), np.array([np.nan] * 10)])


# ------------------------------------------------------------------------------ truncated files
def test_truncated_wav_warns_in_every_mode(files, tmp_path):
    """A WAV cut to a fifth (a download cut off, a recording still being written)."""
    rate, seconds = 44100, 60
    full = tmp_path / "full.wav"
    sf.write(full, noise(rate * seconds, seed=8), rate, subtype="PCM_16")
    cut = tmp_path / "cut.wav"
    data = full.read_bytes()
    cut.write_bytes(data[: 44 + (len(data) - 44) // 5])
    want = (
        "decoded 12.0 s of the 60.0 s the header declares: the file may be truncated or still being written"
    )
    a = load_audio(cut)
    assert a.warnings == [want] and a.duration_s == pytest.approx(12.0, abs=0.01)
    for mode in ("head", "center"):
        s = AudioStream(cut)
        s.read_window(WINDOW, mode)
        assert s.warnings == [want], mode
    s = AudioStream(cut)
    for _ in s:
        pass
    assert s.warnings == [want]
    assert load_audio(full).warnings == []


def test_truncated_mp3_warns(mp3, tmp_path):
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(mp3.read_bytes()[: mp3.stat().st_size // 4])
    a = load_audio(cut)
    assert a.duration_s == pytest.approx(10.0, abs=0.5)
    assert "decoded 10.0 s of the 40.0 s the header declares: the file may be truncated" in a.warnings[-1]
    assert any("Xing header declares another stream size" in w for w in a.warnings), a.warnings
    s = AudioStream(cut)  # a head read stops early: mpg123's Xing check at open still tells
    s.read_window(WINDOW, "head")
    assert any("truncated" in w for w in s.warnings), s.warnings
    assert load_audio(mp3).warnings == []


def test_mp3_resync_is_a_warning_of_the_file_not_stderr(mp3, tmp_path, capfd):
    """Bytes lost mid-stream: libmpg123 resyncs and says so on fd 2; that becomes the file's warning."""
    data = mp3.read_bytes()
    bad = tmp_path / "gap.mp3"
    bad.write_bytes(data[: len(data) // 2] + data[len(data) // 2 + 700 :])
    capfd.readouterr()
    a = load_audio(bad)
    err = capfd.readouterr().err
    assert not [ln for ln in err.splitlines() if DECODER_LINE.match(ln)], err
    assert any("resync" in w for w in a.warnings), a.warnings
    assert a.samples.size > 35 * SR


def test_decoder_capture_is_thread_safe_and_passes_other_output_on(mp3, tmp_path, capfd):
    """Decoders in threads, another thread printing: its lines arrive, no decoder line does."""
    data = mp3.read_bytes()
    paths = []
    for k in range(3):
        p = tmp_path / f"gap{k}.mp3"
        p.write_bytes(data[: len(data) // 3] + data[len(data) // 3 + 500 + 100 * k :])
        paths.append(p)
    capfd.readouterr()
    results: dict[int, list[str]] = {}
    stop = threading.Event()

    def talk() -> None:
        k = 0
        while not stop.is_set():
            os.write(2, f"other output {k}\n".encode())
            k += 1
            time.sleep(0.002)

    def work(i: int) -> None:
        results[i] = load_audio(paths[i]).warnings

    talker = threading.Thread(target=talk)
    talker.start()
    workers = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    talker.join()
    err = capfd.readouterr().err
    lines = err.splitlines()
    assert not [ln for ln in lines if DECODER_LINE.match(ln)], err
    said = [int(ln.split()[-1]) for ln in lines if ln.startswith("other output ")]
    # Nothing lost or garbled (what was written during a decoder call arrives just after it).
    assert sorted(said) == list(range(len(said))) and len(said) > 3
    assert all(any("resync" in w for w in results[i]) for i in range(3)), results


# ------------------------------------------------------------------------------------ the command
def _cli(args: list[str]):
    from mlx_clap.cli import main

    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_cli_records_truncation_warnings(tiny_model_dir, files, mp3, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    data = files["wav44"].read_bytes()
    (src / "cut.wav").write_bytes(data[: len(data) // 4])
    (src / "cut.mp3").write_bytes(mp3.read_bytes()[: mp3.stat().st_size // 4])
    (src / "whole.flac").write_bytes(files["flac48"].read_bytes())
    for mode in ("windows-mean", "head", "center"):
        r = _cli(["embed", str(src), "--model", str(tiny_model_dir), "--out", str(tmp_path / mode),
                  "--long-audio", mode, "--summary-json", "-q"])  # fmt: skip
        assert r.exit_code == 0, r.output
        summary = json.loads(r.stdout)
        warned = {Path(w["path"]).name: w["warnings"] for w in summary["warnings"]}
        assert set(warned) == {"cut.wav", "cut.mp3"}, (mode, warned)
        assert any("header declares" in w for w in warned["cut.wav"])
        assert any("truncated" in w for w in warned["cut.mp3"])
        assert not [ln for ln in r.stderr.splitlines() if DECODER_LINE.match(ln)], r.stderr
        # warnings.jsonl beside errors.jsonl lists the same files, and the summary points to it.
        log = tmp_path / mode / "warnings.jsonl"
        assert summary["warnings_file"] == str(log)
        logged = {Path(w["path"]).name: w["warnings"] for w in map(json.loads, log.read_text().splitlines())}
        assert logged == warned
    # The log describes the store now: a file replaced by a whole one leaves it.
    (src / "cut.wav").write_bytes(files["wav44"].read_bytes())
    r = _cli(["embed", str(src), "--model", str(tiny_model_dir), "--out", str(tmp_path / "head"),
              "--long-audio", "head", "-q"])  # fmt: skip
    assert r.exit_code == 0, r.output
    logged = [json.loads(x)["path"] for x in (tmp_path / "head" / "warnings.jsonl").read_text().splitlines()]
    assert [Path(p).name for p in logged] == ["cut.mp3"]


def test_cli_subprocess_prints_no_unattributed_decoder_lines(tiny_model_dir, mp3, tmp_path):
    """The real process's fd 2 (CliRunner cannot see C-level writes): only lines that name a file."""
    src = tmp_path / "in"
    src.mkdir()
    data = mp3.read_bytes()
    (src / "gap.mp3").write_bytes(data[: len(data) // 2] + data[len(data) // 2 + 700 :])
    (src / "cut.mp3").write_bytes(data[: len(data) // 4])
    (src / "dead.mp3").write_bytes(data[: len(data) // 2] + bytes(4000) + data[len(data) // 2 :])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    for mode in ("windows-mean", "center"):
        r = subprocess.run(
            [sys.executable, "-m", "mlx_clap.cli", "embed", str(src), "--model", str(tiny_model_dir),
             "--format", "jsonl", "-q", "--long-audio", mode, "--workers", "2"],
            env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert not [ln for ln in r.stderr.splitlines() if DECODER_LINE.match(ln)], r.stderr
        items = {Path(json.loads(x)["path"]).name: json.loads(x) for x in r.stdout.splitlines()}
        assert any("resync" in w for w in items["gap.mp3"]["warnings"]), items["gap.mp3"]
        assert any("truncated" in w for w in items["cut.mp3"]["warnings"])
        if "dead.mp3" not in items:  # mpg123 gives up on 4000 zero bytes: the error says what it saw
            assert r.returncode == 1 and "dead.mp3" in r.stderr and "resync" in r.stderr, r.stderr


# ------------------------------------------------------------------------------------------ Ctrl-C
def test_block_feed_cancel_releases_the_decoder_at_once():
    """cancel() returns once the decoder thread has closed its generator (file and resampler freed)."""
    closed = threading.Event()

    def blocks():
        try:
            while True:
                yield np.zeros(1000, np.float32)
        finally:
            closed.set()

    feed = _BlockFeed([], blocks(), maxsize=2)
    next(iter(feed))
    time.sleep(0.05)  # the thread now waits on a full queue
    feed.cancel()
    assert closed.is_set()


def test_cancelled_stream_leaves_nothing_for_exit_to_report(tmp_path):
    """A long file's feed cancelled (as an interrupted run does), then a normal interpreter exit: the
    decoder thread has freed its soxr resampler, so nanobind prints no "leaked instances" report."""
    long = _write_long_wav(tmp_path / "long.wav", 300, rate=44100)
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from mlx_clap.preprocess.decode_ahead import InputFile, decode_file\n"
        f"p = Path({str(long)!r})\n"
        "d = decode_file(InputFile(p, Path(p.name)), 48000, True)\n"
        "assert d.blocks is not None, d.error\n"
        "next(iter(d.blocks))\n"
        "d.blocks.cancel()\n"
        "sys.exit(0)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "leaked" not in r.stderr, r.stderr


@pytest.mark.parametrize("mode", ["windows-mean", "center"])
def test_ctrl_c_during_a_long_file_is_clean(tiny_model_dir, tmp_path, mode):
    long = _write_long_wav(tmp_path / "long.wav", 3600, rate=16000)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    files = [str(long)]
    if mode == "center":  # many long files, so the run is still going when the signal comes
        for k in range(400):
            link = tmp_path / f"l{k:02d}.wav"
            os.symlink(long, link)
            files.append(str(link))
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_clap.cli", "embed", *files, "--model", str(tiny_model_dir),
         "--out", str(tmp_path / "out"), "--long-audio", mode, "-q"],
        env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        preexec_fn=default_sigint,  # SIGINT may be ignored in a background CI run; the child must see it
    )  # fmt: skip
    data = tmp_path / "out" / "data"  # the store's Lance data files: one per batch written
    deadline = time.monotonic() + 120
    # windows-mean: the single file streams for a while; center: wait for the first rows written.
    while time.monotonic() < deadline and proc.poll() is None:
        if mode == "windows-mean" and (tmp_path / "out" / "_versions").exists():
            time.sleep(1.0)
            break
        if mode == "center" and data.is_dir() and any(data.iterdir()):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    err = err.decode("utf-8", errors="replace")
    assert proc.returncode == 130, err
    assert "interrupted" in err and "leaked" not in err and "Traceback" not in err, err
