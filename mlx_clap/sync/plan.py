"""What a sync does to a store: which files to embed, which rows to reuse, which rows to remove.

The store mirrors the inputs: unchanged files (same path, size, mtime) are skipped; a new or changed
file whose content (sha256) is already stored under another path reuses those vectors (a rename, a copy);
the rest are embedded, a changed file's new row replacing its old one in the same commit; rows of files
gone from the folders named, of files found moved, and (on request) of every file that no longer exists
are removed; one compaction then reclaims what was superseded. `already_mirrored` answers an unchanged
library from file stats alone, without loading the model.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_clap.preprocess.decode_ahead import InputFile, ObjectPath, stat_key
from mlx_clap.search.roots import record_roots
from mlx_clap.store import ERRORS_NAME, is_remote
from mlx_clap.sync.inputs import file_gone
from mlx_clap.sync.manifest import recorded_model_id


class StoreSink:
    """The store a run writes (a Lance dataset, mlx_clap.store), held under its writer lock until
    `close()`: a second run on the same store fails at once (StoreBusyError naming the PID that holds
    it). A store of an older mlx-clap is converted in place first; `overwrite` commits a new empty store
    as the next version. StoreError (the store and the cause) when it cannot be used, for instance when
    it was made with another pipeline."""

    def __init__(
        self,
        out: str | os.PathLike,
        manifest: dict,
        dim: int,
        dtype: str,
        overwrite: bool,
        segments: dict | None = None,
    ):
        from mlx_clap.store import Store

        self.out = out
        self.store = Store.for_run(
            out, manifest, dim=dim, dtype=dtype, segments=segments, overwrite=overwrite
        )
        self.done = self.store.done_keys()
        # The store's own segment settings rule (a rerun without segments keeps making them).
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

    def write(self, records: list[dict], vectors: Any, segments: list | None = None) -> None:
        self.store.write([r["item"] for r in records], vectors, segments=segments)
        self.written = True

    def commit(self, written: Sequence[Any]) -> None:
        """Make rows written elsewhere (`embed_files` in a worker) visible in one commit."""
        if any(w.rows for w in written):
            self.store.commit(written)
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


@dataclass
class SyncPlan:
    """The work of a sync: `todo` to decode and embed; `planned` path -> (stat key, sha256) of every file
    hashed (its row carries the sha256; a file changed since is failed, not stored); `reused` (item, row
    of the same content) to copy; `skipped` paths unchanged since they were stored."""

    todo: list[InputFile] = field(default_factory=list)
    planned: dict[str, tuple[tuple, str]] = field(default_factory=dict)
    reused: list[tuple[dict, int]] = field(default_factory=list)
    skipped: set[str] = field(default_factory=set)


def plan_sync(sink: StoreSink, files: list[InputFile], workers: int) -> SyncPlan:
    """Skip the files stored with their current stat key, hash the others: reuse stored content, embed
    the rest."""
    todo: list[InputFile] = []
    for f in files:
        try:
            key = stat_key(f.path)
        except OSError:
            todo.append(f)  # the decoder reports the cause
            continue
        if key not in sink.done:
            todo.append(f)
    embed, planned, reused = plan_by_content(todo, sink, workers)
    skipped = {str(f.path) for f in files} - {str(f.path) for f in todo}
    return SyncPlan(embed, planned, reused, skipped)


def plan_by_content(
    todo: list[InputFile], writer: StoreSink, workers: int
) -> tuple[list[InputFile], dict[str, tuple[tuple, str]], list[tuple[dict, int]]]:
    """Hash the new and changed files (in threads); those whose content is already stored are reused
    (a rename or a copy), the rest are embedded. Returns (to embed, path -> (stat key, sha256) of every
    hashed file, [(item, row of the same content)])."""
    from mlx_clap.io.files import sha256_file

    def digest(f: InputFile) -> tuple[InputFile, tuple | None, str | None]:
        if isinstance(f.path, ObjectPath):
            from mlx_clap.sync.remote_inputs import object_sha256

            try:
                now, sha = object_sha256(f.path)
            except OSError:
                return f, None, None  # the decoder names the cause
            return f, (now if now == stat_key(f.path) else None), sha
        try:
            if not stat.S_ISREG(os.stat(f.path).st_mode):
                return f, None, None  # replaced by a FIFO or device since the walk: the decoder refuses it
            key = stat_key(f.path)
            sha = sha256_file(f.path)
            return f, (key if stat_key(f.path) == key else None), sha
        except OSError:
            return f, None, None  # the decoder names the cause

    stored = writer.by_content()
    embed: list[InputFile] = []
    planned: dict[str, tuple[tuple, str]] = {}
    reused: list[tuple[dict, int]] = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hash") as pool:
        for f, key, sha in pool.map(digest, todo):
            if key is None or sha is None:
                embed.append(f)
                continue
            planned[str(f.path)] = (key, sha)
            if sha in stored:
                reused.append(({"path": key[0], "size": key[1], "mtime": key[2], "sha256": sha}, stored[sha]))
            else:
                embed.append(f)
    return embed, planned, reused


def moved_rows(items: list[dict], reused: list[tuple[dict, int]]) -> set[str]:
    """Paths of rows that are the old place of a file this run found under a new path: the row's file
    is gone, a file of the same name and content (sha256) was reused, and the new path lies inside the
    deepest folder of the old path that still exists (not the filesystem root). So a renamed ~/Sounds is
    recognised, while a copy that still exists, or one on a drive that is not mounted (its mount folder
    gone or empty, the new file elsewhere), keeps its row."""
    new_by_content: dict[str, list[str]] = {}
    for item, _row in reused:
        new_by_content.setdefault(str(item["sha256"]), []).append(str(item["path"]))
    out: set[str] = set()
    for it in items:
        old = str(it["path"])
        candidates = new_by_content.get(str(it.get("sha256")))
        if not candidates or old in candidates or is_remote(old) or not file_gone(old):
            continue
        anchor = os.path.dirname(old)
        while anchor != os.path.dirname(anchor) and not os.path.isdir(anchor):
            anchor = os.path.dirname(anchor)
        if anchor == os.path.dirname(anchor):
            continue  # nothing of the old path is left but the root: no evidence of a move
        scope = anchor.rstrip(os.sep) + os.sep
        name = os.path.basename(old)
        if any(new.startswith(scope) and os.path.basename(new) == name for new in candidates):
            out.add(old)
    return out


def input_scopes(paths: Sequence[str], recursive: bool, present: set[str]) -> list[tuple[str, bool]]:
    """(root, recursive) per argument: where a row whose file is not `present` counts as gone. A folder
    covers what lies under it; a file, or an argument that does not exist, only itself. An object-store
    prefix covers its keys while some audio object was listed under it: one whose listing failed or
    found nothing is treated like a folder that vanished (its rows stay unless --prune-missing)."""
    scopes: list[tuple[str, bool]] = []
    for raw in paths:
        if is_remote(raw):
            uri = raw.rstrip("/")
            listed = any(p.startswith(uri + "/") for p in present)
            scopes.append((uri, recursive if listed else False))
            continue
        p = os.path.abspath(os.path.expanduser(raw))
        scopes.append((p, recursive) if os.path.isdir(p) else (p, False))
    return scopes


def mirror(
    writer: StoreSink,
    paths: Sequence[str],
    recursive: bool,
    files: list[InputFile],
    failed: Iterable[str],
    no_prune: bool,
    prune_missing: bool = False,
    reused: list[tuple[dict, int]] | None = None,
) -> dict[str, int]:
    """Make the store mirror this run's inputs: remove rows of files gone from the folders named, of
    files found moved (`moved_rows`) and, with `prune_missing`, of every file that no longer exists
    (none of these with `no_prune`), and of files that changed but `failed` (their old vector no longer
    describes them); then one compaction reclaims every superseded row. Returns the counts removed in
    all ("removed"), as moved files ("moved") and as missing elsewhere ("missing")."""
    present = {str(f.path) for f in files}
    scopes = input_scopes(paths, recursive, present)
    drop: set[str] = set()
    moved: set[str] = set()
    missing: set[str] = set()
    if not no_prune:
        drop = set(writer.prune_candidates(scopes, present))
        moved = moved_rows(writer.store.items, reused or [])
        if prune_missing:  # one stat per row of the store
            stored = (str(it["path"]) for it in writer.store.items)
            missing = {p for p in stored if p not in present and file_gone(p)} - drop - moved
    failed_set = set(failed)
    drop |= {str(it["path"]) for it in writer.store.items if str(it["path"]) in failed_set}
    removed = writer.finish(sorted(drop | moved | missing))["removed"]
    return {"removed": removed, "moved": len(moved), "missing": len(missing)}


# ------------------------------------------------------------------------------ nothing to do
@dataclass(frozen=True)
class MirrorRequest:
    """What a run into an existing store asks for, as `already_mirrored` compares it with the store."""

    out: Path
    model_id: str
    wanted: dict  # the settings the manifest must record (long_audio, seed, quantize_int16, compute_dtype)
    store_dtype: str
    segments: bool
    files: list[InputFile]
    paths: tuple[str, ...]  # the arguments as given: the folders whose gone files would be pruned
    recursive: bool
    no_prune: bool
    prune_missing: bool = False


def already_mirrored(request: MirrorRequest) -> dict | None:
    """The summary of a run with nothing to do (every file unchanged, none to remove, same model and
    settings as the store records), or None when there is work or any doubt. Costs one stat per file,
    so a rerun over an unchanged library of 100k files takes seconds and never loads the model. A
    store on object storage always takes the full path (which is as quick when nothing changed, once
    the model is loaded)."""
    from mlx_clap.store import is_legacy, is_remote

    if is_remote(request.out):
        return None
    out = Path(request.out)
    if not (out / "_versions").is_dir() or is_legacy(out) or (out / ERRORS_NAME).exists():
        return None  # a new store, one to convert, or failures to retry and an error log to bring up to date
    from mlx_clap.search import lock

    t0 = time.perf_counter()
    try:
        lock.acquire(out)  # a store another run is writing is not "up to date": the full path says so
    except OSError:
        return None
    try:
        return _mirrored_locked(request, t0)
    finally:
        lock.release(out)


def _mirrored_locked(request: MirrorRequest, t0: float) -> dict | None:
    from mlx_clap.store import Store, StoreError

    try:
        store = Store.open(request.out, write=True)  # the lock is held already (re-entrant)
    except StoreError:
        return None  # the full path reports it
    try:
        return _mirrored_store(store, request, t0)
    finally:
        store.close()


def _mirrored_store(store: Any, request: MirrorRequest, t0: float) -> dict | None:
    from mlx_clap.store import StoreError

    if (
        _store_differs(store, request)
        or _any_file_changed(store, request.files)
        or (not request.no_prune and _has_rows_to_prune(store, request))
        or (request.prune_missing and any(file_gone(str(it["path"])) for it in store.items))
    ):
        return None
    try:
        record_roots(store, request.paths)  # a store made before roots were recorded gets them now
    except (OSError, StoreError):
        return None  # the full path says why the store cannot be written
    return _up_to_date_summary(store, request, time.perf_counter() - t0)


def _store_differs(store: Any, request: MirrorRequest) -> bool:
    """Whether the store was made with another model or other settings, or holds something the full run
    would clean up (superseded rows; notes, when it was opened writable)."""
    manifest = store.manifest
    settings = manifest.get("settings") or {}
    return bool(
        manifest.get("model") != recorded_model_id(request.model_id)
        or manifest.get("store_dtype") != request.store_dtype
        or any(settings.get(k) != v for k, v in request.wanted.items())
        or (request.segments and not store.has_segments)
        or store.dead_rows
        or store.read_only is False
        and store.notes
    )


def _any_file_changed(store: Any, files: list[InputFile]) -> bool:
    """Whether an input is new, changed or unreadable: not stored with its current stat key (path, size,
    mtime)."""
    done = store.done_keys()
    for f in files:
        try:
            if stat_key(f.path) not in done:
                return True
        except OSError:
            return True
    return False


def _has_rows_to_prune(store: Any, request: MirrorRequest) -> bool:
    """Whether the store holds a row of a file gone from the inputs named (which the run would remove)."""
    present = {str(f.path) for f in request.files}
    for root, recursive in input_scopes(request.paths, request.recursive, present):
        scope = root.rstrip(os.sep) + os.sep
        for it in store.items:
            p = str(it["path"])
            if p in present:
                continue
            if p == root or (
                p.startswith(scope) and (recursive or os.path.dirname(p) == root.rstrip(os.sep))
            ):
                return True
    return False


def _up_to_date_summary(store: Any, request: MirrorRequest, seconds: float) -> dict:
    """The --summary-json of a run that found every file stored already."""
    return {
        "files": len(request.files),
        "embedded": 0,
        "reused": 0,
        "removed": 0,
        "moved": 0,
        "missing": 0,
        "skipped": len(request.files),
        "failed": 0,
        "new_failures": 0,
        "failures": [],
        "warnings": [],
        "seconds": round(seconds, 3),
        "audio_seconds": 0.0,
        "realtime_factor": None,
        "files_per_second": None,
        "format": "store",
        "out": str(request.out),
        "model": store.manifest.get("model"),
        "errors_file": None,
        "up_to_date": True,
    }
