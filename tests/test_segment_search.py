"""Segment search, calibration and timelines (mlx_clap.search.segments / calibration) and the `timeline`
command: merging rules, threshold modes against their definitions, calibration inverses and degenerate
samples, a planted pattern found, timeline formats parsed back, the same answers from a real store."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fixtures import create_store

from mlx_clap.search.calibration import Calibration, calibrate_query, sample_rows
from mlx_clap.search.index import SearchError
from mlx_clap.search.segments import (
    format_timeline,
    run_ids,
    score_windows,
    search_segments,
    timeline,
    timeline_segments,
    window_geometry,
)
from mlx_clap.store import Store


# ------------------------------------------------------------------------------------------ helpers
def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


class FakeView:
    """A SegmentView as the store's contract describes it, over in-memory arrays (blocks as float16
    copies, as a float16 store would give them)."""

    def __init__(self, file_index, start, end, vectors, dtype=np.float32):
        self.file_index = np.asarray(file_index, dtype=np.int64)
        self.start = np.asarray(start, dtype=np.float64)
        self.end = np.asarray(end, dtype=np.float64)
        self.vectors = np.asarray(vectors).astype(dtype)
        self.dim = self.vectors.shape[1]

    def __len__(self) -> int:
        return len(self.start)

    def iter_blocks(self, block_rows: int = 65536):
        for first in range(0, len(self), block_rows):
            yield first, self.vectors[first : first + block_rows]

    def take(self, idx):
        return self.vectors[np.asarray(idx, dtype=np.int64)].astype(np.float32)

    def matrix(self):
        return self.vectors.astype(np.float32)


def windows_of(lengths: list[int], window: float, hop: float):
    """file_index, start, end for files of `lengths` windows each."""
    fi = np.concatenate([np.full(n, f) for f, n in enumerate(lengths)])
    st = np.concatenate([np.arange(n) * hop for n in lengths])
    return fi, st, st + window


def planted_view(seed: int = 0, dim: int = 64, dtype=np.float32):
    """5 files of 60 windows (window 2 s, hop 1 s) of random vectors; file 3, windows 20-24 hold a
    pattern (cosine ~0.95 to it). Returns (view, pattern)."""
    rng = np.random.default_rng(seed)
    fi, st, en = windows_of([60] * 5, 2.0, 1.0)
    vecs = unit(rng.standard_normal((len(st), dim)))
    pattern = unit(rng.standard_normal(dim))
    where = np.flatnonzero(fi == 3)[20:25]
    vecs[where] = unit(pattern + 0.03 * rng.standard_normal((5, dim)))
    return FakeView(fi, st, en, vecs, dtype), pattern


def make_segment_store(path: Path, view: FakeView, manifest: dict | None = None, dtype: str = "float32"):
    """A real store with segments holding `view`'s windows (file vectors: the mean of their windows)."""
    window, hop = window_geometry(view)
    store = create_store(
        path, manifest or {"model": {"id": "test/random"}}, view.dim, dtype=dtype, shard_size=64,
        segments={"hop": hop, "window": window},
    )  # fmt: skip
    items, files, segs = [], [], []
    for f in np.unique(view.file_index):
        sel = np.flatnonzero(view.file_index == f)
        v = view.take(sel)
        items.append(
            {"path": f"/audio/file_{f}.wav", "size": 1, "mtime": 0.0, "duration": float(view.end[sel[-1]])}
        )
        files.append(unit(v.mean(axis=0)))
        segs.append((view.start[sel], view.end[sel], v))
    store.write(items, np.stack(files), segments=segs)
    return Store.open(path)


# ---------------------------------------------------------------------------------------- merging
def test_run_ids_merge_overlap_and_gap_never_across_files():
    # file 0: [0,2] [1,3] overlap; [4,6] starts 1 s after 3; [9,11] 3 s after 6. file 1: [6,8] would
    # touch file 0's [4,6] but is another file.
    fi = np.array([0, 0, 0, 0, 1])
    st = np.array([0.0, 1.0, 4.0, 9.0, 6.0])
    en = st + 2.0
    assert run_ids(fi, st, en, gap=0.0).tolist() == [0, 0, 1, 2, 3]
    assert run_ids(fi, st, en, gap=1.0).tolist() == [0, 0, 0, 1, 2]
    assert run_ids(fi, st, en, gap=3.0).tolist() == [0, 0, 0, 0, 1]
    # Touching windows (end == next start) join with no gap; a window inside a long one keeps the run.
    assert run_ids(np.zeros(3), np.array([0.0, 2.0, 2.5]), np.array([10.0, 3.0, 11.0]), 0.0).tolist() == [
        0,
        0,
        0,
    ]
    assert run_ids(np.zeros(0), np.zeros(0), np.zeros(0), 0.0).size == 0


def test_search_merges_adjacent_windows_and_drops_short_ones():
    # One file, window 2 s, hop 1 s; the query matches windows 3-5 (one run) and 9 (alone) and 12-13.
    dim = 8
    fi, st, en = windows_of([20], 2.0, 1.0)
    q = unit(np.eye(dim)[0])
    vecs = unit(np.eye(dim)[1] + 0.0 * np.arange(20)[:, None])
    for w in (3, 4, 5, 9, 12, 13):
        vecs[w] = q
    view = FakeView(fi, st, en, vecs)
    segs = search_segments(view, q, threshold=0.99, gap=0.0)[0]
    assert [(s.start, s.end, s.windows) for s in segs] == [(3.0, 7.0, 3), (9.0, 11.0, 1), (12.0, 15.0, 2)]
    assert all(s.score == pytest.approx(1.0) and s.best_start == s.start for s in segs)
    # gap 1 s: window 9 ends at 11, window 12 starts at 12 -> joined; 5's end 7 to 9 is 2 s -> not.
    segs = search_segments(view, q, threshold=0.99, gap=1.0)[0]
    assert [(s.start, s.end, s.windows) for s in segs] == [(3.0, 7.0, 3), (9.0, 15.0, 3)]
    # The default gap is the hop (1 s), as seen in the windows' times.
    assert [(s.start, s.end) for s in search_segments(view, q, threshold=0.99)[0]] == [
        (3.0, 7.0),
        (9.0, 15.0),
    ]
    segs = search_segments(view, q, threshold=0.99, gap=0.0, min_length=3.0)[0]
    assert [(s.start, s.end) for s in segs] == [(3.0, 7.0), (12.0, 15.0)]
    assert len(search_segments(view, q, threshold=0.99, gap=0.0, k=1)[0]) == 1


@pytest.mark.parametrize(
    "mode",
    [{"threshold": 0.3}, {"min_z": 1.5}, {"min_percentile": 90.0}, {}],
    ids=["cos", "z", "pct", "default"],
)
def test_threshold_modes_keep_what_their_definition_says(mode):
    # Non-overlapping windows (window 1, hop 2) and gap 0: every kept window is its own segment.
    rng = np.random.default_rng(3)
    fi, st, en = windows_of([50, 50, 50], 1.0, 2.0)
    view = FakeView(fi, st, en, unit(rng.standard_normal((150, 16))))
    q = unit(rng.standard_normal(16))
    scores = view.matrix() @ q
    cal = Calibration.fit(scores)
    if "threshold" in mode:
        want = scores >= mode["threshold"]
    elif "min_percentile" in mode:
        want = cal.percentile(scores) >= mode["min_percentile"]
    else:
        want = cal.z(scores) >= mode.get("min_z", 2.0)
    assert 0 < want.sum() < 150
    segs = search_segments(view, q, k=None, gap=0.0, **mode)[0]
    got = {(s.file_index, s.start) for s in segs}
    assert got == {(int(fi[i]), float(st[i])) for i in np.flatnonzero(want)}
    assert [s.score for s in segs] == sorted((s.score for s in segs), reverse=True)
    for s in segs:
        assert s.z == pytest.approx(cal.z(s.score), abs=1e-5)
        assert s.percentile == pytest.approx(cal.percentile(s.score))


def test_bad_options_are_errors():
    view, pattern = planted_view()
    for kwargs in ({"threshold": 0.5, "min_z": 2.0}, {"threshold": 1.5}, {"min_percentile": 101.0}, {"k": 0},
                   {"gap": -1.0}, {"min_length": -1.0}):  # fmt: skip
        with pytest.raises(SearchError):
            search_segments(view, pattern, **kwargs)
    with pytest.raises(SearchError, match="has 3 entries"):
        search_segments(view, pattern, file_mask=np.ones(3, dtype=bool))
    with pytest.raises(SearchError, match="64-d"):
        search_segments(view, pattern[:10])
    empty = FakeView(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros((0, 64)))
    with pytest.raises(SearchError, match="--segments"):
        search_segments(empty, pattern)


# -------------------------------------------------------------------------------------- calibration
def test_calibration_is_monotone_and_inverts():
    rng = np.random.default_rng(0)
    sample = rng.normal(0.2, 0.05, 5000)
    cal = Calibration.fit(sample)
    assert cal.mean == pytest.approx(sample.mean()) and cal.std == pytest.approx(sample.std())
    s = np.sort(rng.uniform(-0.2, 0.6, 2000))
    assert np.all(np.diff(cal.z(s)) > 0)
    pct = cal.percentile(s)
    assert np.all(np.diff(pct) >= 0) and pct[0] == 0.0 and pct[-1] == 100.0
    assert cal.percentile(float(np.median(sample))) == pytest.approx(50.0, abs=0.05)
    for z in (-3.0, 0.0, 1.5, 4.0):
        assert cal.z(cal.score_for_z(z)) == pytest.approx(z)
    # A percentile threshold keeps exactly the scores whose percentile reaches it.
    probe = np.concatenate([sample[:500], s])
    for p in (0.0, 0.01, 12.5, 50.0, 99.9, 100.0, 100.5):
        t = cal.score_for_percentile(p)
        np.testing.assert_array_equal(cal.percentile(probe) >= p, probe >= t)
    assert cal.score_for_percentile(0.0) == -np.inf and cal.score_for_percentile(100.5) == np.inf


def test_calibration_degenerate_samples_do_not_divide_by_zero():
    with np.errstate(all="raise"):
        for sample in ([0.42], [0.3] * 10):
            cal = Calibration.fit(np.array(sample))
            assert cal.std == 0.0
            assert cal.z(0.3 if len(sample) > 1 else 0.42) == 0.0
            assert np.isfinite(cal.z(0.9)) and cal.z(0.9) > 0
            assert cal.percentile(0.1) == 0.0 and cal.percentile(0.9) == 100.0
            assert np.isfinite(cal.score_for_z(2.0))
    with pytest.raises(ValueError, match="empty"):
        Calibration.fit(np.array([]))
    with pytest.raises(ValueError, match="non-finite"):
        Calibration.fit(np.array([0.1, np.nan]))


def test_sample_rows_is_deterministic_distinct_and_sorted():
    assert sample_rows(5, 10).tolist() == [0, 1, 2, 3, 4]
    a, b = sample_rows(1_000_000, 1000, seed=1), sample_rows(1_000_000, 1000, seed=1)
    np.testing.assert_array_equal(a, b)
    assert a.size == 1000 and np.all(np.diff(a) > 0) and a[-1] < 1_000_000
    assert not np.array_equal(a, sample_rows(1_000_000, 1000, seed=2))
    with pytest.raises(ValueError):
        sample_rows(10, 0)


def test_calibrate_query_matches_a_fit_on_the_sampled_scores():
    view, pattern = planted_view()
    cal = calibrate_query(view.take, len(view), 3.0 * pattern, limit=100)
    rows = sample_rows(len(view), 100)
    want = Calibration.fit(view.take(rows) @ pattern)
    assert cal.mean == pytest.approx(want.mean, abs=1e-6) and cal.std == pytest.approx(want.std, abs=1e-6)


# ---------------------------------------------------------------------------------------- search
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_planted_pattern_is_the_best_segment(dtype):
    view, pattern = planted_view(dtype=dtype)
    other = unit(np.random.default_rng(9).standard_normal(64))
    best, second = search_segments(view, np.stack([pattern, other]), k=3, block_rows=37)
    top = best[0]
    assert (top.file_index, top.start, top.end, top.windows) == (3, 20.0, 26.0, 5)
    assert top.score > 0.9 and top.z > 4 and top.percentile > 98
    assert 20.0 <= top.best_start <= 24.0
    assert second and second[0].score < 0.7  # the second query's own answer, not the pattern
    # Leaving file 3 out finds something else, calibrated as before (on every window).
    mask = np.ones(5, dtype=bool)
    mask[3] = False
    masked = search_segments(view, pattern, file_mask=mask, k=None)[0]
    assert all(s.file_index != 3 for s in masked)
    full = {(s.file_index, s.start): s.z for s in search_segments(view, pattern, k=None)[0]}
    assert all(
        full[(s.file_index, s.start)] == pytest.approx(s.z) for s in masked if (s.file_index, s.start) in full
    )


def test_score_windows_equals_brute_force_across_blocks():
    view, pattern = planted_view(dtype=np.float16)
    q = unit(np.random.default_rng(4).standard_normal((3, 64)))
    got = score_windows(view, q, block_rows=29)
    np.testing.assert_allclose(got, q @ view.matrix().T, atol=1e-5)


def test_real_store_gives_the_fake_views_answers(tmp_path):
    view, pattern = planted_view()
    store = make_segment_store(tmp_path / "s", view)
    real = store.segment_view()
    np.testing.assert_array_equal(real.file_index, view.file_index)
    want = search_segments(view, pattern, k=None)[0]
    got = search_segments(real, pattern, k=None)[0]
    assert got == want and got[0].file_index == 3


# -------------------------------------------------------------------------------------- timeline
def test_timeline_rows_and_formats_parse_back():
    view, pattern = planted_view()
    rows = timeline(view, 3, pattern)
    sel = np.flatnonzero(view.file_index == 3)
    scores = view.take(sel) @ pattern
    cal = Calibration.fit(view.matrix() @ pattern)  # 300 windows: all sampled
    assert [r.start for r in rows] == view.start[sel].tolist()
    np.testing.assert_allclose([r.score for r in rows], scores, atol=1e-6)
    np.testing.assert_allclose([r.z for r in rows], cal.z(scores.astype(np.float64)), atol=1e-4)
    assert timeline(view, 99, pattern) == []

    doc = json.loads(format_timeline(rows, "json", meta={"path": "x.wav"}))
    assert doc["path"] == "x.wav" and len(doc["windows"]) == 60
    assert doc["windows"][20]["start"] == 20.0 and doc["windows"][20]["score"] == pytest.approx(
        rows[20].score, abs=1e-6
    )

    table = list(csv.DictReader(io.StringIO(format_timeline(rows, "csv"))))
    assert list(table[0]) == ["start", "end", "score", "z"] and len(table) == 60
    assert float(table[22]["score"]) == pytest.approx(rows[22].score, abs=1e-6)

    text = format_timeline(rows, "audacity", label="applause\tloud")
    lines = text.splitlines()
    pat = re.compile(r"^(\d+\.\d{6})\t(\d+\.\d{6})\t(.*)$")
    parsed = [pat.match(line).groups() for line in lines]
    merged = timeline_segments(rows)
    assert [(float(a), float(b)) for a, b, _ in parsed] == [(a, b) for a, b, _ in merged]
    assert (20.0, 26.0) in [(a, b) for a, b, _ in merged]
    label = [lab for a, _, lab in parsed if float(a) == 20.0][0]
    assert label == f"applause loud {max(r.score for r in rows):.3f}"
    # A cosine threshold above every score labels nothing; every window is labelled at -1.
    assert format_timeline(rows, "audacity", threshold=0.999) == ""
    assert len(format_timeline(rows, "audacity", threshold=-1.0).splitlines()) == 1
    with pytest.raises(SearchError, match="unknown timeline format"):
        format_timeline(rows, "xml")


# ------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def applause_store(tiny_model_dir, tmp_path_factory):
    """A 512-d store with segments whose file 2, windows 7-9, hold the tiny model's "applause" vector."""
    import mlx_clap

    q = mlx_clap.load(tiny_model_dir).embed_text(["applause"])[0]
    rng = np.random.default_rng(5)
    fi, st, en = windows_of([30, 30, 30], 10.0, 2.0)
    vecs = unit(rng.standard_normal((90, 512)))
    vecs[60 + 7 : 60 + 10] = unit(q + 0.02 * rng.standard_normal((3, 512)))
    view = FakeView(fi, st, en, vecs)
    path = tmp_path_factory.mktemp("stores") / "applause"
    return make_segment_store(path, view, manifest={"model": str(tiny_model_dir)}), q


def invoke(command, args):
    return CliRunner().invoke(command, [str(a) for a in args])


def test_timeline_command_formats_and_out(applause_store, tmp_path):
    from mlx_clap.cli.segments import timeline as timeline_cmd

    store, _ = applause_store
    r = invoke(timeline_cmd, ["/audio/file_2.wav", "--store", store.path, "--text", "applause"])
    assert r.exit_code == 0, r.output
    table = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(table) == 30
    best = max(table, key=lambda row: float(row["score"]))
    assert float(best["start"]) in (14.0, 16.0, 18.0) and float(best["z"]) > 4
    r = invoke(timeline_cmd, ["/audio/file_2.wav", "--store", store.path, "--text", "applause", "--json"])
    doc = json.loads(r.stdout)
    assert (
        doc["path"] == "/audio/file_2.wav"
        and doc["query"] == {"text": "applause"}
        and len(doc["windows"]) == 30
    )
    out = tmp_path / "labels.txt"
    r = invoke(timeline_cmd, ["/audio/file_2.wav", "--store", store.path, "--text", "applause",
                              "--format", "audacity", "--out", out])  # fmt: skip
    assert r.exit_code == 0 and "wrote 30 windows" in r.stderr
    (line,) = out.read_text().splitlines()
    a, b, label = line.split("\t")
    assert (float(a), float(b)) == (14.0, 28.0) and label.startswith("applause 0.9")
    import soundfile as sf

    wav = tmp_path / "query.wav"
    sf.write(wav, 0.1 * np.random.default_rng(0).standard_normal(16000), 16000)
    r = invoke(timeline_cmd, ["/audio/file_2.wav", "--store", store.path, "--audio", wav, "--format", "json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["query"] == {"audio": str(wav)} and len(doc["windows"]) == 30


def test_timeline_command_errors(applause_store, tmp_path, tiny_model_dir):
    from mlx_clap.cli.segments import timeline as timeline_cmd

    store, _ = applause_store
    r = invoke(timeline_cmd, ["/audio/nope.wav", "--store", store.path, "--text", "applause"])
    assert r.exit_code == 1 and "/audio/nope.wav: not in the store" in r.output
    r = invoke(timeline_cmd, ["/audio/file_2.wav", "--store", store.path])
    assert r.exit_code == 2 and "exactly one of --text, --audio" in r.output
    plain = create_store(tmp_path / "plain", {"model": str(tiny_model_dir)}, 512)
    plain.write([{"path": "/audio/a.wav", "size": 1, "mtime": 0.0}], unit(np.ones((1, 512))))
    r = invoke(timeline_cmd, ["/audio/a.wav", "--store", plain.path, "--text", "applause"])
    assert r.exit_code == 1 and "made without --segments; embed again with --segments" in r.output
    r = invoke(timeline_cmd, ["--help"])
    assert r.exit_code == 0 and "Example" in r.output and "mlx-clap timeline" in r.output


def test_segment_hits_and_printing(applause_store, capsys):
    from mlx_clap.cli.segments import print_segment_hits, segment_hits

    store, q = applause_store
    hits = segment_hits(store, store.segment_view(), q, k=2)
    assert hits[0]["path"] == "/audio/file_2.wav" and hits[0]["rank"] == 1
    assert (hits[0]["start"], hits[0]["end"]) == (14.0, 28.0)
    assert set(hits[0]) >= {"path", "start", "end", "score", "z", "percentile"}
    print_segment_hits(hits)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(hits) and "0:14.0-0:28.0" in out[0] and out[0].endswith("/audio/file_2.wav")
    with pytest.raises(Exception, match="at most one"):
        segment_hits(store, store.segment_view(), q, threshold=0.5, min_z=1.0)


def test_zscores_against_file_rows_and_segment_windows(tmp_path):
    from mlx_clap.search.calibration import zscores

    view, pattern = planted_view()
    store = make_segment_store(tmp_path / "s", view)
    scores = np.array([0.0, 0.5, 0.9])
    files = Calibration.fit(store.matrix() @ pattern)
    windows = Calibration.fit(view.matrix() @ pattern)
    np.testing.assert_allclose(zscores(store, pattern, scores), files.z(scores), rtol=1e-5)
    np.testing.assert_allclose(zscores(store, pattern, scores, segments=True), windows.z(scores), rtol=1e-5)


def test_stretch_around_is_the_merged_run_holding_the_best_window():
    from mlx_clap.search.segments import stretch_around

    start = np.arange(8, dtype=np.float64) * 2.0  # 4-s windows every 2 s
    end = start + 4.0
    scores = np.array([0.1, 0.6, 0.7, 0.9, 0.2, 0.1, 0.8, 0.1])
    # Windows 1-3 pass 0.5 and overlap: one stretch; window 6 is its own (windows 4-5 fail between).
    assert stretch_around(start, end, scores, 3, 0.5, gap=1.0) == (2.0, 10.0, 3)
    assert stretch_around(start, end, scores, 6, 0.5, gap=1.0) == (12.0, 16.0, 1)
    # A gap of 2 s joins window 6 (starting 2 s after window 3 ends), as run_ids does: one stretch.
    assert stretch_around(start, end, scores, 3, 0.5, gap=2.0) == (2.0, 16.0, 4)
    # The best window below the threshold: itself alone.
    assert stretch_around(start, end, scores, 3, 0.95, gap=1.0) == (6.0, 10.0, 1)


def test_timeline_z_agrees_with_search_segments():
    """Both calibrate on every window by default, so the same window gets the same z in both."""
    view, pattern = planted_view()
    rows = timeline(view, 3, pattern)
    best = search_segments(view, pattern, k=1)[0][0]
    assert best.file_index == 3
    row = next(r for r in rows if r.start == best.best_start)
    assert row.z == pytest.approx(best.z, abs=1e-9)
    # A sample calibrates on fewer windows: the same scores, other z.
    sampled = timeline(view, 3, pattern, sample=50)
    assert [r.score for r in sampled] == pytest.approx([r.score for r in rows], abs=1e-6)
    assert max(abs(a.z - b.z) for a, b in zip(sampled, rows, strict=True)) > 1e-3
