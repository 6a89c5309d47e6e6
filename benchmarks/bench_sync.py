"""Sync of an unchanged library: `mlx-clap embed DIR --out STORE` when nothing changed.

Builds N small files in a temp folder (never decoded: the store already holds a row for each, with its
size and mtime) and a store of random unit vectors for them, then times the whole command in a
subprocess (Python start, imports, the folder walk, one stat per file, the store's open) and the
in-process part the command reports ("seconds" of --summary-json). The model is never loaded: an
unchanged library is answered from file stats.

    python benchmarks/bench_sync.py --files 100000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mlx_clap.store import Store

MODEL = "laion/clap-htsat-unfused"  # recorded in the manifest as typed; never downloaded here
SETTINGS = {"long_audio": "windows-mean", "seed": None, "quantize_int16": False, "compute_dtype": "float32"}


def build(root: Path, n: int, dim: int = 512) -> tuple[Path, Path]:
    lib = root / "lib"
    per_dir = 1000
    items = []
    for i in range(n):
        d = lib / f"d{i // per_dir:04d}"
        if i % per_dir == 0:
            d.mkdir(parents=True)
        p = d / f"clip{i:06d}.wav"
        p.write_bytes(b"RIFF")
        st = p.stat()
        items.append({"path": str(p), "size": st.st_size, "mtime": st.st_mtime, "duration": 1.0})
    rng = np.random.default_rng(0)
    v = rng.standard_normal((n, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    manifest = {"model": MODEL, "store_dtype": "float16", "settings": SETTINGS}
    with Store.create(root / "store", manifest, dim=dim, dtype="float16") as store:
        for first in range(0, n, 20000):
            store.write(items[first : first + 20000], v[first : first + 20000])
        store.compact()
    return lib, root / "store"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        lib, store = build(Path(tmp), args.files)
        print(f"built {args.files} files and their store in {time.perf_counter() - t0:.1f} s")
        cmd = [sys.executable, "-m", "mlx_clap.cli", "embed", str(lib), "-r", "--out", str(store)]
        cmd += ["--model", MODEL, "-q", "--summary-json"]
        walls, inner = [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            walls.append(time.perf_counter() - t0)
            if out.returncode != 0:
                raise SystemExit(out.stderr)
            summary = json.loads(out.stdout.strip().splitlines()[-1])
            assert summary.get("up_to_date") and summary["skipped"] == args.files, summary
            inner.append(summary["seconds"])
        row = {
            "files": args.files,
            "command_s_median": round(float(np.median(walls)), 3),
            "check_s_median": round(float(np.median(inner)), 3),
            "date": time.strftime("%Y-%m-%d"),
        }
        print("| files | whole command (s) | stats + store check (s) |")
        print("|---:|---:|---:|")
        print(f"| {row['files']} | {row['command_s_median']} | {row['check_s_median']} |")
        results = Path(__file__).parent / "results"
        results.mkdir(exist_ok=True)
        (results / f"sync-{row['date']}.json").write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
