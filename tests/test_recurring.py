"""Recurring-segment detection (mlx_clap.search.recurring) and the `recurring` command: planted repeats
across files and within one file are found, a window's overlapping neighbours are not recurrences, the
IVF backend (k-means partitions, or the store's Lance index) and the ANN backend agree with the exact one."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from fixtures import create_store
from test_segment_search import FakeView, make_segment_store, unit, windows_of

from mlx_clap.search.index import SearchError
from mlx_clap.search.recurring import exact_pairs, find_recurring, ivf_pairs

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
    for backend in ("exact", "ivf", "ann"):
        if backend == "ann":
            pytest.importorskip("usearch")
        assert find_recurring(view, threshold=0.6, backend=backend) == []


def test_ann_agrees_with_exact(planted):
    pytest.importorskip("usearch")
    stats: dict = {}
    ann = find_recurring(planted, backend="ann", stats=stats)
    assert stats["backend"] == "ann" and "ann_build_s" in stats
    assert spans(ann) == spans(find_recurring(planted, backend="exact"))


def test_ivf_finds_the_exact_groups_on_a_planted_store():
    three = walk_view([ACROSS, (0, 10, 3, 3, 6, 0.99), WITHIN], files=6, seed=3)
    exact = find_recurring(three, backend="exact")
    assert [len(g.occurrences) for g in exact] == [3, 2]
    for kwargs in ({}, {"partitions": 40, "probes": 1}, {"partitions": 1}):
        stats: dict = {}
        got = find_recurring(three, backend="ivf", stats=stats, **kwargs)
        assert spans(got) == spans(exact), kwargs
        assert [(g.links, round(g.score, 5)) for g in got] == [(g.links, round(g.score, 5)) for g in exact]
        assert stats["backend"] == "ivf" and stats["partitions_from"] == "kmeans"
        assert stats["partitions"] == kwargs.get("partitions", 27)  # sqrt(240 windows x 3 probes)
        assert any("k-means" in n and "compared exactly" in n for n in stats["notes"])
    # "auto" picks it past EXACT_AUTO_WINDOWS, and needs no optional package for it.
    import mlx_clap.search.recurring as rec

    old, rec.EXACT_AUTO_WINDOWS = rec.EXACT_AUTO_WINDOWS, 10
    try:
        stats = {}
        assert spans(find_recurring(three, stats=stats)) == spans(exact) and stats["backend"] == "ivf"
    finally:
        rec.EXACT_AUTO_WINDOWS = old


def test_ivf_probing_every_partition_finds_every_exact_pair():
    # Weak copies (cosine ~0.6) at a low threshold: many pairs near it. Probing all partitions is the
    # exact comparison, pair for pair; probing fewer finds a subset (never a pair that is not one).
    view = walk_view([(0, 10, 2, 25, 6, 0.6), (1, 3, 3, 20, 8, 0.7)], dim=128, seed=5)
    ei, ej, es = exact_pairs(view, 0.3, WINDOW)
    assert ei.size > 20
    exact = dict(zip(zip(ei.tolist(), ej.tolist(), strict=True), es.tolist(), strict=True))
    i, j, s = ivf_pairs(view, 0.3, WINDOW, partitions=8, probes=8)
    got = dict(zip(zip(i.tolist(), j.tolist(), strict=True), s.tolist(), strict=True))
    assert got.keys() == exact.keys() and np.all(i < j)
    assert max(abs(got[p] - exact[p]) for p in got) < 1e-6
    i, j, _ = ivf_pairs(view, 0.3, WINDOW, partitions=8, probes=1)
    assert set(zip(i.tolist(), j.tolist(), strict=True)) <= exact.keys()


def test_ivf_probes_the_partitions_about_as_near_for_windows_far_from_every_centroid(monkeypatch):
    # Rare content (a jingle) lies far from every centroid and scores several alike: two near-copies
    # (cosine 0.9996) pick different nearest partitions. The margin makes each probe the other's too.
    import mlx_clap.search.recurring as rec

    dim = 64
    rng = np.random.default_rng(7)
    centroids = np.eye(8, dim, dtype=np.float32)
    common = unit(np.concatenate([np.zeros(8), rng.standard_normal(dim - 8)]))  # orthogonal to them
    x = unit(centroids[rng.integers(0, 8, 40)] + 0.1 * rng.standard_normal((40, dim)))
    x[5] = unit(0.2 * centroids[0] + 0.18 * centroids[1] + common)
    x[25] = unit(0.18 * centroids[0] + 0.2 * centroids[1] + common)
    fi, st, en = windows_of([20, 20], WINDOW, HOP)
    view = FakeView(fi, st, en, x)
    near = rec.nearest_partitions(x, centroids, 1, margin=rec.PROBE_MARGIN, most=rec.MAX_PROBES)
    assert near[5, 0] == 0 and near[25, 0] == 1 and 1 in near[5] and 0 in near[25]
    assert np.all(near[np.setdiff1d(np.arange(40), [5, 25]), 1:] == -1)  # the others: one probe
    i, j, s = ivf_pairs(view, 0.99, WINDOW, centroids=centroids, probes=1)
    assert (5, 25) in set(zip(i.tolist(), j.tolist(), strict=True))
    monkeypatch.setattr(rec, "PROBE_MARGIN", 0.0)
    i, j, s = ivf_pairs(view, 0.99, WINDOW, centroids=centroids, probes=1)
    assert (5, 25) not in set(zip(i.tolist(), j.tolist(), strict=True))


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
                   {"k_neighbors": 0}, {"backend": "gpu"}, {"gap": -1.0}, {"probes": 0},
                   {"partitions": 0}):  # fmt: skip
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


def test_auto_past_the_exact_limit_needs_no_usearch(planted, monkeypatch):
    """Past EXACT_AUTO_WINDOWS "auto" compares within partitions (Lance's k-means, a runtime
    dependency), so it no longer falls back to the hours of every pair without usearch; only
    "ann" needs usearch, and says how to get it."""
    import mlx_clap.search.recurring as rec

    def missing():
        raise SearchError("the approximate (ANN) backend needs usearch")

    monkeypatch.setattr(rec, "_require_usearch", missing)
    monkeypatch.setattr(rec, "EXACT_AUTO_WINDOWS", 10)  # the planted view holds more
    stats: dict = {}
    groups = find_recurring(planted, backend="auto", stats=stats)
    assert stats["backend"] == "ivf"
    assert spans(groups) == spans(find_recurring(planted, backend="exact"))
    with pytest.raises(SearchError, match="needs usearch"):
        find_recurring(planted, backend="ann")


# ------------------------------------------------------------------------------ the store's index
@pytest.fixture(scope="module")
def planted_8():
    return walk_view([ACROSS, (0, 10, 5, 3, 6, 0.99), WITHIN], files=8, seed=6)


def indexed(path, view, num_partitions: int | None):
    """A planted store with a Lance vector index: as `mlx-clap index` builds it (Lance's own partition
    count), or over `num_partitions` partitions (what a larger store gets by default)."""
    from mlx_clap.search.lance_index import INDEX_TYPE, METRIC, build_index
    from mlx_clap.store import Store
    from mlx_clap.store.schema import VECTOR

    make_segment_store(path, view, dtype="float16")
    with Store.open(path, write=True) as w:
        if num_partitions is None:
            return build_index(w).store
        w.dataset.create_index(VECTOR, INDEX_TYPE, metric=METRIC, num_partitions=num_partitions)
    return Store.open(path)


def test_ivf_uses_the_store_lance_index_and_says_so(planted_8, tmp_path):
    # 320 windows: sqrt(320 x 3) = 31 partitions balance the work; an index of 24 is close enough.
    store = indexed(tmp_path / "indexed", planted_8, 24)
    exact = find_recurring(planted_8, backend="exact")
    assert len(exact) == 2 and sorted(len(g.occurrences) for g in exact) == [2, 3]
    stats: dict = {}
    got = find_recurring(store.segment_view(), backend="ivf", stats=stats)
    assert stats["partitions_from"] == "lance-index" and stats["partitions"] == 24 and "kmeans_s" not in stats
    assert any("Lance IVF_RQ index (24 partitions, over 320 of 320 windows)" in n for n in stats["notes"])
    assert spans(got) == spans(exact)
    # Asked not to (or given a partition count), it trains k-means instead.
    for kwargs in ({"use_store_index": False}, {"partitions": 10}):
        stats = {}
        got = find_recurring(store.segment_view(), backend="ivf", stats=stats, **kwargs)
        assert spans(got) == spans(exact)
        assert stats["partitions_from"] == "kmeans" and "kmeans_s" in stats
    from mlx_clap.cli.segments import recurring

    r = CliRunner().invoke(recurring, [str(store.path), "--backend", "ivf"])
    assert r.exit_code == 0, r.output
    assert "Lance IVF_RQ index" in r.stderr and "ivf backend" in r.stderr
    assert r.stdout.startswith("group 1: 3 occurrences in 3 files")


def test_ivf_trains_its_own_partitions_when_the_index_is_too_coarse(planted_8, tmp_path):
    # Lance sizes a search index's partitions for queries (one partition for these 320 rows): comparing
    # every window within them would approach the O(S^2) of exact, so k-means partitions serve, and
    # the output says why the index was not used.
    store = indexed(tmp_path / "coarse", planted_8, None)
    stats: dict = {}
    got = find_recurring(store.segment_view(), backend="ivf", stats=stats)
    assert stats["partitions_from"] == "kmeans" and stats["partitions"] == 31
    assert any("Lance index has 1 partition, too coarse" in n for n in stats["notes"])
    assert spans(got) == spans(find_recurring(planted_8, backend="exact"))
