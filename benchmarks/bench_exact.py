"""Exact search in the stored dtype against its memory floor: 1M file vectors and 1M segment windows.

    python benchmarks/bench_exact.py                      # 1,000,000 rows x 512 (about 10 min, 2 cores)
    python benchmarks/bench_exact.py --rows 200000        # a minute or two
    python benchmarks/bench_exact.py --faiss              # adds faiss IndexFlatIP (2 GB more memory)
    python benchmarks/bench_exact.py --store              # the commands' code over Lance stores (below)

Side by side in one process and one run, rounds interleaved (each round times every method once, so
load from other processes falls on all of them alike):
- the read floor: one pass over the same bytes (an integer sum of the array viewed as int64), on one
  thread and on `--threads` threads;
- numpy float32 `X @ q` over a float32 copy held in memory (the old resident path), and numpy over
  float16 blocks converted one at a time (the fallback kernel, and what segment search did);
- `mlx_clap.search.exact.top_k` with each kernel (auto = the shipped choice), on 1 and `--threads`
  threads, one query at a time and a batch of 10;
- usearch's exact search (its float16 path rounds the query to float16: not exact, shown for speed).

Three data sets, clustered with near-duplicates, cached under /tmp/mlx-clap-bench-vectors:
- files, float16 and float32: 1,000 clusters (cosine ~0.74 within one), 5% of rows a near-copy
  (noise 1e-3) of another row; one array in memory (the store's `matrix`);
- windows, float16: unit sums of 5 consecutive "frames" drawn around scenes that last 15-60 frames, so
  neighbouring windows are near-duplicates; 65,536-row memory-mapped .npy blocks streamed through
  `exact.top_k_blocks`, as a store's segment table is laid out.

Every exact result is checked against a float64 brute force (ties within 1e-6). Writes
benchmarks/results/exact-<date>[-tag].json and prints a markdown table and the `uptime` load.

`--store`: the same vectors in Lance stores (float16, built once under the cache folder: `--rows` file
rows; `--rows` windows of 100 per file), searched through the code the commands run, against reading
the vectors once from the same store in the same run (`Store.iter_shards` / `SegmentView.iter_blocks`,
every block's bytes summed once):
- files: `FlatIndex(store).search` (`mlx-clap search`, serve beyond its resident budget), one query
  and a batch of 32, and the old path (float32 MLX product per block, as FlatIndex did before);
- windows: `score_windows` and `segment_search` (`search --segments`, `timeline`: scores of every
  window, calibration, merging), one query and a batch of 32, and the old per-block float32 conversion.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlx_clap.search import exact  # noqa: E402

DIM = 512
DATA = Path(os.environ.get("MLX_CLAP_BENCH_VECTORS", "/tmp/mlx-clap-bench-vectors"))
SHARD_ROWS = 65536
TIE = 1e-6


# ------------------------------------------------------------------------------------------- data
def clustered_vectors(n: int, dim: int = DIM, *, clusters: int = 1000, dup_frac: float = 0.05, seed: int = 0):
    """float32 (n, dim) unit rows: `clusters` random centres plus noise (cosine ~0.74 to the centre),
    and `dup_frac` of the rows replaced by a near-copy of another row (noise 1e-3)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 65536):
        e = min(n, s + 65536)
        noise = rng.standard_normal((e - s, dim), dtype=np.float32) * np.float32(0.9 / np.sqrt(dim))
        out[s:e] = centres[rng.integers(0, clusters, e - s)] + noise
    dup = int(n * dup_frac)
    src, dst = rng.integers(0, n, dup), rng.choice(n, dup, replace=False)
    out[dst] = out[src] + rng.standard_normal((dup, dim), dtype=np.float32) * np.float32(1e-3 / np.sqrt(dim))
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def files_data(n: int) -> Path:
    """The cached float32 file vectors (float16 beside them)."""
    DATA.mkdir(parents=True, exist_ok=True)
    p32, p16 = DATA / f"files-{n}-f32.npy", DATA / f"files-{n}-f16.npy"
    if not (p32.is_file() and p16.is_file()):
        x = clustered_vectors(n)
        np.save(p32.with_suffix(".tmp.npy"), x)
        np.save(p16.with_suffix(".tmp.npy"), x.astype(np.float16))
        os.replace(p32.with_suffix(".tmp.npy"), p32)
        os.replace(p16.with_suffix(".tmp.npy"), p16)
    return p32


def window_shards(n: int, seed: int = 1) -> list[Path]:
    """float16 window vectors in SHARD_ROWS-row .npy blocks (cached)."""
    folder = DATA / f"windows-{n}"
    done = folder / "done"
    paths = [folder / f"{i:04d}.npy" for i in range(-(-n // SHARD_ROWS))]
    if done.is_file():
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((2000, DIM), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    span = 5
    carry = np.zeros((0, DIM), np.float32)
    for i, path in enumerate(paths):
        rows = min(SHARD_ROWS, n - i * SHARD_ROWS)
        need = rows + span - 1 - carry.shape[0]
        lengths = rng.integers(15, 61, size=need // 15 + 2)
        scene = np.repeat(rng.integers(0, 2000, lengths.size), lengths)[:need]
        noise = rng.standard_normal((need, DIM), dtype=np.float32) * np.float32(1.5 / np.sqrt(DIM))
        frames = centres[scene] + noise
        frames = np.concatenate([carry, frames])
        csum = np.cumsum(frames, axis=0, dtype=np.float64)
        win = (csum[span - 1 :] - np.concatenate([np.zeros((1, DIM)), csum[:-span]]))[:rows]
        win /= np.linalg.norm(win, axis=1, keepdims=True)
        np.save(path, win.astype(np.float16))
        carry = frames[rows:]
    done.write_text("ok")
    return paths


def queries_near(x: Any, m: int, seed: int, noise_norm: float = 0.05) -> np.ndarray:
    """m unit float32 queries: random rows plus noise of norm ~`noise_norm`."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(x.shape[0], m, replace=False))
    scale = np.float32(noise_norm / np.sqrt(x.shape[1]))
    noise = rng.standard_normal((m, x.shape[1]), dtype=np.float32) * scale
    q = np.asarray(x[rows], np.float32) + noise
    return q / np.linalg.norm(q, axis=1, keepdims=True)


# ------------------------------------------------------------------------------------------ timing
def floor_sum(blocks: list[np.ndarray], threads: int) -> None:
    """Read every byte once: int64 sums of the blocks, on `threads` threads (numpy releases the GIL)."""

    def run(i: int) -> None:
        for b in blocks[i::threads]:
            b.view(np.int64).sum()

    if threads == 1:
        run(0)
        return
    ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def interleaved(methods: dict[str, Callable[[int], Any]], rounds: int) -> dict[str, dict[str, float]]:
    """Each method once per round (round r gets argument r), after one warm-up call each; ms median/min."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for fn in methods.values():
        fn(0)
    for r in range(rounds):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            fn(r)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {
        name: {"median_ms": float(np.median(v)), "min_ms": float(np.min(v)), "runs": len(v)}
        for name, v in times.items()
    }


def brute_force_top(
    blocks: list[tuple[int, np.ndarray]], q: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Every float64 score (m, n) and each query's k-th best, the slow way."""
    q64 = q.astype(np.float64).T
    parts = [
        np.asarray(b[s : s + 65536], np.float64) @ q64 for _, b in blocks for s in range(0, b.shape[0], 65536)
    ]
    full = np.concatenate(parts, axis=0).T
    kth = -np.partition(-full, k - 1, axis=1)[:, k - 1]
    return full, kth


def check_exact(result: exact.TopK, full: np.ndarray, kth: np.ndarray) -> bool:
    for j in range(full.shape[0]):
        rows = result.rows[j]
        if len(set(rows.tolist())) != rows.size or np.any(full[j, rows] < kth[j] - TIE):
            return False
        if not np.allclose(result.scores[j], full[j, rows], rtol=0, atol=1e-9):
            return False
    return True


# ------------------------------------------------------------------------------------------- runs
def bench_set(
    name: str,
    blocks: list[tuple[int, np.ndarray]],
    x32: np.ndarray | None,
    threads: int,
    rounds: int,
    use_faiss: bool,
    k: int = 10,
) -> dict[str, Any]:
    """Every method on one data set (blocks of one dtype), one query and a batch of 10."""
    import usearch.index

    arrays = [b for _, b in blocks]
    dtype = str(arrays[0].dtype)
    whole = arrays[0] if len(arrays) == 1 else None  # an in-memory matrix, else streamed blocks
    n = sum(a.shape[0] for a in arrays)
    probe = arrays[0]
    singles = queries_near(probe, rounds + 1, seed=11)
    batches = [queries_near(probe, 10, seed=100 + r) for r in range(rounds + 1)]
    floor_blocks = [b for a in arrays for b in np.array_split(a, max(1, a.shape[0] // 16384))]

    def search(kernel: str, nthreads: int, queries: np.ndarray) -> exact.TopK:
        if whole is not None:
            return exact.top_k(whole, queries, k, kernel=kernel, threads=nthreads)
        return exact.top_k_blocks(iter(blocks), queries, k, kernel=kernel, threads=nthreads)

    kernels = ["auto"] + exact.available_kernels()
    out: dict[str, Any] = {"rows": n, "dim": DIM, "dtype": dtype, "streamed_blocks": len(arrays), "k": k}
    for shape, qs in (("single", singles), ("batch10", batches)):
        methods: dict[str, Callable[[int], Any]] = {
            "floor (1 thread)": lambda r: floor_sum(floor_blocks, 1),
            f"floor ({threads} threads)": lambda r: floor_sum(floor_blocks, threads),
        }
        if x32 is not None:
            methods["numpy float32 X @ q (resident float32 copy)"] = lambda r, qs=qs: x32 @ qs[r].T
        for kernel in kernels:
            for t in sorted({1, threads}):
                if kernel == "mlx" and t > 1:
                    continue  # one device, no worker threads
                methods[f"exact.top_k {kernel} ({t} thread{'s' if t > 1 else ''})"] = (
                    lambda r, kernel=kernel, t=t, qs=qs: search(kernel, t, qs[r])
                )
        if whole is not None:
            methods[f"usearch exact ({threads} threads)"] = lambda r, qs=qs: usearch.index.search(
                whole, qs[r].astype(whole.dtype), k, usearch.index.MetricKind.IP, exact=True, threads=threads
            )
        if use_faiss and x32 is not None:
            import faiss

            faiss.omp_set_num_threads(threads)
            index = faiss.IndexFlatIP(DIM)
            index.add(x32)
            methods[f"faiss IndexFlatIP float32 ({threads} threads)"] = lambda r, qs=qs, index=index: (
                index.search(np.atleast_2d(qs[r]), k)
            )
        print(f"{name} {shape}: {len(methods)} methods x {rounds} rounds ...", flush=True)
        timed = interleaved(methods, rounds)
        floor = min(timed["floor (1 thread)"]["median_ms"], timed[f"floor ({threads} threads)"]["median_ms"])
        for entry in timed.values():
            entry["x_floor"] = entry["median_ms"] / floor
        out[shape] = {"floor_ms": floor, "methods": timed}
        # Exactness of every kernel against float64, on the first round's queries.
        qs0 = np.atleast_2d(qs[0])
        full, kth = brute_force_top(blocks, qs0, k)
        out[shape]["exact_vs_float64"] = {
            kernel: check_exact(search(kernel, threads, qs0), full, kth) for kernel in kernels
        }
        stats: dict[str, Any] = {}
        exact.top_k_blocks(iter(blocks), qs0, k, threads=threads, stats=stats)
        out[shape]["auto"] = {"kernel": stats["kernel"], "rescored_pairs": stats["rescored"]}
    return out


# ---------------------------------------------------------------------------------- Lance stores
STORE_CHUNK = 100_000  # rows per commit while building a benchmark store
WINDOWS_PER_FILE = 100


def _build_store(path: Path, vectors: Any, segments: bool) -> None:
    """A float16 Lance store holding `vectors` as file rows or (segments) as windows, 100 per file."""
    from mlx_clap.store import Store

    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    seg = {"hop": 2.0, "window": 10.0} if segments else None
    Store.create(tmp, {"model": {"id": "bench/exact"}}, dim=DIM, dtype="float16", segments=seg).close()
    n = vectors.shape[0]
    per = WINDOWS_PER_FILE if segments else 1
    with Store.open(tmp, write=True) as w:
        for s in range(0, n, STORE_CHUNK):
            block = np.asarray(vectors[s : s + STORE_CHUNK], np.float32)
            files = range(s // per, (s + block.shape[0]) // per)
            items = [{"path": f"/archive/{f // 1000:04d}/{f:07d}.flac", "size": 1, "mtime": 0.0,
                      "duration": 2.0 * per + 8.0} for f in files]  # fmt: skip
            if not segments:
                w.write(items, block)
                continue
            starts = np.arange(per, dtype=np.float64) * 2.0
            wins = [block[i * per : (i + 1) * per] for i in range(len(files))]
            segs = [(starts, starts + 10.0, v) for v in wins]
            w.write(items, np.stack([v[0] for v in wins]), segments=segs)
            print(f"  {path.name}: {s + block.shape[0]} rows", flush=True)
    os.replace(tmp, path)


def old_flat_search(store: Any, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """What FlatIndex did before: each block converted to float32 in MLX, `q @ block.T`, top-k merged."""
    import mlx.core as mx

    from mlx_clap.search.index import iter_blocks

    qm = mx.array(np.atleast_2d(q).astype(np.float32))
    best_s = np.full((qm.shape[0], 0), -np.inf, np.float32)
    best_r = np.full((qm.shape[0], 0), -1, np.int64)
    for first, block in iter_blocks(store):
        s = qm @ mx.array(np.ascontiguousarray(block)).astype(mx.float32).T
        idx = mx.argpartition(-s, kth=k - 1, axis=1)[:, :k]
        top = mx.take_along_axis(s, idx, axis=1)
        mx.eval(idx, top)
        best_s = np.concatenate([best_s, np.array(top)], axis=1)
        best_r = np.concatenate([best_r, np.array(idx).astype(np.int64) + first], axis=1)
        part = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
        best_s, best_r = np.take_along_axis(best_s, part, 1), np.take_along_axis(best_r, part, 1)
    return best_s, best_r


def old_score_windows(view: Any, q: np.ndarray) -> np.ndarray:
    """What segment search did before: float16 converted to float32 8192 rows at a time, BLAS product."""
    qt = np.ascontiguousarray(np.atleast_2d(q).astype(np.float32).T)
    out = np.empty((qt.shape[1], len(view)), np.float32)
    for first, block in view.iter_blocks():
        for i in range(0, block.shape[0], 8192):
            sub = np.asarray(block[i : i + 8192]).astype(np.float32)
            out[:, first + i : first + i + sub.shape[0]] = (sub @ qt).T
    return out


def read_once(blocks: Any) -> None:
    """The floor: every block read from the store, its bytes summed once (one thread)."""
    for _, b in blocks:
        np.ascontiguousarray(b).view(np.int64).sum()


def bench_stores(n: int, rounds: int, batch: int = 32, k: int = 10) -> dict[str, Any]:
    """Files and windows in Lance stores, through the commands' code, against reading them once."""
    from mlx_clap.search.index import FlatIndex
    from mlx_clap.search.segments import score_windows, segment_search
    from mlx_clap.store import Store

    files_path, windows_path = DATA / f"store-files-{n}", DATA / f"store-windows-{n}"
    if not files_path.is_dir():
        print(f"building {files_path} ...", flush=True)
        _build_store(files_path, np.load(str(files_data(n)).replace("-f32", "-f16"), mmap_mode="r"), False)
    if not windows_path.is_dir():
        print(f"building {windows_path} ...", flush=True)
        shards = [np.load(p, mmap_mode="r") for p in window_shards(n)]
        _build_store(windows_path, np.concatenate(shards), True)
    out: dict[str, Any] = {"rows": n, "dim": DIM, "dtype": "float16", "k": k, "batch": batch}

    store = Store.open(files_path)
    x16 = store.matrix(np.float16)  # for the float64 check and the queries only
    singles = queries_near(x16, rounds + 1, seed=11)
    batches = [queries_near(x16, batch, seed=100 + r) for r in range(rounds + 1)]
    flat = FlatIndex(store)
    methods: dict[str, Callable[[int], Any]] = {
        "read the vectors once (floor)": lambda r: read_once(store.iter_shards()),
        "FlatIndex.search, 1 query": lambda r: flat.search(singles[r], k),
        f"FlatIndex.search, {batch} queries": lambda r: flat.search(batches[r], k),
        "old FlatIndex (float32 MLX per block), 1 query": lambda r: old_flat_search(store, singles[r], k),
        f"old FlatIndex, {batch} queries": lambda r: old_flat_search(store, batches[r], k),
    }
    print(f"files in a Lance store: {len(methods)} methods x {rounds} rounds ...", flush=True)
    out["files"] = {"methods": interleaved(methods, rounds)}
    full, kth = brute_force_top([(0, x16)], np.vstack([singles[0], batches[0]]), k)
    res = flat.search(np.vstack([singles[0], batches[0]]), k)
    out["files"]["exact_vs_float64"] = check_exact(
        exact.TopK(res.rows, np.take_along_axis(full, res.rows, 1)), full, kth
    ) and bool(np.allclose(res.scores, np.take_along_axis(full, res.rows, 1), rtol=0, atol=1e-6))
    out["files"]["auto"] = {key: flat.stats[key] for key in ("kernel", "threads", "rescored")}
    del x16, full

    wstore = Store.open(windows_path)
    view = wstore.segment_view()
    probe = view.take(np.arange(0, len(view), max(1, len(view) // 50_000)))
    wsingles = queries_near(probe, rounds + 1, seed=21)
    wbatches = [queries_near(probe, batch, seed=200 + r) for r in range(rounds + 1)]
    methods = {
        "read the windows once (floor)": lambda r: read_once(view.iter_blocks()),
        "score_windows, 1 query": lambda r: score_windows(view, wsingles[r][None]),
        "segment_search (search --segments), 1 query": lambda r: segment_search(view, wsingles[r]),
        f"score_windows, {batch} queries": lambda r: score_windows(view, wbatches[r]),
        f"segment_search, {batch} queries": lambda r: segment_search(view, wbatches[r]),
        "old score_windows (float32 per block), 1 query": lambda r: old_score_windows(view, wsingles[r]),
        f"old score_windows, {batch} queries": lambda r: old_score_windows(view, wbatches[r]),
    }
    print(f"windows in a Lance store: {len(methods)} methods x {rounds} rounds ...", flush=True)
    out["windows"] = {"methods": interleaved(methods, rounds), "windows": len(view), "files": len(wstore)}
    got = score_windows(view, wbatches[0])
    want = np.concatenate([np.asarray(b, np.float64) @ wbatches[0].astype(np.float64).T
                           for _, b in view.iter_blocks()]).T  # fmt: skip
    out["windows"]["max_abs_error_vs_float64"] = float(np.abs(got - want).max())
    for part in ("files", "windows"):
        timed = out[part]["methods"]
        floor = next(v["median_ms"] for name, v in timed.items() if "(floor)" in name)
        for entry in timed.values():
            entry["x_floor"] = entry["median_ms"] / floor
    return out


def store_markdown(res: dict[str, Any]) -> str:
    lines = ["| data | method | ms median | ms min | x floor |", "|---|---|---:|---:|---:|"]
    for part in ("files", "windows"):
        for name, v in res[part]["methods"].items():
            lines.append(
                f"| {res['rows']:,} {part} | {name} | {v['median_ms']:.1f} | {v['min_ms']:.1f} "
                f"| {v['x_floor']:.2f} |"
            )
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    lines = ["| data | queries | method | ms median | ms min | x floor |", "|---|---|---|---:|---:|---:|"]
    for set_name, res in results["sets"].items():
        for shape in ("single", "batch10"):
            for method, t in res[shape]["methods"].items():
                lines.append(
                    f"| {set_name} | {shape} | {method} | {t['median_ms']:.1f} | {t['min_ms']:.1f} | "
                    f"{t['x_floor']:.2f} |"
                )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--threads", type=int, default=exact.default_threads())
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sets", nargs="+", default=["files-f16", "files-f32", "windows-f16"])
    ap.add_argument("--faiss", action="store_true", help="add faiss IndexFlatIP (a float32 copy)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--store", action="store_true", help="the commands' code over Lance stores instead")
    args = ap.parse_args()

    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(uptime_before)
    t0 = time.time()
    results: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/bench_exact.py", *sys.argv[1:]]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cores": os.cpu_count(),
        },
        "threads": args.threads,
        "uptime_before": uptime_before,
        "sets": {},
    }
    if args.store:
        results["store"] = bench_stores(args.rows, args.rounds)
        args.sets = []
    p32 = files_data(args.rows) if any(s.startswith("files") for s in args.sets) else None
    x32 = np.load(p32) if p32 is not None else None  # in memory, as the store's float32 matrix
    for set_name in args.sets:
        if set_name == "files-f32":
            blocks = [(0, x32)]
        elif set_name == "files-f16":
            blocks = [(0, np.load(str(p32).replace("-f32", "-f16")))]
        elif set_name == "windows-f16":
            shards = [np.load(p, mmap_mode="r") for p in window_shards(args.rows)]
            firsts = np.cumsum([0] + [s.shape[0] for s in shards[:-1]])
            blocks = list(zip(firsts.tolist(), shards, strict=True))
        else:
            raise SystemExit(f"unknown set {set_name!r}: files-f16, files-f32, windows-f16")
        resident = x32 if set_name.startswith("files") else None  # the float32 copy of the same vectors
        results["sets"][set_name] = bench_set(
            set_name, blocks, resident, args.threads, args.rounds, args.faiss
        )
    results["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    results["seconds"] = round(time.time() - t0, 1)
    date = datetime.date.today().isoformat()
    kind = "exact-store" if args.store else "exact"
    out = ROOT / "benchmarks" / "results" / f"{kind}-{date}{'-' + args.tag if args.tag else ''}.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, out)
    print(store_markdown(results["store"]) if args.store else markdown(results))
    if args.store:
        res = results["store"]
        print(f"files: exact = {res['files']['exact_vs_float64']}, {res['files']['auto']}")
        print(f"windows: max |score - float64| = {res['windows']['max_abs_error_vs_float64']:.2e}")
    for set_name, res in results["sets"].items():
        for shape in ("single", "batch10"):
            print(f"{set_name} {shape}: auto = {res[shape]['auto']}, exact: {res[shape]['exact_vs_float64']}")
    print(results["uptime_after"])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
