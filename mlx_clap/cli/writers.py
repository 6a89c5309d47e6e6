"""Output writers for `mlx-clap embed` other than a store (mlx_clap.sync.plan.StoreSink): one JSON per
file, or JSON lines; both are sinks of mlx_clap.sync.run.EmbedRun.

Each writer resumes what its output already holds when the settings match, and refuses with a clear error
when they do not; every file is written atomically.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from mlx_clap.preprocess.decode_ahead import InputFile

JSON_MANIFEST = ".mlx-clap-manifest.json"
ERRORS_NAME = "errors.jsonl"
WARNINGS_NAME = "warnings.jsonl"  # files embedded from a partial decode, beside errors.jsonl


# ------------------------------------------------------------------------------------------ writers
def _atomic_json(path: Path, obj: Any) -> None:
    from mlx_clap.io.files import atomic_write_bytes, json_line

    atomic_write_bytes(path, json_line(obj).encode("utf-8"))


def _settings_diff(old: dict, new: dict) -> list[str]:
    keys = ("weights_sha256", "embedding_dim", "settings", "store_dtype")
    diffs = []
    for k in keys:
        if old.get(k) != new.get(k):
            if k == "settings" and isinstance(old.get(k), dict) and isinstance(new.get(k), dict):
                for sk in sorted(set(old[k]) | set(new[k])):
                    if old[k].get(sk) != new[k].get(sk):
                        diffs.append(f"{sk}: {old[k].get(sk)!r} there, {new[k].get(sk)!r} now")
            else:
                diffs.append(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now")
    return diffs


def _mismatch_error(out: Path, diffs: list[str]) -> click.ClickException:
    return click.ClickException(
        f"{out}: holds embeddings made with other settings ({'; '.join(diffs[:4])}). "
        "Use --overwrite to start fresh there, or choose another --out."
    )


class JsonWriter:
    """One `<name>.json` per audio file, mirroring the input tree under `out`."""

    def __init__(self, out: Path, manifest: dict, overwrite: bool):
        self.out = out
        self.manifest = manifest
        self.overwrite = overwrite
        mpath = out / JSON_MANIFEST
        if mpath.exists() and not overwrite:
            try:
                old = json.loads(mpath.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise click.ClickException(f"{mpath}: unreadable ({exc}); use --overwrite") from exc
            diffs = _settings_diff(old, manifest)
            if diffs:
                raise _mismatch_error(out, diffs)
        elif out.exists() and not out.is_dir():
            raise click.ClickException(f"{out}: exists and is not a folder")
        _atomic_json(mpath, manifest)

    def target(self, file: InputFile) -> Path:
        return self.out / file.rel.parent / (file.rel.name + ".json")

    def safe_target(self, file: InputFile) -> Path:
        """The target, refused (OSError naming it) when it resolves outside --out, as through a
        symlinked subfolder: nothing is ever written outside the output folder."""
        t = self.target(file)
        root = os.path.realpath(self.out)
        where = os.path.realpath(t.parent)
        if os.path.commonpath([root, where]) != root:
            raise OSError(
                f"{t}: resolves outside --out {self.out} (a symbolic link on the way?); refusing to write it"
            )
        return t

    def is_done(self, file: InputFile, key: tuple) -> bool:
        try:
            t = self.safe_target(file)  # checked before the run, so a bad tree stops it before any work
        except OSError as exc:
            raise click.ClickException(str(exc)) from exc
        if self.overwrite:
            return False
        if not t.is_file():
            return False
        try:
            old = json.loads(t.read_text(encoding="utf-8"))
            return (old["path"], old["size"], old["mtime"]) == key
        except (OSError, ValueError, KeyError, TypeError):
            return False  # a damaged output is made again

    def write(self, records: list[dict], vectors, segments: list | None = None) -> None:
        for rec, vec in zip(records, vectors, strict=True):
            obj = {**rec["item"], **rec["meta"], "embedding": [float(x) for x in vec]}
            _atomic_json(self.safe_target(rec["file"]), obj)

    def error(self, path: str, cause: str) -> None:
        from mlx_clap.io.files import append_lines

        append_lines(self.out / ERRORS_NAME, [{"path": path, "error": cause, "time": time.time()}])


class JsonlWriter:
    def __init__(self, manifest: dict):
        from mlx_clap.io.files import json_line

        self.manifest = manifest
        # Non-ASCII stays readable where stdout takes UTF-8; elsewhere it is escaped.
        self.utf8 = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "") == "utf8"
        self._json_line = json_line

    def write(self, records: list[dict], vectors, segments: list | None = None) -> None:
        for rec, vec in zip(records, vectors, strict=True):
            obj = {**rec["item"], **rec["meta"], "embedding": [float(x) for x in vec]}
            sys.stdout.write(self._json_line(obj) if self.utf8 else json.dumps(obj, sort_keys=True) + "\n")
        sys.stdout.flush()

    def error(self, path: str, cause: str) -> None:
        pass  # reported on stderr only
