"""The public entry of the library: sync folders into a store, search a store.

    from mlx_clap import load
    from mlx_clap.sync import sync, search
    model = load("laion/clap-htsat-unfused")
    report = sync(["music/"], "vectors.lance", model=model, segments=True)   # or "s3://bucket/prefix"
    report.embedded, report.failed, report.errors
    hits = search(Store.open("vectors.lance"), text="a dog barking", model=model, k=10)

`sync` is what `mlx-clap embed PATHS --out STORE` does (the command parses options and prints): the
store mirrors the files and folders given (see mlx_clap.sync.plan), failures are recorded in the store's
errors.jsonl and the run goes on, files decoded in part are listed in warnings.jsonl. `SyncJob` is the
same run in steps, for a caller that reports between them or runs the embedding on another engine.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_clap.preprocess.decode_ahead import InputFile
from mlx_clap.search.roots import record_roots
from mlx_clap.store import ERRORS_NAME, WARNINGS_NAME, StoreError, is_remote
from mlx_clap.sync.inputs import Inputs, collect_inputs
from mlx_clap.sync.manifest import build_manifest, pipeline_settings, segment_settings
from mlx_clap.sync.plan import StoreSink, SyncPlan, mirror, plan_sync
from mlx_clap.sync.records import (
    current_errors,
    json_warnings,
    new_failures,
    read_error_log,
    rewrite_error_log,
    store_warnings,
)
from mlx_clap.sync.run import EmbedBatch, EmbedRun, Progress, Sink

LONG_AUDIO_MODES = ("windows-mean", "head", "center", "fusion", "reference")


class SyncError(ValueError):
    """A sync that cannot run as asked: settings the model or the store refuses, or nothing to embed."""


class SegmentsKeptError(SyncError):
    """The store keeps segment rows, which need long_audio 'windows-mean' (the file vector is their mean)."""


class LibraryFoldersError(StoreError):
    """The library folders (what `serve` may play) cannot be recorded in the store's manifest."""


class SyncInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sync: what was committed is kept (rerun to resume); `report` says what was done."""

    def __init__(self, report: SyncReport):
        super().__init__("interrupted")
        self.report = report


@dataclass
class SyncReport:
    """What a sync did. `summary` is the dict `mlx-clap embed --summary-json` prints; the attributes name
    its main entries. `errors`: the failure records errors.jsonl holds now (this run's and earlier ones
    that stand); `problems`: messages about the logs themselves (one could not be rewritten)."""

    summary: dict[str, Any]
    errors: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    interrupted: bool = False

    def __getattr__(self, name: str) -> Any:
        summary = self.__dict__.get("summary") or {}
        if name in summary:
            return summary[name]
        raise AttributeError(name)


def side_path(out: str | os.PathLike, name: str) -> str:
    """How a file beside the store is named to the user: under `out` as given (a folder or a URI)."""
    text = os.fspath(out)
    return f"{text.rstrip('/')}/{name}" if is_remote(text) else os.path.join(text, name)


Engine = Callable[["SyncJob", EmbedRun, list[InputFile]], None]


class SyncJob:
    """One sync of `inputs` into the store at `out` with a loaded `model`, in steps: the constructor
    checks the settings, opens the store for writing (created when missing) and records the library
    folders; `make_plan()` decides what to skip, reuse and embed; `run()` embeds, prunes, compacts and
    rewrites the logs. `close()` (or a with-block) releases the store.

    Raises SyncError for settings the model or the store refuses, StoreBusyError when another writer
    holds the store, StoreError when it cannot be opened, created or written (the store and the cause)."""

    def __init__(
        self,
        inputs: Inputs,
        out: str | os.PathLike,
        model: Any,
        *,
        model_id: str | None = None,
        long_audio: str = "windows-mean",
        seed: int | None = None,
        quantize_int16: bool = False,
        compute_dtype: str = "float32",
        store_dtype: str = "float16",
        overwrite: bool = False,
        segments: bool = False,
        hop: float = 2.0,
        no_prune: bool = False,
        prune_missing: bool = False,
        batch_size: int = 8,
        workers: int = 1,
    ):
        model_id = model_id or str(getattr(model, "source_dir", None) or model.config.source)
        if long_audio not in LONG_AUDIO_MODES:
            raise SyncError(f"long_audio must be one of {', '.join(LONG_AUDIO_MODES)} (got {long_audio!r})")
        if long_audio == "fusion" and model.config.feature_config.truncation != "fusion":
            raise SyncError("long_audio 'fusion' needs a fused model (e.g. laion/clap-htsat-fused)")
        if segments and long_audio != "windows-mean":
            raise SyncError("segments need long_audio 'windows-mean' (the file vector is their mean)")
        if segments and not hasattr(model, "embed_segments"):
            raise SyncError(f"segments are not supported for the model {model_id!r}")
        if prune_missing and no_prune:
            raise SyncError("prune_missing and no_prune ask for opposite things: choose one")
        self.inputs = inputs
        self.out = out
        self.model = model
        self.model_id = model_id
        self.overwrite = overwrite
        self.no_prune = no_prune
        self.prune_missing = prune_missing
        self.batch_size = batch_size
        self.workers = workers
        self.settings = pipeline_settings(model, long_audio, seed, quantize_int16, compute_dtype)
        self.manifest = build_manifest(model, model_id, self.settings, store_dtype)
        self.meta = {
            "model": model_id,
            "weights_sha256": self.manifest["weights_sha256"],
            "settings": self.settings,
        }
        seg = segment_settings(model, hop) if segments else None
        self.sink = StoreSink(out, self.manifest, model.embedding_dim, store_dtype, overwrite, seg)
        try:
            if self.sink.segments and long_audio != "windows-mean":
                raise SegmentsKeptError(f"{out} keeps segments: it needs long_audio 'windows-mean'")
            try:  # the folders `serve` may play files from (mlx_clap.search.roots), before any row is written
                record_roots(self.sink.store, inputs.paths)
            except (OSError, StoreError) as exc:
                raise LibraryFoldersError(f"{out}: cannot record the library folders ({exc})") from exc
        except BaseException:
            self.sink.close()
            raise
        self.plan: SyncPlan | None = None
        self.old_errors: list[dict] = []

    @property
    def store(self) -> Any:
        """The store being written (mlx_clap.store.Store, held for writing)."""
        return self.sink.store

    def __enter__(self) -> SyncJob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sink.close()

    def make_plan(self) -> SyncPlan:
        """Skip unchanged files, hash the others (reuse stored content, embed the rest); read the error
        log as it stands (to tell new failures from known ones)."""
        self.plan = plan_sync(self.sink, self.inputs.files, self.workers)
        self.old_errors = [r for r in self.store.errors() if "path" in r]
        return self.plan

    def commit_batch(self, run: EmbedRun, batch: EmbedBatch) -> None:
        """The driver's side of another engine: commit the rows a worker wrote (`embed_files`) and take
        over its records into `run`, as if `run` had embedded those files itself."""
        self.sink.commit(batch.written)
        for rec in batch.failures:
            run.fail(str(rec["path"]), str(rec["error"]))
        run.warnings.extend(batch.warnings)
        run.embedded_paths.update(batch.embedded_paths)
        run.embedded += batch.embedded
        run.audio_seconds += batch.audio_seconds

    def run(self, progress: Progress | None = None, engine: Engine | None = None) -> SyncReport:
        """Embed the plan's files (with `engine(job, run, files)` instead of `run.run(files)` when given),
        make the store mirror the inputs, compact it and rewrite errors.jsonl / warnings.jsonl. A failing
        file is recorded and the run goes on; a store that cannot be written raises StoreError or
        OSError (what was committed is kept). Ctrl-C raises SyncInterrupted with the report."""
        plan = self.plan if self.plan is not None else self.make_plan()
        inputs = self.inputs
        run = EmbedRun(
            self.model, self.sink, self.settings, self.batch_size, self.workers, progress, self.meta
        )
        run.planned = plan.planned
        run.segments = self.sink.segments
        for path, cause in inputs.missing:
            run.fail(path, cause, echo=False)  # the caller knows them before the run (Inputs.missing)
        run.progress.planned(len(plan.skipped), len(plan.todo))
        interrupted = False
        counts = {"reused": 0, "removed": 0, "moved": 0, "missing": 0}
        try:
            if plan.reused:
                self.sink.reuse(plan.reused)
                counts["reused"] = len(plan.reused)
            if engine is None:
                run.run(plan.todo)
            else:
                engine(self, run, plan.todo)
            failed = {str(r["path"]) for r in run.failures}
            counts.update(
                mirror(
                    self.sink,
                    inputs.paths,
                    inputs.recursive,
                    inputs.files,
                    failed,
                    self.no_prune,
                    self.prune_missing,
                    plan.reused,
                )
            )
        except KeyboardInterrupt:
            interrupted = True
        report = self._report(run, plan, counts)
        report.interrupted = interrupted
        if interrupted:
            raise SyncInterrupted(report)
        return report

    def _report(self, run: EmbedRun, plan: SyncPlan, counts: dict) -> SyncReport:
        inputs = self.inputs
        problems: list[str] = []
        # Excluded files are no longer tried, so their earlier failures stand no more.
        succeeded = run.embedded_paths | plan.skipped | set(inputs.excluded)
        succeeded |= {str(it["path"]) for it in self.store.items}
        records = current_errors(self.old_errors, run.failures, succeeded)
        errors_file = side_path(self.out, ERRORS_NAME)
        try:
            self.store.rewrite_errors(records)
        except (OSError, StoreError) as exc:
            problems.append(f"cannot rewrite {errors_file} ({exc})")
            errors_file = None
        warnings_file = side_path(self.out, WARNINGS_NAME)
        warnings = store_warnings(self.store.items)
        try:
            self.store.rewrite_warnings(warnings)
        except (OSError, StoreError) as exc:
            problems.append(f"cannot rewrite {warnings_file} ({exc})")
            warnings_file = None
        summary = run.summary(
            len(inputs.files) + len(inputs.missing), len(plan.skipped), os.fspath(self.out), "store"
        )
        summary.update(counts)
        # After an overwrite there is no previous run to compare with: every failure is new.
        fresh = new_failures(run.failures, [] if self.overwrite else self.old_errors)
        summary["new_failures"] = len(fresh)
        summary["errors_file"] = errors_file if records else None
        summary["warnings_file"] = warnings_file if warnings else None
        summary["not_considered"] = inputs.ignored
        return SyncReport(summary, records, problems)


def sync(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    model: Any,
    model_id: str | None = None,
    recursive: bool = True,
    excludes: Sequence[str] = (),
    segments: bool = False,
    hop: float = 2.0,
    long_audio: str = "windows-mean",
    seed: int | None = None,
    quantize_int16: bool = False,
    compute_dtype: str = "float32",
    store_dtype: str = "float16",
    overwrite: bool = False,
    no_prune: bool = False,
    prune_missing: bool = False,
    batch_size: int = 8,
    workers: int = 2,
    progress: Progress | None = None,
) -> SyncReport:
    """Make the store at `out` (a folder or `s3://bucket/prefix`) mirror the audio files under `paths`,
    embedded with the loaded `model` (`mlx_clap.load(...)`; `model_id` is how the store names it, by
    default its folder; `compute_dtype` the dtype it was loaded with, as the store records it). Folders
    are walked recursively unless `recursive=False`. Returns a SyncReport
    (`embedded`, `reused`, `removed`, `skipped`, `failed`, `failures`, `errors`, `warnings`); failures
    are recorded, never raised. Raises SyncError when `paths` hold no audio file (`Inputs.missing`
    says why) or the settings are refused, StoreBusyError / StoreError when the store cannot be
    written, SyncInterrupted on Ctrl-C."""
    inputs = collect_inputs(paths, recursive, excludes)
    if not inputs.files:
        causes = [f"{p}: {c}" for p, c in inputs.missing] or [
            "no audio files found in " + ", ".join(inputs.paths)
        ]
        raise SyncError("nothing to embed: " + "; ".join(causes))
    with SyncJob(
        inputs,
        out,
        model,
        model_id=model_id,
        long_audio=long_audio,
        seed=seed,
        quantize_int16=quantize_int16,
        compute_dtype=compute_dtype,
        store_dtype=store_dtype,
        overwrite=overwrite,
        segments=segments,
        hop=hop,
        no_prune=no_prune,
        prune_missing=prune_missing,
        batch_size=batch_size,
        workers=workers,
    ) as job:
        return job.run(progress)


def embed_into(
    sink: Sink,
    inputs: Inputs,
    model: Any,
    settings: dict,
    meta: dict,
    *,
    is_done: Callable[[InputFile, tuple], bool] | None = None,
    log_dir: Path | None = None,
    out: str | None = None,
    fmt: str = "json",
    overwrite: bool = False,
    batch_size: int = 8,
    workers: int = 1,
    progress: Progress | None = None,
) -> SyncReport:
    """Embed `inputs` into an output other than a store (the CLI's one JSON per file, or JSON lines):
    `sink` takes the rows, `is_done(file, stat key)` says which files it holds already (skipped), and
    with `log_dir` the failures and warnings that stand are kept in its errors.jsonl / warnings.jsonl.
    Nothing is pruned. Returns a SyncReport as `sync` does (`summary["format"]` = `fmt`); Ctrl-C raises
    SyncInterrupted with it; an output that cannot be written raises OSError."""
    from mlx_clap.preprocess.decode_ahead import stat_key

    todo: list[InputFile] = []
    for f in inputs.files:
        try:
            key = stat_key(f.path)
        except OSError:
            todo.append(f)  # the decoder reports the cause
            continue
        if is_done is None or not is_done(f, key):
            todo.append(f)
    skipped = len(inputs.files) - len(todo)
    error_log = log_dir / ERRORS_NAME if log_dir is not None else None
    old_errors = read_error_log(error_log) if error_log is not None else []
    run = EmbedRun(model, sink, settings, batch_size, workers, progress, meta)
    for path, cause in inputs.missing:
        run.fail(path, cause, echo=False)  # the caller knows them before the run (Inputs.missing)
    run.progress.planned(skipped, len(todo))
    interrupted = False
    try:
        run.run(todo)
    except KeyboardInterrupt:
        interrupted = True
    problems: list[str] = []
    records: list[dict] = []
    errors_file = warnings_file = None
    if log_dir is not None and error_log is not None:
        # Excluded files are no longer tried, so their earlier failures stand no more.
        skipped_paths = {str(f.path) for f in inputs.files} - {str(f.path) for f in todo}
        succeeded = run.embedded_paths | skipped_paths | set(inputs.excluded)
        records = current_errors(old_errors, run.failures, succeeded)
        try:
            rewrite_error_log(error_log, records)
            errors_file = str(error_log) if records else None
        except OSError as exc:
            problems.append(f"cannot rewrite {error_log} ({exc})")
        warnings_path = log_dir / WARNINGS_NAME
        warned = json_warnings(warnings_path, run.embedded_paths, run.warnings)
        try:
            rewrite_error_log(warnings_path, warned)
            warnings_file = str(warnings_path) if warned else None
        except OSError as exc:
            problems.append(f"cannot rewrite {warnings_path} ({exc})")
    summary = run.summary(len(inputs.files) + len(inputs.missing), skipped, out, fmt)
    summary.update({"reused": 0, "removed": 0, "moved": 0, "missing": 0})
    # After an overwrite there is no previous run to compare with: every failure is new.
    summary["new_failures"] = len(new_failures(run.failures, [] if overwrite else old_errors))
    summary["errors_file"] = errors_file
    summary["warnings_file"] = warnings_file
    summary["not_considered"] = inputs.ignored
    report = SyncReport(summary, records, problems, interrupted)
    if interrupted:
        raise SyncInterrupted(report)
    return report


def search(
    store: Any,
    *,
    text: str | None = None,
    audio: str | os.PathLike | None = None,
    vector: Any = None,
    k: int = 10,
    model: Any = None,
    backend: str = "auto",
) -> list[dict[str, Any]]:
    """The `k` rows of `store` (mlx_clap.store.Store.open(path or URI)) most similar to one query: a
    text or an audio file (embedded with `model`, which must be the store's) or a vector. Returns
    [{"row", "path", "score"}] best first (cosine). Uses the store's vector index when one covers it
    (`backend="auto"`, mlx_clap.search.lance_index.open_index), else an exact scan."""
    import numpy as np

    from mlx_clap.search.index import SearchError
    from mlx_clap.search.lance_index import open_index

    given = [q for q in (text, audio, vector) if q is not None]
    if len(given) != 1:
        raise SearchError("give exactly one of text=, audio= or vector=")
    if vector is None and model is None:
        raise SearchError("a text or audio query needs the store's model (model=)")
    if text is not None:
        query = model.embed_text([text])
    elif audio is not None:
        query = model.embed_audio([os.fspath(audio)])
    else:
        query = np.asarray(vector, dtype=np.float32)
    index = open_index(store, backend)
    result = index.search(np.asarray(query, dtype=np.float32).reshape(1, -1), k)
    return [hit.to_dict() for hit in result.hits(store.items)]
