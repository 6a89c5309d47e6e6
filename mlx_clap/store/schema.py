"""The table: columns of a store's rows, the metadata that names its pipeline, and rows <-> Arrow.

One Lance dataset holds two kinds of rows (`kind`): a "file" row per audio file (its vector is the file's
embedding) and, in stores made with segments, "segment" rows (one per window, `start`/`end` in seconds).
Every row carries its file's path, content sha256, size, mtime and duration, so a segment row names its
file by (path, sha256) and any tool can read either kind without a join.

A path that is not valid UTF-8 (os.fsdecode surrogates) cannot be an Arrow string: `path` then holds a
readable form (undecodable bytes as U+FFFD) and `path_raw` the exact bytes; mlx-clap reads `path_raw`
first. `checksum` is a crc32 of the row's path bytes, kind, start, end and vector bytes
(`row_checksums`): Lance files carry no checksums of their own, and a bit flipped in a vector or a path
must be found by `check`, never served as another file's vector.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from mlx_clap.store.errors import StoreError

STORE_FORMAT = 3  # 1 and 2: the .npy/items.jsonl folders that store/legacy.py reads
METADATA_KEY = "mlx_clap"  # schema metadata: the manifest, as JSON
FILE, SEGMENT = "file", "segment"
STORE_DTYPES = ("float16", "float32")
VECTOR = "vector"
# How Lance lays out the vector column. Its defaults (compressed, "full-zip" rows) decode a fixed-size
# list of float16 about 2x slower than uncompressed mini-blocks (1M x 512: 1.5 s against 0.73 s on 2
# cores), and that decode is the whole cost of an exact search; random access (take of 100 rows, the
# ANN refine) costs the same either way. Vectors do not compress anyway. Stores written before this keep
# Lance's defaults and read as before.
VECTOR_ENCODING = {"lance-encoding:compression": "none", "lance-encoding:structural-encoding": "miniblock"}
# |norm - 1| above this marks a row as not a unit vector (float16 rounding stays far below it).
UNIT_TOLERANCE = 1e-2

# The manifest entries that make two runs' vectors comparable: a run that differs in one is refused.
# The model is named by its weights (a model folder moved elsewhere is the same model).
IDENTITY_KEYS = ("weights_sha256", "embedding_dim", "store_dtype", "settings")

_META_FIELDS = [
    pa.field("path", pa.string(), nullable=False),
    pa.field("path_raw", pa.binary()),  # the path's bytes, only where they are not valid UTF-8
    pa.field("kind", pa.string(), nullable=False),
    pa.field("sha256", pa.string()),
    pa.field("size", pa.int64(), nullable=False),
    pa.field("mtime", pa.float64(), nullable=False),
    pa.field("duration", pa.float64()),
    pa.field("start", pa.float64()),  # segment rows: the window, in seconds (null on file rows)
    pa.field("end", pa.float64()),
    pa.field("channels", pa.int32()),
    pa.field("source_rate", pa.int32()),
    pa.field("warnings", pa.list_(pa.string())),
    pa.field("checksum", pa.uint32(), nullable=False),
]
META_COLUMNS = tuple(f.name for f in _META_FIELDS)
# The item fields of a file row, as mlx-clap's commands read them (None values are left out).
ITEM_FIELDS = ("path", "size", "mtime", "sha256", "duration", "channels", "source_rate", "warnings")


def store_schema(dim: int, dtype: str, manifest: dict | None = None) -> pa.Schema:
    """The Arrow schema of a store of `dim`-d vectors stored as `dtype`, carrying `manifest` as metadata."""
    if dtype not in STORE_DTYPES:
        raise StoreError(f"store dtype {dtype!r} is not one of {', '.join(STORE_DTYPES)}")
    vector = pa.field(
        VECTOR,
        pa.list_(pa.from_numpy_dtype(np.dtype(dtype)), int(dim)),
        nullable=False,
        metadata=VECTOR_ENCODING,
    )
    metadata = None if manifest is None else {METADATA_KEY: json.dumps(manifest, sort_keys=True)}
    return pa.schema([*_META_FIELDS, vector], metadata=metadata)


def path_key(path: str) -> bytes:
    """A path as the bytes the store matches rows by (os.fsdecode surrogates become their bytes again)."""
    return str(path).encode("utf-8", "surrogateescape")


def key_path(key: bytes) -> str:
    return key.decode("utf-8", "surrogateescape")


# ----------------------------------------------------------------------------------- the manifest
def manifest_of(schema: pa.Schema, where: str) -> dict:
    """The manifest a store's schema carries; StoreError when the dataset is not an mlx-clap store or
    was written by a newer mlx-clap."""
    raw = (schema.metadata or {}).get(METADATA_KEY.encode())
    if raw is None:
        raise StoreError(
            f"{where}: a Lance dataset without mlx-clap metadata (written by another tool?); "
            "not an embedding store"
        )
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise StoreError(f"{where}: unreadable mlx-clap metadata ({exc})") from exc
    layout = manifest.get("store") if isinstance(manifest, dict) else None
    if not isinstance(layout, dict):
        raise StoreError(f"{where}: mlx-clap metadata has no 'store' section")
    version = layout.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < STORE_FORMAT:
        raise StoreError(f"{where}: store format {version!r} in a Lance dataset is not one mlx-clap wrote")
    if version > STORE_FORMAT:
        raise StoreError(
            f"{where}: store format {version} was written by a newer mlx-clap (this one reads "
            f"{STORE_FORMAT}); upgrade mlx-clap"
        )
    field = schema.field(VECTOR) if VECTOR in schema.names else None
    dim, dtype = layout.get("dim"), layout.get("dtype")
    if (
        field is None
        or not pa.types.is_fixed_size_list(field.type)
        or field.type.list_size != dim
        or dtype not in STORE_DTYPES
        or field.type.value_type != pa.from_numpy_dtype(np.dtype(dtype))
    ):
        raise StoreError(f"{where}: the vector column does not match the metadata (dim {dim!r}, {dtype!r})")
    missing = [c for c in META_COLUMNS if c not in schema.names]
    if missing:
        raise StoreError(f"{where}: column(s) {', '.join(missing)} missing; not an mlx-clap store")
    return manifest


def model_id(manifest: dict) -> str | None:
    """The model a store was embedded with, as recorded in its manifest (a str, or a nested dict)."""
    m = manifest.get("model")
    if isinstance(m, dict):
        m = m.get("path") or m.get("id")
    return None if m is None else str(m)


def layout(dim: int, dtype: str, segments: dict | None) -> dict:
    """The manifest's "store" section."""
    out: dict[str, Any] = {"format_version": STORE_FORMAT, "dim": int(dim), "dtype": dtype}
    if segments is not None:
        hop, window = segments.get("hop"), segments.get("window")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in (hop, window)):
            raise StoreError(
                f'segments must be {{"hop": s, "window": s}} with positive seconds (got {segments!r})'
            )
        out["segments"] = {"hop": float(hop), "window": float(window)}
    return out


def identity_diff(stored: dict, wanted: dict) -> list[str]:
    """How the pipeline `wanted` differs from the one a store was made with, one phrase per difference
    ("long_audio: 'head' there, 'windows-mean' now"); empty when the run may write into the store.
    Segments count only when `wanted` asks for them (a run without --segments keeps the store's)."""
    diffs = []
    for k in IDENTITY_KEYS:
        old, new = stored.get(k), wanted.get(k)
        if old == new:
            continue
        if k == "settings" and isinstance(old, dict) and isinstance(new, dict):
            for sk in sorted(set(old) | set(new)):
                if old.get(sk) != new.get(sk):
                    diffs.append(f"{sk}: {old.get(sk)!r} there, {new.get(sk)!r} now")
        else:
            diffs.append(f"{k}: {old!r} there, {new!r} now")
    want_seg = (wanted.get("store") or {}).get("segments")
    have_seg = (stored.get("store") or {}).get("segments")
    if want_seg is not None and have_seg is None:
        diffs.append("segments: none there (made without --segments), wanted now")
    elif want_seg is not None and want_seg != have_seg:
        diffs.append(f"segments: {have_seg} there, {want_seg} now")
    return diffs


# ------------------------------------------------------------------------------------ rows <-> Arrow
def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _finite(v: Any) -> bool:
    return (
        isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) and math.isfinite(v)
    )


def item_problem(item: Any) -> str | None:
    """Why a file item cannot be stored (None when it can)."""
    if not isinstance(item, dict):
        return "not a dict"
    p = item.get("path")
    if not isinstance(p, str) or not p or "\0" in p:
        return f"'path' must be a non-empty string (got {p!r})"
    if not _is_int(item.get("size")) or item["size"] < 0:
        return f"'size' must be a non-negative integer (got {item.get('size')!r})"
    if not _finite(item.get("mtime")):
        return f"'mtime' must be a finite number (got {item.get('mtime')!r})"
    d = item.get("duration")
    if d is not None and (not _finite(d) or d < 0):
        return f"'duration' must be a non-negative number (got {d!r})"
    sha = item.get("sha256")
    if sha is not None and not isinstance(sha, str):
        return f"'sha256' must be a hex string (got {sha!r})"
    return None


def row_checksums(
    keys: Sequence[bytes], kinds: Sequence[str], starts, ends, vectors: np.ndarray
) -> np.ndarray:
    """crc32 per row of (path bytes, kind, start, end, vector bytes as stored): what `checksum` holds."""
    vectors = np.ascontiguousarray(vectors)
    out = np.empty(len(keys), dtype=np.uint32)
    for i, key in enumerate(keys):
        s, e = starts[i], ends[i]
        head = b"%s\0%s\0%r\0%r\0" % (key, kinds[i].encode(), s, e)
        out[i] = zlib.crc32(vectors[i].tobytes(), zlib.crc32(head))
    return out


def _vector_array(vectors: np.ndarray, dim: int, dtype: str) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(vectors, dtype=dtype).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, int(dim))


def vectors_of(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """(n, dim) numpy view (or copy, across chunks) of a fixed-size-list vector column, as stored."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = [c.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim) for c in chunks]
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return np.zeros((0, dim), dtype=np.float32)
    return np.concatenate(parts)


def rows_table(
    items: Sequence[dict],
    vectors: np.ndarray,
    segments: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray] | None] | None,
    schema: pa.Schema,
    where: str,
) -> pa.Table:
    """The rows of `items` as an Arrow table of `schema`: each file row, then its segment rows (windows
    `(starts, ends, vectors)` per item, or None for none). StoreError naming `where` and the file for
    bad input: wrong shapes, non-finite vectors, a path twice, windows out of order."""
    field = schema.field(VECTOR).type
    dim, dtype = int(field.list_size), "float16" if field.value_type == pa.float16() else "float32"
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise StoreError(f"{where}: vectors of shape {vectors.shape}, the store holds dim {dim}")
    if len(items) != vectors.shape[0]:
        raise StoreError(f"{where}: {len(items)} items for {vectors.shape[0]} vectors")
    if segments is not None and len(segments) != len(items):
        raise StoreError(f"{where}: {len(segments)} segment lists for {len(items)} items")
    if not np.all(np.isfinite(vectors)):
        raise StoreError(f"{where}: refusing to store non-finite vectors")
    seen: set[str] = set()
    cols: dict[str, list] = {name: [] for name in (*META_COLUMNS, "_key")}
    vecs: list[np.ndarray] = []
    seg_cols: dict[str, list] = {name: [] for name in (*META_COLUMNS, "_key")}
    seg_vecs: list[np.ndarray] = []
    for i, it in enumerate(items):
        problem = item_problem(it)
        if problem:
            raise StoreError(f"{where}: bad item {i}: {problem}")
        path = it["path"]
        if path in seen:
            raise StoreError(f"{where}: {path} given twice in one write (one row per path)")
        seen.add(path)
        common = _common(it)
        _add(cols, common, FILE, None, None)
        vecs.append(vectors[i : i + 1])
        seg = segments[i] if segments is not None else None
        if seg is None:
            continue
        starts, ends, v = (np.asarray(a) for a in seg)
        if v.ndim != 2 or v.shape[1] != dim or v.shape[0] != starts.size or starts.size != ends.size:
            raise StoreError(f"{where}: segments of {path}: shapes {starts.shape} {ends.shape} {v.shape}")
        if not np.all(np.isfinite(v)):
            raise StoreError(f"{where}: refusing to store non-finite segment vectors ({path})")
        if starts.size and (
            not np.all(np.isfinite(starts))
            or not np.all(np.isfinite(ends))
            or np.any(starts < 0)
            or np.any(ends < starts)
            or np.any(np.diff(starts) < 0)
        ):
            raise StoreError(f"{where}: segments of {path} need seconds 0 <= start <= end, sorted by start")
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            _add(seg_cols, common, SEGMENT, round(float(a), 6), round(float(b), 6))
        seg_vecs.append(v)
    for name in cols:  # file rows first, then the segments in file order (see dataset.py)
        cols[name] += seg_cols[name]
    all_vecs = np.concatenate(vecs + seg_vecs) if vecs else np.zeros((0, dim))
    stored = np.ascontiguousarray(all_vecs, dtype=dtype)
    cols["checksum"] = row_checksums(
        cols.pop("_key"), cols["kind"], cols["start"], cols["end"], stored
    ).tolist()
    arrays = [pa.array(cols[f.name], type=f.type) for f in schema if f.name != VECTOR]
    return pa.Table.from_arrays([*arrays, _vector_array(stored, dim, dtype)], schema=schema)


def _common(it: dict) -> dict:
    key = path_key(it["path"])
    try:
        text, raw = key.decode("utf-8"), None
    except UnicodeDecodeError:
        text, raw = key.decode("utf-8", "replace"), key
    warnings = it.get("warnings")
    return {
        "path": text,
        "path_raw": raw,
        "_key": key,
        "sha256": it.get("sha256"),
        "size": int(it["size"]),
        "mtime": float(it["mtime"]),
        "duration": None if it.get("duration") is None else float(it["duration"]),
        "channels": None if it.get("channels") is None else int(it["channels"]),
        "source_rate": None if it.get("source_rate") is None else int(it["source_rate"]),
        "warnings": None if not warnings else [str(w) for w in warnings],
    }


def _add(cols: dict[str, list], common: dict, kind: str, start: float | None, end: float | None) -> None:
    cols["_key"].append(common["_key"])
    for name in META_COLUMNS:
        if name == "kind":
            cols[name].append(kind)
        elif name == "start":
            cols[name].append(start)
        elif name == "end":
            cols[name].append(end)
        elif name != "checksum":
            cols[name].append(common[name])


def keys_of(table: pa.Table) -> list[bytes]:
    """The path key of every row (path_raw where set, else the UTF-8 path)."""
    raw = table.column("path_raw").to_pylist()
    text = table.column("path").to_pylist()
    return [r if r is not None else t.encode("utf-8") for r, t in zip(raw, text, strict=True)]


def items_of(table: pa.Table) -> list[dict]:
    """File items (dicts as mlx-clap's commands use them) of a table of file rows, in row order."""
    cols = {name: table.column(name).to_pylist() for name in ITEM_FIELDS if name != "path"}
    paths = [key_path(k) for k in keys_of(table)]
    out = []
    for i, p in enumerate(paths):
        it: dict[str, Any] = {"path": p}
        for name, values in cols.items():
            v = values[i]
            if v is not None:
                it[name] = v
        out.append(it)
    return out
