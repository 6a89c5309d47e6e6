"""Server-side latency of a text query in `mlx-clap serve` over a synthetic 100k-item store.

    python benchmarks/serve_latency.py                       # 100,000 x 512, 10 rounds of 50 queries
    python benchmarks/serve_latency.py --model DIR           # real weights (a converted or HF folder)
    python benchmarks/serve_latency.py --text-tower tiny     # the tests' tiny text tower (fast, unrealistic)

The store holds random unit vectors (float16, as `embed` stores them) under fake paths. The model:
with --model, that folder; otherwise a random-init model with the full-size RoBERTa-base text tower
(12 layers, 768 wide: the same work per token as laion/clap-htsat-unfused's, meaningless scores) and
the tests' tiny audio tower, built once and cached under ~/.cache/mlx-clap-bench/serve-text-<size>-v3.

The work per query grows with its token count, so the random model's tokenizer must cut the queries as
RoBERTa's does. RoBERTa's byte-level BPE (50k tokens) holds every word of these queries as one token,
so a query of w words is w + 2 tokens (<s> and </s>). The benchmark trains a byte-level BPE of its own
on those words until each is one token too, and reports the token counts; when laion_clap is installed
it also counts the queries with CLIP's 49k BPE (shipped in laion_clap) as an independent check.

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


def query_words() -> list[str]:
    """Every word the benchmark's queries use (see `queries`)."""
    return WORDS + ["the", "sound", "of", "and"] + [str(i) for i in range(1000)]


def queries(n: int, seed: int = 1) -> list[str]:
    """n distinct queries of 7 words: "the sound of <w1> and <w2> <i>"."""
    rng = np.random.default_rng(seed)
    return [f"the sound of {' and '.join(rng.choice(WORDS, size=2, replace=False))} {i}" for i in range(n)]


def train_word_bpe(folder: Path) -> None:
    """A RoBERTa-layout byte-level BPE (vocab.json + merges.txt) with every query word one token."""
    from tokenizers import ByteLevelBPETokenizer

    # Queries start with "the" (no leading space: its own token, as in RoBERTa's vocabulary).
    lines = [" ".join(query_words())] * 4 + [
        "the " + " ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))
    ]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        lines,
        vocab_size=20_000,  # more than the merges these lines allow: training stops at whole words
        min_frequency=1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        show_progress=False,
    )
    bpe.save_model(str(folder))


def clip_token_counts(texts: list[str]) -> list[int] | None:
    """The texts' token counts (with start and end) under CLIP's BPE, if laion_clap is installed."""
    import importlib.util

    spec = importlib.util.find_spec("laion_clap")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "clap_module" / "tokenizer.py"
    try:  # the file alone: importing laion_clap would import torch
        mod_spec = importlib.util.spec_from_file_location("_clip_tokenizer", path)
        mod = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(mod)
        tok = mod.SimpleTokenizer()
    except Exception as exc:  # noqa: BLE001 - an optional cross-check
        log(f"CLIP BPE not usable for the token check: {exc}")
        return None
    return [len(tok.encode(t)) + 2 for t in texts]


def random_model(text_tower: str) -> Path:
    """A converted random-init model folder: tiny audio tower, `text_tower` ("base" or "tiny") text."""
    folder = cache_dir() / f"serve-text-{text_tower}-v3"
    if (folder / "model.safetensors").is_file() and (folder / "vocab.json").is_file():
        return folder
    import mlx.core as mx
    from fixtures import TINY_AUDIO, TINY_TEXT

    from mlx_clap.config import ClapAudioConfig, ClapConfig, ClapTextConfig
    from mlx_clap.io.folder import save_converted
    from mlx_clap.models.clap import ClapModel

    log(f"building a random-init model ({text_tower} text tower) in {folder}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent))
    train_word_bpe(tmp)
    vocab = len(json.loads((tmp / "vocab.json").read_text()))
    mx.random.seed(0)
    # RoBERTa-base's layers with the trained tokenizer's vocabulary (the model refuses a tokenizer of
    # another size); a table lookup costs the same for any vocabulary.
    sizes = {**TINY_TEXT, "vocab_size": vocab} if text_tower == "tiny" else {"vocab_size": vocab}
    cfg = ClapConfig(
        audio_config=ClapAudioConfig.from_dict(TINY_AUDIO), text_config=ClapTextConfig.from_dict(sizes)
    )
    save_converted(ClapModel(cfg), tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def synthetic_store(path: Path, n: int, seed: int = 0):
    """n random unit vectors (float16) under fake paths."""
    from mlx_clap.store import Store

    rng = np.random.default_rng(seed)
    store = Store.create(path, {"model": "synthetic"}, dim=DIM, dtype="float16")
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
        store.write(items, v)
    store.compact()
    store.close()
    return Store.open(path)


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


def mean_of(values: list[int]) -> float:
    return round(statistics.fmean(values), 2)


def summary(values: list[float]) -> dict[str, float]:
    return {"p50": round(pct(values, 50), 1), "p95": round(pct(values, 95), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=50, help="timed queries per round")
    ap.add_argument("--rounds", type=int, default=10, help="rounds of queries (this machine's speed drifts)")
    ap.add_argument("--model", type=Path, help="real model folder (default: random-init, see above)")
    ap.add_argument("--text-tower", choices=["base", "tiny"], default="base")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()

    from starlette.testclient import TestClient

    import mlx_clap
    from mlx_clap.serve.app import create_app
    from mlx_clap.serve.engine import Library, freeze_loaded

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
        freeze_loaded()  # as `mlx-clap serve` does
        startup_s = time.perf_counter() - t0
        timed = Timed(create_app(library, token="bench"))
        client = TestClient(timed, base_url="http://127.0.0.1:8765")
        headers = {"X-MLX-Clap-Token": "bench"}
        for text in queries(5, seed=0):  # the first few warm the page path
            client.post("/api/search", json={"text": text, "k": 20}, headers=headers).raise_for_status()
        texts, rounds, embed_ms, search_ms, server_ms = [], [], [], [], []
        for r in range(args.rounds):
            round_texts = queries(args.queries, seed=r + 1)
            texts += round_texts
            first = len(timed.times)
            for text in round_texts:
                t0 = time.perf_counter()
                library.text_vector(text)  # the embedding part alone, for the split
                embed_ms.append((time.perf_counter() - t0) * 1000)
                res = client.post("/api/search", json={"text": text, "k": 20}, headers=headers)
                res.raise_for_status()
                search_ms.append(res.json()["took_ms"])
            times = timed.times[first:]
            server_ms += times
            rounds.append(summary(times))
            log(f"round {r + 1}: server p50 {rounds[-1]['p50']} ms, p95 {rounds[-1]['p95']} ms")
        tokens = [int(clap.family.text_inputs([t])[0].shape[1]) for t in texts]
        # The map of the whole library: computed (PCA + k-means) on the first request and cached in
        # map.json; then the cached answer (what a later page load or restart gets).
        map_s = []
        for _ in range(2):
            t0 = time.perf_counter()
            res = client.get("/api/map", headers=headers)
            res.raise_for_status()
            map_s.append(round(time.perf_counter() - t0, 3))
        n_points = len(res.json()["x"]) if "x" in res.json() else None
        log(f"map: first {map_s[0]} s, cached {map_s[1]} s, {len(res.content) / 1e6:.1f} MB")
        clip_tokens = clip_token_counts(texts)
        doc = {
            "benchmark": "serve_latency",
            "items": args.items,
            "dim": DIM,
            "store_dtype": "float16",
            "queries": len(server_ms),
            "k": 20,
            "model": model_kind,
            "tokens_per_query": {"min": min(tokens), "max": max(tokens), "mean": mean_of(tokens)},
            "clip_bpe_tokens_per_query": None if clip_tokens is None else mean_of(clip_tokens),
            "startup_s": round(startup_s, 2),
            "map": {"first_s": map_s[0], "cached_s": map_s[1], "bytes": len(res.content), "points": n_points},
            "server_ms": {**summary(server_ms), "mean": round(statistics.fmean(server_ms), 1)},
            "server_ms_by_round": rounds,
            "text_embedding_ms": summary(embed_ms),
            "search_and_calibration_ms": summary(search_ms),
            "target_ms": TARGET_MS,
            "target_met_at_p50": pct(server_ms, 50) <= TARGET_MS,
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
