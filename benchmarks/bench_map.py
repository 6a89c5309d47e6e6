"""The library map's 2-D projection: which neighbour-preserving library holds 100k x 512, and how well.

    python benchmarks/bench_map.py                        # quality set, then 100,000 x 512 per method
    python benchmarks/bench_map.py --quality-only         # the 3,000-point quality set (minutes)
    python benchmarks/bench_map.py --rows 20000 --limit 600

Candidates: `pca` (the first two principal axes, the fallback), `pacmap`, `umap` (umap-learn) and
`opentsne`; each gets the same input as the serve map, the store's leading principal components
(`layout.PROJECTION_DIMS`), and its library's defaults otherwise.

- Quality: 3,000 unit vectors in 30 clusters, each a curved 3-d sheet in 512-d (so neighbourhoods mean
  something). kNN preservation = share of a point's 10 nearest neighbours by cosine in 512-d that are
  among its 10 nearest in 2-D; cluster purity = share of its 10 nearest in 2-D from its own cluster.
- Scale: each method on `--rows` x 512 clustered vectors (bench_index's generator: 2,000 centres) in a
  child process of its own, killed after `--limit` seconds; reports seconds (a 500-point warm-up run first,
  so numba's compile time is reported apart) and the child's peak RSS (its input is the 50-d principal
  components, 20 MB at 100k, and the libraries), with `uptime`'s load beside it
  (the machine is shared: the load says how much of the 2 cores the run had). Then the serve map itself
  (`layout.build_map` on a float16 store: PCA, projection, k-means colours) for the chosen method.
Results: printed and written to benchmarks/results/map.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlx_clap.serve import layout  # noqa: E402

METHODS = ("pca", "pacmap", "umap", "opentsne")
DIM = 512
K = 10


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load() -> str:
    """`uptime`'s load averages (1, 5, 15 min): on a shared machine, how much of the CPU a run had."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def peak_rss_mib() -> float:
    """This process's peak resident memory. Linux: VmHWM, which starts afresh at exec (ru_maxrss keeps the
    parent's RSS at the fork, here the 512-d generator's GB); elsewhere ru_maxrss (bytes on macOS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def sheets(n: int = 3000, clusters: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, 512) unit vectors and cluster labels: each cluster a curved 3-d sheet around its centre."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % clusters
    centres = unit(rng.standard_normal((clusters, DIM)))
    basis = rng.standard_normal((clusters, 6, DIM)).astype(np.float32) / np.sqrt(DIM)
    z = rng.uniform(-1, 1, (n, 3)).astype(np.float32)
    feats = np.concatenate([z, np.sin(2 * z)], axis=1)  # curved, so a linear map cannot flatten it
    x = centres[labels] + 0.6 * np.einsum("nf,nfd->nd", feats, basis[labels])
    return unit(x + 0.002 * rng.standard_normal(x.shape).astype(np.float32)), labels


def blobs(n: int, seed: int = 0, centres: int = 2000, within: float = 0.5) -> np.ndarray:
    """bench_index's store vectors: members of a centre at cosine ~`within` to each other."""
    rng = np.random.default_rng(seed)
    c = unit(np.random.default_rng(1234).standard_normal((centres, DIM)))
    spread = np.sqrt((1 / within - 1) / DIM)
    out = np.empty((n, DIM), dtype=np.float32)
    for s in range(0, n, 65536):
        m = min(65536, n - s)
        out[s : s + m] = unit(c[rng.integers(0, centres, m)] + spread * rng.standard_normal((m, DIM)))
    return out


def principal(x: np.ndarray, dims: int = layout.PROJECTION_DIMS) -> np.ndarray:
    """The leading principal components, as `layout.pca` computes them for a store."""
    mean = x.mean(axis=0, dtype=np.float64)
    cov = np.cov(x.T.astype(np.float64), bias=True)
    _, vecs = np.linalg.eigh(cov)
    return ((x - mean) @ vecs[:, ::-1][:, :dims]).astype(np.float32)


def project(method: str, coords: np.ndarray) -> np.ndarray:
    if method == "pca":
        return coords[:, :2]
    if method == "pacmap":
        return layout.neighbour_projection(coords)
    if method == "umap":
        import umap

        return umap.UMAP(n_neighbors=15, low_memory=True).fit_transform(coords)
    if method == "opentsne":
        import openTSNE

        return np.asarray(openTSNE.TSNE(n_jobs=os.cpu_count() or 1, random_state=0).fit(coords))
    raise ValueError(method)


def knn(x: np.ndarray, k: int, cosine: bool) -> np.ndarray:
    """Each row's k nearest other rows (exact; the quality set is small)."""
    if cosine:
        d = -(x @ x.T)
    else:
        sq = (x * x).sum(axis=1)
        d = sq[:, None] + sq[None, :] - 2 * (x @ x.T)
    np.fill_diagonal(d, np.inf)
    return np.argpartition(d, k, axis=1)[:, :k]


def quality(methods: list[str]) -> dict:
    x, labels = sheets()
    coords = principal(x)
    truth = knn(x.astype(np.float64), K, cosine=True)
    out = {}
    for method in methods:
        log(f"quality: {method}")
        try:
            t = time.perf_counter()
            xy = np.asarray(project(method, coords), dtype=np.float64)
            took = time.perf_counter() - t
        except ImportError as exc:
            out[method] = {"error": f"not installed: {exc}"}
            continue
        got = knn(xy, K, cosine=False)
        kept = np.mean([len(set(a) & set(b)) / K for a, b in zip(truth, got, strict=True)])
        purity = float(np.mean(labels[got] == labels[:, None]))
        out[method] = {
            "knn10_preserved": round(float(kept), 3),
            "purity10": round(purity, 3),
            "s": round(took, 1),
        }
        log(f"  {out[method]}")
    return out


def child(method: str, rows: int) -> None:
    """In a child process: warm-up on 500 points, then `rows`; prints one JSON line. The input comes from
    the parent (MLX_CLAP_BENCH_MAP_INPUT, a .npy of principal components), so the child's peak RSS is the
    projection's, not the 512-d generator's."""
    given = os.environ.get("MLX_CLAP_BENCH_MAP_INPUT")
    coords = np.load(given) if given else principal(blobs(rows))
    t = time.perf_counter()
    project(method, coords[:500])
    warm = time.perf_counter() - t
    t = time.perf_counter()
    xy = project(method, coords)
    took = time.perf_counter() - t
    peak = peak_rss_mib()
    assert np.isfinite(xy).all() and xy.shape == (rows, 2)
    print(json.dumps({"warmup_500_s": round(warm, 1), "s": round(took, 1), "peak_rss_mib": round(peak)}))


def scale(methods: list[str], rows: int, limit: float) -> dict:
    out = {}
    tmp = tempfile.TemporaryDirectory()
    given = Path(tmp.name) / "coords.npy"
    np.save(given, principal(blobs(rows)))
    env = {**os.environ, "MLX_CLAP_BENCH_MAP_INPUT": str(given)}
    for method in methods:
        log(f"scale: {method} on {rows} rows (limit {limit:.0f} s), load {load()}")
        before = load()
        cmd = [sys.executable, __file__, "--child", method, "--rows", str(rows)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=env)
            last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
            res = json.loads(last) if r.returncode == 0 and last else {"error": r.stderr.strip()[-300:]}
        except subprocess.TimeoutExpired:
            res = {"error": f"over the {limit:.0f} s limit"}
        res.update(load_before=before, load_after=load())
        out[method] = res
        log(f"  {res}")
    tmp.cleanup()
    return out


def serve_map(method_rows: int) -> dict:
    """`layout.build_map` end to end (what `mlx-clap serve` does on the first map request)."""
    from mlx_clap.store import Store

    with tempfile.TemporaryDirectory() as tmp:
        x = blobs(method_rows)
        with Store.create(Path(tmp) / "s", {"model": {"id": "bench/synthetic"}}, dim=DIM) as store:
            store.write(
                [{"path": f"synthetic/{i:07d}.wav", "size": 0, "mtime": 0.0} for i in range(len(x))], x
            )
        store = Store.open(Path(tmp) / "s")
        before = load()
        t = time.perf_counter()
        doc = layout.build_map(store, layout.store_key(store))
        took = time.perf_counter() - t
    return {
        "rows": method_rows,
        "s": round(took, 1),
        "projection": doc["projection"],
        "load_before": before,
        "load_after": load(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--limit", type=float, default=1200, help="seconds per method at scale")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--quality-only", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "map.json")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.rows)
        return
    methods = args.methods.split(",")
    result: dict = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "versions": {},
        "input": f"{layout.PROJECTION_DIMS} principal components of the 512-d unit vectors",
        "quality": quality(methods),
    }
    for name in ("pacmap", "umap", "openTSNE", "numba", "numpy"):
        try:
            result["versions"][name] = __import__(name).__version__
        except (ImportError, AttributeError):
            result["versions"][name] = None
    if not args.quality_only:
        result["scale"] = {"rows": args.rows, **scale(methods, args.rows, args.limit)}
        log("serve map end to end")
        result["serve_map"] = serve_map(args.rows)
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
