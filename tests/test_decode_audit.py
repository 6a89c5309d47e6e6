"""Decoding audit: soundfile failures that PyAV decodes, truncated FLAC, attributed mpg123 lines, and the
bounded "reference" crop.

- Ogg Opus that libsndfile rejects mid-stream (a page whose granule position steps back, as ffmpeg writes
  when its input's timestamps do) or reads only in part (a chained file) decodes whole through PyAV.
- A truncated FLAC decodes up to the cut (the intact file's samples) with the "decoded X s of the Y s the
  header declares" warning, as cut WAV / AIFF / MP3 do.
- libmpg123's fd-2 lines ("Illegal Audio-MPEG-Header ...", "Trying to resync...") become warnings of their
  file; none reaches stderr.
- `--long-audio reference` decodes only its random crop (`AudioStream.read_crop`): bit for bit the full
  decode's window for the same draws, in memory that does not grow with the file's length.

All audio is generated here (soundfile, PyAV).
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import tracemalloc
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import REPO_ROOT
from fixtures import encode_pyav, noise, require_encoder

from mlx_clap.preprocess.audio import AudioDecodeError, AudioStream, load_audio, probe_seconds
from mlx_clap.preprocess.decode_ahead import InputFile, decode_file, window_for

SR = 48000
WINDOW = 480000  # LAION: 10 s at 48 kHz
# libmpg123's own stderr formats: "Note: ...", "Warning: ...", "[src/libmpg123/parse.c:...] error: ...".
DECODER_LINE = re.compile(r"^(Note: |Warning: |Error: |\[src/|\[[^\]]*mpg123)")


# ------------------------------------------------------------------------------------------ helpers
def _encode_opus(path: Path, x: np.ndarray, pts_step_back_at: int | None = None) -> Path:
    """48-kHz Ogg Opus with PyAV's libopus, as ffmpeg writes it; optionally with the frame timestamps
    stepping back by one 20-ms frame at sample `pts_step_back_at` (an input with a timestamp glitch)."""
    import av

    rate, ch = 48000, x.shape[1]
    with av.open(str(path), "w", format="ogg") as out:
        st = out.add_stream("libopus", rate=rate)
        st.layout = "stereo" if ch == 2 else "mono"
        for i in range(0, len(x), 960):
            arr = np.ascontiguousarray(x[i : i + 960].reshape(1, -1))  # packed float
            frame = av.AudioFrame.from_ndarray(arr, format="flt", layout=st.layout.name)
            back = 960 if pts_step_back_at is not None and i >= pts_step_back_at else 0
            frame.sample_rate, frame.pts, frame.time_base = rate, i - back, Fraction(1, rate)
            for p in st.encode(frame):
                out.mux(p)
        for p in st.encode(None):
            out.mux(p)
    return path


def _pyav_frames(path: Path) -> int:
    import av

    with av.open(str(path)) as c:
        return sum(f.samples for f in c.decode(c.streams.audio[0]))


def _write_mp3(path: Path, x: np.ndarray, rate: int) -> Path:
    """MP3 with libsndfile's own encoder (LAME) where it has one, else PyAV's libmp3lame."""
    if "MPEG_LAYER_III" in sf.available_subtypes("MP3"):
        sf.write(path, x, rate, format="MP3", subtype="MPEG_LAYER_III")
        return path
    require_encoder("libmp3lame")
    return encode_pyav(path, x, rate, "libmp3lame", "mp3")


def _peak_bytes(fn) -> int:
    """Peak bytes traced by tracemalloc (numpy's buffers included) while `fn()` runs."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _short_warning(warnings: list[str]) -> str:
    found = [w for w in warnings if re.match(r"decoded [\d.]+ s of the [\d.]+ s the header declares", w)]
    assert len(found) == 1, warnings
    return found[0]


# ------------------------------------------------------------------------ 1. Opus soundfile rejects
@pytest.fixture(scope="module")
def opus_step_back(tmp_path_factory) -> Path:
    require_encoder("libopus")
    root = tmp_path_factory.mktemp("opus")
    path = _encode_opus(root / "step.opus", noise(48000 * 20, 1, seed=1), pts_step_back_at=48000 * 8)
    try:
        with sf.SoundFile(str(path)) as f:
            while f.read(48000).shape[0]:
                pass
    except Exception as exc:  # libsndfile: "Supported file format but file is malformed."
        assert "malformed" in str(exc), exc
    else:
        pytest.skip(f"libsndfile {sf.__libsndfile_version__} reads this Opus stream: no refusal to test")
    return path


def test_opus_soundfile_rejects_mid_stream_decodes_through_pyav(opus_step_back):
    """libsndfile gives up after a few seconds; the stream goes on with PyAV from that frame."""
    a = load_audio(opus_step_back)
    n = _pyav_frames(opus_step_back)
    assert a.samples.size == n == 48000 * 20  # all of it, not an error "decoding failed after ..."
    assert a.duration_s == pytest.approx(20.0)
    assert [w for w in a.warnings if "decoded the rest with ffmpeg" in w], a.warnings
    assert np.sqrt(np.mean(a.samples[-48000:] ** 2)) > 0.03  # the last second is the noise, not silence
    for mode in ("head", "center"):
        assert AudioStream(opus_step_back).read_window(WINDOW, mode).size == WINDOW, mode


def test_chained_ogg_opus_decodes_every_link(tmp_path):
    """libsndfile reads only a chained file's first link, silently; PyAV reads them all."""
    require_encoder("libopus")
    a = _encode_opus(tmp_path / "a.opus", noise(48000 * 3, 1, seed=2))
    b = _encode_opus(tmp_path / "b.opus", noise(48000 * 12, 1, seed=3))
    for name, parts, total in (("ab.opus", (a, b), 15), ("ba.opus", (b, a), 15)):
        chained = tmp_path / name
        chained.write_bytes(b"".join(p.read_bytes() for p in parts))
        got = load_audio(chained)
        assert got.samples.size == 48000 * total, (name, got.samples.size)
        # The progress estimate: unknown, not the first link's length (or libsndfile's 2**63 - 1 frames).
        assert probe_seconds(chained) is None


def test_neither_decoder_names_both_causes(tmp_path):
    bad = tmp_path / "bad.opus"
    bad.write_bytes(b"OggS" + bytes(range(256)) * 8)
    with pytest.raises(AudioDecodeError) as err:
        load_audio(bad)
    msg = str(err.value)
    assert msg.startswith(str(bad)) and "soundfile:" in msg and "ffmpeg:" in msg, msg


# ------------------------------------------------------------------------------ 2. truncated FLAC
@pytest.fixture(scope="module")
def flac20(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("flac")
    path = root / "full.flac"
    sf.write(path, noise(44100 * 20, seed=4), 44100, subtype="PCM_16")
    return path


CUTS = (0.4, 0.7, 0.553, 0.97)  # fractions of the file's bytes; 0.553 lands mid-frame (odd offset)


@pytest.mark.parametrize("frac", CUTS)
def test_truncated_flac_decodes_the_prefix_with_a_warning(flac20, tmp_path, frac):
    data = flac20.read_bytes()
    cut = tmp_path / f"cut{frac}.flac"
    cut.write_bytes(data[: int(len(data) * frac) + 3])
    full = load_audio(flac20, sr=44100).samples  # the source rate: no resampling, so exact samples
    a = load_audio(cut, sr=44100)
    n = a.samples.size
    assert 0.9 * frac * full.size < n < frac * full.size * 1.05, (n, full.size)
    np.testing.assert_array_equal(a.samples, full[:n])  # what is there, bit for bit
    assert _short_warning(a.warnings) == (
        f"decoded {n / 44100:.1f} s of the 20.0 s the header declares: "
        "the file may be truncated or still being written"
    )
    assert a.duration_s == pytest.approx(n / 44100)
    # At the model rate, in the modes that read to the end, and through the embed decoder (named file).
    b = load_audio(cut)
    assert b.samples.size == -(-n * 48000 // 44100)
    assert _short_warning(b.warnings) == _short_warning(a.warnings)
    s = AudioStream(cut)
    assert s.read_window(WINDOW, "center").size == min(WINDOW, b.samples.size)
    assert _short_warning(s.warnings) == _short_warning(a.warnings)
    d = decode_file(InputFile(cut, Path(cut.name)), SR, False)
    assert d.error is None and d.file.path == cut and _short_warning(d.warnings) == _short_warning(a.warnings)
    np.testing.assert_array_equal(d.samples, b.samples)
    assert load_audio(flac20).warnings == []


# ------------------------------------------------------------------------- 3. mpg123's fd-2 lines
@pytest.fixture(scope="module")
def mp3_garbage(tmp_path_factory) -> tuple[Path, Path]:
    """An MP3 and a copy with 3000 random bytes injected mid-stream (mpg123: "Illegal Audio-MPEG-Header
    ... Trying to resync ... Giving up resync")."""
    root = tmp_path_factory.mktemp("mp3")
    clean = _write_mp3(root / "clean.mp3", noise(44100 * 20, seed=5), 44100)
    data = clean.read_bytes()
    junk = np.random.default_rng(6).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    bad = root / "garbage.mp3"
    bad.write_bytes(data[: len(data) // 2] + junk + data[len(data) // 2 :])
    return clean, bad


def test_mp3_garbage_mid_stream_is_a_warning_not_stderr(mp3_garbage, capfd):
    clean, bad = mp3_garbage
    capfd.readouterr()
    a = load_audio(bad)
    s = AudioStream(bad)
    s.read_window(WINDOW, "center")
    d = decode_file(InputFile(bad, Path(bad.name)), SR, False)
    err = capfd.readouterr().err
    assert not [ln for ln in err.splitlines() if DECODER_LINE.match(ln)], err
    assert any("resync" in w for w in a.warnings), a.warnings
    assert any("resync" in w for w in s.warnings), s.warnings
    assert d.error is None and d.file.path == bad and any("resync" in w for w in d.warnings), d
    assert abs(a.samples.size - load_audio(clean).samples.size) < 0.2 * SR  # decoded past the garbage


def test_msclap_channel_read_attributes_decoder_lines(mp3_garbage, capfd):
    """msclap's stereo="concat" reads with soundfile directly: its mpg123 lines name the file too."""
    from mlx_clap.preprocess.msclap_frontend import load_channels

    _, bad = mp3_garbage
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        try:
            load_channels(bad, 44100)
            said = [str(w.message) for w in record]  # decoded: the lines are warnings naming the file
        except ValueError as exc:  # mpg123 gave up: the error names the file and what it saw
            said = [str(exc)]
    err = capfd.readouterr().err
    assert not [ln for ln in err.splitlines() if DECODER_LINE.match(ln)], err
    assert [m for m in said if m.startswith(str(bad)) and "resync" in m], said


def test_probe_seconds_prints_nothing(mp3_garbage, capfd, tmp_path):
    """The duration probe for progress bars: a cut MP3's "Xing stream size off" stays off the terminal."""
    clean, _ = mp3_garbage
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(clean.read_bytes()[: clean.stat().st_size // 3])
    capfd.readouterr()
    assert probe_seconds(cut) == pytest.approx(20.0, abs=0.1)  # the header's claim: an estimate
    assert capfd.readouterr().err == ""


def test_cli_subprocess_attributes_every_decoder_line(tiny_model_dir, mp3_garbage, flac20, tmp_path):
    """The real process's fd 2: no raw decoder line; the damaged MP3 and the cut FLAC embed, their
    warnings in their own records."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "garbage.mp3").write_bytes(mp3_garbage[1].read_bytes())
    data = flac20.read_bytes()
    (src / "cut.flac").write_bytes(data[: int(len(data) * 0.553)])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    r = subprocess.run(
        [sys.executable, "-m", "mlx_clap.cli", "embed", str(src), "--model", str(tiny_model_dir),
         "--format", "jsonl", "-q", "--workers", "2"],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert not [ln for ln in r.stderr.splitlines() if DECODER_LINE.match(ln)], r.stderr
    items = {Path(json.loads(x)["path"]).name: json.loads(x) for x in r.stdout.splitlines()}
    assert any("resync" in w for w in items["garbage.mp3"]["warnings"]), items["garbage.mp3"]
    assert any("of the 20.0 s the header declares" in w for w in items["cut.flac"]["warnings"]), items


# ------------------------------------------------------------------------ 4. the "reference" crop
@pytest.fixture(scope="module")
def crop_files(tmp_path_factory) -> dict[str, Path]:
    """Every decoder path of `read_crop`: a seek (lossless at 48 kHz), an exact count then a resampled
    stream (lossless at other rates), a counting pass (lossy, PyAV-only), clips of at most one window."""
    root = tmp_path_factory.mktemp("crop")
    out = {}
    for name, rate, seconds, ch, kw in (
        ("wav48.wav", 48000, 25.3, 2, {"subtype": "PCM_16"}),
        ("flac48.flac", 48000, 31, 1, {}),
        ("wav44.wav", 44100, 23, 2, {"subtype": "PCM_24"}),
        ("flac22.flac", 22050, 34, 1, {}),
        ("float16k.wav", 16000, 12.5, 1, {"subtype": "FLOAT"}),
        ("exact.wav", 48000, 10, 1, {}),  # exactly one window: no draw
        ("win1.wav", 48000, 10 + 1 / 48000, 1, {}),  # one sample over: one draw among two starts
        ("short.wav", 44100, 7, 2, {}),
    ):
        out[name] = root / name
        sf.write(out[name], noise(int(round(rate * seconds)), ch, seed=len(out)), rate, **kw)
    out["mp3"] = _write_mp3(root / "song.mp3", noise(44100 * 16, seed=20), 44100)
    try:
        require_encoder("libopus")
        out["opus"] = _encode_opus(root / "voice.opus", noise(48000 * 14, 1, seed=21))
        require_encoder("aac")
        out["m4a"] = encode_pyav(root / "tune.m4a", noise(44100 * 13, seed=22), 44100, "aac", "mp4")
    except pytest.skip.Exception:
        pass  # the other formats still run; the encoders' absence is reported by the tests that need them
    return out


@pytest.mark.parametrize(
    "name",
    ["wav48.wav", "flac48.flac", "wav44.wav", "flac22.flac", "float16k.wav", "exact.wav", "win1.wav",
     "short.wav", "mp3", "opus", "m4a"],
)  # fmt: skip
def test_read_crop_is_the_full_decode_window_bit_for_bit(crop_files, name):
    if name not in crop_files:
        pytest.skip(f"PyAV has no encoder for {name} here")
    path = crop_files[name]
    full = load_audio(path).samples
    n = full.size
    starts = sorted({0, 1, (n - WINDOW) // 3, n - WINDOW - 1, n - WINDOW}) if n > WINDOW else [None]
    for want in starts:
        seen: list[int] = []

        def pick(m: int, want=want, seen=seen) -> int:
            seen.append(m)
            return want

        s = AudioStream(path)
        got = s.read_crop(WINDOW, pick)
        if want is None:  # a clip of at most one window: whole, and no draw
            assert seen == [] and np.array_equal(got, full), name
        else:
            assert seen == [n], (name, seen)
            assert got.dtype == np.float32 and np.array_equal(got, full[want : want + WINDOW]), (name, want)
        assert s.n_samples == n and s.duration_s == pytest.approx(load_audio(path).duration_s)


def test_read_crop_of_truncated_flac(flac20, tmp_path):
    cut = tmp_path / "cut.flac"
    data = flac20.read_bytes()
    cut.write_bytes(data[: int(len(data) * 0.7)])
    full = load_audio(cut)
    s = AudioStream(cut)
    got = s.read_crop(WINDOW, lambda m: m - WINDOW)
    assert np.array_equal(got, full.samples[-WINDOW:])
    assert _short_warning(s.warnings) == _short_warning(full.warnings)


def test_read_crop_rejects_a_start_out_of_range(crop_files):
    with pytest.raises(ValueError, match="not a start in"):
        AudioStream(crop_files["wav48.wav"]).read_crop(WINDOW, lambda m: m - WINDOW + 1)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    import mlx_clap

    return mlx_clap.load(tiny_model_dir)


REF_FILES = ["wav44.wav", "short.wav", "flac48.flac", "win1.wav", "flac22.flac", "mp3"]


@pytest.mark.parametrize("seed", [3, None])
def test_embed_audio_reference_equals_the_decoded_arrays(tiny_model, crop_files, seed):
    """Same draws in the same order, same crops, same batches: the very same vectors."""
    paths = [crop_files[k] for k in REF_FILES]
    arrays = [load_audio(p).samples for p in paths]
    if seed is None:
        np.random.seed(11)  # numpy's global RNG, as the references draw without a seed
    want = tiny_model.embed_waveforms(arrays, long_audio="reference", seed=seed, batch_size=2)
    if seed is None:
        np.random.seed(11)
    got = tiny_model.embed_audio([str(p) for p in paths], long_audio="reference", seed=seed, batch_size=2)
    np.testing.assert_array_equal(got, want)


def test_cli_reference_window_equals_the_whole_file(tiny_model, crop_files):
    """What `embed --long-audio reference --seed 7` decodes per file with `window_for`, embedded one file
    per call as the command does, gives the vector of the whole decoded file."""
    window = window_for(tiny_model.family, "reference", 7)
    assert window is not None and window[:2] == ("reference", WINDOW)
    for name in ("wav44.wav", "flac22.flac", "short.wav"):
        p = crop_files[name]
        d = decode_file(InputFile(p, Path(name)), SR, False, window=window)
        assert d.error is None and d.samples.size == min(WINDOW, load_audio(p).samples.size)
        got = tiny_model.embed_waveforms([d.samples], long_audio="reference", seed=7)
        want = tiny_model.embed_waveforms([load_audio(p).samples], long_audio="reference", seed=7)
        np.testing.assert_array_equal(got, want)
    assert window_for(tiny_model.family, "windows-mean", 7) is None
    assert window_for(tiny_model.family, "head", None) == ("head", WINDOW)


def test_msclap_reference_crop_draws_as_its_frontend(crop_files):
    """msclap's `random.randrange(N - length)` through `reference_start` picks the crop that
    `prepare_batch(..., "reference", seed)` cuts from the decoded array."""
    from mlx_clap.pipeline.msclap import MsClapFamily
    from mlx_clap.preprocess.msclap_frontend import prepare_batch

    fam = MsClapFamily.__new__(MsClapFamily)  # the draw needs only the clip length, not a model
    fam.clip_samples = 7 * 44100
    p = crop_files["wav44.wav"]
    full = load_audio(p, 44100).samples
    for seed in (0, 1, 5):
        rng = random.Random(seed)
        crop = AudioStream(p, 44100).read_crop(
            fam.clip_samples, lambda m, rng=rng: fam.reference_start(m, rng)
        )
        clips, _ = prepare_batch([full], fam.clip_samples, "reference", seed=seed)
        np.testing.assert_array_equal(crop, clips[0])


@pytest.fixture(scope="module")
def long_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A 10- and a 40-minute 8-kHz WAV (a second written at a time): the crop is resampled, so it streams."""
    root = tmp_path_factory.mktemp("long")
    out = []
    for seconds in (600, 2400):
        path = root / f"{seconds}.wav"
        one = (0.1 * np.random.default_rng(seconds).standard_normal(8000)).astype(np.float32)
        with sf.SoundFile(str(path), "w", 8000, 1, subtype="PCM_16") as f:
            for k in range(seconds):
                f.write(np.roll(one, k * 37))
        out.append(path)
    return out[0], out[1]


def test_reference_decoder_memory_does_not_grow_with_length(long_pair):
    """The embed decoder in "reference" mode, the crop drawn at the end (the longest stream): one window
    and a block, where decoding the 40-minute file whole would be 461 MB of float32 at 48 kHz."""
    peaks = []
    for p in long_pair:
        f = InputFile(p, Path(p.name))
        d = None

        def run(f=f):
            nonlocal d
            d = decode_file(f, SR, False, window=("reference", WINDOW, lambda m: m - WINDOW))

        peaks.append(_peak_bytes(run))
        assert d.error is None and d.samples.size == WINDOW
        assert d.stream.duration_s == pytest.approx(600 if p.name == "600.wav" else 2400)
    assert peaks[1] < 1.25 * peaks[0] + (1 << 20) and peaks[1] < 32 << 20, peaks


def test_embed_audio_reference_memory_does_not_grow_with_length(tiny_model, long_pair):
    peaks = [
        _peak_bytes(lambda p=p: tiny_model.embed_audio(p, long_audio="reference", seed=1)) for p in long_pair
    ]
    assert peaks[1] < 1.25 * peaks[0] + (4 << 20) and peaks[1] < 64 << 20, peaks
