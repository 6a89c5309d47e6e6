"""PE-Audio parity at full size: our MLX model against transformers 5.25's `PeAudioModel` and
`PeAudioFrameLevelModel`, every parameter randomized (tests/pe_audio_reference.py).

Each reference is the released architecture (606 M parameters: codec, 6 x 1792 audio transformer,
ModernBERT-large), saved as a hub folder with a 50368-entry tokenizer.json, converted by
`convert/pe_audio.py` and loaded with `mlx_clap.load`; one module-scoped build per kind (about 30 s and
5 GB each, freed before the next). Inputs: a 1.2-s and a 0.84-s clip (the second not whole frames: the
feature extractor's reflect padding), run by us as one padded batch and by transformers one clip at a
time (its padded batches leak the padding into the shorter clip's codec frames); three texts, one past
the 64-token sliding window. Tolerances, float32: each audio stage relative L2 <= 1e-5; unit vectors
(pooled, frames, text) max |Δ| <= 1e-5 and cosine >= 0.99999; logits on unit vectors |Δ| <= 1e-5 x scale,
raw logits (transformers' formula) |Δ| <= 1e-5 x scale x |a| x |t|; float16/bfloat16 cosine >= 0.999.

Marked slow: about 2-3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import gc
import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[test]')")
pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[test]')")
import torch  # noqa: E402
from pe_audio_reference import (  # noqa: E402
    feature_batch,
    hf_tokens,
    make_signal,
    modernbert_tokenizer,
    random_pe_audio,
    save_pe_folder,
    torch_stages,
    torch_text,
    unit,
)

import mlx_clap  # noqa: E402
from mlx_clap.preprocess.pe_audio_features import batch_waveforms, prepare_waveform  # noqa: E402

pytestmark = pytest.mark.slow

SR = 48000
TEXTS = [
    "glass breaking",
    "somebody speaking quietly, then a door creaks open and footsteps cross a wooden floor while "
    "thunder rolls over the hills and rain falls on a tin roof; a dog barks twice, a car engine starts "
    "and drives away on gravel, birds sing near a small river at dawn",
    "an orchestra tunes up",
]
AUDIO_STAGES = (
    ["dac.conv1"] + [f"dac.block.{i}" for i in range(4)] + ["dac.conv2", "codec_features", "embedder"]
    + ["patch_embedder"] + [f"layers.{i}" for i in range(6)] + ["output"]
)  # fmt: skip
# Max |Δ| per stage (and half-precision cosines), filled as the tests run, printed at teardown (-s).
FIGURES: dict[str, dict[str, float]] = {}


def rel_l2(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(unit(a) * unit(b), axis=-1)


def record(kind: str, name: str, ours: np.ndarray, ref: np.ndarray) -> None:
    FIGURES.setdefault(kind, {})[name] = max(
        FIGURES.get(kind, {}).get(name, 0.0), float(np.abs(ours - ref).max())
    )


@pytest.fixture(scope="module", params=["pooled", "frame"])
def case(request, tmp_path_factory):
    kind = request.param
    torch.set_num_threads(2)
    tmp = tmp_path_factory.mktemp(f"pe_{kind}")
    ref = random_pe_audio(frame_level=kind == "frame", seed=11 if kind == "frame" else 5)
    hub = save_pe_folder(ref, tmp / "hub", modernbert_tokenizer())
    from mlx_clap.convert.pe_audio import convert_pe_audio_folder

    converted = convert_pe_audio_folder(hub, tmp / "converted", source_name=f"random {kind}")
    gc.collect()  # the converter's arrays, before a third copy of the weights is loaded
    model = mlx_clap.load(converted)
    hop = model.config.hop_length
    waves = [make_signal(57600, 1), make_signal(40000, 2)]
    # transformers, one clip at a time (the reference a clip's vector must equal).
    singles = [torch_stages(ref, feature_batch([w])["input_values"]) for w in waves]
    tokens = hf_tokens(hub, TEXTS)
    ref_text = torch_text(ref, tokens)
    # Ours: both clips in one padded batch, with every stage captured.
    values, lengths = batch_waveforms([prepare_waveform(w, i, hop, SR) for i, w in enumerate(waves)], hop)
    cap: dict = {}
    out = model.model.encode_audio(values, lengths, capture=cap)
    ours = {k: np.array(v.astype(mx.float32)) for k, v in cap.items()}
    ours["pooled_embeds"] = np.array(model.model.audio_head(out.pooler_output))
    ours["frame_embeds"] = np.array(model.model.audio_head(out.last_hidden_state))
    tcap: dict = {}
    model.model.text_model(mx.array(tokens["input_ids"]), mx.array(tokens["attention_mask"]), capture=tcap)
    ours["text"] = {k: np.array(v) for k, v in tcap.items()}
    ours["text_embeds"] = np.array(model.model.text_audio_head(tcap["final_norm"][:, 0]))
    data = dict(
        kind=kind,
        ref=ref,
        hub=hub,
        converted=converted,
        model=model,
        waves=waves,
        singles=singles,
        tokens=tokens,
        ref_text=ref_text,
        ours=ours,
    )
    yield data
    # The max |Δ| figures gathered by the tests, for the record (shown with -s).
    for name, value in FIGURES.get(kind, {}).items():
        print(f"\n{kind:>6}  {name:<28} {value:.7g}", end="")
    data.clear()
    del ref, model, out, cap
    gc.collect()
    shutil.rmtree(tmp, ignore_errors=True)


def test_reference_is_the_released_architecture(case):
    ref, model = case["ref"], case["model"]
    assert sum(p.numel() for p in ref.parameters()) > 600_000_000
    assert model.config.is_frame_level == (case["kind"] == "frame")
    assert model.embedding_dim == 1024 and model.config.hop_length == 1920
    manifest = json.loads((case["converted"] / "manifest.json").read_text())
    assert manifest["verification"] == "architecture parity-tested, released weights not verified"


def test_audio_stages_per_clip(case):
    """Every stage of each clip of our padded batch against transformers on that clip alone."""
    for row, single in enumerate(case["singles"]):
        for name in AUDIO_STAGES:
            r = single[name][0]
            o = case["ours"][name][row, : r.shape[0]]
            record(case["kind"], name, o, r)
            assert rel_l2(o, r) <= 1e-5, (name, row)


def test_audio_embeddings(case):
    kind = "frame_embeds" if case["kind"] == "frame" else "pooled_embeds"
    for row, single in enumerate(case["singles"]):
        r = unit(single[kind][0])
        o = unit(case["ours"][kind][row, : r.shape[0]] if r.ndim == 2 else case["ours"][kind][row])
        record(case["kind"], f"unit {kind}", o, r)
        assert np.abs(o - r).max() <= 1e-5
        assert cosine(o, r).min() >= 0.99999


def test_pipeline_vectors_do_not_depend_on_the_batch(case):
    """embed_audio (both clips in one call) and embed_frames give each clip its single-clip reference."""
    model, waves, singles = case["model"], case["waves"], case["singles"]
    together = model.embed_audio(waves, batch_size=2)
    for row, single in enumerate(singles):
        if case["kind"] == "frame":  # the frame-level model's clip vector: its frames' mean direction
            want = unit(unit(single["frame_embeds"][0]).mean(axis=0))
        else:
            want = unit(single["pooled_embeds"][0])
        assert np.abs(together[row] - want).max() <= 1e-5
    if case["kind"] == "frame":
        frames = model.embed_frames(waves[1])  # 40000 samples: 21 frames, the last one reflect-padded
        want = unit(singles[1]["frame_embeds"][0])
        assert frames.chunks == 1 and np.abs(frames.vectors - want).max() <= 1e-5
        np.testing.assert_allclose(frames.starts, np.arange(21) * 0.04)


def test_text(case):
    model, tokens, ref = case["model"], case["tokens"], case["ref_text"]
    ids, mask = model.tokenizer(TEXTS)
    np.testing.assert_array_equal(ids, tokens["input_ids"])
    np.testing.assert_array_equal(mask, tokens["attention_mask"])
    assert ids.shape[1] > 64 + 1  # the long text reaches past the sliding window (+-64 tokens)
    cap = case["ours"]["text"]  # the text tower's states on the same tokens
    valid = mask.astype(bool)  # padded positions are never read
    for name in ["embeddings"] + [f"layers.{i}" for i in range(21)] + ["final_norm"]:
        assert rel_l2(cap[name][valid], ref[name][valid]) <= 1e-5, name
    ours = model.embed_text(TEXTS)
    want = unit(ref["text_embeds"])
    record(case["kind"], "unit text", ours, want)
    assert np.abs(ours - want).max() <= 1e-5
    assert cosine(ours, want).min() >= 0.99999


def test_logits(case):
    """Scale and bias: ours on unit vectors against transformers' parameters on its unit vectors, and on
    raw embeddings against transformers' forward formula (tests/test_pe_audio_model.py runs the forward
    itself on the small model)."""
    model, ref, ours = case["model"].model, case["ref"], case["ours"]
    scale, bias = float(ref.text_audio_logit_scale), float(ref.text_audio_logit_bias)
    assert float(model.text_audio_logit_scale) == scale and float(model.text_audio_logit_bias) == bias
    kind = "frame_embeds" if case["kind"] == "frame" else "pooled_embeds"
    ref_audio = case["singles"][0][kind][:1]  # (1, D) pooled or (1, T, D) frames of clip 0
    our_audio = ours[kind][:1, : ref_audio.shape[1]] if kind == "frame_embeds" else ours[kind][:1]
    ref_text, our_text = case["ref_text"]["text_embeds"], ours["text_embeds"]

    def hf_logits(audio: np.ndarray, text: np.ndarray) -> np.ndarray:  # PeAudio*Model.forward's formula
        dots = audio @ text.T
        return (dots.transpose(0, 2, 1) if dots.ndim == 3 else dots) * scale + bias

    got = np.array(model.logits(unit(our_audio), unit(our_text))[0])
    want = hf_logits(unit(ref_audio), unit(ref_text))
    record(case["kind"], "logits (unit vectors)", got, want)
    assert np.abs(got - want).max() <= 1e-5 * scale
    # Raw: a dot product of unnormalized vectors carries |a| |t| times their rounding; measured in those
    # units (scale * |a| * |t|), the same 1e-5 as the unit vectors.
    got = np.array(model.logits(our_audio, our_text)[0])
    units = scale * np.linalg.norm(ref_audio, axis=-1).max() * np.linalg.norm(ref_text, axis=-1).max()
    assert np.abs(got - hf_logits(ref_audio, ref_text)).max() <= 1e-5 * units


def test_half_precision(case):
    """float16 for the pooled model, bfloat16 for the frame-level one (both on both: the small models);
    the short clip and texts, as half-precision matmuls skip BLAS on the CPU (slow)."""
    dtype = "float16" if case["kind"] == "pooled" else "bfloat16"
    half = mlx_clap.load(case["converted"], dtype=dtype)
    wave, texts = case["waves"][1], [TEXTS[0], TEXTS[2]]
    if case["kind"] == "frame":
        got, want = half.embed_frames(wave).vectors, case["singles"][1]["frame_embeds"][0]
    else:
        got, want = half.embed_audio(wave), case["singles"][1]["pooled_embeds"]
    audio_cos = float(cosine(got, want).min())
    text_cos = float(cosine(half.embed_text(texts), case["ref_text"]["text_embeds"][[0, 2]]).min())
    FIGURES.setdefault(case["kind"], {}).update(
        {f"{dtype} audio min cos": audio_cos, f"{dtype} text min cos": text_cos}
    )
    assert audio_cos >= 0.999 and text_cos >= 0.999
    del half
    gc.collect()
