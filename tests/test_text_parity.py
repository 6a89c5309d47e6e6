"""Text tower parity: our MLX `ClapTextModel` + `text_projection` against transformers' `ClapModel`.

The reference is a random-init full-size model (RoBERTa-base, every weight randomized, hub-like
layer_norm_eps) built once per module; its `text_model.*` / `text_projection.*` weights load into ours by
name (identity mapping, minus the position_ids/token_type_ids buffers). Inputs are random ids of varied
lengths with padding. Tolerances from docs/numerics.md §9 item 8.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[test]')")
pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[test]')")
import torch  # noqa: E402
import transformers  # noqa: E402,F401
from fixtures import TINY_AUDIO, TINY_TEXT
from mlx.utils import tree_flatten

from mlx_clap.config import ClapTextConfig
from mlx_clap.models.clap import ClapProjectionLayer
from mlx_clap.models.layers import l2_normalize
from mlx_clap.models.roberta import ClapTextModel, roberta_position_ids

# Dropped on load: HF buffers that we recompute (docs/numerics.md §6.2).
HF_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


def rel_err(ref: np.ndarray, got: np.ndarray) -> float:
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def config_from_hf(hf_text_config) -> ClapTextConfig:
    """Our config from the reference's, field by field (same names; max_length is ours, not HF's)."""
    names = [k for k in ClapTextConfig.__dataclass_fields__ if k != "max_length"]
    return ClapTextConfig(**{k: getattr(hf_text_config, k) for k in names if hasattr(hf_text_config, k)})


def load_text_weights(hf_model, text_model: ClapTextModel, projection: ClapProjectionLayer) -> None:
    """HF `text_model.*` / `text_projection.*` -> ours, by identical names, strictly."""
    sd = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    for prefix, module in (("text_model.", text_model), ("text_projection.", projection)):
        weights = {
            k[len(prefix) :]: v
            for k, v in sd.items()
            if k.startswith(prefix) and not k[len(prefix) :].endswith(HF_BUFFERS)
        }
        ours = dict(tree_flatten(module.parameters()))
        assert set(weights) == set(ours), sorted(set(weights) ^ set(ours))
        module.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    text_model.eval()
    projection.eval()


def random_batch(vocab: int, lengths: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """<s> random ids </s> then <pad>, for each length (length counts <s> and </s>)."""
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = np.full((len(lengths), width), 1, dtype=np.int32)
    mask = np.zeros((len(lengths), width), dtype=np.int32)
    for row, n in enumerate(lengths):
        ids[row, 0], ids[row, n - 1] = 0, 2
        ids[row, 1 : n - 1] = rng.integers(3, vocab, n - 2)
        mask[row, :n] = 1
    return ids, mask


def run_reference(hf, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    import torch.nn.functional as F

    with torch.no_grad():
        t_ids, t_mask = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))
        out = hf.text_model(input_ids=t_ids, attention_mask=t_mask, output_hidden_states=True)
        projected = hf.text_projection(out.pooler_output)
        unit = F.normalize(projected, dim=-1)
    return {
        "hidden_states": [h.numpy() for h in out.hidden_states],
        "pooler": out.pooler_output.numpy(),
        "projected": projected.numpy(),
        "unit": unit.numpy(),
    }


def run_ours(text_model, projection, ids, mask) -> dict[str, np.ndarray]:
    out = text_model.forward(mx.array(ids), mx.array(mask), output_hidden_states=True)
    projected = projection(out.pooler_output)
    unit = l2_normalize(projected)
    # The model's call, which runs its last layer for position 0 only (the pooler's input).
    pooled_call = text_model(mx.array(ids), mx.array(mask))
    mx.eval(out.hidden_states, out.pooler_output, projected, unit, pooled_call)

    def f32(x: mx.array) -> np.ndarray:
        return np.array(x.astype(mx.float32))

    return {
        "hidden_states": [f32(h) for h in out.hidden_states],
        "pooler": f32(out.pooler_output),
        "pooled_call": f32(pooled_call),
        "projected": f32(projected),
        "unit": f32(unit),
    }


# --------------------------------------------------------------------------------- full-size RoBERTa
@pytest.fixture(scope="module")
def full_size():
    from reference_models import random_hf_clap

    torch.set_num_threads(1)
    hf = random_hf_clap(seed=0)
    cfg = config_from_hf(hf.config.text_config)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (768, 12, 50265)
    text_model = ClapTextModel(cfg)
    projection = ClapProjectionLayer(cfg.hidden_size, hf.config.projection_dim)
    load_text_weights(hf, text_model, projection)
    # Varied lengths: full row, mid, the empty string (<s></s>), and a one-word text.
    ids, mask = random_batch(cfg.vocab_size, [21, 9, 2, 3], seed=1)
    return run_reference(hf, ids, mask), run_ours(text_model, projection, ids, mask), mask


def test_full_size_every_hidden_state(full_size):
    ref, ours, mask = full_size
    assert len(ours["hidden_states"]) == len(ref["hidden_states"]) == 13  # embeddings + 12 layers
    valid = mask.astype(bool)
    for i, (r, o) in enumerate(zip(ref["hidden_states"], ours["hidden_states"], strict=True)):
        assert r.shape == o.shape
        # Real tokens are what the pooler and any user read; padded rows are checked as well.
        assert rel_err(r[valid], o[valid]) <= 1e-5, f"hidden state {i} (real tokens)"
        assert rel_err(r, o) <= 1e-5, f"hidden state {i} (all positions)"


def test_full_size_pooler_and_unit_embedding(full_size):
    ref, ours, _ = full_size
    assert rel_err(ref["pooler"], ours["pooler"]) <= 1e-5
    assert rel_err(ref["pooler"], ours["pooled_call"]) <= 1e-5
    assert rel_err(ref["projected"], ours["projected"]) <= 1e-5
    assert np.abs(ref["unit"] - ours["unit"]).max() <= 1e-5
    assert cosine(ref["unit"], ours["unit"]).min() >= 0.999999


# ------------------------------------------------------------------------------------- tiny config
@pytest.fixture(scope="module")
def tiny():
    from reference_models import random_hf_clap
    from transformers import ClapTextConfig as HFTextConfig

    torch.set_num_threads(1)
    hf = random_hf_clap(audio=TINY_AUDIO, text=TINY_TEXT, seed=3)
    assert isinstance(hf.config.text_config, HFTextConfig)
    cfg = config_from_hf(hf.config.text_config)
    text_model = ClapTextModel(cfg)
    projection = ClapProjectionLayer(cfg.hidden_size, hf.config.projection_dim)
    load_text_weights(hf, text_model, projection)
    return hf, cfg, text_model, projection


def test_position_ids_roberta():
    ids = mx.array([[0, 57, 99, 2, 1, 1], [0, 2, 1, 1, 1, 1]])
    expected = [[2, 3, 4, 5, 1, 1], [2, 3, 1, 1, 1, 1]]
    assert roberta_position_ids(ids, pad_token_id=1).tolist() == expected


def test_tiny_parity_and_long_sequences(tiny):
    hf, cfg, text_model, projection = tiny
    # Up to the model's 512 positions (HF policy length), with padding.
    ids, mask = random_batch(cfg.vocab_size, [512, 100, 2], seed=5)
    ref, ours = run_reference(hf, ids, mask), run_ours(text_model, projection, ids, mask)
    for i, (r, o) in enumerate(zip(ref["hidden_states"], ours["hidden_states"], strict=True)):
        assert rel_err(r, o) <= 1e-5, f"hidden state {i}"
    assert rel_err(ref["pooler"], ours["pooled_call"]) <= 1e-5
    assert np.abs(ref["unit"] - ours["unit"]).max() <= 1e-5


def test_padding_width_does_not_change_embeddings(tiny):
    """Per-batch padding (to the longest) and LAION's padding to 77 give the same embeddings."""
    _, cfg, text_model, projection = tiny
    ids, mask = random_batch(cfg.vocab_size, [12, 5, 2], seed=7)
    wide_ids = np.full((3, 77), cfg.pad_token_id, np.int32)
    wide_mask = np.zeros((3, 77), np.int32)
    wide_ids[:, :12], wide_mask[:, :12] = ids, mask
    narrow = run_ours(text_model, projection, ids, mask)["unit"]
    wide = run_ours(text_model, projection, wide_ids, wide_mask)["unit"]
    assert np.abs(narrow - wide).max() <= 1e-6


def test_mask_none_means_all_ones(tiny):
    _, cfg, text_model, _ = tiny
    ids, mask = random_batch(cfg.vocab_size, [9, 9], seed=11)
    a = text_model(mx.array(ids))
    b = text_model(mx.array(ids), mx.array(mask))
    assert np.abs(np.array(a) - np.array(b)).max() == 0.0


def test_bad_shapes_are_errors(tiny):
    _, cfg, text_model, _ = tiny
    with pytest.raises(ValueError, match="positions"):
        text_model(mx.zeros((1, 513), dtype=mx.int32))
    with pytest.raises(ValueError, match="batch, length"):
        text_model(mx.zeros((5,), dtype=mx.int32))
    with pytest.raises(ValueError, match="attention_mask"):
        text_model(mx.zeros((2, 5), dtype=mx.int32), mx.ones((2, 4), dtype=mx.int32))
    with pytest.raises(ValueError, match="vocabulary"):
        text_model(mx.array([[0, cfg.vocab_size, 2]]))
    with pytest.raises(ValueError, match="vocabulary"):
        text_model(mx.array([[0, -1, 2]]))
    with pytest.raises(TypeError, match="integers"):
        text_model(mx.zeros((2, 5), dtype=mx.float32))


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_precision_close_to_fp32_reference(tiny, dtype):
    """docs/numerics.md §9 item 10: text cosine >= 0.9995 in half precision (LayerNorm/softmax stay fp32)."""
    hf, cfg, text_model, projection = tiny
    ids, mask = random_batch(cfg.vocab_size, [30, 12, 2], seed=13)
    ref = run_reference(hf, ids, mask)
    half_text = ClapTextModel(cfg)
    half_proj = ClapProjectionLayer(cfg.hidden_size, hf.config.projection_dim)
    load_text_weights(hf, half_text, half_proj)
    half_text.set_dtype(dtype)
    half_proj.set_dtype(dtype)
    ours = run_ours(half_text, half_proj, ids, mask)
    assert cosine(ref["unit"], ours["unit"]).min() >= 0.9995


def test_hub_folder_through_converter_end_to_end(tiny, tmp_path):
    """HF hub folder (weights + tokenizer) -> convert/hf.py -> mlx_clap.load -> embed_text equals HF's
    tokenizer + `ClapModel.get_text_features` (unit vectors), LAION policy (77); the hub folder loaded in
    place gives the same vectors."""
    from fixtures import TOKENIZER_TEXTS, train_bpe_files
    from reference_models import save_hub_folder
    from transformers import RobertaTokenizer

    from mlx_clap import load
    from mlx_clap.convert.hf import convert_hf_folder
    from mlx_clap.models.clap import ClapModel

    hf, cfg, _, _ = tiny
    hub = save_hub_folder(hf, tmp_path / "hub")
    train_bpe_files(tmp_path / "bpe", vocab_size=cfg.vocab_size)
    hf_tok = RobertaTokenizer.from_pretrained(str(tmp_path / "bpe"))
    assert len(hf_tok) == cfg.vocab_size, "reference tokenizer did not load the files"
    hf_tok.save_pretrained(hub)  # tokenizer.json, as on the hub
    model = load(convert_hf_folder(hub, tmp_path / "converted"))
    assert isinstance(model.model, ClapModel)
    assert model.config.text_config.layer_norm_eps == cfg.layer_norm_eps

    batch = hf_tok(TOKENIZER_TEXTS, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        ref = hf.get_text_features(**batch).pooler_output.numpy()
    ours = model.embed_text(TOKENIZER_TEXTS, batch_size=4)
    assert np.abs(ours - ref).max() <= 1e-5
    assert cosine(ours, ref).min() >= 0.999999

    # HF policy: no truncation at 77 (the long fixture text keeps all its tokens), pad to the longest.
    batch = hf_tok(TOKENIZER_TEXTS, padding=True, return_tensors="pt")
    assert batch["input_ids"].shape[1] > 77
    with torch.no_grad():
        ref_hf = hf.get_text_features(**batch).pooler_output.numpy()
    ours_hf = model.embed_text(TOKENIZER_TEXTS, batch_size=4, policy="hf")
    assert np.abs(ours_hf - ref_hf).max() <= 1e-5
    assert np.abs(ours_hf[-1] - ours[-1]).max() > 1e-3  # truncation changed the long text's vector

    in_place = load(hub)  # safetensors + tokenizer.json read where they are
    assert in_place.source_dir == hub
    assert np.abs(in_place.embed_text(TOKENIZER_TEXTS, batch_size=4) - ours).max() == 0.0
    assert np.abs(in_place.embed_text(TOKENIZER_TEXTS, batch_size=4, policy="hf") - ours_hf).max() == 0.0
