"""The failure and warning records of a run: errors.jsonl and warnings.jsonl beside the output.

A store keeps them through its own methods (`Store.errors`, `rewrite_errors`, `rewrite_warnings`), which go
through the store's Location, so they work on `s3://` as on a folder; the one-JSON-per-file output keeps
them as local files (`read_error_log`, `rewrite_error_log`). Either way they are rewritten at the end of a
run to describe the failures that stand, not appended forever.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def current_errors(old: list[dict], new: list[dict], succeeded: set[str]) -> list[dict]:
    """The failures that describe the output now: this run's (last per path), then earlier ones of
    files that still exist and were neither embedded since nor tried again in this run."""
    latest: dict[str, dict] = {}
    for rec in new:
        latest[str(rec.get("path"))] = rec
    kept: dict[str, dict] = {}
    for rec in old:
        path = str(rec.get("path"))
        # A file deleted since has nothing left to retry (and a mistyped argument was never a file).
        if path not in succeeded and path not in latest and os.path.lexists(path):
            kept[path] = rec
    return list(kept.values()) + list(latest.values())


def new_failures(failures: list[dict], previous: list[dict]) -> list[dict]:
    """The failures that the previous run did not record for the same file with the same cause
    (`previous`: the error log as this run found it)."""
    known = {(str(r.get("path")), str(r.get("error"))) for r in previous}
    return [f for f in failures if (str(f["path"]), str(f["error"])) not in known]


def store_warnings(items: Iterable[dict]) -> list[dict]:
    """The warnings records of a store: one {"path", "warnings"} per live row decoded in part."""
    return [{"path": it["path"], "warnings": it["warnings"]} for it in items if it.get("warnings")]


def json_warnings(path: Path, redone: set[str], new: list[dict]) -> list[dict]:
    """The warnings records of --format json output: this run's, plus earlier ones of files still there
    and not embedded again."""
    old = [
        r for r in read_error_log(path) if r.get("path") not in redone and os.path.lexists(str(r.get("path")))
    ]
    return old + [dict(w) for w in new]


def read_error_log(path: Path) -> list[dict]:
    """The records of a local errors.jsonl or warnings.jsonl (torn or foreign lines skipped)."""
    out: list[dict] = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "path" in rec:
            out.append(rec)
    return out


def rewrite_error_log(path: Path, records: list[dict]) -> None:
    """Replace a local log atomically with `records` (removed when there are none)."""
    from mlx_clap.io.files import atomic_write_bytes, json_line

    if not records:
        path.unlink(missing_ok=True)
        return
    atomic_write_bytes(path, "".join(json_line(r) for r in records).encode("utf-8"))


def failure(path: str, cause: str) -> dict[str, Any]:
    """One failure record as errors.jsonl holds it."""
    import time

    return {"path": path, "error": cause, "time": time.time()}
