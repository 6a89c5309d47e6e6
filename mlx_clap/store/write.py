"""Writing rows in two steps, so a worker and the driver share one code path.

`write_rows(target, items, vectors, segments)` turns embedded files into Lance data files under the
store (nothing is visible yet) and returns a small, picklable `WrittenRows`; `Store.commit(written)`
on the single writer makes them visible in one atomic version, replacing the rows those paths had.
A single-process run calls both (`Store.write`); a Ray job calls `write_rows` in its actors (as
`map_batches` would) and `commit` on the driver. A writer killed between the two leaves data files no
version names: invisible, and removed by the next compaction.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mlx_clap.store.errors import StoreError, lance_failure
from mlx_clap.store.location import Location
from mlx_clap.store.schema import FILE, key_path, keys_of, rows_table

# Rows per Lance row group: small groups keep random takes cheap (serve reads single vectors).
ROWS_PER_GROUP = 1024


@dataclass(frozen=True)
class RowsTarget:
    """What a worker needs to write rows for a store: where it is and its schema (picklable)."""

    location: Location
    schema: pa.Schema
    has_segments: bool


@dataclass(frozen=True)
class WrittenRows:
    """Data files written for a store but not committed: Lance fragment metadata (JSON) and the paths
    of the file rows they hold (their old rows are dropped by the commit that adds these)."""

    fragments: tuple[str, ...]
    paths: tuple[str, ...]
    rows: int

    def fragment_metadata(self) -> list:
        from lance.fragment import FragmentMetadata

        return [FragmentMetadata.from_json(f) for f in self.fragments]


def write_rows(
    target: RowsTarget,
    items: Sequence[dict],
    vectors: np.ndarray,
    segments: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray] | None] | None = None,
) -> WrittenRows:
    """Write file rows (and their segment rows) as data files of the store at `target`, uncommitted.

    `items`: dicts with path, size, mtime and optionally sha256, duration, channels, source_rate,
    warnings; `vectors`: (len(items), dim); `segments`: per item None or (starts, ends, vectors) of its
    windows. StoreError naming the store (bad input, a failed write: full disk, no permission)."""
    where = str(target.location)
    if segments is not None and not target.has_segments and any(s is not None for s in segments):
        raise StoreError(f"{where}: this store was made without segments; cannot add window vectors")
    table = rows_table(items, vectors, segments, target.schema, where)
    return write_table(target, table)


def write_table(target: RowsTarget, table: pa.Table) -> WrittenRows:
    """Write an Arrow table of store rows (rows_table's layout) as uncommitted data files."""
    import lance

    if table.num_rows == 0:
        return WrittenRows((), (), 0)
    try:
        frags = lance.fragment.write_fragments(
            table,
            target.location.uri,
            schema=target.schema,
            max_rows_per_group=ROWS_PER_GROUP,
            storage_options=target.location.storage_options,
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise StoreError(f"{target.location}: cannot write the store: {lance_failure(exc)}") from exc
    files = table.filter(pc.equal(table.column("kind"), FILE))
    paths = tuple(key_path(k) for k in keys_of(files))
    return WrittenRows(tuple(json.dumps(f.to_json()) for f in frags), paths, table.num_rows)
