"""Zero-shot classification and batched text embedding through the `Embedder` of a `ClapModel`.

- `classify` ranks labels as the dot products of known audio and text embeddings say, and its
  probabilities equal transformers' `ClapModel.forward` `logits_per_audio.softmax(-1)` computed on the
  same embeddings and logit scales (HF's towers stubbed to hand back those embeddings).
- `embed_text` batches by length with per-batch padding, keeps input order, equals one-at-a-time
  embedding padded to 77, rejects non-strings, and handles 100k strings in bounded memory.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from fixtures import TINY_AUDIO, TINY_TEXT, TOKENIZER_TEXTS, assert_same_ranking, train_bpe_files
from mlx.utils import tree_flatten

from mlx_clap.config import ClapAudioConfig, ClapConfig, ClapTextConfig
from mlx_clap.models.clap import ClapModel
from mlx_clap.pipeline import Embedder
from mlx_clap.pipeline.laion import LaionFamily
from mlx_clap.preprocess.tokenizer import load_tokenizer

LABELS = ["dog", "cat meowing", "rain on a roof", "jazz", "a very long label " * 12, "siren", ""]
# Distinct scales: a swap of logit_scale_a and logit_scale_t shows up in the probabilities.
LOGIT_SCALE_A, LOGIT_SCALE_T = 2.9, 3.4


def make_model(bpe_folder, projection_dim: int = 16, **text_overrides) -> Embedder:
    """A tiny ClapModel, text side randomized, wrapped with the offline-trained tokenizer."""
    cfg = ClapConfig(
        audio_config=ClapAudioConfig.from_dict(TINY_AUDIO),
        text_config=ClapTextConfig(**{**TINY_TEXT, **text_overrides}),
        projection_dim=projection_dim,
    )
    mx.random.seed(0)
    m = ClapModel(cfg)
    # MLX's default init leaves LayerNorms at exactly 1 and 0; randomize every text-side parameter
    # (the audio tower is not run here, and random BatchNorm variances would not be valid ones).
    params = []
    for key, value in tree_flatten(m.parameters()):
        if key.startswith("audio_model."):
            continue
        if value.ndim == 1:
            noise = 0.1 * mx.random.normal(value.shape)
            params.append((key, 1.0 + noise if key.endswith("weight") else noise))
        else:
            params.append((key, mx.random.normal(value.shape) / np.sqrt(max(value.shape[-1:] or [1]))))
    m.load_weights(params, strict=False)
    m.logit_scale_a = mx.array(LOGIT_SCALE_A)
    m.logit_scale_t = mx.array(LOGIT_SCALE_T)
    m.eval()
    return Embedder(m, LaionFamily(m, tokenizer=load_tokenizer(bpe_folder, cfg.text_config)))


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bpe")
    train_bpe_files(folder, vocab_size=TINY_TEXT["vocab_size"])
    return folder


@pytest.fixture(scope="module")
def model(bpe_folder) -> Embedder:
    return make_model(bpe_folder)


def one_at_a_time(model: Embedder, texts: list[str]) -> np.ndarray:
    """Each text alone, padded to LAION's 77 columns: the layout LAION feeds the model."""
    rows = []
    for text in texts:
        ids, mask = model.tokenizer([text], padding="max_length")
        assert ids.shape == (1, 77)
        rows.append(np.array(model.get_text_features(mx.array(ids), mx.array(mask))))
    return np.concatenate(rows)


def hf_logits(audio_emb: np.ndarray, text_emb: np.ndarray, scale_a: float, scale_t: float):
    """transformers `ClapModel.forward` on given unit embeddings: towers and projections stubbed out."""
    import torch
    from reference_models import hf_clap_config
    from transformers import ClapModel
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    class Given(torch.nn.Module):
        def __init__(self, pooled: np.ndarray):
            super().__init__()
            self.pooled = torch.from_numpy(np.asarray(pooled, np.float32))

        def forward(self, *args, **kwargs):
            return BaseModelOutputWithPooling(last_hidden_state=None, pooler_output=self.pooled)

    # Only the logit code runs: towers and projections are replaced, the scales set below.
    hf = ClapModel(hf_clap_config(audio=TINY_AUDIO, text=TINY_TEXT)).eval()
    hf.audio_model, hf.text_model = Given(audio_emb), Given(text_emb)
    hf.audio_projection, hf.text_projection = torch.nn.Identity(), torch.nn.Identity()
    with torch.no_grad():
        hf.logit_scale_a.fill_(scale_a)
        hf.logit_scale_t.fill_(scale_t)
        out = hf(input_ids=torch.zeros((len(text_emb), 2), dtype=torch.long), input_features=torch.zeros(1))
    return out.logits_per_audio.numpy(), out.logits_per_text.numpy()


def test_embed_text_equals_one_at_a_time(model):
    texts = [*TOKENIZER_TEXTS, *LABELS]
    batched = model.embed_text(texts, batch_size=4)
    assert batched.shape == (len(texts), 16) and batched.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-6)
    assert np.abs(batched - one_at_a_time(model, texts)).max() <= 1e-6


def test_classify_ranks_by_dot_products(model):
    prompts = [f"This is a sound of {label}." for label in LABELS]
    text_emb = model.embed_text(prompts)
    rng = np.random.default_rng(0)
    # Known audio embeddings: each near one label's text embedding, plus one random direction.
    target = rng.permutation(len(LABELS))
    audio = text_emb[target] + 0.002 * rng.standard_normal(text_emb.shape).astype(np.float32)
    audio = np.concatenate([audio, rng.standard_normal((1, 16)).astype(np.float32)])
    audio /= np.linalg.norm(audio, axis=1, keepdims=True)
    probs = model.classify(audio, LABELS)
    assert probs.shape == (len(audio), len(LABELS))
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    dots = audio.astype(np.float64) @ text_emb.astype(np.float64).T
    for row in range(len(audio)):
        assert_same_ranking(
            np.argsort(-probs[row], kind="stable").tolist(),
            np.argsort(-dots[row], kind="stable").tolist(),
            dots[row],
        )
    # Near-duplicates of a label's own embedding: the dot products put that label first.
    own = dots[np.arange(len(target)), target]
    assert (own >= dots[: len(target)].max(axis=1)).all(), "fixture: noise too large for these labels"
    np.testing.assert_array_equal(probs[: len(target)].argmax(1), target)


def test_classify_probabilities_match_hf_logits_per_audio(model):
    text_emb = model.embed_text([f"This is a sound of {label}." for label in LABELS])
    rng = np.random.default_rng(1)
    audio = rng.standard_normal((5, 16)).astype(np.float32)
    audio /= np.linalg.norm(audio, axis=1, keepdims=True)
    ref_audio, ref_text = hf_logits(audio, text_emb, LOGIT_SCALE_A, LOGIT_SCALE_T)
    ours_audio, ours_text = (np.array(x) for x in model.logits(mx.array(audio), mx.array(text_emb)))
    np.testing.assert_allclose(ours_audio, ref_audio, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours_text, ref_text, rtol=1e-5, atol=1e-5)
    ref_probs = np.exp(ref_audio - ref_audio.max(1, keepdims=True))
    ref_probs /= ref_probs.sum(1, keepdims=True)
    probs = model.classify(audio, LABELS)
    assert np.abs(probs - ref_probs).max() <= 1e-6
    # The template is applied: raw labels give other embeddings, hence other probabilities.
    assert np.abs(model.classify(audio, LABELS, template=None) - probs).max() > 1e-4


@pytest.mark.parametrize(
    "bad, where", [(["ok", None], "item 1"), ([b"bytes"], "item 0"), (["a", "b", 3.0], "item 2")]
)
def test_embed_text_rejects_non_strings(model, bad, where):
    with pytest.raises(TypeError, match=where):
        model.embed_text(bad)


def test_embed_text_none_and_empty(model):
    with pytest.raises(TypeError, match="None"):
        model.embed_text(None)
    assert model.embed_text([]).shape == (0, 16)


def test_classify_needs_labels(model):
    with pytest.raises(ValueError, match="labels"):
        model.classify(np.eye(16, dtype=np.float32)[:1], [])


def test_embed_text_100k_strings_bounded(bpe_folder):
    """100k strings: batched, every batch padded to at most 77 columns, bounded MLX memory, input order."""
    # Narrower still than TINY_TEXT: MLX's CPU transcendentals (erf, exp) dominate at this batch count.
    model = make_model(
        bpe_folder,
        projection_dim=8,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
    )
    words = ["dog", "bark", "rain", "jazz", "siren", "cat", "🐶", "Straße"]
    texts = [f"{words[i % 8]} {i} " + "x " * (i % 7) for i in range(100_000)]
    texts[123] = " ".join(f"w{k}" for k in range(200))  # longer than 77 tokens: truncated
    shapes: list[tuple[int, int]] = []
    tok = model.family._tokenizer

    class Spy:
        def __call__(self, batch, *args, **kwargs):
            ids, mask = tok(batch, *args, **kwargs)
            shapes.append(ids.shape)
            return ids, mask

    batch_size = 2048
    model.family._tokenizer = Spy()
    try:
        mx.clear_cache()
        mx.reset_peak_memory()
        out = model.embed_text(texts, batch_size=batch_size)
        peak = mx.get_peak_memory()
    finally:
        model.family._tokenizer = tok
    assert out.shape == (100_000, 8)
    assert len(shapes) == -(-100_000 // batch_size)
    assert max(b for b, _ in shapes) <= batch_size and max(w for _, w in shapes) == 77
    assert np.median([w for _, w in shapes]) < 20  # short batches stay short
    # Working memory is a batch's, not the 100k texts': a few times the largest tensor of the widest batch
    # (its attention scores, batch x heads x 77 x 77 float32). All texts in one go would need ~50x more.
    scores_bytes = batch_size * 1 * 77 * 77 * 4
    assert peak <= 4 * scores_bytes, (
        f"peak {peak / 2**20:.1f} MiB, one batch's scores {scores_bytes / 2**20:.1f}"
    )
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    check = [0, 1, 123, 4567, 99_999]
    assert np.abs(out[check] - one_at_a_time(model, [texts[i] for i in check])).max() <= 1e-6


def test_converted_folder_carries_its_tokenizer(model, bpe_folder, tmp_path):
    """save_converted + tokenizer files -> load: same embeddings; foreign tokenizer: error."""
    import shutil

    from mlx_clap import load
    from mlx_clap.io.folder import save_converted
    from mlx_clap.preprocess.tokenizer import TokenizerError

    save_converted(model.model, tmp_path)
    assert isinstance(ClapModel.from_pretrained(tmp_path), ClapModel)  # the bare module needs no tokenizer
    with pytest.raises(RuntimeError, match="no tokenizer"):
        load(tmp_path).tokenizer  # noqa: B018
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(bpe_folder / name, tmp_path / name)
    loaded = load(tmp_path)
    assert isinstance(loaded.model, ClapModel) and loaded.source_dir == tmp_path
    texts = ["This is a sound of dog.", "", "jazz"]
    assert np.abs(loaded.embed_text(texts) - model.embed_text(texts)).max() == 0.0

    from transformers import RobertaTokenizer

    (tmp_path / "vocab.json").unlink()
    RobertaTokenizer().save_pretrained(tmp_path)  # the 5-token placeholder, as tokenizer.json
    with pytest.raises(TokenizerError, match="5 tokens"):
        load(tmp_path)
