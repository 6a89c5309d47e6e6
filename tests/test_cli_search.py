"""`mlx-clap search | dedupe | cluster | classify` on synthetic stores and a tiny random-init model:
output shapes, JSON, and the bad inputs (empty store, another model's store, k too large, unknown path)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from fixtures import assert_same_ranking, create_store
from test_index import make_store, unit

from mlx_clap.cli import main
from mlx_clap.store import Store


def run(args: list[str]):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture()
def vec_store(tmp_path) -> tuple[Store, np.ndarray]:
    vecs = unit(np.random.default_rng(0).standard_normal((40, 16)))
    vecs[7] = unit(vecs[3][None] + 0.01)[0]  # a near-duplicate pair 3-7
    names = [f"/sounds/{'dog' if i < 20 else 'rain'}_{i:02d}.wav" for i in range(40)]
    return make_store(tmp_path / "store", vecs, names=names, shard_size=16), vecs


def test_help_has_examples():
    for cmd in ("search", "dedupe", "cluster", "classify"):
        r = run([cmd, "--help"])
        assert r.exit_code == 0 and "Example" in r.output and "mlx-clap " + cmd in r.output


def test_search_like_json_filters_and_clamp(vec_store):
    store, vecs = vec_store
    r = run(["search", store.path, "--like", "/sounds/dog_03.wav", "-k", "3", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["backend"] == "flat" and doc["results"][0]["path"] == "/sounds/dog_07.wav"
    assert all(x["path"] != "/sounds/dog_03.wav" for x in doc["results"])  # the query itself is left out
    want = np.argsort(-(vecs @ vecs[3]), kind="stable")[1:4]
    assert_same_ranking([x["row"] for x in doc["results"]], want.tolist(), vecs @ vecs[3])
    r = run(["search", store.path, "--like", "/sounds/dog_03.wav", "--glob", "*rain_*", "-k", "50"])
    assert r.exit_code == 0
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 20 and all("rain_" in ln for ln in lines)
    assert "note: k=50 is more than the 20 candidate rows" in r.stderr
    r = run(["search", store.path, "--like", "/sounds/dog_03.wav", "--contains", "dog_1", "--backend", "ann"])
    assert r.exit_code == 1 and "mlx-clap index" in r.output  # a search never builds an index unasked
    assert run(["index", store.path]).exit_code == 0
    r = run(["search", store.path, "--like", "/sounds/dog_03.wav", "--contains", "dog_1", "--backend", "ann"])
    assert r.exit_code == 0 and len(r.stdout.strip().splitlines()) == 10


def test_search_bad_input(vec_store, tmp_path, tiny_model_dir):
    store, _ = vec_store
    r = run(["search", store.path, "--like", "/sounds/nope.wav"])
    assert r.exit_code == 1 and "--like /sounds/nope.wav: not in the store" in r.output
    r = run(["search", store.path, "--like", "/sounds/dog_03.wav", "--text", "x"])
    assert r.exit_code == 2 and "exactly one of" in r.output
    r = run(["search", tmp_path / "missing", "--like", "x"])
    assert r.exit_code == 1 and "missing: no such store" in r.output
    create_store(tmp_path / "empty", {"model": str(tiny_model_dir)}, 512)
    for cmd in (["search", tmp_path / "empty", "--text", "dog"], ["dedupe", tmp_path / "empty"],
                ["cluster", tmp_path / "empty", "-k", "2"]):  # fmt: skip
        r = run(cmd)
        assert r.exit_code == 1 and "empty" in r.output, r.output
    # The store says 16-d vectors; the tiny model makes 512-d ones.
    r = run(["search", store.path, "--text", "dog", "--model", tiny_model_dir])
    assert r.exit_code == 1 and "holds 16-d vectors" in r.output and "512-d" in r.output
    r = run(["search", store.path, "--text", "dog"])  # the manifest's model id cannot be loaded offline
    assert r.exit_code == 1 and "test/random" in r.output
    # Same size, other weights: refused by the weights hash recorded in the manifest.
    other = create_store(tmp_path / "other", {"model": str(tiny_model_dir), "weights_sha256": "ab" * 32}, 512)
    other.write([{"path": "a.wav", "size": 1, "mtime": 0.0}], unit(np.ones((1, 512))))
    r = run(["search", other.path, "--text", "dog"])
    assert r.exit_code == 1 and "not comparable" in r.output


def test_search_text_with_store_model(tiny_model_dir, tmp_path):
    import mlx_clap

    model = mlx_clap.load(tiny_model_dir)
    texts = ["a dog barking", "rain on a roof", "a siren", "jazz music"]
    vecs = model.embed_text(texts)  # stand-ins for audio vectors in the shared space
    store = create_store(tmp_path / "s", {"model": str(tiny_model_dir)}, 512)
    store.write([{"path": f"{t}.wav", "size": 1, "mtime": 0.0} for t in texts], vecs)
    r = run(["search", store.path, "--text", "rain on a roof", "-k", "2", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["query"] == {"text": "rain on a roof"}
    assert doc["results"][0]["path"] == "rain on a roof.wav" and doc["results"][0]["score"] > 0.9999


def test_dedupe_and_cluster_commands(vec_store):
    store, _ = vec_store
    r = run(["dedupe", store.path, "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [g["paths"] for g in doc["groups"]] == [["/sounds/dog_03.wav", "/sounds/dog_07.wav"]]
    r = run(["dedupe", store.path, "--threshold", "0.9999999"])
    assert r.exit_code == 0 and "no near-duplicates" in r.output
    r = run(["dedupe", store.path, "--threshold", "2"])
    assert r.exit_code == 2
    r = run(["cluster", store.path, "-k", "4", "--seed", "3", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert len(doc["clusters"]) == 4 and sum(c["size"] for c in doc["clusters"]) == 40
    saved = json.loads((Path(store.path) / "clusters.json").read_text())
    assert len(saved["labels"]) == 40 and saved["seed"] == 3
    r = run(["cluster", store.path, "-k", "41"])
    assert r.exit_code == 1 and "between 1 and the number of vectors (40)" in r.output


def test_classify_files_and_store(tiny_model_dir, tmp_path):
    rng = np.random.default_rng(0)
    a, b = tmp_path / "a.wav", tmp_path / "b.flac"
    sf.write(a, 0.1 * rng.standard_normal(48000), 48000)
    sf.write(b, 0.1 * np.sin(np.arange(44100) / 10), 44100)
    (tmp_path / "labels.txt").write_text("# animals\ndog\n\ncat\nrain\n")
    r = run(["classify", a, b, "--labels-file", tmp_path / "labels.txt", "--model", tiny_model_dir, "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["labels"] == ["dog", "cat", "rain"] and [x["path"] for x in doc["results"]] == [str(a), str(b)]
    import mlx_clap

    model = mlx_clap.load(tiny_model_dir)
    want = model.classify([a, b], ["dog", "cat", "rain"])
    for row, res in zip(want, doc["results"], strict=True):
        assert np.allclose([res["probs"][k] for k in ("dog", "cat", "rain")], row, atol=1e-5)
        assert res["top"][0] == ["dog", "cat", "rain"][int(np.argmax(row))]
    r = run(["classify", a, "--labels", "dog,cat", "--model", tiny_model_dir, "--top", "5", "--template", ""])
    assert r.exit_code == 0 and r.stdout.count(" 0.") + r.stdout.count(" 1.") == 2
    # A store as input: its vectors are classified without decoding.
    store = create_store(tmp_path / "s", {"model": str(tiny_model_dir)}, 512)
    store.write([{"path": str(a), "size": 1, "mtime": 0.0}], model.embed_audio([a]))
    r = run(["classify", store.path, "--labels", "dog,cat,rain", "--model", tiny_model_dir, "--json"])
    assert r.exit_code == 0, r.output
    assert np.allclose(
        list(json.loads(r.stdout)["results"][0]["probs"].values()), sorted(want[0])[::-1], atol=1e-4
    )
    for args, msg in [
        (["--labels", "dog,dog"], "labels repeated: dog"),
        (["--labels", " , "], "no labels"),
        (["--labels", "a", "--template", "no slot"], "must contain"),
        ([], "exactly one of --labels or --labels-file"),
    ]:
        r = run(["classify", a, "--model", tiny_model_dir, *args])
        assert r.exit_code != 0 and msg in r.output, (args, r.output)
    (tmp_path / "bad.wav").write_text("not audio")
    r = run(["classify", tmp_path / "bad.wav", "--labels", "a,b", "--model", tiny_model_dir])
    assert r.exit_code == 1 and "bad.wav" in r.output
