"""Lance vector indexes over clustered float16 vectors with near-duplicates: build time, latency, recall.

    python benchmarks/bench_lance_ann.py --rows 200000                 # every index type, a sweep
    python benchmarks/bench_lance_ann.py --rows 1000000 --types IVF_RQ # the chosen one at 1M

The vectors are bench_exact.py's file vectors (1,000 clusters, 5% near-copies, unit rows, float16),
written to a Lance dataset under /tmp/mlx-clap-bench-lance (`id` int64, `vector` fixed-size list of 512
float16), one dataset per index type. For each type: the index build time (`create_index`, metric
"dot"), then for each search setting (nprobes, refine_factor; ef for HNSW) the p50/p95 latency of one
query at a time (`dataset.to_table(nearest=...)`, k=10, warm) and recall@10 against the exact top 10
(`mlx_clap.search.exact`, float64-exact): a returned row counts when its exact score ties the 10th best
within 1e-6. The pick: among settings with recall >= 0.95 and p50 <= 20 ms, the index type with the
best build time. Half the queries are near-copies of a stored vector, half lie farther (noise of norm
0.75: cosine ~0.8 to their row). Writes benchmarks/results/lance-ann-<date>[-tag].json and prints `uptime`.

`--store` also measures the index as mlx-clap uses it (`mlx_clap.search.lance_index`): the same vectors
as an mlx-clap store holding file rows (a tenth) and segment rows (nine windows per file) in one
dataset, one index over both built by `build_index`; file search (`LanceIndex`, the other kind left out
by a row-address blocklist) and window search, p50/p95 and recall@10 against exact search over that
kind's rows; then 1% more rows appended: the same searches with the new rows unindexed (scored flat by
Lance and merged), the time `build_index` takes to add them (`optimize_indices`), and the searches again.

    python benchmarks/bench_lance_ann.py --rows 1000000 --types IVF_RQ --nprobes 10 20 --refine 10 --store
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_exact import files_data, queries_near  # noqa: E402

from mlx_clap.search import exact  # noqa: E402

LANCE_DIR = Path(os.environ.get("MLX_CLAP_BENCH_LANCE", "/tmp/mlx-clap-bench-lance"))
TIE = 1e-6
K = 10

# Index parameters, and the search settings swept for each (None: the type's own default).
INDEXES: dict[str, dict[str, Any]] = {
    "IVF_PQ": {"build": {"num_sub_vectors": 64}, "search": [(p, r) for p in (10, 20, 40) for r in (10, 30)]},
    "IVF_RQ": {"build": {}, "search": [(p, r) for p in (10, 20, 40) for r in (1, 10)]},
    "IVF_HNSW_SQ": {"build": {}, "search": [(p, r) for p in (5, 10, 20) for r in (1, 10)]},
}


def write_dataset(x16: np.ndarray, path: Path) -> Any:
    import lance
    import pyarrow as pa

    if path.exists():
        shutil.rmtree(path)
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(x16.reshape(-1)), x16.shape[1])
    table = pa.table({"id": pa.array(np.arange(x16.shape[0], dtype=np.int64)), "vector": vectors})
    return lance.write_dataset(table, str(path))


def search(ds: Any, q: np.ndarray, nprobes: int, refine: int) -> np.ndarray:
    nearest = {"column": "vector", "q": q, "k": K, "nprobes": nprobes, "refine_factor": refine}
    if refine <= 1:
        del nearest["refine_factor"]  # no refinement: the quantized distances decide
    table = ds.to_table(columns=["id"], nearest=nearest, disable_scoring_autoprojection=True)
    return table["id"].to_numpy()


def recall(found: list[np.ndarray], x16: np.ndarray, qs: np.ndarray, kth: np.ndarray) -> float:
    """Share of the k results per query whose exact score ties the exact k-th best within TIE."""
    hits = 0
    for j, rows in enumerate(found):
        scores = x16[rows].astype(np.float64) @ qs[j].astype(np.float64)
        hits += int(np.sum(scores >= kth[j] - TIE))
    return hits / (K * len(found))


def bench_type(
    index_type: str, x16: np.ndarray, qs: np.ndarray, kth: np.ndarray, args: argparse.Namespace
) -> dict[str, Any]:
    import lance

    spec = INDEXES[index_type]
    path = LANCE_DIR / f"{x16.shape[0]}-{index_type.lower()}.lance"
    write_dataset(x16, path)
    ds = lance.dataset(str(path))
    params = dict(spec["build"])
    if args.partitions:
        params["num_partitions"] = args.partitions
    t0 = time.perf_counter()
    ds.create_index("vector", index_type, metric="dot", **params)
    build_s = time.perf_counter() - t0
    ds = lance.dataset(str(path))
    info = {"build_s": round(build_s, 1), "params": params, "settings": []}
    try:
        stats = ds.stats.index_stats(ds.list_indices()[0]["name"])
        info["num_partitions"] = stats.get("indices", [{}])[0].get("num_partitions")
    except Exception as exc:  # index statistics are informational only
        info["num_partitions"] = f"unknown ({exc})"
    print(f"{index_type}: built in {build_s:.1f} s, partitions {info['num_partitions']}", flush=True)
    sweep = spec["search"]
    if args.nprobes or args.refine:
        sweep = [(p, r) for p in args.nprobes or sorted({p for p, _ in sweep}) for r in args.refine or [10]]
    for nprobes, refine in sweep:
        for q in qs[:5]:
            search(ds, q, nprobes, refine)  # warm the index and file caches
        found, times = [], []
        for q in qs:
            t = time.perf_counter()
            found.append(search(ds, q, nprobes, refine))
            times.append((time.perf_counter() - t) * 1e3)
        setting = {
            "nprobes": nprobes,
            "refine_factor": refine,
            "recall_at_10": round(recall(found, x16, qs, kth), 4),
            "p50_ms": round(float(np.percentile(times, 50)), 2),
            "p95_ms": round(float(np.percentile(times, 95)), 2),
        }
        info["settings"].append(setting)
        print(f"  {setting}", flush=True)
    return info


def timed(fn: Any, qs: np.ndarray) -> tuple[list[np.ndarray], list[float]]:
    """fn(q) -> rows for each query, after 5 warm-up calls; (rows per query, ms per query)."""
    for q in qs[:5]:
        fn(q)
    found, times = [], []
    for q in qs:
        t = time.perf_counter()
        found.append(fn(q))
        times.append((time.perf_counter() - t) * 1e3)
    return found, times


def summary(found: list[np.ndarray], times: list[float], x: np.ndarray, qs: np.ndarray) -> dict[str, Any]:
    """p50/p95 ms and recall@10 (the tie rule) of `found` (row numbers into `x`) for queries `qs`."""
    kth = exact.top_k(x, qs, K).scores[:, -1]
    return {
        "recall_at_10": round(recall(found, x, qs, kth), 4),
        "p50_ms": round(float(np.percentile(times, 50)), 2),
        "p95_ms": round(float(np.percentile(times, 95)), 2),
    }


def bench_store(x16: np.ndarray, qs: np.ndarray) -> dict[str, Any]:
    """The index through mlx-clap's own store and search code (see the module docstring)."""
    from mlx_clap.search import lance_index as li
    from mlx_clap.store import Store

    n = x16.shape[0]
    n_files = n // 10
    per = 9  # windows per file: the other nine tenths of the rows
    held = max(1, n_files // 100)  # files (and their windows) appended after the index: 1% of the rows
    files, windows = x16[:n_files], x16[n_files : n_files + n_files * per]
    path = LANCE_DIR / f"{n}-store"
    if path.exists():
        shutil.rmtree(path)
    manifest = {"model": {"id": "bench/lance-ann", "weights_sha256": "0" * 64}}
    segs = {"hop": 1.0, "window": 2.0}
    starts = np.arange(per, dtype=np.float64)

    def write(lo: int, hi: int) -> None:
        with Store.open(path, write=True) as w:
            for a in range(lo, hi, 20_000):
                b = min(hi, a + 20_000)
                items = [{"path": f"/bench/{i:07d}.wav", "size": 1, "mtime": 0.0} for i in range(a, b)]
                seg = [(starts, starts + 2.0, windows[i * per : (i + 1) * per]) for i in range(a, b)]
                w.write(items, files[a:b], seg)

    t0 = time.perf_counter()
    Store.create(path, manifest, dim=x16.shape[1], dtype="float16", segments=segs).close()
    write(0, n_files - held)
    out: dict[str, Any] = {
        "files": n_files,
        "windows": n_files * per,
        "write_s": round(time.perf_counter() - t0, 1),
    }
    with Store.open(path, write=True) as w:
        report = li.build_index(w)
    out["build_s"] = round(report.seconds, 1)
    print(
        f"store: {n_files} files + {n_files * per} windows, index built in {report.seconds:.1f} s", flush=True
    )

    def phase(name: str) -> None:
        store = Store.open(path)
        nf, nw = len(store), len(store.segment_view())
        # The store's row order is the write order here, so row r of a kind is row r of its array.
        ann = li.LanceIndex(store)
        knn = li._Knn(store, li.SEGMENT)
        view = store.segment_view()
        seg_of = np.full(int(store._addr.size), -1, dtype=np.int64)
        seg_of[view.positions] = np.arange(len(view))
        f_found, f_times = timed(lambda q: ann.search(q, K).rows[0], qs)
        w_found, w_times = timed(lambda q: seg_of[knn.query(q, K)[0]], qs)
        res = {
            "coverage_files": ann.coverage.note(),
            "coverage_windows": li.coverage(store, li.SEGMENT).note(),
            "file_search": summary(f_found, f_times, files[:nf], qs),
            "window_search": summary(w_found, w_times, windows[:nw], qs),
        }
        out[name] = res
        print(f"  {name}: {res}", flush=True)

    phase("indexed")
    write(n_files - held, n_files)
    phase("after_append")
    with Store.open(path, write=True) as w:
        report = li.build_index(w)
    out["update_s"] = round(report.seconds, 1)
    out["update_action"] = report.action
    print(f"  index {report.action} in {report.seconds:.1f} s", flush=True)
    phase("after_update")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--types", nargs="+", default=list(INDEXES), choices=list(INDEXES))
    ap.add_argument("--partitions", type=int, default=0, help="num_partitions (default: Lance's choice)")
    ap.add_argument("--nprobes", type=int, nargs="*", default=[], help="replace the sweep's nprobes")
    ap.add_argument("--refine", type=int, nargs="*", default=[], help="replace the sweep's refine factors")
    ap.add_argument("--tag", default="")
    ap.add_argument("--store", action="store_true", help="also measure mlx-clap's store and search path")
    args = ap.parse_args()
    import lance

    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(uptime_before)
    x16 = np.load(str(files_data(args.rows)).replace("-f32", "-f16"))
    # Half the queries close to a stored vector (a near-copy), half far (cosine ~0.8 to their row).
    half = args.queries // 2
    qs = np.concatenate(
        [queries_near(x16, half, seed=7), queries_near(x16, args.queries - half, seed=8, noise_norm=0.75)]
    )
    t0 = time.perf_counter()
    truth = exact.top_k(x16, qs, K)
    exact_s = time.perf_counter() - t0
    kth = truth.scores[:, -1]
    results: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/bench_lance_ann.py", *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "cores": os.cpu_count()},
        "pylance": lance.__version__,
        "rows": args.rows,
        "queries": args.queries,
        "k": K,
        "exact_ground_truth_s": round(exact_s, 2),
        "uptime_before": uptime_before,
        "types": {},
    }
    LANCE_DIR.mkdir(parents=True, exist_ok=True)
    for index_type in args.types:
        results["types"][index_type] = bench_type(index_type, x16, qs, kth, args)
    ok = [
        (info["build_s"], name, s)
        for name, info in results["types"].items()
        for s in info["settings"]
        if s["recall_at_10"] >= 0.95 and s["p50_ms"] <= 20
    ]
    if ok:
        build_s, name, setting = min(ok, key=lambda t: (t[0], t[2]["p50_ms"]))
        best = min((s for b, n, s in ok if n == name), key=lambda s: s["p50_ms"])
        results["pick"] = {"index_type": name, "build_s": build_s, **best}
    else:
        results["pick"] = None
    if args.store:
        results["store"] = bench_store(x16, qs)
    results["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    date = datetime.date.today().isoformat()
    out = ROOT / "benchmarks" / "results" / f"lance-ann-{date}{'-' + args.tag if args.tag else ''}.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, out)
    print(f"pick: {results['pick']}")
    print(results["uptime_after"])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
