"""Output writers for `mlx-clap embed`: a store (mlx_clap.store), one JSON per file, or JSON lines.

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


class StoreWriter:
    """The store in --out (a Lance dataset, mlx_clap.store), held under its writer lock for the whole run
    (a second `embed` on the same --out fails at once, naming this PID). A store of an older mlx-clap is
    converted in place first; --overwrite commits a new empty store as the next version.

    The store mirrors the inputs (`plan`, `reuse`, `finish`): unchanged files (same path, size, mtime)
    are skipped, a changed file's new row replaces its old one in the same commit, a file whose content
    (sha256) is already stored under another path reuses those vectors, and files gone from the folders
    of this run are removed; `finish` then compacts the store."""

    def __init__(
        self, out: Path, manifest: dict, dim: int, dtype: str, overwrite: bool, segments: dict | None = None
    ):
        from mlx_clap.store import Store, StoreBusyError, StoreError

        self.out = out
        try:
            self.store = Store.for_run(
                out, manifest, dim=dim, dtype=dtype, segments=segments, overwrite=overwrite
            )
        except StoreBusyError as exc:  # --overwrite would not help: another run is writing it
            raise click.ClickException(str(exc)) from exc
        except StoreError as exc:
            if "another pipeline" in str(exc):
                raise click.ClickException(
                    f"{exc}. Use --overwrite to start fresh there, or choose another --out."
                ) from exc
            raise click.ClickException(f"{exc}. Use --overwrite to start fresh, or another --out.") from exc
        except OSError as exc:
            raise click.ClickException(f"{out}: cannot write the store ({exc})") from exc
        self.done = self.store.done_keys()
        # The store's own segment settings rule (a rerun without --segments keeps making them).
        self.segments = self.store.segment_settings
        self.removed = 0
        self.written = False  # whether this run committed rows (then `finish` compacts)

    def by_content(self) -> dict[str, int]:
        """sha256 of stored content -> its row in `store.items` (rows of older stores have no sha256)."""
        return self.store.by_content()

    def reuse(self, reused: list[tuple[dict, int]]) -> None:
        """Add rows for (item, row of the same content already stored): its vector and its segments are
        taken over, nothing is embedded. One commit for all of them."""
        if reused:
            self.store.reuse(reused)
            self.written = True

    def write(self, records: list[dict], vectors, segments: list | None = None) -> None:
        self.store.write([r["item"] for r in records], vectors, segments=segments)
        self.written = True

    def prune_candidates(self, scopes: list[tuple[str, bool]], present: set[str]) -> list[str]:
        """Live paths inside the scopes of this run (a folder with its recursion, or one file) that are
        not among the files present now: they were deleted, renamed or moved away."""
        out = []
        for it in self.store.items:
            p = str(it["path"])
            if p in present:
                continue
            for root, recursive in scopes:
                if p == root or (
                    p.startswith(root.rstrip(os.sep) + os.sep)
                    and (recursive or os.path.dirname(p) == root.rstrip(os.sep))
                ):
                    out.append(p)
                    break
        return out

    def finish(self, drop: list[str]) -> dict[str, int]:
        """Remove `drop` (one commit) and compact the store; nothing to do, no write."""
        stored = {str(it["path"]) for it in self.store.items}
        drop_set = {p for p in drop if p in stored}
        if not drop_set and not self.store.dead_rows and not self.written:
            return {"removed": 0, "reclaimed_rows": 0}
        if drop_set:
            self.store.remove(sorted(drop_set))
        reclaimed = self.store.dead_rows
        self.store.compact()  # one fragment per write batch and deleted rows: merged, reclaimed
        self.removed = len(drop_set)
        return {"removed": len(drop_set), "reclaimed_rows": reclaimed}

    def error(self, path: str, cause: str) -> None:
        self.store.record_error(path, cause)

    def close(self) -> None:
        self.store.close()


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
