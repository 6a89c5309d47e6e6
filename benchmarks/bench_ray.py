"""Embed throughput: the single-process `mlx-clap embed` against `--engine ray` with 1 and 2 workers.

Writes FILES clips of SECONDS seconds of noise (48 kHz mono WAV) and embeds them into a fresh store with
each engine, each command in its own subprocess (Python start, imports, model load, Ray start included,
as a user runs it), with the full-size htsat-tiny architecture with random weights (`mlx-clap
random-model`: the shape and the cost of laion/clap-htsat-unfused, no download). Reports wall time and
audio seconds embedded per wall second, and the time of the same command on a single clip (the fixed
cost: Python start, model load, and for Ray its start and the workers' model loads) with the throughput
without it, which is what a long job sees.

    python benchmarks/bench_ray.py --files 24 --seconds 30 --repeat 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

SR = 48000


def write_clips(folder: Path, files: int, seconds: float) -> float:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(files):
        sf.write(
            folder / f"clip{i:04d}.wav", (0.1 * rng.standard_normal(int(seconds * SR))).astype(np.float32), SR
        )
    return files * seconds


def embed(lib: Path, model: Path, out: Path, *extra: str) -> tuple[float, dict]:
    """Wall seconds of one `mlx-clap embed` subprocess, and its --summary-json."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "mlx_clap.cli", "embed", str(lib), "--model", str(model), "--out", str(out)]
    t0 = time.perf_counter()
    res = subprocess.run([*cmd, "-q", "--summary-json", *extra], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd + list(extra))} failed ({res.returncode}):\n{res.stderr[-2000:]}")
    return wall, json.loads(res.stdout.strip().splitlines()[-1])


def uptime() -> str:
    """The machine's load (the figures are only comparable within one run on a shared machine)."""
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=48)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--arch", default="htsat-tiny", help="mlx-clap random-model --arch")
    ap.add_argument("--repeat", type=int, default=1, help="rounds over the engines (medians reported)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    before = uptime()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = root / "model"
        subprocess.run(
            [sys.executable, "-m", "mlx_clap.cli", "random-model", str(model), "--arch", args.arch],
            check=True,
            capture_output=True,
        )
        audio = write_clips(root / "lib", args.files, args.seconds)
        write_clips(root / "one", 1, args.seconds)
        engines = [("single process", ())]
        engines += [
            (f"--engine ray --workers {n}", ("--engine", "ray", "--workers", str(n))) for n in args.workers
        ]
        walls: dict[str, list[float]] = {name: [] for name, _ in engines}
        fixed: dict[str, list[float]] = {name: [] for name, _ in engines}
        # Rounds interleave the engines, so a change in the machine's load falls on all of them alike.
        for _ in range(args.repeat):
            for name, extra in engines:
                fixed[name].append(embed(root / "one", model, root / "out", *extra)[0])
                wall, summary = embed(root / "lib", model, root / "out", *extra)
                assert summary["embedded"] == args.files, summary
                walls[name].append(wall)
        rows = [(name, statistics.median(walls[name]), statistics.median(fixed[name])) for name, _ in engines]
    print(f"{args.files} files x {args.seconds:g} s = {audio:g} s of audio, random-weight {args.arch},")
    print(f"medians of {args.repeat} interleaved round(s)")
    print(f"uptime before: {before}\nuptime after:  {uptime()}")
    print("| engine | wall s | audio s / s | one-clip run s | audio s / s without it |")
    print("|---|---|---|---|---|")
    for name, wall, once in rows:
        steady = f"{audio / (wall - once):.1f}" if wall > once else ""
        print(f"| {name} | {wall:.1f} | {audio / wall:.1f} | {once:.1f} | {steady} |")


if __name__ == "__main__":
    main()
