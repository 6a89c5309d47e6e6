"""mlx_clap.store: the Lance store's rows, snapshots, sync commits, identity, one writer, and the table as
other tools read it."""

from __future__ import annotations

import datetime
import json
import os
import pickle

import lance
import numpy as np
import pyarrow as pa
import pytest

from mlx_clap.store import (
    METADATA_KEY,
    StaleSnapshotError,
    Store,
    StoreBusyError,
    StoreError,
    UnknownPathError,
    identity_diff,
    write_rows,
)

DIM = 16
MANIFEST = {
    "model": "tiny",
    "weights_sha256": "w0",
    "embedding_dim": DIM,
    "store_dtype": "float16",
    "settings": {"long_audio": "windows-mean", "compute_dtype": "float32"},
}
SEGMENTS = {"hop": 5.0, "window": 10.0}


def _vecs(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _items(names, size: int = 100, tag: str = "") -> list[dict]:
    return [
        {"path": f"/lib/{n}.wav", "size": size, "mtime": 1.5, "sha256": f"sha-{n}{tag}", "duration": 12.0}
        for n in names
    ]


def _segs(n: int, seed: int) -> list:
    return [(np.array([0.0, 5.0]), np.array([10.0, 12.0]), _vecs(2, seed * 100 + i)) for i in range(n)]


def _new(tmp_path, **kw) -> Store:
    return Store.create(tmp_path / "st.lance", MANIFEST, dim=DIM, **kw)


def _paths(store: Store) -> list[str]:
    return [it["path"] for it in store.items]


def test_rows_round_trip_in_row_order(tmp_path):
    with _new(tmp_path, dtype="float32") as w:
        assert w.write(_items("abc"), _vecs(3)) == 2
        w.write(_items("de"), _vecs(2, 1))
    r = Store.open(tmp_path / "st.lance")
    assert _paths(r) == [f"/lib/{n}.wav" for n in "abcde"] and len(r) == 5
    want = np.concatenate([_vecs(3), _vecs(2, 1)])
    np.testing.assert_array_equal(r.matrix(), want)
    np.testing.assert_array_equal(r.take([4, 0, 4]), want[[4, 0, 4]])
    blocks = list(r.iter_shards(block_rows=2))
    assert [f for f, _ in blocks] == [0, 2, 4]
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), want)
    assert r.items[1] == {
        "path": "/lib/b.wav",
        "size": 100,
        "mtime": 1.5,
        "sha256": "sha-b",
        "duration": 12.0,
    }
    assert r.row_of("/lib/d.wav") == 3 and ("/lib/c.wav", 100, 1.5) in r.done_keys()
    assert r.by_content()["sha-e"] == 4
    with pytest.raises(UnknownPathError, match="nope"):
        r.row_of("/nope.wav")
    with pytest.raises(KeyError):
        r.row_of("/nope.wav")
    assert r.manifest["model"] == "tiny" and r.manifest["store"]["format_version"] == 3
    assert r.read_only and r.dim == DIM and r.dtype == "float32"


def test_float16_stores_float16_and_reads_float32(tmp_path):
    with _new(tmp_path) as w:
        w.write(_items("ab"), _vecs(2))
    r = Store.open(tmp_path / "st.lance")
    assert r.dataset.schema.field("vector").type == pa.list_(pa.float16(), DIM)
    assert next(r.iter_shards())[1].dtype == np.float16 and r.matrix().dtype == np.float32
    np.testing.assert_allclose(r.matrix(), _vecs(2), atol=1e-3)


def test_a_changed_file_replaces_its_rows_in_one_commit(tmp_path):
    """A path written again keeps one file row (and only its new segments); the version before still
    reads the old rows, and a removed path loses every row."""
    with _new(tmp_path, segments=SEGMENTS) as w:
        v1 = w.write(_items("abc"), _vecs(3), _segs(3, 1))
        v2 = w.write(
            _items("b", size=7, tag="2"), _vecs(1, 9), [(np.array([0.0]), np.array([3.0]), _vecs(1, 8))]
        )
        assert v2 == v1 + 1
        assert _paths(w) == ["/lib/a.wav", "/lib/c.wav", "/lib/b.wav"]
        assert w.items[2]["size"] == 7 and w.items[2]["sha256"] == "sha-b2"
        view = w.segment_view()
        assert len(view) == 5 and list(view.of_file(2)) == [4]
        np.testing.assert_allclose(view.take([4]), _vecs(1, 8), atol=1e-3)
        w.remove(["/lib/a.wav", "/lib/not-stored.wav"])
        assert _paths(w) == ["/lib/c.wav", "/lib/b.wav"] and len(w.segment_view()) == 3
    old = Store.open(tmp_path / "st.lance", version=v1)
    assert _paths(old) == [f"/lib/{n}.wav" for n in "abc"] and len(old.segment_view()) == 6
    now = Store.open(tmp_path / "st.lance")
    kinds = now.dataset.to_table(columns=["path", "kind"]).to_pylist()
    assert sorted((r["path"], r["kind"]) for r in kinds) == [
        ("/lib/b.wav", "file"),
        ("/lib/b.wav", "segment"),
        ("/lib/c.wav", "file"),
        ("/lib/c.wav", "segment"),
        ("/lib/c.wav", "segment"),
    ]


def test_segment_view_follows_the_files(tmp_path):
    with _new(tmp_path, segments=SEGMENTS) as w:
        w.write(_items("ab"), _vecs(2), _segs(2, 1))
        w.write(_items("c"), _vecs(1, 2), _segs(1, 3))
        w.write(_items("a", tag="new"), _vecs(1, 4), _segs(1, 5))
    r = Store.open(tmp_path / "st.lance")
    view = r.segment_view()
    assert _paths(r) == ["/lib/b.wav", "/lib/c.wav", "/lib/a.wav"]
    assert list(view.file_index) == [0, 0, 1, 1, 2, 2] and list(view.start) == [0, 5] * 3
    want = np.concatenate([_segs(2, 1)[1][2], _segs(1, 3)[0][2], _segs(1, 5)[0][2]])
    np.testing.assert_allclose(view.matrix(), want, atol=1e-3)
    blocks = list(view.iter_blocks(block_rows=4))
    assert [f for f, _ in blocks] == [0, 4]
    np.testing.assert_allclose(np.concatenate([b for _, b in blocks]), want, atol=1e-3)


def test_reuse_copies_a_stored_file_and_its_segments(tmp_path):
    with _new(tmp_path, segments=SEGMENTS) as w:
        w.write(_items("a"), _vecs(1), _segs(1, 1))
        copy = {"path": "/other/a-copy.wav", "size": 100, "mtime": 9.0, "sha256": "sha-a"}
        w.reuse([(copy, w.by_content()["sha-a"])])
        assert _paths(w) == ["/lib/a.wav", "/other/a-copy.wav"]
        assert w.items[1]["duration"] == 12.0 and w.items[1]["mtime"] == 9.0
        np.testing.assert_array_equal(w.take([1]), w.take([0]))
        view = w.segment_view()
        np.testing.assert_array_equal(view.take(view.of_file(1)), view.take(view.of_file(0)))


def test_worker_writes_and_driver_commits(tmp_path):
    """write_rows runs where the model runs (its target and result pickle, as for a Ray actor); commit
    makes all of it one version, replacing earlier rows of those paths."""
    with _new(tmp_path) as w:
        w.write(_items("ab"), _vecs(2))
        target = pickle.loads(pickle.dumps(w.target()))
        parts = [
            write_rows(target, _items("a", tag="2"), _vecs(1, 5)),
            write_rows(target, _items("c"), _vecs(1, 6)),
        ]
        parts = pickle.loads(pickle.dumps(parts))
        assert Store.open(tmp_path / "st.lance").version == w.version  # nothing visible yet
        v = w.commit(parts, remove=["/lib/b.wav"])
        assert _paths(w) == ["/lib/a.wav", "/lib/c.wav"] and w.items[0]["sha256"] == "sha-a2"
        with pytest.raises(StoreError, match="twice in one commit"):
            w.commit([write_rows(target, _items("d"), _vecs(1)), write_rows(target, _items("d"), _vecs(1))])
    r = Store.open(tmp_path / "st.lance")
    assert r.version == v and _paths(r) == ["/lib/a.wav", "/lib/c.wav"]
    np.testing.assert_allclose(r.matrix(), np.concatenate([_vecs(1, 5), _vecs(1, 6)]), atol=1e-3)


def test_compact_keeps_rows_and_order_and_a_pinned_reader(tmp_path):
    with _new(tmp_path, segments=SEGMENTS) as w:
        w.write(_items([f"f{i}" for i in range(5)]), _vecs(5), _segs(5, 0))
        w.write(_items(["g0"]), _vecs(1, 40), _segs(1, 40))
        w.write(_items(["f1"], tag="x"), _vecs(1, 50), _segs(1, 50))
        w.remove(["/lib/f3.wav"])
        reader = Store.open(tmp_path / "st.lance")
        before = (_paths(w), w.matrix(), w.segment_view().matrix())
        assert w.dead_rows == 6
        stats = w.compact()
        assert stats["fragments_removed"] >= 2 and w.dead_rows == 0
        assert len(w.dataset.get_fragments()) == 1
        assert _paths(w) == before[0]
        np.testing.assert_array_equal(w.matrix(), before[1])
        np.testing.assert_array_equal(w.segment_view().matrix(), before[2])
        w.write(_items(["g"]), _vecs(1, 60), _segs(1, 60))
        w.compact()
    # The reader opened before both compactions still answers from its version.
    assert reader.version < Store.open(tmp_path / "st.lance").version
    assert _paths(reader) == before[0]
    np.testing.assert_array_equal(reader.matrix(), before[1])
    np.testing.assert_array_equal(reader.take([2, 0]), before[1][[2, 0]])
    assert reader.refresh().version > reader.version and "/lib/g.wav" in _paths(reader.refresh())


def test_a_reader_whose_version_was_cleaned_up_is_told_to_reopen(tmp_path):
    with _new(tmp_path) as w:
        w.write(_items("a"), _vecs(1))
        w.write(_items("b"), _vecs(1, 1))
        reader = Store.open(tmp_path / "st.lance")
        w.write(_items("a", tag="2"), _vecs(1, 2))
        w.compact(retain=datetime.timedelta(0))
    with pytest.raises(StaleSnapshotError, match="open the store again"):
        reader.matrix()


def test_identity_is_checked_and_the_difference_named(tmp_path):
    out = tmp_path / "st.lance"
    with Store.for_run(out, MANIFEST, dim=DIM) as w:
        w.write(_items("a"), _vecs(1))
    other = {**MANIFEST, "settings": {**MANIFEST["settings"], "long_audio": "head"}}
    with pytest.raises(StoreError, match=r"long_audio: 'windows-mean' there, 'head' now.*overwrite"):
        Store.for_run(out, other, dim=DIM)
    with pytest.raises(StoreError, match="segments: none there"):
        Store.for_run(out, MANIFEST, dim=DIM, segments=SEGMENTS)
    with pytest.raises(StoreError, match="weights_sha256: 'w0' there, 'w1' now"):
        Store.for_run(out, {**MANIFEST, "weights_sha256": "w1"}, dim=DIM)
    with pytest.raises(StoreError, match="dtype: 'float16' there, 'float32' now"):
        Store.for_run(out, MANIFEST, dim=DIM, dtype="float32")
    with Store.for_run(out, MANIFEST, dim=DIM) as w:  # the same pipeline goes on where it was
        assert _paths(w) == ["/lib/a.wav"]
    with Store.for_run(out, other, dim=DIM, overwrite=True) as w:  # a new version, empty
        assert len(w) == 0 and w.manifest["settings"]["long_audio"] == "head"
    assert identity_diff(MANIFEST, dict(MANIFEST)) == []


def test_one_writer_at_a_time(tmp_path):
    out = tmp_path / "st.lance"
    w = _new(tmp_path)
    w.write(_items("a"), _vecs(1))
    code = (
        "import sys\nfrom mlx_clap.store import Store, StoreBusyError\n"
        f"try:\n    Store.open({str(out)!r}, write=True)\n"
        "except StoreBusyError as e:\n    print(e); sys.exit(3)\n"
    )
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3 and f"PID {os.getpid()}" in done.stdout, done.stdout + done.stderr
    w.close()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    # A writer whose version is no longer the newest (another commit went in) is refused, nothing written.
    a = Store.open(out, write=True)
    b_ds = lance.dataset(str(out))
    frags = lance.fragment.write_fragments(
        a.dataset.to_table().slice(0, 0), str(out), schema=a.dataset.schema
    )
    lance.LanceDataset.commit(str(out), lance.LanceOperation.Append(frags), read_version=b_ds.version)
    with pytest.raises(
        StoreBusyError, match="another writer committed version 3 since this one read version 2"
    ):
        a.write(_items("z"), _vecs(1))
    a.close()
    assert _paths(Store.open(out)) == ["/lib/a.wav"]


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
    with _new(tmp_path) as w:
        bad = _vecs(2)
        bad[1, 0] = np.nan
        for items, vecs, match in [
            (_items("ab"), bad, "non-finite"),
            (_items("a"), _vecs(1, dim=8), "dim 16"),
            (_items("ab"), _vecs(1), "2 items for 1 vectors"),
            ([{"path": "", "size": 1, "mtime": 1.0}], _vecs(1), "'path' must be"),
            ([{"path": "/x", "size": -1, "mtime": 1.0}], _vecs(1), "'size'"),
            (_items("aa"), _vecs(2), "given twice"),
        ]:
            with pytest.raises(StoreError, match=match):
                w.write(items, vecs)
        with pytest.raises(StoreError, match="without segments"):
            w.write(_items("a"), _vecs(1), _segs(1, 1))
        assert w.version == 1 and len(w) == 0
    with pytest.raises(StoreError, match="not open for writing"):
        Store.open(tmp_path / "st.lance").write(_items("a"), _vecs(1))


def test_paths_that_are_not_utf8_round_trip(tmp_path):
    odd = "/lib/x\udcff\udcfe.wav"
    with _new(tmp_path) as w:
        w.write([{"path": odd, "size": 1, "mtime": 1.0}, *_items("a")], _vecs(2))
        w.write([{"path": odd, "size": 2, "mtime": 2.0}], _vecs(1, 3))
    r = Store.open(tmp_path / "st.lance")
    assert _paths(r) == ["/lib/a.wav", odd] and r.row_of(odd) == 1 and r.items[1]["size"] == 2
    table = r.dataset.to_table(columns=["path", "path_raw"]).to_pylist()
    assert {"path": "/lib/x\ufffd\ufffd.wav", "path_raw": b"/lib/x\xff\xfe.wav"} in table


def test_creation_refuses_other_folders_and_datasets(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="is not an embedding store.*notes.txt"):
        Store.create(tmp_path / "full", MANIFEST, dim=DIM)
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"
    foreign = tmp_path / "foreign.lance"
    lance.write_dataset(pa.table({"x": [1, 2]}), str(foreign))
    with pytest.raises(StoreError, match="without mlx-clap metadata.*refusing"):
        Store.create(foreign, MANIFEST, dim=DIM, overwrite=True)
    with pytest.raises(StoreError, match="without mlx-clap metadata"):
        Store.open(foreign)
    assert lance.dataset(str(foreign)).to_table().num_rows == 2
    _new(tmp_path).close()
    with pytest.raises(StoreError, match="a store already exists"):
        _new(tmp_path)
    with pytest.raises(StoreError, match="no such store"):
        Store.open(tmp_path / "missing")


def test_a_store_of_a_newer_format_is_refused(tmp_path):
    _new(tmp_path).close()
    ds = lance.dataset(str(tmp_path / "st.lance"))
    meta = json.loads(ds.schema.metadata[METADATA_KEY.encode()])
    meta["store"]["format_version"] = 99
    ds.update_schema_metadata({METADATA_KEY: json.dumps(meta)})
    with pytest.raises(StoreError, match="format 99 was written by a newer mlx-clap"):
        Store.open(tmp_path / "st.lance")


def test_symbolic_links_inside_the_store_are_refused(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    with _new(tmp_path) as w:
        w.write(_items("a"), _vecs(1))
    store = tmp_path / "st.lance"
    (store / "errors.jsonl").symlink_to(outside / "victim.jsonl")
    with pytest.raises(StoreError, match="errors.jsonl: is a symbolic link"):
        Store.open(store, write=True)
    (store / "errors.jsonl").unlink()
    os.rename(store / "data", outside / "data")
    (store / "data").symlink_to(outside / "data")
    with pytest.raises(StoreError, match="data: is a symbolic link"):
        Store.open(store, write=True)
    assert not (outside / "victim.jsonl").exists()
    # --out itself given as a link to a folder: the store is written in that folder.
    real = tmp_path / "real"
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    real.mkdir()
    Store.create(tmp_path / "link", MANIFEST, dim=DIM).close()
    assert (real / "_versions").is_dir() and (tmp_path / "link").is_symlink()


def test_errors_and_warnings_beside_the_table(tmp_path):
    with _new(tmp_path) as w:
        w.record_error("/lib/bad.wav", "cannot decode")
        w.record_error("/lib/worse.wav", "truncated")
        assert [e["path"] for e in w.errors()] == ["/lib/bad.wav", "/lib/worse.wav"]
        w.rewrite_errors([{"path": "/lib/worse.wav", "error": "truncated"}])
        w.rewrite_warnings([{"path": "/lib/a.wav", "warnings": ["short read"]}])
        w.compact(retain=datetime.timedelta(0))  # Lance's cleanup leaves our files alone
    lines = (tmp_path / "st.lance" / "errors.jsonl").read_text().splitlines()
    assert [json.loads(x)["path"] for x in lines] == ["/lib/worse.wav"]
    r = Store.open(tmp_path / "st.lance")
    assert r.warnings() == [{"path": "/lib/a.wav", "warnings": ["short read"]}]
    with Store.open(tmp_path / "st.lance", write=True) as w:
        w.rewrite_errors([])
    assert not (tmp_path / "st.lance" / "errors.jsonl").exists()


def test_manifest_entries_change_in_a_new_version(tmp_path):
    with _new(tmp_path) as w:
        v = w.update_manifest({"library_roots": ["/lib"]})
        assert w.manifest["library_roots"] == ["/lib"]
        with pytest.raises(StoreError, match="weights_sha256 cannot change"):
            w.update_manifest({"weights_sha256": "other"})
        w.write(_items("a"), _vecs(1))
    assert v == 2 and Store.open(tmp_path / "st.lance").manifest["library_roots"] == ["/lib"]


def test_other_tools_read_the_same_vectors(tmp_path):
    """No mlx-clap code: Lance's pyarrow dataset and DuckDB over it give the stored vectors and metadata."""
    duckdb = pytest.importorskip("duckdb")
    for dtype in ("float32", "float16"):
        out = tmp_path / dtype
        with Store.create(out, MANIFEST, dim=DIM, dtype=dtype, segments=SEGMENTS) as w:
            w.write(_items("ab"), _vecs(2), _segs(2, 1))
            w.write(_items("c"), _vecs(1, 7), _segs(1, 2))
            ours = w.matrix()
        ds = lance.dataset(str(out))
        meta = json.loads(ds.schema.metadata[b"mlx_clap"])
        assert meta["weights_sha256"] == "w0" and meta["store"]["segments"] == SEGMENTS
        files = ds.to_table(filter="kind = 'file'", columns=["path", "kind", "vector"])
        by_arrow = np.array(files.column("vector").to_pylist(), dtype=np.float32)
        np.testing.assert_array_equal(by_arrow, ours)
        if dtype == "float16":
            # DuckDB has no half floats: it reads such a store through a float32 cast in pyarrow.
            f32 = pa.list_(pa.float32(), DIM)
            ds = files.set_column(2, "vector", files.column("vector").cast(f32))
        rows = duckdb.sql("SELECT path, vector FROM ds WHERE kind = 'file' ORDER BY path").fetchall()
        assert [r[0] for r in rows] == ["/lib/a.wav", "/lib/b.wav", "/lib/c.wav"]
        np.testing.assert_array_equal(np.array([r[1] for r in rows], dtype=np.float32), ours)
    ds = lance.dataset(str(tmp_path / "float32"))
    n_seg = duckdb.sql("SELECT count(*) FROM ds WHERE kind = 'segment' AND path = '/lib/b.wav'").fetchall()
    assert n_seg == [(2,)]


def test_a_moderate_store(tmp_path):
    """5000 files with 3 segments each, written in 20 commits with re-embeds and removals, compacted:
    every path keeps its own vectors."""
    rng = np.random.default_rng(0)
    want: dict[str, np.ndarray] = {}
    with _new(tmp_path, segments=SEGMENTS, dtype="float32") as w:
        for c in range(20):
            names = [f"d{c % 7}/f{i}" for i in rng.choice(1500, size=250, replace=False)]
            vecs = _vecs(len(names), seed=c)
            segs = [
                (np.array([0.0, 5.0, 10.0]), np.array([10.0, 15.0, 20.0]), _vecs(3, c * 1000 + i))
                for i in range(len(names))
            ]
            w.write(_items(names, tag=str(c)), vecs, segs)
            for n, v, s in zip(names, vecs, segs, strict=True):
                want[f"/lib/{n}.wav"] = np.concatenate([v[None], s[2]])
            if c % 5 == 4:
                gone = sorted(want)[::50]
                w.remove(gone)
                for p in gone:
                    del want[p]
        # Before the compaction (many fragments, deletions): the writer's incremental view is what a
        # fresh open reads, and the streamed blocks are what random takes give.
        fresh = Store.open(tmp_path / "st.lance")
        assert _paths(fresh) == _paths(w) and fresh.version == w.version
        view = fresh.segment_view()
        assert view._identity
        streamed = np.concatenate([b for _, b in view.iter_blocks(block_rows=1000)])
        np.testing.assert_array_equal(streamed, view.take(np.arange(len(view))))
        np.testing.assert_array_equal(fresh.matrix(), fresh.take(np.arange(len(fresh))))
        w.compact()
    r = Store.open(tmp_path / "st.lance")
    assert sorted(_paths(r)) == sorted(want) and len(set(_paths(r))) == len(r)
    m, view = r.matrix(), r.segment_view()
    for i in rng.choice(len(r), size=200, replace=False):
        p = r.items[i]["path"]
        np.testing.assert_array_equal(m[i], want[p][0])
        np.testing.assert_array_equal(view.take(view.of_file(i)), want[p][1:])


def test_vectors_are_written_as_uncompressed_mini_blocks(tmp_path):
    """The vector column's layout is what exact search's speed rests on: both write paths (a commit of
    the writer's own, a worker's fragments) lay it out as uncompressed mini-blocks, which decode about 2x
    faster than Lance's default full-zip pages (docs/performance.md, "Exact search")."""
    from lance.file import LanceFileReader

    from mlx_clap.store.schema import VECTOR_ENCODING

    dim = 512  # CLAP's width: Lance's default layout for rows this wide is full-zip, not mini-blocks
    manifest = {**MANIFEST, "embedding_dim": dim}
    with Store.create(tmp_path / "st.lance", manifest, dim=dim) as w:
        w.write(_items("ab"), _vecs(2, dim=dim))
        w.commit([write_rows(w.target(), _items("c"), _vecs(1, 1, dim=dim))])
    r = Store.open(tmp_path / "st.lance")
    assert r.dataset.schema.field("vector").metadata == {
        k.encode(): v.encode() for k, v in VECTOR_ENCODING.items()
    }
    files = sorted((tmp_path / "st.lance" / "data").glob("*.lance"))
    assert len(files) == 2
    for f in files:
        column = LanceFileReader(str(f)).metadata().columns[-1]
        assert column.pages and all("MiniBlockLayout" in str(p.encoding) for p in column.pages), f
