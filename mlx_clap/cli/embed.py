"""`mlx-clap embed`, `mlx-clap embed-text` and `mlx-clap info`.

`embed` parses its options, calls the library (mlx_clap.sync: the inputs, the plan against the store, the
run that decodes ahead in threads and embeds in batches, the error and warning records) and prints: a
progress bar in audio seconds, one line per failure, and the summary. Output goes to a store
(mlx_clap.store), one JSON per file, or JSON lines on stdout. Reruns resume; failures are recorded and
the run goes on.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import click

from mlx_clap.cli.common import load_model_or_exit, model_option, trust_pickle_option
from mlx_clap.cli.output import INTERRUPTED_MESSAGE, INTERRUPTED_STATUS, printable
from mlx_clap.cli.stores import holds_store
from mlx_clap.cli.targets import STORE
from mlx_clap.cli.writers import JsonlWriter, JsonWriter
from mlx_clap.extras import install_hint
from mlx_clap.preprocess.decode_ahead import InputFile
from mlx_clap.sync.inputs import collect_inputs, describe_ignored, estimate_seconds  # noqa: F401 (tests)
from mlx_clap.sync.run import EmbedRun, Progress

LONG_AUDIO_CHOICES = ("windows-mean", "head", "center", "fusion", "reference")
SEED_RANGE = click.IntRange(0, 2**32 - 1)  # what numpy's RandomState (the LAION reference crops) takes

# Exit statuses of `embed` (0: nothing failed; 2: usage; 130: Ctrl-C): a cron job alerts on 1 only.
NEW_FAILURES_STATUS = 1
KNOWN_FAILURES_STATUS = 3


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses nan, which compares false with both bounds and so passes."""

    name = "float range"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


class BarProgress(Progress):
    """The run's progress on stderr: a tqdm bar in audio seconds (none with -q) and a line per failure,
    written above the bar."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.wants_estimates = not quiet
        self.bar: Any = None

    def planned(self, skipped: int, todo: int) -> None:
        if not self.quiet and skipped:
            click.echo(f"{skipped} file(s) already embedded with these settings: skipped", err=True)

    def start(self, total_seconds: float) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=total_seconds,
            unit="s",
            desc="audio",
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s "
            "[{elapsed}<{remaining}{postfix}]",
            disable=self.quiet,
            file=sys.stderr,
            dynamic_ncols=True,
            smoothing=0.1,
        )

    def advance(self, seconds: float) -> None:
        if self.bar is not None:
            self.bar.update(seconds)

    def status(self, files_done: int, files_total: int, realtime: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(
                f"{files_done}/{files_total} files, {realtime:.1f}x realtime", refresh=False
            )

    def failed(self, path: str, cause: str) -> None:
        msg = f"error: {printable(path)}: {printable(cause)}"
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            click.echo(msg, err=True)

    def problem(self, message: str) -> None:
        click.echo(f"error: {message}", err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------- inputs and messages
def rows_under(out: Path | str | None, path: str) -> int:
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


def vanished_hint(out: Path | str | None, missing: list[tuple[str, str]], prune_missing: bool) -> str | None:
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


# ------------------------------------------------------------------------------------------ commands
@click.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("-r", "--recursive", is_flag=True, help="Descend into sub-folders of folder arguments.")
@model_option
@trust_pickle_option
@click.option(
    "--out",
    "out",
    type=STORE,
    help="Output: a store folder or an object-store URI (s3://bucket/prefix), or a folder for --format json.",
)
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
    help="Decoder threads (with --engine ray: Ray workers, each one model copy).",
)
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: this process; ray: decode and embed on a Ray cluster (the `ray` extra), "
    "--workers actors writing into the same store, committed in chunks (a killed job resumes). "
    "Example: mlx-clap embed /shared/archive -r --out s3://bucket/vectors --engine ray "
    "--ray-address auto --workers 8",
)
@click.option(
    "--ray-address",
    metavar="ADDR",
    default=None,
    help="With --engine ray: the cluster to join ('auto', HOST:6379, ray://HOST:10001); without it a "
    "local Ray instance starts.",
)
@click.option(
    "--gpus-per-worker",
    type=click.FloatRange(0.0, 64.0),
    default=0.0,
    show_default=True,
    help="With --engine ray: GPUs each worker takes (fractions share one).",
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
    out: Path | str | None,
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
    engine: str = "local",
    ray_address: str | None = None,
    gpus_per_worker: float = 0.0,
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

    PATHS may also be object-store URIs: s3://bucket/prefix (the audio objects under it, as a folder)
    or s3://bucket/key.wav (one object), reached with the same AWS_* settings as an s3:// store; rows
    are named by the URI, and an object is unchanged while its size and mtime are.

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
      mlx-clap embed s3://bucket/audio -r --out s3://bucket/vectors
    """
    fmt = fmt or ("store" if out is not None else "jsonl")
    if fmt in ("store", "json") and out is None:
        raise click.UsageError(f"--format {fmt} needs --out DIR")
    if fmt == "jsonl" and out is not None:
        raise click.UsageError("--format jsonl writes to stdout; redirect it instead of giving --out")
    if fmt == "json" and isinstance(out, str):  # STORE keeps a URI as a str (a folder is a Path)
        raise click.UsageError(f"--format json writes a local folder; use the store format for {out}")
    if seed is not None and long_audio != "reference":
        click.echo("note: --seed only matters with --long-audio reference", err=True)
    if segments and fmt != "store":
        raise click.UsageError("--segments needs a store (--out DIR, --format store)")
    if segments and long_audio != "windows-mean":
        raise click.UsageError("--segments needs --long-audio windows-mean (the file vector is their mean)")
    if prune_missing and fmt != "store":
        raise click.UsageError("--prune-missing removes rows of a store: it needs --out DIR (--format store)")
    if engine == "ray" and fmt != "store":
        raise click.UsageError("--engine ray writes a store: it needs --out DIR (--format store)")
    if engine != "ray" and (ray_address is not None or gpus_per_worker):
        raise click.UsageError("--ray-address and --gpus-per-worker need --engine ray")
    if engine == "ray":
        from importlib.util import find_spec

        if find_spec("ray") is None:  # said before the model loads, not after
            raise click.ClickException(f"--engine ray needs Ray: {install_hint('ray')}")
    if prune_missing and no_prune:
        raise click.UsageError("--prune-missing and --no-prune ask for opposite things: choose one")
    inputs = collect_inputs(paths, recursive, excludes)
    files, missing, ignored = inputs.files, inputs.missing, inputs.ignored
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
        from mlx_clap.sync.manifest import wanted_settings
        from mlx_clap.sync.plan import MirrorRequest, already_mirrored

        wanted = wanted_settings(long_audio, seed, quantize_int16, dtype)
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
    if long_audio == "fusion" and model.config.feature_config.truncation != "fusion":
        raise click.UsageError("--long-audio fusion needs a fused model (e.g. laion/clap-htsat-fused)")
    if segments and not hasattr(model, "embed_segments"):
        raise click.UsageError(f"--segments is not supported for the model {model_id!r}")
    options = dict(
        long_audio=long_audio,
        seed=seed,
        quantize_int16=quantize_int16,
        compute_dtype=dtype,
        overwrite=overwrite,
        batch_size=batch_size,
        workers=workers,
    )
    progress = BarProgress(quiet)
    if fmt == "store":
        engine_fn = None
        if engine == "ray":
            engine_fn = ray_engine(model_id, trust_pickle, ray_address, workers, gpus_per_worker)
        store_options = dict(
            store_dtype=store_dtype,
            segments=segments,
            hop=hop,
            no_prune=no_prune,
            prune_missing=prune_missing,
        )
        summary, failures, interrupted = embed_store(
            inputs, out, model, model_id, {**options, **store_options}, progress, engine_fn
        )
    else:
        summary, failures, interrupted = embed_json(inputs, out, fmt, model, model_id, options, progress)
    if summary_json:
        click.echo(json.dumps(summary), err=(fmt == "jsonl"))
    elif not quiet:
        click.echo(final_line(summary, summary["errors_file"]), err=True)
    if ignored and not quiet and not summary_json:
        click.echo(f"note: {describe_ignored(ignored)}", err=True)
    if interrupted:
        sys.exit(INTERRUPTED_STATUS)  # the group leaves through os._exit (mlx_clap.cli.__init__)
    if summary["new_failures"]:
        sys.exit(NEW_FAILURES_STATUS)
    if failures:
        sys.exit(KNOWN_FAILURES_STATUS)


def output_failed(exc: BaseException) -> click.ClickException:
    """The output cannot be written (disk full, permissions, ...): one line, and how to go on."""
    return click.ClickException(
        f"cannot write the output ({exc}); what was written before is kept: "
        "fix the cause and rerun the same command to resume"
    )


def embed_store(
    inputs: Any, out: Path | str, model: Any, model_id: str, options: dict, progress: BarProgress, engine: Any
) -> tuple[dict, list[dict], bool]:
    """Sync the store in `out` through the library (mlx_clap.sync.api.SyncJob), with the command's
    wording for what it refuses. Returns (summary, failures, interrupted)."""
    from mlx_clap.store import StoreBusyError, StoreError
    from mlx_clap.sync.api import LibraryFoldersError, SegmentsKeptError, SyncInterrupted, SyncJob

    try:
        job = SyncJob(inputs, out, model, model_id=model_id, **options)
    except SegmentsKeptError as exc:
        raise click.UsageError(f"{out} keeps segments: it needs --long-audio windows-mean") from exc
    except (StoreBusyError, LibraryFoldersError) as exc:  # --overwrite would not help
        raise click.ClickException(str(exc)) from exc
    except StoreError as exc:
        if "another pipeline" in str(exc):
            raise click.ClickException(
                f"{exc}. Use --overwrite to start fresh there, or choose another --out."
            ) from exc
        raise click.ClickException(f"{exc}. Use --overwrite to start fresh, or another --out.") from exc
    except OSError as exc:
        raise click.ClickException(f"{out}: cannot write the store ({exc})") from exc
    interrupted = False
    with job:
        job.make_plan()
        try:
            report = job.run(progress, engine)
        except SyncInterrupted as exc:
            interrupted = True
            click.echo(INTERRUPTED_MESSAGE, err=True)
            report = exc.report
        except (OSError, StoreError) as exc:
            raise output_failed(exc) from exc
    for problem in report.problems:
        click.echo(f"error: {printable(problem)}", err=True)
    return report.summary, report.summary["failures"], interrupted


def embed_json(
    inputs: Any, out: Path | None, fmt: str, model: Any, model_id: str, options: dict, progress: BarProgress
) -> tuple[dict, list[dict], bool]:
    """One JSON per file under `out` (--format json) or JSON lines on stdout, through the library
    (mlx_clap.sync.api.embed_into) with the command's writers. Returns (summary, failures, interrupted)."""
    from mlx_clap.sync.api import SyncInterrupted, embed_into
    from mlx_clap.sync.manifest import build_manifest, pipeline_settings

    settings = pipeline_settings(
        model, options["long_audio"], options["seed"], options["quantize_int16"], options["compute_dtype"]
    )
    manifest = build_manifest(model, model_id, settings, None)
    meta = {"model": model_id, "weights_sha256": manifest["weights_sha256"], "settings": settings}
    json_out = fmt == "json"
    writer: Any = JsonWriter(out, manifest, options["overwrite"]) if json_out else JsonlWriter(manifest)
    interrupted = False
    try:
        report = embed_into(
            writer,
            inputs,
            model,
            settings,
            meta,
            is_done=writer.is_done if json_out else None,
            log_dir=out if json_out else None,
            out=str(out) if out else None,
            fmt=fmt,
            overwrite=options["overwrite"],
            batch_size=options["batch_size"],
            workers=options["workers"],
            progress=progress,
        )
    except SyncInterrupted as exc:
        interrupted = True
        click.echo(INTERRUPTED_MESSAGE, err=True)
        report = exc.report
    except OSError as exc:
        raise output_failed(exc) from exc
    for problem in report.problems:
        click.echo(f"error: {printable(problem)}", err=True)
    return report.summary, report.summary["failures"], interrupted


def ray_engine(model_id: str, trust_pickle: bool, address: str | None, workers: int, gpus: float) -> Any:
    """The library's engine hook (SyncJob.run) for --engine ray, with its errors as one line."""
    from mlx_clap.sync.ray_engine import RayEngine, RayEngineError, RayOptions

    options = RayOptions(address=address, workers=workers, gpus_per_worker=gpus)
    inner = RayEngine(options, model_id, trust_pickle)

    def engine(job: Any, run: EmbedRun, todo: list[InputFile]) -> None:
        try:
            inner(job, run, todo)
        except RayEngineError as exc:
            raise click.ClickException(
                f"--engine ray: {exc}; what was committed is kept: fix the cause and rerun the same command"
            ) from exc

    return engine


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
