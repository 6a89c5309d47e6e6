"""A dropped query sound: the request body streamed into a fresh temp folder, size-limited, then deleted.

The page sends the file as the raw request body (no multipart parsing), with its name in an
`X-Filename` header. Only the name's suffix is kept (decoders may go by it), checked to be a short run
of letters and digits; the file is always `query<suffix>` inside a folder made by `tempfile.mkdtemp`,
so nothing the client sends can choose where bytes are written. The folder is removed when the search
is done, whatever happened.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

MAX_UPLOAD_BYTES = 50 * 1024 * 1024
_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,8}")


class UploadError(Exception):
    """An upload that cannot be used; `status` is the HTTP status (413 too large, 400 otherwise)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def safe_suffix(filename: str) -> str:
    """The suffix of the client's file name when it is `.` plus 1-8 letters or digits, else ''."""
    suffix = os.path.splitext(os.path.basename(filename.replace("\\", "/")))[1]
    return suffix.lower() if _SUFFIX.fullmatch(suffix) else ""


def too_large(limit: int) -> str:
    """The 413 message, with the limit in MB (or bytes, for a small test limit)."""
    size = f"{limit / (1024 * 1024):g} MB" if limit >= 1024 * 1024 else f"{limit} byte"
    return f"the file is larger than the {size} upload limit"


@contextmanager
def temp_folder() -> Iterator[Path]:
    """A private temp folder (mode 0700) removed on exit."""
    folder = Path(tempfile.mkdtemp(prefix="mlx-clap-query-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def save_body(
    chunks: AsyncIterator[bytes],
    folder: Path,
    filename: str = "",
    declared_length: str | None = None,
    limit: int = MAX_UPLOAD_BYTES,
) -> Path:
    """Write the body to `folder/query<suffix>`, stopping with UploadError 413 once it passes `limit`.

    A Content-Length above the limit is refused before anything is read; the byte count is checked as
    the body streams too, since a client may send more than it declares (or no length at all)."""
    if declared_length is not None:
        if not declared_length.isascii() or not declared_length.isdigit():
            raise UploadError(400, "bad Content-Length header")
        # Compared by length first: int() refuses a string of more than 4300 digits (a 500, not a 413).
        digits = declared_length.lstrip("0") or "0"
        if len(digits) > len(str(limit)) or int(digits) > limit:
            raise UploadError(413, too_large(limit))
    path = folder / f"query{safe_suffix(filename)}"
    size = 0
    # "xb": the name is fresh in a fresh folder; never opens something that is already there.
    with open(path, "xb") as fh:
        async for chunk in chunks:
            size += len(chunk)
            if size > limit:
                raise UploadError(413, too_large(limit))
            fh.write(chunk)
    if size == 0:
        raise UploadError(400, "the upload is empty; drop an audio file")
    return path
