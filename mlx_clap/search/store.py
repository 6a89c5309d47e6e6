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
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mlx_clap.io.files import atomic_write_bytes, atomic_write_json

STORE_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
ITEMS_NAME = "items.jsonl"
ERRORS_NAME = "errors.jsonl"
SHARDS_DIR = "shards"
STORE_DTYPES = ("float16", "float32")


class StoreError(ValueError):
    """A store that cannot be created, opened or written; the message names the folder and the cause."""


class UnknownPathError(StoreError, KeyError):
    """`row_of` for a path the store does not hold (catchable as StoreError or KeyError)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def _shard_name(index: int) -> str:
    return f"emb-{index:05d}.npy"


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
    """Append JSON lines in one write, then fsync (a crash can only tear the last line)."""
    if not objs:
        return
    data = "".join(json_line(o) for o in objs).encode("utf-8")
    with open(path, "ab") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def item_key(item: dict) -> tuple[str, int, float]:
    """The resume key of an item: (path, size, mtime)."""
    return (str(item["path"]), int(item["size"]), float(item["mtime"]))


class EmbeddingStore:
    """Append-only, crash-safe embedding store; see the module docstring for the layout.

    Readers use `open`, `items`, `iter_shards`, `matrix`, `row_of`; one writer uses `append` and
    `record_error`. Vectors are stored as float16 (default) or float32 and returned as float32 by `matrix`.
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

    # ----------------------------------------------------------------------------- creating and opening
    @classmethod
    def create(
        cls,
        path: str | Path,
        manifest: dict,
        dim: int,
        dtype: str = "float16",
        shard_size: int = 4096,
    ) -> EmbeddingStore:
        """Make a new, empty store; a folder that already holds a store (or other files) is refused."""
        path = Path(path)
        if dtype not in STORE_DTYPES:
            raise StoreError(f"{path}: store dtype {dtype!r} is not one of {', '.join(STORE_DTYPES)}")
        if int(dim) <= 0 or int(shard_size) <= 0:
            raise StoreError(f"{path}: dim and shard_size must be positive (got {dim}, {shard_size})")
        if path.exists() and not path.is_dir():
            raise StoreError(f"{path}: exists and is not a folder")
        if (path / MANIFEST_NAME).exists():
            raise StoreError(f"{path}: a store already exists here (open it, or delete it to start fresh)")
        (path / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        full = dict(manifest)
        full["store"] = {
            "format_version": STORE_FORMAT_VERSION,
            "dim": int(dim),
            "dtype": dtype,
            "shard_size": int(shard_size),
        }
        (path / ITEMS_NAME).touch()
        atomic_write_json(path / MANIFEST_NAME, full)  # the manifest last: it marks a complete store
        _fsync_dir(path)
        return cls(path, full, [])

    @classmethod
    def open(cls, path: str | Path, repair: bool = True) -> EmbeddingStore:
        """Open an existing store; StoreError if it is missing, empty or corrupt.

        With `repair` (default) the leftovers of a killed writer are cleaned on disk (partial item line,
        temp files); without it they are only ignored in memory (for read-only folders).
        """
        path = Path(path)
        if not path.exists():
            raise StoreError(f"{path}: no such store folder")
        if not path.is_dir():
            raise StoreError(f"{path}: not a folder, so not an embedding store")
        mpath = path / MANIFEST_NAME
        if not mpath.is_file():
            raise StoreError(f"{path}: no {MANIFEST_NAME}; this folder is not an embedding store (or empty)")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StoreError(f"{mpath}: unreadable manifest ({exc})") from exc
        layout = manifest.get("store") if isinstance(manifest, dict) else None
        if not isinstance(layout, dict) or not {"dim", "dtype", "shard_size"} <= set(layout):
            raise StoreError(f"{mpath}: manifest has no valid 'store' section (dim, dtype, shard_size)")
        if int(layout.get("format_version", 1)) > STORE_FORMAT_VERSION:
            raise StoreError(f"{mpath}: store format {layout['format_version']} is newer than this mlx-clap")
        if layout["dtype"] not in STORE_DTYPES:
            raise StoreError(f"{mpath}: unknown store dtype {layout['dtype']!r}")
        items = cls._read_items(path / ITEMS_NAME, repair)
        store = cls(path, manifest, items)
        store._check_and_trim(repair)
        return store

    @staticmethod
    def _read_items(ipath: Path, repair: bool) -> list[dict]:
        if not ipath.exists():
            return []
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
                    raise StoreError(f"{ipath}: line {len(items) + 1} is not a valid item record")
                break
            items.append(obj)
            pos = nl + 1
            good_end = pos
        if good_end < len(raw) and repair:
            with open(ipath, "r+b") as fh:
                fh.truncate(good_end)
                fh.flush()
                os.fsync(fh.fileno())
        return items

    def _shard_rows_on_disk(self, index: int) -> int:
        p = self.path / SHARDS_DIR / _shard_name(index)
        if not p.is_file():
            return 0
        try:
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise StoreError(f"{p}: unreadable shard ({exc})") from exc
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise StoreError(f"{p}: shard shape {arr.shape} does not match dim {self.dim}")
        return int(arr.shape[0])

    def _check_and_trim(self, repair: bool) -> None:
        """Drop items whose rows never reached a shard, and clean temp files."""
        shard_dir = self.path / SHARDS_DIR
        if repair and shard_dir.is_dir():
            for tmp in shard_dir.glob(".emb-*.tmp"):
                tmp.unlink(missing_ok=True)
        n = len(self.items)
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

    def _rewrite_items(self) -> None:
        ipath = self.path / ITEMS_NAME
        lines = "".join(json_line(o) for o in self.items)
        atomic_write_bytes(ipath, lines.encode("utf-8"))

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
        """Add rows: shards are rewritten atomically first, then the item lines are appended (fsync)."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise StoreError(f"{self.path}: vectors of shape {vectors.shape}, the store holds dim {self.dim}")
        if len(items) != vectors.shape[0]:
            raise StoreError(f"{self.path}: {len(items)} items for {vectors.shape[0]} vectors")
        for it in items:
            if not isinstance(it, dict) or not {"path", "size", "mtime"} <= set(it):
                raise StoreError(f"{self.path}: each item needs path, size and mtime (got {it!r})")
        if not np.all(np.isfinite(vectors)):
            raise StoreError(f"{self.path}: refusing to store non-finite vectors")
        if not items:
            return
        vecs = vectors.astype(self.dtype)
        start = len(self.items)
        end = start + len(items)
        shard_dir = self.path / SHARDS_DIR
        shard_dir.mkdir(exist_ok=True)
        for index in range(start // self.shard_size, (end - 1) // self.shard_size + 1):
            s0 = index * self.shard_size
            lo, hi = max(start, s0), min(end, s0 + self.shard_size)
            p = shard_dir / _shard_name(index)
            keep = lo - s0  # rows of this shard that are already in the store
            if keep:
                old = np.load(p, allow_pickle=False)[:keep]
                block = np.concatenate([old.astype(self.dtype), vecs[lo - start : hi - start]], axis=0)
            else:
                block = vecs[lo - start : hi - start]
            _atomic_save_npy(p, np.ascontiguousarray(block))
        _fsync_dir(shard_dir)
        append_lines(self.path / ITEMS_NAME, [dict(it) for it in items])
        self.items.extend(dict(it) for it in items)
        if self._row_by_path is not None:
            for i, it in enumerate(items):
                self._row_by_path[str(it["path"])] = start + i

    def record_error(self, path: str | Path, error: str, **extra: Any) -> None:
        """Append one failure record to errors.jsonl."""
        rec = {"path": str(path), "error": str(error), "time": time.time(), **extra}
        append_lines(self.path / ERRORS_NAME, [rec])
