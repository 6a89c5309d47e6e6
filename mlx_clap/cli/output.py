"""Human-readable output of every command: file names made safe for a terminal, and a clean Ctrl-C exit.

A file name may hold any byte but "/" and NUL: newlines (which break line-based output), carriage
returns and ANSI escape sequences (which can rewrite what the terminal shows), bidi overrides, and on
Linux bytes that are not UTF-8 (lone surrogates after os.fsdecode, which make `print` raise). Plain-text
output passes every path through `printable`; JSON output keeps the exact names (json.dumps escapes
control characters itself).
"""

from __future__ import annotations

import os
import re
import sys

INTERRUPTED_MESSAGE = "interrupted: what was written is kept; rerun the same command to resume"
INTERRUPTED_STATUS = 130  # 128 + SIGINT, what shells report for a Ctrl-C

# C0 controls, DEL, C1 controls, Unicode line/paragraph separators, bidi embeddings/overrides/isolates
# and surrogates (undecodable bytes of a file name).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    c = match.group()
    if c in _NAMED:
        return _NAMED[c]
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(value: object) -> str:
    """`str(value)` with control characters written as repr-style escapes (\\n, \\r, \\t, \\x1b, \\u202e).

    Ordinary text (including non-ASCII letters) is unchanged, so common names print as they are.
    """
    return _UNSAFE.sub(_escape, str(value))


def exit_interrupted(message: str | None = INTERRUPTED_MESSAGE, status: int = INTERRUPTED_STATUS) -> None:
    """Leave with `status` (after a Ctrl-C: 130), without running interpreter teardown.

    MLX's C++ worker threads can still be alive at interpreter exit; tearing them down there aborts the
    process ("terminate called without an active exception", SIGABRT). So the output is flushed and
    closed here and the process leaves through os._exit.
    """
    if message:
        try:
            sys.stderr.write(message + "\n")
        except (OSError, ValueError):
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)
