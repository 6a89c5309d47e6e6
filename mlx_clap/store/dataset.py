"""`Store`: an embedding store on one Lance dataset, read from a pinned version, written by one writer.

Reading. `Store.open(target)` pins the version it finds: every read (`items`, `iter_shards`, `matrix`,
`take`, `segment_view`) answers from that snapshot while other processes commit and compact (cleanup
keeps every version younger than `DEFAULT_RETENTION`). `refresh()` moves to the newest version. Row k of
`items` is the k-th file row of the snapshot in Lance's scan order; `iter_shards` and `take` use the same
numbering, and every read of vectors checks the row addresses it got, so a vector is never handed out for
another row's path.

Writing. One writer per store: a local store takes the flock of `.writer.lock` (mlx_clap.search.lock);
on every store, a commit first checks that the newest version is still the one this writer read or
wrote last, and Lance's own conflict detection catches a commit racing it: either is a StoreBusyError
naming the store, and what was committed before stays. A commit (`commit`, `write`, `reuse`, `remove`)
is one Lance version: the old rows of the paths it writes or removes are deleted and the new rows
added atomically, so a kill -9 at any moment leaves the last committed version, and a rerun of the same
work gives the same rows. `compact` rewrites small fragments, drops deleted rows and removes versions
older than the retention (and data files no version names, such as a killed writer's).
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# By name: `lance.commit` is no attribute of `lance` until imported, and an `except lance.commit...` clause
# then fails while handling whatever was raised (a Ctrl-C in a commit became an AttributeError).
from lance.commit import CommitConflictError

from mlx_clap.search import lock as _lock
from mlx_clap.store.errors import (
    StaleSnapshotError,
    StoreBusyError,
    StoreError,
    UnknownPathError,
    lance_failure,
)
from mlx_clap.store.location import (
    DERIVED_ENTRIES,
    ERRORS_NAME,
    LANCE_ENTRIES,
    SIDE_FILES,
    WARNINGS_NAME,
    Location,
    check_entries,
    lines,
    locate,
    remove_lance_leftovers,
)
from mlx_clap.store.schema import (
    FILE,
    META_COLUMNS,
    METADATA_KEY,
    SEGMENT,
    VECTOR,
    identity_diff,
    items_of,
    layout,
    manifest_of,
    path_key,
    rows_table,
    store_schema,
    vectors_of,
)
from mlx_clap.store.write import RowsTarget, WrittenRows, write_rows, write_table

# Versions younger than this survive a compaction, so a reader that opened one keeps reading it.
DEFAULT_RETENTION = datetime.timedelta(hours=1)
BLOCK_ROWS = 65536
LEGACY_MANIFEST = "manifest.json"  # formats 1 and 2 (mlx_clap.store.legacy)
_LANCE_ERRORS = (OSError, ValueError, RuntimeError)


class LegacyStoreError(StoreError):
    """The folder holds a store of format 1 or 2; `Store.open(..., migrate=True)` converts it once."""


def _has_version(loc: Location) -> bool:
    return bool(loc.version_files())


def _open_dataset(loc: Location, version: int | None) -> lance.LanceDataset:
    """The Lance dataset at `loc` (StoreError naming the store and the cause)."""
    if loc.local is not None:
        if not loc.local.exists():
            raise StoreError(f"{loc}: no such store")
        if not loc.local.is_dir():
            raise StoreError(f"{loc}: not a folder, so not an embedding store")
        if not _has_version(loc):
            if (loc.local / LEGACY_MANIFEST).is_file():
                raise LegacyStoreError(
                    f"{loc}: a store of an older mlx-clap (format 1 or 2); it is converted to the Lance "
                    "format once, by the next command that writes it (or mlx_clap.store.migrate_store)"
                )
            raise StoreError(f"{loc}: holds no store (no committed Lance version)")
    try:
        return lance.dataset(loc.uri, version=version, storage_options=loc.storage_options)
    except _LANCE_ERRORS as exc:
        text = str(exc)
        if "not found" in text.lower() and "_versions" in text:
            bucket = loc.missing_bucket()
            if bucket is not None:
                raise StoreError(f"{loc}: no such bucket ({bucket}) on the object store") from exc
            raise StoreError(f"{loc}: holds no store (no committed Lance version)") from exc
        if version is not None and "not found" in text.lower():
            raise StaleSnapshotError(
                f"{loc}: version {version} is gone (cleaned up by a compaction); open the store again"
            ) from exc
        raise StoreError(f"{loc}: cannot open the store: {_damage_hint(loc, exc)}") from exc


def _damage_hint(loc: Location, exc: BaseException) -> str:
    """The cause of a failed open; for a damaged newest version, which older one is readable."""
    cause = lance_failure(exc)
    versions = sorted(_versions_of(loc), reverse=True)
    for v in versions[1:4]:
        try:
            lance.dataset(loc.uri, version=v, storage_options=loc.storage_options)
        except _LANCE_ERRORS:
            continue
        return (
            f"version {versions[0]} is damaged or half-written ({cause}); version {v} is readable: "
            "`mlx-clap check STORE --repair` sets the damaged version aside"
        )
    return cause


def _versions_of(loc: Location) -> list[int]:
    """Version numbers of the manifests under _versions/ (Lance's v2 names: u64::MAX - version)."""
    out = []
    for name in loc.version_files():
        stem = name[: -len(".manifest")]
        if stem.isdigit():
            n = int(stem)
            out.append((2**64 - 1) - n if n > 2**63 else n)
    return out


class Store:
    """An embedding store (see the module docstring). Open with `Store.open` (a snapshot), `Store.create`
    or `Store.for_run` (a writer, holding the store until `close()`)."""

    def __init__(self, loc: Location, ds: lance.LanceDataset, *, writable: bool = False):
        self.location = loc
        self._ds = ds
        self.read_only = not writable
        self.notes: list[str] = []
        self._holds = 0
        self._load()

    # -------------------------------------------------------------------------------- basic facts
    @property
    def uri(self) -> str:
        return self.location.uri

    @property
    def path(self) -> Path | str:
        """The store's folder (a Path) for a local store, its URI (a str) on an object store."""
        return self.location.local if self.location.local is not None else self.location.uri

    @property
    def version(self) -> int:
        """The Lance version this object reads (and, for a writer, last committed)."""
        return int(self._ds.version)

    @property
    def dataset(self) -> lance.LanceDataset:
        """The pinned Lance dataset (for Lance's own tools: indexes, SQL, DuckDB)."""
        return self._ds

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this snapshot (for caches of derived files: an ANN index, a map)."""
        return {
            "uri": self.uri,
            "version": self.version,
            "created": self.manifest.get("created"),
            "files": len(self),
            "segments": int(self._seg_pos.size),
        }

    def __repr__(self) -> str:
        return f"Store({str(self.location)!r}, version={self.version}, files={len(self)})"

    # ---------------------------------------------------------------------------------- loading
    def _load(self) -> None:
        """Read the snapshot's manifest and every row's metadata (not the vectors) with its address."""
        self.manifest = manifest_of(self._ds.schema, str(self.location))
        lay = self.manifest["store"]
        self.dim, self.dtype = int(lay["dim"]), str(lay["dtype"])
        try:
            meta = self._ds.scanner(
                columns=list(META_COLUMNS), with_row_address=True, scan_in_order=True
            ).to_table()
        except _LANCE_ERRORS as exc:
            raise StoreError(
                f"{self.location}: cannot read the store's rows ({lance_failure(exc)}); "
                "`mlx-clap check STORE` names the damage"
            ) from exc
        self._set_meta(meta)

    def _set_meta(self, meta: pa.Table) -> None:
        kinds = meta.column("kind")
        is_file = pc.equal(kinds, FILE).to_numpy(zero_copy_only=False)
        is_seg = pc.equal(kinds, SEGMENT).to_numpy(zero_copy_only=False)
        bad = int(meta.num_rows - is_file.sum() - is_seg.sum())
        if bad:
            raise StoreError(f"{self.location}: {bad} row(s) of unknown kind; not an mlx-clap store")
        self._meta = meta
        self._addr = meta.column("_rowaddr").to_numpy()
        self._keys = pc.coalesce(meta.column("path_raw"), pc.cast(meta.column("path"), pa.binary()))
        self._file_pos = np.nonzero(is_file)[0]
        self._seg_pos = np.nonzero(is_seg)[0]
        self._items: list[dict] | None = None
        self._row_by_path: dict[str, int] | None = None
        self._view: SegmentView | None = None

    # ------------------------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        target: str | os.PathLike,
        *,
        version: int | None = None,
        write: bool = False,
        migrate: bool = False,
        storage_options: dict[str, str] | None = None,
    ) -> Store:
        """Open a store: a snapshot of `version` (default the newest). `write` takes the writer lock
        (StoreBusyError when another process holds it) until `close()`. A format-1/2 folder raises
        LegacyStoreError, or with `migrate` is converted first (mlx_clap.store.migrate)."""
        loc = target if isinstance(target, Location) else locate(target, storage_options)
        if migrate and loc.local is not None and (loc.local / LEGACY_MANIFEST).is_file():
            from mlx_clap.store.migrate import migrate_store

            migrate_store(loc)
        if write:
            check_entries(loc)
            store = cls._locked(loc, lambda: cls(loc, _open_dataset(loc, None), writable=True))
            return store
        return cls(loc, _open_dataset(loc, version))

    @classmethod
    def _locked(cls, loc: Location, make: Any) -> Store:
        """Take the local writer lock, then build the store with `make()`; the store holds the lock."""
        if loc.local is not None:
            try:
                _lock.acquire(loc.local)
            except _lock.StoreLockedError as exc:
                raise StoreBusyError(str(exc)) from None
            except OSError as exc:
                raise StoreError(f"{loc}: cannot lock the store for writing: {lance_failure(exc)}") from exc
        try:
            store = make()
        except BaseException:
            if loc.local is not None:
                _lock.release(loc.local)
            raise
        store._holds = 1
        return store

    @classmethod
    def create(
        cls,
        target: str | os.PathLike,
        manifest: dict,
        *,
        dim: int,
        dtype: str = "float16",
        segments: dict | None = None,
        overwrite: bool = False,
        storage_options: dict[str, str] | None = None,
    ) -> Store:
        """A new, empty store, open for writing (holding the store until `close()`). Its first version
        is one atomic commit, so a kill leaves no store or an empty one. A store already there is
        refused, unless `overwrite`: then the new empty store is committed as its next version (readers
        of older versions keep them until a compaction). A folder holding anything but store files, or
        a Lance dataset that mlx-clap did not write, is never replaced."""
        loc = target if isinstance(target, Location) else locate(target, storage_options)
        if not isinstance(dim, int) or isinstance(dim, bool) or not 1 <= dim <= 1 << 16:
            raise StoreError(f"{loc}: dim must be an integer from 1 to 65536 (got {dim!r})")
        full = {k: v for k, v in manifest.items() if k != "store"}
        full["store"] = layout(dim, dtype, segments)
        schema = store_schema(dim, dtype, full)
        if loc.local is not None:
            if loc.local.exists() and not loc.local.is_dir():
                raise StoreError(f"{loc}: exists and is not a folder")
            try:
                loc.local.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"{loc}: cannot create the store: {lance_failure(exc)}") from exc
            check_entries(loc)
        return cls._locked(loc, lambda: cls._create_locked(loc, schema, overwrite))

    @classmethod
    def _create_locked(cls, loc: Location, schema: pa.Schema, overwrite: bool) -> Store:
        names = loc.names()
        legacy = LEGACY_MANIFEST in names
        if _has_version(loc):
            try:
                manifest_of(_open_dataset(loc, None).schema, str(loc))
            except LegacyStoreError:
                pass
            except StoreError as exc:
                if "newer" not in str(exc) or not overwrite:
                    raise StoreError(f"{exc}; refusing to write over it") from None
        if (legacy or _has_version(loc)) and not overwrite:
            raise StoreError(f"{loc}: a store already exists here (open it, or overwrite it to start fresh)")
        from mlx_clap.store.legacy import is_legacy_entry

        ours = set(LANCE_ENTRIES) | set(SIDE_FILES) | set(DERIVED_ENTRIES)
        extra = [n for n in names if n not in ours and not (legacy and is_legacy_entry(n))]
        if extra:
            raise StoreError(
                f"{loc}: exists and is not an embedding store ({', '.join(extra[:3])}); "
                "choose a new or empty folder"
            )
        empty = pa.Table.from_batches([], schema=schema)
        mode = "overwrite" if _has_version(loc) else "create"
        if mode == "create":
            remove_lance_leftovers(loc)  # a creation killed before its first commit
        try:
            ds = lance.write_dataset(
                empty, loc.uri, schema=schema, mode=mode, storage_options=loc.storage_options
            )
        except _LANCE_ERRORS as exc:
            raise StoreError(f"{loc}: cannot create the store: {lance_failure(exc)}") from exc
        if legacy:
            from mlx_clap.store.migrate import remove_legacy_entries

            remove_legacy_entries(loc)
        return cls(loc, ds, writable=True)

    @classmethod
    def for_run(
        cls,
        target: str | os.PathLike,
        manifest: dict,
        *,
        dim: int,
        dtype: str = "float16",
        segments: dict | None = None,
        overwrite: bool = False,
        storage_options: dict[str, str] | None = None,
    ) -> Store:
        """The store an embedding run writes: created when missing (or with `overwrite`), else opened
        for writing (a format-1/2 store is migrated first) and refused, with the differences named,
        when it was made with another pipeline (weights, settings, dtype, segments)."""
        loc = target if isinstance(target, Location) else locate(target, storage_options)
        fresh = overwrite or not (
            loc.local is not None and (loc.local / LEGACY_MANIFEST).is_file() or _has_version(loc)
        )
        if fresh:
            return cls.create(loc, manifest, dim=dim, dtype=dtype, segments=segments, overwrite=overwrite)
        store = cls.open(loc, write=True, migrate=True)
        wanted = dict(manifest)
        wanted["store"] = layout(dim, dtype, segments)
        diffs = identity_diff(store.manifest, wanted)
        if store.dim != dim:
            diffs.insert(0, f"dim: {store.dim} there, {dim} now")
        if store.dtype != dtype and not any(d.startswith("store_dtype") for d in diffs):
            diffs.append(f"dtype: {store.dtype!r} there, {dtype!r} now")
        if diffs:
            store.close()
            raise StoreError(
                f"{loc}: holds embeddings made with another pipeline ({'; '.join(diffs[:4])}); "
                "choose a new store, or overwrite this one"
            )
        return store

    # ------------------------------------------------------------------------------------ locking
    def hold(self) -> None:
        """Hold the store for writing until `close()` (a no-op count for a store opened for writing)."""
        if self.read_only:
            raise StoreError(f"{self.location}: opened read-only; open it with write=True to write")
        if self.location.local is not None:
            try:
                _lock.acquire(self.location.local)
            except _lock.StoreLockedError as exc:
                raise StoreBusyError(str(exc)) from None
        self._holds += 1

    def close(self) -> None:
        """Release the writer lock (readers need no close)."""
        while self._holds:
            self._holds -= 1
            if self.location.local is not None:
                _lock.release(self.location.local)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def refresh(self) -> Store:
        """A Store of the newest version (this one if it is the newest); a writer keeps its lock."""
        latest = self._latest_version()
        if latest == self.version:
            return self
        if not self.read_only:
            raise StoreBusyError(self._busy_message(latest))
        return Store(self.location, _open_dataset(self.location, latest))

    # ------------------------------------------------------------------------------------ reading
    @property
    def items(self) -> list[dict]:
        """The file rows, one per path, in row order (dicts: path, size, mtime and, where known,
        sha256, duration, channels, source_rate, warnings)."""
        if self._items is None:
            self._items = items_of(self._meta.take(pa.array(self._file_pos)))
        return self._items

    def __len__(self) -> int:
        return int(self._file_pos.size)

    def row_of(self, path: str | os.PathLike) -> int:
        """Row (in `items`) of the file row stored for `path` (as given, or made absolute)."""
        if self._row_by_path is None:
            self._row_by_path = {str(it["path"]): i for i, it in enumerate(self.items)}
        for key in (os.fspath(path), os.path.abspath(os.fspath(path))):
            if key in self._row_by_path:
                return self._row_by_path[key]
        raise UnknownPathError(f"{self.location}: no vector stored for {os.fspath(path)}")

    def row_addresses(self) -> np.ndarray:
        """Lance row addresses (uint64) of the file rows, in `items` order: a row rewritten, or moved by
        a compaction, gets a new one, so a digest of a prefix tells rows only appended since."""
        return self._addr[self._file_pos]

    def done_keys(self) -> set[tuple[str, int, float]]:
        """(path, size, mtime) of every file row, for skipping unchanged files."""
        return {(str(it["path"]), int(it["size"]), float(it["mtime"])) for it in self.items}

    def by_content(self) -> dict[str, int]:
        """sha256 of stored content -> a row in `items` holding it (rows without sha256 left out)."""
        return {str(it["sha256"]): i for i, it in enumerate(self.items) if it.get("sha256")}

    @property
    def dead_rows(self) -> int:
        """Rows deleted but still in data files (the next `compact` reclaims them)."""
        total = 0
        for frag in self._ds.get_fragments():
            deletion = frag.metadata.deletion_file
            total += int(deletion.num_deleted_rows or 0) if deletion is not None else 0
        return total

    def _take_positions(self, pos: np.ndarray) -> np.ndarray:
        """float32 (len(pos), dim) vectors of rows at scan positions `pos`, in the order given."""
        pos = np.asarray(pos, dtype=np.int64)
        out = np.empty((pos.size, self.dim), dtype=np.float32)
        if not pos.size:
            return out
        order = np.argsort(pos, kind="stable")
        uniq, inverse = np.unique(pos[order], return_inverse=True)
        try:
            got = self._ds.take(uniq, columns=[VECTOR, "_rowaddr"])
        except _LANCE_ERRORS as exc:
            raise self._read_failure(exc) from exc
        if not np.array_equal(got.column("_rowaddr").to_numpy(), self._addr[uniq]):
            raise StoreError(
                f"{self.location}: rows read back at other addresses than listed; the store is damaged"
            )
        vecs = vectors_of(got.column(VECTOR), self.dim)
        out[order] = vecs[inverse]
        return out

    def take(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """float32 (len(rows), dim) vectors of rows of `items`, in the order given."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"{self.location}: row out of range (the store holds {len(self)})")
        return self._take_positions(self._file_pos[rows])

    def _read_failure(self, exc: BaseException) -> StoreError:
        text = str(exc)
        if "not found" in text.lower() or "No such file" in text:
            try:
                latest = self._latest_version()
            except StoreError:
                latest = self.version
            if latest != self.version:
                return StaleSnapshotError(
                    f"{self.location}: version {self.version}, which this reader holds, was cleaned up by "
                    f"a compaction (now version {latest}); open the store again"
                )
        return StoreError(
            f"{self.location}: cannot read vectors ({lance_failure(exc)}); "
            "`mlx-clap check STORE` names the damage"
        )

    def _scan(self, kind: str, positions: np.ndarray, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first, (n, dim) stored-dtype block) over the rows of `kind`, in scan order, checked against
        the addresses listed at open."""
        want = self._addr[positions]
        done = 0
        pending: list[np.ndarray] = []
        have = 0
        try:
            batches = self._ds.to_batches(
                columns=[VECTOR],
                filter=f"kind = '{kind}'",
                with_row_address=True,
                batch_size=block_rows,
                scan_in_order=True,
            )
            for batch in batches:
                addr = batch.column("_rowaddr").to_numpy()
                if not np.array_equal(addr, want[done + have : done + have + addr.size]):
                    raise StoreError(
                        f"{self.location}: rows read back at other addresses than listed; "
                        "the store is damaged"
                    )
                pending.append(vectors_of(batch.column(VECTOR), self.dim))
                have += addr.size
                while have >= block_rows:  # blocks of exactly block_rows rows, the last one shorter
                    joined = np.concatenate(pending) if len(pending) > 1 else pending[0]
                    yield done, joined[:block_rows]
                    done += block_rows
                    pending = [joined[block_rows:]]
                    have -= block_rows
        except StoreError:
            raise
        except _LANCE_ERRORS as exc:
            raise self._read_failure(exc) from exc
        if have:
            block = np.concatenate(pending) if len(pending) > 1 else pending[0]
            yield done, block
            done += block.shape[0]
        if done != want.size:
            raise StoreError(
                f"{self.location}: read {done} {kind} rows, {want.size} listed; the store is damaged"
            )

    def iter_shards(self, block_rows: int = BLOCK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, (n, dim) vectors as stored) blocks covering exactly the `len(self)` file rows in
        order; memory bounded by a block."""
        if len(self):
            yield from self._scan(FILE, self._file_pos, block_rows)

    def matrix(self, dtype: Any = np.float32) -> np.ndarray:
        """All file vectors as one (N, dim) array."""
        out = np.empty((len(self), self.dim), dtype=dtype)
        for first, block in self.iter_shards():
            out[first : first + block.shape[0]] = block
        return out

    # ----------------------------------------------------------------------------------- segments
    @property
    def segment_settings(self) -> dict | None:
        """{"hop": s, "window": s} when the store keeps per-window vectors, else None."""
        seg = self.manifest["store"].get("segments")
        return dict(seg) if isinstance(seg, dict) else None

    @property
    def has_segments(self) -> bool:
        return self.segment_settings is not None

    def segment_view(self) -> SegmentView:
        """The segments of the file rows: for each, its file (an index into `items`), start, end, and its
        vector on demand; segments of one file are contiguous and sorted by start. Segment rows whose
        (path, sha256) matches no file row are left out (and counted in `notes`)."""
        if self._view is None:
            self._view = self._build_view()
        return self._view

    def _build_view(self) -> SegmentView:
        if not self._seg_pos.size:
            return SegmentView.empty(self.dim)
        seg = self._meta.take(pa.array(self._seg_pos))
        files = self._meta.take(pa.array(self._file_pos))
        sep = pa.scalar(b"\0", pa.binary())

        def joined(pos: np.ndarray, table: pa.Table) -> Any:  # path key + sha256: what names a file's content
            sha = pc.cast(pc.fill_null(table.column("sha256"), ""), pa.binary())
            return pc.binary_join_element_wise(pc.take(self._keys, pa.array(pos)), sha, sep)

        file_keys, seg_keys = joined(self._file_pos, files), joined(self._seg_pos, seg)
        owner = pc.index_in(seg_keys, value_set=file_keys).to_numpy(zero_copy_only=False)
        owner = np.where(np.isnan(owner.astype(np.float64)), -1, owner).astype(np.int64)
        start = seg.column("start").to_numpy(zero_copy_only=False).astype(np.float64)
        end = seg.column("end").to_numpy(zero_copy_only=False).astype(np.float64)
        keep = np.nonzero(owner >= 0)[0]
        if keep.size < owner.size:
            self.notes.append(
                f"{self.location}: {owner.size - keep.size} segment row(s) belong to no file row; ignored "
                "(`mlx-clap check STORE --repair` removes them)"
            )
        order = keep[np.lexsort((start[keep], owner[keep]))]
        identity = order.size == owner.size and bool(np.all(order == np.arange(order.size)))
        return SegmentView(self, owner[order], self._seg_pos[order], start[order], end[order], identity)

    # -------------------------------------------------------------------------------- side files
    def errors(self) -> list[dict]:
        """The failure records of errors.jsonl (may name files that later succeeded)."""
        return self.location.read_records(ERRORS_NAME)

    def record_error(self, path: str | os.PathLike, error: str, **extra: Any) -> None:
        """Add one failure record ({"path", "error", "time", ...}) to errors.jsonl."""
        import time

        self._require_writer()
        rec = {"path": os.fspath(path), "error": str(error), "time": time.time(), **extra}
        self._side(lambda: self.location.append_side(ERRORS_NAME, [rec]), ERRORS_NAME)

    def rewrite_errors(self, records: list[dict]) -> None:
        """Replace errors.jsonl with `records` (removed when there are none)."""
        self._rewrite(ERRORS_NAME, records)

    def warnings(self) -> list[dict]:
        """The records of warnings.jsonl ({"path", "warnings"} per file decoded in part)."""
        return self.location.read_records(WARNINGS_NAME)

    def rewrite_warnings(self, records: list[dict]) -> None:
        """Replace warnings.jsonl with `records` (removed when there are none)."""
        self._rewrite(WARNINGS_NAME, records)

    def _rewrite(self, name: str, records: list[dict]) -> None:
        self._require_writer()
        if records:
            self._side(lambda: self.location.write_side(name, lines(records)), name)
        else:
            self._side(lambda: self.location.remove_side(name), name)

    def _side(self, fn: Any, name: str) -> None:
        check_entries(self.location)
        try:
            fn()
        except StoreError:
            raise
        except _LANCE_ERRORS as exc:
            raise StoreError(f"{self.location}: cannot write {name}: {lance_failure(exc)}") from exc

    # ------------------------------------------------------------------------------------ writing
    def _require_writer(self) -> None:
        if self.read_only or not self._holds:
            raise StoreError(f"{self.location}: not open for writing (Store.open(..., write=True))")

    def target(self) -> RowsTarget:
        """Where a worker writes rows for this store (`write_rows(store.target(), ...)`), picklable."""
        return RowsTarget(self.location, self._ds.schema, self.has_segments)

    def write(
        self,
        items: Sequence[dict],
        vectors: np.ndarray,
        segments: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray] | None] | None = None,
    ) -> int:
        """Store file rows (and their segment rows) in one commit, replacing the rows their paths had;
        returns the new version. See `write_rows` for the arguments."""
        self._require_writer()
        return self.commit([write_rows(self.target(), items, vectors, segments)])

    def reuse(self, pairs: Sequence[tuple[dict, int]]) -> int:
        """Store files whose content is stored already (a copy, a rename): per (item, row of `items`
        with the same content), a file row with the item's path, size, mtime and sha256 and the stored
        row's vector, duration, channels, source_rate and warnings, plus copies of that row's segment
        rows. One commit; returns the new version."""
        self._require_writer()
        if not pairs:
            return self.version
        rows = np.array([r for _, r in pairs], dtype=np.int64)
        vectors = self.take(rows)
        view = self.segment_view() if self.has_segments else None
        items, segments = [], []
        for item, row in pairs:
            source = self.items[int(row)]
            new = dict(item)
            for key in ("duration", "channels", "source_rate", "warnings"):
                if key in source:
                    new[key] = source[key]
            items.append(new)
            if view is not None:
                idx = view.of_file(int(row))
                segments.append((view.start[idx], view.end[idx], view.take(idx)) if idx.size else None)
        stored = np.asarray(vectors, dtype=self.dtype)  # the stored values, bit for bit
        table = rows_table(items, stored, segments if view is not None else None, self._ds.schema, str(self))
        return self.commit([write_table(self.target(), table)])

    def remove(self, paths: Iterable[str]) -> int:
        """Delete every row (file and segments) of `paths` in one commit; returns the new version."""
        return self.commit((), remove=paths)

    def commit(self, written: Sequence[WrittenRows] = (), remove: Iterable[str] = ()) -> int:
        """Make rows written by `write_rows` visible and delete the rows of `remove`, in one Lance
        version: every earlier row (file or segment) of a path in `written` or `remove` is deleted in
        the same commit, so a path never has two file rows. Returns the new version (the current one
        when there was nothing to do). StoreBusyError when another writer committed meanwhile."""
        self._require_writer()
        seen: set[str] = set()
        for w in written:
            twice = seen & set(w.paths)
            if twice:
                raise StoreError(f"{self.location}: {sorted(twice)[0]} is written twice in one commit")
            seen |= set(w.paths)
        paths = seen | {os.fspath(p) for p in remove}
        new_frags = [f for w in written for f in w.fragment_metadata()]
        if paths:
            value_set = pa.array([path_key(p) for p in paths], type=pa.binary())
            hit = pc.is_in(self._keys, value_set=value_set).to_numpy(zero_copy_only=False)
        else:
            hit = np.zeros(self._addr.size, dtype=bool)
        if not hit.any() and not new_frags:
            return self.version
        self._check_latest()
        updated, removed = [], []
        try:
            addrs = self._addr[hit]
            frag_ids = addrs >> np.uint64(32)
            for fid in np.unique(frag_ids):
                offsets = (addrs[frag_ids == fid] & np.uint64(0xFFFFFFFF)).astype(np.int64).tolist()
                frag = self._ds.get_fragment(int(fid))
                new = frag.delete_rows(offsets)
                if new is None:
                    removed.append(int(fid))
                else:
                    updated.append(new)
            op = lance.LanceOperation.Update(
                removed_fragment_ids=removed, updated_fragments=updated, new_fragments=new_frags
            )
            ds = self._commit(op)
        except (StoreBusyError, StoreError):
            raise
        except _LANCE_ERRORS as exc:
            raise StoreError(f"{self.location}: cannot write the store: {lance_failure(exc)}") from exc
        self._after_commit(ds, hit)
        return self.version

    def _commit(self, op: Any) -> lance.LanceDataset:
        """Commit `op` on top of this writer's version; StoreBusyError on a conflict."""
        try:
            return commit_operation(self.location, self._ds, op)
        except StoreBusyError:
            try:
                self._ds = lance.dataset(self.uri, storage_options=self.location.storage_options)
                self._load()
            except StoreError:
                pass
            raise

    def _after_commit(self, ds: lance.LanceDataset, deleted: np.ndarray) -> None:
        """Bring the snapshot to `ds` without rereading every row: drop the deleted rows, read the rows
        of the fragments this commit added (they follow the old ones in scan order)."""
        old_ids = {int(a) for a in np.unique(self._addr >> np.uint64(32))}
        self._ds = ds
        fresh = [f for f in ds.get_fragments() if f.fragment_id not in old_ids]
        parts = [self._meta.filter(pa.array(~deleted))] if deleted.any() else [self._meta]
        for frag in fresh:
            parts.append(frag.to_table(columns=list(META_COLUMNS), with_row_address=True))
        meta = pa.concat_tables([p.select(self._meta.column_names) for p in parts])
        self._set_meta(meta)

    def update_manifest(self, changes: dict) -> int:
        """Set top-level manifest entries (e.g. library_roots) in a new version; the pipeline identity
        and the "store" section cannot change. Returns the new version."""
        self._require_writer()
        from mlx_clap.store.schema import IDENTITY_KEYS

        fixed = [k for k in changes if k in (*IDENTITY_KEYS, "store")]
        if fixed:
            raise StoreError(f"{self.location}: {', '.join(fixed)} cannot change in a store")
        manifest = {**self.manifest, **changes}
        if manifest == self.manifest:
            return self.version
        self._check_latest()
        before = self.version
        try:
            # on a dataset of its own: Lance moves the object it is called on to the new version
            base = lance.dataset(self.uri, version=before, storage_options=self.location.storage_options)
            base.update_schema_metadata({METADATA_KEY: json.dumps(manifest, sort_keys=True)})
            ds = lance.dataset(self.uri, storage_options=self.location.storage_options)
        except _LANCE_ERRORS as exc:
            raise StoreError(f"{self.location}: cannot write the store: {lance_failure(exc)}") from exc
        if ds.version != before + 1:
            self._ds = ds
            self._load()
            raise StoreBusyError(
                f"{self.location}: another writer committed to the store while this one did; "
                "one writer per store: stop the other run"
            )
        self._ds = ds
        self.manifest = manifest_of(ds.schema, str(self.location))
        return self.version

    def compact(self, retain: datetime.timedelta = DEFAULT_RETENTION) -> dict[str, int]:
        """Rewrite small fragments and drop deleted rows (row order kept), then remove versions older
        than `retain` and data files no kept version names (those of a killed writer too, on a local
        store, whose lock says no other writer is at work). Returns counts."""
        self._require_writer()
        self._check_latest()
        stats = {"fragments_removed": 0, "fragments_added": 0, "versions_removed": 0, "bytes_removed": 0}
        try:
            if self.dead_rows or len(self._ds.get_fragments()) > 1:
                m = self._ds.optimize.compact_files(materialize_deletions_threshold=0.0)
                stats["fragments_removed"], stats["fragments_added"] = m.fragments_removed, m.fragments_added
            ds = lance.dataset(self.uri, storage_options=self.location.storage_options)
            cleanup = ds.cleanup_old_versions(
                older_than=retain, delete_unverified=self.location.local is not None
            )
            stats["versions_removed"] = int(cleanup.old_versions)
            stats["bytes_removed"] = int(cleanup.bytes_removed)
        except CommitConflictError as exc:
            raise StoreBusyError(
                f"{self.location}: another writer changed the store during compaction ({lance_failure(exc)})"
            ) from exc
        except _LANCE_ERRORS as exc:
            raise StoreError(f"{self.location}: cannot compact the store: {lance_failure(exc)}") from exc
        self._ds = ds
        self._load()
        return stats

    def _latest_version(self) -> int:
        try:
            return int(self._ds.latest_version)
        except _LANCE_ERRORS as exc:
            raise StoreError(
                f"{self.location}: cannot read the store's versions: {lance_failure(exc)}"
            ) from exc

    def _busy_message(self, latest: int) -> str:
        return (
            f"{self.location}: another writer committed version {latest} since this one read version "
            f"{self.version}; one writer per store: nothing of this commit was written, rerun once the "
            "other run is done"
        )

    def _check_latest(self) -> None:
        if self.location.local is not None:
            check_entries(self.location)
        latest = self._latest_version()
        if latest != self.version:
            raise StoreBusyError(self._busy_message(latest))


def commit_operation(loc: Location, base: lance.LanceDataset, op: Any) -> lance.LanceDataset:
    """Commit a Lance operation on top of version `base` (the one the writer read): StoreBusyError when
    Lance finds it conflicting with a concurrent commit, or when another commit went in meanwhile."""
    before = int(base.version)
    try:
        ds = lance.LanceDataset.commit(base, op, read_version=before, storage_options=loc.storage_options)
    except CommitConflictError as exc:
        raise StoreBusyError(
            f"{loc}: another writer changed the same rows at the same time ({lance_failure(exc)}); "
            "one writer per store: nothing of this commit was written"
        ) from exc
    if ds.version != before + 1:
        raise StoreBusyError(
            f"{loc}: another writer committed to the store while this one did (versions {before + 1} to "
            f"{ds.version - 1}); this commit went in on top of them as version {ds.version}, no rows lost; "
            "one writer per store: stop the other run"
        )
    return ds


class SegmentView:
    """The segments of a store's file rows, as `Store.segment_view()` builds it: `file_index` (a row of
    `items` per segment), `start`, `end` (seconds), and vectors on demand (`take`, `iter_blocks`)."""

    def __init__(
        self,
        store: Store | None,
        file_index: np.ndarray,
        positions: np.ndarray,
        start: np.ndarray,
        end: np.ndarray,
        identity: bool = False,
        dim: int | None = None,
    ):
        self.store = store
        self.file_index = file_index
        self.positions = positions  # scan positions of the segment rows in the store's snapshot
        self.start = start
        self.end = end
        self.dim = int(dim if dim is not None else store.dim)  # type: ignore[union-attr]
        self._identity = identity  # the view's order is the scan order of every segment row

    @classmethod
    def empty(cls, dim: int) -> SegmentView:
        z = np.zeros(0, dtype=np.int64)
        return cls(None, z, z, np.zeros(0), np.zeros(0), dim=dim)

    def __len__(self) -> int:
        return int(self.positions.size)

    def take(self, idx: np.ndarray | Sequence[int]) -> np.ndarray:
        """float32 (len(idx), dim) vectors of segments `idx`."""
        idx = np.asarray(idx, dtype=np.int64)
        if self.store is None:
            return np.zeros((idx.size, self.dim), dtype=np.float32)
        return self.store._take_positions(self.positions[idx])

    def iter_blocks(self, block_rows: int = BLOCK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        """(first segment, (n, dim) float block) over all segments in order; memory bounded by a block."""
        if not len(self) or self.store is None:
            return
        if self._identity:
            yield from self.store._scan(SEGMENT, self.positions, block_rows)
            return
        for first in range(0, len(self), block_rows):
            yield first, self.take(np.arange(first, min(first + block_rows, len(self))))

    def matrix(self) -> np.ndarray:
        """All segment vectors, float32 (S, dim) (small stores)."""
        return self.take(np.arange(len(self)))

    def of_file(self, file_index: int) -> np.ndarray:
        """Segment indices of one file (a row of `items`), sorted by start."""
        lo, hi = np.searchsorted(self.file_index, [file_index, file_index + 1])
        return np.arange(lo, hi, dtype=np.int64)
