"""Test data: a store of format 1 or 2 (the .npy layout `mlx_clap.store.legacy` reads), written directly.

The rows are given as they lie on disk (physical rows: a path may appear twice, the later row wins), so a
test can build what that format's writer left: superseded rows, shared segment ranges, a compacted
generation, checksum sidecars.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np

from mlx_clap.io.files import json_line


def _table(folder: Path, records: list[dict], vectors: np.ndarray, dtype: str, shard_size: int) -> None:
    (folder / "shards").mkdir(parents=True, exist_ok=True)
    (folder / "checksums").mkdir(exist_ok=True)
    (folder / "items.jsonl").write_text("".join(json_line(r) for r in records), encoding="utf-8")
    arr = np.asarray(vectors, dtype=dtype)
    for index, first in enumerate(range(0, arr.shape[0], shard_size)):
        block = np.ascontiguousarray(arr[first : first + shard_size])
        np.save(folder / "shards" / f"emb-{index:05d}.npy", block)
        crcs = [zlib.crc32(block[r].tobytes()) for r in range(block.shape[0])]
        (folder / "checksums" / f"emb-{index:05d}.sum.json").write_text(json.dumps({"crc32": crcs}))


def write_legacy_store(
    path: Path,
    manifest: dict,
    items: list[dict],
    vectors: np.ndarray,
    *,
    dtype: str = "float32",
    shard_size: int = 4,
    segments: dict | None = None,
    seg_rows: list[dict] | None = None,
    seg_vectors: np.ndarray | None = None,
    generation: int = 0,
    format_version: int | None = 2,
) -> Path:
    """Write a format-1/2 store at `path`: `items` (physical file rows, "seg": [first, count] into
    `seg_rows`) and their `vectors`; `segments` the {"hop", "window"} settings when it has a segment
    table. `format_version=None` writes a format-1 manifest (no format_version, no generation)."""
    path.mkdir(parents=True, exist_ok=True)
    layout: dict = {"dim": int(vectors.shape[1]), "dtype": dtype, "shard_size": shard_size}
    if format_version is not None:
        layout.update(format_version=format_version, generation=generation)
    if segments is not None:
        layout["segments"] = segments
    data = path / f"data-{generation}" if generation else path
    _table(data, items, vectors, dtype, shard_size)
    if segments is not None:
        seg_vectors = np.zeros((0, vectors.shape[1])) if seg_vectors is None else seg_vectors
        _table(data / "segments", seg_rows or [], seg_vectors, dtype, shard_size)
    (path / "manifest.json").write_text(json.dumps({**manifest, "store": layout}))
    return path
