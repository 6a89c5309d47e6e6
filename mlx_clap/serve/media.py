"""Audio files of store rows, served safely: by row id only, never by a path the client sends.

Which rows may be read at all is decided once, when the server starts (`mlx_clap.search.roots`): the
path must be absolute with an audio suffix, and its folder, resolved, must lie inside the library
folders the store records (a store made before they were recorded plays nothing). Each request then
opens the file once, from that resolved folder, without following any link:

- every folder on the way is opened with O_NOFOLLOW from the filesystem root, so a folder swapped for a
  link while the server runs is refused, and the file itself is opened with O_NOFOLLOW (a file swapped
  for a link is refused; O_NONBLOCK, so a FIFO swapped in cannot hang the request);
- the descriptor is checked with fstat (a regular file), and everything sent comes from that
  descriptor: size, byte range and bytes. Nothing is opened by path a second time, so there is no
  moment between a check and an open for a swap to slip in.

A library reached through a linked folder (macOS's /tmp -> /private/tmp, ~/Music on another volume) is
served; a row whose folder as named now resolves elsewhere than at startup is refused, as before.
Byte ranges: one range per request (what players send), 206 with Content-Range, 416 past the end; a
Range header this does not understand (several ranges, other units) gets the whole file, as RFC 9110
allows.
"""

from __future__ import annotations

import errno
import hashlib
import mimetypes
import os
import re
import stat
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from mlx_clap.search.roots import LibraryScope

# What browsers expect for the usual suffixes (the system tables differ: audio/x-wav, audio/x-flac).
AUDIO_TYPES = {
    ".wav": "audio/wav",
    ".wave": "audio/wav",
    ".flac": "audio/flac",
    ".mp3": "audio/mpeg",
    ".ogg": "audio/ogg",
    ".oga": "audio/ogg",
    ".opus": "audio/ogg",
    ".m4a": "audio/mp4",
    ".mp4": "audio/mp4",
    ".aac": "audio/aac",
    ".webm": "audio/webm",
    ".aif": "audio/aiff",
    ".aiff": "audio/aiff",
}
CHUNK = 256 * 1024
# Folders are walked without needing read permission on them where the system allows (Linux O_PATH).
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_PATH", 0) | getattr(os, "O_DIRECTORY", 0) | os.O_NOFOLLOW
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)
_RANGE = re.compile(r"bytes=(\d{0,18})-(\d{0,18})")
# Where a process can name one of its open files by path (the decoders take paths): Linux reopens the
# very file the descriptor holds through it, whatever has been renamed or swapped since.
_FD_FOLDER = "/proc/self/fd"


class MediaError(Exception):
    """A row whose audio cannot be served; `status` is the HTTP status, `str()` says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def media_type(path: str | os.PathLike) -> str:
    """The Content-Type for an audio file, by suffix (octet-stream when unknown)."""
    suffix = Path(path).suffix.lower()
    if suffix in AUDIO_TYPES:
        return AUDIO_TYPES[suffix]
    guessed = mimetypes.guess_type(str(path))[0]
    return guessed if guessed and guessed.startswith("audio/") else "application/octet-stream"


def parse_row(text: str, count: int) -> int:
    """A row id from a request: decimal digits only and inside the store, else MediaError 404."""
    if not text.isascii() or not text.isdigit() or len(text) > 12:
        raise MediaError(404, f"no row {text[:40]!r} in the store")
    row = int(text)
    if row >= count:
        raise MediaError(404, f"no row {row} in the store (it holds {count})")
    return row


@dataclass
class OpenRow:
    """A row's file, open: the descriptor (the caller closes it), its fstat, and the name it had."""

    fd: int
    st: os.stat_result
    named: str

    def decoder_path(self) -> str:
        """A path decoders can open that leads to this very file: the descriptor's own name where the
        system has one (Linux); elsewhere the file's name (opened and checked just now)."""
        own = f"{_FD_FOLDER}/{self.fd}"
        return own if os.path.isdir(_FD_FOLDER) else self.named

    def close(self) -> None:
        os.close(self.fd)


class RowFiles:
    """The files of a store's rows, checked as the module docstring says.

    Made when the server starts, with the library folders the store records (None: a store made before
    they were recorded, whose files are all refused)."""

    def __init__(self, items: Sequence[dict[str, Any]], roots: Sequence[str] | None):
        self.items = items
        self.has_roots = roots is not None
        scope = LibraryScope(roots)
        self.refused: dict[int, str] = {}
        for row, it in enumerate(items):
            why = scope.problem(it["path"])
            if why is not None:
                self.refused[row] = why
        self.folders = scope.real  # a row's folder as named -> its real folder at startup
        self.roots = scope.roots or []  # the library folders, resolved

    def open(self, row: int) -> OpenRow:
        """Row `row`'s file, opened as the module docstring says; MediaError when it is refused."""
        items = self.items
        if not 0 <= row < len(items):
            raise MediaError(404, f"no row {row} in the store (it holds {len(items)})")
        if not self.has_roots:
            raise MediaError(
                403, "the store records no library folders (it predates them), so no file is played; "
                "run `mlx-clap embed` over the library once more to record them (nothing is embedded again)"
            )  # fmt: skip
        if row in self.refused:
            raise MediaError(403, f"row {row}: {self.refused[row]}; refusing to read it")
        named = os.path.normpath(str(items[row]["path"]))
        folder, name = os.path.split(named)
        real = self.folders[folder]
        # Reported without any link's target: the client is not told where a link points.
        try:
            now = os.path.realpath(folder)
        except OSError:  # a link on the way changed while it was being read
            now = None
        if now != real:
            raise MediaError(403, _folder_changed(row, folder))
        fd = _open_no_links(real, name, row, named)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise MediaError(403, f"row {row}: {named} is not a regular file")
        except BaseException:
            os.close(fd)
            raise
        return OpenRow(fd, st, named)

    def response(self, row: int, request_headers: Any, head_only: bool = False) -> Response:
        """The row's audio (a byte range of it when asked), read from one open descriptor; MediaError
        when it is refused."""
        opened = self.open(row)
        try:
            return _file_response(opened, request_headers, head_only)
        except BaseException:
            opened.close()
            raise


def _folder_changed(row: int, folder: str) -> str:
    return (
        f"row {row}: the folder {folder} now leads somewhere else than when the server started "
        "(a symbolic link was changed); refusing to follow it"
    )


def _open_no_links(real_folder: str, name: str, row: int, named: str) -> int:
    """Open real_folder/name for reading, walking from "/" with O_NOFOLLOW at every step."""
    parts = [p for p in real_folder.split(os.sep) if p]
    folder_fd = os.open(os.sep, _DIR_FLAGS)
    try:
        for part in parts:
            try:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=folder_fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # a folder on the way is now a link (or file)
                    raise MediaError(403, _folder_changed(row, os.path.dirname(named))) from None
                raise _open_error(exc, row, named) from None
            os.close(folder_fd)
            folder_fd = nxt
        try:
            return os.open(name, _FILE_FLAGS, dir_fd=folder_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise MediaError(
                    403, f"row {row}: {named} is a symbolic link; refusing to follow it"
                ) from None
            raise _open_error(exc, row, named) from None
    finally:
        os.close(folder_fd)


def _open_error(exc: OSError, row: int, named: str) -> MediaError:
    if exc.errno == errno.ENOENT:
        return MediaError(404, f"row {row}: {named} no longer exists")
    return MediaError(403, f"row {row}: {named}: {exc.strerror or exc}")


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end) with end exclusive for a single-range `Range` header; None for the whole file (no
    header, or one this does not serve); MediaError 416 for a range that starts past the end."""
    m = _RANGE.fullmatch(header.strip()) if header else None
    if m is None:
        return None
    first, last = m.group(1), m.group(2)
    if not first:
        if not last:
            return None
        n = int(last)  # "-N": the last N bytes
        if n == 0 or size == 0:
            raise MediaError(416, "range not satisfiable")
        return max(0, size - n), size
    start = int(first)
    if start >= size:
        raise MediaError(416, "range not satisfiable")
    if not last:
        return start, size
    end = int(last)
    if end < start:
        return None  # not a valid range: ignored (RFC 9110 14.2)
    return start, min(end + 1, size)


def _file_response(opened: OpenRow, headers: Any, head_only: bool) -> Response:
    st = opened.st
    tag = hashlib.md5(f"{st.st_mtime}-{st.st_size}".encode(), usedforsecurity=False).hexdigest()
    etag = f'"{tag}"'
    modified = formatdate(st.st_mtime, usegmt=True)
    out = {
        # no-cache: the browser revalidates (ETag), so a file re-embedded after an edit is not stale.
        "Cache-Control": "no-cache",
        "Accept-Ranges": "bytes",
        "ETag": etag,
        "Last-Modified": modified,
    }
    if_range = headers.get("if-range")
    wanted = headers.get("range") if if_range is None or if_range in (etag, modified) else None
    try:
        span = byte_range(wanted, st.st_size)
    except MediaError:
        opened.close()
        return Response(status_code=416, headers={**out, "Content-Range": f"bytes */{st.st_size}"})
    status = 200
    start, end = 0, st.st_size
    if span is not None:
        status, (start, end) = 206, span
        out["Content-Range"] = f"bytes {start}-{end - 1}/{st.st_size}"
    out["Content-Length"] = str(end - start)
    return DescriptorResponse(
        opened.fd, start, end, status, out, media_type(opened.named), head_only=head_only
    )


class DescriptorResponse(StreamingResponse):
    """Bytes start..end-1 of an open file, read from its descriptor (which it closes when done)."""

    def __init__(
        self, fd: int, start: int, end: int, status: int, headers: dict, media: str, head_only: bool = False
    ):
        self.fd = fd
        super().__init__(
            self._chunks(start, 0 if head_only else end - start),
            status_code=status,
            headers=headers,
            media_type=media,
        )

    async def _chunks(self, offset: int, count: int) -> AsyncIterator[bytes]:
        while count > 0:
            chunk = await run_in_threadpool(os.pread, self.fd, min(CHUNK, count), offset)
            if not chunk:  # the file shrank since fstat: the client sees a short body, nothing else
                return
            offset += len(chunk)
            count -= len(chunk)
            yield chunk

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            os.close(self.fd)
