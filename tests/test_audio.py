"""load_audio: real-world corpus, bad inputs with clear causes, librosa parity, streaming, AAC priming."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from fractions import Fraction

import numpy as np
import pytest
import soundfile as sf
import soxr
from conftest import CORPUS_DIR, REPO_ROOT

from mlx_clap.preprocess.audio import AudioDecodeError, AudioStream, load_audio, target_length

CORPUS = CORPUS_DIR / "mutagen"


def _require_corpus():
    """Skip, saying where it was looked for, when the real-world corpus is not beside the checkout."""
    if not CORPUS.exists():
        pytest.skip(
            f"real-world audio corpus folder not found: looked for {CORPUS} "
            f"(set MLX_CLAP_TEST_CORPUS to the folder holding mutagen/; default ../shared/corpus "
            f"beside the repository); generated files in test_decode_generated.py still run"
        )


# Files that hold real audio and must decode; every other file must fail with a clear cause.
MUST_DECODE = {
    "11k-1ch-2s-silence.aif": (1, 11025),
    "48k-2ch-s16-silence.aif": (2, 48000),
    "8k-1ch-1s-silence.aif": (1, 8000),
    "8k-4ch-1s-silence.aif": (4, 8000),
    "alac.m4a": (2, 44100),
    "no-tags.m4a": (2, 44100),
    "has-tags.m4a": (2, 44100),
    "empty.ogg": (2, 44100),
    "multipage-setup.ogg": (2, 44100),
    "example.opus": (1, 48000),
    "no-tags.flac": (2, 44100),
    "silence-44-s.flac": (2, 44100),
    "silence-2s-PCM-16000-08-notags.wav": (2, 16000),
    "silence-44-s-mpeg25.mp3": (2, 12000),
    "silence-44-s-v1.mp3": (2, 44100),
    "no-tags.mp3": (2, 44100),
}

_CORPUS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from mlx_clap.preprocess.audio import AudioDecodeError, load_audio
    for f in sorted(Path(sys.argv[1]).iterdir()):
        print(json.dumps({"start": f.name}), flush=True)
        try:
            a = load_audio(f)
            rec = {"name": f.name, "ok": True, "channels": a.channels, "rate": a.source_rate,
                   "n": int(a.samples.size), "dtype": str(a.samples.dtype), "ndim": a.samples.ndim,
                   "duration": a.duration_s, "finite": bool(a.samples.size and abs(a.samples).max() < 10)}
        except AudioDecodeError as e:
            rec = {"name": f.name, "ok": False, "error": str(e)}
        print(json.dumps(rec), flush=True)
    """
)


def test_corpus_decodes_or_fails_clearly():
    """Every corpus file decodes or raises AudioDecodeError naming the file; nothing crashes or hangs."""
    _require_corpus()
    assert CORPUS.is_dir() and any(CORPUS.iterdir()), f"decoder corpus missing: {CORPUS}"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CORPUS_SCRIPT, str(CORPUS)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO_ROOT,
        )
    except subprocess.TimeoutExpired as exc:
        lines = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        last = [json.loads(x) for x in lines.splitlines() if x.startswith("{")]
        pytest.fail(f"decoding hung; last file started: {last[-1] if last else None}")
    assert proc.returncode == 0, f"decoder process crashed (rc {proc.returncode}): {proc.stderr[-2000:]}"
    recs = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    results = {r["name"]: r for r in recs if "name" in r}
    names = {p.name for p in CORPUS.iterdir()}
    assert set(results) == names
    for name, r in results.items():
        if r["ok"]:
            assert r["dtype"] == "float32" and r["ndim"] == 1 and r["n"] > 0 and r["finite"], r
            assert r["n"] == target_length(round(r["duration"] * r["rate"]), r["rate"], 48000), r
        else:
            assert str(CORPUS / name) in r["error"], r
            cause = r["error"].split(": ", 1)[1]
            assert len(cause) > 8 and "Traceback" not in cause, r
    for name, (channels, rate) in MUST_DECODE.items():
        assert results[name]["ok"], results[name]
        assert (results[name]["channels"], results[name]["rate"]) == (channels, rate), results[name]
    assert "empty file (0 bytes)" in results["emptyfile.mp3"]["error"]
    assert "not a readable audio file" in results["SOURCE.md"]["error"]


def _write_wav(path, data, sr, subtype="PCM_16"):
    sf.write(str(path), data, sr, subtype=subtype)
    return path


def _noise(n, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    x = 0.2 * rng.standard_normal((n, channels)).astype(np.float32)
    return x[:, 0] if channels == 1 else x


def _error(path) -> str:
    with pytest.raises(AudioDecodeError) as info:
        load_audio(path)
    msg = str(info.value)
    assert msg.startswith(str(path) + ": "), msg
    return msg


def test_bad_paths(tmp_path):
    (tmp_path / "zero.wav").write_bytes(b"")
    assert "empty file" in _error(tmp_path / "zero.wav")
    (tmp_path / "text.wav").write_text("this is not audio\n" * 20)
    assert "not a readable audio file" in _error(tmp_path / "text.wav")
    (tmp_path / "folder.mp3").mkdir()
    assert "is a directory" in _error(tmp_path / "folder.mp3")
    assert "no such file" in _error(tmp_path / "missing.flac")
    os.symlink(tmp_path / "loop_b.wav", tmp_path / "loop_a.wav")
    os.symlink(tmp_path / "loop_a.wav", tmp_path / "loop_b.wav")
    assert "symbolic link loop" in _error(tmp_path / "loop_a.wav")
    os.symlink(tmp_path / "gone.wav", tmp_path / "dangling.wav")
    assert "broken symbolic link" in _error(tmp_path / "dangling.wav")
    raw = tmp_path / "raw.bin"
    raw.write_bytes(os.urandom(5000))
    assert "not a readable audio file" in _error(raw)


def test_unreadable_permissions(tmp_path):
    """Without read permission the cause is 'permission denied'; root reads anyway, and must succeed."""
    locked = tmp_path / "locked"
    locked.mkdir()
    f = _write_wav(locked / "a.wav", _noise(4800), 48000)
    f.chmod(0)
    try:
        if os.geteuid() == 0:
            assert load_audio(f).samples.size == 4800
        else:
            assert "permission denied" in _error(f)
    finally:
        f.chmod(0o644)


def test_nan_samples_rejected(tmp_path):
    x = _noise(4800)
    x[100] = np.nan
    f = _write_wav(tmp_path / "nan.wav", x, 48000, subtype="FLOAT")
    assert "NaN or infinite" in _error(f) and "frame 100" in _error(f)
    x[100] = np.inf
    f = _write_wav(tmp_path / "inf.wav", x, 48000, subtype="FLOAT")
    assert "NaN or infinite" in _error(f)


def test_zero_frames_rejected(tmp_path):
    f = _write_wav(tmp_path / "noframes.wav", np.zeros((0, 2), np.float32), 44100)
    assert "zero-length" in _error(f)


def test_non_ascii_name(tmp_path):
    d = tmp_path / "Bruits d'été"
    d.mkdir()
    f = _write_wav(d / "犬の声 ñ.flac", _noise(22050), 22050)
    a = load_audio(f)
    assert a.samples.size == 48001 and a.source_rate == 22050 and a.channels == 1  # librosa length


def test_96k_8_channels_mean_downmix(tmp_path):
    x = _noise(96000, channels=8)
    f = _write_wav(tmp_path / "surround.wav", x, 96000, subtype="FLOAT")
    a = load_audio(f)
    assert (a.channels, a.source_rate, a.samples.size) == (8, 96000, 48000)
    assert a.duration_s == pytest.approx(1.0)
    want = soxr.resample(np.mean(x.T, axis=0), 96000, 48000, quality="HQ")
    np.testing.assert_array_equal(a.samples, want[:48000])


def test_matches_librosa_load(tmp_path):
    """LAION loads files with librosa.load(sr=48000): same decode, mean downmix, soxr_hq and length."""
    librosa = pytest.importorskip("librosa", reason="librosa is not installed (pip install -e '.[test]')")
    for sr, n in ((44100, 44100 * 2 + 17), (16000, 16001), (22050, 22050)):
        f = _write_wav(tmp_path / f"s{sr}.flac", _noise(n, channels=2, seed=sr), sr)
        a = load_audio(f)
        ref, _ = librosa.load(str(f), sr=48000, mono=True)
        assert a.samples.shape == ref.shape
        np.testing.assert_allclose(a.samples, ref, atol=1e-6, rtol=0)


def test_streaming_equals_one_shot(tmp_path):
    x = _noise(44100 * 3 + 5, channels=2)
    f = _write_wav(tmp_path / "s.wav", x, 44100)
    whole = load_audio(f).samples
    stream = AudioStream(f, block_frames=1000)
    blocks = list(stream)
    assert len(blocks) > 50
    np.testing.assert_array_equal(np.concatenate(blocks), whole)
    assert stream.n_samples == whole.size == target_length(x.shape[0], 44100, 48000)
    assert stream.source_frames == x.shape[0]


def _write_m4a_pyav(path, x, sr):
    """AAC in MP4 with PyAV's encoder; frame pts let the muxer write the priming edit list."""
    import av

    with av.open(str(path), "w", format="mp4") as out:
        st = out.add_stream("aac", rate=sr)
        st.layout = "mono"
        for i in range(0, len(x), 1024):
            fr = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(x[None, i : i + 1024]), format="fltp", layout="mono"
            )
            fr.sample_rate = sr
            fr.pts = i
            fr.time_base = Fraction(1, sr)
            for p in st.encode(fr):
                out.mux(p)
        for p in st.encode(None):
            out.mux(p)


def test_m4a_aac_priming_trimmed(tmp_path):
    sr = 48000
    x = _noise(sr * 2)
    x[:4800] = 0  # silence, then noise: the onset shows any priming offset
    f = _write_m4a_pyav(tmp_path / "clip.m4a", x, sr) or tmp_path / "clip.m4a"
    a = load_audio(f)
    assert a.channels == 1 and a.source_rate == sr
    # AAC pads the end to whole 1024-sample frames; the start must line up with the source.
    assert sr * 2 <= a.samples.size < sr * 2 + 2048
    corr = [float(np.dot(a.samples[o : o + 40000], x[:40000])) for o in range(0, 2048)]
    assert int(np.argmax(corr)) == 0
