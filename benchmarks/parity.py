"""Stage-by-stage numerical parity: random-init full-size transformers CLAP vs the converted MLX model.

For each family (HTSAT-tiny unfused, HTSAT-tiny fused, HTSAT-base; the RoBERTa text tower) both models
get identical inputs: the mel stage compares the two feature extractors on the same waveforms; every
model stage is fed the *reference* mel, so frontend error and model error stay apart (docs/numerics.md §9);
a last row runs waveform -> unit embedding end to end on each side. The reference runs in float32 on
the CPU (or `--torch-device`); MLX runs on its default device in float32 and in half precision.

    python benchmarks/parity.py --quick          # ~1-2 min: batch 1, float32 + float16
    python benchmarks/parity.py                  # batch 2, float32 + float16 + bfloat16
    python benchmarks/parity.py --families htsat-tiny text --dtypes float32

Writes benchmarks/results/parity[-<tag>].json and .md. Columns: max |Δ|, relative L2 ‖Δ‖/‖ref‖, the
smallest per-item cosine, and the spec limit from docs/numerics.md §9 with ok/OVER (float32 only; half
precision is checked on the unit embedding's cosine).
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

# (metric, limit) per stage in float32, from docs/numerics.md §9.
FP32_LIMITS: dict[str, tuple[str, float]] = {
    "mel (frontend)": ("max_abs", 1e-3),
    # §9 says 1e-5 abs for real bn0 statistics (outputs of order 1); the random running stats here give
    # outputs near 100, where one float32 ulp is 8e-6, so these two are checked relative.
    "bn0": ("rel_l2", 1e-6),
    "bn0+bicubic+fold": ("rel_l2", 1e-6),
    "patch embed": ("rel_l2", 1e-5),
    "pooled": ("max_abs", 1e-4),
    "projected": ("rel_l2", 1e-5),
    "unit": ("max_abs", 1e-5),
    "end to end unit": ("max_abs", 5e-4),
    "text pooler": ("max_abs", 1e-5),
    "text unit": ("max_abs", 1e-5),
}
STAGE_PREFIX_LIMITS = {
    "swin stage": ("rel_l2", 1e-4),
    "text embeddings": ("rel_l2", 1e-5),
    "text layer": ("rel_l2", 1e-5),
}
COSINE_LIMITS = {"unit": 0.99999, "end to end unit": 0.9999, "text unit": 0.999999}
HALF_COSINE = {"unit": 0.999, "end to end unit": 0.999, "text unit": 0.9995}


def limit_for(stage: str, dtype: str) -> tuple[str, float] | None:
    if dtype != "float32":
        return ("cosine_min", HALF_COSINE[stage]) if stage in HALF_COSINE else None
    if stage in FP32_LIMITS:
        return FP32_LIMITS[stage]
    for prefix, lim in STAGE_PREFIX_LIMITS.items():
        if stage.startswith(prefix):
            return lim
    return None


def verdict(stage: str, dtype: str, m: dict[str, float]) -> str:
    lim = limit_for(stage, dtype)
    checks = []
    if lim is not None:
        metric, bound = lim
        checks.append(m[metric] >= bound if metric == "cosine_min" else m[metric] <= bound)
    if dtype == "float32" and stage in COSINE_LIMITS:
        checks.append(m["cosine_min"] >= COSINE_LIMITS[stage])
    if not checks:
        return ""
    return "ok" if all(checks) else "OVER"


def np32(x: Any) -> np.ndarray:
    if isinstance(x, mx.array):
        return np.array(x.astype(mx.float32))
    return x.detach().float().cpu().numpy()


# -------------------------------------------------------------------------------------------- audio
def audio_inputs(fusion: bool, batch: int) -> list[np.ndarray]:
    """10-s clips; for fused models every other clip is 25 s (fusion branch with 4 distinct channels)."""
    waves = common.waveforms(
        batch, seed=1, samples=common.CLIP_SAMPLES * 5 // 2 if fusion else common.CLIP_SAMPLES
    )
    if not fusion:
        return list(waves)
    return [w if i % 2 == 0 else w[: common.CLIP_SAMPLES] for i, w in enumerate(waves)]


def reference_audio(ref, feats, is_longer, device: str) -> dict[str, np.ndarray]:
    """Per-stage reference tensors in the MLX layout conventions of `mlx_audio`."""
    import torch

    enc = ref.audio_model.audio_encoder
    got: dict[str, np.ndarray] = {}
    hooks = [
        enc.batch_norm.register_forward_hook(lambda m, i, o: got.__setitem__("bn0", np32(o.transpose(1, 3)))),
        enc.patch_embed.register_forward_pre_hook(lambda m, a: got.__setitem__("image", np32(a[0]))),
    ]
    try:
        with torch.inference_mode():
            x = torch.from_numpy(feats).to(device)
            longer = torch.from_numpy(is_longer).to(device) if is_longer is not None else None
            out = ref.audio_model(input_features=x, is_longer=longer, output_hidden_states=True)
            projected = ref.audio_projection(out.pooler_output)
            unit = torch.nn.functional.normalize(projected, dim=-1)
    finally:
        for h in hooks:
            h.remove()
    got["hidden"] = [np32(h) for h in out.hidden_states]  # (B, C, H, W)
    got["pooled"], got["projected"], got["unit"] = np32(out.pooler_output), np32(projected), np32(unit)
    return got


def mlx_audio(model, feats, is_longer) -> dict[str, np.ndarray]:
    from mlx_clap.models.htsat import _batch_norm
    from mlx_clap.models.layers import l2_normalize

    enc = model.audio_model.audio_encoder
    x = mx.array(feats)
    longer = mx.array(is_longer) if is_longer is not None else None
    out = model.audio_model(x, longer, output_hidden_states=True)
    projected = model.audio_projection(out.pooler_output)
    res = {
        "bn0": _batch_norm(enc.batch_norm, x),
        "image": enc.mel_to_image(x).transpose(0, 3, 1, 2),
        "hidden": [h.transpose(0, 3, 1, 2) for h in out.hidden_states],
        "pooled": out.pooler_output,
        "projected": projected,
        "unit": l2_normalize(projected),
    }
    mx.eval(res)
    return {k: [np32(h) for h in v] if isinstance(v, list) else np32(v) for k, v in res.items()}


def audio_family(name: str, dtypes: list[str], batch: int, torch_device: str) -> list[dict[str, Any]]:
    import torch

    from mlx_clap.preprocess.features import ClapFeatureExtractor

    fam = common._families()[name]
    ref, mlx_dir = common.model_pair(name, torch_device=torch_device)
    waves = audio_inputs(fam.fusion, batch)
    hf_fe = common.hf_feature_extractor(fam.fusion)
    np.random.seed(0)
    hf_in = hf_fe(waves, sampling_rate=common.SAMPLE_RATE, return_tensors="np")
    feats = hf_in["input_features"].astype(np.float32)
    is_longer = hf_in["is_longer"].astype(bool) if fam.fusion else None
    ref_stages = reference_audio(ref, feats, is_longer, torch_device)
    # The reference end to end: its own extractor (same draws) and model.
    with torch.inference_mode():
        hf_unit = ref.get_audio_features(
            input_features=torch.from_numpy(feats).to(torch_device),
            is_longer=torch.from_numpy(hf_in["is_longer"]).to(torch_device) if fam.fusion else None,
        ).pooler_output
    hf_unit = np32(hf_unit)

    rows = []
    for dtype in dtypes:
        t0 = time.perf_counter()
        model = common.load_mlx(mlx_dir, dtype)
        ours_fe = ClapFeatureExtractor(model.config.feature_config)
        mel, longer = ours_fe(
            waves, sampling_rate=common.SAMPLE_RATE, rng=np.random.RandomState(0), fused_short="hf"
        )
        stages = mlx_audio(model, feats, is_longer)
        # The embedding path (`embed_audio_inputs`: blocks of clips on CPU worker threads), as in `embed`.
        e2e = np32(model.embed_audio_inputs(mel, longer if fam.fusion else None))
        pairs = [("mel (frontend)", feats, np32(mel)), ("bn0", ref_stages["bn0"], stages["bn0"])]
        pairs.append(("bn0+bicubic+fold", ref_stages["image"], stages["image"]))
        for i, (r, g) in enumerate(zip(ref_stages["hidden"], stages["hidden"], strict=True)):
            pairs.append(("patch embed" if i == 0 else f"swin stage {i}", r, g))
        pairs += [(k, ref_stages[k], stages[k]) for k in ("pooled", "projected", "unit")]
        pairs.append(("end to end unit", hf_unit, e2e))
        for stage, r, g in pairs:
            m = common.compare(r, g)
            rows.append(
                {"family": name, "dtype": dtype, "stage": stage, **m, "check": verdict(stage, dtype, m)}
            )
        print(f"  {name} {dtype}: {time.perf_counter() - t0:.1f} s", flush=True)
    return rows


# --------------------------------------------------------------------------------------------- text
def text_family(dtypes: list[str], batch: int, length: int, torch_device: str) -> list[dict[str, Any]]:
    import torch

    from mlx_clap.models.layers import l2_normalize

    ref, mlx_dir = common.model_pair("htsat-tiny", torch_device=torch_device)
    ids, mask = common.token_batch(batch, length, seed=2)
    with torch.inference_mode():
        out = ref.text_model(
            input_ids=torch.from_numpy(ids).to(torch_device),
            attention_mask=torch.from_numpy(mask).to(torch_device),
            output_hidden_states=True,
        )
        projected = ref.text_projection(out.pooler_output)
        unit = torch.nn.functional.normalize(projected, dim=-1)
    ref_hidden = [np32(h) for h in out.hidden_states]
    ref_pool, ref_unit = np32(out.pooler_output), np32(unit)
    rows = []
    for dtype in dtypes:
        t0 = time.perf_counter()
        model = common.load_mlx(mlx_dir, dtype)
        res = model.text_model.forward(mx.array(ids), mx.array(mask), output_hidden_states=True)
        unit_mx = l2_normalize(model.text_projection(res.pooler_output))
        mx.eval(res.hidden_states, res.pooler_output, unit_mx)
        pairs = []
        for i, (r, g) in enumerate(zip(ref_hidden, res.hidden_states, strict=True)):
            pairs.append(("text embeddings" if i == 0 else f"text layer {i}", r, np32(g)))
        pairs += [("text pooler", ref_pool, np32(res.pooler_output)), ("text unit", ref_unit, np32(unit_mx))]
        for stage, r, g in pairs:
            m = common.compare(r, g)
            rows.append(
                {"family": "text", "dtype": dtype, "stage": stage, **m, "check": verdict(stage, dtype, m)}
            )
        print(f"  text {dtype}: {time.perf_counter() - t0:.1f} s", flush=True)
    return rows


# --------------------------------------------------------------------------------------------- main
SUMMARY_HEADERS = [
    "family",
    "dtype",
    "worst stage rel L2 (stage)",
    "unit max abs",
    "unit 1 − cos",
    "end-to-end max abs",
    "end-to-end 1 − cos",
    "checks",
]


def summary(rows: list[dict]) -> list[list[str]]:
    """One line per (family, dtype): the worst model stage, the unit and end-to-end errors, checks passed."""
    keys = list(dict.fromkeys((r["family"], r["dtype"]) for r in rows))
    out = []
    for fam, dtype in keys:
        rs = [r for r in rows if (r["family"], r["dtype"]) == (fam, dtype)]
        stages = [r for r in rs if r["stage"] not in ("mel (frontend)", "end to end unit")]
        worst = max(stages, key=lambda r: r["rel_l2"])
        unit = next(r for r in rs if r["stage"] in ("unit", "text unit"))
        e2e = next((r for r in rs if r["stage"] == "end to end unit"), None)
        checks = [r for r in rs if r.get("check")]
        passed = sum(r["check"] == "ok" for r in checks)
        out.append(
            [
                fam,
                dtype,
                f"{worst['rel_l2']:.1e} ({worst['stage']})",
                f"{unit['max_abs']:.1e}",
                f"{1 - unit['cosine_min']:.1e}",
                f"{e2e['max_abs']:.1e}" if e2e else "—",
                f"{1 - e2e['cosine_min']:.1e}" if e2e else "—",
                f"{passed}/{len(checks)} ok",
            ]
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="batch 1, float32 + float16")
    p.add_argument("--families", nargs="+", default=[*common.FAMILY_NAMES, "text"])
    p.add_argument("--dtypes", nargs="+", default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--text-length", type=int, default=40)
    p.add_argument("--torch-device", default="cpu", help="where the float32 reference runs (cpu is exact)")
    p.add_argument("--mlx-device", choices=["default", "cpu", "gpu"], default="default")
    p.add_argument("--tag", default="", help="results file suffix, e.g. cuda-tf32")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    if args.mlx_device != "default":
        mx.set_default_device(getattr(mx, args.mlx_device))
    if args.torch_device.startswith("cuda"):
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False  # the reference stays true float32
        torch.backends.cudnn.allow_tf32 = False
    dtypes = args.dtypes or (["float32", "float16"] if args.quick else ["float32", "float16", "bfloat16"])
    batch = args.batch or (1 if args.quick else 2)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    common.stop_on_sigterm()
    try:
        for fam in args.families:
            print(f"{fam} ...", flush=True)
            if fam == "text":
                rows += text_family(dtypes, max(batch, 2), args.text_length, args.torch_device)
            else:
                rows += audio_family(fam, dtypes, batch, args.torch_device)
    except KeyboardInterrupt:  # a timeout or Ctrl-C: keep the families done
        print("interrupted: writing the families done so far", flush=True)
    env = common.environment(args.torch_device)
    env["mlx_device"] = str(mx.default_device())
    data = {
        "benchmark": "parity",
        "args": vars(args) | {"out": str(args.out) if args.out else None},
        "environment": env,
        "rows": rows,
        "wall_s": time.perf_counter() - t0,
    }
    headers = ["family", "dtype", "stage", "max |Δ|", "rel L2", "1 − min cosine", "limit", "check"]
    table = []
    for r in rows:
        lim = limit_for(r["stage"], r["dtype"])
        lim_s = f"{lim[0]} {'≥' if lim[0] == 'cosine_min' else '≤'} {lim[1]:g}" if lim else ""
        table.append(
            [
                r["family"],
                r["dtype"],
                r["stage"],
                r["max_abs"],
                r["rel_l2"],
                1.0 - r["cosine_min"],
                lim_s,
                r["check"],
            ]
        )
    over = [r for r in rows if r["check"] == "OVER"]
    cmd = " ".join(argv if argv is not None else sys.argv[1:])
    md = (
        f"# Parity: random-init transformers CLAP (float32, torch {env['torch_device']}) vs mlx-clap "
        f"({env['mlx_device']})\n\n"
        f"`python benchmarks/parity.py {cmd}` — {env['date_utc']}, "
        f"mlx {env['mlx']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"BLAS: {env['mlx_clap_blas'].get('config') or env['mlx_clap_blas'].get('status')}, "
        f"MLX_CLAP_CPU_OPTIMIZATIONS {'on' if env['mlx_clap_cpu_optimizations'] else 'off'}, "
        f"MLX_CLAP_CPU_KERNELS {'on' if env['mlx_clap_cpu_kernels'] else 'off'}, "
        f"MLX_ENABLE_TF32={env['mlx_enable_tf32']}.\n\n"
        "Model stages get the reference mel; `mel (frontend)` and `end to end unit` compare the "
        "extractors (ours through `embed_audio_inputs`, the embedding path).\n\n## Summary\n\n"
        + common.md_table(SUMMARY_HEADERS, summary(rows))
        + "\n## Every stage\n\n"
        + common.md_table(headers, table)
        + f"\n{len(over)} row(s) over their limit.\n"
    )
    name = "parity" + (f"-{args.tag}" if args.tag else "")
    jpath, mpath = common.save(name, data, md, args.out)
    print(md)
    print(f"wrote {jpath} and {mpath} in {data['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
