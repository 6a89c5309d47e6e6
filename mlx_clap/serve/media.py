"""Audio files of store rows, served safely: by row id only, never by a path the client sends.

A row's file is served only while it is the file the row named when the server started:

- the file itself must not be a symbolic link (a file replaced by a link to somewhere else is refused);
- its folder must resolve (every link followed) to the same real folder as at startup. A library
  reached through a linked folder (macOS's /tmp -> /private/tmp, ~/Music on another volume) is
  served, while a folder swapped for a link to elsewhere while the server runs is refused;
- it must be a regular file.

Byte ranges (seeking in the player) are Starlette's `FileResponse`: 206 with Content-Range for a
satisfiable range, 416 for one past the end.
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


class RowFiles:
    """The files of a store's rows, checked as the module docstring says.

    Made when the server starts: it records the real folder of every row's folder then (one
    `realpath` per distinct folder)."""

    def __init__(self, items: Sequence[dict[str, Any]]):
        self.items = items
        self.folders: dict[str, str] = {}
        for it in items:
            named = str(it["path"])
            if os.path.isabs(named):
                folder = os.path.dirname(os.path.normpath(named))
                if folder not in self.folders:
                    self.folders[folder] = os.path.realpath(folder)

    def file(self, row: int) -> tuple[Path, os.stat_result]:
        """The file row `row` names (its real path) and its stat; MediaError when it is refused."""
        items = self.items
        if not 0 <= row < len(items):
            raise MediaError(404, f"no row {row} in the store (it holds {len(items)})")
        named = str(items[row]["path"])
        if not os.path.isabs(named):
            raise MediaError(
                403, f"row {row}: the store names a relative path; refusing to guess where it is"
            )
        named = os.path.normpath(named)
        folder, name = os.path.split(named)
        # Reported without any link's target: the client is not told where a link points.
        if os.path.realpath(folder) != self.folders.get(folder):
            raise MediaError(
                403, f"row {row}: the folder {folder} now leads somewhere else than when the server started "
                "(a symbolic link was changed); refusing to follow it"
            )  # fmt: skip
        real = os.path.join(self.folders[folder], name)
        try:
            st = os.lstat(real)
        except FileNotFoundError:
            raise MediaError(404, f"row {row}: {named} no longer exists") from None
        except OSError as exc:
            raise MediaError(403, f"row {row}: {named}: {exc.strerror or exc}") from None
        if stat.S_ISLNK(st.st_mode):
            raise MediaError(403, f"row {row}: {named} is a symbolic link; refusing to follow it")
        if not stat.S_ISREG(st.st_mode):
            raise MediaError(403, f"row {row}: {named} is not a regular file")
        return Path(real), st

    def response(self, row: int) -> Any:
        """A `FileResponse` for the row's file (byte ranges included); MediaError when it is refused."""
        from starlette.responses import FileResponse

        path, st = self.file(row)
        # no-cache: the browser revalidates (ETag), so a file re-embedded after an edit is not stale.
        headers = {"Cache-Control": "no-cache"}
        return FileResponse(path, stat_result=st, media_type=media_type(path), headers=headers)
