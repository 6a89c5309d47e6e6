"""Search and CLI audit: percentiles that agree between backends, cosines reported inside [-1, 1],
segment search's backend / calibration / notes, `--backend auto`'s size floor in the help, an empty
`convert --tokenizer` folder, and `export --to npy` on a full disk."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from fixtures import run
from test_index import clustered, make_store, unit
from test_segment_search import FakeView, make_segment_store, windows_of


def fixed_query(monkeypatch, vector: np.ndarray) -> None:
    """`search --text` answers with `vector` as the query (no model needed)."""
    monkeypatch.setattr("mlx_clap.cli.search.query_vector", lambda *a, **k: (vector, "q"))


def f16_overshoot(n: int = 200, dim: int = 64) -> np.ndarray:
    """A unit vector whose float16 copy has a norm above 1 (its self-cosine comes out > 1.00002)."""
    v = unit(np.random.default_rng(0).standard_normal((n, dim)))
    h = v.astype(np.float16).astype(np.float32)
    return v[int(np.argmax(np.einsum("ij,ij->i", h, h)))]


# -------------------------------------------------------------------------------------- percentiles
def test_best_hit_is_100_percent_on_flat_and_ann(tmp_path, monkeypatch):
    """The flat scan scores in MLX, the calibration sample with BLAS: the best item's two cosines differ
    by ~1e-7, which put it below its own copy in the sample (99.64 % of 278) on flat only."""
    vecs = clustered(278, 512, 10, 0.7, seed=0)
    store = make_store(tmp_path / "s", vecs)
    assert run(["index", store.path]).exit_code == 0
    rng = np.random.default_rng(1)
    for i in range(12):
        q = unit(vecs[i : i + 1] + 0.3 / np.sqrt(512) * rng.standard_normal((1, 512)))[0]
        fixed_query(monkeypatch, q)
        docs = {}
        for backend in ("flat", "ann"):
            r = run(["search", store.path, "--text", "x", "-k", "5", "--backend", backend, "--json"])
            assert r.exit_code == 0, r.output
            docs[backend] = json.loads(r.stdout)
            assert docs[backend]["backend"] == backend
            assert docs[backend]["results"][0]["percentile"] == 100.0, (i, backend, docs[backend])
        # ANN is approximate: it may miss a lower hit, so the two
        # backends are compared on the rows both returned: one score and one percentile definition.
        flat = {h["row"]: h for h in docs["flat"]["results"]}
        ann = {h["row"]: h for h in docs["ann"]["results"]}
        assert docs["flat"]["results"][0]["row"] == docs["ann"]["results"][0]["row"]
        both = sorted(set(flat) & set(ann))
        assert len(both) >= 3, (flat, ann)
        assert [flat[r]["percentile"] for r in both] == [ann[r]["percentile"] for r in both]
        scores = [flat[r]["score"] for r in both], [ann[r]["score"] for r in both]
        np.testing.assert_allclose(*scores, atol=1e-6)


def test_percentile_counts_scores_within_rounding_as_equal():
    from mlx_clap.search.calibration import SCORE_TOL, Calibration

    sample = np.random.default_rng(0).normal(0.2, 0.05, 1000)
    cal = Calibration.fit(sample)
    top = float(sample.max())
    assert cal.percentile(top - 0.5 * SCORE_TOL) == 100.0  # the best item, computed by other code
    assert cal.percentile(top - 3 * SCORE_TOL) == pytest.approx(99.9)
    # The inverse still keeps exactly the scores whose percentile reaches p.
    probe = np.concatenate([sample, sample - 0.5 * SCORE_TOL, sample + 0.5 * SCORE_TOL])
    for p in (0.1, 50.0, 99.9, 100.0):
        np.testing.assert_array_equal(cal.percentile(probe) >= p, probe >= cal.score_for_percentile(p))


# ---------------------------------------------------------------------------------- clipped scores
def test_reported_cosines_never_exceed_one(tmp_path):
    """A float16 copy of a unit vector can have norm 1.00004: its cosine with an identical row then
    came out as 1.00004 in search and dedupe."""
    v = f16_overshoot()
    others = unit(np.random.default_rng(2).standard_normal((6, v.size)))
    store = make_store(tmp_path / "s", np.vstack([v, v, others]), dtype="float16")
    assert float(np.dot(store.matrix(np.float32)[0], store.matrix(np.float32)[1])) > 1.00002
    r = run(["search", store.path, "--like", "clips/000000.wav", "-k", "2", "--json"])
    assert r.exit_code == 0, r.output
    best = json.loads(r.stdout)["results"][0]
    assert best["row"] == 1 and best["score"] == 1.0
    r = run(["search", store.path, "--like", "clips/000000.wav", "-k", "1"])
    assert r.exit_code == 0 and " 1.0000 " in r.stdout
    r = run(["dedupe", store.path, "--json"])
    (group,) = json.loads(r.stdout)["groups"]
    assert group["rows"] == [0, 1] and group["score"] == 1.0 and group["min_score"] == 1.0
    r = run(["dedupe", store.path])
    assert "mean cosine 1.0000 (weakest link 1.0000)" in r.stdout


def test_segment_timeline_and_recurring_scores_are_clipped():
    from mlx_clap.search.recurring import Group, Occurrence
    from mlx_clap.search.segments import Segment, TimelineRow, format_timeline

    seg = Segment(0, 0.0, 2.0, 1.00004, 5.0, 100.0, 1, 0.0)
    assert seg.to_dict()["score"] == 1.0
    rows = [TimelineRow(0.0, 2.0, 1.00004, 5.0), TimelineRow(2.0, 4.0, -1.00003, -5.0)]
    doc = json.loads(format_timeline(rows, "json"))
    assert [w["score"] for w in doc["windows"]] == [1.0, -1.0]
    csv_scores = [line.split(",")[2] for line in format_timeline(rows, "csv").splitlines()[1:]]
    assert csv_scores == ["1.000000", "-1.000000"]
    (label,) = format_timeline(rows, "audacity", min_z=2.0, label="x").splitlines()
    assert label.endswith("x 1.000")
    group = Group([Occurrence(0, 0.0, 2.0, 1)], 1.00004, 1.00006, 1).to_dict()
    assert group["score"] == 1.0 and group["max_score"] == 1.0


# ---------------------------------------------------------------------------------- segment search
@pytest.fixture()
def flat_scores_store(tmp_path):
    """Windows alternating between two orthogonal vectors: a query on one scores 1 or 0, so every
    window sits at z = +-1 and nothing reaches the default z >= 2."""
    dim = 16
    a, b = np.eye(dim, dtype=np.float32)[0], np.eye(dim, dtype=np.float32)[1]
    fi, st, en = windows_of([10, 10], 1.0, 2.0)  # 1-s windows 2 s apart: kept ones never touch
    vecs = np.stack([a if i % 2 else b for i in range(len(st))])
    return make_segment_store(tmp_path / "seg", FakeView(fi, st, en, vecs)), a


def test_segment_search_reports_backend_calibration_and_best_z(flat_scores_store, monkeypatch):
    store, a = flat_scores_store
    fixed_query(monkeypatch, a)
    r = run(["search", store.path, "--text", "x", "--segments", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["backend"] == "flat" and doc["results"] == [] and doc["k"] == 0
    assert doc["calibration"] == {"mean": 0.5, "std": 0.5, "sample": 20}
    (msg,) = doc["notes"]
    assert "no segment reached z >= 2 (the default" in msg and "best window has z 1.00" in msg
    r = run(["search", store.path, "--text", "x", "--segments"])
    assert r.exit_code == 0 and r.stdout == ""
    assert "best window has z 1.00" in r.stderr and "backend: flat" in r.stderr
    # A threshold it passes: hits, no note, the same fields.
    r = run(["search", store.path, "--text", "x", "--segments", "--min-z", "0.5", "--gap", "0", "--json"])
    doc = json.loads(r.stdout)
    assert doc["backend"] == "flat" and doc["notes"] == [] and doc["k"] == 10
    assert all(h["score"] == 1.0 and h["percentile"] == 100.0 for h in doc["results"])


def test_segment_search_ann_without_an_index_is_refused_and_auto_is_exact(flat_scores_store, monkeypatch):
    store, a = flat_scores_store
    fixed_query(monkeypatch, a)
    r = run(["search", store.path, "--text", "x", "--segments", "--backend", "ann"])
    assert r.exit_code == 1
    assert "--backend ann: the store has no ANN index" in r.output and store.path.name in r.output
    assert "mlx-clap index" in r.output
    r = run(
        ["search", store.path, "--text", "x", "--segments", "--backend", "auto", "--min-z", "0", "--json"]
    )
    assert r.exit_code == 0 and json.loads(r.stdout)["backend"] == "flat"


def test_auto_backend_help_says_when_it_uses_the_index():
    r = run(["search", "--help"])
    text = " ".join(r.output.split())
    assert r.exit_code == 0 and "auto: the index when the store has one, else flat" in text


# ---------------------------------------------------------------------------------------- convert
def test_convert_tokenizer_folder_without_tokenizer_files_is_an_error(tiny_hub, tmp_path):
    empty = tmp_path / "tok"
    empty.mkdir()
    (empty / "README.md").write_text("not a tokenizer\n")
    r = run(["convert", tiny_hub, tmp_path / "out", "--tokenizer", empty])
    assert r.exit_code == 1
    assert f"{empty}: no tokenizer files (expected tokenizer.json, or vocab.json + merges.txt)" in r.output
    assert not (tmp_path / "out").exists()


def test_laion_tokenizer_folder_needs_merges_too(tmp_path):
    from mlx_clap.convert.laion_pt import convert_laion_pt
    from mlx_clap.io.folder import WeightsError

    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "vocab.json").write_text("{}")  # merges.txt missing: the folder would have been ignored
    (tmp_path / "x.pt").write_bytes(b"not read")
    with pytest.raises(WeightsError, match="tok: no tokenizer files"):
        convert_laion_pt(tmp_path / "x.pt", tmp_path / "out", tokenizer_dir=tok)


@pytest.fixture(scope="module")
def tiny_hub(tmp_path_factory) -> Path:
    """A tiny Hugging Face CLAP folder (config.json + model.safetensors) without tokenizer files."""
    pytest.importorskip("torch")
    from fixtures import TINY_AUDIO, TINY_TEXT
    from reference_models import random_hf_clap, save_hub_folder

    return save_hub_folder(
        random_hf_clap(audio=TINY_AUDIO, text=TINY_TEXT, seed=5), tmp_path_factory.mktemp("hub") / "hub"
    )


# ----------------------------------------------------------------------------------------- export
def _full_disk_export(tmp_path) -> tuple[object, Path]:
    store = make_store(tmp_path / "store", unit(np.random.default_rng(0).standard_normal((50, 32))))
    parent = tmp_path / "exports"
    parent.mkdir()
    return run(["export", store.path, parent / "out", "--to", "npy", "-q"]), parent


def test_npy_export_on_a_full_disk_is_one_clear_error(tmp_path, monkeypatch):
    """A memory map written past the free space died of SIGBUS (exit 135, no message) and left its
    staging; the space is now reserved first, and a write error is an OSError."""

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_space, raising=False)
    r, parent = _full_disk_export(tmp_path)
    assert r.exit_code == 1, r.output
    assert f"{parent / 'out'}: cannot write the export: no space left on the device" in r.output
    assert list(parent.iterdir()) == []  # no staging left behind


def test_npy_export_without_fallocate_checks_free_space(tmp_path, monkeypatch):
    monkeypatch.delattr(os, "posix_fallocate", raising=False)  # as on macOS
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=100))
    r, parent = _full_disk_export(tmp_path)
    assert r.exit_code == 1 and "no space left on the device" in r.output
    assert list(parent.iterdir()) == []
    monkeypatch.undo()
    r, parent = _full_disk_export(tmp_path / "again")
    assert r.exit_code == 0, r.output
    got = np.load(parent / "out" / "vectors.npy")
    want = unit(np.random.default_rng(0).standard_normal((50, 32)))
    np.testing.assert_array_equal(got, want)
