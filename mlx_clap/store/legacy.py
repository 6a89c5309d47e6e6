"""Read a store of format 1 or 2 (the .npy layout of mlx-clap before the Lance store), for its migration.

Layout (format 2; format 1 is generation 0 with no segment table):

    manifest.json          pipeline entries; "store": dim, dtype, shard_size, format_version, generation,
                           segments ({"hop", "window"} or absent)
    <data>/                the store folder for generation 0, data-N/ for generation N
      items.jsonl          one JSON object per file row ({"path", "size", "mtime", ..., "seg": [first,
                           count]}), line k = row k; a later row of a path supersedes the earlier ones
      shards/emb-NNNNN.npy rows [N * shard_size, (N + 1) * shard_size)
      checksums/           emb-NNNNN.sum.json: {"crc32": [...]} per row of shard NNNNN
      segments/            the same for the per-window rows ({"start", "end"} seconds per line)

Reading only: this module never changes the folder. Damage a killed writer of that format could leave
(a torn last line, shard rows past the last item, segment rows no file row names yet) is ignored as that
writer's `open` did; anything else (a missing or short shard, a row failing its checksum, a bad line in
the middle) is a LegacyFormatError naming the file, so a migration converts a whole store or nothing.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mlx_clap.store.errors import StoreError

MANIFEST_NAME = "manifest.json"
ITEMS_NAME = "items.jsonl"
SHARDS_DIR = "shards"
SUMS_DIR = "checksums"
SEGMENTS_DIR = "segments"
DATA_PREFIX = "data-"
NEWEST_FORMAT = 2
DTYPES = ("float16", "float32")
# The old format's own entries (and those derived files it let live beside them).
ENTRIES = (MANIFEST_NAME, ITEMS_NAME, SHARDS_DIR, SUMS_DIR, SEGMENTS_DIR, "errors.jsonl", ".writer.lock")
DERIVED = ("clusters.json", "ann.usearch", "ann.json", "map.json", "warnings.jsonl")


class LegacyFormatError(StoreError):
    """A format-1/2 store that cannot be read whole; the message names the file and the cause."""


def is_legacy_entry(name: str) -> bool:
    """Whether a name in a format-1/2 store folder is that store's own (or a temp file of its writes)."""
    return (
        name in ENTRIES + DERIVED
        or (name.startswith(".") and name.endswith(".tmp"))
        or (name.startswith(DATA_PREFIX) and name[len(DATA_PREFIX) :].isdigit())
    )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _seconds(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def item_problem(obj: dict) -> str | None:
    """Why a file-row record is not valid (None when it is)."""
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


def segment_problem(obj: dict) -> str | None:
    """Why a segment-row record is not valid (None when it is)."""
    if not _seconds(obj["start"]) or not _seconds(obj["end"]) or obj["end"] < obj["start"]:
        return f"segment needs seconds 0 <= start <= end (got {obj['start']!r}, {obj['end']!r})"
    return None


def read_layout(mpath: Path) -> dict:
    """The manifest, with its "store" section checked for types and ranges (errors name the field)."""
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LegacyFormatError(f"{mpath}: unreadable manifest ({exc})") from exc
    lay = manifest.get("store") if isinstance(manifest, dict) else None
    if not isinstance(lay, dict) or not {"dim", "dtype", "shard_size"} <= set(lay):
        raise LegacyFormatError(f"{mpath}: manifest has no valid 'store' section (dim, dtype, shard_size)")
    version = lay.get("format_version", 1)
    if not _is_int(version) or version < 1:
        raise LegacyFormatError(
            f"{mpath}: field store.format_version must be a positive integer (got {version!r})"
        )
    if version > NEWEST_FORMAT:
        raise LegacyFormatError(f"{mpath}: store format {version} is newer than this mlx-clap")
    for key in ("dim", "shard_size"):
        v = lay[key]
        if not _is_int(v) or not 1 <= v <= 1 << 24:
            raise LegacyFormatError(
                f"{mpath}: field store.{key} must be an integer from 1 to {1 << 24} (got {v!r})"
            )
    if lay["dtype"] not in DTYPES:
        raise LegacyFormatError(f"{mpath}: unknown store dtype {lay['dtype']!r} (field store.dtype)")
    gen = lay.get("generation", 0)
    if not _is_int(gen) or gen < 0:
        raise LegacyFormatError(
            f"{mpath}: field store.generation must be a non-negative integer (got {gen!r})"
        )
    seg = lay.get("segments")
    ok = isinstance(seg, dict) and all(
        isinstance(seg.get(k), (int, float)) and not isinstance(seg.get(k), bool) and seg[k] > 0
        for k in ("hop", "window")
    )
    if seg is not None and not ok:
        raise LegacyFormatError(
            f'{mpath}: field store.segments must be {{"hop": s, "window": s}} (got {seg!r})'
        )
    return manifest


def _read_lines(ipath: Path, needed: tuple[str, ...], check: Any) -> list[dict]:
    """The records of an items.jsonl; a torn last line (a killed append) is left out."""
    if not ipath.exists():
        return []
    if not ipath.is_file():
        raise LegacyFormatError(f"{ipath}: is not a file")
    raw = ipath.read_bytes()
    lines = raw.split(b"\n")
    out: list[dict] = []
    for k, line in enumerate(lines[:-1]):  # the text after the last newline is a torn append (or empty)
        try:
            obj = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            obj = None
        if not isinstance(obj, dict) or not set(needed) <= set(obj):
            if k == len(lines) - 2:
                break  # a torn last line that still ends in a newline, as the old reader allowed
            raise LegacyFormatError(f"{ipath}: line {k + 1} is not a valid item record")
        problem = check(obj)
        if problem:
            raise LegacyFormatError(f"{ipath}: line {k + 1}: {problem}")
        out.append(obj)
    return out


class _Table:
    """One table (file rows or segment rows): its records and its shards, checked whole on open."""

    def __init__(self, folder: Path, records: list[dict], dim: int, dtype: str, shard_size: int):
        self.folder, self.records = folder, records
        self.dim, self.dtype, self.shard_size = dim, dtype, shard_size
        n = len(records)
        shards = folder / SHARDS_DIR
        if n and not shards.is_dir():
            raise LegacyFormatError(
                f"{shards}: is missing or not a folder, but {folder / ITEMS_NAME} names {n} vectors; "
                "restore it to convert the store; nothing was changed"
            )
        self._shards = [
            self._load(i, min(shard_size, n - i * shard_size)) for i in range(-(-n // shard_size))
        ]

    def _load(self, index: int, used: int) -> np.ndarray:
        p = self.folder / SHARDS_DIR / f"emb-{index:05d}.npy"
        try:
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise LegacyFormatError(f"{p}: unreadable shard ({exc}); nothing was changed") from exc
        if (
            arr.ndim != 2
            or arr.shape[1] != self.dim
            or arr.dtype != np.dtype(self.dtype)
            or arr.shape[0] < used
        ):
            raise LegacyFormatError(
                f"{p}: shard of shape {arr.shape} {arr.dtype}, but {used} rows of dim {self.dim} "
                f"{self.dtype} are named; nothing was changed"
            )
        sums = self.folder / SUMS_DIR / f"emb-{index:05d}.sum.json"
        if sums.exists():  # older stores have none: their rows are taken as they are
            try:
                crcs = json.loads(sums.read_text(encoding="utf-8"))["crc32"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise LegacyFormatError(f"{sums}: unreadable checksum file ({exc})") from exc
            rows = np.ascontiguousarray(arr[:used])
            bad = [r for r in range(used) if r >= len(crcs) or crcs[r] != zlib.crc32(rows[r].tobytes())]
            if bad:
                first = index * self.shard_size + bad[0]
                raise LegacyFormatError(
                    f"{p}: {len(bad)} row(s) fail their checksum (damaged; first row {first}); "
                    "nothing was changed"
                )
        return arr[:used]

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """The stored vectors (store dtype, bit for bit) of physical rows `rows`."""
        out = np.empty((rows.size, self.dim), dtype=self.dtype)
        shard_of = rows // self.shard_size
        for s in np.unique(shard_of).tolist():
            sel = np.nonzero(shard_of == s)[0]
            out[sel] = self._shards[s][rows[sel] - s * self.shard_size]
        return out


class LegacyStore:
    """A format-1/2 store read whole: `items` (one live row per path, a path's latest row, in row order),
    `iter_shards()` over their vectors and `segments_of(row)` (the stored dtype, bit for bit)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_layout(self.path / MANIFEST_NAME)
        lay = self.manifest["store"]
        self.dim, self.dtype, shard_size = int(lay["dim"]), str(lay["dtype"]), int(lay["shard_size"])
        self.format_version = int(lay.get("format_version", 1))
        seg = lay.get("segments")
        self.segment_settings: dict | None = dict(seg) if isinstance(seg, dict) else None
        gen = int(lay.get("generation", 0))
        data = self.path / f"{DATA_PREFIX}{gen}" if gen else self.path
        if not data.is_dir():
            raise LegacyFormatError(
                f"{data}: the data folder the manifest names is missing; nothing was changed"
            )
        records = _read_lines(data / ITEMS_NAME, ("path", "size", "mtime"), item_problem)
        self._files = _Table(data, records, self.dim, self.dtype, shard_size)
        self._segs: _Table | None = None
        if self.segment_settings is not None:
            if not (data / SEGMENTS_DIR).is_dir():
                raise LegacyFormatError(
                    f"{data / SEGMENTS_DIR}: the segment table is missing, but the manifest says this store "
                    "has one"
                )
            segs = _read_lines(data / SEGMENTS_DIR / ITEMS_NAME, ("start", "end"), segment_problem)
            named = max((sum(it["seg"]) for it in records if "seg" in it), default=0)
            if len(segs) < named:
                raise LegacyFormatError(
                    f"{data / SEGMENTS_DIR}: holds {len(segs)} segment rows, but the file rows name {named}; "
                    "the segment table is damaged"
                )
            # Rows past the last one a file row names are a killed run's tail (segments went in first).
            self._segs = _Table(data / SEGMENTS_DIR, segs[:named], self.dim, self.dtype, shard_size)
        last = {str(it["path"]): k for k, it in enumerate(records)}
        self._live = np.array(sorted(last.values()), dtype=np.int64)
        self.items = [records[k] for k in self._live.tolist()]

    @property
    def has_segments(self) -> bool:
        return self.segment_settings is not None

    def __len__(self) -> int:
        return len(self.items)

    def iter_shards(self, block: int = 4096) -> Iterator[tuple[int, np.ndarray]]:
        """(first row of `items`, (n, dim) stored vectors) covering every live row in order."""
        for first in range(0, len(self), block):
            yield first, self._files.rows(self._live[first : first + block])

    def segments_of(self, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(start, end, stored vectors) of the segments of `items[row]`, None when it has none."""
        seg = self.items[row].get("seg")
        if self._segs is None or not seg or not seg[1]:
            return None
        rows = np.arange(seg[0], seg[0] + seg[1], dtype=np.int64)
        recs = [self._segs.records[r] for r in rows.tolist()]
        start = np.array([float(r["start"]) for r in recs])
        end = np.array([float(r["end"]) for r in recs])
        return start, end, self._segs.rows(rows)
