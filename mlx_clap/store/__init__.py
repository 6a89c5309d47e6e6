"""The embedding store: one Lance dataset per store, opened by folder or URI (`s3://bucket/prefix`).

The table is the product: file rows and segment rows with path, sha256, size, mtime, duration, kind,
start, end and a fixed-size vector column, and the pipeline that made them (model weights, settings,
dtype, segments) as JSON under the schema metadata key "mlx_clap". Any Lance reader opens it without
mlx-clap: `lance.dataset(uri).to_table()` (pyarrow), DuckDB over that dataset, Polars'
`scan_pyarrow_dataset`, LanceDB. This package adds the behaviour: one writer, atomic sync commits,
identity checks, compaction, check/repair, and the conversion of the older .npy format.

    store = Store.open("vectors.lance")                 # a reader: a pinned snapshot
    store.items, store.matrix(), store.segment_view()
    with Store.for_run(out, manifest, dim=512) as w:     # a writer
        w.write(items, vectors, segments)                # one commit per call
        w.commit([write_rows(w.target(), items, vectors)], remove=gone)   # worker / driver split
        w.compact()
"""

from mlx_clap.store.check import check_store, repair_store
from mlx_clap.store.dataset import DEFAULT_RETENTION, LegacyStoreError, SegmentView, Store
from mlx_clap.store.errors import StaleSnapshotError, StoreBusyError, StoreError, UnknownPathError
from mlx_clap.store.location import ERRORS_NAME, WARNINGS_NAME, Location, is_remote, locate, s3_options
from mlx_clap.store.migrate import is_legacy, migrate_store
from mlx_clap.store.schema import FILE, METADATA_KEY, SEGMENT, STORE_DTYPES, STORE_FORMAT, identity_diff
from mlx_clap.store.write import RowsTarget, WrittenRows, write_rows

__all__ = [
    "DEFAULT_RETENTION",
    "ERRORS_NAME",
    "FILE",
    "METADATA_KEY",
    "SEGMENT",
    "STORE_DTYPES",
    "STORE_FORMAT",
    "WARNINGS_NAME",
    "LegacyStoreError",
    "Location",
    "RowsTarget",
    "SegmentView",
    "StaleSnapshotError",
    "Store",
    "StoreBusyError",
    "StoreError",
    "UnknownPathError",
    "WrittenRows",
    "check_store",
    "identity_diff",
    "is_legacy",
    "is_remote",
    "locate",
    "migrate_store",
    "repair_store",
    "s3_options",
    "write_rows",
]
