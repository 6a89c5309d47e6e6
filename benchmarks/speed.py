"""Paired speed benchmark: mlx-clap vs transformers (ClapModel + ClapFeatureExtractor), one process, one run.

Parts, each for MLX, MLX under `mx.compile` (where it applies) and PyTorch, at batch 1/8/64/256:
  audio  log-mel (B, 1, 1001, 64) -> unit audio embedding (HTSAT tower + projection)
  text   token ids (B, L) -> unit text embedding (RoBERTa + projection)
  mel    10-s waveforms -> log-mel features (MLX frontend vs HF's numpy extractor)
  e2e    10-s waveforms -> unit audio embedding (extractor + tower)
  stages per-stage time of the audio tower (bn0+fold, patch embed, each Swin stage, norm+pool+projection)
Warm-up first, then the median of repeats; MLX results are forced with `mx.eval` (+ `mx.synchronize`),
PyTorch is synchronized on GPUs. A (part, dtype, batch) whose predicted time, from the batch before it,
exceeds `--max-seconds` is skipped. The FLOP floor is the tower's FLOPs (11.8 GFLOP per 10-s clip for
HTSAT-tiny) over the measured rate of a 2048³ matmul on the same device and dtype.

    python benchmarks/speed.py --quick                     # ~1 min: float32, batch 1 and 8
    python benchmarks/speed.py                             # float32/bfloat16/float16, batch 1/8/64/256
    python benchmarks/speed.py --parts audio --batches 64 --dtypes bfloat16 --torch-device cuda

On a Mac the MLX side runs on Metal (the default device); on Linux with `mlx[cpu]` on the CPU with the
OpenBLAS that `mlx_clap.ops.blas` selects (see `environment.mlx_clap_blas` in the JSON).
Writes benchmarks/results/speed[-<tag>].json and .md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (sets sys.path, HF offline, the Linux CPU BLAS)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlx_clap.ops.device import cpu_fast_paths as on_cpu  # noqa: E402

PARTS = ("audio", "text", "mel", "e2e", "stages")


class Bench:
    def __init__(self, args: argparse.Namespace):
        import torch

        self.args = args
        self.torch = torch
        self.rows: list[dict[str, Any]] = []
        self.sync_t = common.torch_sync(args.torch_device)
        self.ref, self.mlx_dir = common.model_pair(args.family, torch_device=args.torch_device)
        self.models: dict[str, Any] = {}
        self.refs: dict[str, Any] = {}
        self.fusion = common._families()[args.family].fusion
        self.skipped: list[str] = []

    # ------------------------------------------------------------------------------------ models
    def mlx_model(self, dtype: str):
        if dtype not in self.models:
            self.models = {dtype: common.load_mlx(self.mlx_dir, dtype)}  # keep one in memory
        return self.models[dtype]

    def torch_model(self, dtype: str):
        if dtype not in self.refs:
            self.refs = {}
            model = self.ref.to(getattr(self.torch, dtype))
            self.refs[dtype] = model
        return self.refs[dtype]

    def t_time(self, fn) -> dict[str, Any]:
        def call():
            with self.torch.inference_mode():
                return fn()

        return common.measure(call, lambda _: self.sync_t(), **self.kw())

    def m_time(self, fn) -> dict[str, Any]:
        return common.measure(fn, common.mlx_sync, **self.kw())

    def kw(self) -> dict[str, Any]:
        return dict(warmup=self.args.warmup, repeats=self.args.repeats, budget_s=self.args.max_seconds)

    def record(self, part: str, dtype: str, batch: int, impl: str, res: dict[str, Any], flops: float | None):
        row = {"part": part, "dtype": dtype, "batch": batch, "impl": impl, **res}
        row["per_item_ms"] = 1e3 * res["median_s"] / batch
        if flops:
            row["gflops"] = flops / res["median_s"] / 1e9
        self.rows.append(row)
        print(f"  {part:6s} {dtype:8s} B={batch:<4d} {impl:13s} {1e3 * res['median_s']:9.1f} ms", flush=True)

    def compiled(self, part: str, dtype: str, batch: int, fn, flops: float | None) -> None:
        """Time an `mx.compile`d call; a function that cannot be traced is noted, not fatal."""
        try:
            res = self.m_time(fn)
        except (ValueError, RuntimeError) as exc:
            note = f"{part}: mx.compile not applicable ({str(exc).splitlines()[0][:100]})"
            if note not in self.skipped:
                self.skipped.append(note)
            return
        self.record(part, dtype, batch, "mlx-compiled", res, flops)

    def too_slow(self, part: str, dtype: str, batch: int) -> bool:
        """Predict from the largest smaller batch already timed for this part and dtype."""
        done = [r for r in self.rows if r["part"] == part and r["dtype"] == dtype and r["batch"] < batch]
        if not done:
            return False
        worst = max(r["per_item_ms"] for r in done if r["batch"] == max(d["batch"] for d in done))
        predicted = worst * batch / 1e3 * (self.args.warmup + 1)
        if predicted > self.args.max_seconds:
            self.skipped.append(f"{part} {dtype} B={batch} (predicted {predicted:.0f} s a side: over budget)")
            return True
        return False

    # ------------------------------------------------------------------------------------- parts
    def audio(self, dtype: str, batch: int) -> None:
        torch = self.torch
        cfg = self.mlx_model(dtype).config.audio_config
        flops = common.htsat_flops(cfg, batch)
        feats = (
            np.random.default_rng(batch).standard_normal((batch, 1, 1001, 64)).astype(np.float32) * 20 - 40
        )
        if self.fusion:
            feats = np.repeat(feats, 4, axis=1)
        ref = self.torch_model(dtype)
        xt = torch.from_numpy(feats).to(self.args.torch_device, getattr(torch, dtype))
        self.record(
            "audio",
            dtype,
            batch,
            "torch",
            self.t_time(lambda: ref.get_audio_features(input_features=xt)),
            flops,
        )
        model = self.mlx_model(dtype)
        xm = mx.array(feats)
        mx.eval(xm)
        self.record("audio", dtype, batch, "mlx", self.m_time(lambda: model.get_audio_features(xm)), flops)
        if batch > 1 and on_cpu():  # the embedding path: the batch split over the CPU cores
            self.record(
                "audio", dtype, batch, "mlx-cores", self.m_time(lambda: model.embed_audio_inputs(xm)), flops
            )
        if self.args.compile:
            fn = mx.compile(lambda x: model.get_audio_features(x))
            self.compiled("audio", dtype, batch, lambda: fn(xm), flops)

    def text(self, dtype: str, batch: int) -> None:
        torch = self.torch
        length = self.args.text_length
        model = self.mlx_model(dtype)
        flops = common.text_flops(model.config.text_config, length, batch)
        ids, mask = common.token_batch(batch, length, seed=batch)
        ref = self.torch_model(dtype)
        it = torch.from_numpy(ids).to(self.args.torch_device)
        mt = torch.from_numpy(mask).to(self.args.torch_device)
        res = self.t_time(lambda: ref.get_text_features(input_ids=it, attention_mask=mt))
        self.record("text", dtype, batch, "torch", res, flops)
        im, mm = mx.array(ids), mx.array(mask)
        self.record("text", dtype, batch, "mlx", self.m_time(lambda: model.get_text_features(im, mm)), flops)
        if batch > 1 and on_cpu():  # the embedding path: big batches split over the CPU cores
            res = self.m_time(lambda: model.embed_text_inputs(im, mm))
            self.record("text", dtype, batch, "mlx-cores", res, flops)
        if self.args.compile:
            fn = mx.compile(lambda i, m: model.get_text_features(i, m))
            self.compiled("text", dtype, batch, lambda: fn(im, mm), flops)

    def mel(self, dtype: str, batch: int) -> None:
        if dtype != "float32":
            return  # the frontend is float32 on both sides
        waves = list(common.waveforms(batch, seed=batch))
        hf_fe = common.hf_feature_extractor(self.fusion)
        res = common.measure(
            lambda: hf_fe(waves, sampling_rate=common.SAMPLE_RATE, return_tensors="np"),
            lambda _: None,
            **self.kw(),
        )
        self.record("mel", dtype, batch, "torch", res, None)  # HF's extractor is numpy, whatever the device
        fe = self.mlx_model(dtype).feature_extractor
        self.record(
            "mel",
            dtype,
            batch,
            "mlx",
            self.m_time(lambda: fe(waves, sampling_rate=common.SAMPLE_RATE)[0]),
            None,
        )

    def e2e(self, dtype: str, batch: int) -> None:
        torch = self.torch
        waves = list(common.waveforms(batch, seed=batch))
        hf_fe = common.hf_feature_extractor(self.fusion)
        ref = self.torch_model(dtype)
        dev, tdt = self.args.torch_device, getattr(torch, dtype)

        def run_torch():
            inp = hf_fe(waves, sampling_rate=common.SAMPLE_RATE, return_tensors="pt")
            longer = inp["is_longer"].to(dev) if self.fusion else None
            return ref.get_audio_features(input_features=inp["input_features"].to(dev, tdt), is_longer=longer)

        model = self.mlx_model(dtype)
        flops = common.htsat_flops(model.config.audio_config, batch)
        self.record("e2e", dtype, batch, "torch", self.t_time(run_torch), flops)
        fe = model.feature_extractor

        def run_mlx():  # the embedding path: MLX frontend, then the tower over all CPU cores
            feats, longer = fe(waves, sampling_rate=common.SAMPLE_RATE)
            return model.embed_audio_inputs(feats, longer if self.fusion else None)

        self.record("e2e", dtype, batch, "mlx", self.m_time(run_mlx), flops)

    def stages(self, dtype: str, batch: int) -> None:
        """Per-stage medians: MLX evaluates stage by stage; PyTorch is timed with forward hooks."""
        torch = self.torch
        feats = (
            np.random.default_rng(batch).standard_normal((batch, 1, 1001, 64)).astype(np.float32) * 20 - 40
        )
        if self.fusion:
            feats = np.repeat(feats, 4, axis=1)
        model = self.mlx_model(dtype)
        enc = model.audio_model.audio_encoder
        xm = mx.array(feats)
        mx.eval(xm)
        wdt = enc.patch_embed.proj.weight.dtype

        def mlx_once() -> list[float]:
            from mlx_clap.models.layers import layer_norm as _layer_norm

            marks = [time.perf_counter()]
            h = enc.mel_to_image(xm).astype(wdt)
            mx.eval(h)
            marks.append(time.perf_counter())
            h = enc.patch_embed(h, None)
            mx.eval(h)
            marks.append(time.perf_counter())
            for layer in enc.layers:
                h = layer(h)
                mx.eval(h)
                marks.append(time.perf_counter())
            last = _layer_norm(enc.norm, h)
            pooled = mx.mean(last.astype(mx.float32), axis=(1, 2)).astype(wdt)
            mx.eval(model.audio_projection(pooled))
            marks.append(time.perf_counter())
            return list(np.diff(marks))

        names = ["bn0+bicubic+fold", "patch embed"] + [f"swin stage {i + 1}" for i in range(len(enc.layers))]
        names.append("norm+pool+projection")
        ref = self.torch_model(dtype)
        tenc = ref.audio_model.audio_encoder
        marks: list[float] = []

        def mark(*_):
            self.sync_t()
            marks.append(time.perf_counter())

        hooks = [
            tenc.batch_norm.register_forward_pre_hook(mark),
            tenc.patch_embed.register_forward_pre_hook(mark),
        ]
        hooks += [layer.register_forward_pre_hook(mark) for layer in tenc.layers]
        hooks.append(tenc.norm.register_forward_pre_hook(mark))
        xt = torch.from_numpy(feats).to(self.args.torch_device, getattr(torch, dtype))

        def torch_once() -> list[float]:
            marks.clear()
            with torch.inference_mode():
                ref.get_audio_features(input_features=xt)
            mark()
            return list(np.diff(marks))

        try:
            per = {"torch": self._median_lists(torch_once), "mlx": self._median_lists(mlx_once)}
        finally:
            for h in hooks:
                h.remove()
        # The torch hooks put bn0 from batch_norm to patch_embed; MLX's first mark includes the same work.
        cfg = model.config.audio_config
        stage_flops = self._stage_flops(cfg, batch)
        for impl, times in per.items():
            for name, t, fl in zip(names, times, stage_flops, strict=True):
                row = {
                    "part": "stages",
                    "stage": name,
                    "dtype": dtype,
                    "batch": batch,
                    "impl": impl,
                    "median_s": t,
                }
                row["per_item_ms"] = 1e3 * t / batch
                if fl:
                    row["gflops"] = fl / t / 1e9
                self.rows.append(row)
        for name, tt, tm in zip(names, per["torch"], per["mlx"], strict=True):
            print(
                f"  stages {dtype:8s} B={batch:<4d} {name:22s} "
                f"torch {1e3 * tt:8.1f} ms  mlx {1e3 * tm:8.1f} ms"
            )

    def _median_lists(self, fn) -> list[float]:
        for _ in range(self.args.warmup):
            fn()
        runs, start = [], time.perf_counter()
        for _ in range(max(1, min(self.args.repeats, 5))):
            runs.append(fn())
            if time.perf_counter() - start > self.args.max_seconds:
                break
        return list(np.median(np.array(runs), axis=0))

    @staticmethod
    def _stage_flops(cfg, batch: int) -> list[float | None]:
        c = cfg.patch_embeds_hidden_size
        tokens = (cfg.spec_size // cfg.patch_size) ** 2
        out: list[float | None] = [None, 2.0 * tokens * c * cfg.patch_size**2 * batch]
        n_stages = len(cfg.depths)
        for i, depth in enumerate(cfg.depths):
            dim, n = c * 2**i, tokens // 4**i
            fl = depth * (
                2.0 * n * dim * dim * (4 + 2 * cfg.mlp_ratio) + 4.0 * n * min(cfg.window_size**2, n) * dim
            )
            if i < n_stages - 1:
                fl += 2.0 * (n // 4) * (4 * dim) * (2 * dim)
            out.append(fl * batch)
        out.append(None)
        return out


# ------------------------------------------------------------------------------------------ report
def summarize(rows: list[dict[str, Any]], rates: dict[str, float]) -> list[list[Any]]:
    """One line per (part, dtype, batch): torch and MLX ms; speedup; GFLOP/s; × floor."""
    table = []
    keys = sorted(
        {(r["part"], r["dtype"], r["batch"]) for r in rows if r["part"] != "stages"},
        key=lambda k: (PARTS.index(k[0]), k[1], k[2]),
    )
    for part, dtype, batch in keys:
        cell = {r["impl"]: r for r in rows if (r["part"], r["dtype"], r["batch"]) == (part, dtype, batch)}
        t = cell.get("torch", {}).get("median_s")
        m = cell.get("mlx", {}).get("median_s")
        p = cell.get("mlx-cores", {}).get("median_s")
        c = cell.get("mlx-compiled", {}).get("median_s")
        best = min((x for x in (m, p, c) if x is not None), default=None)
        speedup = t / best if (t and best) else None
        gfl = max(((cell[k].get("gflops") or 0) for k in cell if k.startswith("mlx")), default=0) or None
        rate = rates.get(f"mlx_{dtype}")
        # floor = FLOPs / rate and best = FLOPs / gfl, so best / floor = rate / gfl.
        x_floor = rate / gfl if (gfl and rate) else None
        table.append(
            [part, dtype, batch, ms(t), ms(m), ms(p), ms(c), blank(speedup), blank(gfl), blank(x_floor)]
        )
    return table


def blank(x: float | None) -> Any:
    return "" if x is None else x


def ms(x: float | None) -> Any:
    return "" if x is None else round(1e3 * x, 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="float32, batch 1 and 8, 3 repeats (~1 min)")
    p.add_argument("--family", default="htsat-tiny", choices=common.FAMILY_NAMES)
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--batches", nargs="+", type=int, default=None)
    p.add_argument("--dtypes", nargs="+", default=None)
    p.add_argument("--text-length", type=int, default=32)
    p.add_argument("--stage-batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--max-seconds", type=float, default=None, help="time budget per measurement")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--torch-device", default="cpu")
    p.add_argument("--torch-threads", type=int, default=None)
    p.add_argument(
        "--threads", type=int, default=None, help="threads for both sides: torch and MLX's OpenBLAS (CPU)"
    )
    p.add_argument(
        "--tf32",
        choices=["default", "on", "off"],
        default="default",
        help="PyTorch CUDA TF32 for matmuls and convolutions (MLX's is the MLX_ENABLE_TF32 variable)",
    )
    p.add_argument("--mlx-device", choices=["default", "cpu", "gpu"], default="default")
    p.add_argument("--tag", default="")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    args.batches = args.batches or ([1, 8] if args.quick else [1, 8, 64, 256])
    args.dtypes = args.dtypes or (["float32"] if args.quick else ["float32", "bfloat16", "float16"])
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.max_seconds = args.max_seconds or (8.0 if args.quick else 40.0)
    if args.mlx_device != "default":
        mx.set_default_device(getattr(mx, args.mlx_device))
    import torch

    from mlx_clap import settings
    from mlx_clap.ops.setup import prepare_cpu

    if args.threads:
        args.torch_threads = args.torch_threads or args.threads
        # MLX's own CPU worker threads (frontend blocks, embed_audio_inputs) and OpenBLAS get the same count.
        settings.configure(cpu_threads=args.threads, blas_threads=args.threads)
    prepare_cpu()  # as load() does, before the matmul rate is measured
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.tf32 != "default":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32 == "on"
        torch.backends.cudnn.allow_tf32 = args.tf32 == "on"
    t0 = time.perf_counter()
    rates = {}
    for dtype in args.dtypes:
        rates[f"mlx_{dtype}"] = common.matmul_rate(dtype=dtype)
        rates[f"torch_{dtype}"] = common.torch_matmul_rate(args.torch_device, dtype=dtype)
        print(
            f"matmul 2048³ {dtype}: mlx {rates[f'mlx_{dtype}']:.1f} GFLOP/s, "
            f"torch {rates[f'torch_{dtype}']:.1f} GFLOP/s",
            flush=True,
        )
    bench = Bench(args)
    common.stop_on_sigterm()
    try:
        for dtype in args.dtypes:
            for part in args.parts:
                if part == "stages":
                    bench.stages(dtype, args.stage_batch)
                    continue
                for batch in args.batches:
                    if bench.too_slow(part, dtype, batch):
                        continue
                    getattr(bench, part)(dtype, batch)
    except KeyboardInterrupt:  # a timeout or Ctrl-C: keep what was measured
        bench.skipped.append("interrupted: the rest was not measured")
    env = common.environment(args.torch_device)
    env["mlx_device"] = str(mx.default_device())
    env["torch_tf32"] = {
        "matmul": torch.backends.cuda.matmul.allow_tf32,
        "cudnn": torch.backends.cudnn.allow_tf32,
    }
    table = summarize(bench.rows, rates)
    audio_fl = common.htsat_flops(bench.mlx_model(args.dtypes[0]).config.audio_config)
    data = {
        "benchmark": "speed",
        "args": vars(args) | {"out": str(args.out) if args.out else None},
        "environment": env,
        "matmul_gflops": rates,
        "audio_gflop_per_clip": audio_fl / 1e9,
        "rows": bench.rows,
        "skipped": bench.skipped,
        "wall_s": time.perf_counter() - t0,
    }
    headers = [
        "part",
        "dtype",
        "batch",
        "torch ms",
        "mlx ms",
        "mlx all-cores ms",
        "mlx compiled ms",
        "torch / best mlx",
        "mlx GFLOP/s",
        "× FLOP floor",
    ]
    stage_rows = [
        [r["stage"], r["dtype"], r["batch"], r["impl"], round(1e3 * r["median_s"], 2), r.get("gflops", "")]
        for r in bench.rows
        if r["part"] == "stages"
    ]
    cmd = " ".join(argv if argv is not None else sys.argv[1:])
    md = (
        f"# Speed: mlx-clap ({env['mlx_device']}) vs transformers (torch {env['torch_device']}), "
        f"{args.family}\n\n"
        f"`python benchmarks/speed.py {cmd}` — {env['date_utc']}, {env.get('gpu') or env.get('cpu', '')}, "
        f"{env['cpu_count']} CPUs, mlx {env['mlx']} (BLAS threads {env['mlx_blas_threads']}, "
        f"CPU workers {env['mlx_clap_cpu_threads']}), "
        f"torch {env['torch']} ({env['torch_threads']} threads), "
        f"BLAS: {env['mlx_clap_blas'].get('config') or env['mlx_clap_blas'].get('status')}, "
        f"MLX_CLAP_CPU_KERNELS {'on' if env['mlx_clap_cpu_kernels'] else 'off'}"
        + (", glibc malloc tuned" if env.get("malloc_tuned") else "")
        + (
            f", MLX_ENABLE_TF32={env['mlx_enable_tf32']}, torch TF32 {env['torch_tf32']['matmul']}"
            if args.torch_device.startswith("cuda")
            else ""
        )
        + (f", note: {env['note']}" if env.get("note") else "")
        + ".\n\n"
        + "Median wall time per call (whole batch). `torch / best mlx` > 1 means MLX is faster. "
        "The floor is FLOPs over the measured 2048³ matmul rate "
        f"({audio_fl / 1e9:.1f} GFLOP per clip for the "
        "audio tower); `× FLOP floor` is how far the best MLX time is above it.\n\n"
        + "Matmul 2048³ GFLOP/s: "
        + ", ".join(f"{k} {v:.1f}" for k, v in rates.items())
        + "\n\n"
        + common.md_table(headers, table)
        + (
            "\n## Audio tower per stage\n\n"
            + common.md_table(["stage", "dtype", "batch", "impl", "ms", "GFLOP/s"], stage_rows)
            if stage_rows
            else ""
        )
        + ("\nSkipped: " + "; ".join(bench.skipped) + "\n" if bench.skipped else "")
    )
    name = "speed" + (f"-{args.tag}" if args.tag else "")
    jpath, mpath = common.save(name, data, md, args.out)
    print(md)
    print(f"wrote {jpath} and {mpath} in {data['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
