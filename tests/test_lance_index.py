"""The store's own Lance vector index (mlx_clap.search.lance_index, `mlx-clap index`): the same answers as
exact search on a clustered store, appended rows found, deleted rows never returned, path filters applied
before the top k, segment search through it, and a `kill -9` during a build."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO_ROOT
from fixtures import add_rows, default_sigint, run
from test_index import clustered, make_store
from test_segment_search import FakeView, make_segment_store, unit, windows_of

from mlx_clap.search import lance_index
from mlx_clap.search.index import FlatIndex, SearchError, path_mask
from mlx_clap.search.lance_index import LanceIndex, build_index, coverage, open_index
from mlx_clap.store import Store

TIE = 1e-6


def index_store(path) -> Store:
    """Build the index of the store at `path` (as `mlx-clap index` does); its new snapshot."""
    with Store.open(path, write=True) as w:
        return build_index(w).store


def assert_same_as_exact(got, want, k: int) -> None:
    """Each query's hits are an exact top k: every row scores at least the exact k-th best (ties within
    1e-6 count), and a row both backends return has the same score in both."""
    for i in range(got.rows.shape[0]):
        kth = want.scores[i, k - 1]
        assert np.all(got.scores[i] >= kth - TIE), (i, got.scores[i], want.scores[i])
        exact = dict(zip(want.rows[i].tolist(), want.scores[i].tolist(), strict=True))
        for r, s in zip(got.rows[i].tolist(), got.scores[i].tolist(), strict=True):
            if r in exact:
                assert abs(exact[r] - s) <= TIE, (i, r, s, exact[r])
        assert len(set(got.rows[i].tolist())) == k


def queries_near(vecs: np.ndarray, n: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = vecs[rng.integers(0, len(vecs), n)]
    return unit(base + noise / np.sqrt(vecs.shape[1]) * rng.standard_normal(base.shape))


def test_index_answers_as_exact_search_on_a_clustered_store(tmp_path):
    # 128-d: RaBitQ's estimate (the candidates the refine step rescores) is coarse in very few dimensions
    # (at 32-d, 2 of 40 builds missed one row of 400); CLAP vectors have 512 or 1024.
    vecs = clustered(4000, 128, centers=40, within=0.6, seed=3)
    make_store(tmp_path / "s", vecs, dtype="float16")
    store = index_store(tmp_path / "s")
    ann = open_index(store, "auto")
    assert isinstance(ann, LanceIndex) and ann.notes == ["ANN: Lance IVF_RQ index over 4,000 of 4,000 rows"]
    q = np.concatenate([queries_near(vecs, 20, 0.3, 1), queries_near(vecs, 20, 1.5, 2)])
    got, want = ann.search(q, k=10), FlatIndex(store).search(q, k=10)
    assert_same_as_exact(got, want, 10)
    # --like: the query's own row left out, before the top k is taken.
    own = ann.search(vecs[7], k=5, exclude=[7])
    assert 7 not in own.rows[0] and len(own.rows[0]) == 5
    assert_same_as_exact(own, FlatIndex(store).search(vecs[7], k=5, exclude=[7]), 5)


def test_rows_appended_after_the_index_are_found_and_deleted_rows_never_return(tmp_path):
    vecs = clustered(3000, 128, centers=30, within=0.6, seed=4)
    names = [f"/a/{i:05d}.wav" for i in range(3000)]
    make_store(tmp_path / "s", vecs[:2500], names=names[:2500])
    index_store(tmp_path / "s")
    add_rows(tmp_path / "s", [{"path": p, "size": 1, "mtime": 0.0} for p in names[2500:]], vecs[2500:])
    with Store.open(tmp_path / "s", write=True) as w:
        w.remove(names[:10])  # rows the index holds
    store = Store.open(tmp_path / "s")
    ann = LanceIndex(store)
    assert ann.coverage.indexed == 2490 and ann.coverage.total == 2990
    assert "2,490 of 2,990 rows; 500 appended rows searched exactly and merged" in ann.notes[0]
    for i in (2500, 2777, 2999):  # appended rows: found by their own vector
        res = ann.search(vecs[i], k=3)
        assert store.items[int(res.rows[0, 0])]["path"] == names[i] and res.scores[0, 0] > 0.999
    for i in range(10):  # deleted rows: never returned, even for their own vector
        res = ann.search(vecs[i], k=20)
        assert names[i] not in {store.items[int(r)]["path"] for r in res.rows[0]}
    q = queries_near(vecs, 20, 0.5, 5)
    assert_same_as_exact(ann.search(q, k=10), FlatIndex(store).search(q, k=10), 10)
    # `index` again adds the appended rows; a third run has nothing to do.
    with Store.open(tmp_path / "s", write=True) as w:
        report = build_index(w)
    assert report.action == "updated" and report.coverage.indexed == report.coverage.total == 2990
    (desc,) = report.store.dataset.describe_indices()
    assert len(desc.segments) == 1  # merged into the index, not a delta beside it (2 indexes per query)
    with Store.open(tmp_path / "s", write=True) as w:
        assert build_index(w).action == "none"
        w.compact()  # drops the deleted rows and rewrites fragments: Lance remaps the index
    store = Store.open(tmp_path / "s")
    assert coverage(store).indexed == coverage(store).total == 2990
    assert_same_as_exact(LanceIndex(store).search(q, k=10), FlatIndex(store).search(q, k=10), 10)


def test_path_filters_apply_before_the_top_k(tmp_path, monkeypatch):
    vecs = clustered(3000, 128, centers=30, within=0.6, seed=6)
    names = [f"/{'dogs' if i % 3 == 0 else 'rain'}/{i}.{'mp3' if i % 2 else 'wav'}" for i in range(3000)]
    make_store(tmp_path / "s", vecs, names=names)
    store = index_store(tmp_path / "s")
    ann = LanceIndex(store)
    q = queries_near(vecs, 10, 0.5, 7)
    for mask in (path_mask(store.items, contains=["dogs/"]), path_mask(store.items, globs=["*.wav"])):
        want = FlatIndex(store).search(q, k=10, mask=mask)
        exact_subset = ann.search(q, k=10, mask=mask)  # few rows kept: scored exactly
        assert any("scored exactly" in n for n in exact_subset.notes)
        np.testing.assert_array_equal(exact_subset.rows, want.rows)
        monkeypatch.setattr(lance_index, "EXACT_SUBSET_ROWS", 10)  # now through the index's prefilter
        got = ann.search(q, k=10, mask=mask)
        monkeypatch.undo()
        assert not any("scored exactly" in n for n in got.notes)
        assert mask[got.rows].all()  # every hit passes the filter, and there are k of them
        assert_same_as_exact(got, want, 10)


def test_a_filter_the_probed_partitions_miss_widens_the_search(tmp_path, monkeypatch):
    """Partitions are probed in a fixed number (Lance left to itself probed 144 of 244 at 1M rows for a
    prefiltered query); when they hold fewer than k of the rows a filter keeps, more are probed. Two
    clusters far apart make two partitions; the filter keeps rows of the one the query is not near."""
    rng = np.random.default_rng(12)
    axis = np.zeros(128, dtype=np.float32)
    axis[0] = 30.0  # cosine ~0.9 inside a cluster, ~-0.9 across
    vecs = unit(
        rng.standard_normal((3000, 128)).astype(np.float32)
        + np.where(np.arange(3000) < 1500, 1, -1)[:, None] * axis
    )
    make_store(tmp_path / "s", vecs)
    Store.open(tmp_path / "s").dataset.create_index("vector", "IVF_RQ", metric="dot", num_partitions=2)
    store = Store.open(tmp_path / "s")
    mask = np.arange(3000) >= 2900  # rows of the far cluster only
    monkeypatch.setattr(lance_index, "EXACT_SUBSET_ROWS", 10)  # through the index, not exactly
    calls = []
    scanner = type(store.dataset).scanner
    monkeypatch.setattr(
        type(store.dataset), "scanner", lambda ds, **kw: calls.append(kw["nearest"]) or scanner(ds, **kw)
    )
    q = vecs[0]
    got = LanceIndex(store, nprobes=1).search(q, k=10, mask=mask)
    assert [c["maximum_nprobes"] for c in calls] == [1, 4]  # widened after the first answer fell short
    assert mask[got.rows[0]].all()
    assert_same_as_exact(got, FlatIndex(store).search(q, k=10, mask=mask), 10)


def test_backends_without_an_index_and_a_tiny_index(tmp_path):
    vecs = clustered(300, 16, centers=10, within=0.6, seed=8)
    make_store(tmp_path / "s", vecs)
    store = Store.open(tmp_path / "s")
    assert coverage(store) is None and isinstance(open_index(store, "auto"), FlatIndex)
    with pytest.raises(SearchError, match="no ANN index.*mlx-clap index"):
        open_index(store, "ann")
    # A store of a few rows indexes too (one partition), and answers as exact search does.
    make_store(tmp_path / "tiny", vecs[:5])
    tiny = index_store(tmp_path / "tiny")
    assert_same_as_exact(LanceIndex(tiny).search(vecs[:3], k=5), FlatIndex(tiny).search(vecs[:3], k=5), 5)


# ------------------------------------------------------------------------------------------------- CLI
def test_index_command_search_says_which_backend_and_coverage(tmp_path, monkeypatch):
    vecs = clustered(1200, 16, centers=20, within=0.7, seed=1)
    names = [f"/v/{i:04d}.wav" for i in range(1200)]
    make_store(tmp_path / "s", vecs[:1000], names=names[:1000])
    s = tmp_path / "s"
    base = ["search", s, "--like", "/v/0003.wav", "-k", "5"]
    r = run([*base, "--backend", "ann"])
    assert r.exit_code == 1 and "no ANN index" in r.output and "mlx-clap index" in r.output
    assert json.loads(run([*base, "--json"]).stdout)["backend"] == "flat"  # auto without an index
    r = run(["index", s, "-q"])
    assert r.exit_code == 0 and "index built" in r.stderr and "covers 1,000 of 1,000" in r.stderr, r.output
    r = run(["index", s])
    assert r.exit_code == 0 and "nothing to do" in r.stderr
    doc = json.loads(run([*base, "--json"]).stdout)
    assert doc["backend"] == "ann" and doc["notes"] == ["ANN: Lance IVF_RQ index over 1,000 of 1,000 rows"]
    flat = json.loads(run([*base, "--backend", "flat", "--json"]).stdout)
    # The JSON rounds scores to 6 decimals: equal scores within 1e-6 may print 1e-6 apart.
    printed = pytest.approx([h["score"] for h in flat["results"]], abs=TIE + 1e-6)
    assert [h["score"] for h in doc["results"]] == printed
    r = run(base)
    assert r.exit_code == 0 and "note: backend: ann" in r.stderr and "IVF_RQ index over 1,000" in r.stderr
    add_rows(s, [{"path": p, "size": 1, "mtime": 0.0} for p in names[1000:]], vecs[1000:])
    doc = json.loads(run(["search", s, "--like", "/v/1100.wav", "-k", "3", "--json"]).stdout)
    assert doc["backend"] == "ann" and "200 appended rows searched exactly and merged" in doc["notes"][0]
    r = run(["index", s, "-q"])
    assert r.exit_code == 0 and "updated" in r.stderr and "covers 1,200 of 1,200" in r.stderr
    r = run(["index", s, "-q", "--rebuild"])
    assert r.exit_code == 0 and "index built" in r.stderr and "covers 1,200 of 1,200" in r.stderr
    assert run(["check", s]).exit_code == 0  # the index files are the store's own


def test_index_serves_search_segments(tmp_path):
    """An index over a store with segments: `search --segments` through it gives the segments an exact
    search gives (the planted stretches, their extent and best window), and says so."""
    rng = np.random.default_rng(0)
    fi, st, en = windows_of([60] * 40, 2.0, 1.0)
    vecs = unit(rng.standard_normal((len(st), 32)))
    pattern = unit(rng.standard_normal(32))
    for f, first in ((3, 20), (17, 5), (30, 40)):
        where = np.flatnonzero(fi == f)[first : first + 5]
        vecs[where] = unit(pattern + 0.1 * rng.standard_normal((5, 32)))
    make_segment_store(tmp_path / "s", FakeView(fi, st, en, vecs))
    s = tmp_path / "s"
    assert run(["index", s, "-q"]).exit_code == 0
    store = Store.open(s)
    assert coverage(store, "segment").indexed == len(st) == coverage(store, "segment").total
    monkey = pytest.MonkeyPatch()
    monkey.setattr("mlx_clap.cli.search.query_vector", lambda *a, **k: (pattern, "q"))
    try:
        docs = {}
        for backend in ("flat", "ann"):
            args = ["search", s, "--text", "x", "--segments", "--min-score", "0.8", "--backend", backend]
            r = run([*args, "--json"])
            assert r.exit_code == 0, r.output
            docs[backend] = json.loads(r.stdout)
        r = run(["search", s, "--text", "x", "--segments", "--min-score", "0.8"])
        assert "note: backend: ann" in r.stderr and "IVF_RQ index over 2,400 of 2,400 windows" in r.stderr
    finally:
        monkey.undo()
    assert docs["ann"]["backend"] == "ann" and docs["flat"]["backend"] == "flat"

    def spans(doc):
        return [(h["path"], h["start"], h["end"], h["best_start"], h["windows"]) for h in doc["results"]]

    assert len(spans(docs["flat"])) == 3 and spans(docs["ann"]) == spans(docs["flat"])
    ann_z = {(h["path"], h["best_start"]): h["z"] for h in docs["ann"]["results"]}
    # `timeline` on an indexed store bigger than a calibration sample: calibrated on the sample the index
    # search used (so the same z for the same window), and says so.
    monkey.setattr("mlx_clap.search.calibration.DEFAULT_SAMPLE", 1000)
    monkey.setattr("mlx_clap.cli.segments.query_vector", lambda *a, **k: (pattern, "q"))
    monkey.setattr("mlx_clap.cli.search.query_vector", lambda *a, **k: (pattern, "q"))
    try:
        r = run(["timeline", "/audio/file_3.wav", "--store", s, "--audio", "q.wav", "--json"])
        assert r.exit_code == 0, r.output
        assert "z calibrated on a sample of 1,000 windows, as index searches do" in r.stderr
        windows = json.loads(r.stdout)["windows"]
        args = ["search", s, "--text", "x", "--segments", "--min-score", "0.8", "--json"]
        sampled = json.loads(run(args).stdout)
    finally:
        monkey.undo()
    assert "calibrated on a sample of 1,000 windows" in " ".join(sampled["notes"])
    best = next(h for h in sampled["results"] if h["path"] == "/audio/file_3.wav")
    (w,) = [w for w in windows if w["start"] == best["best_start"]]
    assert abs(w["z"] - best["z"]) < 1e-3  # rounded to 4 and 3 decimals
    assert ann_z[(best["path"], best["best_start"])] != best["z"]  # the sample did change the calibration

    # Many windows over the threshold and few candidates per round: the index is asked again, wider,
    # until the k best segments are settled; the same segments as the exact search.
    from mlx_clap.search.segments import segment_search

    monkey.setattr(lance_index, "MIN_SEGMENT_CANDIDATES", 4)
    monkey.setattr(lance_index, "SEGMENT_CANDIDATES", 1)
    try:
        view = store.segment_view()
        got, _ = lance_index.ann_segment_search(store, view, pattern, k=12, threshold=0.05, gap=1.0)
        (want,) = segment_search(view, pattern, k=12, threshold=0.05, gap=1.0)
    finally:
        monkey.undo()
    assert len(want.segments) == 12 and want.passed > 100
    assert [(g.file_index, g.start, g.end, g.windows) for g in got.segments] == [
        (g.file_index, g.start, g.end, g.windows) for g in want.segments
    ]
    np.testing.assert_allclose(  # JSON scores: 6 decimals
        [h["score"] for h in docs["ann"]["results"]],
        [h["score"] for h in docs["flat"]["results"]],
        atol=2 * TIE,
    )


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_a_build_stopped_midway_leaves_a_readable_store_and_the_command_finishes(tmp_path, sig):
    """Stopped when Lance writes the index files (the end of the build, just before its commit; the
    training before it writes nothing): the store keeps its last version, with the index whole or not at
    all, every command reads it, and the same command then finishes."""
    vecs = clustered(30_000, 128, centers=300, within=0.6, seed=9)
    names = [f"/k/{i:06d}.wav" for i in range(len(vecs))]
    make_store(tmp_path / "s", vecs, dtype="float16", names=names)
    s = tmp_path / "s"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MLX_CLAP_CPU_THREADS": "2"}
    cmd = [sys.executable, "-m", "mlx_clap.cli", "index", str(s), "-q"]
    p = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        preexec_fn=default_sigint,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None:
        if any((s / "_indices").glob("*/*")):
            break
        time.sleep(0.005)
    running = p.poll() is None
    p.send_signal(sig)
    _, stderr = p.communicate(timeout=60)
    assert running, "the build finished before it could be stopped: make the store bigger"
    if sig == signal.SIGINT and p.returncode != 0:  # 0: the commit went in before the signal came
        assert p.returncode == 130 and b"Traceback" not in stderr, stderr
        assert b"interrupted:" in stderr and b"run the same command again" in stderr, stderr
    store = Store.open(s)  # every command reads it
    cov = coverage(store)
    assert len(store) == len(vecs) and (cov is None or cov.indexed == cov.total == len(vecs))
    r = run(["search", s, "--like", names[5], "-k", "3", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["backend"] == ("flat" if cov is None else "ann")
    assert run(["check", s]).exit_code == 0
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and ("index built" in r.stderr or "nothing to do" in r.stderr), r.stderr
    doc = json.loads(run(["search", s, "--like", names[5], "-k", "3", "--json"]).stdout)
    assert doc["backend"] == "ann" and "30,000 of 30,000" in doc["notes"][0]


# ----------------------------------------------------------------------------------------------- serve
def test_serve_searches_through_the_index_and_says_so(tmp_path, monkeypatch):
    """`serve`'s Library on an indexed store answers as it does exactly (files, and segments with their
    stretches and timelines), leaves out the "more like this" file, and says the index answered."""
    import mlx_clap.serve.engine as engine

    rng = np.random.default_rng(1)
    fi, st, en = windows_of([30] * 60, 2.0, 1.0)
    vecs = unit(rng.standard_normal((len(st), 64)))
    pattern = unit(rng.standard_normal(64))
    for f, first in ((3, 10), (17, 5), (44, 20), (50, 0)):
        where = np.flatnonzero(fi == f)[first : first + 4]
        vecs[where] = unit(pattern + 0.15 * rng.standard_normal((4, 64)))
    make_segment_store(tmp_path / "seg", FakeView(fi, st, en, vecs))
    files = clustered(2000, 64, centers=20, within=0.6, seed=2)
    make_store(tmp_path / "files", files)
    for name, q in (("seg", pattern), ("files", files[11])):
        exact = engine.Library(Store.open(tmp_path / name), None)
        indexed = engine.Library(index_store(tmp_path / name), None)
        searched = indexed.segments if name == "seg" else indexed.files
        assert isinstance(searched, lance_index.AnnSearch)
        for exclude in (None, 3 if name == "seg" else 11):
            a, b = exact.search(q, 4, exclude_row=exclude), indexed.search(q, 4, exclude_row=exclude)
            assert b["notes"][0].startswith("ANN: Lance IVF_RQ index over ") and not a["notes"]
            keys = ("row", "segment", "start", "end", "windows") if name == "seg" else ("row",)
            assert [[x.get(k) for k in keys] for x in b["results"]] == [
                [x.get(k) for k in keys] for x in a["results"]
            ]
            # The page's scores are rounded to 4 decimals and z to 2 (z: both calibrated on one sample).
            for field, tol in (("score", 1e-4), ("z", 0.01)):
                got, want = [x[field] for x in b["results"]], [x[field] for x in a["results"]]
                assert got == pytest.approx(want, abs=tol)
            if exclude is not None:
                assert exclude not in [x["row"] for x in b["results"]]
            if name == "seg":
                for x, y in zip(a["results"], b["results"], strict=True):
                    np.testing.assert_allclose(y["timeline"]["score"], x["timeline"]["score"], atol=TIE)
