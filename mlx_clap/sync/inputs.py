"""What a sync run is given: the files found under its PATH arguments, what was passed over, and what
does not exist or cannot be read as a file.

Every rule here is about the inputs only (the store is consulted just to say where the rows of a path
that vanished went); the plan against the store is in mlx_clap.sync.plan.
"""

from __future__ import annotations

import fnmatch
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mlx_clap.preprocess.audio import probe_seconds
from mlx_clap.preprocess.decode_ahead import InputFile, ObjectPath, discover
from mlx_clap.store import is_remote
from mlx_clap.sync.remote_inputs import list_objects, object_gone

# Probing every file's header costs about a millisecond each; past this many files a sample of them
# gives bytes per audio second and the rest are estimated from their size.
PROBE_ALL_FILES = 2000
PROBE_SAMPLE = 200
DEFAULT_BYTES_PER_SECOND = 16000.0  # 128 kbit/s, when nothing could be probed

IGNORED_NOTES = {
    "hidden": "hidden files and folders (name starting with '.')",
    "not_audio_name": "files without an audio extension",
    "symlinked_folders": "symbolic links to folders (not followed)",
    "subfolders": "sub-folders (no --recursive)",
    "excluded": "files matching --exclude",
}

FILE_KINDS = (
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISDIR, "folder"),
)


@dataclass
class Inputs:
    """The inputs of a run: `files` to consider (sorted, regular files), `missing` (path, cause) for
    arguments that do not exist and files refused before anything reads them, `ignored` counts of what
    was passed over inside folders, and the `excluded` paths (--exclude)."""

    paths: tuple[str, ...]
    recursive: bool
    files: list[InputFile]
    missing: list[tuple[str, str]] = field(default_factory=list)
    ignored: dict[str, int] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)


def collect_inputs(
    paths: Sequence[str | os.PathLike], recursive: bool, excludes: Sequence[str] = ()
) -> Inputs:
    """Walk the PATH arguments: audio files inside folders (see `discover`) and under object-store
    prefixes (`s3://bucket/prefix`, see mlx_clap.sync.remote_inputs), minus --exclude matches, with
    FIFOs and devices refused (opening one would block or never end)."""
    args = tuple(os.fspath(p) for p in paths)
    ignored: dict[str, int] = {}
    files, missing = discover(tuple(a for a in args if not is_remote(a)), recursive, ignored)
    seen = set()
    for uri in dict.fromkeys(a.rstrip("/") for a in args if is_remote(a)):
        found, gone = list_objects(uri, recursive, ignored)
        files += [f for f in found if str(f.path) not in seen]
        seen.update(str(f.path) for f in found)
        missing += gone
    files, excluded = exclude_files(files, args, tuple(excludes))
    if excluded:
        ignored["excluded"] = len(excluded)
    files, refused = refuse_non_regular(files)
    return Inputs(args, recursive, files, missing + refused, ignored, excluded)


def _size(path: Path | ObjectPath) -> int:
    if isinstance(path, ObjectPath):
        return path.size
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def estimate_seconds(files: list[InputFile]) -> list[float]:
    """Audio seconds per file, for a progress bar that moves with the work rather than the file count.

    Durations come from the headers when there are few files (or for a sample of many), the others
    from their size at the sampled bytes per second.
    """
    n = len(files)
    probe_idx = range(n) if n <= PROBE_ALL_FILES else range(0, n, max(1, n // PROBE_SAMPLE))
    known: dict[int, float] = {}
    for i in probe_idx:
        if isinstance(files[i].path, ObjectPath):
            continue  # an object's header is not read for an estimate: its size serves
        sec = probe_seconds(files[i].path)
        if sec is not None:
            known[i] = sec
    sizes = {i: _size(files[i].path) for i in known}
    probed_bytes = sum(sizes.values())
    probed_secs = sum(known.values())
    rate = probed_bytes / probed_secs if probed_bytes > 0 and probed_secs > 0 else DEFAULT_BYTES_PER_SECOND
    return [known[i] if i in known else _size(f.path) / rate for i, f in enumerate(files)]


def describe_ignored(ignored: dict[str, int]) -> str:
    """One line for the summary, with how to include what was passed over."""
    parts = [f"{n} {IGNORED_NOTES[k]}" for k, n in ignored.items()]
    how = "name a file or folder on the command line to include it (files named there are always tried)"
    if ignored.get("subfolders"):
        how = "add --recursive for sub-folders; " + how
    return "not considered: " + ", ".join(parts) + "; " + how


def exclude_files(
    files: list[InputFile], paths: tuple[str, ...], patterns: tuple[str, ...]
) -> tuple[list[InputFile], list[str]]:
    """(kept, excluded paths): files found inside a folder named in `paths` whose path relative to that
    folder, or whose file name, matches one of the fnmatch `patterns` (case-sensitive; `*` also matches
    "/") are excluded. Files named on the command line are always kept, as for the other kinds passed
    over."""
    if not patterns:
        return files, []
    named = {raw.rstrip("/") if is_remote(raw) else os.path.abspath(os.path.expanduser(raw)) for raw in paths}
    folders = [Path(p) for p in named if not is_remote(p) and os.path.isdir(p)]
    kept: list[InputFile] = []
    excluded: list[str] = []
    for f in files:
        if str(f.path) in named:
            kept.append(f)
            continue
        if isinstance(f.path, ObjectPath):  # `rel` is its key under the prefix named
            names = {f.path.name, f.rel.as_posix()}
        else:
            names = {f.path.name} | {
                f.path.relative_to(d).as_posix() for d in folders if f.path.is_relative_to(d)
            }
        if any(fnmatch.fnmatchcase(n, pat) for n in names for pat in patterns):
            excluded.append(str(f.path))
        else:
            kept.append(f)
    return kept, excluded


def refuse_non_regular(files: list[InputFile]) -> tuple[list[InputFile], list[tuple[str, str]]]:
    """(regular files, (path, cause) of the others). Checked with one stat (through a symbolic link)
    before anything reads a file: opening a FIFO blocks until a writer comes, and a device such as
    /dev/zero never ends, so hashing, probing or decoding one would hang the run. A file that cannot be
    stat'ed is kept: the decoder names the cause."""
    regular: list[InputFile] = []
    refused: list[tuple[str, str]] = []
    for f in files:
        if isinstance(f.path, ObjectPath):
            regular.append(f)  # an object is bytes: nothing that could block
            continue
        try:
            mode = os.stat(f.path).st_mode
        except OSError:
            regular.append(f)
            continue
        if stat.S_ISREG(mode):
            regular.append(f)
        else:
            kind = next((name for test, name in FILE_KINDS if test(mode)), "special file")
            refused.append((str(f.path), f"not a regular file ({kind})"))
    return regular, refused


def file_gone(path: str) -> bool:
    """Whether nothing exists at `path` any more (a dangling symbolic link counts as gone). A path that
    cannot be checked (permission denied, I/O error) is not gone: its row is kept. A URI asks the
    object store."""
    if is_remote(path):
        return object_gone(path)
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    return False
