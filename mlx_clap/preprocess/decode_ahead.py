"""Input discovery and decoding ahead of the model for `mlx-clap embed`.

Files are found (folders walked; arguments that do not exist are reported), then decoded in worker
threads under a memory budget, so the model never waits for the decoder and memory stays bounded:
"windows-mean" hands a long file over as a stream of blocks, "head" / "center" read only the one window
they embed (`AudioStream.read_window`), and "reference" only its random crop (`AudioStream.read_crop`),
so no mode but "fusion" holds a whole long file.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

# Suffixes picked up inside folders; files named on the command line are always tried.
AUDIO_SUFFIXES = {
    ".wav", ".wave", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".m4b", ".aac", ".alac",
    ".aif", ".aiff", ".aifc", ".caf", ".mp4", ".wma", ".webm", ".mka", ".w64", ".au", ".snd",
}  # fmt: skip
# In windows-mean mode a file longer than this is embedded while it decodes (bounded memory).
STREAM_AFTER_S = 30.0
# Decoded audio held ahead of the model, at most (the file the model needs next may always exceed it).
DECODE_BUDGET_BYTES = 1 << 30


# ------------------------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class ObjectPath:
    """An object on an object store given as an input (`s3://bucket/key`), with the size and mtime its
    listing gave: `str()` is the URI, the row's path. Nothing here reads it (see
    mlx_clap.sync.remote_inputs); `stat_key` answers from the listing, as os.stat does for a file."""

    uri: str
    size: int
    mtime: float

    def __str__(self) -> str:
        return self.uri

    @property
    def name(self) -> str:
        return self.uri.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix


@dataclass
class InputFile:
    path: Path | ObjectPath  # absolute, symlinks not resolved (the name the user knows), or an object
    rel: Path  # relative to the common root of the inputs: mirrored under --out for --format json


IGNORED_KINDS = ("hidden", "not_audio_name", "symlinked_folders", "subfolders")


def discover(
    paths: tuple[str, ...], recursive: bool, ignored: dict[str, int] | None = None
) -> tuple[list[InputFile], list[tuple[str, str]]]:
    """Files to embed (sorted, de-duplicated) and (path, cause) for arguments that do not exist.

    Inside folders, files are picked by audio extension; hidden files and folders, other files,
    symbolic links to folders and (without `recursive`) sub-folders are passed over, and counted by
    kind (IGNORED_KINDS) into `ignored` when given, in the same walk."""
    counts = dict.fromkeys(IGNORED_KINDS, 0)
    missing: list[tuple[str, str]] = []
    found: list[Path] = []
    roots: list[Path] = []
    for raw in paths:
        p = Path(os.path.abspath(os.path.expanduser(raw)))
        if p.is_dir():
            roots.append(p)
            found += _walk(p, recursive, counts)
        elif p.exists() or p.is_symlink():
            roots.append(p.parent)
            found.append(p)
        else:
            missing.append((str(p), "no such file or folder"))
    if ignored is not None:
        ignored.update({k: v for k, v in counts.items() if v})
    if not found:
        return [], missing
    common = Path(os.path.commonpath([str(r) for r in roots]))
    seen: set[Path] = set()
    files = []
    for f in found:
        if f not in seen:
            seen.add(f)
            files.append(InputFile(f, f.relative_to(common)))
    return files, missing


def _walk(top: Path, recursive: bool, counts: dict[str, int]) -> list[Path]:
    """The audio files of one folder argument, sorted; what is passed over is counted."""
    out: list[Path] = []
    walk = os.walk(top) if recursive else [_listing(top)]
    for dirpath, dirnames, filenames in walk:
        keep = []
        for d in dirnames:
            if d.startswith("."):
                counts["hidden"] += 1
            elif os.path.islink(os.path.join(dirpath, d)):
                counts["symlinked_folders"] += 1  # os.walk lists them but does not descend
            elif not recursive:
                counts["subfolders"] += 1
            else:
                keep.append(d)
        dirnames[:] = sorted(keep)
        names = []
        for f in filenames:
            if f.startswith("."):
                counts["hidden"] += 1
            elif Path(f).suffix.lower() not in AUDIO_SUFFIXES:
                counts["not_audio_name"] += 1
            else:
                names.append(f)
        out += sorted(Path(dirpath) / f for f in names)
    return out if not recursive else sorted(out)


def _listing(folder: Path) -> tuple[str, list[str], list[str]]:
    dirs, files = [], []
    try:
        for entry in os.scandir(folder):
            (dirs if entry.is_dir() else files).append(entry.name)
    except OSError:
        pass
    return str(folder), dirs, files


def _is_audio_name(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in AUDIO_SUFFIXES


def stat_key(path: Path | ObjectPath) -> tuple[str, int, float]:
    """(path, size, mtime): what a store row records to tell an unchanged file from a changed one."""
    if isinstance(path, ObjectPath):
        return (path.uri, path.size, path.mtime)
    st = os.stat(path)
    return (str(path), int(st.st_size), float(st.st_mtime))


# ---------------------------------------------------------------------------------------- decoding
@dataclass
class Decoded:
    """A decoded file: whole `samples`, or `blocks` still streaming from a decoder thread."""

    file: InputFile
    key: tuple[str, int, float]
    stream: Any  # mlx_clap.preprocess.audio.AudioStream (metadata final once decoding has finished)
    samples: Any = None
    blocks: Iterator | None = None
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    nbytes: int = 0  # taken from the MemoryBudget; given back once embedded


class MemoryBudget:
    """Bytes of decoded audio that decoder threads may hold ahead of the model.

    A decoder waits while the budget is spent, except for the file the model consumes next (`advance`),
    which always proceeds: so there is no deadlock, and memory is about the budget plus that one file.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.next_index = 0
        self.closed = False
        self._cond = threading.Condition()

    def acquire(self, nbytes: int, index: int) -> None:
        with self._cond:
            while self.used + nbytes > self.limit and index > self.next_index and not self.closed:
                self._cond.wait(0.5)
            self.used += nbytes

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.used -= nbytes
            self._cond.notify_all()

    def advance(self, index: int) -> None:
        with self._cond:
            self.next_index = index
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


_END = object()


class _BlockFeed:
    """Run the rest of a block iterator in a daemon thread, `maxsize` blocks ahead of the reader."""

    def __init__(self, head: list, it: Iterator, maxsize: int = 4):
        self._head = head
        self._q: queue.Queue = queue.Queue(maxsize=maxsize)
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(it,), daemon=True)
        self._thread.start()

    def _run(self, it: Iterator) -> None:
        try:
            for block in it:
                if not self._put(block):
                    return
            self._put(_END)
        except BaseException as exc:  # handed to the reader, which reports it for this file
            self._put(exc)
        finally:
            # Close the decoder here, in this thread, so its file and soxr resampler are freed now and
            # not left to the interpreter's exit (where nanobind prints a "leaked" report for them).
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def _put(self, obj: Any) -> bool:
        while not self._cancel.is_set():
            try:
                self._q.put(obj, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def cancel(self, wait_s: float = 10.0) -> None:
        """Stop the decoder thread and wait (a block's decoding at most) until it has let go of the file."""
        self._cancel.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(wait_s)

    def __iter__(self) -> Iterator:
        yield from self._head
        self._head = []
        while True:
            obj = self._q.get()
            if obj is _END:
                return
            if isinstance(obj, BaseException):
                raise obj
            yield obj


Window = tuple[str, int] | tuple[str, int, Callable[[int], int]]


def window_for(family: Any, long_audio: str, seed: int | None) -> Window | None:
    """`decode_file`'s `window` for a long-audio mode, or None where the mode needs every sample.

    "head" / "center" read their window; "reference" reads its random crop where the family's reference
    takes one window (`family.reference_crops`), drawn per file from a fresh `random_source(seed)`, as
    one `embed_waveforms(..., seed=seed)` call per file draws it.
    """
    if family is None:
        return None
    if long_audio in ("head", "center"):
        return (long_audio, int(family.clip_samples))
    if long_audio == "reference" and getattr(family, "reference_crops", False):

        def pick(n: int) -> int:
            return family.reference_start(n, family.random_source(seed))

        return ("reference", int(family.clip_samples), pick)
    return None


def decode_file(
    file: InputFile,
    sr: int,
    stream_long: bool,
    index: int = 0,
    budget: MemoryBudget | None = None,
    window: Window | None = None,
) -> Decoded:
    """Decode one file (in a worker thread); errors are returned, not raised.

    `window=("head" | "center", samples)` reads only that window (a clip of at most one window whole),
    and `("reference", samples, pick)` only the crop at `pick(n)` (`AudioStream.read_crop`), so a long
    file costs one window of memory; otherwise the whole file, or with `stream_long` the first
    STREAM_AFTER_S seconds and a stream of the rest. `window_for` makes the tuple for a long-audio mode.
    """
    import numpy as np

    from mlx_clap.preprocess.audio import AudioDecodeError, AudioStream

    try:
        key = stat_key(file.path)
    except OSError:
        key = (str(file.path), -1, -1.0)
    held = 0
    try:
        stream = AudioStream(file.path, sr)
        if window is not None:
            if window[0] == "reference":
                samples = stream.read_crop(window[1], window[2])
            else:
                samples = stream.read_window(window[1], window[0])
            if budget is not None:
                budget.acquire(samples.nbytes, index)
                held = samples.nbytes
            return Decoded(file, key, stream, samples=samples, warnings=list(stream.warnings), nbytes=held)
        it = iter(stream)
        blocks: list = []
        n = 0
        for block in it:
            if budget is not None:
                budget.acquire(block.nbytes, index)
                held += block.nbytes
            blocks.append(block)
            n += block.size
            if stream_long and n > STREAM_AFTER_S * sr:
                return Decoded(file, key, stream, blocks=_BlockFeed(blocks, it), nbytes=held)
        samples = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
        return Decoded(file, key, stream, samples=samples, warnings=list(stream.warnings), nbytes=held)
    except AudioDecodeError as exc:
        error = exc.cause
    except Exception as exc:  # a decoder bug must not end the batch: record it for this file
        error = f"unexpected decoder error: {type(exc).__name__}: {exc}"
    if budget is not None:
        budget.release(held)
    return Decoded(file, key, None, error=error)
