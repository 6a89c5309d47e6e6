"""Shared pieces of the paired benchmarks: reference/MLX model pairs, timing, metrics, FLOP counts, output.

Both sides of every comparison run in one process and one run: a random-init, full-size transformers
`ClapModel` (every parameter and buffer randomized, see tests/reference_models.py) is saved in the hub
layout, converted with `mlx_clap.convert.hf`, and loaded with `mlx_clap.io.folder.load_converted`. The
pairs are cached under `~/.cache/mlx-clap-bench` (or `$MLX_CLAP_BENCH_CACHE`), keyed by family and seed.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import mlx.core as mx  # noqa: E402

import mlx_clap  # noqa: E402,F401  (sets up the Linux CPU BLAS before any timing)

SAMPLE_RATE = 48000
CLIP_SAMPLES = 480000  # 10 s: no random crop or fusion draw, so both sides see the same input


@dataclass(frozen=True)
class Family:
    name: str
    audio: dict[str, Any]
    fusion: bool


def _families() -> dict[str, Family]:
    from reference_models import HTSAT_BASE, HTSAT_TINY

    return {
        "htsat-tiny": Family("htsat-tiny", dict(HTSAT_TINY), False),
        "htsat-tiny-fused": Family("htsat-tiny-fused", dict(HTSAT_TINY), True),
        "htsat-base": Family("htsat-base", dict(HTSAT_BASE), False),
    }


FAMILY_NAMES = ("htsat-tiny", "htsat-tiny-fused", "htsat-base")


def cache_dir() -> Path:
    return Path(os.environ.get("MLX_CLAP_BENCH_CACHE", Path.home() / ".cache" / "mlx-clap-bench"))


def model_pair(family: str, seed: int = 0, torch_device: str = "cpu"):
    """(reference transformers ClapModel in eval mode, converted folder path) for a family, cached on disk."""
    import torch
    from reference_models import random_hf_clap, save_hub_folder
    from transformers import ClapModel

    from mlx_clap.convert.hf import convert_hf_folder

    fam = _families()[family]
    base = cache_dir() / f"{family}-seed{seed}"
    hf_dir, mlx_dir = base / "hf", base / "mlx"
    if (mlx_dir / "model.safetensors").is_file() and (hf_dir / "config.json").is_file():
        ref = ClapModel.from_pretrained(hf_dir, dtype=torch.float32).eval()
    else:
        ref = random_hf_clap(audio=fam.audio, fusion=fam.fusion, seed=seed)
        save_hub_folder(ref, hf_dir)
        convert_hf_folder(hf_dir, mlx_dir, source_name=f"random {family} seed {seed}")
    return ref.to(torch_device), mlx_dir


def load_mlx(mlx_dir: Path, dtype: str = "float32"):
    from mlx_clap.loading import load as load_converted

    return load_converted(mlx_dir, dtype=dtype)


def hf_feature_extractor(fusion: bool):
    """transformers' ClapFeatureExtractor with the hub settings (fmin 50, fmax 14000, repeatpad)."""
    from transformers import ClapFeatureExtractor

    return ClapFeatureExtractor(
        frequency_min=50,
        frequency_max=14000,
        truncation="fusion" if fusion else "rand_trunc",
        padding="repeatpad",
    )


def waveforms(batch: int, seed: int = 0, samples: int = CLIP_SAMPLES) -> np.ndarray:
    """(batch, samples) float32: tones plus noise at speech-like levels, different per row."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / SAMPLE_RATE
    rows = []
    for i in range(batch):
        f = 110.0 * (1 + i % 7) * (1 + rng.random())
        x = 0.3 * np.sin(2 * np.pi * f * t) + 0.05 * rng.standard_normal(samples)
        rows.append(x * (0.2 + rng.random()))
    return np.asarray(rows, dtype=np.float32)


def token_batch(batch: int, length: int, seed: int = 0, vocab: int = 50265) -> tuple[np.ndarray, np.ndarray]:
    """RoBERTa-shaped ids (<s> ... </s> then pads) with a different real length per row, and the mask."""
    rng = np.random.default_rng(seed)
    ids = np.ones((batch, length), dtype=np.int64)  # pad id 1
    mask = np.zeros((batch, length), dtype=np.int64)
    for i in range(batch):
        n = length if i == 0 else int(rng.integers(3, length + 1))
        ids[i, 0] = 0
        ids[i, 1 : n - 1] = rng.integers(3, vocab, size=n - 2)
        ids[i, n - 1] = 2
        mask[i, :n] = 1
    return ids, mask


# ------------------------------------------------------------------------------------------- metrics
def compare(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """max |Δ|, relative L2 ‖Δ‖/‖ref‖, and the smallest per-row cosine (rows = first axis)."""
    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    if ref.shape != got.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape}, mlx {got.shape}")
    diff = got - ref
    r = ref.reshape(ref.shape[0], -1)
    g = got.reshape(got.shape[0], -1)
    cos = (r * g).sum(1) / np.maximum(np.linalg.norm(r, axis=1) * np.linalg.norm(g, axis=1), 1e-30)
    return {
        "max_abs": float(np.abs(diff).max()),
        "rel_l2": float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-30)),
        "cosine_min": float(cos.min()),
    }


def stop_on_sigterm() -> None:
    """Turn SIGTERM (what `timeout` sends) into KeyboardInterrupt, so a run can save what it measured."""
    import signal

    def _raise(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _raise)


# -------------------------------------------------------------------------------------------- timing
def mlx_sync(out: Any = None) -> None:
    if out is not None:
        mx.eval(out)
    mx.synchronize()


def torch_sync(device: str) -> Callable[[], None]:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.synchronize
    if device == "mps":
        return torch.mps.synchronize
    return lambda: None


def measure(
    fn: Callable[[], Any],
    sync: Callable[[Any], None],
    *,
    warmup: int = 1,
    repeats: int = 5,
    budget_s: float = 30.0,
) -> dict[str, Any]:
    """Median wall time of `fn` (each call followed by `sync(result)`), after `warmup` calls.

    Stops early once `budget_s` is spent (after at least one timed call), so large batches on slow
    machines still finish; `n` says how many calls were timed.
    """
    for _ in range(warmup):
        sync(fn())
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return {"median_s": statistics.median(times), "min_s": min(times), "n": len(times)}


# -------------------------------------------------------------------------------------------- FLOPs
def htsat_flops(audio_config, batch: int = 1) -> float:
    """Multiply-add FLOPs (2 per MAC) of the HTSAT tower for one 10-s clip, without the fusion branch.

    Linear layers: qkv 3C², out C², MLP 2·r·C² per token; attention 2·64·C per token (QKᵀ and AV over
    8×8 windows); merging 8C² per merged token; the 4×4 patch conv. HTSAT-tiny: 11.8 GFLOP.
    """
    c = audio_config.patch_embeds_hidden_size
    grid = audio_config.spec_size // audio_config.patch_size
    tokens = grid * grid
    win = audio_config.window_size**2
    r = audio_config.mlp_ratio
    total = 2.0 * tokens * c * audio_config.patch_size**2 * audio_config.patch_embed_input_channels
    n_stages = len(audio_config.depths)
    for i, depth in enumerate(audio_config.depths):
        dim = c * 2**i
        n = tokens // 4**i
        per_block = 2.0 * n * dim * dim * (3 + 1 + 2 * r) + 4.0 * n * min(win, n) * dim
        total += depth * per_block
        if i < n_stages - 1:
            total += 2.0 * (n // 4) * (4 * dim) * (2 * dim)
    hidden = audio_config.hidden_size
    total += 2.0 * (hidden * 512 + 512 * 512)  # projection
    return total * batch


def text_flops(text_config, length: int, batch: int = 1) -> float:
    """FLOPs of RoBERTa for `batch` sequences of `length` tokens (layers, pooler; embeddings are lookups)."""
    h = text_config.hidden_size
    per_layer = 2.0 * length * (4 * h * h + 2 * h * text_config.intermediate_size) + 4.0 * length * length * h
    return batch * (text_config.num_hidden_layers * per_layer + 2.0 * h * h + 2.0 * (h * 512 + 512 * 512))


def matmul_rate(n: int = 2048, dtype: str = "float32", repeats: int = 3) -> float:
    """Measured GFLOP/s of one n×n×n MLX matmul on the default device (the roofline used for the floor)."""
    dt = getattr(mx, dtype)
    a = mx.random.normal((n, n)).astype(dt)
    b = mx.random.normal((n, n)).astype(dt)
    mx.eval(a, b)
    res = measure(lambda: a @ b, mlx_sync, warmup=1, repeats=repeats, budget_s=10)
    return 2.0 * n**3 / res["min_s"] / 1e9


def torch_matmul_rate(device: str, n: int = 2048, dtype: str = "float32", repeats: int = 3) -> float:
    import torch

    dt = getattr(torch, dtype)
    a = torch.randn(n, n, device=device).to(dt)
    b = torch.randn(n, n, device=device).to(dt)
    sync = torch_sync(device)
    res = measure(lambda: a @ b, lambda _: sync(), warmup=1, repeats=repeats, budget_s=10)
    return 2.0 * n**3 / res["min_s"] / 1e9


# ----------------------------------------------------------------------------------------- reporting
def environment(torch_device: str = "cpu") -> dict[str, Any]:
    """Versions, device, BLAS and machine facts recorded next to every result."""
    import torch
    import transformers

    from mlx_clap import settings
    from mlx_clap.ops import parallel as cpu_parallel
    from mlx_clap.ops.blas import blas_info, get_num_threads
    from mlx_clap.ops.malloc import malloc_tuned
    from mlx_clap.ops.setup import prepare_cpu

    prepare_cpu()  # what load() does; idempotent

    info: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "mlx": getattr(mx, "__version__", "?"),
        "mlx_device": str(mx.default_device()),
        "torch": torch.__version__,
        "torch_device": torch_device,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "mlx_clap_blas": blas_info(),
        "mlx_blas_threads": get_num_threads(),
        "mlx_clap_cpu_threads": cpu_parallel.worker_count(),
        "malloc_tuned": malloc_tuned(),
        "mlx_enable_tf32": os.environ.get("MLX_ENABLE_TF32"),
        "mlx_clap_cpu_kernels": settings.current().use_cpu_kernels,
        "mlx_clap_cpu_optimizations": settings.current().cpu_optimizations,
        "note": os.environ.get("MLX_CLAP_BENCH_NOTE"),
    }
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if torch_device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    if hasattr(mx, "device_info"):
        try:
            info["mlx_device_info"] = {k: str(v) for k, v in mx.device_info().items()}
        except Exception:  # device_info is backend-dependent
            pass
    return info


def save(name: str, data: dict[str, Any], markdown: str, out_dir: Path | None = None) -> tuple[Path, Path]:
    """Write results/<name>.json and results/<name>.md; returns both paths."""
    out = Path(out_dir) if out_dir else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out / f"{name}.json", out / f"{name}.md"
    jpath.write_text(json.dumps(data, indent=1, sort_keys=False, default=str) + "\n")
    mpath.write_text(markdown)
    return jpath, mpath


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if v == 0:
                return "0"
            if abs(v) < 1e-3 or abs(v) >= 1e5:
                return f"{v:.2e}"
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
