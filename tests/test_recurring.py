"""Recurring-segment detection (mlx_clap.search.recurring) and the `recurring` command: planted repeats
across files and within one file are found, a window's overlapping neighbours are not recurrences, the
ANN backend asks past them and agrees with the exact one."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from fixtures import create_store
from test_segment_search import FakeView, make_segment_store, unit, windows_of

from mlx_clap.search.index import SearchError
from mlx_clap.search.recurring import exact_pairs, find_recurring

SPAN = 4  # window = 4 hops: a window shares audio with the 3 before and after it
WINDOW, HOP = 4.0, 1.0
N = 40  # windows per file


def walk_view(plants, files: int = 4, dim: int = 256, seed: int = 0) -> FakeView:
    """Windows as real ones behave: window t is the sum of "audio" frames t..t+SPAN-1, so neighbours
    overlap (lag-1 cosine ~0.75, lag >= SPAN ~0). Each plant (src_file, src_t, dst_file, dst_t, length,
    cos) copies the frames under `length` windows with noise so aligned windows have cosine ~cos."""
    rng = np.random.default_rng(seed)
    frames = rng.standard_normal((files, N + SPAN - 1, dim))
    for sf, st, df, dt, length, cos in plants:
        a = np.sqrt(1 / cos**2 - 1)
        m = length + SPAN - 1
        frames[df, dt : dt + m] = (frames[sf, st : st + m] + a * rng.standard_normal((m, dim))) / np.sqrt(
            1 + a**2
        )
    c = np.cumsum(frames, axis=1)
    sums = c[:, SPAN - 1 :] - np.concatenate([np.zeros((files, 1, dim)), c[:, :-SPAN]], axis=1)
    fi, st, en = windows_of([N] * files, WINDOW, HOP)
    return FakeView(fi, st, en, unit(sums.reshape(-1, dim)))


def spans(groups):
    """Each group as a sorted tuple of (file, start, end) occurrences; the groups as a set."""
    return {tuple(sorted((o.file_index, o.start, o.end) for o in g.occurrences)) for g in groups}


ACROSS = (0, 10, 2, 25, 6, 0.99)  # file 0 windows 10-15 recur in file 2 at 25-30
WITHIN = (1, 5, 1, 30, 5, 0.99)  # file 1 windows 5-9 recur at 30-34


@pytest.fixture(scope="module")
def planted() -> FakeView:
    return walk_view([ACROSS, WITHIN])


def test_planted_repeats_across_files_and_within_one_are_found(planted):
    stats: dict = {}
    groups = find_recurring(planted, backend="exact", stats=stats)
    assert spans(groups) == {
        ((0, 10.0, 19.0), (2, 25.0, 34.0)),  # 6 windows: start of the first to end of the last
        ((1, 5.0, 13.0), (1, 30.0, 38.0)),
    }
    assert stats["backend"] == "exact" and stats["threshold"] == 0.9 and stats["window"] == WINDOW
    for g in groups:
        assert g.score > 0.95 and g.max_score >= g.score and g.links >= 5
        assert [o.windows for o in g.occurrences] in ([6, 6], [5, 5])
    doc = groups[0].to_dict([{"path": f"/a/{i}.wav"} for i in range(4)])
    assert doc["size"] == 2 and doc["occurrences"][0]["path"].startswith("/a/")


def test_min_occurrences_and_largest_group_first():
    three = walk_view([ACROSS, (0, 10, 3, 3, 6, 0.99), WITHIN])
    groups = find_recurring(three, backend="exact")
    assert [len(g.occurrences) for g in groups] == [3, 2]
    assert {o.file_index for o in groups[0].occurrences} == {0, 2, 3}
    only = find_recurring(three, backend="exact", min_occurrences=3)
    assert spans(only) == spans(groups[:1])


def test_overlapping_neighbours_are_not_recurrences():
    # Frames shared by neighbours make lag-1 windows cosine ~0.75: above 0.6, but they overlap.
    view = walk_view([], dim=128, seed=4)
    i, j, _ = exact_pairs(view, 0.6, WINDOW)
    assert i.size == 0
    # Told the windows are 1 s long (so lag 1 does not overlap), the same pairs are found: the
    # exclusion is what removed them.
    i, j, _ = exact_pairs(view, 0.6, 1.0)
    assert i.size > 50 and np.all(view.file_index[i] == view.file_index[j])
    assert np.all(np.abs(view.start[i] - view.start[j]) < WINDOW)  # every one an overlapping neighbour
    for backend in ("exact", "ann"):
        if backend == "ann":
            pytest.importorskip("usearch")
        assert find_recurring(view, threshold=0.6, backend=backend) == []


def test_ann_agrees_with_exact(planted):
    pytest.importorskip("usearch")
    stats: dict = {}
    ann = find_recurring(planted, backend="ann", stats=stats)
    assert stats["backend"] == "ann" and "ann_build_s" in stats
    assert spans(ann) == spans(find_recurring(planted, backend="exact"))


def test_ann_asks_past_the_overlapping_neighbours():
    # A weak copy (cosine ~0.6) ranks below each window's own lag-1 neighbours (~0.75) on both sides:
    # with k_neighbors=1 it is found only because the search also asks for the overlapping ones.
    pytest.importorskip("usearch")
    view = walk_view([(0, 10, 2, 25, 6, 0.6)], dim=512, seed=2)
    exact = find_recurring(view, threshold=0.35, backend="exact")
    ann = find_recurring(view, threshold=0.35, backend="ann", k_neighbors=1)
    assert len(exact) == 1 and {o.file_index for o in exact[0].occurrences} == {0, 2}
    assert spans(ann) == spans(exact)


def test_min_z_threshold_from_random_pairs(planted):
    stats: dict = {}
    groups = find_recurring(planted, min_z=8.0, backend="exact", stats=stats)
    cal = stats["pair_calibration"]
    assert abs(cal["mean"]) < 0.02 and 0.04 < cal["std"] < 0.09  # random 256-d vectors: ~0 and ~1/16
    assert stats["threshold"] == pytest.approx(cal["mean"] + 8.0 * cal["std"], abs=1e-5)
    found = {tuple(sorted({o.file_index for o in g.occurrences})) for g in groups}
    assert found == {(0, 2), (1,)}


def test_bad_options(planted):
    for kwargs in ({"threshold": 0.9, "min_z": 3.0}, {"threshold": 2.0}, {"min_occurrences": 1},
                   {"k_neighbors": 0}, {"backend": "gpu"}, {"gap": -1.0}):  # fmt: skip
        with pytest.raises(SearchError):
            find_recurring(planted, **kwargs)
    empty = FakeView(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros((0, 8)))
    with pytest.raises(SearchError, match="--segments"):
        find_recurring(empty)


# ------------------------------------------------------------------------------------- real store
@pytest.fixture(scope="module")
def planted_store(planted, tmp_path_factory):
    return make_segment_store(tmp_path_factory.mktemp("stores") / "planted", planted, dtype="float16")


def test_real_store_finds_the_planted_groups(planted, planted_store):
    view = planted_store.segment_view()
    assert spans(find_recurring(view)) == spans(find_recurring(planted))


def test_recurring_command(planted_store, tmp_path):
    from mlx_clap.cli.segments import recurring

    r = CliRunner().invoke(recurring, [str(planted_store.path), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["groups_found"] == 2 and doc["stats"]["backend"] == "exact"
    paths = {tuple(sorted({o["path"] for o in g["occurrences"]})) for g in doc["groups"]}
    assert paths == {("/audio/file_0.wav", "/audio/file_2.wav"), ("/audio/file_1.wav",)}
    r = CliRunner().invoke(recurring, [str(planted_store.path), "-k", "1", "--threshold", "0.95"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].startswith("group 1: 2 occurrences") and len(lines) == 3
    assert "1 more groups" in r.stderr and "exact backend" in r.stderr
    r = CliRunner().invoke(recurring, [str(planted_store.path), "--threshold", "0.999"])
    assert r.exit_code == 0 and "nothing recurs" in r.stdout
    plain = create_store(tmp_path / "plain", {"model": "x"}, 8)
    plain.write([{"path": "/a.wav", "size": 1, "mtime": 0.0}], unit(np.ones((1, 8))))
    r = CliRunner().invoke(recurring, [str(plain.path)])
    assert r.exit_code == 1 and "made without --segments" in r.output
    r = CliRunner().invoke(recurring, [str(planted_store.path), "--threshold", "0.9", "--min-z", "3"])
    assert r.exit_code == 2
    r = CliRunner().invoke(recurring, ["--help"])
    assert r.exit_code == 0 and "Example" in r.output and "mlx-clap recurring" in r.output


def test_auto_without_usearch_falls_back_to_exact_only_where_that_ends(planted, monkeypatch):
    """Without usearch, "auto" compares every pair of a store up to EXACT_FALLBACK_WINDOWS windows (with
    a note); past it the hours of O(S^2) work are refused with the fix, unless "exact" is asked."""
    import mlx_clap.search.recurring as rec

    def missing():
        raise SearchError("the approximate (ANN) backend needs usearch")

    monkeypatch.setattr(rec, "_require_usearch", missing)
    monkeypatch.setattr(rec, "EXACT_AUTO_WINDOWS", 10)  # the planted view holds more: "auto" wants the ANN
    stats: dict = {}
    groups = find_recurring(planted, backend="auto", stats=stats)
    assert stats["backend"] == "exact" and any("usearch is not installed" in n for n in stats["notes"])
    assert spans(groups) == spans(find_recurring(planted, backend="exact"))
    monkeypatch.setattr(rec, "EXACT_FALLBACK_WINDOWS", 10)
    with pytest.raises(SearchError, match=r"too many.*pip install 'usearch.*--backend exact"):
        find_recurring(planted, backend="auto")
    assert spans(find_recurring(planted, backend="exact")) == spans(groups)
