"""PE-Audio on small random models: parity with transformers, loading, conversion, refusals, the pipeline.

The architecture here is small (tests/pe_audio_reference.py TINY_*: every kind of layer the released one
has, grouped-query attention and a 4-token sliding window included, the released 40-ms hop) so the
file runs in seconds; tests/test_pe_audio_parity.py holds the full-size parity (marked slow). Tolerances
as there: unit vectors max |Δ| <= 1e-5, stages relative L2 <= 1e-5.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[test]')")
pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[test]')")
import torch  # noqa: E402
from pe_audio_reference import (  # noqa: E402
    TINY_AUDIO,
    TINY_TEXT,
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
from mlx_clap.io.folder import WeightsError  # noqa: E402
from mlx_clap.models.pe_audio.model import PeAudioModel, UnsupportedPeCheckpoint  # noqa: E402
from mlx_clap.pipeline.pe_audio import frame_chunks  # noqa: E402
from mlx_clap.preprocess.features import AudioInputError  # noqa: E402

SR = 48000
TEXTS = ["glass breaking", "a dog barks in the distance while rain falls on a tin roof " * 3, "x"]


def rel_l2(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Hub folders of a tiny pooled and a tiny frame-level model, with their torch references."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("pe_tiny")
    tok = modernbert_tokenizer()
    out = {}
    for kind, frame_level in (("pooled", False), ("frame", True)):
        ref = random_pe_audio(frame_level, TINY_AUDIO, TINY_TEXT, seed=7 if frame_level else 3)
        out[kind] = (ref, save_pe_folder(ref, tmp / kind, tok))
    yield out
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def pooled(hub):
    return mlx_clap.load(hub["pooled"][1])


@pytest.fixture(scope="module")
def frame(hub):
    return mlx_clap.load(hub["frame"][1])


def clips(model) -> list[np.ndarray]:
    hop = model.config.hop_length
    return [make_signal(hop * 40, 1), make_signal(hop * 23 + 7, 2)]  # 1.6 s and 0.92 s


# ------------------------------------------------------------------------------------------ parity
def test_stages_match_transformers_per_clip(hub, pooled):
    ref, _ = hub["pooled"]
    waves = clips(pooled)
    from mlx_clap.preprocess.pe_audio_features import batch_waveforms, prepare_waveform

    hop = pooled.config.hop_length
    values, lengths = batch_waveforms([prepare_waveform(w, i, hop, SR) for i, w in enumerate(waves)], hop)
    cap: dict = {}
    out = pooled.model.encode_audio(values, lengths, capture=cap)
    for row, wave in enumerate(waves):
        single = torch_stages(ref, feature_batch([wave], hop)["input_values"])
        for name in ["dac.conv1", "dac.block.0", "dac.block.2", "dac.conv2", "embedder", "patch_embedder"]:
            r = single[name][0]
            o = np.array(cap[name][row, : r.shape[0]])
            assert rel_l2(o, r) <= 1e-5, name
        for name in ["layers.0", "layers.1", "output"]:
            r = single[name][0]
            assert rel_l2(np.array(cap[name][row, : r.shape[0]]), r) <= 1e-5, name
        ours = np.array(pooled.model.audio_head(out.pooler_output))[row]
        assert np.abs(unit(ours) - unit(single["pooled_embeds"][0])).max() <= 1e-5


def test_text_matches_transformers(hub, pooled):
    ref, folder = hub["pooled"]
    tokens = hf_tokens(folder, TEXTS)
    ids, mask = pooled.tokenizer(TEXTS)
    np.testing.assert_array_equal(ids, tokens["input_ids"])
    np.testing.assert_array_equal(mask, tokens["attention_mask"])
    assert ids.shape[1] > pooled.config.text_config.sliding_window + 1  # the sliding window matters
    want = torch_text(ref, tokens)
    cap: dict = {}
    pooled.model.text_model(mx.array(ids), mx.array(mask), capture=cap)
    valid = mask.astype(bool)  # padded positions are never read
    for name in ["embeddings", "layers.0", "layers.1", "layers.2", "final_norm"]:
        assert rel_l2(np.array(cap[name])[valid], want[name][valid]) <= 1e-5, name
    ours = pooled.embed_text(TEXTS)
    assert np.abs(ours - unit(want["text_embeds"])).max() <= 1e-5


def test_logits_match_transformers_forward(hub, frame):
    """transformers' own forward (scale and bias on raw embeddings), pooled and per frame."""
    for kind in ("pooled", "frame"):
        ref, folder = hub[kind]
        model = PeAudioModel.from_pretrained(folder)
        wave = clips(model)[0]
        tokens = hf_tokens(folder, TEXTS)
        inputs = feature_batch([wave], model.config.hop_length)
        with torch.no_grad():
            want = ref(
                input_ids=torch.from_numpy(tokens["input_ids"]),
                attention_mask=torch.from_numpy(tokens["attention_mask"]),
                input_values=torch.from_numpy(inputs["input_values"]),
            ).logits_audio_text.numpy()
        text = model.get_text_embeds(tokens["input_ids"], tokens["attention_mask"])
        x = inputs["input_values"][:, 0]
        audio = model.get_frame_embeds(x)[0] if kind == "frame" else model.get_audio_embeds(x)
        got = np.array(model.logits(audio, text)[0])
        assert got.shape == want.shape
        # In units of scale * |a| * |t| (raw dot products carry the vectors' norms times their rounding).
        scale = abs(float(ref.text_audio_logit_scale))
        units = (
            scale
            * float(mx.max(mx.linalg.norm(audio, axis=-1)))
            * float(mx.max(mx.linalg.norm(text, axis=-1)))
        )
        assert np.abs(got - want).max() <= 1e-5 * units, kind


def test_batch_changes_nothing(pooled, frame):
    """A clip's vector is the same alone, in a padded batch, and in any batch size."""
    for model in (pooled, frame):
        waves = clips(model)
        together = model.embed_audio(waves, batch_size=2)
        alone = np.stack([model.embed_audio(w)[0] for w in waves])
        assert np.abs(together - alone).max() <= 1e-6
        np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-6)


def test_frames_match_transformers(hub, frame):
    ref, _ = hub["frame"]
    hop = frame.config.hop_length
    wave = clips(frame)[1]
    got = frame.embed_frames(wave)
    want = torch_stages(ref, feature_batch([wave], hop)["input_values"])["frame_embeds"][0]
    assert got.chunks == 1 and got.vectors.shape == (-(-wave.size // hop), frame.embedding_dim)
    assert np.abs(got.vectors - unit(want)).max() <= 1e-5
    np.testing.assert_allclose(got.starts, np.arange(len(want)) * hop / SR)
    # The frame-level model's clip vector is its frames' mean direction.
    mean = unit(unit(want).mean(axis=0))
    assert np.abs(frame.embed_audio(wave)[0] - mean).max() <= 1e-5


def test_half_precision_cosine(hub):
    _, folder = hub["pooled"]
    full = mlx_clap.load(folder)
    wave = clips(full)[0]
    want_a, want_t = full.embed_audio(wave), full.embed_text(TEXTS)
    for dtype in ("float16", "bfloat16"):
        half = mlx_clap.load(folder, dtype=dtype)
        assert half.model.audio_encoder.layers[0].mlp.up_proj.weight.dtype == getattr(mx, dtype)
        assert half.model.audio_encoder.embedder.dac_encoder.conv1.weight.dtype == mx.float32  # codec kept
        cos_a = np.sum(half.embed_audio(wave) * want_a, axis=1)
        cos_t = np.sum(half.embed_text(TEXTS) * want_t, axis=1)
        assert cos_a.min() >= 0.999 and cos_t.min() >= 0.999, dtype


# ------------------------------------------------------------------------------ pipeline behaviour
def test_classify_is_the_models_sigmoid(pooled):
    wave = clips(pooled)[0]
    probs = pooled.classify(wave, ["glass breaking", "a dog"])
    a, t = pooled.embed_audio(wave), pooled.embed_text(["glass breaking", "a dog"])
    scale = float(pooled.model.text_audio_logit_scale)
    bias = float(pooled.model.text_audio_logit_bias)
    want = 1 / (1 + np.exp(-(scale * (a @ t.T) + bias)))
    assert np.abs(probs - want).max() <= 1e-6
    assert abs(probs.sum() - 1.0) > 1e-3  # independent scores, not a softmax over the labels


def test_file_equals_array_and_reference_mode(tmp_path, pooled):
    import soundfile as sf

    wave = make_signal(SR // 2, 3)
    path = tmp_path / "clip.wav"
    sf.write(path, wave, SR, subtype="FLOAT")
    np.testing.assert_allclose(pooled.embed_audio(path), pooled.embed_audio(wave), atol=1e-6)
    # Up to one window, every mode is the single pass over the whole clip.
    for mode in ("windows-mean", "head", "center", "reference"):
        np.testing.assert_allclose(
            pooled.embed_audio(wave, long_audio=mode), pooled.embed_audio(wave), atol=1e-6
        )


def test_long_clip_windows(pooled, monkeypatch):
    """Past one window the windowed modes cut windows; "reference" is one pass over the whole clip."""
    assert pooled.family.clip_samples == 30 * SR  # the default window: 750 frames
    window = 2 * SR  # a short window here, so the test stays fast
    monkeypatch.setattr(pooled.family, "clip_samples", window)
    wave = make_signal(window + window // 2, 4)
    whole = np.array(pooled.model.get_audio_features(wave[None]))  # 3 s: whole frames already
    assert np.abs(pooled.embed_audio(wave, long_audio="reference") - whole).max() <= 1e-5
    parts = pooled.embed_audio([wave[:window], wave[-window:]])  # the two windows of "windows-mean"
    assert np.abs(pooled.embed_audio(wave, long_audio="head")[0] - parts[0]).max() <= 1e-6
    assert np.abs(pooled.embed_audio(wave)[0] - unit(parts.sum(axis=0))).max() <= 1e-6
    assert np.abs(pooled.embed_audio(wave)[0] - whole[0]).max() > 1e-3  # windows are not the one pass


def test_frames_in_chunks(tmp_path, frame):
    """Chunked frames: every frame once, in order, with the clip's times; a path streams the same."""
    import soundfile as sf

    hop = frame.config.hop_length
    wave = make_signal(hop * 300 + 5, 5)  # 12 s, 301 frames
    one = frame.embed_frames(wave)
    chunked = frame.embed_frames(wave, chunk_seconds=2.0, context_seconds=0.4)
    assert one.chunks == 1 and chunked.chunks == 7  # 301 frames, 50 kept per chunk
    np.testing.assert_allclose(chunked.starts, one.starts)
    cos = np.sum(chunked.vectors * one.vectors, axis=1)
    assert cos.min() > 0.5  # the same frames, seen with a shorter context (measured: report)
    path = tmp_path / "clip.wav"
    sf.write(path, wave, SR, subtype="FLOAT")
    streamed = frame.embed_frames(path, chunk_seconds=2.0, context_seconds=0.4)
    assert np.abs(streamed.vectors - chunked.vectors).max() <= 1e-5


def test_frame_chunks_cover_the_clip_with_bounded_memory():
    hop, core, context = 10, 7, 3
    clip = np.arange(1234, dtype=np.float32)
    rng = np.random.default_rng(0)
    cuts = np.sort(rng.choice(np.arange(1, clip.size), size=40, replace=False))
    blocks = np.split(clip, cuts)
    padded = np.pad(clip, (0, -clip.size % hop), mode="reflect")
    seen = []
    for frame0, samples, first, kept, _ in frame_chunks(blocks, hop, core, context, lambda c: c):
        assert samples.size % hop == 0 and samples.size <= (core + 2 * context) * hop
        lo = (frame0 - first) * hop
        np.testing.assert_array_equal(samples, padded[lo : lo + samples.size])
        assert first == min(frame0, context)
        seen.extend(range(frame0, frame0 + kept))
    assert seen == list(range(padded.size // hop))
    # A clip up to core + 2 * context frames is one chunk, given to `whole` unpadded.
    short = list(frame_chunks([clip[:95]], hop, core, context, lambda c: np.pad(c, (0, 5))))
    assert len(short) == 1 and short[0][1].size == 100 and short[0][3] == 10


def test_codec_tiles_equal_one_pass(pooled):
    """A long clip's codec runs in tiles with receptive-field halos: the same frames as one pass."""
    from mlx_clap.models.pe_audio.dac import receptive_halo
    from mlx_clap.models.pe_audio.encoder import TILE_FRAMES

    embedder = pooled.model.audio_encoder.embedder
    hop, halo = pooled.config.hop_length, embedder.halo
    assert halo == receptive_halo(pooled.config.audio_config.dac_config) == 4
    frames = 2 * TILE_FRAMES + 2 * halo + 5  # three tiles
    wave = mx.array(make_signal(frames * hop, 6)[None])
    tiled = embedder.codec(wave, None)
    whole = embedder.bottleneck(embedder.dac_encoder(wave[..., None]))
    assert tiled.shape == whole.shape == (1, frames, pooled.config.audio_config.dac_config.codebook_dim)
    assert rel_l2(np.array(tiled), np.array(whole)) <= 1e-6
    # Without the full halo the tiles differ: 5766 samples reach into a frame from each side here, 3.003
    # frames (2 frames of halo miss about a frame of them; with 3, only 6 samples with a negligible pull).
    embedder.halo = halo - 2
    try:
        short = embedder.codec(wave, None)
    finally:
        embedder.halo = halo
    assert rel_l2(np.array(short), np.array(whole)) > 1e-4


@pytest.fixture
def worker_blocks(monkeypatch):
    """The items of every `parallel.map_blocks` call (recorded, then run) on a CPU with worker threads;
    skips where the parallel CPU paths are off (the Metal/CUDA code path)."""
    from mlx_clap import settings
    from mlx_clap.ops import parallel
    from mlx_clap.ops.device import cpu_fast_paths

    if not cpu_fast_paths():
        pytest.skip("the parallel CPU paths are off here (MLX_CLAP_CPU_OPTIMIZATIONS=off or not the CPU)")
    calls: list[list] = []
    real = parallel.map_blocks

    def spy(fn, items):
        calls.append(list(items))
        return real(fn, items)

    monkeypatch.setattr(parallel, "map_blocks", spy)
    yield calls
    settings.reset()


def with_threads(monkeypatch, n: int) -> None:
    """Run what follows with `n` CPU worker threads (settings re-read)."""
    from mlx_clap import settings

    monkeypatch.setenv("MLX_CLAP_CPU_THREADS", str(n))
    settings.reset()


def test_codec_tiles_run_side_by_side(pooled, monkeypatch, worker_blocks):
    """On a multi-core CPU a long clip's codec tiles run on the worker threads (one codec call uses one
    core), with the numbers of one thread; inside a worker's block (a batch cut into blocks) they run in
    place."""
    from mlx_clap.models.pe_audio.encoder import TILE_FRAMES

    embedder = pooled.model.audio_encoder.embedder
    hop = pooled.config.hop_length
    frames = 2 * TILE_FRAMES + 2 * embedder.halo + 5  # three tiles
    wave = make_signal(frames * hop, 7)
    clips = [wave, wave[::-1].copy(), wave * 0.5]
    with_threads(monkeypatch, 2)
    side = np.array(embedder.codec(mx.array(wave[None]), None))
    assert [len(b) for b in worker_blocks] == [3]
    # Three such clips: blocks of two clips on the workers, each clip's tiles in place (no deadlock).
    batch = pooled.embed_audio(clips, long_audio="reference")
    with_threads(monkeypatch, 1)
    alone = np.array(embedder.codec(mx.array(wave[None]), None))
    single = pooled.embed_audio(clips, long_audio="reference")
    # The codec's tiles, then the batch's two blocks (2 + 1 clips).
    assert [len(b) for b in worker_blocks] == [3, 2]
    assert rel_l2(side, alone) <= 1e-6
    np.testing.assert_allclose(batch, single, atol=1e-6)


def test_short_clip_codec_splits_across_workers(pooled, monkeypatch, worker_blocks):
    """A clip of one codec tile (3 s) is cut into one tile per worker (with halos) when the tiles run side
    by side, so every core works: the frames of the one pass within float rounding (measured here: max |Δ|
    7e-7 on values up to 1.2, the products' rounding for other lengths); without workers it stays one call."""
    embedder = pooled.model.audio_encoder.embedder
    hop = pooled.config.hop_length
    wave = mx.array(make_signal(SR * 3, 8)[None])  # 75 frames: one tile of TILE_FRAMES
    with_threads(monkeypatch, 2)
    side = np.array(embedder.codec(wave, None))
    with_threads(monkeypatch, 1)
    alone = np.array(embedder.codec(wave, None))
    halo = embedder.halo
    assert worker_blocks == [[(0, 0, 38 + halo, 0, 38), (0, 38 - halo, 75, 38, 75)]]
    whole = np.array(embedder.bottleneck(embedder.dac_encoder(wave[..., None])))
    assert side.shape == alone.shape == whole.shape == (1, SR * 3 // hop, whole.shape[-1])
    np.testing.assert_array_equal(alone, whole)  # one worker: one codec call, as before
    assert rel_l2(side, whole) <= 1e-6
    assert np.abs(side - whole).max() <= 1e-5 * np.abs(whole).max()


def test_conv_weights_arranged_per_tap(pooled):
    """Loading lays every convolution's weight out per tap (dac.Conv1d.arrange) without changing the
    parameters anyone sees; a weight loaded later replaces it (the stale layout is not used)."""
    from mlx.utils import tree_flatten

    from mlx_clap.models.pe_audio.dac import Conv1d

    model = pooled.model
    convs = [m for _, m in model.named_modules() if isinstance(m, Conv1d)]
    assert convs and all(c.get("_arranged") is not None and c._arranged[0] is c.weight for c in convs)
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    assert shapes == PeAudioModel.parameter_shapes(pooled.config)
    conv = model.audio_encoder.embedder.dac_encoder.block[-1].conv1  # strided
    assert conv.stride > 1
    x = mx.random.normal((1, 8 * conv.stride, conv.weight.shape[2]), key=mx.random.key(0))
    arranged = conv(x)
    w = conv.weight
    conv.weight = mx.array(np.array(w))  # a fresh (out, K, in) array: the strided-view path
    try:
        np.testing.assert_array_equal(np.array(conv(x)), np.array(arranged))
        conv.load_weights([("weight", 2 * w)], strict=False)
        np.testing.assert_allclose(np.array(conv(x)), 2 * np.array(arranged) - np.array(conv.bias), atol=1e-5)
    finally:
        conv.weight = w
    np.testing.assert_array_equal(np.array(conv(x)), np.array(arranged))


def test_pooled_model_gives_no_frames(pooled):
    with pytest.raises(ValueError, match="PeAudioFrameLevelModel"):
        pooled.embed_frames(clips(pooled)[0])


def test_shorter_than_one_frame_is_refused(pooled, frame):
    hop = pooled.config.hop_length
    with pytest.raises(AudioInputError, match=r"audio item 1: 10 samples is shorter than one PE-Audio frame"):
        pooled.embed_audio([clips(pooled)[0], np.ones(10, np.float32)])
    with pytest.raises(AudioInputError, match="shorter than one PE-Audio frame"):
        frame.embed_frames(np.ones(hop - 1, np.float32))
    assert pooled.embed_audio(np.ones(hop, np.float32)).shape == (1, pooled.embedding_dim)


# ----------------------------------------------------------------------------- loading, conversion
def test_convert_writes_manifest_and_loads_the_same(tmp_path, hub, pooled):
    from mlx_clap.convert.pe_audio import VERIFICATION, convert_pe_audio_folder
    from mlx_clap.io.files import sha256_file

    _, folder = hub["pooled"]
    dest = convert_pe_audio_folder(folder, tmp_path / "converted", revision="abc123")
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["verification"] == VERIFICATION and manifest["revision"] == "abc123"
    assert manifest["architecture"] == "PeAudioModel" and manifest["tokenizer_files"] == ["tokenizer.json"]
    assert manifest["source_files"]["model.safetensors"] == sha256_file(folder / "model.safetensors")
    config = json.loads((dest / "config.json").read_text())
    assert config["family"] == "pe_audio" and config["feature_config"]["sampling_rate"] == SR
    converted = mlx_clap.load(dest)
    wave = clips(pooled)[0]
    np.testing.assert_array_equal(converted.embed_audio(wave), pooled.embed_audio(wave))
    np.testing.assert_array_equal(converted.embed_text(TEXTS), pooled.embed_text(TEXTS))
    with pytest.raises(WeightsError, match="already converted"):
        convert_pe_audio_folder(dest, tmp_path / "again")


def _folder_with_config(tmp_path: Path, name: str, config: dict) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


@pytest.mark.parametrize(
    "model_type, what",
    [
        ("pe_audio_video", "audio-video"),
        ("pe_video", "video checkpoint"),
        ("pe_audio_encoder", "without a text"),
    ],
)
def test_other_perception_encoders_are_refused(tmp_path, model_type, what):
    folder = _folder_with_config(tmp_path, model_type, {"model_type": model_type})
    with pytest.raises(UnsupportedPeCheckpoint, match=what) as err:
        mlx_clap.load(folder)
    assert "supports PE audio-text checkpoints (model_type 'pe_audio'" in str(err.value)
    assert str(folder / "config.json") in str(err.value)


def test_unknown_architecture_is_refused(tmp_path, hub):
    _, folder = hub["pooled"]
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["PeAudioEncoder"]
    bad = _folder_with_config(tmp_path, "arch", config)
    with pytest.raises(UnsupportedPeCheckpoint, match="architectures"):
        mlx_clap.load(bad)


def test_tokenizer_of_the_wrong_size_is_refused(tmp_path, hub):
    from mlx_clap.convert.pe_audio import convert_pe_audio_folder

    _, folder = hub["pooled"]
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    modernbert_tokenizer(50304).save(str(bad / "tokenizer.json"))
    with pytest.raises(
        WeightsError, match="tokenizer has 50304 tokens but the model's embedding table has 50368"
    ):
        mlx_clap.load(bad)
    with pytest.raises(WeightsError, match="does not fit this model"):
        convert_pe_audio_folder(bad, tmp_path / "out")


def test_weight_norm_is_folded():
    v = mx.random.normal((6, 4, 7))
    g = mx.random.uniform(0.5, 2.0, (6, 1, 1))
    key = "audio_encoder.embedder.dac_encoder.conv1"
    folded = PeAudioModel.sanitize({f"{key}.weight_g": g, f"{key}.weight_v": v})
    norm = mx.sqrt(mx.sum(v * v, axis=(1, 2), keepdims=True))
    want = (g * v / norm).transpose(0, 2, 1)
    assert list(folded) == [f"{key}.weight"]
    assert float(mx.abs(folded[f"{key}.weight"] - want).max()) <= 1e-6


def test_cli_convert_writes_the_converted_folder(tmp_path, hub, frame, monkeypatch):
    """`mlx-clap convert HF_FOLDER DEST` converts a PE-Audio folder (it used to take it for a CLAP one)."""
    from click.testing import CliRunner

    from mlx_clap.cli import main
    from mlx_clap.io.files import sha256_file

    _, folder = hub["frame"]
    dest = tmp_path / "pe-frame"
    result = CliRunner().invoke(main, ["convert", str(folder), str(dest), "--revision", "r1", "--json"])
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.output)
    assert manifest["converter"] == "mlx_clap.convert.pe_audio" and manifest["revision"] == "r1"
    assert manifest["architecture"] == "PeAudioFrameLevelModel"
    assert manifest["source_files"]["model.safetensors"] == sha256_file(folder / "model.safetensors")
    assert json.loads((dest / "config.json").read_text())["family"] == "pe_audio"
    wave = clips(frame)[1]
    converted = mlx_clap.load(dest)
    np.testing.assert_array_equal(converted.embed_frames(wave).vectors, frame.embed_frames(wave).vectors)
    # A hub id goes the same way (the download stubbed: the tests reach no network).
    import mlx_clap.cli.convert as cli_convert

    monkeypatch.setattr(cli_convert, "download_hub", lambda name, revision=None: folder)
    by_id = CliRunner().invoke(
        main, ["convert", "facebook/pe-a-frame-base", str(tmp_path / "by-id"), "--json"]
    )
    assert by_id.exit_code == 0, by_id.output
    assert json.loads(by_id.output)["source"] == "facebook/pe-a-frame-base"
    # Converting the converted folder, or an audio-video checkpoint, is refused with the reason.
    again = CliRunner().invoke(main, ["convert", str(dest), str(tmp_path / "again")])
    assert again.exit_code == 1 and "already converted" in again.output
    av = _folder_with_config(tmp_path, "av", {"model_type": "pe_audio_video"})
    refused = CliRunner().invoke(main, ["convert", str(av), str(tmp_path / "av-out")])
    assert (
        refused.exit_code == 1
        and "audio-video" in refused.output
        and "supports PE audio-text" in refused.output
    )
