"""The store's exceptions, and Lance's errors in words a user acts on."""

from __future__ import annotations

import re


class StoreError(ValueError):
    """A store that cannot be created, opened or written; the message names the store and the cause."""


class StoreBusyError(StoreError):
    """Another writer holds the store (local lock), or committed to it while this one was writing."""


class UnknownPathError(StoreError, KeyError):
    """`row_of` for a path the store does not hold (catchable as StoreError or KeyError)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class StaleSnapshotError(StoreError):
    """The version a reader holds was cleaned up by a compaction since it was opened: open it again."""


_CAUSES = (
    (re.compile(r"No space left on device|os error 28|ENOSPC", re.I), "no space left on the device"),
    (
        re.compile(
            r"Permission denied|os error 13|Read-only file system|os error 30|Operation not permitted"
        ),
        "permission denied (read-only folder?)",
    ),
    (re.compile(r"File too large|os error 27"), "file too large for this file system (or a size limit)"),
    (
        re.compile(
            r"error sending request|dns error|Connection refused|timed out|tcp connect|"
            r"Could not connect|NETWORK_CONNECTION|Couldn't resolve host",
            re.I,
        ),
        "cannot reach the object store (endpoint unreachable)",
    ),
    (
        re.compile(r"Failed to get AWS credentials|no credentials|MissingCredentials", re.I),
        "no credentials for the object store "
        "(set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)",
    ),
    (
        re.compile(r"InvalidAccessKeyId|SignatureDoesNotMatch|Access_?Denied|403 Forbidden", re.I),
        "access denied by the object store (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)",
    ),
    (re.compile(r"NoSuchBucket", re.I), "no such bucket"),
)
_RUST_LOCATION = re.compile(r",?\s*/\S+\.rs:\d+:\d+")


def lance_failure(exc: BaseException) -> str:
    """One line saying why a Lance (or object store) operation failed: the usual causes named plainly,
    else Lance's own first line without its Rust source locations."""
    text = str(exc)
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:
        text = f"{exc.strerror} (os error {exc.errno})"
    for pattern, words in _CAUSES:
        if pattern.search(text):
            return words
    line = _RUST_LOCATION.sub("", text.strip().splitlines()[0] if text.strip() else type(exc).__name__)
    return line.replace("LanceError(IO): ", "").strip() or type(exc).__name__
