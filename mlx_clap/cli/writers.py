"""Output writers for `mlx-clap embed`: an EmbeddingStore, one JSON per file, or JSON lines.

Each writer resumes what its output already holds when the settings match, and refuses with a clear error
when they do not; every file is written atomically.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import click

from mlx_clap.preprocess.decode_ahead import InputFile

JSON_MANIFEST = ".mlx-clap-manifest.json"
ERRORS_NAME = "errors.jsonl"


# ------------------------------------------------------------------------------------------ writers
def _atomic_json(path: Path, obj: Any) -> None:
    from mlx_clap.io.files import atomic_write_bytes
    from mlx_clap.search.store import json_line

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


class StoreWriter:
    def __init__(self, out: Path, manifest: dict, dim: int, dtype: str, overwrite: bool):
        from mlx_clap.search.store import ITEMS_NAME, MANIFEST_NAME, SHARDS_DIR, EmbeddingStore, StoreError

        self.out = out
        if overwrite and (out / MANIFEST_NAME).exists():
            # The manifest goes first, so a half-removed folder is never taken for a store.
            (out / MANIFEST_NAME).unlink()
            for name in (ITEMS_NAME, ERRORS_NAME):
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(out / SHARDS_DIR, ignore_errors=True)
        if (out / MANIFEST_NAME).exists():
            try:
                self.store = EmbeddingStore.open(out)
            except StoreError as exc:
                raise click.ClickException(
                    f"{exc}. Use --overwrite to start fresh, or another --out."
                ) from exc
            diffs = _settings_diff(self.store.manifest, manifest)
            if diffs:
                raise _mismatch_error(out, diffs)
        else:
            if out.exists() and (not out.is_dir() or any(out.iterdir())):
                raise click.ClickException(
                    f"{out}: exists and is not an embedding store; choose a new or empty folder for --out"
                )
            self.store = EmbeddingStore.create(out, manifest, dim=dim, dtype=dtype)
        self.done = self.store.done_keys()

    def write(self, records: list[dict], vectors) -> None:
        self.store.append([r["item"] for r in records], vectors)

    def error(self, path: str, cause: str) -> None:
        self.store.record_error(path, cause)


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

    def is_done(self, file: InputFile, key: tuple) -> bool:
        if self.overwrite:
            return False
        t = self.target(file)
        if not t.is_file():
            return False
        try:
            old = json.loads(t.read_text(encoding="utf-8"))
            return (old["path"], old["size"], old["mtime"]) == key
        except (OSError, ValueError, KeyError, TypeError):
            return False  # a damaged output is made again

    def write(self, records: list[dict], vectors) -> None:
        for rec, vec in zip(records, vectors, strict=True):
            obj = {**rec["item"], **rec["meta"], "embedding": [float(x) for x in vec]}
            _atomic_json(self.target(rec["file"]), obj)

    def error(self, path: str, cause: str) -> None:
        from mlx_clap.search.store import append_lines

        append_lines(self.out / ERRORS_NAME, [{"path": path, "error": cause, "time": time.time()}])


class JsonlWriter:
    def __init__(self, manifest: dict):
        from mlx_clap.search.store import json_line

        self.manifest = manifest
        # Non-ASCII stays readable where stdout takes UTF-8; elsewhere it is escaped.
        self.utf8 = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "") == "utf8"
        self._json_line = json_line

    def write(self, records: list[dict], vectors) -> None:
        for rec, vec in zip(records, vectors, strict=True):
            obj = {**rec["item"], **rec["meta"], "embedding": [float(x) for x in vec]}
            sys.stdout.write(self._json_line(obj) if self.utf8 else json.dumps(obj, sort_keys=True) + "\n")
        sys.stdout.flush()

    def error(self, path: str, cause: str) -> None:
        pass  # reported on stderr only
