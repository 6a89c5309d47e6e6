"""Paired PE-Audio benchmark: mlx-clap vs transformers (PeAudioModel / PeAudioFrameLevelModel), one process.

Both sides are the released architecture (606 M parameters) with every parameter randomized
(tests/pe_audio_reference.py), saved once as a hub folder under the bench cache and loaded from it: by
transformers with `from_pretrained`, by mlx-clap in place (`mlx_clap.load`). Parts:

  audio   10-s, 60-s and 10-min clips -> unit pooled embedding (PeAudioModel). mlx-clap's default
          (`embed_audio`, "windows-mean": 30-s windows) and, with --one-pass, its one pass over a clip
          longer than a window ("reference"); transformers' feature extractor + one pass, its only
          mode, for clips up to --torch-max-seconds (its pass over a whole 10-min clip holds the
          codec's activations for all of it: tens of GB); past that, transformers on the same 30-s
          windows as mlx-clap, one at a time, and their mean (the same work).
  frames  the same clips -> 40-ms frame embeddings (PeAudioFrameLevelModel): `embed_frames` (chunks of
          30 s + 5 s of context) against transformers' one pass (past --torch-max-seconds: on the same
          chunks, one at a time).
  text    8 captions -> unit text embeddings, batch 1 and 8.
  memory  peak memory of a streamed file of --memory-seconds (default 2 h) and of a shorter one
          (--memory-short-seconds, default 60), each in a child process: `embed_audio(path)` (pooled)
          and `embed_segments(path)` (frames pooled to 2 s, what `embed --segments` stores); peak
          RSS, and MLX's peak on a GPU.

One warm-up call on the first clip of each measurement, then the median of --repeats (one call for
clips over 60 s); MLX results
are forced with `mx.eval`, PyTorch on a GPU synchronized. A timed call predicted (from the shorter
clip before it) to take more than --max-seconds is skipped and listed. `uptime` is printed beside
the figures: on a shared machine compare the ratios of one run, not times across runs.

    python benchmarks/bench_pe_audio.py --quick                  # 10-s and 60-s clips, no memory part
    python benchmarks/bench_pe_audio.py                          # everything (hours on 2 CPU cores)
    python benchmarks/bench_pe_audio.py --device gpu --torch-device cuda --torch-max-seconds 600

Writes benchmarks/results/pe-audio[-<tag>].json and .md.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (sets sys.path, HF offline, the Linux CPU BLAS)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

SR = 48000
CAPTIONS = [
    "glass breaking",
    "a dog barks in the distance while rain falls on a tin roof",
    "crowd noise and applause after a song",
    "a radio jingle",
    "somebody speaking quietly",
    "an orchestra tunes up before the concert begins",
    "thunder rolls over the hills",
    "a car engine starts and drives away on gravel",
]


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "?"


def signal_of(seconds: float, seed: int = 0) -> np.ndarray:
    """Tones that change every 10 s plus quiet noise, float32 at 48 kHz."""
    from pe_audio_reference import make_signal

    n = int(seconds * SR)
    return (
        make_signal(n, seed) if n <= 60 * SR else np.tile(make_signal(60 * SR, seed), -(-n // (60 * SR)))[:n]
    )


def same_pieces(ours: Any, wave: np.ndarray, frame_level: bool) -> list[Any]:
    """What mlx-clap runs the model on for a long clip, for transformers to run too: the 30-s windows of
    "windows-mean", or the frame chunks of `embed_frames` as (samples, first kept frame, kept frames)."""
    from mlx_clap.pipeline.pe_audio import CHUNK_SECONDS, CONTEXT_SECONDS, frame_chunks
    from mlx_clap.preprocess.windows import sliding_windows

    fam = ours.family
    if not frame_level:
        return list(sliding_windows([wave], fam.clip_samples))
    core = fam._whole_frames(CHUNK_SECONDS) // fam.hop
    context = round(CONTEXT_SECONDS * fam.sampling_rate / fam.hop)
    chunks = frame_chunks([wave], fam.hop, core, context, lambda clip: clip)
    return [(samples, first, kept) for _, samples, first, kept, _ in chunks]


def hub_folder(frame_level: bool, seed: int = 0, tiny: bool = False) -> Path:
    """A full-size (or, for a smoke run, the tests' tiny) random PE-A hub folder with its tokenizer,
    built once under the bench cache."""
    from pe_audio_reference import (
        TINY_AUDIO,
        TINY_TEXT,
        modernbert_tokenizer,
        random_pe_audio,
        save_pe_folder,
    )

    kind = ("frame" if frame_level else "pooled") + ("-tiny" if tiny else "")
    folder = common.cache_dir() / f"pe-audio-{kind}-seed{seed}" / "hf"
    if not (folder / "model.safetensors").is_file():
        sizes = (TINY_AUDIO, TINY_TEXT) if tiny else (None, None)
        ref = random_pe_audio(frame_level, *sizes, seed=seed)
        save_pe_folder(ref, folder, modernbert_tokenizer())
        del ref
        gc.collect()
    return folder


class Bench:
    def __init__(self, args: argparse.Namespace):
        import torch

        self.args = args
        self.torch = torch
        self.sync_t = common.torch_sync(args.torch_device)
        self.rows: list[dict[str, Any]] = []
        self.skipped: list[str] = []
        self.memory_rows: list[dict[str, Any]] = []

    def models(self, frame_level: bool) -> tuple[Any, Any, Path]:
        import transformers

        import mlx_clap

        folder = hub_folder(frame_level, tiny=self.args.tiny)
        cls = transformers.PeAudioFrameLevelModel if frame_level else transformers.PeAudioModel
        ref = cls.from_pretrained(folder, dtype=self.torch.float32).eval().to(self.args.torch_device)
        return ref, mlx_clap.load(folder), folder

    def time(
        self, name: str, fn: Any, sync: Any, seconds: float, repeats: int, warm: bool = False
    ) -> dict[str, Any] | None:
        """`common.measure` unless the previous clip's time predicts more than --max-seconds; `warm`: the
        model already ran (under another name), no warm-up call."""
        last = next((r for r in reversed(self.rows) if r["name"] == name), None)
        if last is not None:
            predicted = last["median_s"] * seconds / last["clip_s"]
            if predicted > self.args.max_seconds:
                self.skipped.append(f"{name} {seconds:g} s (predicted {predicted:.0f} s)")
                return None
        # One warm-up per measurement, on its first clip: a long clip's warm-up would only double its cost.
        res = common.measure(
            fn, sync, warmup=int(last is None and not warm), repeats=repeats, budget_s=self.args.max_seconds
        )
        row = {"name": name, "clip_s": seconds, **res}
        self.rows.append(row)
        print(f"  {name:<34} {seconds:>6g} s  {res['median_s']:8.3f} s  ({res['n']} timed)", flush=True)
        return row

    # ------------------------------------------------------------------------------------- parts
    def audio(self, frame_level: bool) -> None:
        torch = self.torch
        from pe_audio_reference import feature_batch

        ref, ours, _ = self.models(frame_level)
        kind = "frames" if frame_level else "audio"
        none = lambda _: None  # noqa: E731  (numpy results: nothing left to force)
        for seconds in self.args.clips:
            wave = signal_of(seconds)
            reps = self.args.repeats if seconds <= 60 else 1
            whole = seconds <= self.args.torch_max_seconds  # one pass over 10 min: 12 GB of attention a layer
            # Up to one 30-s window, windows-mean is the one pass: timed once, as "windows-mean".
            one_pass = whole and self.args.one_pass and seconds > 30
            if frame_level:
                self.time(
                    "mlx embed_frames", lambda w=wave: ours.embed_frames(w).vectors, none, seconds, reps
                )
            else:
                self.time(
                    "mlx embed_audio (windows-mean)", lambda w=wave: ours.embed_audio(w), none, seconds, reps
                )
                if one_pass:
                    one = lambda w=wave: ours.embed_audio(w, long_audio="reference")  # noqa: E731
                    self.time("mlx embed_audio (one pass)", one, none, seconds, reps)

            def reference(w: np.ndarray = wave) -> Any:
                x = torch.from_numpy(feature_batch([w])["input_values"]).to(self.args.torch_device)
                with torch.no_grad():
                    out = ref.audio_encoder(input_values=x)
                    h = out.last_hidden_state if frame_level else out.pooler_output
                    return torch.nn.functional.normalize(ref.audio_head(h), dim=-1)

            if whole:
                sync = lambda _: self.sync_t()  # noqa: E731
                self.time(f"transformers {kind} (one pass)", reference, sync, seconds, reps)
                continue
            # Past --torch-max-seconds its one pass does not fit: transformers runs the same pieces as
            # mlx-clap (30-s windows, their mean; or the 30-s chunks with 5 s of context), one at a time.
            pieces = same_pieces(ours, wave, frame_level)
            if frame_level:

                def windowed(pieces: list = pieces) -> Any:
                    return [reference(chunk)[0, first : first + kept] for chunk, first, kept in pieces]

                name = "transformers frames (same 30-s chunks)"
            else:

                def windowed(pieces: list = pieces) -> Any:
                    mean = sum(reference(window)[0] for window in pieces)
                    return torch.nn.functional.normalize(mean, dim=-1)

                name = "transformers audio (same 30-s windows)"
            ran = any(r["name"].startswith(f"transformers {kind}") for r in self.rows)
            self.time(name, windowed, lambda _: self.sync_t(), seconds, reps, warm=ran)
        ref = ours = None  # both models freed before the next part builds its own
        gc.collect()

    def text(self) -> None:
        torch = self.torch
        from pe_audio_reference import hf_tokens

        ref, ours, folder = self.models(False)
        device = self.args.torch_device
        for batch in (1, 8):
            texts = CAPTIONS[:batch]
            self.time(f"mlx embed_text b{batch}", lambda t=texts: ours.embed_text(t), lambda _: None, 1.0, 5)
            tokens = hf_tokens(folder, texts)

            def reference(tok: dict = tokens) -> Any:
                ids = torch.from_numpy(tok["input_ids"].astype(np.int64)).to(device)
                mask = torch.from_numpy(tok["attention_mask"].astype(np.int64)).to(device)
                with torch.no_grad():
                    out = ref.text_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
                    e = ref.text_audio_head(out.hidden_states[-1][:, 0])
                    return torch.nn.functional.normalize(e, dim=-1)

            self.time(f"transformers text b{batch}", reference, lambda _: self.sync_t(), 1.0, 5)
        ref = ours = None
        gc.collect()

    def memory(self) -> None:
        for seconds in sorted({float(self.args.memory_short_seconds), float(self.args.memory_seconds)}):
            for what in self.args.memory_what:
                cmd = [
                    sys.executable,
                    __file__,
                    "--child-memory",
                    what,
                    str(seconds),
                    "--device",
                    self.args.device,
                    "--memory-batch-size",
                    str(self.args.memory_batch_size),
                    *(["--tiny"] if self.args.tiny else []),
                ]
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                wall = time.perf_counter() - t0
                if proc.returncode != 0:
                    raise SystemExit(f"memory child failed:\n{proc.stderr[-3000:]}")
                row = {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": wall}
                print(
                    f"  memory {what:<15} {seconds:>7g} s  peak RSS {row['peak_rss_mib']:.0f} MiB", flush=True
                )
                self.memory_rows.append(row)


def child_memory(what: str, seconds: float, tiny: bool, batch_size: int) -> None:
    """Embed a streamed FLAC of `seconds` (written block by block) and print the peaks as JSON."""
    import tempfile

    import soundfile as sf
    from mlx.utils import tree_flatten

    import mlx_clap

    folder = hub_folder(frame_level=what == "embed_segments", tiny=tiny)
    model = mlx_clap.load(folder)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "long.flac"
        with sf.SoundFile(str(path), "w", samplerate=SR, channels=1, format="FLAC", subtype="PCM_16") as f:
            block = signal_of(60.0)
            for start in range(0, int(seconds * SR), block.size):
                f.write(block[: min(block.size, int(seconds * SR) - start)])
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        if what == "embed_audio":
            result = model.embed_audio(path, batch_size=batch_size)
            shape = list(result.shape)
        else:
            result = model.family.embed_segments(path, hop_seconds=2.0, batch_size=batch_size)
            shape = list(result.vectors.shape)
        elapsed = time.perf_counter() - t0
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    weights = sum(v.nbytes for _, v in tree_flatten(model.model.parameters()))
    print(
        json.dumps(
            {
                "what": what,
                "audio_s": seconds,
                "batch_size": batch_size,
                "embed_s": elapsed,
                "shape": shape,
                "peak_rss_mib": kb / 1024 if sys.platform != "darwin" else kb / 2**20,
                "mlx_peak_mib": mx.get_peak_memory() / 2**20,
                "weights_mib": weights / 2**20,
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", default=["audio", "frames", "text", "memory"])
    p.add_argument("--clips", nargs="+", type=float, default=[10.0, 60.0, 600.0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--one-pass", action="store_true", help="also time mlx-clap's one pass over clips > 30 s")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="MLX device")
    p.add_argument("--torch-device", default="cpu")
    p.add_argument("--torch-max-seconds", type=float, default=60.0, help="longest clip for transformers")
    p.add_argument("--max-seconds", type=float, default=600.0, help="skip a call predicted to be longer")
    p.add_argument("--memory-seconds", type=float, default=7200.0, help="the long file of the memory part")
    p.add_argument("--memory-short-seconds", type=float, default=60.0, help="the file it is compared with")
    p.add_argument("--memory-what", nargs="+", default=["embed_audio", "embed_segments"])
    p.add_argument(
        "--memory-batch-size",
        type=int,
        default=8,
        help="windows (or frame chunks) per model call: 8 is the default",
    )
    p.add_argument("--quick", action="store_true", help="10-s and 60-s clips, one repeat, no memory part")
    p.add_argument("--tag", default="")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    p.add_argument(
        "--tiny", action="store_true", help="the tests' tiny architecture: a smoke run of the script"
    )
    p.add_argument("--child-memory", nargs=2, metavar=("WHAT", "SECONDS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    if args.child_memory:
        child_memory(args.child_memory[0], float(args.child_memory[1]), args.tiny, args.memory_batch_size)
        return
    if args.quick:
        args.clips, args.repeats = [10.0, 60.0], 1
        args.parts = [x for x in args.parts if x != "memory"]
    common.stop_on_sigterm()
    before = uptime()
    print(before, flush=True)
    bench = Bench(args)
    t0 = time.perf_counter()
    interrupted = False
    try:  # a SIGTERM (`timeout`) or Ctrl-C still saves what was measured
        if "audio" in args.parts:
            bench.audio(frame_level=False)
        if "frames" in args.parts:
            bench.audio(frame_level=True)
        if "text" in args.parts:
            bench.text()
        if "memory" in args.parts:
            bench.memory()
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: saving what was measured", flush=True)
    memory = bench.memory_rows
    after = uptime()
    print(after, flush=True)
    data = {
        "environment": common.environment(args.torch_device),
        "args": vars(args),
        "uptime_before_after": [before, after],
        "rows": bench.rows,
        "memory": memory,
        "skipped": bench.skipped,
        "interrupted": interrupted,
        "total_s": time.perf_counter() - t0,
    }
    md = [f"# PE-Audio: mlx-clap vs transformers ({args.device} / {args.torch_device})\n", f"`{after}`\n"]
    timings = [[r["name"], r["clip_s"], r["median_s"], r["n"]] for r in bench.rows]
    md.append(common.md_table(["what", "clip s", "median s", "timed"], timings))
    if memory:
        headers = ["what", "audio s", "batch", "embed s", "peak RSS MiB", "MLX peak MiB", "weights MiB"]
        keys = ["what", "audio_s", "batch_size", "embed_s", "peak_rss_mib", "mlx_peak_mib", "weights_mib"]
        md.append("\n" + common.md_table(headers, [[m[k] for k in keys] for m in memory]))
    if bench.skipped:
        md.append("\nnot run: " + "; ".join(bench.skipped) + "\n")
    if interrupted:
        md.append("\n**interrupted**: the rows above are what finished.\n")
    name = "pe-audio" + (f"-{args.tag}" if args.tag else "")
    for path in common.save(name, data, "\n".join(md), args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
