"""HTSAT audio parity: MLX vs transformers `ClapModel` and laion_clap `CLAP` on the same mels and weights.

Full-size random-init references (every parameter and buffer randomized) for HTSAT-tiny unfused, tiny fused
and base, saved as hub folders / LAION `.pt` files and converted with our converters. Each reference is
built once per module. Tolerances (docs/numerics.md §9, float32): every Swin stage relative L2 <= 1e-4; unit
audio embeddings max |Δ| <= 1e-5 and cosine >= 0.99999; float16/bfloat16 cosine >= 0.999.

`test_golden_*` needs neither torch nor transformers: it checks a committed tiny model against reference
outputs that transformers produced (tests/golden/make_golden.py).
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_clap.models.layers import l2_normalize

GOLDEN = Path(__file__).resolve().parent / "golden" / "tiny-unfused"

STAGE_REL_TOL = 1e-4
EMBED_ABS_TOL = 1e-5
EMBED_COS_MIN = 0.99999
HALF_COS_MIN = 0.999


def log_mels(n: int, channels: int, seed: int, frames: int = 1001) -> np.ndarray:
    """Log-mel-like features (n, channels, frames, 64) in dB: around -40 with a 20 dB spread."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, channels, frames, 64)) * 20.0 - 40.0).astype(np.float32)


def rel_l2(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def assert_embeddings_close(ours: np.ndarray, ref: np.ndarray) -> None:
    max_abs = float(np.abs(ours - ref).max())
    cos = np.sum(ours * ref, axis=-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(ref, axis=-1))
    assert max_abs <= EMBED_ABS_TOL, f"unit embeddings max |Δ| {max_abs:.2e} > {EMBED_ABS_TOL}"
    assert cos.min() >= EMBED_COS_MIN, f"cosine {cos.min():.7f} < {EMBED_COS_MIN}"


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ------------------------------------------------------------------------------------ golden (no torch)
def test_golden_tiny_unfused_matches_transformers_outputs():
    from mlx_clap.loading import load as load_model

    ref = np.load(GOLDEN / "reference.npz")
    model = load_model(GOLDEN)
    feats = mx.array(ref["input_features"].astype(np.float32))
    pooled = np.array(model.audio_model(feats))
    embeds = np.array(model.get_audio_features(feats))
    assert rel_l2(pooled, ref["pooler_output"]) <= STAGE_REL_TOL
    assert_embeddings_close(embeds, ref["audio_embeds"])


# ---------------------------------------------------------------------------------- transformers (HF)
class HFCase:
    """A random full-size transformers ClapModel, its hub folder and our converted MLX model."""

    def __init__(self, tmp: Path, audio: dict, fusion: bool, seed: int):
        import torch
        from fixtures import TINY_TEXT
        from reference_models import random_hf_clap, save_hub_folder

        from mlx_clap.convert.hf import convert_hf_folder
        from mlx_clap.loading import load as load_converted

        torch.set_num_threads(1)
        # The text tower is irrelevant here; a tiny one keeps the saved folder small.
        self.ref = random_hf_clap(audio=audio, text=TINY_TEXT, fusion=fusion, seed=seed)
        self.hub = save_hub_folder(self.ref, tmp / "hub")
        self.converted = convert_hf_folder(self.hub, tmp / "converted")
        self.model = load_converted(self.converted)

    def reference(self, feats: np.ndarray, is_longer: np.ndarray | None):
        import torch

        x = torch.from_numpy(feats)
        longer = None if is_longer is None else torch.from_numpy(is_longer)
        with torch.no_grad():
            out = self.ref.audio_model(x, is_longer=longer, output_hidden_states=True)
            proj = self.ref.audio_projection(out.pooler_output)
        stages = [h.permute(0, 2, 3, 1).numpy() for h in out.hidden_states]  # (B, C, H, W) -> NHWC
        return stages, unit(proj.numpy())

    def ours(self, feats: np.ndarray, is_longer: np.ndarray | None):
        out = self.model.audio_model(mx.array(feats), is_longer, output_hidden_states=True)
        # get_audio_features composed by hand, so one forward gives both stages and embeddings.
        embeds = l2_normalize(self.model.audio_projection(out.pooler_output))
        return [np.array(h) for h in out.hidden_states], np.array(embeds)

    def check(self, feats: np.ndarray, is_longer: np.ndarray | None, ours_longer="same"):
        ref_stages, ref_emb = self.reference(feats, is_longer)
        stages, emb = self.ours(feats, is_longer if ours_longer == "same" else ours_longer)
        assert len(stages) == len(ref_stages) == 5  # patch embed + 4 stages
        for i, (a, b) in enumerate(zip(stages, ref_stages, strict=True)):
            assert a.shape == b.shape, f"stage {i}: shape {a.shape} vs {b.shape}"
            assert rel_l2(a, b) <= STAGE_REL_TOL, f"stage {i}: relative error {rel_l2(a, b):.2e}"
        assert_embeddings_close(emb, ref_emb)
        return emb


@pytest.fixture(scope="module")
def hf_small(tmp_path_factory):
    """Narrow layers with two blocks per stage (shifted windows everywhere): milliseconds per clip."""
    from fixtures import TINY_AUDIO

    return HFCase(tmp_path_factory.mktemp("hf_small"), dict(TINY_AUDIO, depths=[2, 2, 2, 2]), False, seed=10)


@pytest.mark.parametrize("frames", [965, 1001, 1024])
def test_hf_small_other_frame_counts(hf_small, frames):
    # msclap 2023 feeds 965 frames; 1024 frames skip the interpolation entirely.
    hf_small.check(log_mels(2, 1, seed=frames, frames=frames), None)


def test_hf_small_batch_equals_single_clips(hf_small):
    feats = log_mels(3, 1, seed=30)
    _, batch = hf_small.ours(feats, None)
    for i in range(3):
        _, single = hf_small.ours(feats[i : i + 1], None)
        np.testing.assert_allclose(single[0], batch[i], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    from reference_models import HTSAT_TINY

    return HFCase(tmp_path_factory.mktemp("hf_tiny"), HTSAT_TINY, fusion=False, seed=11)


@pytest.fixture(scope="module")
def hf_tiny_fused(tmp_path_factory):
    from reference_models import HTSAT_TINY

    return HFCase(tmp_path_factory.mktemp("hf_tiny_fused"), HTSAT_TINY, fusion=True, seed=12)


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    from reference_models import HTSAT_BASE

    return HFCase(tmp_path_factory.mktemp("hf_base"), HTSAT_BASE, fusion=False, seed=13)


def test_hf_tiny_unfused(hf_tiny):
    hf_tiny.check(log_mels(2, 1, seed=1), None)


def test_hf_tiny_fused_mixed_batch(hf_tiny_fused):
    # Clips 0 and 2 go through mel_conv2d + AFF, clip 1 takes the plain path, in one batch.
    hf_tiny_fused.check(log_mels(3, 4, seed=2), np.array([[True], [False], [True]]))


def test_hf_tiny_fused_no_clip_longer(hf_tiny_fused):
    # No clip flagged: plain path on channel 0 (LAION eval semantics); our is_longer=None means the same.
    hf_tiny_fused.check(log_mels(1, 4, seed=3), np.array([[False]]), ours_longer=None)
    encoder = hf_tiny_fused.model.audio_model.audio_encoder
    assert encoder._longer_mask(np.array([[False]]), 1) is None
    assert encoder._longer_mask(None, 1) is None


def test_hf_tiny_fused_all_longer(hf_tiny_fused):
    hf_tiny_fused.check(log_mels(1, 4, seed=4), np.array([[True]]))


def test_hf_base_unfused(hf_base):
    assert hf_base.model.config.audio_config.depths == (2, 2, 12, 2)
    hf_base.check(log_mels(2, 1, seed=5), None)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_cosine(hf_tiny, dtype):
    from mlx_clap.loading import load as load_converted

    feats = log_mels(1, 1, seed=6)
    _, ref_emb = hf_tiny.reference(feats, None)
    model = load_converted(hf_tiny.converted, dtype=dtype)
    assert model.audio_model.audio_encoder.layers[0].blocks[0].attention.self.query.weight.dtype == getattr(
        mx, dtype
    )
    emb = np.array(model.get_audio_features(mx.array(feats)).astype(mx.float32))
    cos = float(np.sum(unit(emb) * ref_emb))
    assert cos >= HALF_COS_MIN, f"{dtype}: cosine {cos:.5f} < {HALF_COS_MIN}"


# ---------------------------------------------------------------------------------------- laion_clap
class LaionCase:
    """A random laion_clap `CLAP`, saved as a LAION-style `.pt` and converted with our `.pt` converter."""

    def __init__(self, tmp: Path, amodel: str, fusion: bool, seed: int):
        import torch
        from reference_models import import_laion_clap, random_laion_clap, randomize_
        from transformers import RobertaConfig, RobertaModel

        from mlx_clap.convert.laion_pt import convert_laion_pt
        from mlx_clap.loading import load as load_converted

        torch.set_num_threads(1)
        model, _ = random_laion_clap(amodel, fusion=fusion, seed=seed)
        # A small RoBERTa instead of roberta-base keeps the .pt small; the audio side is full size.
        model.text_branch = RobertaModel(
            RobertaConfig(
                vocab_size=100,
                hidden_size=64,
                num_hidden_layers=1,
                num_attention_heads=1,
                intermediate_size=128,
                max_position_embeddings=80,
                type_vocab_size=1,
                layer_norm_eps=1e-5,
                pad_token_id=1,
            )
        )
        model.text_projection = torch.nn.Sequential(
            torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512)
        )
        randomize_(model, seed)
        # randomize_ also fills the float `attn_mask` buffers of shifted blocks; real checkpoints hold
        # LAION's 0/-100 masks, so rebuild them with LAION's own block code.
        htsat = import_laion_clap().htsat
        for layer in model.audio_branch.layers:
            for blk in layer.blocks:
                if blk.attn_mask is not None:
                    fresh = htsat.SwinTransformerBlock(
                        blk.dim, blk.input_resolution, blk.num_heads, blk.window_size, blk.shift_size
                    )
                    blk.attn_mask.copy_(fresh.attn_mask)
        self.ref = model.eval()
        self.fusion = fusion
        self.pt = tmp / "laion.pt"
        # Like the released files: {"state_dict": ...} saved from a DataParallel model ("module." prefix).
        state = {f"module.{k}": v for k, v in model.state_dict().items()}
        torch.save({"epoch": 1, "state_dict": state}, self.pt)
        self.converted = convert_laion_pt(self.pt, tmp / "converted")
        self.model = load_converted(self.converted)

    def reference(self, feats: np.ndarray, is_longer: np.ndarray | None):
        """LAION's own forward from bn0 on, with stage outputs taken by forward hooks."""
        import torch

        branch = self.ref.audio_branch
        captured = {}

        def hook(name):
            def fn(_mod, _inp, out):
                captured[name] = (out[0] if isinstance(out, tuple) else out).detach().numpy()

            return fn

        handles = [branch.patch_embed.register_forward_hook(hook(0))]
        handles += [layer.register_forward_hook(hook(i + 1)) for i, layer in enumerate(branch.layers)]
        x = torch.from_numpy(feats)
        try:
            with torch.no_grad():
                if self.fusion:
                    inputs = {"mel_fusion": x, "longer": torch.from_numpy(is_longer.reshape(-1))}
                    emb = branch(inputs, device="cpu")["embedding"]
                else:
                    # Unfused LAION takes a waveform; identity extractors feed our mels to bn0 unchanged.
                    spec, logmel = branch.spectrogram_extractor, branch.logmel_extractor
                    branch.spectrogram_extractor = branch.logmel_extractor = torch.nn.Identity()
                    try:
                        emb = branch({"waveform": x}, device="cpu")["embedding"]
                    finally:
                        branch.spectrogram_extractor, branch.logmel_extractor = spec, logmel
                proj = torch.nn.functional.normalize(self.ref.audio_projection(emb), dim=-1)
        finally:
            for h in handles:
                h.remove()
        return [captured[i] for i in range(5)], proj.numpy()

    def check(self, feats: np.ndarray, is_longer: np.ndarray | None) -> None:
        ref_stages, ref_emb = self.reference(feats, is_longer)
        out = self.model.audio_model(mx.array(feats), is_longer, output_hidden_states=True)
        for i, (h, b) in enumerate(zip(out.hidden_states, ref_stages, strict=True)):
            a = np.array(h).reshape(b.shape)  # LAION keeps (B, H·W, C) tokens, row-major like ours
            assert rel_l2(a, b) <= STAGE_REL_TOL, f"stage {i}: relative error {rel_l2(a, b):.2e}"
        assert_embeddings_close(
            np.array(l2_normalize(self.model.audio_projection(out.pooler_output))), ref_emb
        )


@pytest.fixture(scope="module")
def laion_tiny(tmp_path_factory):
    return LaionCase(tmp_path_factory.mktemp("laion_tiny"), "HTSAT-tiny", fusion=False, seed=21)


@pytest.fixture(scope="module")
def laion_tiny_fused(tmp_path_factory):
    return LaionCase(tmp_path_factory.mktemp("laion_tiny_fused"), "HTSAT-tiny", fusion=True, seed=22)


def test_laion_pt_tiny_unfused(laion_tiny):
    cfg = laion_tiny.model.config
    assert cfg.audio_config.patch_embeds_hidden_size == 96 and not cfg.audio_config.enable_fusion
    laion_tiny.check(log_mels(2, 1, seed=7), None)


def test_laion_pt_tiny_fused_mixed_batch(laion_tiny_fused):
    cfg = laion_tiny_fused.model.config
    assert cfg.audio_config.enable_fusion and cfg.feature_config.truncation == "fusion"
    laion_tiny_fused.check(log_mels(2, 4, seed=8), np.array([[True], [False]]))


def test_laion_pt_tiny_fused_no_clip_longer(laion_tiny_fused):
    laion_tiny_fused.check(log_mels(1, 4, seed=9), np.array([[False]]))


def test_load_model_converts_laion_pt_into_cache_once(laion_tiny, tmp_path, monkeypatch, request):
    import json

    from mlx.utils import tree_flatten

    from mlx_clap import settings
    from mlx_clap.loading import load as load_model

    monkeypatch.setenv("MLX_CLAP_CACHE", str(tmp_path))
    settings.reset()  # settings are parsed once: read $MLX_CLAP_CACHE anew (and again after this test)
    request.addfinalizer(settings.reset)
    model = load_model(laion_tiny.pt)
    assert model.source_dir.parent == tmp_path and model.source_dir.name.startswith("laion-")
    manifest = json.loads((model.source_dir / "manifest.json").read_text())
    assert manifest["source_format"] == "laion-pt" and manifest["tokenizer_files"] == []
    assert any("no tokenizer" in note for note in manifest["notes"])
    ours, ref = dict(tree_flatten(model.parameters())), dict(tree_flatten(laion_tiny.model.parameters()))
    assert ours.keys() == ref.keys()
    for key, value in ref.items():
        np.testing.assert_array_equal(np.array(ours[key]), np.array(value), err_msg=key)
    stamp = (model.source_dir / "model.safetensors").stat().st_mtime_ns
    again = load_model(laion_tiny.pt)
    assert again.source_dir == model.source_dir
    assert (again.source_dir / "model.safetensors").stat().st_mtime_ns == stamp  # not converted again
    assert list(tmp_path.iterdir()) == [model.source_dir]
