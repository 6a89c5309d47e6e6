"""Atomic file writes: readers see either the old content or the whole new one, never a part.

Every file mlx-clap publishes (converted weights, configs, manifests, store shards, JSON outputs, index
files) goes through here: a temp file in the same folder, fsync, then rename over the target.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def write_failure(exc: OSError) -> str:
    """Why a write failed, in words a user acts on (a full disk and a read-only folder are the usual
    causes, and their strerror texts differ between systems)."""
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied (read-only folder?)"
    return exc.strerror or str(exc)


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _file_mode() -> int:
    # mkstemp makes 0600 files; published files get the usual mode (0666 minus the umask), as open() does.
    return 0o666 & ~current_umask()


_FILE_MODE = _file_mode()


def fsync_dir(path: Path) -> None:
    """Make the renames inside a folder durable (POSIX); skipped where folders cannot be fsynced."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `path` via a temp file + fsync + rename: readers see the old or the whole new content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    """Pretty, key-sorted JSON written atomically (UTF-8, trailing newline)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def publish_folder(tmp: Path, dest: Path) -> None:
    """Move a fully written staging folder `tmp` (made with mkdtemp beside `dest`) into place as `dest`.

    mkdtemp/mkstemp create owner-only entries, so the folder and its files first get the usual
    umask-based modes. The swap uses renames only, so a reader never sees a half-deleted or half-written
    folder; a previous `dest` is removed after the new one is in place.
    """
    tmp, dest = Path(tmp), Path(dest)
    for p in tmp.iterdir():
        p.chmod(_FILE_MODE)
    tmp.chmod(0o777 & ~current_umask())
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: Path, limit: int | None = None, block: int = 1 << 22) -> str:
    """Hex sha256 of a file (of its first `limit` bytes when given), read in blocks: the one hashing loop
    of the package."""
    import hashlib

    digest = hashlib.sha256()
    left = limit
    with open(path, "rb") as fh:
        while left is None or left > 0:
            chunk = fh.read(block if left is None else min(left, block))
            if not chunk:
                break
            digest.update(chunk)
            if left is not None:
                left -= len(chunk)
    return digest.hexdigest()


def json_line(obj: Any) -> str:
    """One JSON line; non-ASCII kept readable, but a path that is not valid UTF-8 (lone surrogates from
    os.fsdecode) is written escaped, so the line stays valid UTF-8 and reads back to the same str."""
    text = json.dumps(obj, ensure_ascii=False, sort_keys=True)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(obj, ensure_ascii=True, sort_keys=True)
    return text + "\n"


def append_lines(path: Path, objs: list[dict]) -> None:
    """Append JSON lines in one write, then fsync (a crash can only tear the last line). The file is
    opened with O_NOFOLLOW, so a symlinked log is refused instead of written through."""
    if not objs:
        return
    data = "".join(json_line(o) for o in objs).encode("utf-8")
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        if Path(path).is_symlink():  # ELOOP from O_NOFOLLOW: say what it means
            raise OSError(exc.errno, f"{path}: is a symbolic link; refusing to write through it") from exc
        raise
    with os.fdopen(fd, "ab") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
