"""Export a store's vectors for other tools: one JSON per audio file, Parquet, or `.npy` + JSON lines.

Formats (see `export_store`):

    json     OUT/ holds OUT/<path of the audio below the store's common folder>.json per file:
             {"filename", "path", "duration", "model", "dim", "embedding", "segments"?: [{"start", "end",
             "embedding"}]}, plus the marker .mlx-clap-export.json
    parquet  OUT is one file; a row per file and/or per segment: path, kind ("file"|"segment"), start, end,
             duration, vector (fixed-size list of float32, the clip-retrieval / LanceDB layout); the model
             id, dim and our export record in the schema metadata
    npy      OUT/ holds vectors.npy (float32 (N, dim)) + index.jsonl (one line per row), and for segments
             segments.npy + segments.jsonl, plus the marker

Every format streams: vectors are read shard by shard (or segment block by block) and written in batches
of at most `batch_rows` rows (default: about 32 MiB of vectors), so a million-row store never sits in
memory whole, let alone twice.

Writes are atomic: the export is built in a temp file or folder beside OUT and renamed into place at the
end, so a failure or Ctrl-C leaves no partial OUT. An OUT that exists is refused; with `overwrite` it is
replaced only when it is a previous export of ours (the marker, or our Parquet metadata, and nothing
else in it), so a user's own folder is never deleted.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mlx_clap.extras import install_hint
from mlx_clap.io.files import current_umask, json_line, write_failure
from mlx_clap.io.files import fsync_dir as _fsync_path
from mlx_clap.store.schema import model_id

if TYPE_CHECKING:  # the view's contract (Store.segment_view()); a type only, not loaded
    from mlx_clap.search.segments import SegmentViewLike as SegmentSource

FORMATS = ("json", "parquet", "npy")
LEVELS = ("file", "segment", "both")
EXPORT_TOOL = "mlx-clap export"
EXPORT_FORMAT_VERSION = 1
MARKER_NAME = ".mlx-clap-export.json"  # in a json or npy export folder: what --overwrite may replace
PARQUET_META_KEY = b"mlx_clap_export"  # the same record in a Parquet file's schema metadata
NPY_FILES = ("vectors.npy", "index.jsonl", "segments.npy", "segments.jsonl")
# Rows per batch (and Parquet row group): about 32 MiB of float32 vectors (16384 rows at 512-d), at most
# 65536 rows. Memory follows the batch, not the store: a 200k x 512 Parquet export peaks at about +180 MB
# of RAM with this, +540 MB with 65536-row batches (Arrow's encode buffers hold a few copies of a batch).
BATCH_BYTES = 32 << 20
MAX_BATCH_ROWS = 65536
PARQUET_EXTRA_HINT = install_hint("parquet")


class ExportError(ValueError):
    """An export that cannot be made; the message names the file or folder and the cause."""


@dataclass
class ExportSummary:
    """What an export wrote: `rows` = `files` + `segments` vectors."""

    format: str
    out: str
    level: str
    rows: int
    files: int
    segments: int
    dim: int
    model: str | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """The summary as a JSON-ready dict (`mlx-clap export --json`)."""
        return asdict(self)


# ------------------------------------------------------------------------------------------ helpers
def _write_new_file(path: Path, data: bytes) -> None:
    with open(path, "xb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _utf8_text(path: str) -> str:
    """A path as valid UTF-8 text: a file name that is not UTF-8 (lone surrogates from os.fsdecode) keeps
    its odd bytes as \\x escapes, since Parquet strings must be UTF-8."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")


def _duration(item: dict) -> float:
    d = item.get("duration")
    try:
        return float(d) if d is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def json_targets(paths: list[str]) -> list[str]:
    """The output name (relative to OUT) of each file's JSON: its path below the common folder of all
    paths, plus ".json". Names stay unique even on a case-insensitive file system (macOS): a name taken
    already (the same file twice, or "A.wav" next to "a.wav", or a folder of that name) gets ".2", ".3"...
    before ".json". A name with a ".." part is refused (it would point outside OUT)."""
    if not paths:
        return []
    norm = [os.path.abspath(p) for p in paths]  # abspath also normalizes "a/./b" and "a/../b"
    try:
        root = os.path.commonpath([os.path.dirname(p) for p in norm])
    except ValueError as exc:  # e.g. paths on different drives (Windows)
        raise ExportError(f"the store's paths have no common folder ({exc})") from exc
    rels = [os.path.relpath(p, root) for p in norm]
    folders: set[str] = set()
    for rel in rels:
        parts = rel.split(os.sep)
        if any(part in ("", ".", "..") for part in parts):
            raise ExportError(f"{rel}: not a file name below {root}; refusing to write outside OUT")
        for k in range(1, len(parts)):
            folders.add(os.sep.join(parts[:k]).casefold())
    taken = {MARKER_NAME.casefold()} | folders
    out = []
    for rel in rels:
        name, n = rel + ".json", 2
        while name.casefold() in taken:
            name, n = f"{rel}.{n}.json", n + 1
        taken.add(name.casefold())
        out.append(name)
    return out


# --------------------------------------------------------------------------------------- row batches
@dataclass
class _Batch:
    first: int  # index of the first row among the rows of its kind
    vectors: np.ndarray  # float32 (n, dim)
    files: np.ndarray  # int64 (n,): row in store.items of each row's file
    start: np.ndarray  # float64 (n,), NaN for file rows
    end: np.ndarray


def _rebatch(
    blocks: Iterator[tuple[int, np.ndarray]], total: int, dim: int, batch_rows: int, what: str
) -> Iterator[tuple[int, np.ndarray]]:
    """Blocks of any size (shards, segment blocks) as float32 batches of `batch_rows` rows (the last may be
    shorter), checked to cover rows 0..total-1 in order."""
    expected = 0
    buf: np.ndarray | None = None
    filled = batch_first = 0
    for first, arr in blocks:
        if first != expected or arr.ndim != 2 or arr.shape[1] != dim:
            raise ExportError(
                f"{what}: block at row {first} of shape {arr.shape} does not follow row {expected}"
            )
        pos = 0
        while pos < arr.shape[0]:
            if buf is None:
                buf = np.empty((min(batch_rows, total - batch_first), dim), np.float32)
                filled = 0
            take = min(buf.shape[0] - filled, arr.shape[0] - pos)
            if take <= 0:
                raise ExportError(f"{what}: holds more than its {total} rows")
            buf[filled : filled + take] = arr[pos : pos + take]
            filled += take
            pos += take
            if filled == buf.shape[0]:
                yield batch_first, buf
                batch_first += filled
                buf = None
        expected += arr.shape[0]
    if expected != total:
        raise ExportError(f"{what}: {expected} rows read, {total} expected")


def _file_batches(store: Any, batch_rows: int) -> Iterator[_Batch]:
    for first, vecs in _rebatch(store.iter_shards(), len(store), store.dim, batch_rows, str(store.path)):
        n = vecs.shape[0]
        nan = np.full(n, np.nan)
        yield _Batch(first, vecs, np.arange(first, first + n, dtype=np.int64), nan, nan)


def _segment_batches(view: SegmentSource, what: str, batch_rows: int) -> Iterator[_Batch]:
    blocks = view.iter_blocks(block_rows=batch_rows)
    for first, vecs in _rebatch(blocks, len(view), int(view.dim), batch_rows, what):
        sl = slice(first, first + vecs.shape[0])
        yield _Batch(first, vecs, view.file_index[sl], view.start[sl], view.end[sl])


def _check_view(store: Any, view: SegmentSource) -> None:
    what = f"{store.path}: segments"
    n = len(view)
    if int(view.dim) != store.dim:
        raise ExportError(f"{what}: dim {view.dim}, the store's vectors have dim {store.dim}")
    for name in ("file_index", "start", "end"):
        if np.shape(getattr(view, name)) != (n,):
            raise ExportError(f"{what}: {name} has shape {np.shape(getattr(view, name))}, expected ({n},)")
    if n and (view.file_index.min() < 0 or view.file_index.max() >= len(store)):
        raise ExportError(f"{what}: a segment names a file row outside 0..{len(store) - 1}")


# ------------------------------------------------------------------------------------------- writers
class _Rows:
    """Per-file columns of the store (paths, durations) and the progress counter, shared by the writers."""

    def __init__(self, store: Any, total: int, progress: Callable[[int, int], None] | None):
        self.store = store
        self.paths = [str(it["path"]) for it in store.items]
        self.durations = np.array([_duration(it) for it in store.items], dtype=np.float64)
        self.done, self.total = 0, total
        self._progress = progress

    def tick(self, n: int) -> None:
        self.done += n
        if self._progress is not None:
            self._progress(self.done, self.total)

    def index_lines(self, batch: _Batch, kind: str) -> str:
        return "".join(
            json_line(
                {
                    "path": self.paths[f],
                    "kind": kind,
                    "start": _none_if_nan(s),
                    "end": _none_if_nan(e),
                    "duration": _none_if_nan(self.durations[f]),
                }
            )
            for f, s, e in zip(batch.files.tolist(), batch.start.tolist(), batch.end.tolist(), strict=True)
        )


def _reserve(fh: Any, nbytes: int, path: Path) -> None:
    """Claim `nbytes` for the open file `fh` before anything is written, so a disk too small fails
    at once with ENOSPC. Without posix_fallocate (macOS), or on a file system that cannot reserve,
    the free space is compared instead."""
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fh.fileno(), 0, nbytes)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
    if shutil.disk_usage(path.parent).free < nbytes:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _write_npy_part(
    tmp: Path, rows: _Rows, batches: Iterator[_Batch], n: int, names: tuple[str, str]
) -> None:
    """One (N, dim) float32 .npy written batch by batch (never whole in memory) + its JSON lines.

    Plain writes into a reserved file, not a memory map: a memory map written past the free space
    kills the process with SIGBUS (no message, staging left behind), where a write raises ENOSPC."""
    npy, index = tmp / names[0], tmp / names[1]
    kind = "file" if names[0] == "vectors.npy" else "segment"
    dim = rows.store.dim
    dtype = np.dtype("<f4")
    with open(npy, "xb") as out, open(index, "x", encoding="utf-8") as fh:
        np.lib.format.write_array_header_1_0(
            out, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n, dim)}
        )
        _reserve(out, out.tell() + n * dim * dtype.itemsize, npy)
        written = 0
        for batch in batches:
            if batch.first != written:  # _rebatch yields rows in order; a gap would misplace them
                raise ExportError(f"{npy}: batch at row {batch.first} does not follow row {written}")
            out.write(np.ascontiguousarray(batch.vectors, dtype=dtype))  # its buffer, no copy
            fh.write(rows.index_lines(batch, kind))
            written += batch.vectors.shape[0]
            rows.tick(batch.vectors.shape[0])
        if written != n:
            raise ExportError(f"{npy}: {written} rows written, {n} expected")
        for f in (out, fh):
            f.flush()
            os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _write_npy(tmp: Path, rows: _Rows, view: SegmentSource | None, level: str, batch_rows: int) -> None:
    store = rows.store
    if level in ("file", "both"):
        _write_npy_part(tmp, rows, _file_batches(store, batch_rows), len(store), NPY_FILES[:2])
    if level in ("segment", "both") and view is not None:
        parts = _segment_batches(view, f"{store.path}: segments", batch_rows)
        _write_npy_part(tmp, rows, parts, len(view), NPY_FILES[2:])


def _write_json(tmp: Path, rows: _Rows, view: SegmentSource | None, level: str, batch_rows: int) -> None:
    store = rows.store
    model = model_id(store.manifest)
    targets = json_targets(rows.paths)
    with_segments = view is not None and level == "both"
    if with_segments:
        # Each file's segments, in segment order: file_index sorted stably, cut at each file's count.
        order = np.argsort(view.file_index, kind="stable")
        offsets = np.concatenate([[0], np.cumsum(np.bincount(view.file_index, minlength=len(store)))])
    root = os.path.realpath(tmp)
    made: set[Path] = set()
    for batch in _file_batches(store, batch_rows):
        for r, vec in zip(batch.files.tolist(), batch.vectors, strict=True):
            path = rows.paths[r]
            obj: dict[str, Any] = {
                "filename": os.path.basename(path),
                "path": path,
                "duration": _none_if_nan(rows.durations[r]),
                "model": model,
                "dim": store.dim,
                "embedding": vec.tolist(),
            }
            if with_segments:
                idx = order[offsets[r] : offsets[r + 1]]
                seg_vecs = np.asarray(view.take(idx), dtype=np.float32)
                obj["segments"] = [
                    {"start": float(view.start[i]), "end": float(view.end[i]), "embedding": v.tolist()}
                    for i, v in zip(idx.tolist(), seg_vecs, strict=True)
                ]
            target = tmp / targets[r]
            if target.parent not in made:
                target.parent.mkdir(parents=True, exist_ok=True)
                # Only folders made here, in a fresh temp folder: a link cannot be on the way, but check.
                if os.path.commonpath([root, os.path.realpath(target.parent)]) != root:
                    raise ExportError(f"{target}: resolves outside the export folder; refusing to write it")
                made.add(target.parent)
            _write_new_file(target, json_line(obj).encode("utf-8"))
            rows.tick(1)  # a file at a time: JSON files are slow to write


def _import_pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ExportError(
            f"--to parquet needs pyarrow, which is not installed: {PARQUET_EXTRA_HINT}"
        ) from exc
    return pa, pq


def _write_parquet(
    tmp_file: Path, rows: _Rows, view: SegmentSource | None, level: str, batch_rows: int, record: dict
) -> None:
    pa, pq = _import_pyarrow()
    store = rows.store
    dim = store.dim
    schema = pa.schema(
        [
            ("path", pa.string()),
            ("kind", pa.string()),
            ("start", pa.float64()),
            ("end", pa.float64()),
            ("duration", pa.float64()),
            ("vector", pa.list_(pa.float32(), dim)),
        ],
        metadata={
            b"model": (record["model"] or "").encode("utf-8"),
            b"dim": str(dim).encode(),
            PARQUET_META_KEY: json.dumps(record, sort_keys=True).encode("utf-8"),
        },
    )
    paths = [_utf8_text(p) for p in rows.paths]

    def table(batch: _Batch, kind: str) -> Any:
        n = batch.vectors.shape[0]
        return pa.Table.from_arrays(
            [
                pa.array([paths[f] for f in batch.files.tolist()], pa.string()),
                pa.array([kind] * n, pa.string()),
                pa.array(batch.start, pa.float64(), mask=np.isnan(batch.start)),
                pa.array(batch.end, pa.float64(), mask=np.isnan(batch.end)),
                pa.array(
                    rows.durations[batch.files], pa.float64(), mask=np.isnan(rows.durations[batch.files])
                ),
                pa.FixedSizeListArray.from_arrays(pa.array(batch.vectors.reshape(-1), pa.float32()), dim),
            ],
            schema=schema,
        )

    with pq.ParquetWriter(str(tmp_file), schema) as writer:
        if level in ("file", "both"):
            for batch in _file_batches(store, batch_rows):
                writer.write_table(table(batch, "file"), row_group_size=batch_rows)
                rows.tick(batch.vectors.shape[0])
        if level in ("segment", "both") and view is not None:
            for batch in _segment_batches(view, f"{store.path}: segments", batch_rows):
                writer.write_table(table(batch, "segment"), row_group_size=batch_rows)
                rows.tick(batch.vectors.shape[0])
    _fsync_file(tmp_file)


# ------------------------------------------------------------------------------ what OUT may replace
def export_record(path: Path) -> dict | None:
    """The record of a previous export at `path` (its marker, or its Parquet metadata); None when `path`
    is not an export of ours."""
    if path.is_symlink():
        return None
    if path.is_dir():
        marker = path / MARKER_NAME
        if marker.is_symlink() or not marker.is_file():
            return None
        try:
            rec = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
    elif path.is_file():
        try:
            with open(path, "rb") as fh:
                if fh.read(4) != b"PAR1":
                    return None
            _, pq = _import_pyarrow()
            meta = pq.read_schema(str(path)).metadata or {}
            rec = json.loads(meta[PARQUET_META_KEY].decode("utf-8"))
        except Exception:  # unreadable, not Parquet, no pyarrow, or not ours: never replaced
            return None
    else:
        return None
    return rec if isinstance(rec, dict) and rec.get("tool") == EXPORT_TOOL else None


def _foreign_entries(path: Path, fmt: str) -> list[str]:
    """Entries of an export folder that the export did not write (a user's files kept there)."""
    if fmt == "npy":
        return sorted(
            p.name for p in path.iterdir() if p.name not in NPY_FILES + (MARKER_NAME,) or p.is_symlink()
        )
    foreign = []
    for folder, dirs, files in os.walk(path):
        for name in dirs + files:
            p = Path(folder, name)
            if p.is_symlink() or (name in files and not name.endswith(".json")):
                foreign.append(str(p.relative_to(path)))
    return sorted(foreign)


def _check_replaceable(out: Path) -> None:
    """ExportError unless `out` is an empty folder or a whole previous export of ours."""
    if out.is_symlink():
        raise ExportError(f"{out}: is a symbolic link; refusing to replace it (give the real path)")
    if out.is_dir() and not any(out.iterdir()):
        return
    rec = export_record(out)
    if rec is None:
        raise ExportError(
            f"{out}: exists and is not an mlx-clap export (no {MARKER_NAME} or export metadata); "
            "not replacing it. Choose another OUT"
        )
    if out.is_dir():
        foreign = _foreign_entries(out, str(rec.get("format")))
        if foreign:
            raise ExportError(
                f"{out}: holds files the export did not write ({', '.join(foreign[:3])}); not replacing it"
            )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# This machine's name as it goes into staging names: a folder shared over the network may hold the
# staging of an export running on another machine, whose process id means nothing here.
_HOST = re.sub(r"[^A-Za-z0-9-]", "_", socket.gethostname())[:64] or "host"


def _staging_prefix(name: str, kind: str) -> str:
    """`.OUT.export-HOST-PID-` (or `.OUT.old-HOST-PID-`): the exporting machine and process in the name
    let a later export on the same machine tell the leftovers of a killed one from those of one still
    running."""
    return f".{name}.{kind}-{_HOST}-{os.getpid()}-"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # gone, or an id no process can have
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_staging(parent: Path, name: str) -> list[Path]:
    """Remove what killed exports to `parent / name` on this machine left beside it (temp folders and
    files named `_staging_prefix`, whose process is gone); returns what was removed. A running export's
    are kept, and so is any other machine's."""
    removed = []
    pattern = re.compile(rf"^\.{re.escape(name)}\.(export|old)-{re.escape(_HOST)}-(\d+)-")
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if m is None or _process_alive(int(m.group(2))):
            continue
        path = Path(entry.path)
        _remove(path)
        removed.append(path)
    return removed


def _make_staging(parent: Path, name: str, folder: bool) -> Path:
    """A temp folder (json, npy) or file (parquet) beside OUT, with the usual umask-based mode (mkdtemp
    and mkstemp make owner-only entries)."""
    remove_stale_staging(parent, name)
    prefix = _staging_prefix(name, "export")
    if folder:
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
        tmp.chmod(0o777 & ~current_umask())
        return tmp
    fd, tmp_name = tempfile.mkstemp(dir=parent, prefix=prefix, suffix=".tmp")
    os.fchmod(fd, 0o666 & ~current_umask())
    os.close(fd)
    return Path(tmp_name)  # ParquetWriter truncates and fills it (its mode is kept)


def _publish(tmp: Path, out: Path, replace: bool) -> None:
    """Rename the finished export into place. A replaced OUT is first moved aside (and put back if the
    swap fails), so OUT is always either the old export or the whole new one."""
    if replace and (out.exists() or out.is_symlink()):
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=_staging_prefix(out.name, "old"))) / "old"
        try:
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)
                raise
        finally:
            _remove(old.parent)
    elif tmp.is_dir():
        os.rename(tmp, out)  # fails on a non-empty folder made meanwhile
    else:
        try:
            os.link(tmp, out)  # fails if OUT appeared meanwhile, where a rename would clobber it
            tmp.unlink()
        except FileExistsError:
            raise
        except OSError:  # no hard links on this file system
            if out.exists():
                raise FileExistsError(errno.EEXIST, "created meanwhile", str(out)) from None
            os.replace(tmp, out)
    _fsync_path(out.parent)


# ---------------------------------------------------------------------------------------------- export
def resolve_level(fmt: str, level: str | None, has_segments: bool, store_path: Path | str) -> str:
    """The --level in force: the default is "both" for a store with segments, else "file"."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r} (one of {', '.join(FORMATS)})")
    if level is None:
        return "both" if has_segments else "file"
    if level not in LEVELS:
        raise ExportError(f"unknown level {level!r} (one of {', '.join(LEVELS)})")
    if level != "file" and not has_segments:
        raise ExportError(
            f"{store_path}: the store holds no segments (it was embedded without them); use --level file"
        )
    if fmt == "json" and level == "segment":
        raise ExportError("--to json writes one JSON per file (with its segments); use --level both or file")
    return level


def default_batch_rows(dim: int) -> int:
    """Rows per batch for vectors of `dim` float32s: about BATCH_BYTES, from 1024 to MAX_BATCH_ROWS."""
    return max(1024, min(MAX_BATCH_ROWS, BATCH_BYTES // (4 * max(1, dim))))


def export_store(
    store: Any,
    out: str | Path,
    fmt: str,
    level: str | None = None,
    overwrite: bool = False,
    batch_rows: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ExportSummary:
    """Export an open Store's vectors to `out` as `fmt` ("json", "parquet" or "npy").

    `level` picks file rows, segment rows or both (default: both when the store has segments, else
    file). `batch_rows` rows are read and written at a time (default: about 32 MiB of vectors, see
    BATCH_BYTES). `progress(done, total)` is called with the vectors written so far
    (first with done = 0). Raises ExportError (OUT exists and may
    not be replaced, unwritable parent, no pyarrow, a store without segments asked for segments, ...);
    a failure or KeyboardInterrupt leaves OUT as it was.
    """
    t0 = time.perf_counter()
    out = Path(out)
    has_segments = bool(getattr(store, "has_segments", False))
    level = resolve_level(fmt, level, has_segments, store.path)
    if batch_rows is None:
        batch_rows = default_batch_rows(int(store.dim))
    if not isinstance(batch_rows, int) or batch_rows < 1:
        raise ExportError(f"batch_rows must be a positive integer (got {batch_rows!r})")
    if fmt == "parquet":
        _import_pyarrow()  # before any file is made
    view = store.segment_view() if has_segments and level != "file" else None
    if view is not None:
        _check_view(store, view)
    real_out = os.path.realpath(out)
    # A store on an object store (its path a URI) has no local folder an OUT could fall into.
    real_store = (
        os.path.realpath(store.path) if isinstance(store.path, Path) or "://" not in str(store.path) else None
    )
    if real_store is not None and os.path.commonpath([real_out, real_store]) in (real_out, real_store):
        raise ExportError(
            f"{out}: is the store folder, inside it or above it; choose an OUT outside {store.path}"
        )
    exists = out.exists() or out.is_symlink()
    if exists and not overwrite:
        raise ExportError(
            f"{out}: exists already; use --overwrite to replace a previous export, or another OUT"
        )
    if exists:
        _check_replaceable(out)
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"{parent}: cannot create the folder for {out.name}: {write_failure(exc)}") from exc

    files = len(store) if level in ("file", "both") or fmt == "json" else 0
    segments = len(view) if view is not None and level in ("segment", "both") else 0
    record = {
        "tool": EXPORT_TOOL,
        "export_format_version": EXPORT_FORMAT_VERSION,
        "format": fmt,
        "level": level,
        "model": model_id(store.manifest),
        "weights_sha256": store.manifest.get("weights_sha256"),
        "dim": int(store.dim),
        "files": files,
        "segments": segments,
        "segment_settings": getattr(store, "segment_settings", None) if segments else None,
        "store": str(store.path),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    rows = _Rows(store, files + segments, progress)
    tmp: Path | None = None
    try:
        tmp = _make_staging(parent, out.name, folder=fmt != "parquet")
        rows.tick(0)
        if fmt == "parquet":
            _write_parquet(tmp, rows, view, level, batch_rows, record)
        else:
            if fmt == "npy":
                _write_npy(tmp, rows, view, level, batch_rows)
            else:
                _write_json(tmp, rows, view, level, batch_rows)
            _write_new_file(tmp / MARKER_NAME, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
            _fsync_path(tmp)
        _publish(tmp, out, replace=exists)
    except OSError as exc:
        if tmp is None:
            raise ExportError(
                f"{parent}: cannot write there: {write_failure(exc)}; choose another OUT"
            ) from exc
        _remove(tmp)
        if isinstance(exc, FileExistsError):
            raise ExportError(
                f"{out}: was created by another process during the export; nothing written"
            ) from exc
        raise ExportError(
            f"{out}: cannot write the export: {write_failure(exc)}; nothing was written"
        ) from exc
    except BaseException:
        if tmp is not None:
            _remove(tmp)
        raise
    return ExportSummary(
        format=fmt,
        out=str(out),
        level=level,
        rows=files + segments,
        files=files,
        segments=segments,
        dim=int(store.dim),
        model=record["model"],
        seconds=round(time.perf_counter() - t0, 3),
    )
