"""Server-side latency of a text query in `mlx-clap serve` over a synthetic 100k-item store.

    python benchmarks/serve_latency.py                       # 100,000 x 512, 50 queries
    python benchmarks/serve_latency.py --model DIR           # real weights (a converted or HF folder)
    python benchmarks/serve_latency.py --text-tower tiny     # the tests' tiny text tower (fast, unrealistic)

The store holds random unit vectors (float16, as `embed` stores them) under fake paths. The model:
with --model, that folder; otherwise a random-init model with the full-size RoBERTa-base text tower
(12 layers, 768 wide: the same work per query as laion/clap-htsat-unfused's, meaningless scores;
only its vocabulary is the small tokenizer's) and
the tests' tiny audio tower, built once and cached under ~/.cache/mlx-clap-bench/serve-text-<size>.
The tokenizer is the tests' small trained BPE, so token counts are close to RoBERTa's for plain
English.

Each query is a POST /api/search through the Starlette app (TestClient, in process), the model warm.
Server-side time is taken by an ASGI wrapper around the app, from the request's arrival to the last
body byte sent; it is split into text embedding and search (search includes the z-score
calibration). Reports p50/p95 over the queries against the 100 ms target, as JSON printed and written
to benchmarks/results/serve_latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DIM = 512
TARGET_MS = 100.0
WORDS = (
    "rain thunder dog cat door engine crowd applause bird wind water glass piano guitar drum bell siren "
    "footsteps keyboard laughter whistle train helicopter waves fire"
).split()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    return Path(os.environ.get("MLX_CLAP_BENCH_CACHE", Path.home() / ".cache" / "mlx-clap-bench"))


def random_model(text_tower: str) -> Path:
    """A converted random-init model folder: tiny audio tower, `text_tower` ("base" or "tiny") text."""
    folder = cache_dir() / f"serve-text-{text_tower}"
    if (folder / "model.safetensors").is_file() and (folder / "vocab.json").is_file():
        return folder
    import mlx.core as mx
    from fixtures import TINY_AUDIO, TINY_TEXT, train_bpe_files

    from mlx_clap.config import ClapAudioConfig, ClapConfig, ClapTextConfig
    from mlx_clap.io.folder import save_converted
    from mlx_clap.models.clap import ClapModel

    log(f"building a random-init model ({text_tower} text tower) in {folder}")
    mx.random.seed(0)
    # The base tower keeps RoBERTa-base's layers but the tokenizer's 1000-token vocabulary (the model
    # refuses a tokenizer of another size); a table lookup costs the same for any vocabulary.
    base = ClapTextConfig.from_dict({"vocab_size": TINY_TEXT["vocab_size"]})
    text = ClapTextConfig.from_dict(TINY_TEXT) if text_tower == "tiny" else base
    cfg = ClapConfig(audio_config=ClapAudioConfig.from_dict(TINY_AUDIO), text_config=text)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent if folder.parent.exists() else None))
    save_converted(ClapModel(cfg), tmp)
    train_bpe_files(tmp)
    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def synthetic_store(path: Path, n: int, seed: int = 0):
    """n random unit vectors (float16) under fake paths."""
    from mlx_clap.search.store import EmbeddingStore

    rng = np.random.default_rng(seed)
    store = EmbeddingStore.create(path, {"model": "synthetic"}, dim=DIM, dtype="float16")
    step = 50_000
    for first in range(0, n, step):
        m = min(step, n - first)
        v = rng.standard_normal((m, DIM)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        items = [
            {"path": f"/library/folder{(first + i) % 97:02d}/sound_{first + i:06d}.wav", "size": 1000 + i,
             "mtime": 1.0, "duration": 3.0, "channels": 1, "source_rate": 48000}
            for i in range(m)
        ]  # fmt: skip
        store.append(items, v)
    return EmbeddingStore.open(path)


class Timed:
    """ASGI wrapper recording each request's server-side time (arrival to last body byte), in ms."""

    def __init__(self, app):
        self.app = app
        self.times: list[float] = []

    async def __call__(self, scope, receive, send):
        t0 = time.perf_counter()

        async def timed_send(message):
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.times.append((time.perf_counter() - t0) * 1000)

        await self.app(scope, receive, timed_send)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def summary(values: list[float]) -> dict[str, float]:
    return {"p50": round(pct(values, 50), 1), "p95": round(pct(values, 95), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--model", type=Path, help="real model folder (default: random-init, see above)")
    ap.add_argument("--text-tower", choices=["base", "tiny"], default="base")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()

    from starlette.testclient import TestClient

    import mlx_clap
    from mlx_clap.serve.app import create_app
    from mlx_clap.serve.engine import Library

    model_dir = args.model or random_model(args.text_tower)
    model_kind = f"weights from {args.model}" if args.model else (
        f"random-init, {args.text_tower} RoBERTa text tower (full-size work per query)"
        if args.text_tower == "base" else "random-init tiny text tower (unrealistically fast)"
    )  # fmt: skip
    clap = mlx_clap.load(model_dir)
    work = Path(tempfile.mkdtemp(prefix="mlx-clap-serve-bench-"))
    try:
        log(f"building a {args.items:,}-item store")
        t0 = time.perf_counter()
        store = synthetic_store(work / "store", args.items)
        log(f"store ready in {time.perf_counter() - t0:.1f} s; loading the library")
        t0 = time.perf_counter()
        library = Library(store, clap)
        library.warm()
        startup_s = time.perf_counter() - t0
        timed = Timed(create_app(library, token="bench"))
        client = TestClient(timed, base_url="http://127.0.0.1:8765")
        headers = {"X-MLX-Clap-Token": "bench"}
        rng = np.random.default_rng(1)
        texts = [f"the sound of {' and '.join(rng.choice(WORDS, size=2, replace=False))} {i}" for i in range(
            args.queries + 5)]  # fmt: skip
        embed_ms, search_ms = [], []
        for i, text in enumerate(texts):
            t0 = time.perf_counter()
            library.text_vector(text)  # the embedding part alone, for the split
            e = (time.perf_counter() - t0) * 1000
            r = client.post("/api/search", json={"text": text, "k": 20}, headers=headers)
            r.raise_for_status()
            if i >= 5:  # the first few warm the page path
                embed_ms.append(e)
                search_ms.append(r.json()["took_ms"])
        server_ms = timed.times[5:]
        doc = {
            "benchmark": "serve_latency",
            "items": args.items,
            "dim": DIM,
            "store_dtype": "float16",
            "queries": len(server_ms),
            "k": 20,
            "model": model_kind,
            "startup_s": round(startup_s, 2),
            "server_ms": {**summary(server_ms), "mean": round(statistics.fmean(server_ms), 1)},
            "text_embedding_ms": summary(embed_ms),
            "search_and_calibration_ms": summary(search_ms),
            "target_ms": TARGET_MS,
            "target_met_at_p95": pct(server_ms, 95) <= TARGET_MS,
            "resident": library.files.matrix is not None,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "command": "python benchmarks/serve_latency.py " + " ".join(sys.argv[1:]),
        }  # fmt: skip
        try:
            import mlx.core as mx

            doc["mlx"] = mx.__version__
            doc["mlx_device"] = str(mx.default_device())
        except AttributeError:
            pass
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "serve_latency.json").write_text(json.dumps(doc, indent=1) + "\n")
        print(json.dumps(doc, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
