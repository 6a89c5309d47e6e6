"""Decode any audio file to float32 mono at the model rate (48 kHz), in bounded memory.

Pipeline, as LAION's file API does it with `librosa.load(path, sr=48000)` (docs/numerics.md §10):
1. decode to float32 with soundfile (WAV, FLAC, AIFF, OGG Vorbis/Opus, MP3, ...); anything soundfile
   refuses (M4A/AAC/ALAC/MP4, chained Ogg, some valid Ogg Opus streams, ...) goes through PyAV (FFmpeg),
   which drops AAC encoder priming as the container signals it (edit list / skip samples) and honours
   the stream's start time; where soundfile fails mid-way (a truncated FLAC, an Opus page it rejects),
   PyAV goes on from the frame where soundfile stopped;
2. downmix by the mean over channels;
3. resample with soxr "HQ" (librosa's default `soxr_hq`), streamed block by block with
   `soxr.ResampleStream`, which gives the same samples as the one-shot call;
4. fix the length to ceil(n * (sr / source_rate)) in float64, exactly as `librosa.resample` does.

Files are read in blocks, so decoding a 2-hour file holds one block of source audio at a time;
`AudioStream` yields the 48 kHz blocks for callers that do not want the whole waveform either, and
`AudioStream.read_window` reads just the one window a "head" / "center" crop needs (the first window's
samples; for the middle, a seek where the container's frame count can be trusted, otherwise a two-pass
streaming scan), and `AudioStream.read_crop` the random crop of "reference" (bit for bit the full decode's
samples), so memory is a few windows whatever the file's length.

Honesty about the source: a file whose header declares clearly more audio than decodes (a truncated
download, a recording still being written), a decoder that had to resync over damaged data, and the
decoder's own stderr lines (libmpg123 writes "Note: Trying to resync..." straight to fd 2) all become
`AudioStream.warnings` of that file; nothing the decoders print reaches the terminal unattributed.
"""

from __future__ import annotations

import errno
import math
import os
import re
import stat
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEFAULT_SR = 48000
# Source frames per decoded block: ~6 s at 44.1 kHz, a few MB of float32 per channel.
BLOCK_FRAMES = 1 << 18
# Output samples held back so the final length can be fixed without revisiting emitted blocks.
_HOLDBACK = 64
# Decoded audio this much short of the declared length is reported: MP3 encoder delay and padding and
# container rounding stay well inside it, a cut-off download or a recording still being written does not.
SHORT_FRACTION = 0.01
SHORT_SECONDS = 0.25
# "center" reads from a seek point this far before the window so soxr's filter has settled by then
# (HQ's filter support is a few ms; the resampled samples then equal a full decode's to float rounding).
_SEEK_MARGIN_S = 0.25
# libsndfile reports an unknown length (a chained Ogg file, some Opus streams) as SF_COUNT_MAX.
_UNKNOWN_FRAMES = 1 << 62
# Subtypes whose samples do not depend on where decoding started, so a seek reads the full decode's bits.
_LOSSLESS_SUBTYPES = ("PCM_", "FLOAT", "DOUBLE", "ULAW", "ALAW", "ALAC_")


class AudioDecodeError(ValueError):
    """A file that cannot be turned into audio; `str()` names the file and the cause."""

    def __init__(self, path: str | os.PathLike, cause: str):
        self.path = str(path)
        self.cause = cause
        super().__init__(f"{self.path}: {cause}")


@dataclass
class DecodedAudio:
    """A decoded file: mono float32 `samples` at `sample_rate`, and facts about the source."""

    samples: np.ndarray
    sample_rate: int
    duration_s: float  # of the source: decoded source frames / source rate
    channels: int
    source_rate: int
    warnings: list[str] = field(default_factory=list)  # e.g. "decoded 12.0 s of the 60.0 s ..."


def target_length(n_source: int, source_rate: int, sr: int) -> int:
    """Output length after resampling n_source frames, computed exactly as `librosa.resample` does.

    librosa takes `ceil(n * (sr / source_rate))` in float64, so a 1-s file at 22.05 kHz gives 48001
    samples, not 48000. We keep the quirk: LAION decodes with librosa, and repeat-padding of short clips
    depends on the exact length (k = 480000 // n copies).
    """
    if source_rate == sr:
        return int(n_source)
    return int(math.ceil(n_source * (float(sr) / source_rate)))


def check_path(path: str | os.PathLike) -> Path:
    """Raise AudioDecodeError unless `path` is an existing, readable, non-empty regular file."""
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise AudioDecodeError(p, "symbolic link loop") from exc
        if exc.errno == errno.ENOENT:
            cause = "broken symbolic link" if os.path.islink(p) else "no such file"
            raise AudioDecodeError(p, cause) from exc
        if exc.errno == errno.EACCES:
            raise AudioDecodeError(p, "permission denied") from exc
        raise AudioDecodeError(p, f"cannot access ({exc.strerror or exc})") from exc
    if stat.S_ISDIR(st.st_mode):
        raise AudioDecodeError(p, "is a directory, not an audio file")
    if not stat.S_ISREG(st.st_mode):
        raise AudioDecodeError(p, "not a regular file (device, pipe or socket)")
    if st.st_size == 0:
        raise AudioDecodeError(p, "empty file (0 bytes)")
    try:
        with open(p, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        cause = "permission denied" if exc.errno == errno.EACCES else f"cannot read ({exc.strerror or exc})"
        raise AudioDecodeError(p, cause) from exc
    return p


def _downmix(block: np.ndarray) -> np.ndarray:
    """(frames, channels) -> (frames,) float32 mean over channels, summed in librosa's order."""
    if block.ndim == 1:
        return block
    if block.shape[1] == 1:
        return block[:, 0]
    return np.mean(block.T, axis=0, dtype=np.float32)


# ------------------------------------------------------------------------- decoder stderr capture
# libmpg123 (inside libsndfile) prints to the process's fd 2 itself. fd 2 is process-wide, so the
# redirection is held under one lock, and only while a libsndfile call runs: decoding stays on worker
# threads, and what another thread printed meanwhile is passed on to the real stderr afterwards.
_STDERR_LOCK = threading.Lock()
_capture_file = None  # one reusable temporary file, only touched under the lock
# Lines in libmpg123's own formats: "Note: ...", "Warning: ...", "[src/libmpg123/x.c:f():12] error: ...".
_DECODER_LINE = re.compile(r"^(Note: |Warning: |Error: |\[[^\]]*(mpg123|\.c:)[^\]]*\] )")
_DECODER_MEANING = (
    ("Xing stream size off", "the MP3's Xing header declares another stream size than the file holds: "
     "the file may be truncated or still being written"),
    ("resync", "damaged MP3 data: the decoder had to resync and skipped bytes"),
    ("Illegal Audio-MPEG-Header", "damaged MP3 data: the decoder had to resync and skipped bytes"),
    ("Skipped", "damaged MP3 data: the decoder had to resync and skipped bytes"),
)  # fmt: skip


@contextmanager
def decoder_stderr(sink: list[str]) -> Iterator[None]:
    """Run the body with fd 2 captured; decoder lines become warnings in `sink`, the rest is passed on."""
    global _capture_file
    import sys

    with _STDERR_LOCK:
        try:
            sys.stderr.flush()
        except (AttributeError, ValueError, OSError):
            pass
        try:
            if _capture_file is None:
                _capture_file = tempfile.TemporaryFile()
            saved = os.dup(2)
        except OSError:  # no fd 2 to capture (a closed stderr) or no temporary file: decode anyway
            yield
            return
        os.dup2(_capture_file.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            _capture_file.seek(0)
            data = _capture_file.read()
            _capture_file.seek(0)
            _capture_file.truncate()
            if data:
                _route_stderr(data, sink)


def _route_stderr(data: bytes, sink: list[str]) -> None:
    other = []
    for raw in data.splitlines(keepends=True):
        line = raw.decode("utf-8", errors="replace").strip()
        if line and _DECODER_LINE.match(line):
            _add_warning(sink, _decoder_warning(line))
        else:
            other.append(raw)
    if other:  # not the decoder's (e.g. a progress bar drawn meanwhile): it goes where it was meant to
        try:
            os.write(2, b"".join(other))
        except OSError:
            pass


def _decoder_warning(line: str) -> str:
    for needle, meaning in _DECODER_MEANING:
        if needle in line:
            return meaning
    return "decoder: " + re.sub(r"^(\[[^\]]*\] |Note: |Warning: |Error: )", "", line).strip()


def _add_warning(sink: list[str], text: str) -> None:
    if text not in sink:  # one line per cause, however often the decoder repeats it
        sink.append(text)


# ---------------------------------------------------------------------------- declared lengths
def declared_pcm_frames(path: str | os.PathLike) -> int | None:
    """Frames a WAV (RIFF) or AIFF header declares, from its data chunk / COMM chunk; None otherwise.

    libsndfile clamps its frame count to the bytes present, so this is the only way to see that a header
    promises more audio than the file holds. An unfinished recording's placeholder size (0xFFFFFFFF)
    counts as a claim too: it is not a size the data can have.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError:
        return None
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] in (b"WAVE",):
        return _riff_frames(head)
    if len(head) >= 12 and head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return _aiff_frames(head)
    return None


def _riff_frames(head: bytes) -> int | None:
    pos, align = 12, 0
    while pos + 8 <= len(head):
        cid, size = head[pos : pos + 4], struct.unpack("<I", head[pos + 4 : pos + 8])[0]
        if cid == b"fmt " and pos + 22 <= len(head):
            align = struct.unpack("<H", head[pos + 20 : pos + 22])[0]
        elif cid == b"data":
            return size // align if align else None
        pos += 8 + size + (size & 1)
    return None


def _aiff_frames(head: bytes) -> int | None:
    pos = 12
    while pos + 8 <= len(head):
        cid, size = head[pos : pos + 4], struct.unpack(">I", head[pos + 4 : pos + 8])[0]
        if cid == b"COMM" and pos + 14 <= len(head):
            return struct.unpack(">I", head[pos + 10 : pos + 14])[0]
        pos += 8 + size + (size & 1)
    return None


def probe_seconds(path: str | os.PathLike) -> float | None:
    """A file's duration from its header (soundfile, else PyAV's container), or None if unknown.

    For progress estimates: cheap, and silent. libmpg123 prints to fd 2 at open (a truncated MP3's
    "Xing stream size off"); those lines are dropped here, as decoding the file reports them as its
    warnings. A chained Ogg file is None: both libraries give the first link's length.
    """
    if _ogg_is_chained(path):
        return None
    try:
        import soundfile as sf

        with decoder_stderr([]):
            info = sf.info(str(path))
        if 0 < info.frames < _UNKNOWN_FRAMES and info.samplerate > 0:
            return float(info.frames) / float(info.samplerate)
    except Exception:  # not a soundfile format, or not audio at all: PyAV may know
        pass
    try:
        import av

        with av.open(str(path), metadata_errors="ignore") as container:
            if container.duration:
                return float(container.duration) / 1_000_000.0  # av.time_base: microseconds
    except Exception:
        pass
    return None


def _ogg_is_chained(path: str | os.PathLike) -> bool:
    """True when an Ogg file's last page belongs to another logical stream than its first page.

    That is a chained file (links concatenated, as stream recorders and `cat` make them) or a
    multiplexed one; libsndfile decodes only the first link and reports no error. Two small reads.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(27)
            if len(head) < 27 or head[:4] != b"OggS":
                return False
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - 65536))  # an Ogg page is at most 65307 bytes
            tail = fh.read()
    except OSError:
        return False
    at = tail.rfind(b"OggS")
    # A capture pattern inside packet data can fool the search; a real page header has version 0.
    while at >= 0 and (len(tail) < at + 27 or tail[at + 4] != 0):
        at = tail.rfind(b"OggS", 0, at)
    return at >= 0 and tail[at + 14 : at + 18] != head[14:18]


class AudioStream:
    """Iterate a file as mono float32 blocks at `sr`; metadata is filled in as decoding proceeds.

    After a full iteration, `source_frames`, `source_rate`, `channels` and `n_samples` are final and the
    blocks together hold exactly `target_length(source_frames, source_rate, sr)` samples. Errors raise
    AudioDecodeError; with `check_finite` NaN/Inf samples are an error. `read_window` reads only the
    one window a "head" or "center" crop takes. `warnings` collects what the file's decoding revealed
    (declared length not reached, damaged data skipped, the decoder's own messages).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        sr: int = DEFAULT_SR,
        block_frames: int = BLOCK_FRAMES,
        check_finite: bool = True,
    ):
        self.path = check_path(path)
        self.sr = int(sr)
        self.block_frames = int(block_frames)
        self.check_finite = check_finite
        self.source_rate = 0
        self.channels = 0
        self.source_frames = 0
        self.n_samples = 0
        self.decoder = ""
        self.warnings: list[str] = []  # e.g. damaged packets skipped in a truncated file
        # Frame count from the header when the decoder gives one (a hint: MP3 headers can be wrong).
        self.expected_frames: int | None = None
        # What the header or container claims (WAV data chunk, AIFF COMM, FLAC STREAMINFO, MP3 Xing,
        # container duration): decoding clearly less than this is reported as a warning.
        self.declared_frames: int | None = None
        self.complete = False  # every source frame decoded (or, for a seek, the count verified)
        self._short_reported = False
        self._capture_reads = False  # libsndfile's MP3 reader (libmpg123) prints to fd 2
        self._lossless = False  # soundfile's subtype decodes the same samples after a seek

    # ---------------------------------------------------------------------------------- decoders
    def _sf_open(self):
        import soundfile as sf

        with decoder_stderr(self.warnings):
            return sf.SoundFile(str(self.path))

    def _sf_call(self, fn, *args, **kwargs):
        if not self._capture_reads:
            return fn(*args, **kwargs)
        with decoder_stderr(self.warnings):
            return fn(*args, **kwargs)

    def _soundfile_meta(self, f) -> None:
        self.source_rate, self.channels, self.decoder = int(f.samplerate), int(f.channels), "soundfile"
        self.expected_frames = int(f.frames) if 0 < f.frames < _UNKNOWN_FRAMES else None
        subtype = str(f.subtype).upper()
        # libmpg123 decodes MPEG audio in any container (an MP3 inside a WAV too), and prints while it does.
        self._capture_reads = str(f.format).upper() == "MP3" or subtype.startswith("MPEG")
        self._lossless = subtype.startswith(_LOSSLESS_SUBTYPES)
        self._check_format()
        header = declared_pcm_frames(self.path) if str(f.format).upper() in ("WAV", "AIFF") else None
        self.declared_frames = header if header is not None else self.expected_frames
        if header is not None:
            # libsndfile already clamped f.frames to the bytes present: the shortfall is known now, before
            # any decoding, so a "head" read of a cut-off file is reported too.
            self._check_short(int(f.frames))

    def _soundfile_blocks(self, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        with self._sf_open() as f:
            self._soundfile_meta(f)
            if start:
                self._sf_call(f.seek, start)
            left = None if stop is None else stop - start
            while left is None or left > 0:
                n = self.block_frames if left is None else min(self.block_frames, left)
                block = self._sf_call(f.read, n, dtype="float32", always_2d=True)
                if block.shape[0] == 0:
                    return
                if left is not None:
                    left -= block.shape[0]
                yield block

    def _pyav_blocks(self) -> Iterator[np.ndarray]:
        import av

        with av.open(str(self.path), metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise AudioDecodeError(self.path, "no audio stream in the file")
            stream = container.streams.audio[0]
            self.source_rate = int(stream.codec_context.sample_rate or stream.rate or 0)
            self.channels = int(stream.codec_context.channels or 0)
            self.decoder = "pyav"
            self._check_format()
            self.declared_frames = _container_frames(container, stream, self.source_rate)
            # Samples before the stream's start time (encoder priming the decoder did not already drop
            # through the container's skip-samples side data) are not part of the audio.
            start = stream.start_time if stream.start_time is not None else None
            converter = av.AudioResampler(format="fltp")  # libswresample: any sample format -> float32
            pending: list[np.ndarray] = []
            pending_n = 0
            seen_audio = False
            bad_packets = 0
            last_error: Exception | None = None
            for packet in container.demux(stream):
                try:
                    frames = packet.decode()
                except av.error.FFmpegError as exc:
                    # As the ffmpeg command does: skip a damaged packet and go on (truncated files).
                    bad_packets += 1
                    last_error = exc
                    continue
                for frame in frames:
                    if frame.sample_rate and int(frame.sample_rate) != self.source_rate:
                        raise AudioDecodeError(self.path, "sample rate changes mid-stream; not supported")
                    skip = 0
                    if frame.pts is not None and frame.time_base is not None:
                        t0 = frame.pts * frame.time_base
                        origin = (start * stream.time_base) if start is not None else 0
                        if t0 < origin:
                            skip = int(round((origin - t0) * self.source_rate))
                    for out in converter.resample(frame):
                        arr = out.to_ndarray()  # (channels, n) planar float32
                        if arr.shape[0] != self.channels:
                            if seen_audio:
                                raise AudioDecodeError(self.path, "channel count changes mid-stream")
                            self.channels = arr.shape[0]  # the codec header and the decoded data disagree
                        seen_audio = True
                        if skip:
                            arr, skip = arr[:, skip:], max(0, skip - arr.shape[1])
                        if arr.shape[1]:
                            pending.append(arr.T)
                            pending_n += arr.shape[1]
                if pending_n >= self.block_frames:
                    yield np.concatenate(pending, axis=0)
                    pending, pending_n = [], 0
            for out in converter.resample(None):
                arr = out.to_ndarray()
                if arr.shape[1]:
                    pending.append(arr.T)
            if pending:
                yield np.concatenate(pending, axis=0)
            if bad_packets:
                if not seen_audio:
                    assert last_error is not None
                    raise last_error
                _add_warning(
                    self.warnings,
                    f"skipped {bad_packets} damaged packet(s): {_describe(last_error, self.path)}",
                )

    def _check_format(self) -> None:
        if self.source_rate <= 0:
            raise AudioDecodeError(self.path, f"invalid sample rate {self.source_rate}")
        if self.channels <= 0:
            raise AudioDecodeError(self.path, f"invalid channel count {self.channels}")

    def _check_short(self, frames: int) -> None:
        """Warn once when `frames` is clearly less than the header / container declares."""
        declared, rate = self.declared_frames, self.source_rate
        if self._short_reported or not declared or not rate:
            return
        if declared - frames > max(SHORT_FRACTION * declared, SHORT_SECONDS * rate):
            self._short_reported = True
            self.warnings.append(
                f"decoded {frames / rate:.1f} s of the {declared / rate:.1f} s the header declares: "
                "the file may be truncated or still being written"
            )

    def _soundfile_opens(self) -> Exception | None:
        """None when soundfile can open the file, else its error (PyAV is tried then)."""
        if _ogg_is_chained(self.path):
            # libsndfile decodes only the first link of a chained Ogg file and says nothing of the rest.
            return ValueError("chained Ogg stream (libsndfile reads only its first link)")
        probe: list[str] = []
        try:
            import soundfile as sf

            with decoder_stderr(probe):
                f = sf.SoundFile(str(self.path))
            f.close()
        except Exception as exc:  # libsndfile reports unknown formats as generic errors
            return exc  # what its MP3 probe printed about a file it then refused is no news
        for w in probe:
            _add_warning(self.warnings, w)
        return None

    def _source_blocks(self) -> Iterator[np.ndarray]:
        """Blocks (frames, channels) from soundfile; PyAV for what soundfile refuses or gives up on.

        Where soundfile fails mid-way (libsndfile rejects some valid Ogg Opus pages and loses sync at the
        cut of a truncated FLAC, where ffmpeg decodes up to the cut), PyAV decodes the file again and the
        stream goes on from the frame where soundfile stopped.
        """
        sf_error = self._soundfile_opens()
        done = 0
        if sf_error is None:
            try:
                for block in self._soundfile_blocks():
                    done += block.shape[0]
                    yield block
                return
            except AudioDecodeError:
                raise
            except Exception as exc:
                sf_error = exc
        yield from self._pyav_from(done, sf_error)

    def _pyav_from(self, skip: int, sf_error: Exception | None) -> Iterator[np.ndarray]:
        """PyAV's blocks after its first `skip` frames (those soundfile gave before it failed)."""
        sf_cause = _describe(sf_error, self.path)
        rate, channels, declared = self.source_rate, self.channels, self.declared_frames
        produced = 0
        try:
            for block in self._pyav_blocks():
                n = block.shape[0]
                if skip:
                    if (self.source_rate, block.shape[1]) != (rate, channels):
                        raise AudioDecodeError(
                            self.path,
                            f"soundfile failed after {skip} frames ({sf_cause}) and ffmpeg decodes "
                            f"{block.shape[1]} ch at {self.source_rate} Hz, not {channels} at {rate} Hz",
                        )
                    if declared:  # soundfile's count is the header's own (FLAC STREAMINFO, MP3 Xing)
                        self.declared_frames = declared
                    if produced <= skip < produced + n:
                        _add_warning(
                            self.warnings,
                            f"soundfile failed at {skip / rate:.1f} s ({sf_cause}); "
                            "decoded the rest with ffmpeg",
                        )
                if produced + n > skip:
                    yield block[max(0, skip - produced) :]
                produced += n
        except AudioDecodeError:
            raise
        except Exception as exc:
            cause = _describe(exc, self.path)
            if skip or produced:
                causes = f"soundfile: {sf_cause}; ffmpeg: {cause}" if skip else cause
                raise AudioDecodeError(
                    self.path, f"decoding failed after {max(skip, produced)} frames ({causes})"
                ) from exc
            raise AudioDecodeError(
                self.path,
                f"not a readable audio file: unknown format or corrupt data "
                f"(soundfile: {sf_cause}; ffmpeg: {cause})",
            ) from exc
        if skip and produced <= skip:  # ffmpeg found no audio past the point where soundfile failed
            self.source_rate, self.channels, self.declared_frames = rate, channels, declared
            _add_warning(self.warnings, f"decoding stopped at {skip / rate:.1f} s ({sf_cause})")

    def _seen(self) -> str:
        """What the decoder reported before failing, for the error message ("" when nothing)."""
        return "".join(f"; {w}" for w in self.warnings)

    def _check_block(self, block: np.ndarray, offset: int) -> None:
        if self.check_finite and not np.all(np.isfinite(block)):
            bad = offset + int(np.argmax(~np.isfinite(block).all(axis=1)))
            raise AudioDecodeError(self.path, f"NaN or infinite sample values (first at frame {bad})")

    # ---------------------------------------------------------------------------------- public
    def __iter__(self) -> Iterator[np.ndarray]:
        import soxr

        # Each iteration decodes from the start (a "center" scan iterates twice).
        self.source_frames = self.n_samples = 0
        self.complete = False
        resampler = None
        held = np.zeros(0, dtype=np.float32)
        for block in self._source_blocks():
            self._check_block(block, self.source_frames)
            self.source_frames += block.shape[0]
            mono = _downmix(block)
            if self.source_rate != self.sr:
                if resampler is None:
                    resampler = soxr.ResampleStream(
                        self.source_rate, self.sr, 1, dtype="float32", quality="HQ"
                    )
                mono = resampler.resample_chunk(mono, last=False)
            out = np.concatenate([held, mono]) if held.size else mono
            held = out[-_HOLDBACK:].copy()
            out = out[:-_HOLDBACK] if out.size > _HOLDBACK else out[:0]
            if out.size:
                self.n_samples += out.size
                yield np.ascontiguousarray(out, dtype=np.float32)
        if self.source_frames == 0:
            raise AudioDecodeError(self.path, "no audio samples (zero-length audio)")
        self.complete = True
        self._check_short(self.source_frames)
        if resampler is not None:
            tail = resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
            held = np.concatenate([held, tail])
            del resampler  # a soxr object left to the interpreter's exit makes nanobind report a leak
        want = target_length(self.source_frames, self.source_rate, self.sr) - self.n_samples
        if want < 0:  # cannot happen with soxr (its output is within a sample of the target)
            raise AudioDecodeError(self.path, "internal error: resampler produced too many samples")
        last = np.zeros(want, dtype=np.float32)
        last[: min(want, held.size)] = held[:want]
        if last.size:
            self.n_samples += last.size
            yield last

    @property
    def duration_s(self) -> float:
        """Seconds of the source; after a partial ("head") read, the header's count when it has one."""
        if not self.source_rate:
            return 0.0
        frames = self.source_frames
        if not self.complete:  # libsndfile's count (already clamped to the data), else the container's
            frames = max(frames, self.expected_frames or self.declared_frames or 0)
        return frames / self.source_rate

    def read_window(self, length: int, mode: str) -> np.ndarray:
        """The one window of `length` samples at `sr` that a "head" or "center" crop takes.

        The same samples as cutting a full decode (`preprocess.windows.clip_windows`): a clip of at most
        `length` is returned whole (unpadded); "head" decodes only the first window's worth;
        "center" seeks where the file's frame count can be trusted and otherwise scans the file twice
        (count, then read), holding one window plus a block at a time either way.
        """
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        if mode == "head":
            return self._read_span(0, length)
        if mode == "center":
            return self._read_center(length)
        raise ValueError(f"mode must be 'head' or 'center', not {mode!r}")

    def _read_span(self, lo: int, hi: int) -> np.ndarray:
        """Samples [lo, hi) of one streamed pass, which stops once it is past `hi`.

        A stream that ends at or before `hi` gives [lo, end): so a clip of at most one window is whole.
        """
        parts: list[np.ndarray] = []
        pos = 0
        it = iter(self)
        try:
            for block in it:
                a, b = max(lo, pos), min(hi + 1, pos + block.size)  # one sample past hi: "longer than"
                if a < b:
                    parts.append(block[a - pos : b - pos])
                pos += block.size
                if pos > hi:
                    break
        finally:
            it.close()  # closes the decoder and frees the resampler now, not at interpreter exit
        wave = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
        return wave[: hi - lo] if pos > hi else wave

    def _read_center(self, length: int) -> np.ndarray:
        frames = self._trusted_frames()
        if frames is not None:
            n_out = target_length(frames, self.source_rate, self.sr)
            if n_out <= 3 * length:  # a short file: decoding it whole holds at most three windows
                return _center(np.concatenate(list(self)), length)
            # Far from both ends, so the length fix and the resampler's tail play no part.
            wave = self._seek_read(frames, (n_out - length) // 2, length)
            if wave is not None:
                return wave
        # Unknown or untrusted length: count the source frames first (no resampling), then read.
        n_src = self._count_source_frames()
        n_out = target_length(n_src, self.source_rate, self.sr)
        if n_out <= length:
            wave = self._read_span(0, n_out)
        else:
            lo = (n_out - length) // 2
            wave = self._read_span(lo, lo + length)
            wave = wave[:length]
        self.source_frames, self.n_samples, self.complete = n_src, n_out, True
        self._check_short(n_src)
        return wave

    def read_crop(self, length: int, pick: Callable[[int], int]) -> np.ndarray:
        """The `length` samples at `sr` from `pick(n)` on, n being the full decode's length in samples.

        For the random crop of "reference": the same samples, bit for bit, as
        `load_audio(path).samples[s : s + length]` with `s = pick(n)`. `pick` is called once, and only
        when n > length (the references draw only for clips longer than a window), so a seeded draw is
        the one a full decode gets; it must return a start in [0, n - length]. A clip of at most
        `length` samples is returned whole. n comes from a lossless file's header, verified by a seek,
        else from a counting pass (decoding without resampling). Then a lossless file at `sr` is read
        from a seek; anything else is decoded and resampled from the start up to the window's end and
        only the window kept, as a resampler restarted mid-file gives other bits. Memory: a window plus
        a block, whatever the file's length.
        """
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        frames = self._trusted_frames()
        if not self._lossless:
            frames = None  # a lossy decoder's count is checked by decoding, not by the header
        n_src = frames if frames is not None else self._count_source_frames()
        n_out = target_length(n_src, self.source_rate, self.sr)
        if n_out <= length:
            wave = self._read_span(0, n_out)
            want = n_out
        else:
            start = pick(n_out)
            if not isinstance(start, (int, np.integer)) or not 0 <= start <= n_out - length:
                raise ValueError(f"pick({n_out}) returned {start!r}, not a start in [0, {n_out - length}]")
            start, want = int(start), length
            wave = None
            if frames is not None and self.source_rate == self.sr:  # no resampler: source frames as they are
                wave = self._seek_read(frames, start, length)
            if wave is None:
                wave = self._read_span(start, start + length)
        if wave.size != want:  # the count pass and the read disagree: the file changed in between
            raise AudioDecodeError(
                self.path, f"read {wave.size} samples where {want} were counted: the file changed while read"
            )
        self.source_frames, self.n_samples, self.complete = n_src, n_out, True
        self._check_short(n_src)
        return wave

    def _count_source_frames(self) -> int:
        """Source frames of a full decode, counted by decoding without resampling (one block held)."""
        n_src = self.source_frames = 0
        for block in self._source_blocks():
            self._check_block(block, n_src)
            n_src += block.shape[0]
            self.source_frames = n_src  # for the "decoding failed after N frames" message
        if n_src == 0:
            raise AudioDecodeError(self.path, "no audio samples (zero-length audio)")
        return n_src

    def _trusted_frames(self) -> int | None:
        """soundfile's frame count when a seek to its last frame finds exactly that frame, else None."""
        if self._soundfile_opens() is not None:
            return None
        try:
            with self._sf_open() as f:
                self._soundfile_meta(f)
                if not f.seekable() or self.expected_frames is None:
                    return None
                self._sf_call(f.seek, int(f.frames) - 1)
                if self._sf_call(f.read, 2, dtype="float32", always_2d=True).shape[0] != 1:
                    return None
                return int(f.frames)
        except AudioDecodeError:
            raise
        except Exception:  # a header that points past the data: scan instead
            return None

    def _seek_read(self, frames: int, start: int, length: int) -> np.ndarray | None:
        """Output samples [start, start + length) from a seek; None if the file gave fewer or failed."""
        import soxr

        rate, sr = self.source_rate, self.sr
        if rate == sr:
            src0 = o0 = start
            src1 = start + length
            resampler = None
        else:
            # Start on a source frame that maps to a whole output sample, so the restarted resampler's
            # output grid is the full decode's; the margin lets its filter settle before the window.
            step = rate // math.gcd(rate, sr)
            first = start * rate / sr - _SEEK_MARGIN_S * rate
            src0 = max(0, int(first // step) * step)
            o0 = src0 * sr // rate
            src1 = min(frames, int(math.ceil((start + length) * rate / sr + _SEEK_MARGIN_S * rate)))
            resampler = soxr.ResampleStream(rate, sr, 1, dtype="float32", quality="HQ")
        out: list[np.ndarray] = []
        pos = src0
        try:
            for block in self._soundfile_blocks(src0, src1):
                self._check_block(block, pos)
                pos += block.shape[0]
                mono = _downmix(block)
                out.append(resampler.resample_chunk(mono, last=False) if resampler is not None else mono)
        except AudioDecodeError:
            raise
        except Exception:  # damaged data inside the window: the streaming scan (with PyAV to go on) reads it
            return None
        if resampler is not None:
            out.append(resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
            del resampler
        y = np.concatenate(out) if out else np.zeros(0, dtype=np.float32)
        wave = y[start - o0 : start - o0 + length]
        if wave.size != length:
            return None
        self.source_frames, self.complete = frames, True
        self.n_samples = target_length(frames, rate, sr)
        return np.ascontiguousarray(wave, dtype=np.float32)


def _center(wave: np.ndarray, length: int) -> np.ndarray:
    """The middle `length` samples, as `preprocess.windows.clip_windows` takes them; a short clip whole."""
    if wave.size <= length:
        return wave
    start = (wave.size - length) // 2
    return wave[start : start + length]


def _container_frames(container, stream, rate: int) -> int | None:
    """Source frames the container declares (stream duration, else the container's), or None."""
    try:
        if stream.duration and stream.time_base:
            return int(round(float(stream.duration * stream.time_base) * rate))
        if container.duration:
            return int(round(container.duration / 1_000_000 * rate))  # av.time_base: microseconds
    except (TypeError, ValueError, OverflowError):
        pass
    return None


def _describe(exc: BaseException | None, path: Path | None = None) -> str:
    """A one-line cause from a decoder exception, without the file name the message already carries."""
    if exc is None:
        return "no error"
    text = str(exc).strip() or type(exc).__name__
    text = re.sub(r"^\[Errno -?\d+\] ", "", text)
    if path is not None:
        text = text.replace(f"Error opening {str(path)!r}: ", "").replace(f": {str(path)!r}", "")
    text = text.replace(": 'avcodec_send_packet()'", "")
    # libsndfile's MP3 reader says this of any file it cannot parse; the path was checked to be a file.
    text = text.replace("File does not exist or is not a regular file (possibly a pipe?).", "not recognised")
    return text.replace("\n", " ").strip()


def load_audio(path: str | os.PathLike, sr: int = DEFAULT_SR) -> DecodedAudio:
    """Decode a file to mono float32 at `sr` (see the module docstring); AudioDecodeError on bad input."""
    stream = AudioStream(path, sr)
    out: np.ndarray | None = None
    blocks: list[np.ndarray] = []
    filled = 0
    for block in stream:
        if out is None and not blocks and stream.expected_frames:
            # Known length: fill one array, so a long file does not need twice its size at the end.
            out = np.empty(target_length(stream.expected_frames, stream.source_rate, sr), dtype=np.float32)
        if out is not None and filled + block.size <= out.size:
            out[filled : filled + block.size] = block
            filled += block.size
            continue
        if out is not None:  # the header was wrong: go on with a list of blocks
            blocks.append(out[:filled])
            out = None
        blocks.append(block)
    if out is not None and not blocks:
        samples = out[:filled] if filled != out.size else out
    else:
        samples = np.concatenate(blocks) if len(blocks) != 1 else blocks[0]
    return DecodedAudio(
        samples=samples,
        sample_rate=int(sr),
        duration_s=stream.duration_s,
        channels=stream.channels,
        source_rate=stream.source_rate,
        warnings=list(stream.warnings),
    )
