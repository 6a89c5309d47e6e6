"""The library behind `mlx-clap embed`: sync folders of audio into a store, and search it, from Python.

    from mlx_clap import load
    from mlx_clap.store import Store
    from mlx_clap.sync import search, sync

    model = load("laion/clap-htsat-unfused")
    report = sync(["music/"], "vectors.lance", model=model)    # or "s3://bucket/prefix"
    report.embedded, report.failed, report.errors
    search(Store.open("vectors.lance"), text="a dog barking", model=model, k=10)

Modules: `inputs` (the files under the PATH arguments), `plan` (what to skip, reuse, embed and remove
against the store), `run` (decode + embed + write through a sink: the per-file code every engine runs;
`embed_files` is a worker's entry point), `records` (errors.jsonl / warnings.jsonl), `manifest` (the
pipeline identity), `api` (`sync`, `SyncJob`, `search`). Names are imported on first use, so that a
command using one part does not pay for the others (Lance, the model).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "sync": "api",
    "search": "api",
    "SyncJob": "api",
    "SyncReport": "api",
    "SyncError": "api",
    "SyncInterrupted": "api",
    "Inputs": "inputs",
    "collect_inputs": "inputs",
    "EmbedRun": "run",
    "EmbedBatch": "run",
    "FragmentSink": "run",
    "Progress": "run",
    "embed_files": "run",
    "StoreSink": "plan",
    "SyncPlan": "plan",
    "pipeline_settings": "manifest",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{module}"), name)
