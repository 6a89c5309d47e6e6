"""`mlx-clap embed`, `mlx-clap embed-text` and `mlx-clap info`.

`embed` decodes files in worker threads ahead of the model (a bounded window of files in flight), embeds
them in batches through `ClapModel.embed_waveforms` / `embed_windows` (the code path of
`ClapModel.embed_audio`, so the vectors are the same), and writes an `EmbeddingStore`, one JSON per file,
or JSON lines on stdout. Reruns resume; failures are recorded and the run goes on.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

DEFAULT_MODEL = "laion/clap-htsat-unfused"
LONG_AUDIO_CHOICES = ("windows-mean", "head", "center", "fusion", "reference")
# Suffixes picked up inside folders; files named on the command line are always tried.
AUDIO_SUFFIXES = {
    ".wav", ".wave", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".m4b", ".aac", ".alac",
    ".aif", ".aiff", ".aifc", ".caf", ".mp4", ".wma", ".webm", ".mka", ".w64", ".au", ".snd",
}  # fmt: skip
JSON_MANIFEST = ".mlx-clap-manifest.json"
ERRORS_NAME = "errors.jsonl"
# In windows-mean mode a file longer than this is embedded while it decodes (bounded memory).
STREAM_AFTER_S = 30.0
# Decoded audio held ahead of the model, at most (the file the model needs next may always exceed it).
DECODE_BUDGET_BYTES = 1 << 30


# ------------------------------------------------------------------------------------------ inputs
@dataclass
class InputFile:
    path: Path  # absolute, symlinks not resolved (the name the user knows)
    rel: Path  # relative to the common root of the inputs: mirrored under --out for --format json


def discover(paths: tuple[str, ...], recursive: bool) -> tuple[list[InputFile], list[tuple[str, str]]]:
    """Files to embed (sorted, de-duplicated) and (path, cause) for arguments that do not exist."""
    missing: list[tuple[str, str]] = []
    found: list[Path] = []
    roots: list[Path] = []
    for raw in paths:
        p = Path(os.path.abspath(os.path.expanduser(raw)))
        if p.is_dir():
            roots.append(p)
            if recursive:
                walked = []
                for dirpath, dirnames, filenames in os.walk(p):
                    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                    walked += [Path(dirpath) / f for f in filenames if _is_audio_name(f)]
                found += sorted(walked)
            else:
                found += sorted(c for c in p.iterdir() if _is_audio_name(c.name) and not c.is_dir())
        elif p.exists() or p.is_symlink():
            roots.append(p.parent)
            found.append(p)
        else:
            missing.append((str(p), "no such file or folder"))
    if not found:
        return [], missing
    common = Path(os.path.commonpath([str(r) for r in roots]))
    seen: set[Path] = set()
    files = []
    for f in found:
        if f not in seen:
            seen.add(f)
            files.append(InputFile(f, f.relative_to(common)))
    return files, missing


def _is_audio_name(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in AUDIO_SUFFIXES


def _stat_key(path: Path) -> tuple[str, int, float]:
    st = os.stat(path)
    return (str(path), int(st.st_size), float(st.st_mtime))


# ---------------------------------------------------------------------------------------- decoding
@dataclass
class Decoded:
    """A decoded file: whole `samples`, or `blocks` still streaming from a decoder thread."""

    file: InputFile
    key: tuple[str, int, float]
    stream: Any  # mlx_clap.audio.AudioStream (metadata final once decoding has finished)
    samples: Any = None
    blocks: Iterator | None = None
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    nbytes: int = 0  # taken from the MemoryBudget; given back once embedded


class MemoryBudget:
    """Bytes of decoded audio that decoder threads may hold ahead of the model.

    A decoder waits while the budget is spent, except for the file the model consumes next (`advance`),
    which always proceeds: so there is no deadlock, and memory is about the budget plus that one file.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.next_index = 0
        self.closed = False
        self._cond = threading.Condition()

    def acquire(self, nbytes: int, index: int) -> None:
        with self._cond:
            while self.used + nbytes > self.limit and index > self.next_index and not self.closed:
                self._cond.wait(0.5)
            self.used += nbytes

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.used -= nbytes
            self._cond.notify_all()

    def advance(self, index: int) -> None:
        with self._cond:
            self.next_index = index
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


_END = object()


class _BlockFeed:
    """Run the rest of a block iterator in a daemon thread, `maxsize` blocks ahead of the reader."""

    def __init__(self, head: list, it: Iterator, maxsize: int = 4):
        self._head = head
        self._q: queue.Queue = queue.Queue(maxsize=maxsize)
        self._cancel = threading.Event()
        threading.Thread(target=self._run, args=(it,), daemon=True).start()

    def _run(self, it: Iterator) -> None:
        try:
            for block in it:
                if not self._put(block):
                    return
            self._put(_END)
        except BaseException as exc:  # handed to the reader, which reports it for this file
            self._put(exc)

    def _put(self, obj: Any) -> bool:
        while not self._cancel.is_set():
            try:
                self._q.put(obj, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def cancel(self) -> None:
        self._cancel.set()

    def __iter__(self) -> Iterator:
        yield from self._head
        self._head = []
        while True:
            obj = self._q.get()
            if obj is _END:
                return
            if isinstance(obj, BaseException):
                raise obj
            yield obj


def decode_file(
    file: InputFile, sr: int, stream_long: bool, index: int = 0, budget: MemoryBudget | None = None
) -> Decoded:
    """Decode one file (in a worker thread); errors are returned, not raised."""
    import numpy as np

    from .audio import AudioDecodeError, AudioStream

    try:
        key = _stat_key(file.path)
    except OSError:
        key = (str(file.path), -1, -1.0)
    held = 0
    try:
        stream = AudioStream(file.path, sr)
        it = iter(stream)
        blocks: list = []
        n = 0
        for block in it:
            if budget is not None:
                budget.acquire(block.nbytes, index)
                held += block.nbytes
            blocks.append(block)
            n += block.size
            if stream_long and n > STREAM_AFTER_S * sr:
                return Decoded(file, key, stream, blocks=_BlockFeed(blocks, it), nbytes=held)
        samples = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
        return Decoded(file, key, stream, samples=samples, warnings=list(stream.warnings), nbytes=held)
    except AudioDecodeError as exc:
        error = exc.cause
    except Exception as exc:  # a decoder bug must not end the batch: record it for this file
        error = f"unexpected decoder error: {type(exc).__name__}: {exc}"
    if budget is not None:
        budget.release(held)
    return Decoded(file, key, None, error=error)


# ------------------------------------------------------------------------------------------ writers
def _atomic_json(path: Path, obj: Any) -> None:
    from .fileio import atomic_write_bytes
    from .store import json_line

    atomic_write_bytes(path, json_line(obj).encode("utf-8"))


def _settings_diff(old: dict, new: dict) -> list[str]:
    keys = ("weights_sha256", "embedding_dim", "settings", "store_dtype")
    diffs = []
    for k in keys:
        if old.get(k) != new.get(k):
            if k == "settings" and isinstance(old.get(k), dict) and isinstance(new.get(k), dict):
                for sk in sorted(set(old[k]) | set(new[k])):
                    if old[k].get(sk) != new[k].get(sk):
                        diffs.append(f"{sk}: {old[k].get(sk)!r} there, {new[k].get(sk)!r} now")
            else:
                diffs.append(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now")
    return diffs


def _mismatch_error(out: Path, diffs: list[str]) -> click.ClickException:
    return click.ClickException(
        f"{out}: holds embeddings made with other settings ({'; '.join(diffs[:4])}). "
        "Use --overwrite to start fresh there, or choose another --out."
    )


class StoreWriter:
    def __init__(self, out: Path, manifest: dict, dim: int, dtype: str, overwrite: bool):
        from .store import ITEMS_NAME, MANIFEST_NAME, SHARDS_DIR, EmbeddingStore, StoreError

        self.out = out
        if overwrite and (out / MANIFEST_NAME).exists():
            # The manifest goes first, so a half-removed folder is never taken for a store.
            (out / MANIFEST_NAME).unlink()
            for name in (ITEMS_NAME, ERRORS_NAME):
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(out / SHARDS_DIR, ignore_errors=True)
        if (out / MANIFEST_NAME).exists():
            try:
                self.store = EmbeddingStore.open(out)
            except StoreError as exc:
                raise click.ClickException(
                    f"{exc}. Use --overwrite to start fresh, or another --out."
                ) from exc
            diffs = _settings_diff(self.store.manifest, manifest)
            if diffs:
                raise _mismatch_error(out, diffs)
        else:
            if out.exists() and (not out.is_dir() or any(out.iterdir())):
                raise click.ClickException(
                    f"{out}: exists and is not an embedding store; choose a new or empty folder for --out"
                )
            self.store = EmbeddingStore.create(out, manifest, dim=dim, dtype=dtype)
        self.done = self.store.done_keys()

    def write(self, records: list[dict], vectors) -> None:
        self.store.append([r["item"] for r in records], vectors)

    def error(self, path: str, cause: str) -> None:
        self.store.record_error(path, cause)


class JsonWriter:
    """One `<name>.json` per audio file, mirroring the input tree under `out`."""

    def __init__(self, out: Path, manifest: dict, overwrite: bool):
        self.out = out
        self.manifest = manifest
        self.overwrite = overwrite
        mpath = out / JSON_MANIFEST
        if mpath.exists() and not overwrite:
            try:
                old = json.loads(mpath.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise click.ClickException(f"{mpath}: unreadable ({exc}); use --overwrite") from exc
            diffs = _settings_diff(old, manifest)
            if diffs:
                raise _mismatch_error(out, diffs)
        elif out.exists() and not out.is_dir():
            raise click.ClickException(f"{out}: exists and is not a folder")
        _atomic_json(mpath, manifest)

    def target(self, file: InputFile) -> Path:
        return self.out / file.rel.parent / (file.rel.name + ".json")

    def is_done(self, file: InputFile, key: tuple) -> bool:
        if self.overwrite:
            return False
        t = self.target(file)
        if not t.is_file():
            return False
        try:
            old = json.loads(t.read_text(encoding="utf-8"))
            return (old["path"], old["size"], old["mtime"]) == key
        except (OSError, ValueError, KeyError, TypeError):
            return False  # a damaged output is made again

    def write(self, records: list[dict], vectors) -> None:
        for rec, vec in zip(records, vectors, strict=True):
            obj = {**rec["item"], **rec["meta"], "embedding": [float(x) for x in vec]}
            _atomic_json(self.target(rec["file"]), obj)

    def error(self, path: str, cause: str) -> None:
        from .store import append_lines

        append_lines(self.out / ERRORS_NAME, [{"path": path, "error": cause, "time": time.time()}])


class JsonlWriter:
    def __init__(self, manifest: dict):
        from .store import json_line

        self.manifest = manifest
        # Non-ASCII stays readable where stdout takes UTF-8; elsewhere it is escaped.
        self.utf8 = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "") == "utf8"
        self._json_line = json_line

    def write(self, records: list[dict], vectors) -> None:
        for rec, vec in zip(records, vectors, strict=True):
            obj = {**rec["item"], **rec["meta"], "embedding": [float(x) for x in vec]}
            sys.stdout.write(self._json_line(obj) if self.utf8 else json.dumps(obj, sort_keys=True) + "\n")
        sys.stdout.flush()

    def error(self, path: str, cause: str) -> None:
        pass  # reported on stderr only


# ------------------------------------------------------------------------------------------- model
def load_model_or_exit(model_id: str, dtype: str):
    """mlx_clap.load with a user-facing error (offline, unknown id, broken folder)."""
    import mlx_clap

    try:
        return mlx_clap.load(model_id, dtype=dtype)
    except Exception as exc:
        hint = ""
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") and "/" in model_id:
            hint = (
                " (HF_HUB_OFFLINE is set: the first use of a hub id needs the network once to download and"
                " convert it; afterwards it loads from the cache. Or pass --model with a converted folder.)"
            )
        raise click.ClickException(f"cannot load model {model_id!r}: {exc}{hint}") from exc


def weights_sha256(model) -> str | None:
    """sha256 of model.safetensors: from the converted folder's manifest when recorded, else hashed."""
    folder = getattr(model, "source_dir", None)
    if folder is None:
        return None
    folder = Path(folder)
    try:
        recorded = (
            json.loads((folder / "manifest.json").read_text()).get("files", {}).get("model.safetensors")
        )
        if recorded:
            return str(recorded)
    except (OSError, ValueError, AttributeError):
        pass
    weights = folder / "model.safetensors"
    if not weights.is_file():
        return None
    digest = hashlib.sha256()
    with open(weights, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(model, model_id: str, settings: dict, store_dtype: str | None) -> dict:
    from . import __version__

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

        from .audio import AudioDecodeError

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
@click.option("--model", "model_id", default=DEFAULT_MODEL, show_default=True, help="Hub id or model folder.")
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
    from .store import StoreError

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
            key = _stat_key(f.path)
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
@click.option("--model", "model_id", default=DEFAULT_MODEL, show_default=True, help="Hub id or model folder.")
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

    from .fileio import atomic_write_bytes
    from .store import json_line

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
@click.option("--model", "model_id", default=DEFAULT_MODEL, show_default=True, help="Hub id or model folder.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(model_id: str, as_json: bool) -> None:
    """Show the model (config summary), the compute device and library versions.

    \b
    Example:
      mlx-clap info --model laion/clap-htsat-unfused
    """
    import mlx.core as mx

    report: dict[str, Any] = {"device": str(mx.default_device())}
    try:
        report["metal"] = bool(mx.metal.is_available())
    except Exception:
        report["metal"] = False
    report["versions"] = _versions()
    model_info: dict[str, Any] = {"id": model_id}
    try:
        import mlx_clap

        model = mlx_clap.load(model_id)
        c = model.config
        model_info.update(
            {
                "folder": str(model.source_dir) if model.source_dir else None,
                "family": c.family,
                "source": c.source,
                "embedding_dim": c.projection_dim,
                "fused": c.feature_config.truncation == "fusion",
                "audio": {
                    "hidden_size": c.audio_config.hidden_size,
                    "depths": list(c.audio_config.depths),
                    "heads": list(c.audio_config.num_attention_heads),
                    "patch_embeds_hidden_size": c.audio_config.patch_embeds_hidden_size,
                },
                "text": {
                    "hidden_size": c.text_config.hidden_size,
                    "layers": c.text_config.num_hidden_layers,
                    "max_length": c.text_config.max_length,
                },
                "features": c.feature_config.to_dict(),
                "tokenizer": model._tokenizer is not None,
            }
        )
    except Exception as exc:
        model_info["error"] = str(exc)
    report["model"] = model_info
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    m = report["model"]
    click.echo(f"model:    {m['id']}")
    if "error" in m:
        click.echo(f"          not loadable: {m['error']}")
    else:
        a, t, f = m["audio"], m["text"], m["features"]
        click.echo(f"folder:   {m['folder']}")
        click.echo(
            f"family:   {m['family']} ({'fused' if m['fused'] else 'unfused'}), {m['embedding_dim']}-d"
        )
        click.echo(f"audio:    HTSAT hidden {a['hidden_size']}, depths {a['depths']}, heads {a['heads']}")
        click.echo(f"text:     hidden {t['hidden_size']}, {t['layers']} layers, {t['max_length']} tokens")
        click.echo(
            f"features: {f['sampling_rate']} Hz, {f['feature_size']} mels, {f['max_length_s']} s, "
            f"truncation {f['truncation']}, padding {f['padding']}"
        )
    click.echo(f"device:   {report['device']} (metal: {report['metal']})")
    click.echo("versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v))
