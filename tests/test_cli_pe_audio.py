"""The commands with a Perception Encoder Audio model: `embed` into a store, `search --text`, `classify`,
`serve` search, `timeline` over 40-ms frames, and stores that refuse another model family.

The models are tiny random-init PE-A folders written with MLX alone (no torch): the architecture of
tests/pe_audio_reference.py TINY_* (the released 40-ms hop), a ModernBERT-shaped tokenizer, a sigmoid
scale and bias in the range SigLIP-style training leaves. Their vectors mean nothing; what is tested is
that every command gives what the pipeline gives.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from fixtures import assert_same_ranking, run
from mlx.utils import tree_flatten
from pe_audio_reference import TINY_AUDIO, TINY_TEXT, make_signal, modernbert_tokenizer

import mlx_clap
from mlx_clap.cli import main
from mlx_clap.models.pe_audio.config import FRAME_LEVEL, POOLED, config_from_hf
from mlx_clap.models.pe_audio.model import PeAudioModel, save_pe_audio_folder
from mlx_clap.store import Store

SR = 48000
HOP = 1920  # samples per frame: 40 ms


def write_pe_folder(folder: Path, architecture: str, seed: int) -> Path:
    """A converted PE-A folder with random weights (fan-in scaled, so no layer collapses the input)."""
    hf = {"model_type": "pe_audio", "architectures": [architecture]}
    config = config_from_hf({**hf, "audio_config": TINY_AUDIO, "text_config": TINY_TEXT})
    model = PeAudioModel(config)
    rng = np.random.default_rng(seed)
    weights = []
    for name, value in tree_flatten(model.parameters()):
        shape = value.shape
        if name.endswith("alpha"):
            arr = rng.uniform(0.5, 2.0, shape)
        elif name.endswith("logit_scale"):
            arr = np.full(shape, 10.0)
        elif name.endswith("logit_bias"):
            arr = np.full(shape, -1.0)
        elif name.endswith("weight") and len(shape) >= 2:
            arr = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        elif name.endswith("weight"):  # norm scales
            arr = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            arr = 0.05 * rng.standard_normal(shape)
        weights.append((name, mx.array(arr.astype(np.float32))))
    model.load_weights(weights)
    save_pe_audio_folder(model, folder)
    modernbert_tokenizer().save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def pe_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pe_models")
    return {
        "frame": write_pe_folder(root / "frame", FRAME_LEVEL, 1),
        "pooled": write_pe_folder(root / "pooled", POOLED, 2),
    }


@pytest.fixture(scope="module")
def frame_model(pe_dirs):
    return mlx_clap.load(pe_dirs["frame"])


@pytest.fixture(scope="module")
def sounds(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("pe_sounds")
    paths = []
    for i, seconds in enumerate((1.5, 2.5, 4.0)):
        path = folder / f"sound{i}.wav"
        sf.write(path, make_signal(int(seconds * SR), i), SR, subtype="FLOAT")
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def pe_store(tmp_path_factory, pe_dirs, sounds) -> Path:
    out = tmp_path_factory.mktemp("pe_store") / "store"
    r = run(
        ["embed", sounds[0].parent, "--out", out, "--model", pe_dirs["frame"], "--store-dtype", "float32"]
    )
    assert r.exit_code == 0, r.output
    return out


# ------------------------------------------------------------------------------ embed, search, classify
def test_embed_search_classify(pe_store, frame_model, sounds):
    store = Store.open(pe_store)
    paths = [it["path"] for it in store.items]
    assert sorted(paths) == sorted(str(p.resolve()) for p in sounds)
    want = frame_model.embed_audio(paths)
    np.testing.assert_allclose(store.matrix(), want, atol=1e-6, rtol=0)

    r = run(["search", pe_store, "--text", "glass breaking", "--json"])  # the store's own model
    assert r.exit_code == 0, r.output
    got = [x["path"] for x in json.loads(r.stdout)["results"]]
    every = want @ frame_model.embed_text(["glass breaking"])[0]
    assert_same_ranking([paths.index(p) for p in got], np.argsort(-every, kind="stable").tolist(), every)

    r = run(["classify", pe_store, "--labels", "glass breaking,a dog barks", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    text = frame_model.embed_text(["glass breaking", "a dog barks"])
    scale = float(frame_model.model.text_audio_logit_scale)
    bias = float(frame_model.model.text_audio_logit_bias)
    probs = 1 / (1 + np.exp(-(scale * want @ text.T + bias)))  # the model's sigmoid, not a softmax
    for res in doc["results"]:
        i = paths.index(res["path"])
        got = [res["probs"]["glass breaking"], res["probs"]["a dog barks"]]
        np.testing.assert_allclose(got, probs[i], atol=2e-6)
    assert abs(sum(doc["results"][0]["probs"].values()) - 1.0) > 1e-3


def test_classify_one_label_is_a_probability(pe_dirs, frame_model, sounds):
    """With the model's sigmoid one label is a real score, not the softmax's constant 1.000: no note
    saying otherwise, and the value is the model's."""
    r = CliRunner().invoke(
        main, ["classify", str(sounds[0]), "--labels", "glass breaking", "--model", str(pe_dirs["frame"])]
    )
    assert r.exit_code == 0, r.output
    assert "always scores 1.000" not in r.stderr
    want = frame_model.classify([sounds[0]], ["glass breaking"])[0, 0]
    assert abs(want - 1.0) > 1e-3 and r.stdout.strip().endswith(f"glass breaking {want:.3f}")


def test_stores_refuse_the_other_family(tmp_path, pe_dirs, tiny_model_dir, sounds):
    """A store keeps one pipeline: a CLAP store refuses a PE-A run and the reverse, naming the difference."""
    clap_store, pe_store = tmp_path / "clap", tmp_path / "pe"
    folder = sounds[0].parent
    assert run(["embed", folder, "--out", clap_store, "--model", tiny_model_dir]).exit_code == 0
    assert run(["embed", folder, "--out", pe_store, "--model", pe_dirs["pooled"]]).exit_code == 0
    for store, other, dims in (
        (clap_store, pe_dirs["pooled"], "512 there, 32 now"),
        (pe_store, tiny_model_dir, "32 there, 512 now"),
    ):
        r = run(["embed", folder, "--out", store, "--model", other])
        assert r.exit_code != 0
        assert "another pipeline" in r.output and f"dim: {dims}" in r.output, r.output
        assert "--overwrite" in r.output
        r = run(["search", store, "--text", "a dog", "--model", other])
        assert r.exit_code != 0 and "use the model the store was embedded with" in r.output, r.output
    # The two sit side by side; each is searched with its own model.
    for store in (clap_store, pe_store):
        r = run(["search", store, "--text", "a dog", "--json"])
        assert r.exit_code == 0 and len(json.loads(r.stdout)["results"]) == len(sounds), r.output


def test_serve_searches_a_pe_store(pe_store, frame_model):
    pytest.importorskip("starlette", reason="the serve extra is not installed: pip install 'mlx-clap[serve]'")
    pytest.importorskip("httpx", reason="Starlette's TestClient needs httpx")
    from starlette.testclient import TestClient

    from mlx_clap.serve.app import create_app
    from mlx_clap.serve.engine import Library

    store = Store.open(pe_store)
    client = TestClient(create_app(Library(store, frame_model), token="t"), base_url="http://127.0.0.1:8765")
    r = client.post("/api/search", json={"text": "glass breaking", "k": 3}, headers={"X-MLX-Clap-Token": "t"})
    assert r.status_code == 200, r.text
    every = store.matrix() @ frame_model.embed_text(["glass breaking"])[0]
    want = np.argsort(-every, kind="stable")[:3]
    doc = r.json()
    assert_same_ranking([x["row"] for x in doc["results"]], want.tolist(), every)
    assert [x["score"] for x in doc["results"]] == pytest.approx(every[want], abs=1e-4)  # rounded to 4 places


# ------------------------------------------------------------------------------------------ timeline
def reference_frames(model, path: Path, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, cosines, probabilities) per frame, from the pipeline's frames and the model's scale/bias."""
    frames = model.embed_frames(path)
    cos = frames.vectors @ model.embed_text([text])[0]
    scale = float(model.model.text_audio_logit_scale)
    bias = float(model.model.text_audio_logit_bias)
    return frames.starts, cos, 1 / (1 + np.exp(-(scale * cos + bias)))


def reference_spans(starts: np.ndarray, probs: np.ndarray, cut: float, end: float) -> list[tuple]:
    """Runs of consecutive frames at or above `cut`: (start, end, best probability)."""
    spans, first = [], None
    for i, p in enumerate([*probs, -1.0]):
        if p >= cut and first is None:
            first = i
        elif p < cut and first is not None:
            spans.append((starts[first], min(starts[i - 1] + HOP / SR, end), max(probs[first:i])))
            first = None
    return spans


def test_timeline_scores_every_frame(pe_dirs, frame_model, sounds):
    path = sounds[2]  # 4 s: 100 frames
    text = "glass breaking"
    starts, cos, probs = reference_frames(frame_model, path, text)
    assert len(starts) == 100 and probs.std() > 1e-3  # the scores vary (else spans would prove nothing)
    cut = float(np.median(probs))  # some frames on each side
    r = run(["timeline", path, "--model", pe_dirs["frame"], "--text", text, "--json", "--threshold", cut])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["hop"] == pytest.approx(0.04) and doc["threshold"] == pytest.approx(cut)
    np.testing.assert_allclose([f["start"] for f in doc["frames"]], starts, atol=1e-6)
    np.testing.assert_allclose([f["score"] for f in doc["frames"]], cos, atol=2e-6)
    np.testing.assert_allclose([f["probability"] for f in doc["frames"]], probs, atol=2e-6)
    want = reference_spans(starts, probs, cut, 4.0)
    assert 1 <= len(want) < 50
    got = [(s["start"], s["end"], s["probability"]) for s in doc["spans"]]
    np.testing.assert_allclose(got, want, atol=2e-6)
    # Merged: no two spans touch, and every frame in a span reaches the threshold.
    assert all(b[0] > a[1] + 1e-9 for a, b in zip(got[:-1], got[1:], strict=True))
    # Audacity: the same spans as a label track; the default threshold is the model's 0.5.
    r = run(["timeline", path, "--model", pe_dirs["frame"], "--text", text, "--format", "audacity"])
    assert r.exit_code == 0, r.output
    lines = [line.split("\t") for line in r.stdout.splitlines()]
    half = reference_spans(starts, probs, 0.5, 4.0)
    assert len(half) >= 1 and len(lines) == len(half)
    got = [(float(a), float(b), float(label.split()[-1])) for a, b, label in lines]
    np.testing.assert_allclose(got, half, atol=6e-4)  # the label's probability has 3 decimals


def test_timeline_from_a_store_refines_from_frames(pe_store, frame_model, sounds):
    """With a store made by a frame-level model, --text scores the stored file's frames (the model is
    the store's)."""
    path = sounds[1]
    starts, cos, _ = reference_frames(frame_model, path, "rain")
    r = run(["timeline", path, "--store", pe_store, "--text", "rain", "--format", "csv"])
    assert r.exit_code == 0, r.output
    rows = r.stdout.splitlines()
    assert rows[0] == "start,end,score,probability" and len(rows) == 1 + len(starts)
    np.testing.assert_allclose([float(x.split(",")[2]) for x in rows[1:]], cos, atol=2e-6)


def test_timeline_refusals(pe_dirs, tiny_model_dir, sounds, tmp_path):
    path = sounds[0]
    r = run(["timeline", path, "--model", tiny_model_dir, "--text", "a dog"])
    assert r.exit_code == 2 and "give --store" in r.output and "frame-level" in r.output
    r = run(["timeline", path, "--model", pe_dirs["pooled"], "--text", "a dog"])
    assert r.exit_code == 2 and "give --store" in r.output
    r = run(["timeline", path, "--model", pe_dirs["frame"], "--text", "a dog", "--min-z", "2"])
    assert r.exit_code == 2 and "--threshold" in r.output
    r = run(["timeline", path, "--model", pe_dirs["frame"], "--text", "a dog", "--threshold", "-0.5"])
    assert r.exit_code == 2 and "not a probability" in r.output
    r = run(["timeline", path, "--model", pe_dirs["frame"], "--audio", path])
    assert r.exit_code == 2 and "--text" in r.output
    short = tmp_path / "short.wav"
    sf.write(short, np.zeros(HOP // 2, np.float32), SR)
    r = run(["timeline", short, "--model", pe_dirs["frame"], "--text", "a dog"])
    assert r.exit_code == 1 and str(short) in r.output and "shorter than one PE-Audio frame" in r.output


# ------------------------------------------------------------------------- embed --segments (pipeline)
def test_segments_are_pooled_frames(frame_model):
    """`embed_segments` of a frame-level model: non-overlapping hop-long segments, each the unit mean
    of its frames, across chunk boundaries and from streamed blocks alike (short chunks here, so the
    clip stays short: 2 s of kept frames + 0.4 s of context, as test_pe_audio_model's chunk test)."""
    family = frame_model.family
    assert family.pools_frames and family.segment_seconds(0.28) == pytest.approx(0.28)
    chunks = dict(chunk_seconds=2.0, context_seconds=0.4)
    wave = make_signal(6 * SR + 7, 7)  # 151 frames, the last one padded
    frames = frame_model.embed_frames(wave, **chunks)
    assert frames.chunks == 4 and len(frames.starts) == 151
    blocks = np.split(wave, [1000, 50_000, 123_457, 200_000])
    for audio in (wave, iter(blocks)):
        seg = family.embed_segments(audio, hop_seconds=0.28, batch_size=3, **chunks)  # 7 frames each
        assert seg.vectors.shape == (22, frame_model.embedding_dim)  # 21 whole, one of 4 frames
        for k in range(22):
            mean = frames.vectors[7 * k : 7 * (k + 1)].mean(axis=0)
            np.testing.assert_allclose(seg.vectors[k], mean / np.linalg.norm(mean), atol=1e-6)
        np.testing.assert_allclose(seg.starts, np.arange(22) * 0.28, atol=1e-9)
        np.testing.assert_allclose(seg.ends, np.minimum(seg.starts + 0.28, wave.size / SR), atol=1e-9)
        whole = frames.vectors.mean(axis=0)
        np.testing.assert_allclose(seg.file_vector, whole / np.linalg.norm(whole), atol=1e-6)
    # A hop under one frame is one frame.
    assert family.segment_seconds(0.01) == pytest.approx(0.04)
    with pytest.raises(ValueError, match="hop_seconds must be a positive"):
        family.embed_segments(wave, hop_seconds=0.0)


def test_embed_segments_stores_pooled_frames(tmp_path, pe_dirs, frame_model, sounds):
    """`embed --segments` with a frame-level model: every file (short ones too) gets hop-long segments
    pooled from its frames, the layout records that length, and `search --segments` finds them."""
    out = tmp_path / "segs"
    args = [
        "embed",
        sounds[0].parent,
        "--out",
        out,
        "--model",
        pe_dirs["frame"],
        "--segments",
        "--hop",
        "0.4",
    ]
    r = run([*args, "--store-dtype", "float32"])
    assert r.exit_code == 0, r.output
    store = Store.open(out)
    assert store.segment_settings == {"hop": 0.4, "window": pytest.approx(0.4)}
    view = store.segment_view()
    family = frame_model.family
    for row, item in enumerate(store.items):
        want = family.embed_segments(item["path"], hop_seconds=0.4)
        idx = view.of_file(row)
        assert len(idx) == len(want.starts) >= 4  # 1.5 s: four segments, not one window
        np.testing.assert_allclose(view.take(idx), want.vectors, atol=1e-6)
        np.testing.assert_allclose(view.start[idx], want.starts, atol=1e-6)
        np.testing.assert_allclose(view.end[idx], want.ends, atol=1e-6)
        np.testing.assert_allclose(store.matrix()[row], want.file_vector, atol=1e-6)
    r = run(["search", out, "--text", "glass breaking", "--segments", "--min-z", "-10", "--json"])
    assert r.exit_code == 0, r.output
