"""Peak memory of `mlx-clap embed` on a 2-hour file: decoding and windows-mean stream in bounded memory.

Writes a 2-hour 44.1 kHz stereo FLAC block by block (so the generator itself stays small), then runs
`mlx-clap embed` on it in a child process and reports the child's peak RSS, next to the peak RSS for a
1-minute file of the same kind: if memory is bounded, the two are close. The default model is a tiny
random-init one (the memory of the audio path does not depend on the model; `--model` takes a real one,
whose weights add a constant).

    python benchmarks/long_file_memory.py                 # 2 h, tiny model
    python benchmarks/long_file_memory.py --hours 0.5 --model laion/clap-htsat-unfused
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parent.parent


def write_flac(path: Path, seconds: float, sr: int = 44100, block_s: float = 60.0) -> None:
    """Tones plus quiet noise (compresses well), written a block at a time."""
    rng = np.random.default_rng(0)
    total = int(seconds * sr)
    with sf.SoundFile(str(path), "w", samplerate=sr, channels=2, format="FLAC", subtype="PCM_16") as f:
        for start in range(0, total, int(block_s * sr)):
            n = min(int(block_s * sr), total - start)
            t = (start + np.arange(n)) / sr
            tone = 0.2 * np.sin(2 * np.pi * (220 + 20 * np.floor(t / 10)) * t)
            noise = 0.002 * rng.standard_normal((n, 2))
            f.write((tone[:, None] + noise).astype(np.float32))


def make_tiny_model(folder: Path) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from fixtures import TINY_AUDIO, TINY_TEXT

    from mlx_clap.config import ClapAudioConfig, ClapConfig, ClapTextConfig
    from mlx_clap.io.folder import save_converted
    from mlx_clap.models.clap import ClapModel

    cfg = ClapConfig(
        audio_config=ClapAudioConfig.from_dict(TINY_AUDIO), text_config=ClapTextConfig.from_dict(TINY_TEXT)
    )
    save_converted(ClapModel(cfg), folder)


def peak_rss_of_embed(audio: Path, model: str, out: Path, batch_size: int) -> tuple[float, float, dict]:
    """Run `mlx-clap embed` in a child; return (peak RSS MiB, wall seconds, summary)."""
    code = (
        "import resource, sys, runpy\n"
        "sys.argv = ['mlx-clap'] + sys.argv[1:]\n"
        "from mlx_clap.cli import main\n"
        "try:\n"
        "    main()\n"
        "finally:\n"
        "    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "    mib = kb / 1024 if sys.platform != 'darwin' else kb / 2**20\n"
        "    print(f'PEAK_RSS_MIB {mib:.1f}', file=sys.stderr)\n"
    )
    cmd = [sys.executable, "-c", code, "embed", str(audio), "--model", model, "--out", str(out),
           "--batch-size", str(batch_size), "--summary-json", "-q", "--overwrite"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"embed failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    peak = float(next(x.split()[1] for x in proc.stderr.splitlines() if x.startswith("PEAK_RSS_MIB")))
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return peak, wall, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hours", type=float, default=2.0)
    ap.add_argument("--model", default=None, help="hub id or folder (default: a tiny random-init model)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--workdir", type=Path, default=None, help="where to write the audio (default: a temp dir)"
    )
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None:
            model = str(tmp / "tiny")
            make_tiny_model(Path(model))
        rows = []
        for label, seconds in (("1 min", 60.0), (f"{args.hours:g} h", args.hours * 3600)):
            audio = tmp / f"long-{int(seconds)}s.flac"
            t0 = time.perf_counter()
            write_flac(audio, seconds)
            gen = time.perf_counter() - t0
            peak, wall, summary = peak_rss_of_embed(
                audio, model, tmp / f"store-{int(seconds)}", args.batch_size
            )
            rows.append((label, audio.stat().st_size / 2**20, gen, peak, wall, summary["realtime_factor"]))
            audio.unlink()
        self_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (
            1024 if sys.platform != "darwin" else 2**20
        )
        model_name = args.model or "tiny random-init (tests/fixtures.py TINY_AUDIO)"
        print(f"model: {model_name}, batch size {args.batch_size}")
        head = ("audio", "FLAC MiB", "write s", "embed peak RSS MiB", "embed s", "x realtime")
        print(f"{head[0]:>8} {head[1]:>9} {head[2]:>8} {head[3]:>19} {head[4]:>8} {head[5]:>11}")
        for label, mib, gen, peak, wall, rtf in rows:
            print(f"{label:>8} {mib:9.1f} {gen:8.1f} {peak:19.1f} {wall:8.1f} {rtf:11.1f}")
        print(f"(the generator process itself peaked at {self_peak:.1f} MiB)")
        whole = args.hours * 3600 * 48000 * 4 / 2**20
        print(f"(a whole 48 kHz float32 waveform of {args.hours:g} h would be {whole:.0f} MiB)")


if __name__ == "__main__":
    main()
