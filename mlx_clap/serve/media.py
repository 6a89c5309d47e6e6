"""Audio files of store rows, served safely: by row id only, never by a path the client sends.

A row's file is served only when it is still the file the row names: the real path (every symbolic
link resolved) must equal the row's own absolute path, and it must be a regular file. So a file
replaced by a link to somewhere else after it was embedded, or a folder swapped for a link, is refused
rather than followed. Byte ranges (seeking in the player) are Starlette's `FileResponse`: 206 with
Content-Range for a satisfiable range, 416 for one past the end.
"""

from __future__ import annotations

import mimetypes
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


def row_file(items: Sequence[dict[str, Any]], row: int) -> tuple[Path, os.stat_result]:
    """The file store row `row` names and its stat, checked as the module docstring says."""
    if not 0 <= row < len(items):
        raise MediaError(404, f"no row {row} in the store (it holds {len(items)})")
    named = str(items[row]["path"])
    if not os.path.isabs(named):
        raise MediaError(403, f"row {row}: the store names a relative path; refusing to guess where it is")
    named = os.path.normpath(named)
    real = os.path.realpath(named)
    if real != named:
        # Reported without the link's target: the client is not told where the link points.
        raise MediaError(403, f"row {row}: {named} is reached through a symbolic link; refusing to follow it")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise MediaError(404, f"row {row}: {named} no longer exists") from None
    except OSError as exc:
        raise MediaError(403, f"row {row}: {named}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise MediaError(403, f"row {row}: {named} is not a regular file")
    return Path(real), st


def audio_response(items: Sequence[dict[str, Any]], row: int) -> Any:
    """A `FileResponse` for the row's file (byte ranges included); MediaError when it is refused."""
    from starlette.responses import FileResponse

    path, st = row_file(items, row)
    # no-cache: the browser revalidates (ETag), so a file re-embedded after an edit is not stale.
    headers = {"Cache-Control": "no-cache"}
    return FileResponse(path, stat_result=st, media_type=media_type(path), headers=headers)
