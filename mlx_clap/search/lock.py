"""The writer lock of an embedding store: one writing process at a time.

The lock is a file inside the store folder (`.writer.lock`). On POSIX it is taken with
`fcntl.flock(LOCK_EX | LOCK_NB)`: the kernel drops a flock when its holder dies, so a killed run
(even `kill -9`) leaves no stale lock, and the file itself is never deleted (deleting a flock'd file
would let two processes lock two different inodes of the same name). The holder writes its PID, host
and start time into the file, so a second writer can say who holds it.

Where `fcntl` is missing (Windows), the lock is an O_EXCL-created file holding the same record; a
file whose PID is no longer alive on this host is stale and is taken over.

Within one process the lock is re-entrant (counted per store folder): code that locks one write,
inside a command that holds the lock for its whole run, does not lock itself out.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".writer.lock"

# Real path of the store folder -> [fd, count]: the locks this process holds.
_HELD: dict[str, list[int]] = {}
_GUARD = threading.Lock()


class StoreLockedError(OSError):
    """The store is being written by another process; the message names it (PID, host, start)."""


def _record() -> bytes:
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return (json.dumps(info, sort_keys=True) + "\n").encode("utf-8")


def read_holder(folder: Path) -> dict[str, Any]:
    """The record the current holder wrote (empty when it cannot be read)."""
    try:
        with open(Path(folder) / LOCK_NAME, "rb") as fh:
            obj = json.loads(fh.read(4096).decode("utf-8") or "{}")
        return obj if isinstance(obj, dict) else {}
    except (OSError, ValueError):
        return {}


def _busy(folder: Path) -> StoreLockedError:
    h = read_holder(folder)
    who = f"PID {h.get('pid', '?')} on {h.get('host', '?')} (since {h.get('since', '?')})"
    return StoreLockedError(
        f"{folder}: the store is in use by {who}; wait for that run to finish, or use another --out"
    )


def _open_lock_file(path: Path, flags: int) -> int:
    # O_NOFOLLOW: a symlinked lock file must not make us write somewhere else.
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    try:
        return os.open(path, flags | nofollow, 0o644)
    except OSError as exc:
        if path.is_symlink():
            raise OSError(f"{path}: is a symbolic link; refusing to use it as the store lock") from exc
        raise


def _lock_flock(folder: Path) -> int:
    fd = _open_lock_file(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise _busy(folder) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, _record(), 0)
    return fd


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _lock_excl(folder: Path) -> int:  # pragma: no cover - exercised where fcntl is missing
    path = folder / LOCK_NAME
    for _ in range(2):
        try:
            fd = _open_lock_file(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            h = read_holder(folder)
            stale = (
                h.get("host") == socket.gethostname()
                and isinstance(h.get("pid"), int)
                and not _pid_alive(h["pid"])
            )
            if not stale:
                raise _busy(folder) from None
            path.unlink(missing_ok=True)  # its holder is dead: take it over
            continue
        os.write(fd, _record())
        return fd
    raise _busy(folder)


def acquire(folder: str | Path) -> None:
    """Take the writer lock of `folder` (re-entrant in this process); StoreLockedError at once if
    another process holds it."""
    folder = Path(folder)
    key = os.path.realpath(folder)
    with _GUARD:
        held = _HELD.get(key)
        if held is not None:
            held[1] += 1
            return
        fd = _lock_flock(folder) if fcntl is not None else _lock_excl(folder)
        _HELD[key] = [fd, 1]


def release(folder: str | Path) -> None:
    """Undo one `acquire`; the last one frees the lock."""
    key = os.path.realpath(Path(folder))
    with _GUARD:
        held = _HELD.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] > 0:
            return
        del _HELD[key]
        fd = held[0]
        try:
            os.ftruncate(fd, 0)  # no holder any more
        except OSError:
            pass
        if fcntl is None:  # pragma: no cover
            os.close(fd)
            Path(folder, LOCK_NAME).unlink(missing_ok=True)
        else:
            os.close(fd)  # closing the only descriptor drops the flock


def rekey(old: str | Path, new: str | Path) -> None:
    """The folder holding a lock was renamed (a store built beside its target and moved into place):
    the descriptor still locks the same file; remember it under the new name."""
    with _GUARD:
        held = _HELD.pop(os.path.realpath(Path(old)), None)
        if held is not None:
            _HELD[os.path.realpath(Path(new))] = held


def detach(folder: str | Path) -> None:
    """Forget and close this process's lock of `folder` whatever its count: the folder was moved aside
    to be deleted, and its lock dies with it."""
    with _GUARD:
        held = _HELD.pop(os.path.realpath(Path(folder)), None)
    if held is not None:
        os.close(held[0])


def held_here(folder: str | Path) -> bool:
    """Whether this process holds the lock of `folder`."""
    return os.path.realpath(Path(folder)) in _HELD


class WriterLock:
    """`with WriterLock(folder):` holds the writer lock for the block."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def __enter__(self) -> WriterLock:
        acquire(self.folder)
        return self

    def __exit__(self, *exc: object) -> None:
        release(self.folder)
