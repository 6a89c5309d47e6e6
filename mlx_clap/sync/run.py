"""Decode and embed a list of files, and hand each batch of rows to a sink: the per-file code of a sync.

`EmbedRun` decodes files in worker threads ahead of the model (a bounded window of files in flight, a
memory budget for decoded audio), embeds them in batches through `ClapModel.embed_waveforms` /
`embed_windows` / `embed_segments` (the code path of `ClapModel.embed_audio`, so the vectors are the same),
streams long files window by window, and passes rows to a `Sink`: the store on a single-process run
(mlx_clap.sync.sinks.StoreSink), uncommitted Lance data files in a worker (`FragmentSink`, through
`embed_files`), or the JSON outputs of the CLI. Failures are recorded per file and the run goes on.

What a run reports while it works (a progress bar, error lines) goes through a `Progress`, whose default
does nothing: the library prints nothing.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from mlx_clap.preprocess.decode_ahead import (
    DECODE_BUDGET_BYTES,
    Decoded,
    InputFile,
    MemoryBudget,
    stat_key,
    window_for,
)
from mlx_clap.sync.inputs import estimate_seconds
from mlx_clap.sync.records import failure
from mlx_clap.sync.remote_inputs import decode_input


class Sink(Protocol):
    """Where a run's rows go. `records[i]` is {"file": InputFile, "item": the row's fields (path, size,
    mtime, duration, channels, source_rate, and sha256 / warnings where known), "meta": model and
    settings for self-describing outputs}; `segments[i]` is (starts, ends, vectors) of file i's windows
    when the output keeps segments, else `segments` is None."""

    def write(self, records: list[dict], vectors: np.ndarray, segments: list | None = None) -> None: ...

    def error(self, path: str, cause: str) -> None: ...


class Progress:
    """What a run tells its caller as it goes; every method does nothing here (subclass to show it).
    Progress is counted in audio seconds (estimated per file up front when `wants_estimates`)."""

    wants_estimates = False

    def planned(self, skipped: int, todo: int) -> None:
        """Before the run: `skipped` files were found done already, `todo` are to be decoded and embedded."""

    def start(self, total_seconds: float) -> None:
        """The run begins: `total_seconds` of audio estimated (1e-3 when nothing was estimated)."""

    def advance(self, seconds: float) -> None:
        """`seconds` more audio embedded."""

    def status(self, files_done: int, files_total: int, realtime: float) -> None:
        """Files finished so far and audio seconds per wall-clock second."""

    def failed(self, path: str, cause: str) -> None:
        """A file failed (recorded in the run's failures as well)."""

    def problem(self, message: str) -> None:
        """Something went wrong beside the files (the error log could not be written)."""

    def close(self) -> None:
        """The run ended (finished, failed or interrupted)."""


class _CountingBlocks:
    """A long file's block feed that reports each block's samples as the model takes it."""

    def __init__(self, feed: Any, on_samples: Any):
        self.feed = feed
        self.on_samples = on_samples

    def __iter__(self):
        for block in self.feed:
            # The model embeds a batch of windows before it asks for more, so this tracks embedding.
            self.on_samples(int(getattr(block, "size", 0)))
            yield block

    def cancel(self) -> None:
        self.feed.cancel()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.feed, name)


def _cancel_feed(future: Future) -> None:
    """Stop the decoder thread of a file decoded but never embedded (interrupted run)."""
    if future.cancelled() or future.exception() is not None:
        return
    d = future.result()
    if d.blocks is not None:
        d.blocks.cancel()


class EmbedRun:
    """Decode ahead in threads, embed in order, write to `sink`, and count.

    `settings`: the pipeline settings (mlx_clap.sync.manifest.pipeline_settings: long_audio, seed,
    quantize_int16, ...). Before `run`, set `planned` (path -> (stat key, sha256) of files hashed by the
    plan: their rows carry the sha256, and a file changed since is failed, not stored) and `segments`
    (the store's segment settings, None when it keeps no segment rows)."""

    def __init__(
        self,
        model: Any,
        sink: Sink,
        settings: dict,
        batch_size: int = 8,
        workers: int = 1,
        progress: Progress | None = None,
        meta: dict | None = None,
    ):
        self.model = model
        self.writer = sink
        self.settings = settings
        self.batch_size = batch_size
        self.workers = workers
        self.progress = progress or Progress()
        self.meta = meta or {}
        self.embedded = 0
        self.failures: list[dict] = []
        self.warnings: list[dict] = []
        self.audio_seconds = 0.0
        self.t0 = time.perf_counter()
        self.budget = MemoryBudget(DECODE_BUDGET_BYTES)
        self.embedded_paths: set[str] = set()
        # Progress is counted in audio seconds (estimated per file up front), so long files move the
        # bar as their windows are embedded and the ETA means something.
        self.estimates: dict[str, float] = {}
        self.advanced: dict[str, float] = {}
        self.files_total = 0
        self.files_done = 0
        self.planned: dict[str, tuple[tuple, str]] = {}
        self.segments: dict | None = None

    def fail(self, path: str, cause: str, echo: bool = True) -> None:
        self.failures.append(failure(path, cause))
        if echo:
            self.progress.failed(path, cause)
        self._finish_file(path)
        try:
            self.writer.error(path, cause)
        except Exception as exc:  # the error log itself failing must not stop the run
            from mlx_clap.store import StoreError

            if not isinstance(exc, (OSError, StoreError)):
                raise
            self.progress.problem(f"cannot record the failure in the error log ({exc})")

    def _record(self, d: Decoded) -> dict:
        st = d.stream
        item = {
            "path": d.key[0],
            "size": d.key[1],
            "mtime": d.key[2],
            "duration": float(st.duration_s),
            "channels": int(st.channels),
            "source_rate": int(st.source_rate),
        }
        if st.warnings:
            item["warnings"] = list(st.warnings)
            self.warnings.append({"path": d.key[0], "warnings": list(st.warnings)})
        planned = self.planned.get(d.key[0])
        if planned is not None:
            item["sha256"] = planned[1]
        return {"file": d.file, "item": item, "meta": {"filename": d.file.path.name, **self.meta}}

    def _changed_while_read(self, d: Decoded) -> bool:
        """Whether the file is not what was hashed and decoded (written to while this run read it)."""
        planned = self.planned.get(d.key[0])
        try:
            now = stat_key(d.file.path)
        except OSError:
            return True
        return now != d.key or (planned is not None and tuple(planned[0]) != d.key)

    def _emit(self, decoded: list[Decoded], vectors, segments: list | None = None) -> None:
        good = []
        for i in range(len(decoded)):
            if not np.all(np.isfinite(vectors[i])):
                self.fail(decoded[i].key[0], "the model produced a non-finite embedding")
            elif self.planned and self._changed_while_read(decoded[i]):
                self.fail(decoded[i].key[0], "the file changed while it was read; run again to embed it")
            else:
                good.append(i)
        if good:
            segs = None
            if self.segments is not None:
                segs = [
                    segments[i] if segments is not None else self._one_window(decoded[i], vectors[i])
                    for i in good
                ]
            self.writer.write([self._record(decoded[i]) for i in good], vectors[good], segments=segs)
        for i in good:
            self.audio_seconds += decoded[i].stream.duration_s
            self.embedded_paths.add(decoded[i].key[0])
            self._finish_file(decoded[i].key[0])
        self.embedded += len(good)
        self._tick(len(decoded))

    def _advance(self, path: str, seconds: float) -> None:
        """Move the progress by `seconds` of `path`, never past that file's estimate until it is done."""
        room = self.estimates.get(path, 0.0) - self.advanced.get(path, 0.0)
        step = min(seconds, room)
        if step > 0:
            self.advanced[path] = self.advanced.get(path, 0.0) + step
            self.progress.advance(step)

    def _finish_file(self, path: str) -> None:
        if path not in self.estimates or self.advanced.get(path) == -1.0:
            return  # not one of this run's files (an argument that does not exist), or counted already
        self._advance(path, self.estimates[path])
        self.advanced[path] = -1.0
        self.files_done += 1

    def _tick(self, n: int) -> None:
        """Report files done and speed (the amount of audio moves in _advance)."""
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        self.progress.status(self.files_done, self.files_total, self.audio_seconds / elapsed)

    def _embed_batch(self, batch: list[Decoded]) -> None:
        if not batch:
            return
        s = self.settings
        kwargs = dict(
            batch_size=self.batch_size,
            long_audio=s["long_audio"],
            seed=s["seed"],
            quantize_int16=s["quantize_int16"],
        )
        # Reference mode draws from RandomState(seed) per call: one file per call keeps each file's draws
        # independent of its batch neighbours (and so of resuming).
        groups = [[d] for d in batch] if s["long_audio"] == "reference" else [batch]
        for group in groups:
            try:
                vectors = self.model.embed_waveforms([d.samples for d in group], **kwargs)
            except Exception as exc:
                if len(group) == 1:
                    self.fail(group[0].key[0], f"cannot embed: {exc}")
                    self._tick(1)
                    continue
                for d in group:  # find the file that broke the batch; the others go through
                    self._embed_batch_single(d, kwargs)
                continue
            self._emit(group, vectors)
        for d in batch:
            self.budget.release(d.nbytes)
        batch.clear()

    def _embed_batch_single(self, d: Decoded, kwargs: dict) -> None:
        try:
            vectors = self.model.embed_waveforms([d.samples], **kwargs)
        except Exception as exc:
            self.fail(d.key[0], f"cannot embed: {exc}")
            self._tick(1)
            return
        self._emit([d], vectors)

    @staticmethod
    def _one_window(d: Decoded, vector) -> tuple:
        """The segments of a clip no longer than one window: itself, with the file's vector."""
        return (np.array([0.0]), np.array([float(d.stream.duration_s)]), np.asarray(vector)[None, :])

    def _needs_segments(self, d: Decoded) -> bool:
        """With segments, a file longer than one window is embedded window by window; with a model
        that pools frames into segments (PE-Audio Frame), every file."""
        if self.segments is None:
            return False
        if getattr(self.model.family, "pools_frames", False):
            return True
        return d.blocks is not None or d.samples.shape[0] > self.model.family.clip_samples

    def _embed_segments(self, d: Decoded) -> None:
        from mlx_clap.preprocess.audio import AudioDecodeError

        blocks = d.blocks if d.blocks is not None else [d.samples]
        # A frame-level model's segments are its frames pooled to the hop (pipeline.pe_audio).
        pools = getattr(self.model.family, "pools_frames", False)
        embed_segments = self.model.family.embed_segments if pools else self.model.embed_segments
        try:
            res = embed_segments(
                blocks,
                hop_seconds=self.segments["hop"],
                batch_size=self.batch_size,
                quantize_int16=self.settings["quantize_int16"],
            )
        except AudioDecodeError as exc:
            self.fail(d.key[0], exc.cause)
            self._tick(1)
            return
        except Exception as exc:
            if d.blocks is not None:
                d.blocks.cancel()
            self.fail(d.key[0], f"cannot embed: {exc}")
            self._tick(1)
            return
        except BaseException:
            if d.blocks is not None:
                d.blocks.cancel()
            raise
        self._emit([d], res.file_vector[None, :], segments=[(res.starts, res.ends, res.vectors)])

    def _embed_streaming(self, d: Decoded) -> None:
        from mlx_clap.preprocess.audio import AudioDecodeError

        if self.segments is not None:
            self._embed_segments(d)
            return
        try:
            vec = self.model.embed_windows(
                d.blocks, batch_size=self.batch_size, quantize_int16=self.settings["quantize_int16"]
            )
        except AudioDecodeError as exc:
            self.fail(d.key[0], exc.cause)
            self._tick(1)
            return
        except Exception as exc:
            d.blocks.cancel()
            self.fail(d.key[0], f"cannot embed: {exc}")
            self._tick(1)
            return
        except BaseException:  # Ctrl-C: stop the decoder thread so it lets go of the file first
            d.blocks.cancel()
            raise
        self._emit([d], vec[None, :].astype(np.float32))

    def _embed_streaming_and_release(self, d: Decoded) -> None:
        try:
            self._embed_streaming(d)
        finally:
            self.budget.release(d.nbytes)

    def run(self, files: list[InputFile]) -> None:
        """Decode, embed and write `files` in order (rows keep the input order)."""
        sr = self.model.config.feature_config.sampling_rate
        # Models without embed_windows (other families) get whole waveforms.
        stream_long = self.settings["long_audio"] == "windows-mean" and hasattr(self.model, "embed_windows")
        # head / center / reference: decoders read only the one window embedded, whatever the file's length.
        family = getattr(self.model, "family", None)
        window = window_for(family, self.settings["long_audio"], self.settings["seed"])
        self.files_total = len(files)
        estimates = estimate_seconds(files) if self.progress.wants_estimates else [0.0] * len(files)
        self.estimates = {str(f.path): sec for f, sec in zip(files, estimates, strict=True)}
        self.progress.start(max(sum(estimates), 1e-3))  # a bar needs a positive total for its percentage
        ahead = self.batch_size + 2 * self.workers  # files decoded ahead of the model, at most
        batch: list[Decoded] = []
        pending: deque[Future] = deque()
        todo = iter(files)
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="decode") as pool:
            try:
                submitted = 0

                def refill() -> None:
                    nonlocal submitted
                    while len(pending) < ahead:
                        f = next(todo, None)
                        if f is None:
                            return
                        pending.append(
                            pool.submit(decode_input, f, sr, stream_long, submitted, self.budget, window)
                        )
                        submitted += 1

                refill()
                consumed = 0
                while pending:
                    self.budget.advance(consumed)  # the file needed next may decode past the budget
                    d: Decoded = pending.popleft().result()
                    consumed += 1
                    refill()
                    if d.error is not None:
                        self.fail(str(d.file.path), d.error)
                        self._tick(1)
                    elif d.blocks is not None:
                        self._embed_batch(batch)  # keep rows in input order
                        d.blocks = _CountingBlocks(d.blocks, lambda n, p=d.key[0]: self._advance(p, n / sr))
                        self._embed_streaming_and_release(d)
                    elif self._needs_segments(d):
                        self._embed_batch(batch)
                        self._embed_streaming_and_release(d)
                    else:
                        batch.append(d)
                        if (
                            len(batch) >= self.batch_size
                            or sum(b.nbytes for b in batch) > self.budget.limit // 2
                        ):
                            self._embed_batch(batch)
                self._embed_batch(batch)
            except BaseException:
                for f in pending:
                    f.cancel()
                    # A decode still running may hand back a block feed: stop it as it does.
                    f.add_done_callback(_cancel_feed)
                self.budget.close()
                raise
            finally:
                self.progress.close()

    def summary(self, total: int, skipped: int, out: str | None, fmt: str) -> dict:
        """The run's counts and speed, as --summary-json prints them."""
        seconds = time.perf_counter() - self.t0
        return {
            "files": total,
            "embedded": self.embedded,
            "reused": 0,
            "removed": 0,
            "skipped": skipped,
            "failed": len(self.failures),
            "failures": self.failures,
            "warnings": self.warnings,
            "seconds": round(seconds, 3),
            "audio_seconds": round(self.audio_seconds, 3),
            # Audio seconds embedded per wall-clock second (above 1: faster than real time).
            "realtime_factor": round(self.audio_seconds / seconds, 3) if seconds > 0 else None,
            "files_per_second": round(self.embedded / seconds, 3) if seconds > 0 else None,
            "format": fmt,
            "out": out,
            "model": self.meta.get("model"),
        }


# ------------------------------------------------------------------------------ a worker's entry point
@dataclass
class EmbedBatch:
    """What `embed_files` hands back (picklable): the uncommitted rows and what happened per file."""

    written: list = field(default_factory=list)  # mlx_clap.store.WrittenRows, for Store.commit
    failures: list[dict] = field(default_factory=list)  # {"path", "error", "time"}
    warnings: list[dict] = field(default_factory=list)  # {"path", "warnings"}
    embedded_paths: list[str] = field(default_factory=list)
    embedded: int = 0
    audio_seconds: float = 0.0


class FragmentSink:
    """A Sink that writes each batch as Lance data files of the store at `target` (write_rows) and keeps
    them uncommitted in `written`; failures stay in the run's own records."""

    def __init__(self, target: Any):
        self.target = target
        self.written: list = []

    def write(self, records: list[dict], vectors: np.ndarray, segments: list | None = None) -> None:
        from mlx_clap.store import write_rows

        self.written.append(write_rows(self.target, [r["item"] for r in records], vectors, segments))

    def error(self, path: str, cause: str) -> None:
        pass  # the driver records EmbedBatch.failures in the store's errors.jsonl


def embed_files(
    model: Any,
    files: list[InputFile],
    target: Any,
    settings: dict,
    *,
    planned: dict[str, tuple[tuple, str]] | None = None,
    segments: dict | None = None,
    batch_size: int = 8,
    workers: int = 1,
) -> EmbedBatch:
    """Decode and embed `files` with `model` and write their rows for the store at `target` (a
    `RowsTarget`: `store.target()` on the driver) without committing: the per-file code of a sync, for a
    worker of another engine (a Ray actor). The driver commits with `store.commit(batch.written)` and
    records `batch.failures`. `planned` and `segments` as for `EmbedRun`: the driver's plan and
    `store.segment_settings`."""
    sink = FragmentSink(target)
    run = EmbedRun(model, sink, settings, batch_size, workers)
    run.planned = dict(planned or {})
    run.segments = segments
    run.run(files)
    return EmbedBatch(
        written=sink.written,
        failures=run.failures,
        warnings=run.warnings,
        embedded_paths=sorted(run.embedded_paths),
        embedded=run.embedded,
        audio_seconds=run.audio_seconds,
    )
