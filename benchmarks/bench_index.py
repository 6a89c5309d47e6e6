"""Search, ANN and dedupe speed over synthetic embedding stores.

    python benchmarks/bench_index.py            # 1,000,000 x 512 search; dedupe on 100,000
    python benchmarks/bench_index.py --quick    # 50,000 x 512; dedupe on 10,000 (a minute)

Vectors are clustered unit vectors (2,000 centres, two members of a centre at cosine ~0.5, like
embeddings of similar sounds) stored as float16, with 0.5% planted near-duplicates for dedupe.
Reports, as JSON printed and written to benchmarks/results/index.json (index-quick.json with --quick):
- flat search: single-query latency streaming the memory-mapped shards (page cache warm) and with the
  blocks resident in MLX, and a 32-query batch;
- ANN (the store's Lance IVF_RQ index, `mlx_clap.search.lance_index`): build time, index size on disk,
  single-query latency, recall@10 against the flat answer, and a sweep of nprobes / refine_factor;
- dedupe: time and groups found over the dedupe-sized store (which also gets its own ANN recall@10).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlx_clap.search.index import FlatIndex, RowReader, near_duplicates  # noqa: E402
from mlx_clap.search.lance_index import LanceIndex, build_index  # noqa: E402
from mlx_clap.store import Store  # noqa: E402

DIM = 512
CENTRES = 2000
WITHIN = 0.5  # expected cosine between two members of one centre
DUP_FRACTION = 0.005


def rss_mib() -> float:
    """Current resident memory (Linux /proc), else the peak (macOS ru_maxrss is in bytes)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def build_store(path: Path, n: int, seed: int, chunk: int = 65536) -> Store:
    rng = np.random.default_rng(seed)
    centres = unit(np.random.default_rng(1234).standard_normal((CENTRES, DIM)))
    spread = np.sqrt((1 / WITHIN - 1) / DIM)
    store = Store.create(path, {"model": {"id": "bench/synthetic"}}, dim=DIM, dtype="float16")
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = centres[rng.integers(0, CENTRES, m)] + spread * rng.standard_normal((m, DIM)).astype(np.float32)
        x = unit(x)
        # Plant near-duplicates of earlier rows in this chunk (cosine ~0.99).
        dup = rng.random(m) < DUP_FRACTION
        src = rng.integers(0, m, dup.sum())
        x[dup] = unit(x[src] + 0.004 * rng.standard_normal((len(src), DIM)).astype(np.float32))
        items = [{"path": f"synthetic/{start + i:07d}.wav", "size": 0, "mtime": 0.0} for i in range(m)]
        store.write(items, x)
    store.compact()
    store.close()
    return Store.open(path)


def latency_ms(fn, queries: np.ndarray, warmup: int = 2) -> dict:
    for q in queries[:warmup]:
        fn(q)
    times = []
    for q in queries:
        t = time.perf_counter()
        fn(q)
        times.append((time.perf_counter() - t) * 1000)
    return {
        "p50_ms": round(float(np.median(times)), 2),
        "p95_ms": round(float(np.percentile(times, 95)), 2),
        "queries": len(times),
    }


def index_store(path: Path) -> Store:
    """Build the store's Lance vector index (as `mlx-clap index` does); the store's new snapshot."""
    with Store.open(path, write=True) as w:
        return build_index(w).store


def recall_at_10(ann: LanceIndex, queries: np.ndarray, truth: np.ndarray) -> float:
    """Share of the exact top-10 rows (`truth`, from FlatIndex) that the ANN search returns."""
    got = ann.search(queries, k=10)
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got.rows, truth, strict=True)]))


def bench_search(path: Path, n: int, n_queries: int) -> dict:
    log(f"writing a {n} x {DIM} store")
    t = time.perf_counter()
    store = build_store(path, n, seed=0)
    log("flat search")
    out: dict = {
        "rows": n,
        "dim": DIM,
        "store_dtype": "float16",
        "store_write_s": round(time.perf_counter() - t, 1),
    }
    # Queries near stored vectors (a held-out perturbation of random rows) without reading the whole matrix.
    rows = np.random.default_rng(8).integers(0, n, n_queries)
    queries = unit(
        RowReader(store).take(rows) + 0.02 * np.random.default_rng(9).standard_normal((n_queries, DIM))
    )

    flat = FlatIndex(store)
    out["flat_stream"] = latency_ms(lambda q: flat.search(q, k=10), queries[:10])
    resident = FlatIndex(store, resident=True)
    rss0 = rss_mib()
    resident.search(queries[0], k=10)  # loads the blocks
    out["flat_resident"] = latency_ms(lambda q: resident.search(q, k=10), queries[:20])
    out["flat_resident"]["extra_rss_mib"] = round(rss_mib() - rss0, 1)
    t = time.perf_counter()
    resident.search(queries[:32], k=10)
    out["flat_resident_batch32_ms"] = round((time.perf_counter() - t) * 1000, 1)
    resident = None  # frees the resident blocks before the ANN build

    log("ANN build")
    t = time.perf_counter()
    store = index_store(path)
    out["ann_build_s"] = round(time.perf_counter() - t, 1)
    out["ann_build_rows_per_s"] = round(n / out["ann_build_s"])
    index_files = [f for f in (path / "_indices").rglob("*") if f.is_file()]
    out["ann_file_mib"] = round(sum(f.stat().st_size for f in index_files) / 2**20, 1)
    log("ANN queries")
    rss0 = rss_mib()
    ann = LanceIndex(store)
    out["ann"] = latency_ms(lambda q: ann.search(q, k=10), queries)
    out["ann_rss_delta_mib"] = round(rss_mib() - rss0, 1)
    t = time.perf_counter()
    LanceIndex(Store.open(path)).search(queries[0], k=10)
    out["ann_reopen_s"] = round(time.perf_counter() - t, 2)
    truth = FlatIndex(store).search(queries, k=10).rows
    out["ann_recall_at_10"] = round(recall_at_10(ann, queries, truth), 4)
    # Search effort against recall: query-time settings (no rebuild).
    sweep = {}
    for nprobes in (10, 20, 40):
        for refine in (1, 10):
            tuned = LanceIndex(store, nprobes=nprobes, refine_factor=refine)
            lat = latency_ms(lambda q, tuned=tuned: tuned.search(q, k=10), queries[:50])
            sweep[f"{nprobes}/{refine}"] = {
                "recall_at_10": round(recall_at_10(tuned, queries, truth), 4),
                "p50_ms": lat["p50_ms"],
            }
    out["ann_sweep"] = sweep
    return out


def bench_dedupe(path: Path, n: int) -> dict:
    log(f"dedupe over {n}")
    store = build_store(path, n, seed=1)
    t = time.perf_counter()
    groups = near_duplicates(store, threshold=0.97)
    out = {
        "rows": n,
        "threshold": 0.97,
        "seconds": round(time.perf_counter() - t, 1),
        "groups": len(groups),
        "rows_in_groups": int(sum(len(g.rows) for g in groups)),
    }
    ann = LanceIndex(index_store(path))
    qrows = np.random.default_rng(3).integers(0, n, 200)
    q = unit(RowReader(store).take(qrows) + 0.02 * np.random.default_rng(4).standard_normal((200, DIM)))
    out["ann_recall_at_10"] = round(recall_at_10(ann, q, FlatIndex(store).search(q, k=10).rows), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="50k vectors for search, 10k for dedupe")
    ap.add_argument("--rows", type=int, help="vectors for search (default 1,000,000; quick 50,000)")
    ap.add_argument("--dedupe-rows", type=int, help="vectors for dedupe (default 100,000; quick 10,000)")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--workdir", type=Path, help="where the stores go (default: a temp folder, removed)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    n = args.rows or (50_000 if args.quick else 1_000_000)
    nd = args.dedupe_rows or (10_000 if args.quick else 100_000)
    out_path = args.out or ROOT / "benchmarks" / "results" / (
        "index-quick.json" if args.quick else "index.json"
    )
    import mlx.core as mx

    from mlx_clap.ops.blas import blas_info

    work = Path(tempfile.mkdtemp(prefix="bench_index_", dir=args.workdir))
    try:
        result = {
            "machine": {
                "platform": platform.platform(),
                "processor": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(),
                "mlx": mx.__version__,
                "mlx_device": str(mx.default_device()),
                "blas": blas_info().get("config") or blas_info().get("status"),
                "load_average_at_start": os.getloadavg()[0],
            },
            "search": bench_search(work / "search", n, args.queries),
        }
        shutil.rmtree(work / "search")
        result["dedupe"] = bench_dedupe(work / "dedupe", nd)
        result["machine"]["load_average_at_end"] = os.getloadavg()[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text + "\n")


if __name__ == "__main__":
    main()
