"""MLX CPU matmul rate and accuracy with MLX's bundled BLAS vs the one `mlx_clap.ops.blas` selects.

Each setting runs in its own process (`MLX_CLAP_BLAS=off`, then the default `auto`), since the choice is
made once per process. numpy and PyTorch on the same cores are printed for scale.

    python benchmarks/blas_matmul.py            # n = 256, 1024, 2048; float32 and float64
    python benchmarks/blas_matmul.py --sizes 4096

Writes benchmarks/results/blas.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = r"""
import json, sys, time
import numpy as np
from mlx_clap.ops.setup import prepare_cpu
from mlx_clap.ops.blas import blas_info
prepare_cpu()
import mlx.core as mx
sizes, repeats = json.loads(sys.argv[1]), int(sys.argv[2])
out = {"blas": blas_info(), "rows": []}
with mx.stream(mx.cpu):
    for n in sizes:
        for dt in ("float32", "float64"):
            rng = np.random.default_rng(n)
            a64, b64 = rng.standard_normal((n, n)), rng.standard_normal((n, n))
            a, b = mx.array(a64, dtype=getattr(mx, dt)), mx.array(b64, dtype=getattr(mx, dt))
            mx.eval(a, b)
            c = a @ b
            mx.eval(c)
            best = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                mx.eval(a @ b)
                best = min(best, time.perf_counter() - t)
            ref = np.asarray(a, dtype=np.float64) @ np.asarray(b, dtype=np.float64)
            err = float(np.abs(np.asarray(c, dtype=np.float64) - ref).max() / np.abs(ref).max())
            out["rows"].append({"n": n, "dtype": dt, "gflops": 2 * n**3 / best / 1e9, "rel_err": err})
print(json.dumps(out))
"""


def others(sizes: list[int], repeats: int) -> list[dict]:
    import numpy as np
    import torch

    rows = []
    for n in sizes:
        a = np.random.default_rng(n).standard_normal((n, n)).astype(np.float32)
        ta = torch.from_numpy(a)
        for name, fn in (("numpy", lambda a=a: a @ a), ("torch", lambda ta=ta: ta @ ta)):
            fn()
            best = min(_timed(fn) for _ in range(repeats))
            rows.append({"impl": name, "n": n, "dtype": "float32", "gflops": 2 * n**3 / best / 1e9})
    return rows


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=int, default=[256, 1024, 2048])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    results = {}
    for setting in ("off", "auto"):
        env = dict(os.environ, MLX_CLAP_BLAS=setting)
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(args.sizes), str(args.repeats)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        results[setting] = json.loads(proc.stdout.strip().splitlines()[-1])
    ref_rows = others(args.sizes, args.repeats)
    lines = [
        "# MLX CPU matmul: bundled BLAS vs mlx_clap.ops.blas",
        "",
        f"`python benchmarks/blas_matmul.py {' '.join(argv if argv is not None else sys.argv[1:])}` — "
        f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, {os.cpu_count()} CPUs. Selected: "
        f"{results['auto']['blas'].get('config') or results['auto']['blas'].get('status')} "
        f"({results['auto']['blas'].get('source')}).",
        "",
        "| n | dtype | bundled GFLOP/s | selected GFLOP/s | speed-up | bundled rel err | selected rel err |",
        "|---|---|---|---|---|---|---|",
    ]
    for off, on in zip(results["off"]["rows"], results["auto"]["rows"], strict=True):
        lines.append(
            f"| {on['n']} | {on['dtype']} | {off['gflops']:.1f} | {on['gflops']:.1f} | "
            f"{on['gflops'] / off['gflops']:.1f}x | {off['rel_err']:.1e} | {on['rel_err']:.1e} |"
        )
    lines += [
        "",
        "Same cores, float32: " + ", ".join(f"{r['impl']} n={r['n']} {r['gflops']:.1f}" for r in ref_rows),
    ]
    md = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": "blas_matmul", "results": results, "numpy_torch": ref_rows}
    (args.out / "blas.json").write_text(json.dumps(data, indent=1) + "\n")
    (args.out / "blas.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
