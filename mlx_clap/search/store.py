"""An embedding store on disk: fixed-size `.npy` shards, one JSON line per vector, a manifest.

Layout of a store folder (format 2; a format-1 store is generation 0 with no segment table):

    manifest.json          model id, weights sha256, settings, mlx-clap version; "store": dim, dtype,
                           shard_size, format_version, generation, segments ({"hop", "window"} or absent)
    errors.jsonl           the failures that stand ({"path", "error", "time"})
    .writer.lock           the one-writer lock (lock.py)
    <data>/                the tables of the current generation: the store folder itself for generation
                           0, data-N/ for generation N (each compaction writes the next one)
      items.jsonl          one JSON object per file row ({"path", "size", "mtime", "sha256", "duration",
                           ..., "seg": [first, count]}), line k = row k
      shards/emb-00000.npy rows [0, shard_size), emb-00001.npy rows [shard_size, 2*shard_size), ...
      checksums/           emb-NNNNN.sum.json: crc32 per row of shard NNNNN
      segments/            the same three for the per-window vectors ({"start", "end"} seconds per row);
                           a file row's "seg" names its contiguous range there

Rows and the live view: a row for a path already stored supersedes the old one (readers see a path's
latest row only: `items`, `matrix`, `iter_shards`, `row_of`); `compact` rewrites the live rows (minus
removed files) as the next generation, so superseded rows are reclaimed. Two file rows with the same
content (a copy, a rename) may share one segment range.

Crash safety: `append` first rewrites the shard(s) it touches through a temp file + fsync + rename, and
only then appends the item lines (one write, fsync); segment rows go in before the file row that names
them. So the shards always hold at least as many rows as items.jsonl names. `open` repairs what a
killed writer can leave: a partial last item line is dropped, shard rows without an item are ignored
(and overwritten by the next append), and temp files are removed.
Row k always lives in shard k // shard_size, so a resumed run yields the same files as an uninterrupted one.
Segment rows no file row names (a kill between the two appends) are dropped on open. `compact` builds the
next generation whole, then switches the manifest to it (one atomic rename), then deletes the old one; a
kill at any point leaves the old store or the new one, and `open` removes the other's leftovers.

Integrity (see also `mlx-clap check`):

- One writer at a time: every write takes the store's writer lock (`lock.py`, `.writer.lock`); a second
  writer fails at once naming the holder's PID. `open` repairs only while it can take that lock, and
  otherwise opens read-only.
- Each shard has a sidecar `checksums/emb-NNNNN.sum.json` with one crc32 per row and the shard file's size and
  mtime when it was written. The sidecar is written (atomically) after the shard and before the item
  lines, so the rows named by items.jsonl always have a checksum. `open` checks sizes always and the
  row checksums of every shard whose size or mtime differs from its sidecar's record (the cheap scheme);
  `check_store` checks every row. A store written before sidecars existed opens with its shards
  recorded as unverified, and gets sidecars on its first write-locked open.
- Nothing is written through a symbolic link: a store entry that is a link is refused, appends open
  with O_NOFOLLOW, and replacements are renames (which replace a link itself, never its target).
- Creation builds the store in a temp folder beside the target and renames it into place, so a killed
  or failed creation leaves no half-made store.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mlx_clap.io.files import (
    append_lines,
    atomic_write_bytes,
    atomic_write_json,
    current_umask,
    json_line,
    write_failure,
)
from mlx_clap.io.files import fsync_dir as _fsync_dir  # a module name the crash tests patch
from mlx_clap.search import lock as _lock

# 1: one table at the store's root. 2 adds generations (data-N/ after a compaction), a segment table, and
# superseded rows (a path's latest row wins). A version-1 store is read and written as generation 0.
STORE_FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
ITEMS_NAME = "items.jsonl"
ERRORS_NAME = "errors.jsonl"
SHARDS_DIR = "shards"
SUMS_DIR = "checksums"  # emb-NNNNN.sum.json: per-row crc32 of shard NNNNN
SEGMENTS_DIR = "segments"  # the table of per-window vectors, inside the data folder
DATA_PREFIX = "data-"  # data-N/: the tables of generation N (generation 0 lives at the store's root)
STORE_DTYPES = ("float16", "float32")
LOCK_NAME = _lock.LOCK_NAME
STORE_ENTRIES = (MANIFEST_NAME, ITEMS_NAME, ERRORS_NAME, SHARDS_DIR, SUMS_DIR, SEGMENTS_DIR, LOCK_NAME)
TABLE_ENTRIES = (ITEMS_NAME, SHARDS_DIR, SUMS_DIR, SEGMENTS_DIR)  # what one generation holds
# Files other commands keep next to a store (cluster, ANN index, serve's map); --overwrite may remove them.
DERIVED_ENTRIES = ("clusters.json", "ann.usearch", "ann.json", "map.json", "warnings.jsonl")
# |norm - 1| above this marks a row as not a unit vector (float16 rounding stays far below it).
UNIT_TOLERANCE = 1e-2


class StoreError(ValueError):
    """A store that cannot be created, opened or written; the message names the folder and the cause."""


class UnknownPathError(StoreError, KeyError):
    """`row_of` for a path the store does not hold (catchable as StoreError or KeyError)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class StoreBusyError(StoreError):
    """Another process holds the store's writer lock (the message names its PID)."""


def _shard_name(index: int) -> str:
    return f"emb-{index:05d}.npy"


def _sum_name(index: int) -> str:
    return f"emb-{index:05d}.sum.json"


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def row_crcs(rows: np.ndarray) -> list[int]:
    """crc32 of each row's bytes (as stored): the per-row checksum of the shard sidecars."""
    rows = np.ascontiguousarray(rows)
    return [zlib.crc32(rows[i].tobytes()) for i in range(rows.shape[0])]


def item_key(item: dict) -> tuple[str, int, float]:
    """The resume key of an item: (path, size, mtime)."""
    return (str(item["path"]), int(item["size"]), float(item["mtime"]))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def item_problem(obj: Any) -> str | None:
    """Why a decoded items.jsonl record is not a valid item (None when it is)."""
    if not isinstance(obj, dict):
        return "not a JSON object"
    for key in ("path", "size", "mtime"):
        if key not in obj:
            return f"field {key!r} is missing"
    if not isinstance(obj["path"], str) or not obj["path"]:
        return f"field 'path' must be a non-empty string (got {obj['path']!r})"
    if not _is_int(obj["size"]) or obj["size"] < 0:
        return f"field 'size' must be a non-negative integer (got {obj['size']!r})"
    m = obj["mtime"]
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
        return f"field 'mtime' must be a finite number (got {m!r})"
    seg = obj.get("seg")
    if seg is not None and not (
        isinstance(seg, list) and len(seg) == 2 and all(_is_int(v) and v >= 0 for v in seg)
    ):
        return f"field 'seg' must be [first_row, count] (got {seg!r})"
    return None


def _is_seconds(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def segment_problem(obj: Any) -> str | None:
    """Why a decoded segment-table record is not valid ({"start", "end"} seconds; None when it is)."""
    if not isinstance(obj, dict):
        return "not a JSON object"
    if not _is_seconds(obj.get("start")) or not _is_seconds(obj.get("end")) or obj["end"] < obj["start"]:
        return f"segment needs seconds 0 <= start <= end (got {obj.get('start')!r}, {obj.get('end')!r})"
    return None


def _remove_stale_generations(path: Path, manifest: dict) -> None:
    """Remove the leftovers of a compaction killed before or after its switch: generation folders the
    manifest does not name, and the root tables of generation 0 once a later one is current."""
    gen = generation_of(manifest)
    for p in path.iterdir():
        if p.name.startswith(DATA_PREFIX) and is_store_entry(p.name) and p.name != f"{DATA_PREFIX}{gen}":
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
    if gen:
        for name in TABLE_ENTRIES:
            p = path / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            elif p.is_file() and not p.is_symlink():
                p.unlink(missing_ok=True)


def validate_layout(mpath: Path, manifest: Any) -> dict:
    """The manifest's "store" section, checked for types and ranges; StoreError naming the field."""
    layout = manifest.get("store") if isinstance(manifest, dict) else None
    if not isinstance(layout, dict) or not {"dim", "dtype", "shard_size"} <= set(layout):
        raise StoreError(f"{mpath}: manifest has no valid 'store' section (dim, dtype, shard_size)")
    version = layout.get("format_version", 1)
    if not _is_int(version) or version < 1:
        raise StoreError(f"{mpath}: field store.format_version must be a positive integer (got {version!r})")
    if version > STORE_FORMAT_VERSION:
        raise StoreError(f"{mpath}: store format {version} is newer than this mlx-clap")
    for key in ("dim", "shard_size"):
        v = layout[key]
        if not _is_int(v) or not 1 <= v <= 1 << 24:
            raise StoreError(f"{mpath}: field store.{key} must be an integer from 1 to {1 << 24} (got {v!r})")
    if layout["dtype"] not in STORE_DTYPES:
        raise StoreError(f"{mpath}: unknown store dtype {layout['dtype']!r} (field store.dtype)")
    gen = layout.get("generation", 0)
    if not _is_int(gen) or gen < 0:
        raise StoreError(f"{mpath}: field store.generation must be a non-negative integer (got {gen!r})")
    seg = layout.get("segments")
    if seg is not None and not (
        isinstance(seg, dict)
        and all(
            isinstance(seg.get(k), (int, float)) and not isinstance(seg.get(k), bool)
            for k in ("hop", "window")
        )
        and seg["hop"] > 0
        and seg["window"] > 0
    ):
        raise StoreError(f'{mpath}: field store.segments must be {{"hop": s, "window": s}} (got {seg!r})')
    return layout


def is_store_entry(name: str) -> bool:
    """Whether a name in a store folder is the store's own (or a temp file of its atomic writes)."""
    return (
        name in STORE_ENTRIES + DERIVED_ENTRIES
        or (name.startswith(".") and name.endswith(".tmp"))
        or (name.startswith(DATA_PREFIX) and name[len(DATA_PREFIX) :].isdigit())
    )


def generation_of(manifest: dict) -> int:
    """The data generation a manifest names (0: the tables at the store's root)."""
    gen = manifest.get("store", {}).get("generation", 0) if isinstance(manifest, dict) else 0
    return gen if _is_int(gen) and gen >= 0 else 0


def data_dir(path: Path, manifest: dict) -> Path:
    """The folder holding the current generation's tables."""
    gen = generation_of(manifest)
    return Path(path) / f"{DATA_PREFIX}{gen}" if gen else Path(path)


def check_entries(path: Path) -> None:
    """StoreError when a store entry (or shard file) is a symbolic link or resolves outside `path`:
    writing there would change files outside the store."""
    root = os.path.realpath(path)
    names = [path / n for n in STORE_ENTRIES + DERIVED_ENTRIES]
    try:
        names += [p for p in path.iterdir() if p.name.startswith(DATA_PREFIX) and is_store_entry(p.name)]
    except OSError:
        pass
    todo = [
        p for p in names if p.name in (SHARDS_DIR, SUMS_DIR, SEGMENTS_DIR) or p.name.startswith(DATA_PREFIX)
    ]
    while todo:  # the store's own folders, at any depth (data-N/segments/shards/...)
        sub = todo.pop()
        if sub.is_dir() and not sub.is_symlink():
            for child in sorted(sub.iterdir()):
                names.append(child)
                if child.name in TABLE_ENTRIES and child.name != ITEMS_NAME:
                    todo.append(child)
    for p in names:
        if p.is_symlink():
            raise StoreError(
                f"{p}: is a symbolic link (to {os.readlink(p)}); a store's files must be its own. "
                "Replace the link with the real file or folder"
            )
        if p.exists() and os.path.commonpath([root, os.path.realpath(p)]) != root:
            raise StoreError(f"{p}: resolves outside the store folder {path}; refusing to use it")


def _cleanup_stale_builds(parent: Path, name: str) -> None:
    """Remove temp folders of creations killed before they were renamed into place (their lock is free)."""
    for tmp in parent.glob(f".{name}.creating-*"):
        if not tmp.is_dir() or tmp.is_symlink():
            continue
        try:
            _lock.acquire(tmp)
        except OSError:
            continue  # another creation is building it now
        _lock.release(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


class EmbeddingStore:
    """Append-only, crash-safe embedding store; see the module docstring for the layout.

    Readers use `open`, `items`, `iter_shards`, `matrix`, `row_of`; one writer uses `append` and
    `record_error`. Vectors are stored as float16 (default) or float32 and returned as float32 by `matrix`.
    A writer holding the store for a whole run calls `hold()` (and `close()` at the end).
    """

    def __init__(
        self, path: Path, manifest: dict, items: list[dict], data: Path | None = None, role: str = "files"
    ):
        self.path = Path(path)
        self.manifest = manifest
        # `_all` holds every physical row (line k of items.jsonl is row k); `items` the live ones.
        self._all = items
        self.role = role  # "files": a path's latest row wins; "segments": rows are addressed by "seg"
        self.data = Path(data) if data is not None else data_dir(self.path, manifest)
        layout = manifest["store"]
        self.dim = int(layout["dim"])
        self.dtype = str(layout["dtype"])
        self.shard_size = int(layout["shard_size"])
        self._row_by_path: dict[str, int] | None = None
        self._live_rows: np.ndarray | None = None
        self._live_items: list[dict] | None = None
        self._segments: EmbeddingStore | None = None
        self.notes: list[str] = []
        self.read_only = False
        self._holds = 0
        self._items_bytes = self._items_size()

    # ------------------------------------------------------------------------------------- locking
    def _items_size(self) -> int:
        try:
            return (self.data / ITEMS_NAME).stat().st_size
        except OSError:
            return 0

    def _acquire(self) -> None:
        """Take the writer lock and make sure nobody wrote items since this object read them."""
        try:
            _lock.acquire(self.path)
        except _lock.StoreLockedError as exc:
            raise StoreBusyError(str(exc)) from None
        try:
            self._check_fresh()
        except StoreError:
            _lock.release(self.path)
            raise

    def _check_fresh(self) -> None:
        if self._items_size() != self._items_bytes or (
            self.role == "files" and self.data != data_dir(self.path, self._manifest_on_disk())
        ):
            raise StoreError(
                f"{self.path}: items.jsonl changed since this store was opened (another writer?); "
                "open it again"
            )

    def _manifest_on_disk(self) -> dict:
        try:
            return json.loads((self.path / MANIFEST_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return self.manifest

    def hold(self) -> None:
        """Hold the writer lock until `close()` (a second writer then fails at once, naming this PID)."""
        check_entries(self.path)
        self._acquire()
        self._holds += 1

    def close(self) -> None:
        """Release what `hold()` took."""
        while self._holds:
            self._holds -= 1
            _lock.release(self.path)

    def __del__(self) -> None:
        # A writer dropped without close() (a command that returned or raised) frees the lock with it.
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> EmbeddingStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------- creating and opening
    @classmethod
    def create(
        cls,
        path: str | Path,
        manifest: dict,
        dim: int,
        dtype: str = "float16",
        shard_size: int = 4096,
        replace: bool = False,
        segments: dict | None = None,
    ) -> EmbeddingStore:
        """Make a new, empty store. It is built in a temp folder beside `path` and renamed into place,
        so a kill or a full disk leaves either nothing or a whole store. A folder that already holds a
        store (or other files) is refused, unless `replace`: then a folder holding only store files
        (a store, or a half-made one) is swapped for the new store."""
        path = Path(path)
        if dtype not in STORE_DTYPES:
            raise StoreError(f"{path}: store dtype {dtype!r} is not one of {', '.join(STORE_DTYPES)}")
        if not _is_int(dim) or not _is_int(shard_size) or dim <= 0 or shard_size <= 0:
            raise StoreError(
                f"{path}: dim and shard_size must be positive integers (got {dim!r}, {shard_size!r})"
            )
        if path.is_symlink() and not path.is_dir():
            raise StoreError(f"{path}: is a symbolic link to a non-folder")
        if path.is_symlink():
            # --out given as a link to a folder: build beside the real folder (a rename onto the link
            # would replace the link, and leave the folder it names empty).
            path = Path(os.path.realpath(path))
        if path.exists() and not path.is_dir():
            raise StoreError(f"{path}: exists and is not a folder")
        if path.is_dir():
            extra = sorted(p.name for p in path.iterdir() if not is_store_entry(p.name))
            if not replace and (path / MANIFEST_NAME).exists():
                raise StoreError(
                    f"{path}: a store already exists here (open it, or delete it to start fresh)"
                )
            if extra or (not replace and any(path.iterdir())):
                raise StoreError(
                    f"{path}: exists and is not an embedding store "
                    f"({', '.join(extra[:3]) or 'store leftovers'}); choose a new or empty folder"
                )
        full = dict(manifest)
        full["store"] = {
            "format_version": STORE_FORMAT_VERSION,
            "dim": int(dim),
            "dtype": dtype,
            "shard_size": int(shard_size),
            "generation": 0,
        }
        if segments is not None:
            full["store"]["segments"] = {"hop": float(segments["hop"]), "window": float(segments["window"])}
            validate_layout(path / MANIFEST_NAME, full)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _cleanup_stale_builds(path.parent, path.name)
            tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.creating-"))
        except OSError as exc:
            raise StoreError(f"{path}: cannot create the store: {write_failure(exc)}") from exc
        try:
            _lock.acquire(tmp)
            try:
                cls._build(tmp, full)
                cls._move_into_place(tmp, path, replace)
                _lock.rekey(tmp, path)
            except BaseException:
                _lock.release(tmp)
                raise
            _lock.release(path)
        except _lock.StoreLockedError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StoreBusyError(str(exc)) from None
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StoreError(f"{path}: cannot create the store: {write_failure(exc)}") from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        store = cls(path, full, [])
        if segments is not None:
            store._segments = cls(path, full, [], data=path / SEGMENTS_DIR, role="segments")
        return store

    @staticmethod
    def _build(tmp: Path, manifest: dict) -> None:
        tables = [tmp, tmp / SEGMENTS_DIR] if manifest["store"].get("segments") else [tmp]
        for table in tables:
            table.mkdir(exist_ok=True)
            (table / SHARDS_DIR).mkdir()
            (table / SUMS_DIR).mkdir()
            atomic_write_bytes(table / ITEMS_NAME, b"")
        atomic_write_json(tmp / MANIFEST_NAME, manifest)
        mode = 0o777 & ~current_umask()
        tmp.chmod(mode)  # mkdtemp makes owner-only folders
        _fsync_dir(tmp)

    @staticmethod
    def _move_into_place(tmp: Path, path: Path, replace: bool) -> None:
        if path.is_dir() and any(path.iterdir()):
            if not replace:
                raise StoreError(f"{path}: another process created a store here at the same time")
            # The old folder (whose lock the caller holds) is moved aside, the new one takes its name.
            # Its lock is taken first (StoreLockedError if another run is writing it) and held through
            # the swap; it is dropped with the old folder.
            check_entries(path)
            _lock.acquire(path)
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            try:
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
            except BaseException:
                _lock.release(path)
                raise
            _lock.detach(path)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, path)  # onto a missing or empty folder
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise StoreError(
                        f"{path}: another process created a store here at the same time"
                    ) from exc
                raise
        _fsync_dir(path.parent)

    @classmethod
    def open(cls, path: str | Path, repair: bool = True) -> EmbeddingStore:
        """Open an existing store; StoreError if it is missing, empty, corrupt or damaged.

        With `repair` (default) the leftovers of a killed writer are cleaned on disk (partial item line,
        temp files) and missing checksums are recorded, under the writer lock; when another process holds
        the lock, or without `repair`, they are only ignored in memory (`read_only` is then set).
        """
        path = Path(path)
        if not path.exists():
            raise StoreError(f"{path}: no such store folder")
        if not path.is_dir():
            raise StoreError(f"{path}: not a folder, so not an embedding store")
        mpath = path / MANIFEST_NAME
        if not mpath.is_file():
            raise StoreError(f"{path}: no {MANIFEST_NAME}; this folder is not an embedding store (or empty)")
        check_entries(path)
        locked = False
        if repair:
            try:
                _lock.acquire(path)
                locked = True
            except _lock.StoreLockedError:
                repair = False  # another writer is at work: read what is committed, change nothing
            except OSError:
                repair = False  # a read-only folder
        try:
            store = cls._open_locked(path, mpath, repair)
        finally:
            if locked:
                _lock.release(path)
        store.read_only = not repair
        return store

    @classmethod
    def _open_locked(cls, path: Path, mpath: Path, repair: bool) -> EmbeddingStore:
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StoreError(f"{mpath}: unreadable manifest ({exc})") from exc
        validate_layout(mpath, manifest)
        data = data_dir(path, manifest)
        if not data.is_dir():
            raise StoreError(f"{data}: the data folder the manifest names is missing; nothing was changed")
        if repair:
            _remove_stale_generations(path, manifest)
        store = cls._open_table(path, manifest, data, "files", repair)
        if store.has_segments:
            seg = cls._open_table(path, manifest, data / SEGMENTS_DIR, "segments", repair)
            # Segment rows no file row points to yet are the tail of a run killed between its two
            # appends (segments first, then the file row that commits them): dropped, as a torn line is.
            committed = max(
                (int(it["seg"][0]) + int(it["seg"][1]) for it in store._all if "seg" in it), default=0
            )
            if len(seg._all) > committed:
                seg._all = seg._all[:committed]
                if repair:
                    seg._rewrite_items()
                else:
                    seg._items_bytes = -1
            elif len(seg._all) < committed:
                raise StoreError(
                    f"{data / SEGMENTS_DIR}: holds {len(seg._all)} segment rows, but the file rows name "
                    f"{committed}; the segment table is damaged (`mlx-clap check STORE`)"
                )
            store._segments = seg
        return store

    @classmethod
    def _open_table(cls, path: Path, manifest: dict, data: Path, role: str, repair: bool) -> EmbeddingStore:
        if role == "segments" and not data.is_dir():
            raise StoreError(
                f"{data}: the segment table is missing, but the manifest says this store has one"
            )
        items, good_end = cls._read_items(data / ITEMS_NAME, repair, role)
        store = cls(path, manifest, items, data=data, role=role)
        # What this object knows of items.jsonl: a torn tail left in place (read-only) makes the first
        # write see a change and ask for a reopen, instead of appending after the torn bytes.
        store._items_bytes = good_end
        store._check_and_trim(repair)
        store._verify_on_open(repair)
        return store

    @staticmethod
    def _read_items(ipath: Path, repair: bool, role: str = "files") -> tuple[list[dict], int]:
        """The items and the byte length of the valid lines."""
        if not ipath.exists():
            return [], 0
        if not ipath.is_file():
            raise StoreError(f"{ipath}: is not a file")
        raw = ipath.read_bytes()
        items: list[dict] = []
        good_end = 0
        pos = 0
        while pos < len(raw):
            nl = raw.find(b"\n", pos)
            if nl < 0:
                break  # a partial last line: the writer was killed mid-append
            line = raw[pos:nl]
            try:
                obj = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                obj = None
            needed = {"path", "size", "mtime"} if role == "files" else {"start", "end"}
            if not isinstance(obj, dict) or not needed <= set(obj):
                # Only the tail can be torn by a crash; garbage in the middle is real corruption.
                if raw.find(b"\n", nl + 1) >= 0:
                    raise StoreError(
                        f"{ipath}: line {len(items) + 1} is not a valid item record "
                        "(`mlx-clap check STORE --repair` removes it)"
                    )
                break
            problem = item_problem(obj) if role == "files" else segment_problem(obj)
            if problem:
                raise StoreError(
                    f"{ipath}: line {len(items) + 1}: {problem} (`mlx-clap check STORE --repair` removes it)"
                )
            items.append(obj)
            pos = nl + 1
            good_end = pos
        if good_end < len(raw) and repair:
            fd = os.open(ipath, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
            try:
                os.ftruncate(fd, good_end)
                os.fsync(fd)
            finally:
                os.close(fd)
        return items, good_end

    def _load_shard(self, index: int, mmap: bool = True) -> np.ndarray | None:
        p = self.data / SHARDS_DIR / _shard_name(index)
        if not p.is_file():
            return None
        try:
            arr = np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise StoreError(f"{p}: unreadable shard ({exc})") from exc
        if arr.ndim != 2 or arr.shape[1] != self.dim or arr.dtype != np.dtype(self.dtype):
            raise StoreError(
                f"{p}: shard of shape {arr.shape} {arr.dtype} does not match dim {self.dim} {self.dtype}"
            )
        return arr

    def _shard_rows_on_disk(self, index: int) -> int:
        arr = self._load_shard(index)
        return 0 if arr is None else int(arr.shape[0])

    def _check_and_trim(self, repair: bool) -> None:
        """Drop items whose rows never reached a shard, and clean temp files."""
        shard_dir = self.data / SHARDS_DIR
        n = len(self._all)
        if n and not shard_dir.is_dir():
            # Never "repair" this by emptying items.jsonl: the vectors may only be misplaced.
            raise StoreError(
                f"{shard_dir}: is missing or not a folder, but {ITEMS_NAME} names {n} vectors; "
                "restore it (or delete the store to start fresh); nothing was changed"
            )
        if repair:
            for sub in (shard_dir, self.data / SUMS_DIR):
                if sub.is_dir():
                    for tmp in sub.glob(".emb-*.tmp"):
                        tmp.unlink(missing_ok=True)
        covered = 0
        index = 0
        while covered < n:
            rows = self._shard_rows_on_disk(index)
            covered += min(rows, self.shard_size)
            if rows < self.shard_size:
                break
            index += 1
        if covered < n:
            # Cannot happen with this writer (shards are written first) unless files were removed.
            self._all = self._all[:covered]
            if repair:
                self._rewrite_items()
            else:
                self._items_bytes = -1  # trimmed in memory only: a write must reopen first

    # ---------------------------------------------------------------------------------- checksums
    def _sidecar(self, index: int) -> dict | None:
        p = self.data / SUMS_DIR / _sum_name(index)
        if not p.exists():
            return None
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StoreError(
                f"{p}: unreadable checksum file ({exc}); `mlx-clap check STORE --repair`"
            ) from exc
        crcs = doc.get("crc32") if isinstance(doc, dict) else None
        if not isinstance(crcs, list) or not all(_is_int(c) for c in crcs):
            raise StoreError(f"{p}: checksum file has no valid 'crc32' list; `mlx-clap check STORE --repair`")
        return doc

    def _write_sidecar(self, index: int, crcs: list[int]) -> None:
        shard = self.data / SHARDS_DIR / _shard_name(index)
        st = shard.stat()
        doc = {"rows": len(crcs), "crc32": crcs, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        atomic_write_bytes(self.data / SUMS_DIR / _sum_name(index), json.dumps(doc).encode("utf-8"))

    def _used_rows(self, index: int) -> int:
        return max(0, min(self.shard_size, len(self._all) - index * self.shard_size))

    def bad_rows(self, index: int, arr: np.ndarray, doc: dict, used: int) -> list[int]:
        """Rows (within shard `index`) among the first `used` whose crc32 differs from the sidecar's."""
        crcs = doc["crc32"]
        have = row_crcs(arr[:used])
        return [r for r in range(used) if r >= len(crcs) or crcs[r] != have[r]]

    def _verify_on_open(self, repair: bool) -> None:
        """The cheap check: sizes always (np.load), row checksums of shards changed since their sidecar
        was written; a shard without a sidecar (older store) is recorded when write-locked, else noted."""
        unverified = []
        for index in range((len(self._all) + self.shard_size - 1) // self.shard_size):
            used = self._used_rows(index)
            arr = self._load_shard(index)
            shard = self.data / SHARDS_DIR / _shard_name(index)
            doc = self._sidecar(index)
            if doc is None:
                if repair:
                    self._write_sidecar(index, row_crcs(np.asarray(arr)))
                else:
                    unverified.append(shard.name)
                continue
            st = shard.stat()
            if st.st_size == doc.get("size") and st.st_mtime_ns == doc.get("mtime_ns"):
                continue  # unchanged since its checksums were recorded
            bad = self.bad_rows(index, arr, doc, used)
            if bad:
                first = index * self.shard_size
                raise StoreError(
                    f"{shard}: {len(bad)} row(s) fail their checksum (damaged; first row {first + bad[0]}); "
                    "run `mlx-clap check STORE --repair`, then embed again to redo those files"
                )
            if (
                repair
                and len(doc["crc32"]) >= arr.shape[0]
                and not self.bad_rows(index, arr, doc, arr.shape[0])
            ):
                # Verified whole (e.g. a copied store with new mtimes): record it so the next open is cheap.
                self._write_sidecar(index, doc["crc32"][: arr.shape[0]])
        if unverified:
            self.notes.append(
                f"{self.path}: {len(unverified)} shard(s) have no checksums yet (written by an older "
                "mlx-clap); they are recorded on the next write"
            )

    def _rewrite_items(self) -> None:
        ipath = self.data / ITEMS_NAME
        lines = "".join(json_line(o) for o in self._all)
        atomic_write_bytes(ipath, lines.encode("utf-8"))
        self._items_bytes = len(lines.encode("utf-8"))

    # -------------------------------------------------------------------------------------- reading
    def _live(self) -> np.ndarray | None:
        """Physical rows of the live items (a path's latest row), or None when every row is live."""
        if self._live_items is None:
            rows: np.ndarray | None = None
            if self.role == "files":
                last: dict[str, int] = {}
                for i, it in enumerate(self._all):
                    last[str(it["path"])] = i
                if len(last) < len(self._all):
                    rows = np.fromiter(sorted(last.values()), dtype=np.int64, count=len(last))
            self._live_rows = rows
            self._live_items = self._all if rows is None else [self._all[int(r)] for r in rows]
        return self._live_rows

    @property
    def items(self) -> list[dict]:
        """The live file rows in row order: one per path (a path's latest row; superseded rows are
        kept on disk until the next compaction and never shown)."""
        self._live()
        assert self._live_items is not None
        return self._live_items

    @property
    def dead_rows(self) -> int:
        """Physical rows no reader sees (superseded by a later row of the same path)."""
        live = self._live()
        return 0 if live is None else len(self._all) - int(live.size)

    @property
    def items_path(self) -> Path:
        """The current generation's items.jsonl (what an ANN index fingerprints)."""
        return self.data / ITEMS_NAME

    def __len__(self) -> int:
        return len(self.items)

    def _physical_shards(self) -> Iterator[tuple[int, np.ndarray]]:
        n = len(self._all)
        for first in range(0, n, self.shard_size):
            p = self.data / SHARDS_DIR / _shard_name(first // self.shard_size)
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
            yield first, arr[: min(self.shard_size, n - first)]

    def iter_shards(self) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first_row, (n, dim) array) per shard, covering exactly the len(self) live rows in
        order: memory maps, or copies of a shard's live rows where it holds superseded ones."""
        live = self._live()
        if live is None:
            yield from self._physical_shards()
            return
        pos = 0
        for first, arr in self._physical_shards():
            lo, hi = np.searchsorted(live, [first, first + arr.shape[0]])
            if hi > lo:
                yield pos, arr[live[lo:hi] - first]
                pos += int(hi - lo)

    def take_physical(self, rows: np.ndarray) -> np.ndarray:
        """float32 (len(rows), dim) of physical rows, in the order given."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((rows.size, self.dim), dtype=np.float32)
        if not rows.size:
            return out
        shard_of = rows // self.shard_size
        for s in np.unique(shard_of):
            sel = np.nonzero(shard_of == s)[0]
            arr = np.load(self.data / SHARDS_DIR / _shard_name(int(s)), mmap_mode="r", allow_pickle=False)
            local = rows[sel] - int(s) * self.shard_size
            order = np.argsort(local, kind="stable")  # sorted reads are kinder to a memory map
            out[sel[order]] = arr[local[order]]
        return out

    def matrix(self, dtype: Any = np.float32) -> np.ndarray:
        """All live vectors as one (N, dim) array."""
        out = np.empty((len(self), self.dim), dtype=dtype)
        for first, arr in self.iter_shards():
            out[first : first + arr.shape[0]] = arr
        return out

    def row_of(self, path: str | Path) -> int:
        """Row (in `items`) of the vector stored for `path` (as given, or as an absolute path)."""
        if self._row_by_path is None:
            self._row_by_path = {str(it["path"]): i for i, it in enumerate(self.items)}
        for key in (str(path), os.path.abspath(str(path))):
            if key in self._row_by_path:
                return self._row_by_path[key]
        raise UnknownPathError(f"{self.path}: no vector stored for {path}")

    def done_keys(self) -> set[tuple[str, int, float]]:
        """(path, size, mtime) of every live file row, for resuming a run."""
        return {item_key(it) for it in self.items}

    # ------------------------------------------------------------------------------------- segments
    @property
    def segment_settings(self) -> dict | None:
        """{"hop": s, "window": s} when the store keeps per-window vectors, else None."""
        seg = self.manifest["store"].get("segments")
        return dict(seg) if isinstance(seg, dict) else None

    @property
    def has_segments(self) -> bool:
        return self.segment_settings is not None

    def _segment_table(self) -> EmbeddingStore:
        if self._segments is None:
            raise StoreError(f"{self.path}: this store was made without --segments (no per-window vectors)")
        return self._segments

    def segment_view(self) -> SegmentView:
        """The live files' segments (empty for a store made without --segments)."""
        if not self.has_segments or self._segments is None:
            return SegmentView.empty(self.dim)
        seg = self._segments
        starts = np.fromiter((float(it["start"]) for it in seg._all), dtype=np.float64, count=len(seg._all))
        ends = np.fromiter((float(it["end"]) for it in seg._all), dtype=np.float64, count=len(seg._all))
        owner: list[np.ndarray] = []
        rows: list[np.ndarray] = []
        for i, it in enumerate(self.items):
            if "seg" in it:
                first, count = int(it["seg"][0]), int(it["seg"][1])
                rows.append(np.arange(first, first + count, dtype=np.int64))
                owner.append(np.full(count, i, dtype=np.int64))
        r = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        f = np.concatenate(owner) if owner else np.zeros(0, dtype=np.int64)
        return SegmentView(seg, f, r, starts[r], ends[r])

    def errors(self) -> list[dict]:
        """The failure records (may name files that later succeeded on a rerun)."""
        epath = self.path / ERRORS_NAME
        if not epath.exists():
            return []
        out = []
        for line in epath.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a torn last line from a killed writer
        return out

    # -------------------------------------------------------------------------------------- writing
    def append(
        self,
        items: list[dict],
        vectors: np.ndarray,
        segments: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] | None = None,
    ) -> None:
        """Add rows: shards (and their checksum sidecars) are rewritten atomically first, then the item
        lines are appended (fsync); all under the writer lock. A row for a path already stored
        supersedes the old one (which the next `compact` reclaims).

        `segments` (stores with segments only): per item, None (its "seg" pointer is kept as given, as
        when a renamed file reuses the rows of its content) or (starts, ends, vectors) of its windows.
        Those go to the segment table first and the item's "seg" then points at them, so the file row
        is what commits them: a kill between the two leaves segment rows no file names, dropped on open.
        """
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise StoreError(f"{self.path}: vectors of shape {vectors.shape}, the store holds dim {self.dim}")
        if len(items) != vectors.shape[0]:
            raise StoreError(f"{self.path}: {len(items)} items for {vectors.shape[0]} vectors")
        for it in items:
            problem = item_problem(it)
            if problem:
                raise StoreError(f"{self.path}: each item needs path, size and mtime: {problem} (got {it!r})")
        if not np.all(np.isfinite(vectors)):
            raise StoreError(f"{self.path}: refusing to store non-finite vectors")
        items = [dict(it) for it in items]
        seg_items, seg_vecs = self._segment_rows(items, segments)
        if not items:
            return
        check_entries(self.path)
        self._acquire()
        try:
            if seg_items:
                table = self._segment_table()
                table._check_fresh()  # its own items.jsonl must be as read, too
                base = len(table._all)
                table._append_locked(seg_items, seg_vecs.astype(self.dtype))
                for it in items:
                    if "seg" in it and isinstance(it["seg"], _NewSegments):
                        it["seg"] = [base + it["seg"].offset, it["seg"].count]
            self._append_locked(items, vectors.astype(self.dtype))
        finally:
            _lock.release(self.path)

    def _segment_rows(self, items: list[dict], segments: list | None) -> tuple[list[dict], np.ndarray | None]:
        """Check the segments given with `items`; mark each item's new rows (placeholders resolved once
        the segment table's length is known under the lock)."""
        if segments is None:
            return [], None
        if not self.has_segments:
            raise StoreError(f"{self.path}: this store was made without segments; cannot add window vectors")
        if len(segments) != len(items):
            raise StoreError(f"{self.path}: {len(segments)} segment lists for {len(items)} items")
        rows: list[dict] = []
        vecs: list[np.ndarray] = []
        for it, seg in zip(items, segments, strict=True):
            if seg is None:
                continue
            starts, ends, v = (np.asarray(a) for a in seg)
            if v.ndim != 2 or v.shape[1] != self.dim or v.shape[0] != starts.size or starts.size != ends.size:
                raise StoreError(
                    f"{self.path}: segments of {it['path']}: shapes {starts.shape} {ends.shape} {v.shape}"
                )
            if not np.all(np.isfinite(v)):
                raise StoreError(f"{self.path}: refusing to store non-finite segment vectors ({it['path']})")
            new = [
                {"start": round(float(a), 6), "end": round(float(b), 6)}
                for a, b in zip(starts, ends, strict=True)
            ]
            for obj in new:
                problem = segment_problem(obj)
                if problem:
                    raise StoreError(f"{self.path}: segments of {it['path']}: {problem}")
            it["seg"] = _NewSegments(len(rows), len(new))
            rows += new
            vecs.append(v)
        return rows, (np.concatenate(vecs) if vecs else None)

    def _append_locked(self, items: list[dict], vecs: np.ndarray) -> None:
        start = len(self._all)
        end = start + len(items)
        shard_dir = self.data / SHARDS_DIR
        if not shard_dir.is_dir():
            raise StoreError(f"{shard_dir}: is missing or not a folder; nothing was written")
        for index in range(start // self.shard_size, (end - 1) // self.shard_size + 1):
            s0 = index * self.shard_size
            lo, hi = max(start, s0), min(end, s0 + self.shard_size)
            p = shard_dir / _shard_name(index)
            keep = lo - s0  # rows of this shard that are already in the store
            if keep:
                old = np.load(p, allow_pickle=False)[:keep].astype(self.dtype)
                self._check_kept(index, old)
                block = np.concatenate([old, vecs[lo - start : hi - start]], axis=0)
            else:
                block = vecs[lo - start : hi - start]
            block = np.ascontiguousarray(block)
            _atomic_save_npy(p, block)
            self._write_sidecar(index, row_crcs(block))
        _fsync_dir(shard_dir)
        append_lines(self.data / ITEMS_NAME, [dict(it) for it in items])
        self._items_bytes = self._items_size()
        self._all.extend(dict(it) for it in items)
        self._row_by_path = None  # the live view is recomputed on the next read
        self._live_items = None
        self._live_rows = None

    def _check_kept(self, index: int, old: np.ndarray) -> None:
        # The rows carried into a rewritten shard get fresh checksums: they must be sound first.
        doc = self._sidecar(index)
        if doc is not None and self.bad_rows(index, old, doc, old.shape[0]):
            raise StoreError(
                f"{self.data / SHARDS_DIR / _shard_name(index)}: rows fail their checksum (damaged); "
                "run `mlx-clap check STORE --repair` first"
            )

    # ----------------------------------------------------------------------------------- compaction
    def compact(self, drop_paths: Any = ()) -> dict[str, int]:
        """Reclaim superseded rows and remove the files in `drop_paths`: the live rows are written as a
        new generation (data-N/), the manifest is switched to it in one atomic rename, then the old
        generation is deleted. The manifest always names a whole generation, so a kill at any moment
        leaves the store as it was or as compacted, never without a valid store."""
        drop = {str(p) for p in drop_paths}
        check_entries(self.path)
        self._acquire()
        try:
            return self._compact_locked(drop)
        finally:
            _lock.release(self.path)

    def _compact_locked(self, drop: set[str]) -> dict[str, int]:
        live = self._live()
        live_rows = np.arange(len(self._all), dtype=np.int64) if live is None else live
        keep = np.array([r for r in live_rows if str(self._all[int(r)]["path"]) not in drop], dtype=np.int64)
        stats = {
            "removed": int(live_rows.size - keep.size),
            "reclaimed_rows": int(len(self._all) - keep.size),
        }
        gen = generation_of(self.manifest) + 1
        new_data = self.path / f"{DATA_PREFIX}{gen}"
        shutil.rmtree(new_data, ignore_errors=True)  # left by a compaction killed before its switch
        new_data.mkdir()
        items = [dict(self._all[int(r)]) for r in keep]
        seg = self._segments
        seg_items: list[dict] = []
        if seg is not None:
            seg_items, stats["reclaimed_segments"] = self._compact_segments(
                seg, items, new_data / SEGMENTS_DIR
            )
        self._write_table(new_data, items, self, keep)
        _fsync_dir(new_data)
        manifest = json.loads(json.dumps(self.manifest))
        manifest["store"]["generation"] = gen
        manifest["store"]["format_version"] = STORE_FORMAT_VERSION
        atomic_write_json(self.path / MANIFEST_NAME, manifest)  # the switch
        _fsync_dir(self.path)
        self.manifest, self.data, self._all = manifest, new_data, items
        self._row_by_path = self._live_items = self._live_rows = None
        self._items_bytes = self._items_size()
        if seg is not None:
            seg.manifest, seg.data, seg._all = manifest, new_data / SEGMENTS_DIR, seg_items
            seg._items_bytes = seg._items_size()
        _remove_stale_generations(self.path, manifest)
        return stats

    def _compact_segments(
        self, seg: EmbeddingStore, items: list[dict], folder: Path
    ) -> tuple[list[dict], int]:
        """The segment table of the new generation. While most of its rows are still used it is carried
        over whole (hard links: no copy) with the pointers unchanged; otherwise the used rows are written
        in the order of `items`, and a range shared by copies of one file stays shared."""
        ranges: dict[tuple[int, int], int] = {}
        for it in items:
            if "seg" in it:
                ranges.setdefault((int(it["seg"][0]), int(it["seg"][1])), 0)
        used = sum(c for _, c in ranges)
        dead = len(seg._all) - used
        if dead <= len(seg._all) // 4:
            self._link_table(seg.data, folder)
            return [dict(it) for it in seg._all], 0
        pos = 0
        src: list[np.ndarray] = []
        for key in ranges:
            ranges[key] = pos
            pos += key[1]
            src.append(np.arange(key[0], key[0] + key[1], dtype=np.int64))
        rows = np.concatenate(src) if src else np.zeros(0, dtype=np.int64)
        for it in items:
            if "seg" in it:
                key = (int(it["seg"][0]), int(it["seg"][1]))
                it["seg"] = [ranges[key], key[1]]
        new_items = [dict(seg._all[int(r)]) for r in rows]
        self._write_table(folder, new_items, seg, rows)
        return new_items, dead

    def _write_table(self, folder: Path, items: list[dict], source: EmbeddingStore, rows: np.ndarray) -> None:
        """Write a table (shards, checksums, items.jsonl) of `rows` of `source`, one shard at a time."""
        folder.mkdir(exist_ok=True)
        (folder / SHARDS_DIR).mkdir(exist_ok=True)
        (folder / SUMS_DIR).mkdir(exist_ok=True)
        target = EmbeddingStore(self.path, self.manifest, items, data=folder, role=source.role)
        for index, first in enumerate(range(0, rows.size, self.shard_size)):
            block = np.ascontiguousarray(
                source.take_physical(rows[first : first + self.shard_size]).astype(self.dtype)
            )
            _atomic_save_npy(folder / SHARDS_DIR / _shard_name(index), block)
            target._write_sidecar(index, row_crcs(block))
        _fsync_dir(folder / SHARDS_DIR)
        target._rewrite_items()

    @staticmethod
    def _link_table(src: Path, dst: Path) -> None:
        """A table carried into a new generation: shards and checksums hard-linked (copied where links
        are not possible), items.jsonl copied (it is appended to in place)."""
        for sub in (SHARDS_DIR, SUMS_DIR):
            (dst / sub).mkdir(parents=True, exist_ok=True)
            for f in sorted((src / sub).iterdir()):
                if f.name.startswith("."):
                    continue  # temp files of a killed write
                try:
                    os.link(f, dst / sub / f.name)
                except OSError:
                    shutil.copy2(f, dst / sub / f.name)
            _fsync_dir(dst / sub)
        atomic_write_bytes(dst / ITEMS_NAME, (src / ITEMS_NAME).read_bytes())

    def record_error(self, path: str | Path, error: str, **extra: Any) -> None:
        """Append one failure record to errors.jsonl (under the writer lock)."""
        rec = {"path": str(path), "error": str(error), "time": time.time(), **extra}
        check_entries(self.path)
        try:
            _lock.acquire(self.path)
        except _lock.StoreLockedError as exc:
            raise StoreBusyError(str(exc)) from None
        try:
            append_lines(self.path / ERRORS_NAME, [rec])
        finally:
            _lock.release(self.path)


# ------------------------------------------------------------------------------------ full check, repair
def _read_lines_lenient(ipath: Path) -> tuple[list[Any], list[dict], bool]:
    """Every complete line of items.jsonl as (item or None), the bad lines, and whether the last line
    is torn (no newline: a killed writer)."""
    raw = ipath.read_bytes() if ipath.is_file() else b""
    objs: list[Any] = []
    bad: list[dict] = []
    lines = raw.split(b"\n")
    torn = bool(lines and lines[-1])
    for no, line in enumerate(lines[:-1], 1):
        try:
            obj = json.loads(line.decode("utf-8"))
            problem = item_problem(obj)
        except (UnicodeDecodeError, ValueError) as exc:
            obj, problem = None, f"not valid JSON ({exc})"
        if problem:
            bad.append({"line": no, "row": no - 1, "cause": problem})
            obj = None
        objs.append(obj)
    return objs, bad, torn


def _row_causes(arr: np.ndarray, doc: dict | None, used: int) -> dict[int, str]:
    """Damaged rows of one shard (local index -> cause): checksum, non-finite, not unit length."""
    causes: dict[int, str] = {}
    rows = np.asarray(arr[:used])
    if doc is not None:
        crcs = doc["crc32"]
        for r, c in enumerate(row_crcs(rows)):
            if r >= len(crcs) or crcs[r] != c:
                causes[r] = "checksum mismatch"
    f32 = rows.astype(np.float32)
    finite = np.all(np.isfinite(f32), axis=1)
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.linalg.norm(np.where(np.isfinite(f32), f32, 0.0), axis=1)
    for r in np.nonzero(~finite)[0]:
        causes.setdefault(int(r), "NaN or Inf values")
    for r in np.nonzero(finite & (np.abs(norms - 1.0) > UNIT_TOLERANCE))[0]:
        causes.setdefault(int(r), f"not a unit vector (norm {norms[r]:.4g})")
    return causes


def check_store(path: str | Path) -> dict[str, Any]:
    """Verify every row of a store (checksums, finite, unit length), every items line, and count
    orphan rows; read-only. StoreError only when the store cannot be read at all."""
    path = Path(path)
    if not (path / MANIFEST_NAME).is_file():
        raise StoreError(f"{path}: no {MANIFEST_NAME}; this folder is not an embedding store (or empty)")
    check_entries(path)
    mpath = path / MANIFEST_NAME
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StoreError(f"{mpath}: unreadable manifest ({exc})") from exc
    layout = validate_layout(mpath, manifest)
    data = data_dir(path, manifest)
    objs, bad_lines, torn = _read_lines_lenient(data / ITEMS_NAME)
    store = EmbeddingStore(path, manifest, [])
    store._all = objs  # placeholders included: row k is line k
    size, n = int(layout["shard_size"]), len(objs)
    if n and not (data / SHARDS_DIR).is_dir():
        raise StoreError(
            f"{data / SHARDS_DIR}: is missing or not a folder, but {ITEMS_NAME} names {n} vectors"
        )
    damaged: list[dict] = []
    unverified: list[str] = []
    orphans = 0
    index = 0
    while True:
        first = index * size
        shard = data / SHARDS_DIR / _shard_name(index)
        if first >= n and not shard.exists():
            break
        used = max(0, min(size, n - first))
        try:
            arr = store._load_shard(index)
            doc = store._sidecar(index)
        except StoreError as exc:
            arr, doc, why = None, None, str(exc)
        else:
            why = "shard file missing"
        if arr is None:
            damaged += [{"row": first + r, "cause": why} for r in range(used)]
        else:
            orphans += max(0, int(arr.shape[0]) - used)
            damaged += [
                {"row": first + r, "cause": c}
                for r, c in sorted(_row_causes(arr, doc, min(used, arr.shape[0])).items())
            ]
            damaged += [
                {"row": first + r, "cause": "row missing from its shard"} for r in range(arr.shape[0], used)
            ]
            if doc is None and used:
                unverified.append(shard.name)
        index += 1
    for d in damaged:
        obj = objs[d["row"]]
        d["path"] = obj["path"] if isinstance(obj, dict) else None
    notes = ["the last items line is partial (a killed writer); it is dropped on open"] if torn else []
    if unverified:
        notes.append(
            f"{len(unverified)} shard(s) have no checksums (older store): checked for NaN and length only"
        )
    return {
        "store": str(path),
        "items": n,
        "damaged_rows": damaged,
        "bad_lines": bad_lines,
        "orphan_rows": orphans,
        "unverified_shards": unverified,
        "notes": notes,
        "ok": not damaged and not bad_lines,
    }


def repair_store(path: str | Path, report: dict[str, Any]) -> int:
    """Remove the rows `check_store` found damaged (and their items lines, so a rerun of embed redoes
    those files), under the writer lock; returns the number of rows removed.

    Every step leaves a valid store: items.jsonl is first cut (atomically) to the rows before the first
    damaged one; the shards from there on are rewritten with the surviving rows moved up (rows still in
    use are never changed), with fresh checksums; then items.jsonl is written whole (atomically)."""
    path = Path(path)
    try:
        _lock.acquire(path)
    except _lock.StoreLockedError as exc:
        raise StoreBusyError(str(exc)) from None
    try:
        if report != check_store(path):  # changed since it was checked: check again
            raise StoreError(f"{path}: the store changed since it was checked; run check again")
        return _repair_locked(path, report)
    finally:
        _lock.release(path)


def _repair_locked(path: Path, report: dict[str, Any]) -> int:
    manifest = json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8"))
    data = data_dir(path, manifest)
    objs, _, _ = _read_lines_lenient(data / ITEMS_NAME)
    store = EmbeddingStore(path, manifest, [])
    size = store.shard_size
    remove = {d["row"] for d in report["damaged_rows"]} | {b["row"] for b in report["bad_lines"]}
    if not remove:
        store._all = objs
        for index in range((len(objs) + size - 1) // size):  # record missing checksums (older stores)
            if store._sidecar(index) is None:
                store._write_sidecar(index, row_crcs(np.asarray(store._load_shard(index))))
        return 0
    first = min(remove)
    kept = [r for r in range(len(objs)) if r not in remove]
    store._all = [objs[r] for r in range(first)]
    store._rewrite_items()  # step 1: a smaller, valid store
    sources = {}
    for index in range(first // size, (len(objs) + size - 1) // size):
        try:
            sources[index] = store._load_shard(index)
        except StoreError:
            sources[index] = None  # all its rows are damaged, hence not kept
    new_n = len(kept)  # new row p holds old row kept[p]; kept[p] == p before `first`
    for index in range(first // size, (new_n + size - 1) // size):
        rows = kept[index * size : (index + 1) * size]
        block = np.stack([np.asarray(sources[r // size][r % size]) for r in rows]).astype(store.dtype)
        p = data / SHARDS_DIR / _shard_name(index)
        _atomic_save_npy(p, np.ascontiguousarray(block))
        store._write_sidecar(index, row_crcs(block))
    last = (new_n + size - 1) // size
    for index in range(last, max(sources, default=-1) + 1):
        (data / SHARDS_DIR / _shard_name(index)).unlink(missing_ok=True)
        (data / SUMS_DIR / _sum_name(index)).unlink(missing_ok=True)
    _fsync_dir(data / SHARDS_DIR)
    store._all = [objs[r] for r in kept]
    store._rewrite_items()  # step 3: the whole repaired store
    return len(remove)


class _NewSegments:
    """Placeholder "seg" of an item whose segment rows are being appended (offset within this append)."""

    def __init__(self, offset: int, count: int):
        self.offset = offset
        self.count = count


class SegmentView:
    """The live segments of a store: per segment the file it belongs to (an index into `store.items`),
    its start and end in seconds, and its vector (read from the segment table on demand).

    Segments of one file are contiguous and sorted by start. Built by `EmbeddingStore.segment_view()`.
    """

    def __init__(
        self,
        table: EmbeddingStore | None,
        file_index: np.ndarray,
        rows: np.ndarray,
        start: np.ndarray,
        end: np.ndarray,
        dim: int | None = None,
    ):
        self.table = table
        self.file_index = file_index
        self.rows = rows  # physical rows in the segment table
        self.start = start
        self.end = end
        self.dim = int(dim if dim is not None else table.dim)  # type: ignore[union-attr]

    @classmethod
    def empty(cls, dim: int) -> SegmentView:
        z = np.zeros(0, dtype=np.int64)
        return cls(None, z, z, np.zeros(0), np.zeros(0), dim=dim)

    def __len__(self) -> int:
        return int(self.rows.size)

    def _identity(self) -> bool:
        return (
            self.table is not None
            and self.rows.size == len(self.table._all)
            and bool(self.rows.size == 0 or (self.rows[0] == 0 and np.all(np.diff(self.rows) == 1)))
        )

    def iter_blocks(self, block_rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        """(first segment index, (n, dim) rows) over all segments in order; memory bounded by a block."""
        if not len(self):
            return
        assert self.table is not None
        if self._identity():
            pieces: list[np.ndarray] = []
            have, start = 0, 0
            for _, arr in self.table._physical_shards():
                pieces.append(arr)
                have += arr.shape[0]
                if have >= block_rows:
                    block = np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
                    yield start, block
                    start += block.shape[0]
                    pieces, have = [], 0
            if pieces:
                yield start, np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
            return
        for first in range(0, len(self), block_rows):
            yield first, self.take(np.arange(first, min(first + block_rows, len(self))))

    def take(self, idx: np.ndarray) -> np.ndarray:
        """float32 (len(idx), dim) vectors of segments `idx`."""
        idx = np.asarray(idx, dtype=np.int64)
        if self.table is None:
            return np.zeros((idx.size, self.dim), dtype=np.float32)
        return self.table.take_physical(self.rows[idx])

    def matrix(self) -> np.ndarray:
        """All segment vectors, float32 (S, dim) (small stores)."""
        return self.take(np.arange(len(self)))

    def of_file(self, file_index: int) -> np.ndarray:
        """Segment indices of one file (in `store.items` order), sorted by start."""
        lo, hi = np.searchsorted(self.file_index, [file_index, file_index + 1])
        return np.arange(lo, hi, dtype=np.int64)
