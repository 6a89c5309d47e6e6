"""An embedding store on disk: fixed-size `.npy` shards, one JSON line per vector, a manifest.

Layout of a store folder:

    manifest.json        model id, weights sha256, settings, mlx-clap version; plus "store": layout
    items.jsonl          one JSON object per stored vector, in row order ({"path", "size", "mtime", ...})
    shards/emb-00000.npy rows [0, shard_size), emb-00001.npy rows [shard_size, 2*shard_size), ...
    errors.jsonl         one JSON object per failed input ({"path", "error", "time"})

Crash safety: `append` first rewrites the shard(s) it touches through a temp file + fsync + rename, and only
then appends the item lines (one write, fsync). So the shards always hold at least as many rows as
items.jsonl names. `open` repairs what a killed writer can leave: a partial last item line is dropped,
shard rows without an item are ignored (and overwritten by the next append), and temp files are removed.
Row k always lives in shard k // shard_size, so a resumed run yields the same files as an uninterrupted one.

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

from mlx_clap.io.files import atomic_write_bytes, atomic_write_json
from mlx_clap.search import lock as _lock

STORE_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
ITEMS_NAME = "items.jsonl"
ERRORS_NAME = "errors.jsonl"
SHARDS_DIR = "shards"
SUMS_DIR = "checksums"  # emb-NNNNN.sum.json: per-row crc32 of shard NNNNN
STORE_DTYPES = ("float16", "float32")
LOCK_NAME = _lock.LOCK_NAME
STORE_ENTRIES = (MANIFEST_NAME, ITEMS_NAME, ERRORS_NAME, SHARDS_DIR, SUMS_DIR, LOCK_NAME)
# Files other commands keep next to a store (cluster, ANN index); --overwrite may remove them.
DERIVED_ENTRIES = ("clusters.json", "ann.usearch", "ann.json")
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


def _fsync_dir(path: Path) -> None:
    # Makes a rename durable on POSIX; not supported everywhere (e.g. Windows), where it is skipped.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def _why(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied (read-only folder?)"
    return exc.strerror or str(exc)


def row_crcs(rows: np.ndarray) -> list[int]:
    """crc32 of each row's bytes (as stored): the per-row checksum of the shard sidecars."""
    rows = np.ascontiguousarray(rows)
    return [zlib.crc32(rows[i].tobytes()) for i in range(rows.shape[0])]


def json_line(obj: Any) -> str:
    """One JSON line; non-ASCII kept readable, but a path that is not valid UTF-8 (lone surrogates from
    os.fsdecode) is written escaped, so the line stays valid UTF-8 and reads back to the same str."""
    text = json.dumps(obj, ensure_ascii=False, sort_keys=True)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(obj, ensure_ascii=True, sort_keys=True)
    return text + "\n"


def append_lines(path: Path, objs: list[dict]) -> None:
    """Append JSON lines in one write, then fsync (a crash can only tear the last line). The file is
    opened with O_NOFOLLOW, so a symlinked log is refused instead of written through."""
    if not objs:
        return
    data = "".join(json_line(o) for o in objs).encode("utf-8")
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        if Path(path).is_symlink():  # ELOOP from O_NOFOLLOW: say what it means
            raise OSError(exc.errno, f"{path}: is a symbolic link; refusing to write through it") from exc
        raise
    with os.fdopen(fd, "ab") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


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
    return None


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
    return layout


def is_store_entry(name: str) -> bool:
    """Whether a name in a store folder is the store's own (or a temp file of its atomic writes)."""
    return name in STORE_ENTRIES + DERIVED_ENTRIES or (name.startswith(".") and name.endswith(".tmp"))


def check_entries(path: Path) -> None:
    """StoreError when a store entry (or shard file) is a symbolic link or resolves outside `path`:
    writing there would change files outside the store."""
    root = os.path.realpath(path)
    names = [path / n for n in STORE_ENTRIES + DERIVED_ENTRIES]
    for sub in (path / SHARDS_DIR, path / SUMS_DIR):
        if sub.is_dir() and not sub.is_symlink():
            names += sorted(sub.iterdir())
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

    def __init__(self, path: Path, manifest: dict, items: list[dict]):
        self.path = Path(path)
        self.manifest = manifest
        self.items = items
        layout = manifest["store"]
        self.dim = int(layout["dim"])
        self.dtype = str(layout["dtype"])
        self.shard_size = int(layout["shard_size"])
        self._row_by_path: dict[str, int] | None = None
        self.notes: list[str] = []
        self.read_only = False
        self._holds = 0
        self._items_bytes = self._items_size()

    # ------------------------------------------------------------------------------------- locking
    def _items_size(self) -> int:
        try:
            return (self.path / ITEMS_NAME).stat().st_size
        except OSError:
            return 0

    def _acquire(self) -> None:
        """Take the writer lock and make sure nobody wrote items since this object read them."""
        try:
            _lock.acquire(self.path)
        except _lock.StoreLockedError as exc:
            raise StoreBusyError(str(exc)) from None
        if self._items_size() != self._items_bytes:
            _lock.release(self.path)
            raise StoreError(
                f"{self.path}: items.jsonl changed since this store was opened (another writer?); "
                "open it again"
            )

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
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _cleanup_stale_builds(path.parent, path.name)
            tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.creating-"))
        except OSError as exc:
            raise StoreError(f"{path}: cannot create the store: {_why(exc)}") from exc
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
            raise StoreError(f"{path}: cannot create the store: {_why(exc)}") from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(path, full, [])

    @staticmethod
    def _build(tmp: Path, manifest: dict) -> None:
        (tmp / SHARDS_DIR).mkdir()
        (tmp / SUMS_DIR).mkdir()
        atomic_write_bytes(tmp / ITEMS_NAME, b"")
        atomic_write_json(tmp / MANIFEST_NAME, manifest)
        mode = 0o777 & ~_umask()
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
        items, good_end = cls._read_items(path / ITEMS_NAME, repair)
        store = cls(path, manifest, items)
        # What this object knows of items.jsonl: a torn tail left in place (read-only) makes the first
        # write see a change and ask for a reopen, instead of appending after the torn bytes.
        store._items_bytes = good_end
        store._check_and_trim(repair)
        store._verify_on_open(repair)
        return store

    @staticmethod
    def _read_items(ipath: Path, repair: bool) -> tuple[list[dict], int]:
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
            if not isinstance(obj, dict) or not {"path", "size", "mtime"} <= set(obj):
                # Only the tail can be torn by a crash; garbage in the middle is real corruption.
                if raw.find(b"\n", nl + 1) >= 0:
                    raise StoreError(
                        f"{ipath}: line {len(items) + 1} is not a valid item record "
                        "(`mlx-clap check STORE --repair` removes it)"
                    )
                break
            problem = item_problem(obj)
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
        p = self.path / SHARDS_DIR / _shard_name(index)
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
        shard_dir = self.path / SHARDS_DIR
        n = len(self.items)
        if n and not shard_dir.is_dir():
            # Never "repair" this by emptying items.jsonl: the vectors may only be misplaced.
            raise StoreError(
                f"{shard_dir}: is missing or not a folder, but {ITEMS_NAME} names {n} vectors; "
                "restore it (or delete the store to start fresh); nothing was changed"
            )
        if repair:
            for sub in (shard_dir, self.path / SUMS_DIR):
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
            self.items = self.items[:covered]
            if repair:
                self._rewrite_items()
            else:
                self._items_bytes = -1  # trimmed in memory only: a write must reopen first

    # ---------------------------------------------------------------------------------- checksums
    def _sidecar(self, index: int) -> dict | None:
        p = self.path / SUMS_DIR / _sum_name(index)
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
        shard = self.path / SHARDS_DIR / _shard_name(index)
        st = shard.stat()
        doc = {"rows": len(crcs), "crc32": crcs, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        atomic_write_bytes(self.path / SUMS_DIR / _sum_name(index), json.dumps(doc).encode("utf-8"))

    def _used_rows(self, index: int) -> int:
        return max(0, min(self.shard_size, len(self.items) - index * self.shard_size))

    def bad_rows(self, index: int, arr: np.ndarray, doc: dict, used: int) -> list[int]:
        """Rows (within shard `index`) among the first `used` whose crc32 differs from the sidecar's."""
        crcs = doc["crc32"]
        have = row_crcs(arr[:used])
        return [r for r in range(used) if r >= len(crcs) or crcs[r] != have[r]]

    def _verify_on_open(self, repair: bool) -> None:
        """The cheap check: sizes always (np.load), row checksums of shards changed since their sidecar
        was written; a shard without a sidecar (older store) is recorded when write-locked, else noted."""
        unverified = []
        for index in range((len(self.items) + self.shard_size - 1) // self.shard_size):
            used = self._used_rows(index)
            arr = self._load_shard(index)
            shard = self.path / SHARDS_DIR / _shard_name(index)
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
        ipath = self.path / ITEMS_NAME
        lines = "".join(json_line(o) for o in self.items)
        atomic_write_bytes(ipath, lines.encode("utf-8"))
        self._items_bytes = len(lines.encode("utf-8"))

    # -------------------------------------------------------------------------------------- reading
    def __len__(self) -> int:
        return len(self.items)

    def iter_shards(self) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first_row, memory-mapped (n, dim) array) per shard, covering exactly len(self) rows."""
        n = len(self.items)
        for first in range(0, n, self.shard_size):
            p = self.path / SHARDS_DIR / _shard_name(first // self.shard_size)
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
            yield first, arr[: min(self.shard_size, n - first)]

    def matrix(self, dtype: Any = np.float32) -> np.ndarray:
        """All stored vectors as one (N, dim) array."""
        out = np.empty((len(self.items), self.dim), dtype=dtype)
        for first, arr in self.iter_shards():
            out[first : first + arr.shape[0]] = arr
        return out

    def row_of(self, path: str | Path) -> int:
        """Row of the latest vector stored for `path` (as given, or as an absolute path)."""
        if self._row_by_path is None:
            self._row_by_path = {str(it["path"]): i for i, it in enumerate(self.items)}
        for key in (str(path), os.path.abspath(str(path))):
            if key in self._row_by_path:
                return self._row_by_path[key]
        raise UnknownPathError(f"{self.path}: no vector stored for {path}")

    def done_keys(self) -> set[tuple[str, int, float]]:
        """(path, size, mtime) of every embedded file, for resuming a run."""
        return {item_key(it) for it in self.items}

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
    def append(self, items: list[dict], vectors: np.ndarray) -> None:
        """Add rows: shards (and their checksum sidecars) are rewritten atomically first, then the item
        lines are appended (fsync); all under the writer lock."""
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
        if not items:
            return
        check_entries(self.path)
        self._acquire()
        try:
            self._append_locked(items, vectors.astype(self.dtype))
        finally:
            _lock.release(self.path)

    def _append_locked(self, items: list[dict], vecs: np.ndarray) -> None:
        start = len(self.items)
        end = start + len(items)
        shard_dir = self.path / SHARDS_DIR
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
        append_lines(self.path / ITEMS_NAME, [dict(it) for it in items])
        self._items_bytes = self._items_size()
        self.items.extend(dict(it) for it in items)
        if self._row_by_path is not None:
            for i, it in enumerate(items):
                self._row_by_path[str(it["path"])] = start + i

    def _check_kept(self, index: int, old: np.ndarray) -> None:
        # The rows carried into a rewritten shard get fresh checksums: they must be sound first.
        doc = self._sidecar(index)
        if doc is not None and self.bad_rows(index, old, doc, old.shape[0]):
            raise StoreError(
                f"{self.path / SHARDS_DIR / _shard_name(index)}: rows fail their checksum (damaged); "
                "run `mlx-clap check STORE --repair` first"
            )

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


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
    objs, bad_lines, torn = _read_lines_lenient(path / ITEMS_NAME)
    store = EmbeddingStore(path, manifest, [])
    store.items = objs  # placeholders included: row k is line k
    size, n = int(layout["shard_size"]), len(objs)
    if n and not (path / SHARDS_DIR).is_dir():
        raise StoreError(
            f"{path / SHARDS_DIR}: is missing or not a folder, but {ITEMS_NAME} names {n} vectors"
        )
    damaged: list[dict] = []
    unverified: list[str] = []
    orphans = 0
    index = 0
    while True:
        first = index * size
        shard = path / SHARDS_DIR / _shard_name(index)
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
    objs, _, _ = _read_lines_lenient(path / ITEMS_NAME)
    store = EmbeddingStore(path, manifest, [])
    size = store.shard_size
    remove = {d["row"] for d in report["damaged_rows"]} | {b["row"] for b in report["bad_lines"]}
    if not remove:
        store.items = objs
        for index in range((len(objs) + size - 1) // size):  # record missing checksums (older stores)
            if store._sidecar(index) is None:
                store._write_sidecar(index, row_crcs(np.asarray(store._load_shard(index))))
        return 0
    first = min(remove)
    kept = [r for r in range(len(objs)) if r not in remove]
    store.items = [objs[r] for r in range(first)]
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
        p = path / SHARDS_DIR / _shard_name(index)
        _atomic_save_npy(p, np.ascontiguousarray(block))
        store._write_sidecar(index, row_crcs(block))
    last = (new_n + size - 1) // size
    for index in range(last, max(sources, default=-1) + 1):
        (path / SHARDS_DIR / _shard_name(index)).unlink(missing_ok=True)
        (path / SUMS_DIR / _sum_name(index)).unlink(missing_ok=True)
    _fsync_dir(path / SHARDS_DIR)
    store.items = [objs[r] for r in kept]
    store._rewrite_items()  # step 3: the whole repaired store
    return len(remove)
