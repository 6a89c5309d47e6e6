"""Decode any audio file to float32 mono at the model rate (48 kHz), in bounded memory.

Pipeline, as LAION's file API does it with `librosa.load(path, sr=48000)` (docs/numerics.md §10):
1. decode to float32 with soundfile (WAV, FLAC, AIFF, OGG Vorbis/Opus, MP3, ...); anything soundfile
   refuses (M4A/AAC/ALAC/MP4, ...) goes through PyAV (FFmpeg), which drops AAC encoder priming as the
   container signals it (edit list / skip samples) and honours the stream's start time;
2. downmix by the mean over channels;
3. resample with soxr "HQ" (librosa's default `soxr_hq`), streamed block by block with
   `soxr.ResampleStream`, which gives the same samples as the one-shot call;
4. fix the length to ceil(n * (sr / source_rate)) in float64, exactly as `librosa.resample` does.

Files are read in blocks, so decoding a 2-hour file holds one block of source audio at a time;
`AudioStream` yields the 48 kHz blocks for callers that do not want the whole waveform either.
"""

from __future__ import annotations

import errno
import math
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_SR = 48000
# Source frames per decoded block: ~6 s at 44.1 kHz, a few MB of float32 per channel.
BLOCK_FRAMES = 1 << 18
# Output samples held back so the final length can be fixed without revisiting emitted blocks.
_HOLDBACK = 64


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


class AudioStream:
    """Iterate a file as mono float32 blocks at `sr`; metadata is filled in as decoding proceeds.

    After a full iteration, `source_frames`, `source_rate`, `channels` and `n_samples` are final and the
    blocks together hold exactly `target_length(source_frames, source_rate, sr)` samples. Errors raise
    AudioDecodeError; with `check_finite` NaN/Inf samples are an error.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        sr: int = DEFAULT_SR,
        block_frames: int = BLOCK_FRAMES,
        check_finite=True,
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

    # ---------------------------------------------------------------------------------- decoders
    def _soundfile_blocks(self) -> Iterator[np.ndarray]:
        import soundfile as sf

        with sf.SoundFile(str(self.path)) as f:
            self.source_rate, self.channels, self.decoder = int(f.samplerate), int(f.channels), "soundfile"
            self.expected_frames = int(f.frames) if f.frames > 0 else None
            self._check_format()
            while True:
                block = f.read(self.block_frames, dtype="float32", always_2d=True)
                if block.shape[0] == 0:
                    return
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
                self.warnings.append(
                    f"skipped {bad_packets} damaged packet(s): {_describe(last_error, self.path)}"
                )

    def _check_format(self) -> None:
        if self.source_rate <= 0:
            raise AudioDecodeError(self.path, f"invalid sample rate {self.source_rate}")
        if self.channels <= 0:
            raise AudioDecodeError(self.path, f"invalid channel count {self.channels}")

    def _source_blocks(self) -> Iterator[np.ndarray]:
        """Blocks (frames, channels) from soundfile, or from PyAV when soundfile cannot open the file."""
        sf_error = None
        try:
            import soundfile as sf

            with sf.SoundFile(str(self.path)):
                pass
        except Exception as exc:  # libsndfile reports unknown formats as generic errors
            sf_error = exc
        if sf_error is None:
            try:
                yield from self._soundfile_blocks()
                return
            except AudioDecodeError:
                raise
            except Exception as exc:
                if self.source_frames:  # some audio came out: the data is damaged after that point
                    raise AudioDecodeError(
                        self.path, f"decoding failed after {self.source_frames} frames ({exc})"
                    ) from exc
                sf_error = exc
        try:
            yield from self._pyav_blocks()
        except AudioDecodeError:
            raise
        except Exception as exc:
            cause = _describe(exc, self.path)
            if self.source_frames:
                raise AudioDecodeError(
                    self.path, f"decoding failed after {self.source_frames} frames ({cause})"
                ) from exc
            raise AudioDecodeError(
                self.path,
                f"not a readable audio file: unknown format or corrupt data "
                f"(soundfile: {_describe(sf_error, self.path)}; ffmpeg: {cause})",
            ) from exc

    # ---------------------------------------------------------------------------------- public
    def __iter__(self) -> Iterator[np.ndarray]:
        import soxr

        resampler = None
        held = np.zeros(0, dtype=np.float32)
        for block in self._source_blocks():
            if self.check_finite and not np.all(np.isfinite(block)):
                bad = self.source_frames + int(np.argmax(~np.isfinite(block).all(axis=1)))
                raise AudioDecodeError(self.path, f"NaN or infinite sample values (first at frame {bad})")
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
        if resampler is not None:
            tail = resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
            held = np.concatenate([held, tail])
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
        return self.source_frames / self.source_rate if self.source_rate else 0.0


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
    )
