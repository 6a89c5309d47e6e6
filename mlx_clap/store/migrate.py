"""Convert a store of format 1 or 2 (manifest.json, items.jsonl, .npy shards; read by `legacy.py`)
into the Lance format, in place and once.

The Lance dataset is written into the same folder: its entries (`_versions/`, `data/`, ...) never collide
with the old ones (manifest.json, items.jsonl, shards/, checksums/, segments/, data-N/). Its first version
is one atomic commit holding every live row, so until that commit the old store is the store, and after
it the new one is; only then are the old entries removed. A kill at any moment leaves one of the two
whole: a later run removes the leftovers of the other (a migration killed before its commit starts over).
All of it happens under the store's writer lock (the same `.writer.lock`).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pyarrow as pa

from mlx_clap.search import lock as _lock
from mlx_clap.store.errors import StoreBusyError, StoreError, lance_failure
from mlx_clap.store.legacy import LegacyStore
from mlx_clap.store.location import (
    ERRORS_NAME,
    LOCK_NAME,
    WARNINGS_NAME,
    Location,
    locate,
    remove_lance_leftovers,
)
from mlx_clap.store.schema import layout, rows_table, store_schema

# What the old format kept that the new one does not (errors.jsonl, warnings.jsonl, the lock stay).
LEGACY_ENTRIES = ("manifest.json", "items.jsonl", "shards", "checksums", "segments")
MIGRATE_FILES = 1024  # file rows per Arrow batch while migrating


def is_legacy(target: str | Location) -> bool:
    """Whether a local folder holds a store of format 1 or 2 not migrated yet."""
    loc = target if isinstance(target, Location) else locate(target)
    return loc.local is not None and (loc.local / "manifest.json").is_file()


def remove_legacy_entries(loc: Location) -> None:
    """Remove the old format's files and folders (after the Lance version that replaces them)."""
    assert loc.local is not None
    for p in sorted(loc.local.iterdir()):
        name = p.name
        old = name in LEGACY_ENTRIES or (name.startswith("data-") and name[5:].isdigit())
        temp = name.startswith(".") and name.endswith(".tmp")  # the old writer's atomic-write temps
        if not (old or temp) or name in (ERRORS_NAME, WARNINGS_NAME, LOCK_NAME):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    # manifest.json goes last of all: while it is there, the folder still says "migrate me"
    (loc.local / "manifest.json").unlink(missing_ok=True)


def migrate_store(target: str | Location) -> dict:
    """Convert the format-1/2 store in a local folder to the Lance format (see the module docstring).
    Returns {"files", "segments", "version"}. StoreBusyError when another process writes it; StoreError
    naming the folder when the old store is damaged (its own `check --repair` first) or the write fails."""
    import lance

    from mlx_clap.store.legacy import LegacyFormatError

    loc = target if isinstance(target, Location) else locate(target)
    if loc.local is None:
        raise StoreError(f"{loc}: only a local folder can hold an old-format store")
    try:
        _lock.acquire(loc.local)
    except _lock.StoreLockedError as exc:
        raise StoreBusyError(str(exc)) from None
    try:
        if loc.version_files():  # migrated already: a run killed before it removed the old files
            remove_legacy_entries(loc)
            ds = lance.dataset(loc.uri)
            return {"files": None, "segments": None, "version": ds.version}
        try:
            old = LegacyStore(loc.local)
        except LegacyFormatError as exc:
            raise StoreError(f"cannot convert the old-format store: {exc}") from exc
        remove_lance_leftovers(loc)  # a migration killed before its commit
        manifest = {k: v for k, v in old.manifest.items() if k != "store"}
        manifest["migrated_from_format"] = old.format_version
        manifest["store"] = layout(old.dim, old.dtype, old.segment_settings)
        schema = store_schema(old.dim, old.dtype, manifest)
        counts = {"files": len(old), "segments": 0}
        failed: list[BaseException] = []  # Lance reports an exception of the batch source as its own

        def batches() -> Iterator[pa.RecordBatch]:
            try:
                yield from _batches(old, schema, counts, str(loc))
            except BaseException as exc:
                failed.append(exc)
                raise

        reader = pa.RecordBatchReader.from_batches(schema, batches())
        try:
            ds = lance.write_dataset(reader, loc.uri, schema=schema, mode="create", max_rows_per_group=1024)
        except BaseException as exc:
            if failed:
                raise failed[0] from None
            if not isinstance(exc, (OSError, ValueError, RuntimeError)):
                raise
            raise StoreError(f"{loc}: cannot convert the store: {lance_failure(exc)}") from exc
        remove_legacy_entries(loc)
        return {**counts, "version": ds.version}
    finally:
        _lock.release(loc.local)


def _batches(old: LegacyStore, schema: pa.Schema, counts: dict, where: str) -> Iterator[pa.RecordBatch]:
    """The old store's live file rows (and their segments), in its row order, a block at a time; the
    vectors as stored (float16 stays float16), bit for bit."""
    for first, block in old.iter_shards(MIGRATE_FILES):
        rows = range(first, first + block.shape[0])
        segs = [old.segments_of(r) for r in rows] if old.has_segments else None
        counts["segments"] += sum(s[2].shape[0] for s in segs or () if s is not None)
        chunk = [{k: v for k, v in old.items[r].items() if k != "seg"} for r in rows]
        yield from rows_table(chunk, block, segs, schema, where).to_batches()
