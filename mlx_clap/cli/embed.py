"""`mlx-clap embed`, `mlx-clap embed-text` and `mlx-clap info`.

`embed` decodes files in worker threads ahead of the model (a bounded window of files in flight), embeds
them in batches through `ClapModel.embed_waveforms` / `embed_windows` (the code path of
`ClapModel.embed_audio`, so the vectors are the same), and writes an `EmbeddingStore`, one JSON per file,
or JSON lines on stdout. Reruns resume; failures are recorded and the run goes on.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click

from mlx_clap.cli.common import load_model_or_exit, model_option, weights_sha256
from mlx_clap.cli.writers import JsonlWriter, JsonWriter, StoreWriter
from mlx_clap.preprocess.decode_ahead import (
    DECODE_BUDGET_BYTES,
    Decoded,
    InputFile,
    MemoryBudget,
    decode_file,
    discover,
    stat_key,
)

LONG_AUDIO_CHOICES = ("windows-mean", "head", "center", "fusion", "reference")


# ------------------------------------------------------------------------------------------- model
def build_manifest(model, model_id: str, settings: dict, store_dtype: str | None) -> dict:
    from mlx_clap.version import __version__

    return {
        "tool": "mlx-clap embed",
        "mlx_clap_version": __version__,
        "model": model_id,
        "model_source": model.config.source or (str(model.source_dir) if model.source_dir else None),
        "weights_sha256": weights_sha256(model),
        "embedding_dim": int(model.embedding_dim),
        "store_dtype": store_dtype,
        "settings": settings,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# --------------------------------------------------------------------------------------- the runner
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

    def fail(self, path: str, cause: str) -> None:
        self.failures.append({"path": path, "error": cause})
        msg = f"error: {path}: {cause}"
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            click.echo(msg, err=True)
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
        return {"file": d.file, "item": item, "meta": {"filename": d.file.path.name, **self.meta}}

    def _emit(self, decoded: list[Decoded], vectors) -> None:
        import numpy as np

        good = [i for i in range(len(decoded)) if np.all(np.isfinite(vectors[i]))]
        for i in range(len(decoded)):
            if i not in good:
                self.fail(decoded[i].key[0], "the model produced a non-finite embedding")
        if good:
            self.writer.write([self._record(decoded[i]) for i in good], vectors[good])
        for i in good:
            self.audio_seconds += decoded[i].stream.duration_s
        self.embedded += len(good)
        self._tick(len(decoded))

    def _tick(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)
            elapsed = max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix_str(f"{self.audio_seconds / elapsed:.1f}x realtime", refresh=False)

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

    def _embed_streaming(self, d: Decoded) -> None:
        import numpy as np

        from mlx_clap.preprocess.audio import AudioDecodeError

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
        self.bar = tqdm(
            total=len(files),
            unit="file",
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
                        pending.append(pool.submit(decode_file, f, sr, stream_long, submitted, self.budget))
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
                self.budget.close()
                raise
            finally:
                self.bar.close()

    def summary(self, total: int, skipped: int, out: str | None, fmt: str) -> dict:
        seconds = time.perf_counter() - self.t0
        return {
            "files": total,
            "embedded": self.embedded,
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
    "embeddings, renormalized; streams, any length in bounded memory), head / center (one 10-s crop), "
    "fusion (fused models, deterministic chunks), reference (the model's own random rand_trunc/fusion "
    "crops as LAION/HF do it; use --seed).",
)
@click.option("--seed", type=int, default=None, help="Seed for --long-audio reference (per file).")
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
    help="Print a JSON summary (counts, failures, seconds, realtime factor) at the end: on stdout, "
    "or on stderr with --format jsonl.",
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
    workers: int,
    quiet: bool,
    summary_json: bool,
) -> None:
    """Embed audio files (WAV, FLAC, MP3, OGG, Opus, M4A/AAC, AIFF, ...) into CLAP vectors.

    Reruns skip files already embedded with the same model and settings (same path, size and mtime).
    Files that cannot be decoded are reported on stderr and in errors.jsonl; the run goes on and exits
    with status 1 at the end.

    \b
    Examples:
      mlx-clap embed ~/Sounds --recursive --out vectors/
      mlx-clap embed a.wav b.mp3 --format jsonl > vectors.jsonl
      mlx-clap embed clips/ --out json/ --format json --long-audio head
    """
    from mlx_clap.search.store import StoreError

    fmt = fmt or ("store" if out is not None else "jsonl")
    if fmt in ("store", "json") and out is None:
        raise click.UsageError(f"--format {fmt} needs --out DIR")
    if fmt == "jsonl" and out is not None:
        raise click.UsageError("--format jsonl writes to stdout; redirect it instead of giving --out")
    if seed is not None and long_audio != "reference":
        click.echo("note: --seed only matters with --long-audio reference", err=True)
    files, missing = discover(paths, recursive)
    if not files and not missing:
        raise click.ClickException(
            "no audio files found in "
            + ", ".join(paths)
            + (" (add --recursive for sub-folders)" if not recursive else "")
        )
    model = load_model_or_exit(model_id, dtype)
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
    if fmt == "store":
        writer: Any = StoreWriter(out, manifest, model.embedding_dim, store_dtype, overwrite)
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
    run = EmbedRun(model, writer, settings, batch_size, workers, quiet, meta)
    for path, cause in missing:
        run.fail(path, cause)
    if not quiet and skipped:
        click.echo(f"{skipped} file(s) already embedded with these settings: skipped", err=True)
    interrupted = False
    try:
        run.run(todo)
    except KeyboardInterrupt:
        interrupted = True
        click.echo("interrupted: what was written is kept; rerun the same command to resume", err=True)
    except (OSError, StoreError) as exc:  # the output cannot be written (disk full, permissions, ...)
        raise click.ClickException(
            f"cannot write the output ({exc}); what was written before is kept: "
            "fix the cause and rerun the same command to resume"
        ) from exc
    summary = run.summary(len(files) + len(missing), skipped, str(out) if out else None, fmt)
    if summary_json:
        click.echo(json.dumps(summary), err=(fmt == "jsonl"))
    elif not quiet:
        click.echo(
            f"embedded {summary['embedded']}, skipped {skipped}, failed {summary['failed']} "
            f"in {summary['seconds']:.1f} s ({summary['realtime_factor'] or 0:.1f}x realtime)",
            err=True,
        )
    if interrupted:
        sys.exit(130)
    if run.failures:
        sys.exit(1)


@click.command("embed-text")
@click.argument("texts", nargs=-1, required=True)
@model_option
@click.option("--format", "fmt", type=click.Choice(["jsonl", "npy"]), default="jsonl", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), help="Output file (needed for npy; jsonl: stdout).")
@click.option(
    "--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True
)
def embed_text(texts: tuple[str, ...], model_id: str, fmt: str, out: Path | None, dtype: str) -> None:
    """Embed text prompts into the same space as the audio.

    \b
    Examples:
      mlx-clap embed-text "a dog barking" "rain on a window"
      mlx-clap embed-text "a dog barking" --format npy --out dog.npy
    """
    import numpy as np

    from mlx_clap.io.files import atomic_write_bytes
    from mlx_clap.search.store import json_line

    if fmt == "npy" and out is None:
        raise click.UsageError("--format npy needs --out FILE")
    model = load_model_or_exit(model_id, dtype)
    try:
        vectors = model.embed_text(list(texts))
    except (RuntimeError, ValueError, TypeError) as exc:
        raise click.ClickException(f"cannot embed the text with {model_id!r}: {exc}") from exc
    if fmt == "npy":
        import io

        buf = io.BytesIO()
        np.save(buf, vectors.astype(np.float32), allow_pickle=False)
        atomic_write_bytes(out, buf.getvalue())
        return
    lines = "".join(
        json_line({"text": t, "model": model_id, "embedding": [float(x) for x in v]})
        for t, v in zip(texts, vectors, strict=True)
    )
    if out is not None:
        atomic_write_bytes(out, lines.encode("utf-8"))
    else:
        sys.stdout.write(lines)


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
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(model_id: str, as_json: bool) -> None:
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

        model_info.update(describe_model(load(model_id)))
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
        click.echo(f"model:    {m['id']}")
        if "error" in m:
            click.echo(f"          not loadable: {m['error']}")
        else:
            click.echo(f"folder:   {m['folder']}")
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
                f"cpu:      {cpu['workers']} worker threads; BLAS {cpu['blas']}; malloc tuned {cpu['malloc_tuned']}"
            )
        else:
            click.echo("cpu:      CPU-only paths off (the code Metal and CUDA run)")
        click.echo("settings: " + ", ".join(f"{k}={v}" for k, v in report["settings"].items()))
        click.echo("versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v))
    if "error" in report["model"]:
        sys.exit(1)
