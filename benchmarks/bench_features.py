"""Mel frontend speed: MLX `ClapFeatureExtractor` vs transformers' numpy `ClapFeatureExtractor`.

    python benchmarks/bench_features.py            # batch of 16 10-s clips, 7 repeats
    python benchmarks/bench_features.py --quick    # batch of 4, 3 repeats (seconds)

Both extractors get the same 10-s, 48 kHz float32 clips (noise plus a tone: no crop, no RNG draw) with the
hub settings (50-14000 Hz, repeatpad, rand_trunc = Slaney mel; `--fusion` for the fused HTK path). Each side
is warmed up once, then timed `--repeats` times; the MLX side is forced with `mx.eval`. Reported: median
seconds per batch, clips/s and the MLX/HF speed ratio, for the default float32 MLX path and the float64
(exact) path. Printed as JSON and written to benchmarks/results/features.json (features-quick.json with
--quick).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import mlx.core as mx  # noqa: E402

import mlx_clap  # noqa: E402,F401  (sets up the Linux CPU BLAS before any timing)
from mlx_clap.ops import parallel as cpu_parallel  # noqa: E402
from mlx_clap.ops.blas import blas_info  # noqa: E402
from mlx_clap.preprocess.features import ClapFeatureExtractor  # noqa: E402

SR = 48000
CLIP = 480000


def clips(batch: int, seed: int = 0) -> list[np.ndarray]:
    """10-s test clips: white noise at -20 dBFS plus a 1 kHz tone (float32)."""
    rs = np.random.RandomState(seed)
    t = np.arange(CLIP) / SR
    return [
        (0.1 * rs.randn(CLIP) + 0.2 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32) for _ in range(batch)
    ]


def timed(fn, repeats: int) -> dict[str, float]:
    """Warm-up call, then `repeats` timed calls: median / min seconds."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": repeats}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batch 4, 3 repeats")
    ap.add_argument("--batch", type=int, default=None, help="clips per call (default 16; 4 with --quick)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls (default 7; 3 with --quick)")
    ap.add_argument("--fusion", action="store_true", help="fused models' HTK path (truncation=fusion)")
    ap.add_argument("--no-float64", action="store_true", help="skip the float64 MLX path")
    ap.add_argument("--out", type=Path, default=None, help="JSON output path")
    args = ap.parse_args(argv)
    batch = args.batch or (4 if args.quick else 16)
    repeats = args.repeats or (3 if args.quick else 7)
    truncation = "fusion" if args.fusion else "rand_trunc"

    from transformers import ClapFeatureExtractor as HFClapFeatureExtractor

    waves = clips(batch)
    hf = HFClapFeatureExtractor(
        frequency_min=50, frequency_max=14000, truncation=truncation, padding="repeatpad", top_db=None
    )
    runs = {"hf-numpy": timed(lambda: hf(waves, sampling_rate=SR, return_tensors="np"), repeats)}
    precisions = ["float32"] if args.no_float64 else ["float32", "float64"]
    for precision in precisions:
        fx = ClapFeatureExtractor({"truncation": truncation}, precision=precision)
        runs[f"mlx-{precision}"] = timed(lambda fx=fx: mx.eval(fx(waves, sampling_rate=SR)[0]), repeats)
    for run in runs.values():
        run["clips_per_s"] = batch / run["median_s"]
        run["ms_per_clip"] = 1e3 * run["median_s"] / batch
    hf_rate = runs["hf-numpy"]["clips_per_s"]
    result = {
        "benchmark": "features",
        "truncation": truncation,
        "batch": batch,
        "clip_seconds": CLIP / SR,
        "runs": runs,
        "speedup_vs_hf": {k: v["clips_per_s"] / hf_rate for k, v in runs.items() if k != "hf-numpy"},
        "goal_speedup": 20.0,
        "mlx_version": mx.__version__,
        "mlx_device": str(mx.default_device()),
        "blas": blas_info(),
        "cpu_workers": cpu_parallel.worker_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    for name, run in runs.items():
        ratio = "" if name == "hf-numpy" else f"  x{result['speedup_vs_hf'][name]:.2f} vs HF"
        print(f"{name:14s} {run['ms_per_clip']:8.2f} ms/clip  {run['clips_per_s']:8.1f} clips/s{ratio}")
    out = args.out or RESULTS / ("features-quick.json" if args.quick else "features.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
