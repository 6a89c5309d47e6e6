"""`mlx-clap embed`, `mlx-clap embed-text` and `mlx-clap info`.

`embed` decodes files in worker threads ahead of the model (a bounded window of files in flight), embeds
them in batches through `ClapModel.embed_waveforms` / `embed_windows` (the code path of
`ClapModel.embed_audio`, so the vectors are the same), and writes a store (mlx_clap.store), one JSON per file,
or JSON lines on stdout. Reruns resume; failures are recorded and the run goes on.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import stat
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from mlx_clap.cli.common import (
    load_model_or_exit,
    model_option,
    trust_pickle_option,
    weights_sha256,
)
from mlx_clap.cli.output import INTERRUPTED_MESSAGE, INTERRUPTED_STATUS, printable
from mlx_clap.cli.stores import holds_store
from mlx_clap.cli.writers import ERRORS_NAME, WARNINGS_NAME, JsonlWriter, JsonWriter, StoreWriter
from mlx_clap.preprocess.audio import probe_seconds
from mlx_clap.preprocess.decode_ahead import (
    DECODE_BUDGET_BYTES,
    Decoded,
    InputFile,
    MemoryBudget,
    decode_file,
    discover,
    stat_key,
    window_for,
)
from mlx_clap.search.roots import record_roots

LONG_AUDIO_CHOICES = ("windows-mean", "head", "center", "fusion", "reference")
SEED_RANGE = click.IntRange(0, 2**32 - 1)  # what numpy's RandomState (the LAION reference crops) takes


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses nan, which compares false with both bounds and so passes."""

    name = "float range"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


# ------------------------------------------------------------------------------------------- model
def recorded_model_id(model_id: str) -> str:
    """How the manifest names the model: a local one by its absolute path, so the store can be searched
    from any folder; a hub id as typed."""
    local = Path(model_id).expanduser()
    return str(local.resolve()) if local.exists() else model_id


def build_manifest(model, model_id: str, settings: dict, store_dtype: str | None) -> dict:
    from mlx_clap.version import __version__

    return {
        "tool": "mlx-clap embed",
        "mlx_clap_version": __version__,
        "model": recorded_model_id(model_id),
        "model_source": model.config.source or (str(model.source_dir) if model.source_dir else None),
        "weights_sha256": weights_sha256(model),
        "embedding_dim": int(model.embedding_dim),
        "store_dtype": store_dtype,
        "settings": settings,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# ------------------------------------------------------------------------------- inputs and errors
# Probing every file's header costs about a millisecond each; past this many files a sample of them
# gives bytes per audio second and the rest are estimated from their size.
PROBE_ALL_FILES = 2000
PROBE_SAMPLE = 200
DEFAULT_BYTES_PER_SECOND = 16000.0  # 128 kbit/s, when nothing could be probed


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def estimate_seconds(files: list[InputFile]) -> list[float]:
    """Audio seconds per file, for a progress bar that moves with the work rather than the file count.

    Durations come from the headers when there are few files (or for a sample of many), the others
    from their size at the sampled bytes per second.
    """
    n = len(files)
    probe_idx = range(n) if n <= PROBE_ALL_FILES else range(0, n, max(1, n // PROBE_SAMPLE))
    known: dict[int, float] = {}
    for i in probe_idx:
        sec = probe_seconds(files[i].path)
        if sec is not None:
            known[i] = sec
    sizes = {i: _size(files[i].path) for i in known}
    probed_bytes = sum(sizes.values())
    probed_secs = sum(known.values())
    rate = probed_bytes / probed_secs if probed_bytes > 0 and probed_secs > 0 else DEFAULT_BYTES_PER_SECOND
    return [known[i] if i in known else _size(f.path) / rate for i, f in enumerate(files)]


IGNORED_NOTES = {
    "hidden": "hidden files and folders (name starting with '.')",
    "not_audio_name": "files without an audio extension",
    "symlinked_folders": "symbolic links to folders (not followed)",
    "subfolders": "sub-folders (no --recursive)",
    "excluded": "files matching --exclude",
}


def describe_ignored(ignored: dict[str, int]) -> str:
    """One line for the summary, with how to include what was passed over."""
    parts = [f"{n} {IGNORED_NOTES[k]}" for k, n in ignored.items()]
    how = "name a file or folder on the command line to include it (files named there are always tried)"
    if ignored.get("subfolders"):
        how = "add --recursive for sub-folders; " + how
    return "not considered: " + ", ".join(parts) + "; " + how


def exclude_files(
    files: list[InputFile], paths: tuple[str, ...], patterns: tuple[str, ...]
) -> tuple[list[InputFile], list[str]]:
    """(kept, excluded paths): files found inside a folder named in `paths` whose path relative to that
    folder, or whose file name, matches one of the fnmatch `patterns` (case-sensitive; `*` also matches
    "/") are excluded. Files named on the command line are always kept, as for the other kinds passed
    over."""
    if not patterns:
        return files, []
    named = {os.path.abspath(os.path.expanduser(raw)) for raw in paths}
    folders = [Path(p) for p in named if os.path.isdir(p)]
    kept: list[InputFile] = []
    excluded: list[str] = []
    for f in files:
        if str(f.path) in named:
            kept.append(f)
            continue
        names = {f.path.name} | {
            f.path.relative_to(d).as_posix() for d in folders if f.path.is_relative_to(d)
        }
        if any(fnmatch.fnmatchcase(n, pat) for n in names for pat in patterns):
            excluded.append(str(f.path))
        else:
            kept.append(f)
    return kept, excluded


FILE_KINDS = (
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISDIR, "folder"),
)


def refuse_non_regular(files: list[InputFile]) -> tuple[list[InputFile], list[tuple[str, str]]]:
    """(regular files, (path, cause) of the others). Checked with one stat (through a symbolic link)
    before anything reads a file: opening a FIFO blocks until a writer comes, and a device such as
    /dev/zero never ends, so hashing, probing or decoding one would hang the run. A file that cannot be
    stat'ed is kept: the decoder names the cause."""
    regular: list[InputFile] = []
    refused: list[tuple[str, str]] = []
    for f in files:
        try:
            mode = os.stat(f.path).st_mode
        except OSError:
            regular.append(f)
            continue
        if stat.S_ISREG(mode):
            regular.append(f)
        else:
            kind = next((name for test, name in FILE_KINDS if test(mode)), "special file")
            refused.append((str(f.path), f"not a regular file ({kind})"))
    return regular, refused


def file_gone(path: str) -> bool:
    """Whether nothing exists at `path` any more (a dangling symbolic link counts as gone). A path that
    cannot be checked (permission denied, I/O error) is not gone: its row is kept."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    return False


def rows_under(out: Path | None, path: str) -> int:
    """How many rows of the store in `out` are `path` or lie under it (0 without a readable store)."""
    from mlx_clap.store import Store, StoreError

    if out is None or not holds_store(out):
        return 0
    try:
        items = Store.open(out).items  # read only: the writer lock comes later
    except (StoreError, OSError):
        return 0
    scope = path.rstrip(os.sep) + os.sep
    return sum(1 for it in items if str(it["path"]) == path or str(it["path"]).startswith(scope))


def vanished_hint(out: Path | None, missing: list[tuple[str, str]], prune_missing: bool) -> str | None:
    """For arguments that do not exist but hold rows of the store (a renamed ~/Sounds, a drive unmounted
    or mounted elsewhere): how to move or drop those rows. None when no such argument."""
    notes = []
    for path, _cause in missing:
        n = rows_under(out, path) if not os.path.lexists(path) else 0
        if n:
            notes.append(f"{printable(path)} holds {n} rows of the store")
    if not notes:
        return None
    prune = (
        "--prune-missing drops them on a run that names a folder that exists"
        if prune_missing
        else "to drop the rows of files that no longer exist anywhere, add --prune-missing"
    )
    return (
        "; ".join(notes) + ": if it was renamed or moved, name its new place (the rows of files found "
        f"there move with them); {prune} (naming the gone path prunes nothing)"
    )


def current_errors(old: list[dict], new: list[dict], succeeded: set[str]) -> list[dict]:
    """The failures that describe the output now: this run's (last per path), then earlier ones of
    files that still exist and were neither embedded since nor tried again in this run."""
    latest: dict[str, dict] = {}
    for rec in new:
        latest[str(rec.get("path"))] = rec
    kept: dict[str, dict] = {}
    for rec in old:
        path = str(rec.get("path"))
        # A file deleted since has nothing left to retry (and a mistyped argument was never a file).
        if path not in succeeded and path not in latest and os.path.lexists(path):
            kept[path] = rec
    return list(kept.values()) + list(latest.values())


# Exit statuses of `embed` (0: nothing failed; 2: usage; 130: Ctrl-C): a cron job alerts on 1 only.
NEW_FAILURES_STATUS = 1
KNOWN_FAILURES_STATUS = 3


def new_failures(failures: list[dict], previous: list[dict]) -> list[dict]:
    """The failures that the previous run did not record for the same file with the same cause
    (`previous`: the error log as this run found it)."""
    known = {(str(r.get("path")), str(r.get("error"))) for r in previous}
    return [f for f in failures if (str(f["path"]), str(f["error"])) not in known]


def read_error_log(path: Path) -> list[dict]:
    """The records of an errors.jsonl (torn or foreign lines skipped)."""
    out: list[dict] = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "path" in rec:
            out.append(rec)
    return out


def rewrite_error_log(path: Path, records: list[dict]) -> None:
    """Replace the error log atomically with `records` (removed when there are none)."""
    from mlx_clap.io.files import atomic_write_bytes, json_line

    if not records:
        path.unlink(missing_ok=True)
        return
    atomic_write_bytes(path, "".join(json_line(r) for r in records).encode("utf-8"))


# --------------------------------------------------------------------------------------- the runner
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
    """Decode ahead in threads, embed in order, write, and count."""

    def __init__(self, model, writer, settings: dict, batch_size: int, workers: int, quiet: bool, meta: dict):
        self.model = model
        self.writer = writer
        self.settings = settings
        self.batch_size = batch_size
        self.workers = workers
        self.quiet = quiet
        self.meta = meta
        self.embedded = 0
        self.failures: list[dict] = []
        self.warnings: list[dict] = []
        self.audio_seconds = 0.0
        self.bar = None
        self.t0 = time.perf_counter()
        self.budget = MemoryBudget(DECODE_BUDGET_BYTES)
        self.embedded_paths: set[str] = set()
        # Progress is counted in audio seconds (estimated per file up front), so long files move the
        # bar as their windows are embedded and the ETA means something.
        self.estimates: dict[str, float] = {}
        self.advanced: dict[str, float] = {}
        self.files_total = 0
        self.files_done = 0
        # path -> (stat key, sha256) of the files hashed before the run (stores only).
        self.planned: dict[str, tuple[tuple, str]] = {}
        self.segments: dict | None = None  # the store's segment settings, when it keeps them

    def fail(self, path: str, cause: str, echo: bool = True) -> None:
        self.failures.append({"path": path, "error": cause, "time": time.time()})
        if echo:
            msg = f"error: {printable(path)}: {printable(cause)}"
            if self.bar is not None:
                self.bar.write(msg, file=sys.stderr)
            else:
                click.echo(msg, err=True)
        self._finish_file(path)
        try:
            self.writer.error(path, cause)
        except OSError as exc:  # the error log itself failing must not stop the run
            click.echo(f"error: cannot record the failure in the error log ({exc})", err=True)

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
        return now != d.key or (planned is not None and planned[0] != d.key)

    def _emit(self, decoded: list[Decoded], vectors, segments: list | None = None) -> None:
        import numpy as np

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
        """Move the bar by `seconds` of `path`, never past that file's estimate until it is done."""
        room = self.estimates.get(path, 0.0) - self.advanced.get(path, 0.0)
        step = min(seconds, room)
        if step > 0 and self.bar is not None:
            self.advanced[path] = self.advanced.get(path, 0.0) + step
            self.bar.update(step)

    def _finish_file(self, path: str) -> None:
        if path not in self.estimates or self.advanced.get(path) == -1.0:
            return  # not one of this run's files (an argument that does not exist), or counted already
        self._advance(path, self.estimates[path])
        self.advanced[path] = -1.0
        self.files_done += 1

    def _tick(self, n: int) -> None:
        """Refresh the bar's note (files done, speed); the bar itself moves in _advance."""
        if self.bar is not None:
            elapsed = max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix_str(
                f"{self.files_done}/{self.files_total} files, {self.audio_seconds / elapsed:.1f}x realtime",
                refresh=False,
            )

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
        import numpy as np

        return (np.array([0.0]), np.array([float(d.stream.duration_s)]), np.asarray(vector)[None, :])

    def _needs_segments(self, d: Decoded) -> bool:
        """With segments, a file longer than one window is embedded window by window."""
        if self.segments is None:
            return False
        return d.blocks is not None or d.samples.shape[0] > self.model.family.clip_samples

    def _embed_segments(self, d: Decoded) -> None:
        from mlx_clap.preprocess.audio import AudioDecodeError

        blocks = d.blocks if d.blocks is not None else [d.samples]
        try:
            res = self.model.embed_segments(
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
        import numpy as np

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
        from tqdm import tqdm

        sr = self.model.config.feature_config.sampling_rate
        # Models without embed_windows (other families) get whole waveforms.
        stream_long = self.settings["long_audio"] == "windows-mean" and hasattr(self.model, "embed_windows")
        # head / center / reference: decoders read only the one window embedded, whatever the file's length.
        family = getattr(self.model, "family", None)
        window = window_for(family, self.settings["long_audio"], self.settings["seed"])
        self.files_total = len(files)
        estimates = estimate_seconds(files) if not self.quiet else [0.0] * len(files)
        self.estimates = {str(f.path): sec for f, sec in zip(files, estimates, strict=True)}
        self.bar = tqdm(
            total=max(sum(estimates), 1e-3),  # tqdm needs a positive total for the percentage
            unit="s",
            desc="audio",
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s "
            "[{elapsed}<{remaining}{postfix}]",
            disable=self.quiet,
            file=sys.stderr,
            dynamic_ncols=True,
            smoothing=0.1,
        )
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
                            pool.submit(decode_file, f, sr, stream_long, submitted, self.budget, window)
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
                self.bar.close()

    def summary(self, total: int, skipped: int, out: str | None, fmt: str) -> dict:
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


# ------------------------------------------------------------------------------------------ commands
@click.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("-r", "--recursive", is_flag=True, help="Descend into sub-folders of folder arguments.")
@model_option
@trust_pickle_option
@click.option("--out", "out", type=click.Path(path_type=Path), help="Output folder (store or json formats).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["store", "json", "jsonl"]),
    help="store: an embedding store in --out (default with --out); json: one <file>.json per audio file, "
    "mirroring the input tree under --out; jsonl: JSON lines on stdout (default without --out).",
)
@click.option(
    "--batch-size",
    default=8,
    show_default=True,
    type=click.IntRange(1, 4096),
    help="Files (or 10-s windows of one long file) per model call.",
)
@click.option(
    "--long-audio",
    type=click.Choice(LONG_AUDIO_CHOICES),
    default="windows-mean",
    show_default=True,
    help="Audio longer than 10 s: windows-mean (deterministic: consecutive 10-s windows, mean of their unit "
    "embeddings, renormalized; streams, any length in bounded memory), head / center (one 10-s crop; "
    "only that window is read: the first, or the middle by seeking, so any length in bounded memory), "
    "fusion (fused models, deterministic chunks; decodes the whole file), reference (the model's own "
    "random rand_trunc/fusion crops as LAION/HF do it; use --seed; reads only its crop, except fused "
    "models, which decode the whole file). "
    "Example: mlx-clap embed long.mp3 --long-audio center --format jsonl",
)
@click.option(
    "--seed", type=SEED_RANGE, default=None, help="Seed for --long-audio reference (per file), 0 to 2**32-1."
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default="float32",
    show_default=True,
    help="Model compute precision.",
)
@click.option(
    "--store-dtype",
    type=click.Choice(["float16", "float32"]),
    default="float16",
    show_default=True,
    help="Precision of vectors in the store.",
)
@click.option("--quantize-int16", is_flag=True, help="LAION's int16 round trip of the waveform first.")
@click.option("--overwrite", is_flag=True, help="Start fresh instead of resuming what --out holds.")
@click.option(
    "--segments",
    is_flag=True,
    help="Also store one vector per window (the model's clip length, every --hop seconds) with its start "
    "and end, for `search --segments`, `timeline` and `recurring`. Set when the store is made; later runs "
    "keep it.",
)
@click.option(
    "--hop",
    type=FiniteFloatRange(0.1, 3600.0),
    default=2.0,
    show_default=True,
    help="Seconds between the starts of two segment windows (with --segments).",
)
@click.option(
    "--no-prune",
    is_flag=True,
    help="Keep the rows of files that are gone from the folders named on this run (by default they are "
    "removed, so the store mirrors the folders), and of files found moved.",
)
@click.option(
    "--prune-missing",
    is_flag=True,
    help="Also remove the rows of every file of the store that no longer exists, wherever it was (a "
    "renamed or remounted library root, a folder deleted outside the ones named); one stat per row. Rows "
    "of files that exist are kept, named or not. A drive that is not mounted counts as missing: run it "
    "with every library drive attached.",
)
@click.option(
    "--exclude",
    "excludes",
    multiple=True,
    metavar="GLOB",
    help="Skip files found in the folders named whose path relative to that folder (e.g. 'drafts/*') or "
    "whose name (e.g. '*.tmp.wav') matches GLOB: fnmatch, case-sensitive, * also matches '/'. Repeatable. "
    "Counted in the summary; their rows are removed like those of gone files. Files named on the command "
    "line are always tried.",
)
@click.option(
    "--workers",
    default=min(4, os.cpu_count() or 1),
    show_default=True,
    type=click.IntRange(1, 64),
    help="Decoder threads.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar (errors are still printed).")
@click.option(
    "--summary-json",
    is_flag=True,
    help="Print a JSON summary (counts, failures, errors_file, not_considered, seconds, realtime factor) "
    "at the end: on stdout, or on stderr with --format jsonl.",
)
def embed(
    paths: tuple[str, ...],
    recursive: bool,
    model_id: str,
    out: Path | None,
    fmt: str | None,
    batch_size: int,
    long_audio: str,
    seed: int | None,
    dtype: str,
    store_dtype: str,
    quantize_int16: bool,
    overwrite: bool,
    segments: bool,
    hop: float,
    no_prune: bool,
    prune_missing: bool,
    excludes: tuple[str, ...],
    workers: int,
    quiet: bool,
    summary_json: bool,
    trust_pickle: bool = False,
) -> None:
    """Embed audio files (WAV, FLAC, MP3, OGG, Opus, M4A/AAC, AIFF, ...) into CLAP vectors.

    With --out the store mirrors the files and folders given: a rerun skips unchanged files (same path,
    size and mtime), re-embeds changed ones (replacing their rows), reuses the vectors of a file whose
    content (sha256) is already stored under another name (a rename or a copy), and removes the rows of
    files gone from the folders named on this run (--no-prune keeps them); never two rows for one path.
    A file found under a new path whose old path is gone (same name and content, e.g. a renamed
    ~/Sounds) takes its old row's place; --prune-missing also removes the rows of files that no longer
    exist anywhere (a drive mounted elsewhere).
    --segments also stores a vector per window (see `search --segments`, `timeline`, `recurring`).
    Files that cannot be decoded (or are not regular files: a FIFO, a device) are reported on stderr;
    the run goes on. With --out, OUT/errors.jsonl is rewritten at the end of every run to list the
    failures that stand: this run's, plus earlier ones of files still there and not embedded since (the
    last line names it). Exits with status 0 when nothing failed; status 1 when a file failed that the
    previous run's errors.jsonl does not list with the same cause (any failure, without --out); status 3
    when only such known failures are left (skip them with --exclude); 2 on a usage error; 130 on
    Ctrl-C. Arguments that do not exist are reported before the model loads. Files that decode only
    in part (a header declaring more audio than the file holds, damaged data the decoder skipped) are
    embedded with "warnings" in their record and in --summary-json; the decoders' own messages are not
    printed.

    Inside folders, files are picked by audio extension; hidden files and folders, other files,
    symbolic links to folders and (without --recursive) sub-folders are passed over and counted in
    the summary ("not_considered" in --summary-json); name one on the command line to include it.
    The progress bar counts audio seconds (from the file headers), so long files move it as their
    10-s windows are embedded. --format json cannot write into an embedding store's folder.
    Ctrl-C stops with status 130, keeping what was written; rerun the same command to resume.
    One run at a time per store: a second embed on an --out in use fails at once, naming the PID
    that holds it (a killed run holds nothing). --overwrite builds the new store beside the old one
    (or a half-made one) and swaps it in; a folder holding other files is never removed. A store
    whose files are symbolic links is refused. `mlx-clap check OUT` verifies the stored vectors.

    \b
    Examples:
      mlx-clap embed ~/Sounds --recursive --out vectors/
      mlx-clap embed a.wav b.mp3 --format jsonl > vectors.jsonl
      mlx-clap embed clips/ --out json/ --format json --long-audio head
    """
    from mlx_clap.store import StoreError

    fmt = fmt or ("store" if out is not None else "jsonl")
    if fmt in ("store", "json") and out is None:
        raise click.UsageError(f"--format {fmt} needs --out DIR")
    if fmt == "jsonl" and out is not None:
        raise click.UsageError("--format jsonl writes to stdout; redirect it instead of giving --out")
    if seed is not None and long_audio != "reference":
        click.echo("note: --seed only matters with --long-audio reference", err=True)
    if segments and fmt != "store":
        raise click.UsageError("--segments needs a store (--out DIR, --format store)")
    if segments and long_audio != "windows-mean":
        raise click.UsageError("--segments needs --long-audio windows-mean (the file vector is their mean)")
    if prune_missing and fmt != "store":
        raise click.UsageError("--prune-missing removes rows of a store: it needs --out DIR (--format store)")
    if prune_missing and no_prune:
        raise click.UsageError("--prune-missing and --no-prune ask for opposite things: choose one")
    ignored: dict[str, int] = {}
    files, missing = discover(paths, recursive, ignored)
    files, excluded = exclude_files(files, paths, excludes)
    if excluded:
        ignored["excluded"] = len(excluded)
    # A FIFO or a device is refused before anything opens it (that would block or never end).
    files, refused = refuse_non_regular(files)
    missing += refused
    # Inputs are checked before the model loads: loading may take a while or need the network, and a
    # typo must neither wait for it nor leave an empty store behind.
    hint = vanished_hint(out, missing, prune_missing) if fmt == "store" and not overwrite else None
    check_inputs(paths, files, missing, ignored, hint)
    check_out(out, fmt)
    for path, cause in missing:
        click.echo(f"error: {printable(path)}: {printable(cause)}", err=True)
    if hint:
        click.echo(f"note: {hint}", err=True)
    if fmt == "store" and not overwrite and not missing:
        wanted = {
            "long_audio": long_audio,
            "seed": seed if long_audio == "reference" else None,
            "quantize_int16": bool(quantize_int16),
            "compute_dtype": dtype,
        }
        request = MirrorRequest(
            out, model_id, wanted, store_dtype, segments, files, paths, recursive, no_prune, prune_missing
        )
        done = already_mirrored(request)
        if done is not None:  # nothing changed: answered from file stats alone, the model is not loaded
            done["not_considered"] = ignored
            if summary_json:
                click.echo(json.dumps(done))
            elif not quiet:
                click.echo(final_line(done, None), err=True)
                if ignored:
                    click.echo(f"note: {describe_ignored(ignored)}", err=True)
            return
    model = load_model_or_exit(model_id, dtype, trust_pickle=trust_pickle)
    fused = model.config.feature_config.truncation == "fusion"
    if long_audio == "fusion" and not fused:
        raise click.UsageError("--long-audio fusion needs a fused model (e.g. laion/clap-htsat-fused)")
    settings = {
        "long_audio": long_audio,
        "seed": seed if long_audio == "reference" else None,
        "quantize_int16": bool(quantize_int16),
        "compute_dtype": dtype,
        "sample_rate": int(model.config.feature_config.sampling_rate),
        "decode": "soundfile|pyav, channel mean, soxr HQ, librosa length",
        "feature_config": model.config.feature_config.to_dict(),
    }
    manifest = build_manifest(model, model_id, settings, store_dtype if fmt == "store" else None)
    meta = {"model": model_id, "weights_sha256": manifest["weights_sha256"], "settings": settings}
    seg_settings = None
    if segments:
        if not hasattr(model, "embed_segments"):
            raise click.UsageError(f"--segments is not supported for the model {model_id!r}")
        seg_settings = {"hop": float(hop), "window": model.family.clip_samples / model.family.sampling_rate}
    if fmt == "store":
        writer: Any = StoreWriter(out, manifest, model.embedding_dim, store_dtype, overwrite, seg_settings)
        if writer.segments and long_audio != "windows-mean":
            raise click.UsageError(f"{out} keeps segments: it needs --long-audio windows-mean")
        try:  # the folders `serve` may play files from (mlx_clap.search.roots), before any row is written
            record_roots(writer.store, paths)
        except (OSError, StoreError) as exc:
            raise click.ClickException(f"{out}: cannot record the library folders ({exc})") from exc
    elif fmt == "json":
        writer = JsonWriter(out, manifest, overwrite)
    else:
        writer = JsonlWriter(manifest)

    todo: list[InputFile] = []
    skipped = 0
    for f in files:
        try:
            key = stat_key(f.path)
        except OSError:
            todo.append(f)  # the decoder reports the cause
            continue
        done = key in writer.done if fmt == "store" else (fmt == "json" and writer.is_done(f, key))
        if done:
            skipped += 1
        else:
            todo.append(f)
    planned: dict[str, tuple[tuple, str]] = {}
    reused: list[tuple[dict, int]] = []
    if fmt == "store":
        todo, planned, reused = plan_by_content(todo, writer, workers)
    error_log = out / ERRORS_NAME if fmt in ("store", "json") else None
    old_errors = read_error_log(error_log) if error_log is not None else []
    skipped_paths = {str(f.path) for f in files} - {str(f.path) for f in todo}
    run = EmbedRun(model, writer, settings, batch_size, workers, quiet, meta)
    run.planned = planned
    run.segments = writer.segments if fmt == "store" else None
    for path, cause in missing:
        run.fail(path, cause, echo=False)  # printed above, before the model loaded
    if not quiet and skipped:
        click.echo(f"{skipped} file(s) already embedded with these settings: skipped", err=True)
    interrupted = False
    sync = {"reused": 0, "removed": 0, "moved": 0, "missing": 0}
    try:
        if reused:
            writer.reuse(reused)
            sync["reused"] = len(reused)
        run.run(todo)
        if fmt == "store":
            sync.update(mirror(writer, paths, recursive, files, run, no_prune, prune_missing, reused))
    except KeyboardInterrupt:
        interrupted = True
        click.echo(INTERRUPTED_MESSAGE, err=True)
    except (OSError, StoreError) as exc:  # the output cannot be written (disk full, permissions, ...)
        raise click.ClickException(
            f"cannot write the output ({exc}); what was written before is kept: "
            "fix the cause and rerun the same command to resume"
        ) from exc
    errors_file = None
    if error_log is not None:
        # Excluded files are no longer tried, so their earlier failures stand no more.
        succeeded = run.embedded_paths | skipped_paths | set(excluded)
        if fmt == "store":
            succeeded |= {str(it["path"]) for it in writer.store.items}
        records = current_errors(old_errors, run.failures, succeeded)
        try:
            rewrite_error_log(error_log, records)
            errors_file = str(error_log) if records else None
        except OSError as exc:
            click.echo(f"error: cannot rewrite {printable(error_log)} ({exc})", err=True)
    warnings_file = None
    if error_log is not None:
        warnings_file = rewrite_warnings(out / WARNINGS_NAME, writer, fmt, run, succeeded)
    summary = run.summary(len(files) + len(missing), skipped, str(out) if out else None, fmt)
    summary.update(sync)
    # After --overwrite there is no previous run to compare with: every failure is new.
    fresh = new_failures(run.failures, [] if overwrite else old_errors)
    summary["new_failures"] = len(fresh)
    summary["errors_file"] = errors_file
    summary["warnings_file"] = warnings_file
    summary["not_considered"] = ignored
    if summary_json:
        click.echo(json.dumps(summary), err=(fmt == "jsonl"))
    elif not quiet:
        click.echo(final_line(summary, errors_file), err=True)
    if ignored and not quiet and not summary_json:
        click.echo(f"note: {describe_ignored(ignored)}", err=True)
    if interrupted:
        sys.exit(INTERRUPTED_STATUS)  # the group leaves through os._exit (mlx_clap.cli.__init__)
    if fresh:
        sys.exit(NEW_FAILURES_STATUS)
    if run.failures:
        sys.exit(KNOWN_FAILURES_STATUS)


@dataclass(frozen=True)
class MirrorRequest:
    """What a run into an existing store asks for, as `already_mirrored` compares it with the store."""

    out: Path
    model_id: str
    wanted: dict  # the settings the manifest must record (long_audio, seed, quantize_int16, compute_dtype)
    store_dtype: str
    segments: bool
    files: list[InputFile]
    paths: tuple[str, ...]  # the arguments as given: the folders whose gone files would be pruned
    recursive: bool
    no_prune: bool
    prune_missing: bool = False


def already_mirrored(request: MirrorRequest) -> dict | None:
    """The summary of a run with nothing to do (every file unchanged, none to remove, same model and
    settings as the store records), or None when there is work or any doubt. Costs one stat per file,
    so a rerun over an unchanged library of 100k files takes seconds and never loads the model."""
    from mlx_clap.store import is_legacy

    out = request.out
    if not (out / "_versions").is_dir() or is_legacy(out) or (out / ERRORS_NAME).exists():
        return None  # a new store, one to convert, or failures to retry and an error log to bring up to date
    from mlx_clap.search import lock

    t0 = time.perf_counter()
    try:
        lock.acquire(out)  # a store another run is writing is not "up to date": the full path says so
    except OSError:
        return None
    try:
        return _mirrored_locked(request, t0)
    finally:
        lock.release(out)


def _mirrored_locked(request: MirrorRequest, t0: float) -> dict | None:
    from mlx_clap.store import Store, StoreError

    try:
        store = Store.open(request.out, write=True)  # the lock is held already (re-entrant)
    except StoreError:
        return None  # the full path reports it
    try:
        return _mirrored_store(store, request, t0)
    finally:
        store.close()


def _mirrored_store(store: Any, request: MirrorRequest, t0: float) -> dict | None:
    from mlx_clap.store import StoreError

    if (
        _store_differs(store, request)
        or _any_file_changed(store, request.files)
        or (not request.no_prune and _has_rows_to_prune(store, request))
        or (request.prune_missing and any(file_gone(str(it["path"])) for it in store.items))
    ):
        return None
    try:
        record_roots(store, request.paths)  # a store made before roots were recorded gets them now
    except (OSError, StoreError):
        return None  # the full path says why the store cannot be written
    return _up_to_date_summary(store, request, time.perf_counter() - t0)


def _store_differs(store: Any, request: MirrorRequest) -> bool:
    """Whether the store was made with another model or other settings, or holds something the full run
    would clean up (superseded rows; notes, when it was opened writable)."""
    manifest = store.manifest
    settings = manifest.get("settings") or {}
    return bool(
        manifest.get("model") != recorded_model_id(request.model_id)
        or manifest.get("store_dtype") != request.store_dtype
        or any(settings.get(k) != v for k, v in request.wanted.items())
        or (request.segments and not store.has_segments)
        or store.dead_rows
        or store.read_only is False
        and store.notes
    )


def _any_file_changed(store: Any, files: list[InputFile]) -> bool:
    """Whether an input is new, changed or unreadable: not stored with its current stat key (path, size,
    mtime)."""
    done = store.done_keys()
    for f in files:
        try:
            if stat_key(f.path) not in done:
                return True
        except OSError:
            return True
    return False


def _has_rows_to_prune(store: Any, request: MirrorRequest) -> bool:
    """Whether the store holds a row of a file gone from the inputs named (which the run would remove)."""
    present = {str(f.path) for f in request.files}
    for raw in request.paths:
        root = os.path.abspath(os.path.expanduser(raw))
        scope = root.rstrip(os.sep) + os.sep
        for it in store.items:
            p = str(it["path"])
            if p in present:
                continue
            if p == root or (
                p.startswith(scope) and (request.recursive or os.path.dirname(p) == root.rstrip(os.sep))
            ):
                return True
    return False


def _up_to_date_summary(store: Any, request: MirrorRequest, seconds: float) -> dict:
    """The --summary-json of a run that found every file stored already."""
    return {
        "files": len(request.files),
        "embedded": 0,
        "reused": 0,
        "removed": 0,
        "moved": 0,
        "missing": 0,
        "skipped": len(request.files),
        "failed": 0,
        "new_failures": 0,
        "failures": [],
        "warnings": [],
        "seconds": round(seconds, 3),
        "audio_seconds": 0.0,
        "realtime_factor": None,
        "files_per_second": None,
        "format": "store",
        "out": str(request.out),
        "model": store.manifest.get("model"),
        "errors_file": None,
        "up_to_date": True,
    }


def plan_by_content(
    todo: list[InputFile], writer: StoreWriter, workers: int
) -> tuple[list[InputFile], dict[str, tuple[tuple, str]], list[tuple[dict, int]]]:
    """Hash the new and changed files (in threads); those whose content is already stored are reused
    (a rename or a copy), the rest are embedded. Returns (to embed, path -> (stat key, sha256) of every
    hashed file, [(item, row of the same content)])."""
    from mlx_clap.io.files import sha256_file

    def digest(f: InputFile) -> tuple[InputFile, tuple | None, str | None]:
        try:
            if not stat.S_ISREG(os.stat(f.path).st_mode):
                return f, None, None  # replaced by a FIFO or device since the walk: the decoder refuses it
            key = stat_key(f.path)
            sha = sha256_file(f.path)
            return f, (key if stat_key(f.path) == key else None), sha
        except OSError:
            return f, None, None  # the decoder names the cause

    stored = writer.by_content()
    embed: list[InputFile] = []
    planned: dict[str, tuple[tuple, str]] = {}
    reused: list[tuple[dict, int]] = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hash") as pool:
        for f, key, sha in pool.map(digest, todo):
            if key is None or sha is None:
                embed.append(f)
                continue
            planned[str(f.path)] = (key, sha)
            if sha in stored:
                reused.append(({"path": key[0], "size": key[1], "mtime": key[2], "sha256": sha}, stored[sha]))
            else:
                embed.append(f)
    return embed, planned, reused


def moved_rows(items: list[dict], reused: list[tuple[dict, int]]) -> set[str]:
    """Paths of rows that are the old place of a file this run found under a new path: the row's file
    is gone, a file of the same name and content (sha256) was reused, and the new path lies inside the
    deepest folder of the old path that still exists (not the filesystem root). So a renamed ~/Sounds is
    recognised, while a copy that still exists, or one on a drive that is not mounted (its mount folder
    gone or empty, the new file elsewhere), keeps its row."""
    new_by_content: dict[str, list[str]] = {}
    for item, _row in reused:
        new_by_content.setdefault(str(item["sha256"]), []).append(str(item["path"]))
    out: set[str] = set()
    for it in items:
        old = str(it["path"])
        candidates = new_by_content.get(str(it.get("sha256")))
        if not candidates or old in candidates or not file_gone(old):
            continue
        anchor = os.path.dirname(old)
        while anchor != os.path.dirname(anchor) and not os.path.isdir(anchor):
            anchor = os.path.dirname(anchor)
        if anchor == os.path.dirname(anchor):
            continue  # nothing of the old path is left but the root: no evidence of a move
        scope = anchor.rstrip(os.sep) + os.sep
        name = os.path.basename(old)
        if any(new.startswith(scope) and os.path.basename(new) == name for new in candidates):
            out.add(old)
    return out


def mirror(
    writer: StoreWriter,
    paths: tuple[str, ...],
    recursive: bool,
    files: list[InputFile],
    run: EmbedRun,
    no_prune: bool,
    prune_missing: bool = False,
    reused: list[tuple[dict, int]] | None = None,
) -> dict[str, int]:
    """Make the store mirror this run's inputs: remove rows of files gone from the folders named, of
    files found moved (`moved_rows`) and, with `prune_missing`, of every file that no longer exists
    (none of these with --no-prune), and of files that changed but failed (their old vector no longer
    describes them); then one compaction reclaims every superseded row. Returns the counts removed in
    all ("removed"), as moved files ("moved") and as missing elsewhere ("missing")."""
    scopes: list[tuple[str, bool]] = []
    for raw in paths:
        p = os.path.abspath(os.path.expanduser(raw))
        scopes.append((p, recursive) if os.path.isdir(p) else (p, False))
    present = {str(f.path) for f in files}
    drop: set[str] = set()
    moved: set[str] = set()
    missing: set[str] = set()
    if not no_prune:
        drop = set(writer.prune_candidates(scopes, present))
        moved = moved_rows(writer.store.items, reused or [])
        if prune_missing:  # one stat per row of the store
            stored = (str(it["path"]) for it in writer.store.items)
            missing = {p for p in stored if p not in present and file_gone(p)} - drop - moved
    failed = {str(r["path"]) for r in run.failures}
    drop |= {str(it["path"]) for it in writer.store.items if str(it["path"]) in failed}
    removed = writer.finish(sorted(drop | moved | missing))["removed"]
    return {"removed": removed, "moved": len(moved), "missing": len(missing)}


def check_inputs(
    paths: tuple[str, ...],
    files: list[InputFile],
    missing: list[tuple[str, str]],
    ignored: dict[str, int],
    hint: str | None = None,
) -> None:
    """ClickException when the arguments name no file to embed (each bad argument and why, then `hint`)."""
    if files:
        return
    causes = [f"{printable(p)}: {printable(c)}" for p, c in missing]
    if not causes:
        causes = ["no audio files found in " + ", ".join(printable(p) for p in paths)]
    extra = f" ({describe_ignored(ignored)})" if ignored else ""
    raise click.ClickException(
        "nothing to embed: " + "; ".join(causes) + extra + (f". Note: {hint}" if hint else "")
    )


def check_out(out: Path | None, fmt: str) -> None:
    """Refuse --format json into an embedding store: its one-JSON-per-file tree would be mixed into it."""
    if fmt == "json" and out is not None and holds_store(out):
        raise click.ClickException(
            f"{printable(out)}: is an embedding store; --format json writes one JSON file per audio file "
            "and would scatter them into it. Choose another --out for JSON, or drop --format json to add "
            "to the store."
        )


def final_line(summary: dict, errors_file: str | None) -> str:
    """The last line of a run: counts, speed, and where the failures are listed."""
    sync = ""
    if summary.get("reused") or summary.get("removed"):
        sync = f", reused {summary.get('reused', 0)}, removed {summary.get('removed', 0)}"
        why = [f"{summary[k]} {k}" for k in ("moved", "missing") if summary.get(k)]
        sync += f" ({', '.join(why)})" if why else ""
    failed = f"failed {summary['failed']}"
    if summary["failed"] and summary.get("new_failures", summary["failed"]) < summary["failed"]:
        failed += f" ({summary['new_failures']} new; the others as on the last run)"
    line = (
        f"embedded {summary['embedded']}{sync}, skipped {summary['skipped']}, {failed} "
        f"in {summary['seconds']:.1f} s ({summary['realtime_factor'] or 0:.1f}x realtime)"
    )
    if errors_file:
        line += f"; failures listed in {printable(errors_file)}"
    elif summary["failed"]:
        line += "; failures listed above"
    if summary.get("warnings_file"):
        line += f"; files decoded with warnings listed in {printable(summary['warnings_file'])}"
    return line


def rewrite_warnings(path: Path, writer: Any, fmt: str, run: EmbedRun, succeeded: set[str]) -> str | None:
    """Rewrite OUT/warnings.jsonl ({"path", "warnings"} per file embedded from a partial decode) to the
    current state: for a store, its live rows with warnings; for JSON output, this run's plus earlier
    ones of files still there and not embedded again. Returns its path, or None when there are none."""
    if fmt == "store":
        records = [
            {"path": it["path"], "warnings": it["warnings"]}
            for it in writer.store.items
            if it.get("warnings")
        ]
    else:
        redone = run.embedded_paths
        old = [
            r
            for r in read_error_log(path)
            if r.get("path") not in redone and os.path.lexists(str(r.get("path")))
        ]
        records = old + [dict(w) for w in run.warnings]
    try:
        rewrite_error_log(path, records)
    except OSError as exc:
        click.echo(f"error: cannot rewrite {printable(path)} ({exc})", err=True)
        return None
    return str(path) if records else None


@click.command("embed-text")
@click.argument("texts", nargs=-1, required=True)
@model_option
@trust_pickle_option
@click.option("--format", "fmt", type=click.Choice(["jsonl", "npy"]), default="jsonl", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), help="Output file (needed for npy; jsonl: stdout).")
@click.option(
    "--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True
)
def embed_text(
    texts: tuple[str, ...], model_id: str, fmt: str, out: Path | None, dtype: str, trust_pickle: bool = False
) -> None:
    """Embed text prompts into the same space as the audio.

    \b
    Examples:
      mlx-clap embed-text "a dog barking" "rain on a window"
      mlx-clap embed-text "a dog barking" --format npy --out dog.npy
    """
    import numpy as np

    from mlx_clap.io.files import atomic_write_bytes, json_line

    if fmt == "npy" and out is None:
        raise click.UsageError("--format npy needs --out FILE")
    if out is not None and out.is_dir():  # checked before the model loads, not after it embedded
        raise click.BadParameter(
            f"{printable(out)}: is a folder; give the path of a file", param_hint="--out"
        )
    model = load_model_or_exit(model_id, dtype, trust_pickle=trust_pickle)
    try:
        vectors = model.embed_text(list(texts))
    except (RuntimeError, ValueError, TypeError) as exc:
        raise click.ClickException(f"cannot embed the text with {model_id!r}: {exc}") from exc
    if fmt == "npy":
        import io

        buf = io.BytesIO()
        np.save(buf, vectors.astype(np.float32), allow_pickle=False)
        data = buf.getvalue()
    else:
        data = "".join(
            json_line({"text": t, "model": model_id, "embedding": [float(x) for x in v]})
            for t, v in zip(texts, vectors, strict=True)
        ).encode("utf-8")
    if out is None:
        sys.stdout.write(data.decode("utf-8"))
        return
    try:
        atomic_write_bytes(out, data)
    except OSError as exc:  # a missing folder, no permission, a full disk
        raise click.ClickException(f"{printable(out)}: cannot write ({exc.strerror or exc})") from exc


def _versions() -> dict:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("mlx-clap", "mlx", "numpy", "soundfile", "soxr", "av", "tokenizers", "safetensors", "click"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    try:
        import soundfile

        out["libsndfile"] = soundfile.__libsndfile_version__
    except Exception:
        pass
    try:
        import av

        out["ffmpeg"] = ".".join(str(x) for x in av.library_versions.get("libavcodec", ()))
        out["ffmpeg"] = f"libavcodec {out['ffmpeg']}"
    except Exception:
        pass
    return out


@click.command()
@model_option
@trust_pickle_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(model_id: str, as_json: bool, trust_pickle: bool = False) -> None:
    """Show the model (family and architecture), the compute device, the settings and library versions.

    Exits with status 1 when the model cannot be loaded (the cause is printed).

    \b
    Example:
      mlx-clap info --model laion/clap-htsat-unfused
    """
    import mlx.core as mx

    from mlx_clap import settings
    from mlx_clap.cli.common import describe_model
    from mlx_clap.ops import parallel
    from mlx_clap.ops.blas import blas_info, get_num_threads
    from mlx_clap.ops.device import cpu_fast_paths
    from mlx_clap.ops.malloc import malloc_tuned

    report: dict[str, Any] = {"device": str(mx.default_device())}
    try:
        report["metal"] = bool(mx.metal.is_available())
    except Exception:
        report["metal"] = False
    report["versions"] = _versions()
    model_info: dict[str, Any] = {"id": model_id}
    try:
        from mlx_clap.loading import load

        model_info.update(describe_model(load(model_id, trust_pickle=trust_pickle)))
    except Exception as exc:
        model_info["error"] = str(exc)
    report["model"] = model_info
    blas = blas_info()
    report["cpu"] = {
        "fast_paths": cpu_fast_paths(),
        "workers": parallel.worker_count(),
        "blas": blas.get("config") or blas.get("status"),
        "blas_threads": get_num_threads(),
        "malloc_tuned": malloc_tuned(),
    }
    report["settings"] = settings.current().describe()
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        m = report["model"]
        click.echo(f"model:    {printable(m['id'])}")
        if "error" in m:
            click.echo(f"          not loadable: {printable(m['error'])}")
        else:
            click.echo(f"folder:   {printable(m['folder'])}")
            if m.get("random_weights"):
                click.echo("weights:  RANDOM (not a trained model; written by mlx-clap random-model)")
            kind = "fused" if m.get("fused") else "unfused"
            click.echo(f"family:   {m['family']} ({kind}), {m['embedding_dim']}-d")
            click.echo(f"audio:    {m['audio']}")
            click.echo(f"text:     {m['text']}; tokenizer {'present' if m['tokenizer'] else 'missing'}")
            click.echo(
                f"input:    {m['sampling_rate']} Hz, {m['clip_seconds']} s clips; prompt {m['template']!r}"
            )
        click.echo(f"device:   {report['device']} (metal: {report['metal']})")
        cpu = report["cpu"]
        if cpu["fast_paths"]:
            click.echo(
                f"cpu:      {cpu['workers']} worker threads; BLAS {cpu['blas']}; "
                f"malloc tuned {cpu['malloc_tuned']}"
            )
        else:
            click.echo("cpu:      CPU-only paths off (the code Metal and CUDA run)")
        click.echo("settings: " + ", ".join(f"{k}={v}" for k, v in report["settings"].items()))
        click.echo("versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v))
    if "error" in report["model"]:
        sys.exit(1)
