"""Inputs on object storage: `s3://bucket/prefix` (every audio object under it) or `s3://bucket/key.wav`
(one object), found, hashed and decoded for a sync as local files are.

The object store is reached as a store on it is (mlx_clap.store.location: pyarrow.fs, the endpoint and
credentials of the usual AWS_* environment variables), so one set of settings serves inputs and output,
on the driver and on Ray workers alike. A listing gives each object's size and mtime, which play the part
of os.stat: an unchanged object is skipped without a read. Hashing streams the object (sha256 from the
bytes); decoding downloads it to a temporary file first, in 1 MiB chunks, so memory stays bounded for any
length and the decoders (libsndfile, PyAV) read and seek a real file with its own name suffix, exactly as
they read a local copy. The file is removed once decoded (or, for a long file streamed to the model,
once its stream is done).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
import weakref
from pathlib import Path, PurePosixPath
from typing import Any

from mlx_clap.preprocess.decode_ahead import (
    AUDIO_SUFFIXES,
    Decoded,
    InputFile,
    MemoryBudget,
    ObjectPath,
    Window,
    decode_file,
)
from mlx_clap.store import locate

CHUNK_BYTES = 1 << 20  # read size when hashing or downloading an object
# What decides which credentials the S3 client picks up when it is made (besides the storage options).
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")

__all__ = ["ObjectPath", "decode_input", "list_objects", "object_gone", "object_sha256"]


def _filesystem(uri: str) -> tuple[Any, str]:
    """pyarrow FileSystem and path (bucket/key) of `uri`, configured as a store at that URI would be."""
    loc = locate(uri)
    options = tuple(sorted((loc.storage_options or {}).items()))
    credentials = tuple(os.environ.get(k) for k in CREDENTIAL_ENV)
    fs = _cached_fs(uri.partition("://")[0], options, credentials)
    return fs, uri.partition("://")[2].rstrip("/")


@functools.lru_cache(maxsize=8)
def _cached_fs(scheme: str, options: tuple, credentials: tuple) -> Any:
    """One client per scheme and settings: making an S3 client costs about 20 ms, once per object
    would dominate hashing a large library of small files."""
    from mlx_clap.store import Location

    return Location(f"{scheme}://cache", None, dict(options) or None)._fs()[0]


def _cause(exc: BaseException) -> str:
    from mlx_clap.store.errors import lance_failure

    return lance_failure(exc)


def _key(uri: str, info: Any) -> tuple[str, int, float]:
    return (uri, int(info.size), info.mtime.timestamp() if info.mtime is not None else 0.0)


def list_objects(
    uri: str, recursive: bool, counts: dict[str, int]
) -> tuple[list[InputFile], list[tuple[str, str]]]:
    """The audio objects of one `uri` argument, sorted, and (uri, cause) when there is none to list. A
    prefix is listed like a folder: audio names only, no hidden names (a path part starting with '.'),
    sub-prefixes only when `recursive`; what is passed over is counted into `counts` (IGNORED_KINDS).
    An object named exactly is always taken. `rel` is the key under the prefix (--format json)."""
    import pyarrow.fs as pafs

    uri = uri.rstrip("/")
    try:
        fs, base = _filesystem(uri)
        info = fs.get_file_info(base)
        if info.type == pafs.FileType.File:
            return [InputFile(ObjectPath(uri, *_key(uri, info)[1:]), Path(info.base_name))], []
        if info.type == pafs.FileType.NotFound:
            bucket = locate(uri).missing_bucket()
            return [], [(uri, f"no such bucket: {bucket}" if bucket else "no such object or prefix")]
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=recursive))
    except OSError as exc:
        return [], [(uri, f"cannot list it: {_cause(exc)}")]
    files: list[InputFile] = []
    for i in infos:
        rel = PurePosixPath(i.path[len(base) :].lstrip("/"))
        if i.type == pafs.FileType.Directory:
            if not recursive:
                counts["subfolders"] = counts.get("subfolders", 0) + 1
            continue
        if any(part.startswith(".") for part in rel.parts):
            counts["hidden"] = counts.get("hidden", 0) + 1
        elif rel.suffix.lower() not in AUDIO_SUFFIXES:
            counts["not_audio_name"] = counts.get("not_audio_name", 0) + 1
        else:
            full = f"{uri}/{rel.as_posix()}"
            files.append(InputFile(ObjectPath(full, *_key(full, i)[1:]), Path(rel.as_posix())))
    return sorted(files, key=lambda f: str(f.path)), []


def object_sha256(path: ObjectPath) -> tuple[tuple[str, int, float], str]:
    """(stat key now, sha256 of the bytes), read as a stream. OSError when it cannot be read."""
    fs, key = _filesystem(path.uri)
    now = _key(path.uri, fs.get_file_info(key))
    digest = hashlib.sha256()
    with fs.open_input_stream(key) as fh:
        while chunk := fh.read(CHUNK_BYTES):
            digest.update(chunk)
    return now, digest.hexdigest()


def object_gone(uri: str) -> bool:
    """Whether no object is at `uri` any more. One that cannot be checked (unreachable, refused) is not
    gone: its row is kept."""
    import pyarrow.fs as pafs

    try:
        fs, key = _filesystem(uri)
        return fs.get_file_info(key).type == pafs.FileType.NotFound
    except OSError:
        return False


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _download(path: ObjectPath) -> tuple[str, tuple[str, int, float]]:
    """Copy the object to a temporary file with its name suffix: (that file, stat key when read)."""
    fs, key = _filesystem(path.uri)
    now = _key(path.uri, fs.get_file_info(key))
    fd, tmp = tempfile.mkstemp(prefix="mlx-clap-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as out, fs.open_input_stream(key) as src:
            shutil.copyfileobj(src, out, CHUNK_BYTES)
    except BaseException:
        _remove(tmp)
        raise
    return tmp, now


def decode_input(
    file: InputFile,
    sr: int,
    stream_long: bool,
    index: int = 0,
    budget: MemoryBudget | None = None,
    window: Window | None = None,
) -> Decoded:
    """`decode_file` for a local file or an object (downloaded first); errors are returned, not raised,
    and name the object by its URI, never the temporary copy."""
    if not isinstance(file.path, ObjectPath):
        return decode_file(file, sr, stream_long, index, budget, window)
    uri = file.path.uri
    try:
        tmp, key = _download(file.path)
    except OSError as exc:
        return Decoded(file, (uri, -1, -1.0), None, error=f"cannot read the object: {_cause(exc)}")
    d = decode_file(InputFile(Path(tmp), file.rel), sr, stream_long, index, budget, window)
    d.file, d.key = file, key
    if d.error is not None:
        d.error = d.error.replace(tmp, uri)
    if d.stream is not None:
        d.stream.warnings[:] = [w.replace(tmp, uri) for w in d.stream.warnings]
        d.warnings = [w.replace(tmp, uri) for w in d.warnings]
    if d.blocks is None:
        _remove(tmp)  # decoded whole (or its one window): the copy is read no more
    else:  # a long file streams on in a decoder thread: the copy goes with its stream
        weakref.finalize(d.stream, _remove, tmp)
    return d
