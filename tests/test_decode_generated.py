"""load_audio / AudioStream on files written here, in tmp_path: no real-world corpus needed.

tests/test_audio.py holds the corpus run and a first set of generated cases (zero-byte .wav, text and
random bytes, folder.mp3, missing file, symlink loops, chmod 000 .wav, NaN/Inf, a 0-frame float WAV,
non-ASCII names, 96 kHz 8 channels, librosa parity, streaming a WAV, AAC priming at 48 kHz mono).
This file adds, without repeating those:
- every (container, subtype) soundfile writes losslessly x 5 source rates x 1/2/4/6 channels, and
  Ogg Vorbis: the right length and duration, the mean downmix, soxr HQ samples, a 1 kHz tone kept;
- other requested rates, silence, 1-frame files, 0-frame WAV / FLAC / Ogg;
- truncated and lying headers (the frames present decode; nothing present is an error);
- AAC (M4A, ADTS) and MP3 written with PyAV, when the installed wheel has the encoder;
- bad files: random bytes named .wav / .mp3, a zero-byte .m4a, a folder named x.wav, broken headers,
  unreadable files and folders (as a normal user).
"""

from __future__ import annotations

import os
import struct
from fractions import Fraction

import numpy as np
import pytest
import soundfile as sf
import soxr

from mlx_clap.preprocess.audio import AudioDecodeError, AudioStream, load_audio, target_length

SR = 48000
TONE = 1000.0  # Hz: below the Nyquist frequency of every source and target rate here
RATES = (8000, 11025, 22050, 44100, 96000)
CHANNELS = (1, 2, 4, 6)
LOSSLESS = (("WAV", "PCM_16", "wav"), ("WAV", "PCM_24", "wav"), ("WAV", "FLOAT", "wav"),
            ("FLAC", "PCM_16", "flac"), ("FLAC", "PCM_24", "flac"))  # fmt: skip


# ------------------------------------------------------------------------------------------ helpers
def _frames(rate: int) -> int:
    return rate // 4 + 37  # 0.25 s and a remainder that is no multiple of any block size


def _tone(n: int, rate: int, channels: int) -> tuple[np.ndarray, float]:
    """(n, channels) 1 kHz sine, channel c at amplitude 0.2 + 0.1 c; returns it and the mean amplitude."""
    amps = 0.2 + 0.1 * np.arange(channels)
    x = np.sin(2 * np.pi * TONE * np.arange(n) / rate)[:, None] * amps
    return x.astype(np.float32), float(amps.mean())


def _noise(n: int, channels: int, seed: int = 0) -> np.ndarray:
    x = 0.2 * np.random.default_rng(seed).standard_normal((n, channels)).astype(np.float32)
    x[: n // 10] = 0  # silence, then noise: the onset shows any offset of the decoded start
    return x


def _peak_hz(x: np.ndarray, rate: int) -> float:
    return float(np.argmax(np.abs(np.fft.rfft(x * np.hanning(x.size))))) * rate / x.size


def _check_tone(a, *, n_src: int, rate: int, channels: int, amp: float, sr: int = SR, rms_rtol=0.01):
    """Mono float32 at `sr`, librosa's length, the source's duration, and the tone's pitch and level."""
    x = a.samples
    assert x.dtype == np.float32 and x.ndim == 1 and np.isfinite(x).all()
    assert (a.sample_rate, a.source_rate, a.channels) == (sr, rate, channels)
    assert x.size == target_length(n_src, rate, sr)
    assert abs(x.size - n_src * sr / rate) < 1 + 1e-9
    assert a.duration_s == pytest.approx(n_src / rate)
    assert abs(_peak_hz(x, sr) - TONE) <= sr / x.size, _peak_hz(x, sr)
    mid = x[x.size // 4 : 3 * x.size // 4]
    rms = float(np.sqrt(np.mean(mid.astype(np.float64) ** 2)))
    assert rms == pytest.approx(amp / np.sqrt(2), rel=rms_rtol)


def _reference(path, sr: int = SR) -> np.ndarray:
    """LAION's librosa.load(path, sr): soundfile, mean over channels, one-shot soxr HQ, fix_length."""
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    mono = np.mean(data.T, axis=0)
    if rate == sr:
        return mono
    y = soxr.resample(mono, rate, sr, quality="HQ")
    n = target_length(data.shape[0], rate, sr)
    return np.pad(y, (0, max(0, n - y.size)))[:n]


def _lag(decoded: np.ndarray, ref: np.ndarray, max_lag: int = 2048) -> int:
    """The shift of `decoded` against `ref` (positive: decoded starts late), by cross-correlation."""
    n = min(decoded.size, ref.size) - 2 * max_lag
    lags = range(-max_lag, max_lag + 1)
    corr = [float(np.dot(decoded[max_lag + k : max_lag + k + n], ref[max_lag : max_lag + n])) for k in lags]
    return lags[int(np.argmax(corr))]


def _error(path) -> str:
    """load_audio raises AudioDecodeError whose message is '<path>: <cause>'; returns the cause."""
    with pytest.raises(AudioDecodeError) as info:
        load_audio(path)
    err = info.value
    assert str(err).startswith(f"{path}: "), str(err)
    assert err.path == str(path) and str(err) == f"{path}: {err.cause}"
    assert len(err.cause) > 8 and "Traceback" not in err.cause, err.cause
    return err.cause


def _wav_header(rate: int, channels: int, data_bytes: int, bits: int = 16) -> bytes:
    """A 44-byte PCM WAV header that claims `data_bytes` of data, whatever follows it."""
    align = channels * bits // 8
    riff = min(36 + data_bytes, 0xFFFFFFFF)
    fmt = struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * align, align, bits)
    return b"RIFF" + struct.pack("<I", riff) + b"WAVEfmt " + fmt + b"data" + struct.pack("<I", data_bytes)


# PyAV encoders: present in the usual wheels, but FFmpeg builds differ.
def _require_encoder(name: str) -> None:
    import av

    try:
        av.codec.Codec(name, "w")
    except ValueError as exc:  # av.codec.codec.UnknownCodecError
        pytest.skip(f"the installed PyAV (av {av.__version__}) has no {name!r} encoder: {exc}")


def _encode_pyav(path, x: np.ndarray, rate: int, codec: str, container: str, layout: str):
    """Encode (n, channels) float32 with PyAV; frame pts let the muxer write priming edit lists."""
    import av

    with av.open(str(path), "w", format=container) as out:
        st = out.add_stream(codec, rate=rate)
        st.layout = layout
        formats = [f.name for f in st.codec_context.codec.audio_formats]
        fmt = "fltp" if "fltp" in formats else "s16p"
        for i in range(0, len(x), 1152):
            arr = np.ascontiguousarray(x[i : i + 1152].T)
            if fmt == "s16p":
                arr = np.round(arr * 32767).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(arr, format=fmt, layout=layout)
            frame.sample_rate, frame.pts, frame.time_base = rate, i, Fraction(1, rate)
            for p in st.encode(frame):
                out.mux(p)
        for p in st.encode(None):
            out.mux(p)
    return path


# ------------------------------------------------------------------------------------ good files
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("fmt,subtype,ext", LOSSLESS)
def test_lossless_rates_channels_subtypes(tmp_path, fmt, subtype, ext, rate, channels):
    n = _frames(rate)
    x, amp = _tone(n, rate, channels)
    f = tmp_path / f"tone.{ext}"
    sf.write(str(f), x, rate, format=fmt, subtype=subtype)
    a = load_audio(f)
    _check_tone(a, n_src=n, rate=rate, channels=channels, amp=amp)
    np.testing.assert_allclose(a.samples, _reference(f), atol=1e-6, rtol=0)


@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("rate", RATES)
def test_ogg_vorbis_rates_channels(tmp_path, rate, channels):
    n = _frames(rate)
    x, amp = _tone(n, rate, channels)
    if channels == 6:  # Vorbis 5.1: libvorbis low-passes the 6th (LFE) channel, so the tone is not in it
        x[:, 5] = 0
        amp -= 0.7 / 6
    f = tmp_path / "tone.ogg"
    sf.write(str(f), x, rate, format="OGG", subtype="VORBIS")
    a = load_audio(f)
    _check_tone(a, n_src=n, rate=rate, channels=channels, amp=amp, rms_rtol=0.05)  # Ogg keeps the length
    np.testing.assert_allclose(a.samples, _reference(f), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "rate,channels,sr",
    [
        (96000, 2, 16000),
        (96000, 2, 22050),
        (96000, 2, 44100),
        (8000, 1, 16000),
        (11025, 4, 32000),
        (22050, 6, 8000),
    ],
)
def test_requested_rates(tmp_path, rate, channels, sr):
    n = _frames(rate)
    x, amp = _tone(n, rate, channels)
    f = tmp_path / "tone.wav"
    sf.write(str(f), x, rate, subtype="PCM_24")
    a = load_audio(f, sr=sr)
    _check_tone(a, n_src=n, rate=rate, channels=channels, amp=amp, sr=sr)
    np.testing.assert_allclose(a.samples, _reference(f, sr), atol=1e-6, rtol=0)


@pytest.mark.parametrize("rate,channels", [(8000, 1), (44100, 2), (96000, 6)])
def test_source_rate_requested_is_the_plain_downmix(tmp_path, rate, channels):
    x, _ = _tone(_frames(rate), rate, channels)
    f = tmp_path / "tone.wav"
    sf.write(str(f), x, rate, subtype="FLOAT")
    a = load_audio(f, sr=rate)
    assert a.samples.dtype == np.float32 and a.sample_rate == rate
    np.testing.assert_array_equal(a.samples, np.mean(x.T, axis=0, dtype=np.float32))


@pytest.mark.parametrize("fmt,subtype,ext", [*LOSSLESS, ("OGG", "VORBIS", "ogg")])
def test_silence(tmp_path, fmt, subtype, ext):
    n = 11025 * 2 + 3
    f = tmp_path / f"silence.{ext}"
    sf.write(str(f), np.zeros((n, 6), np.float32), 11025, format=fmt, subtype=subtype)
    a = load_audio(f)
    assert (a.channels, a.source_rate, a.duration_s) == (6, 11025, pytest.approx(n / 11025))
    assert a.samples.dtype == np.float32 and a.samples.size == target_length(n, 11025, SR)
    assert not np.any(a.samples)


@pytest.mark.parametrize("fmt,subtype,ext", [*LOSSLESS, ("OGG", "VORBIS", "ogg")])
@pytest.mark.parametrize("rate", [8000, 44100])
def test_one_frame(tmp_path, fmt, subtype, ext, rate):
    f = tmp_path / f"one.{ext}"
    sf.write(str(f), np.full((1, 2), 0.25, np.float32), rate, format=fmt, subtype=subtype)
    a = load_audio(f)
    assert (a.channels, a.source_rate, a.duration_s) == (2, rate, pytest.approx(1 / rate))
    assert a.samples.dtype == np.float32 and a.samples.size == target_length(1, rate, SR)  # 6 or 2
    assert np.isfinite(a.samples).all() and np.abs(a.samples).max() <= 0.5
    same = load_audio(f, sr=rate).samples
    assert same.shape == (1,)
    if fmt != "OGG":  # Vorbis is lossy, more so on a one-sample signal
        assert same[0] == 0.25


@pytest.mark.parametrize(
    "fmt,subtype,ext,channels,rate",
    [
        ("WAV", "PCM_16", "wav", 1, 8000),
        ("WAV", "PCM_24", "wav", 6, 96000),
        ("OGG", "VORBIS", "ogg", 2, 22050),
        ("FLAC", "PCM_16", "flac", 2, 44100),
    ],
)
def test_zero_frames(tmp_path, fmt, subtype, ext, channels, rate):
    f = tmp_path / f"noframes.{ext}"
    sf.write(str(f), np.zeros((0, channels), np.float32), rate, format=fmt, subtype=subtype)
    cause = _error(f)
    if f.stat().st_size == 0:  # libsndfile writes nothing at all for a 0-frame FLAC
        assert cause == "empty file (0 bytes)"
    else:
        assert "zero-length" in cause


# ------------------------------------------------------------------------- truncated and lying files
def test_truncated_wav_decodes_the_frames_present(tmp_path):
    rate, n = 22050, 22050
    x, _ = _tone(n, rate, 2)
    full = tmp_path / "full.wav"
    sf.write(str(full), x, rate, subtype="PCM_16")
    whole = load_audio(full, sr=rate).samples
    data = full.read_bytes()
    offset = len(data) - n * 4  # 16-bit stereo: 4 bytes a frame, data chunk last
    for cut in (offset + 4 * 1000, offset + 4 * 1000 + 3, len(data) // 2):  # frame boundary, mid-frame
        f = tmp_path / f"cut{cut}.wav"
        f.write_bytes(data[:cut])  # the header still claims n frames
        present = (cut - offset) // 4
        a = load_audio(f, sr=rate)
        assert a.samples.size == present and a.duration_s == pytest.approx(present / rate)
        np.testing.assert_array_equal(a.samples, whole[:present])
        assert load_audio(f).samples.size == target_length(present, rate, SR)
    f = tmp_path / "header_only.wav"
    f.write_bytes(data[:offset])
    assert "zero-length" in _error(f)


@pytest.mark.parametrize("claim", [10 * 2000, 2**31, 0xFFFFFFFF])
def test_wav_header_claims_more_data_than_present(tmp_path, claim):
    pcm = np.round(8000 * np.sin(np.arange(1000) / 5)).astype("<i2")
    f = tmp_path / "liar.wav"
    f.write_bytes(_wav_header(16000, 1, claim) + pcm.tobytes())
    a = load_audio(f, sr=16000)
    assert (a.source_rate, a.channels, a.samples.size) == (16000, 1, 1000)
    np.testing.assert_array_equal(a.samples, pcm / np.float32(32768))
    assert load_audio(f).samples.size == 3000


@pytest.mark.parametrize("fmt,ext", [("FLAC", "flac"), ("OGG", "ogg")])
def test_truncated_compressed_file_decodes_a_prefix(tmp_path, fmt, ext):
    """Half a FLAC / Ogg file: the whole frames before the cut decode, equal to the full file's."""
    rate, n = 44100, 44100 * 2
    x = _noise(n, 2)
    full = tmp_path / f"full.{ext}"
    sf.write(str(full), x, rate, format=fmt)
    whole = load_audio(full, sr=rate).samples
    f = tmp_path / f"half.{ext}"
    f.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    s = AudioStream(f, sr=rate)
    part = np.concatenate(list(s))
    assert s.source_rate == rate and s.channels == 2
    assert n // 5 < s.source_frames < n and part.size == s.source_frames
    np.testing.assert_allclose(part, whole[: part.size], atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- PyAV-encoded AAC / MP3
AAC_CASES = [(8000, "mono"), (11025, "stereo"), (22050, "quad"), (44100, "hexagonal"), (96000, "stereo")]


@pytest.mark.parametrize("container,ext", [("mp4", "m4a"), ("adts", "aac")])
@pytest.mark.parametrize("rate,layout", AAC_CASES)
def test_aac_rates_channels(tmp_path, container, ext, rate, layout):
    _require_encoder("aac")
    import av

    channels = av.AudioLayout(layout).nb_channels
    n = rate // 2 + 7
    x, amp = _tone(n, rate, channels)
    f = _encode_pyav(tmp_path / f"tone.{ext}", x, rate, "aac", container, layout)
    s = AudioStream(f)
    y = np.concatenate(list(s))
    # AAC pads the end to whole 1024-frame packets; M4A's edit list drops the 1024-frame priming,
    # raw ADTS cannot signal it, so there it stays.
    extra = 1024 if ext == "m4a" else 2048
    assert n <= s.source_frames < n + extra, (s.source_frames, n)
    a = load_audio(f)
    np.testing.assert_array_equal(a.samples, y)
    _check_tone(a, n_src=s.source_frames, rate=rate, channels=channels, amp=amp, rms_rtol=0.05)


@pytest.mark.parametrize("rate,layout", [(8000, "mono"), (22050, "stereo"), (44100, "hexagonal")])
def test_m4a_priming_trimmed_at_other_rates(tmp_path, rate, layout):
    """test_audio.py checks 48 kHz mono; the edit list must line up at other rates and layouts too."""
    _require_encoder("aac")
    import av

    x = _noise(rate, av.AudioLayout(layout).nb_channels, seed=rate)
    f = _encode_pyav(tmp_path / "clip.m4a", x, rate, "aac", "mp4", layout)
    a = load_audio(f, sr=rate)
    assert _lag(a.samples, x.mean(axis=1)) == 0


def test_m4a_streamed_in_small_blocks_equals_one_shot(tmp_path):
    _require_encoder("aac")
    rate = 44100
    x, _ = _tone(rate + 5, rate, 2)
    f = _encode_pyav(tmp_path / "tone.m4a", x, rate, "aac", "mp4", "stereo")
    whole = load_audio(f).samples
    stream = AudioStream(f, block_frames=1000)
    blocks = list(stream)
    assert len(blocks) > 20 and stream.decoder == "pyav"
    np.testing.assert_array_equal(np.concatenate(blocks), whole)
    assert stream.n_samples == whole.size == target_length(stream.source_frames, rate, SR)


MP3_CASES = [(8000, "mono"), (11025, "stereo"), (22050, "mono"), (44100, "stereo"), (48000, "stereo")]


@pytest.mark.parametrize("rate,layout", MP3_CASES)
def test_mp3_rates_channels(tmp_path, rate, layout):
    _require_encoder("libmp3lame")
    import av

    channels = av.AudioLayout(layout).nb_channels
    n = rate // 2 + 7
    x, amp = _tone(n, rate, channels)
    f = _encode_pyav(tmp_path / "tone.mp3", x, rate, "libmp3lame", "mp3", layout)
    s = AudioStream(f)
    list(s)
    assert abs(s.source_frames - n) <= 1152, (s.source_frames, n)  # within one MP3 frame of the source
    _check_tone(load_audio(f), n_src=s.source_frames, rate=rate, channels=channels, amp=amp, rms_rtol=0.1)


def test_mp3_encoder_delay_trimmed(tmp_path):
    """LAME's encoder delay (~1105 frames) is dropped, as librosa.load (soundfile / mpg123) does."""
    _require_encoder("libmp3lame")
    rate = 22050
    x = _noise(rate, 2, seed=3)
    f = _encode_pyav(tmp_path / "clip.mp3", x, rate, "libmp3lame", "mp3", "stereo")
    a = load_audio(f, sr=rate)
    assert _lag(a.samples, x.mean(axis=1)) == 0


def test_truncated_mp3_decodes_a_prefix(tmp_path):
    _require_encoder("libmp3lame")
    rate = 22050
    x, _ = _tone(rate, rate, 2)
    full = _encode_pyav(tmp_path / "full.mp3", x, rate, "libmp3lame", "mp3", "stereo")
    f = tmp_path / "half.mp3"
    f.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    a = load_audio(f, sr=rate)
    assert a.source_rate == rate and rate // 4 < a.samples.size < rate
    assert abs(_peak_hz(a.samples, rate) - TONE) <= rate / a.samples.size


def test_truncated_m4a_without_index_fails_clearly(tmp_path):
    """PyAV writes the moov index at the end: half a file has samples but no index to find them."""
    _require_encoder("aac")
    x, _ = _tone(22050, 22050, 2)
    full = _encode_pyav(tmp_path / "full.m4a", x, 22050, "aac", "mp4", "stereo")
    f = tmp_path / "half.m4a"
    f.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    assert "not a readable audio file" in _error(f)


# -------------------------------------------------------------------------------------- bad files
def _random_bytes(path, n=5000, seed=0):
    path.write_bytes(np.random.default_rng(seed).bytes(n))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", ["x.wav", "x.mp3"])
def test_random_bytes_with_audio_names(tmp_path, name, seed):
    f = tmp_path / name
    _random_bytes(f, seed=seed)
    assert "not a readable audio file" in _error(f)


def test_zero_byte_m4a_and_folder_named_wav(tmp_path):
    (tmp_path / "x.m4a").write_bytes(b"")
    assert _error(tmp_path / "x.m4a") == "empty file (0 bytes)"
    (tmp_path / "x.wav").mkdir()
    assert "is a directory" in _error(tmp_path / "x.wav")
    assert "is a directory" in _error(tmp_path)  # the tmp folder itself, no audio-like name


def test_broken_wav_headers(tmp_path):
    pcm = np.zeros(1000, "<i2").tobytes()
    f = tmp_path / "nochannels.wav"
    f.write_bytes(_wav_header(16000, 0, len(pcm)) + pcm)
    assert "invalid channel count 0" in _error(f)
    f = tmp_path / "norate.wav"
    f.write_bytes(_wav_header(0, 1, len(pcm)) + pcm)
    cause = _error(f)
    assert "not a readable audio file" in cause or "invalid sample rate 0" in cause
    full = tmp_path / "full.wav"
    sf.write(str(full), np.zeros(100, np.float32), 16000, subtype="PCM_16")
    for cut in (4, 12, 30):  # inside the RIFF header / the fmt chunk
        f = tmp_path / f"head{cut}.wav"
        f.write_bytes(full.read_bytes()[:cut])
        assert "not a readable audio file" in _error(f)


def test_ogg_cut_inside_its_setup_headers(tmp_path):
    full = tmp_path / "full.ogg"
    sf.write(str(full), _noise(4410, 2), 44100, format="OGG")
    f = tmp_path / "cut.ogg"
    f.write_bytes(full.read_bytes()[:200])  # the codebooks are several kB: none of the audio can decode
    assert "not a readable audio file" in _error(f)


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions only")
@pytest.mark.parametrize("name", ["a.flac", "a.m4a"])
def test_unreadable_file_and_folder(tmp_path, name):
    if os.geteuid() == 0:
        pytest.skip("running as root, which reads files and folders whatever their mode")
    f = tmp_path / "locked" / name
    f.parent.mkdir()
    sf.write(str(f), _noise(1000, 1), 16000, format="FLAC")  # an .m4a name over FLAC data: never opened
    f.chmod(0)
    try:
        assert _error(f) == "permission denied"
    finally:
        f.chmod(0o644)
    f.parent.chmod(0)  # os.stat itself fails now, before any open
    try:
        assert _error(f) == "permission denied"
    finally:
        f.parent.chmod(0o755)
