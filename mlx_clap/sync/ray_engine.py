"""`embed --engine ray`: the same sync, with decode + embed spread over a Ray Data actor pool.

The driver plans as a single-process run does (stat + sha256 against the store) and hands the files to
embed to `Dataset.map_batches` with `EmbedActor`, a callable class that loads the model once per actor.
Each call embeds a few files with the single-process per-file code (`embed_files`) and writes their rows
as Lance data files (`mlx_clap.store.write_rows`), uncommitted; it returns the fragment metadata with
the failures and warnings. The driver commits what comes back in chunks (`Store.commit`), so a killed
job resumes from what was committed, and the rest of the run (prune, compaction, errors.jsonl) is the
single-process one. Ray owns scheduling, retries of a killed actor and placement; we never track workers.

Ray's own Lance sink (`Dataset.write_lance`, Ray 2.60) does not run with pylance 14
(`write_fragments() got an unexpected keyword argument 'storage_options_provider'`) and commits once at
the end; our `write_rows` + `Store.commit` split does both jobs. Only this module imports ray (the
optional extra `mlx-clap[ray]`).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlx_clap.extras import install_hint
from mlx_clap.preprocess.decode_ahead import InputFile, ObjectPath, stat_key
from mlx_clap.store import RowsTarget, Store, StoreError, WrittenRows, is_remote
from mlx_clap.sync.inputs import estimate_seconds

# A Ray task is this many model batches of files: small enough that a killed actor redoes little and
# the pool stays balanced, large enough that data files and commits stay few.
BATCHES_PER_TASK = 2
# The driver commits when this many files came back, or this many seconds passed since its last commit
# (what a killed driver loses at most).
COMMIT_FILES = 256
COMMIT_SECONDS = 30.0
# The object-store settings of the driver's environment (mlx_clap.store.location reads them), handed to
# the workers so that they write where the driver commits; a node's own role or profile serves too.
FORWARDED_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the pool runs: `address` None starts a local Ray instance (else joins a
    cluster: 'auto', 'ray://host:10001' or 'host:6379'); `workers` actors, each one model copy with
    `gpus_per_worker` GPUs and `cpus_per_worker` CPUs; `decode_threads` decoder threads per actor."""

    address: str | None = None
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    decode_threads: int = 2
    files_per_task: int | None = None  # default: BATCHES_PER_TASK model batches
    commit_files: int = COMMIT_FILES
    commit_seconds: float = COMMIT_SECONDS
    ray_logs: bool = False  # Ray Data's own logs and progress bars (they would cut into the caller's bar)


@dataclass(frozen=True)
class WorkerSpec:
    """What an actor needs to embed and write like the driver would (picklable)."""

    model_id: str
    dtype: str
    trust_pickle: bool
    settings: dict
    segments: dict | None
    batch_size: int
    decode_threads: int
    target: RowsTarget


@dataclass
class RayTotals:
    """What the pool did, summed over the committed batches (failures as they came back)."""

    embedded: int = 0
    embedded_paths: set[str] = field(default_factory=set)
    audio_seconds: float = 0.0
    failures: list[dict] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)
    commits: int = 0


def _embed_files(model: Any, files: list[InputFile], spec: WorkerSpec, planned: dict) -> dict:
    """Embed `files` with the single-process code and write their rows, uncommitted; a JSON-able dict."""
    from mlx_clap.sync.run import embed_files

    batch = embed_files(
        model,
        files,
        spec.target,
        spec.settings,
        planned=planned,
        segments=spec.segments,
        batch_size=spec.batch_size,
        workers=spec.decode_threads,
    )
    return {
        "written": [
            {"fragments": list(w.fragments), "paths": list(w.paths), "rows": w.rows} for w in batch.written
        ],
        "failures": batch.failures,
        "warnings": batch.warnings,
        "embedded_paths": list(batch.embedded_paths),
        "audio_seconds": float(batch.audio_seconds),
    }


class EmbedActor:
    """The map_batches callable: one model per actor; each call embeds a batch of planned files.

    MLX streams belong to the thread that made them and Ray Data may call the actor from another thread
    than the one that built it, so the model lives on one daemon thread of the actor's own, with its own
    stream (a daemon: a thread that ran an `mx.compile`d function aborts the process when it ends)."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.calls: queue.Queue = queue.Queue()
        threading.Thread(target=self._work, name="mlx-clap-ray", daemon=True).start()
        self._call(lambda model: None).result()  # the model is loaded (or its error raised) before any batch

    def _work(self) -> None:
        import mlx.core as mx

        from mlx_clap.loading import load

        with mx.stream(mx.new_stream(mx.default_device())):
            try:
                model = load(self.spec.model_id, dtype=self.spec.dtype, trust_pickle=self.spec.trust_pickle)
            except BaseException as exc:  # every call, the first one in __init__ included, raises it
                model, failure = None, exc
            while True:
                fn, future = self.calls.get()
                if not future.set_running_or_notify_cancel():
                    continue
                if model is None:
                    future.set_exception(failure)
                    continue
                try:
                    future.set_result(fn(model))
                except BaseException as exc:  # re-raised in the caller by Future.result()
                    future.set_exception(exc)

    def _call(self, fn: Callable) -> Future:
        future: Future = Future()
        self.calls.put((fn, future))
        return future

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[str]]:
        files, planned = [], {}
        for path, rel, size, mtime, sha in zip(
            batch["path"], batch["rel"], batch["size"], batch["mtime"], batch["sha256"], strict=True
        ):
            # An object (s3://...) keeps the size and mtime of the driver's listing: its stat key.
            where = (
                ObjectPath(str(path), int(size), float(mtime)) if is_remote(str(path)) else Path(str(path))
            )
            files.append(InputFile(where, Path(str(rel))))
            if sha:
                planned[str(path)] = ((str(path), int(size), float(mtime)), str(sha))
        done = self._call(lambda model: _embed_files(model, files, self.spec, planned)).result()
        return {"result": [json.dumps(done)]}


def plan_rows(files: Iterable[InputFile], planned: dict[str, tuple[tuple, str]]) -> list[dict]:
    """The dataset the pool maps: one row per file, with the stat key and sha256 the driver hashed."""
    rows = []
    for f in files:
        listed = stat_key(f.path) if isinstance(f.path, ObjectPath) else (str(f.path), -1, 0.0)
        key, sha = planned.get(str(f.path), (listed, ""))
        rows.append({"path": str(f.path), "rel": str(f.rel), "size": key[1], "mtime": key[2], "sha256": sha})
    return rows


class RayEngineError(Exception):
    """Ray is missing, the cluster cannot be joined, or the job failed for good (after Ray's retries);
    what was committed before stays."""


def _connect(options: RayOptions) -> bool:
    """Join the cluster at `options.address`, or start a local Ray; True when this call connected."""
    try:
        import ray
    except ImportError as exc:
        raise RayEngineError(f"--engine ray needs Ray: {install_hint('ray')}") from exc
    if ray.is_initialized():
        return False
    where = f"the Ray cluster at {options.address}" if options.address else "a local Ray instance"
    try:
        # Workers print their own per-file errors; the driver prints them once, from what comes back.
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        ray.init(
            address=options.address,
            runtime_env={"env_vars": env} if env else None,
            log_to_driver=False,
            logging_level="WARNING",
            include_dashboard=False,
        )
    except Exception as exc:  # ConnectionError, ValueError, RuntimeError, ... as Ray raises them
        raise RayEngineError(f"cannot start or join {where}: {_cause(exc)}") from exc
    return True


def embed_on_ray(
    store: Store,
    files: list[InputFile],
    planned: dict[str, tuple[tuple, str]],
    spec: WorkerSpec,
    options: RayOptions,
    on_failure: Callable[[dict], None] | None = None,
    on_commit: Callable[[RayTotals], None] | None = None,
    on_embedded: Callable[[list[str]], None] | None = None,
) -> RayTotals:
    """Embed `files` on a Ray actor pool into `store` (open for writing, held by this driver), committing
    in chunks. `on_failure(record)` sees each file's failure as it comes back (the driver prints and logs
    it); `on_embedded(paths)` sees the files of each batch that came back embedded (not yet committed:
    progress); `on_commit(totals)` runs after each commit. A failure of the job itself (an actor that cannot
    load the model, a data file that cannot be written) is a RayEngineError; a failed commit a StoreError.
    What was committed stays."""
    totals = RayTotals()
    if not files:
        return totals
    started = _connect(options)
    import ray
    import ray.data

    if not options.ray_logs:  # Ray Data logs each dataset's progress on the driver (set after its import)
        logging.getLogger("ray.data").setLevel(logging.ERROR)

    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = options.ray_logs
        per_task = options.files_per_task or spec.batch_size * BATCHES_PER_TASK
        ds = ray.data.from_items(plan_rows(files, planned)).map_batches(
            EmbedActor,
            fn_constructor_kwargs={"spec": spec},
            batch_size=per_task,
            compute=ray.data.ActorPoolStrategy(size=options.workers),
            num_cpus=options.cpus_per_worker,
            num_gpus=options.gpus_per_worker,
        )
        # Commit about eight times over a run (at least a task's files, at most commit_files), so a
        # killed driver loses little and a large run makes few versions.
        every = min(options.commit_files, max(per_task, -(-len(files) // 8)))
        pending: list[dict] = []
        last = time.monotonic()
        try:
            for row in ds.iter_rows():
                res = json.loads(row["result"])
                for rec in res["failures"]:
                    totals.failures.append(rec)
                    if on_failure is not None:
                        on_failure(rec)
                if on_embedded is not None:
                    on_embedded(res["embedded_paths"])
                pending.append(res)
                waiting = sum(len(r["embedded_paths"]) for r in pending)
                if waiting >= every or time.monotonic() - last >= options.commit_seconds:
                    _commit(store, pending, totals, on_commit)
                    last = time.monotonic()
        except (StoreError, KeyboardInterrupt):
            raise
        except Exception as exc:  # a task failed for good (after Ray's retries): name the first cause
            _commit(store, pending, totals, on_commit)  # what came back is sound: a rerun starts after it
            raise RayEngineError(f"the Ray job failed: {_cause(exc)}") from exc
        _commit(store, pending, totals, on_commit)
    finally:
        if started:
            ray.shutdown()
    return totals


def _commit(store: Store, pending: list[dict], totals: RayTotals, on_commit: Callable | None) -> None:
    """One Lance version for every batch in `pending` (then emptied)."""
    if not pending:
        return
    written = [
        WrittenRows(tuple(w["fragments"]), tuple(w["paths"]), int(w["rows"]))
        for r in pending
        for w in r["written"]
    ]
    store.commit(written)
    for r in pending:
        totals.embedded += len(r["embedded_paths"])
        totals.embedded_paths.update(r["embedded_paths"])
        totals.audio_seconds += r["audio_seconds"]
        totals.warnings.extend(r["warnings"])
    totals.commits += 1
    pending.clear()
    if on_commit is not None:
        on_commit(totals)


def _cause(exc: BaseException) -> str:
    """One line for a Ray error: our own error inside it when there is one (a StoreError naming the store
    and the cause), else the innermost message (Ray wraps the worker's exception with its traceback)."""
    chain, seen = [], set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        chain.append(cur)
        cur = getattr(cur, "cause", None) or cur.__cause__
    ours = [e for e in chain if type(e).__module__.startswith("mlx_clap")]
    if not ours:  # the worker's exception came back as text only: its "mlx_clap....Error: ..." line
        found = re.findall(r"^\s*mlx_clap\.[\w.]+Error: (.+)$", str(exc), flags=re.M)
        if found:
            return found[-1].strip()
    pick = ours[0] if ours else chain[-1]
    lines = str(pick).strip().splitlines()
    return lines[-1] if lines else type(pick).__name__


@dataclass(frozen=True)
class RayEngine:
    """`SyncJob.run(progress, engine=RayEngine(RayOptions(...)))`: the job's files embedded on a Ray actor
    pool instead of in this process, with the same plan before and the same prune, compaction and logs
    after. The workers load `model_id` (by default the job's): a hub id or a folder they can all read.

        with SyncJob(collect_inputs(["/shared/music"], True), "s3://b/vectors", load(m), model_id=m) as job:
            report = job.run(engine=RayEngine(RayOptions(address="auto", workers=8), model_id=m))
    """

    options: RayOptions = field(default_factory=RayOptions)
    model_id: str | None = None
    trust_pickle: bool = False

    def __call__(self, job: Any, run: Any, files: list[InputFile]) -> None:
        model_id = self.model_id or job.model_id
        # A model folder given relative to here must mean the same folder to the workers.
        model = os.path.abspath(model_id) if os.path.exists(model_id) else model_id
        spec = WorkerSpec(
            model,
            run.settings["compute_dtype"],
            self.trust_pickle,
            run.settings,
            run.segments,
            run.batch_size,
            self.options.decode_threads,
            job.sink.store.target(),
        )
        before = (run.embedded, set(run.embedded_paths), run.audio_seconds, list(run.warnings))

        def committed(totals: RayTotals) -> None:
            job.sink.written = True  # the finish compacts what the commits added
            run.embedded = before[0] + totals.embedded
            run.embedded_paths = before[1] | totals.embedded_paths
            run.audio_seconds = before[2] + totals.audio_seconds
            run.warnings = before[3] + totals.warnings

        # The progress moves as batches come back (the counts above move as they are committed).
        run.files_total = len(files)
        estimates = estimate_seconds(files) if run.progress.wants_estimates else [0.0] * len(files)
        run.estimates = {str(f.path): sec for f, sec in zip(files, estimates, strict=True)}
        run.progress.start(max(sum(estimates), 1e-3))

        def embedded(paths: list[str]) -> None:
            for p in paths:
                run._finish_file(p)
            run._tick(len(paths))

        try:
            embed_on_ray(
                job.sink.store,
                files,
                job.plan.planned,
                spec,
                self.options,
                on_failure=lambda rec: run.fail(str(rec["path"]), str(rec["error"])),
                on_commit=committed,
                on_embedded=embedded,
            )
        finally:
            run.progress.close()
