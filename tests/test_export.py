"""`mlx-clap export`: every format reads back to the store's vectors; OUT is never partial or a user's."""

from __future__ import annotations

import json
import os
import re
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from fixtures import create_store

from mlx_clap.cli import export as cli_export
from mlx_clap.search import export as ex
from mlx_clap.search.export import ExportError, export_store, json_targets
from mlx_clap.store import Store

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

DIM = 8
MANIFEST = {"model": "tiny-model", "weights_sha256": "ab" * 32}
PATHS = ["/music/x/a.wav", "/music/y/a.wav", "/music/x/b.flac", "/music/y/deep/c.mp3", "/music/x/d.wav"]


def _unit(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _items(paths):
    return [{"path": p, "size": 10 + i, "mtime": 1.0 + i, "duration": 2.5 + i} for i, p in enumerate(paths)]


def make_store(root, paths=PATHS, seed=0, dtype="float16", shard_size=2) -> Store:
    """A store of len(paths) random unit vectors; small shards so exports cross shard boundaries."""
    s = create_store(root, MANIFEST, DIM, dtype, shard_size)
    s.write(_items(paths), _unit(len(paths), seed))
    return Store.open(root)


# Files 0, 2 and 3 have 2, 3 and 1 windows (2 s long, 1 s apart); files 1 and 4 have none.
WINDOWS = {0: [0.0, 1.0], 2: [0.0, 1.0, 2.0], 3: [0.0]}


def segmented_store(root) -> Store:
    s = create_store(root, MANIFEST, DIM, "float16", 2, segments={"hop": 1.0, "window": 2.0})
    segments = []
    for f in range(len(PATHS)):
        starts = np.asarray(WINDOWS.get(f, []), np.float64)
        segments.append((starts, starts + 2.0, _unit(starts.size, 10 + f)) if starts.size else None)
    s.write(_items(PATHS), _unit(len(PATHS), 0), segments=segments)
    return Store.open(root)


def parquet_vectors(table) -> np.ndarray:
    col = table.column("vector").combine_chunks()
    return col.flatten().to_numpy().reshape(len(col), -1)


def leftovers(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith("."))


# ------------------------------------------------------------------------------------------- parquet
def test_parquet_file_rows_read_back(tmp_path):
    store = make_store(tmp_path / "st")
    out = tmp_path / "v.parquet"
    calls = []
    summary = export_store(store, out, "parquet", batch_rows=2, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(0, 5), (2, 5), (4, 5), (5, 5)]
    table = pq.read_table(out)
    np.testing.assert_array_equal(parquet_vectors(table), store.matrix())
    assert table.column("path").to_pylist() == PATHS
    assert set(table.column("kind").to_pylist()) == {"file"}
    assert table.column("start").null_count == len(PATHS) and table.column("end").null_count == len(PATHS)
    assert table.column("duration").to_pylist() == [it["duration"] for it in store.items]
    assert table.schema.field("vector").type == pa.list_(pa.float32(), DIM)
    meta = table.schema.metadata
    assert meta[b"model"] == b"tiny-model" and meta[b"dim"] == str(DIM).encode()
    assert json.loads(meta[ex.PARQUET_META_KEY])["tool"] == ex.EXPORT_TOOL
    assert pq.ParquetFile(out).num_row_groups == 3  # streamed in batches of 2 rows: 2 + 2 + 1
    assert (summary.rows, summary.files, summary.segments, summary.level) == (5, 5, 0, "file")
    assert leftovers(tmp_path) == []


def test_parquet_segments_levels(tmp_path):
    store = segmented_store(tmp_path / "st")
    view = store.segment_view()
    both = pq.read_table(export_store(store, tmp_path / "both.parquet", "parquet", batch_rows=4).out)
    kinds = both.column("kind").to_pylist()
    assert kinds == ["file"] * 5 + ["segment"] * 6  # the default with segments is both
    vecs = parquet_vectors(both)
    np.testing.assert_array_equal(vecs[:5], store.matrix())
    np.testing.assert_array_equal(vecs[5:], view.matrix())
    seg = both.slice(5)
    assert seg.column("path").to_pylist() == [PATHS[i] for i in view.file_index]
    assert seg.column("start").to_pylist() == view.start.tolist()
    assert seg.column("end").to_pylist() == view.end.tolist()
    assert seg.column("duration").to_pylist() == [store.items[i]["duration"] for i in view.file_index]
    only = pq.read_table(export_store(store, tmp_path / "seg.parquet", "parquet", level="segment").out)
    assert set(only.column("kind").to_pylist()) == {"segment"}
    np.testing.assert_array_equal(parquet_vectors(only), view.matrix())
    files = pq.read_table(export_store(store, tmp_path / "file.parquet", "parquet", level="file").out)
    np.testing.assert_array_equal(parquet_vectors(files), store.matrix())
    record = json.loads(both.schema.metadata[ex.PARQUET_META_KEY])
    assert record["segments"] == 6 and record["segment_settings"] == {"hop": 1.0, "window": 2.0}


def test_missing_pyarrow_names_the_extra(tmp_path, monkeypatch):
    store = make_store(tmp_path / "st")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ExportError, match=r"pip install 'pyarrow.*-e '\.\[parquet\]'"):
        export_store(store, tmp_path / "v.parquet", "parquet")
    assert sorted(os.listdir(tmp_path)) == ["st"]


# ----------------------------------------------------------------------------------------------- npy
def test_npy_without_segments(tmp_path):
    store = make_store(tmp_path / "st", dtype="float32", shard_size=3)
    out = tmp_path / "npy"
    export_store(store, out, "npy", batch_rows=2)
    vectors = np.load(out / "vectors.npy")
    assert vectors.dtype == np.float32
    np.testing.assert_array_equal(vectors, store.matrix())
    lines = [json.loads(x) for x in (out / "index.jsonl").read_text().splitlines()]
    assert [x["path"] for x in lines] == PATHS
    assert lines[0] == {"path": PATHS[0], "kind": "file", "start": None, "end": None, "duration": 2.5}
    assert sorted(os.listdir(out)) == [ex.MARKER_NAME, "index.jsonl", "vectors.npy"]
    assert json.loads((out / ex.MARKER_NAME).read_text())["format"] == "npy"


def test_npy_with_segments(tmp_path):
    store = segmented_store(tmp_path / "st")
    view = store.segment_view()
    out = tmp_path / "npy"
    export_store(store, out, "npy", batch_rows=4)
    np.testing.assert_array_equal(np.load(out / "vectors.npy"), store.matrix())
    np.testing.assert_array_equal(np.load(out / "segments.npy"), view.matrix())
    lines = [json.loads(x) for x in (out / "segments.jsonl").read_text().splitlines()]
    assert [(x["path"], x["kind"], x["start"], x["end"]) for x in lines] == [
        (PATHS[f], "segment", s, e) for f, s, e in zip(view.file_index, view.start, view.end, strict=True)
    ]
    export_store(store, tmp_path / "seg-only", "npy", level="segment")
    assert not (tmp_path / "seg-only" / "vectors.npy").exists()
    np.testing.assert_array_equal(np.load(tmp_path / "seg-only" / "segments.npy"), view.matrix())


# ---------------------------------------------------------------------------------------------- json
def test_json_one_file_per_audio_without_collisions(tmp_path):
    store = make_store(tmp_path / "st")
    out = tmp_path / "js"
    export_store(store, out, "json")
    # The common folder is /music: the two a.wav land in x/ and y/.
    names = ["x/a.wav.json", "y/a.wav.json", "x/b.flac.json", "y/deep/c.mp3.json", "x/d.wav.json"]
    matrix = store.matrix()
    for row, name in enumerate(names):
        doc = json.loads((out / name).read_text())
        assert doc["path"] == PATHS[row] and doc["filename"] == os.path.basename(PATHS[row])
        assert (doc["model"], doc["dim"], doc["duration"]) == ("tiny-model", DIM, 2.5 + row)
        np.testing.assert_array_equal(np.asarray(doc["embedding"], np.float32), matrix[row])
        assert "segments" not in doc


def test_json_with_segments(tmp_path):
    store = segmented_store(tmp_path / "st")
    view = store.segment_view()
    out = tmp_path / "js"
    summary = export_store(store, out, "json")
    assert (summary.files, summary.segments) == (5, 6)
    doc = json.loads((out / "x" / "b.flac.json").read_text())  # file 2: segments 2, 3, 4
    assert [(s["start"], s["end"]) for s in doc["segments"]] == [(0.0, 2.0), (1.0, 3.0), (2.0, 4.0)]
    np.testing.assert_array_equal(
        np.asarray([s["embedding"] for s in doc["segments"]], np.float32), view.matrix()[2:5]
    )
    assert len(view) == 6 and list(view.file_index) == [0, 0, 2, 2, 2, 3]
    assert json.loads((out / "y" / "a.wav.json").read_text())["segments"] == []
    plain = export_store(store, tmp_path / "plain", "json", level="file")
    assert plain.segments == 0 and "segments" not in json.loads(
        (tmp_path / "plain" / "x" / "a.wav.json").read_text()
    )
    with pytest.raises(ExportError, match="level"):
        export_store(store, tmp_path / "bad", "json", level="segment")


def test_json_targets_stay_unique_and_inside():
    paths = ["/r/k/a.wav", "/r/k/A.wav", "/r/k/a.wav", "/r/k/a.wav.json/b.wav", "/r/z/../k/c.wav"]
    assert json_targets(paths) == [
        "a.wav.2.json",  # "a.wav.json" is a folder (of the 4th file)
        "A.wav.3.json",  # case-insensitive file systems (macOS) would merge it with a.wav.2.json
        "a.wav.4.json",  # the same path twice: both rows kept
        os.path.join("a.wav.json", "b.wav.json"),
        "c.wav.json",  # "/r/z/../k/c.wav" is /r/k/c.wav
    ]
    assert json_targets(["/only/one.wav"]) == ["one.wav.json"]
    assert json_targets(["/r/.mlx-clap-export"]) == [".mlx-clap-export.2.json"]  # never the marker


# ------------------------------------------------------------------------------ OUT: refuse, replace
@pytest.mark.parametrize("fmt,name", [("parquet", "v.parquet"), ("npy", "npy"), ("json", "js")])
def test_existing_out_refused_then_overwritten(tmp_path, fmt, name):
    store = make_store(tmp_path / "st")
    out = tmp_path / name
    export_store(store, out, fmt)
    with pytest.raises(ExportError, match="exists already.*--overwrite"):
        export_store(store, out, fmt)
    bigger = make_store(tmp_path / "st2", paths=PATHS + ["/music/x/e.wav"], seed=3)
    summary = export_store(bigger, out, fmt, overwrite=True)
    assert summary.files == 6
    if fmt == "parquet":
        np.testing.assert_array_equal(parquet_vectors(pq.read_table(out)), bigger.matrix())
    elif fmt == "npy":
        np.testing.assert_array_equal(np.load(out / "vectors.npy"), bigger.matrix())
    else:
        doc = json.loads((out / "x" / "e.wav.json").read_text())
        np.testing.assert_array_equal(np.asarray(doc["embedding"], np.float32), bigger.matrix()[5])
    assert leftovers(tmp_path) == []


def test_overwrite_across_formats(tmp_path):
    store = make_store(tmp_path / "st")
    out = tmp_path / "out"
    export_store(store, out, "npy")
    export_store(store, out, "parquet", overwrite=True)  # our folder becomes our file
    np.testing.assert_array_equal(parquet_vectors(pq.read_table(out)), store.matrix())
    export_store(store, out, "json", overwrite=True)
    assert (out / "x" / "a.wav.json").is_file()


def test_overwrite_never_replaces_a_users_files(tmp_path):
    store = make_store(tmp_path / "st")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not an mlx-clap export"):
        export_store(store, mine, "npy", overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me"
    csv = tmp_path / "table.parquet"
    csv.write_text("a,b\n1,2\n")
    with pytest.raises(ExportError, match="not an mlx-clap export"):
        export_store(store, csv, "parquet", overwrite=True)
    assert csv.read_text() == "a,b\n1,2\n"
    ours = tmp_path / "npy"
    export_store(store, ours, "npy")
    (ours / "my-labels.csv").write_text("x")  # a user's file put into our export
    with pytest.raises(ExportError, match="did not write.*my-labels.csv"):
        export_store(store, ours, "npy", overwrite=True)
    assert (ours / "my-labels.csv").exists() and (ours / "vectors.npy").exists()
    link = tmp_path / "link"
    link.symlink_to(ours)
    with pytest.raises(ExportError, match="symbolic link"):
        export_store(store, link, "npy", overwrite=True)
    with pytest.raises(ExportError, match="store folder"):
        export_store(store, tmp_path / "st" / "export", "npy")
    empty = tmp_path / "empty"
    empty.mkdir()
    export_store(store, empty, "npy", overwrite=True)  # an empty folder holds nothing to lose
    assert (empty / "vectors.npy").is_file()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
@pytest.mark.parametrize("fmt", ["parquet", "npy", "json"])
def test_unwritable_parent_is_named(tmp_path, fmt):
    store = make_store(tmp_path / "st")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ExportError, match=re.escape(f"{locked}: cannot write there: permission denied")):
            export_store(store, locked / "out", fmt)
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("fmt", ["parquet", "npy", "json"])
def test_interrupt_leaves_no_partial_out(tmp_path, fmt):
    store = segmented_store(tmp_path / "st")
    out = tmp_path / "out"

    def stop(done, total):
        if done:  # after the first batch is written: the export is half made
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_store(store, out, fmt, batch_rows=2, progress=stop)
    assert sorted(os.listdir(tmp_path)) == ["st"]
    export_store(store, out, fmt)  # an interrupted --overwrite keeps the previous export whole
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.is_dir() else out.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        export_store(store, out, fmt, overwrite=True, batch_rows=2, progress=stop)
    after = sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.is_dir() else out.read_bytes()
    assert after == before and leftovers(tmp_path) == []


def test_segments_asked_of_a_store_without_them(tmp_path):
    store = make_store(tmp_path / "st")
    for level in ("segment", "both"):
        with pytest.raises(ExportError, match="no segments.*--level file"):
            export_store(store, tmp_path / "out", "npy", level=level)
    assert sorted(os.listdir(tmp_path)) == ["st"]


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_json_summary_help_and_errors(tmp_path):
    make_store(tmp_path / "st")
    runner = CliRunner()
    out = tmp_path / "v.parquet"
    res = runner.invoke(
        cli_export.export, [str(tmp_path / "st"), "--to", "parquet", str(out), "--json", "-q"]
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert {k: summary[k] for k in ("rows", "files", "segments", "out")} == {
        "rows": 5,
        "files": 5,
        "segments": 0,
        "out": str(out),
    }
    assert summary["seconds"] >= 0
    again = runner.invoke(cli_export.export, [str(tmp_path / "st"), "--to", "parquet", str(out)])
    assert again.exit_code == 1 and "exists already" in again.output
    help_text = runner.invoke(cli_export.export, ["--help"]).output
    assert "Example" in help_text and "mlx-clap export vectors/ --to parquet" in help_text
    assert cli_export.FORMAT_CHOICES == ex.FORMATS and cli_export.LEVEL_CHOICES == ex.LEVELS


def test_cli_interrupt_says_nothing_was_written(tmp_path, monkeypatch):
    make_store(tmp_path / "st")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ex, "export_store", interrupted)
    res = CliRunner().invoke(
        cli_export.export, [str(tmp_path / "st"), "--to", "npy", str(tmp_path / "o"), "-q"]
    )
    assert res.exit_code == 130 and "nothing was written" in res.output


@pytest.mark.parametrize("fmt", ["npy", "parquet"])
def test_a_killed_exports_leftovers_are_removed_by_the_next(tmp_path, fmt):
    """SIGKILL mid-export leaves its staging beside OUT; the next export to OUT removes it, while the
    staging of an export still running (here: this process's id), or of another machine's, is left alone."""
    import signal
    import subprocess

    store = segmented_store(tmp_path / "st")
    out = tmp_path / "out"
    code = (
        "import sys, time\n"
        "from mlx_clap.store import Store\n"
        "from mlx_clap.search.export import export_store\n"
        "def hang(done, total):\n"
        "    if done:\n"
        "        print('half', flush=True); time.sleep(600)\n"
        f"export_store(Store.open(sys.argv[1]), sys.argv[2], {fmt!r}, batch_rows=2, progress=hang)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(store.path), str(out)], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == b"half"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    left = leftovers(tmp_path)
    assert len(left) == 1 and left[0].startswith(f".out.export-{ex._HOST}-{child.pid}-"), left
    running = tmp_path / f".out.export-{ex._HOST}-{os.getpid()}-live"
    running.mkdir()
    # Another machine's export (through a shared folder): its process id says nothing here.
    elsewhere = tmp_path / f".out.export-other_machine-{child.pid}-theirs"
    elsewhere.mkdir()
    export_store(store, out, fmt)
    assert leftovers(tmp_path) == sorted([running.name, elsewhere.name])
    assert out.exists()


def test_other_tools_read_what_export_npy_writes(tmp_path):
    """The store is the product: Lance's pyarrow dataset and DuckDB over it, with no mlx-clap code, give
    the same vectors, in the same order, as `mlx-clap export --to npy` (files and segment windows)."""
    import lance
    import pyarrow.compute as pc

    duckdb = pytest.importorskip("duckdb")
    segmented_store(tmp_path / "st")
    out = tmp_path / "npy"
    result = CliRunner().invoke(cli_export.export, [str(tmp_path / "st"), str(out), "--to", "npy"])
    assert result.exit_code == 0, result.output
    exported = {"file": np.load(out / "vectors.npy"), "segment": np.load(out / "segments.npy")}
    names = {"file": "index.jsonl", "segment": "segments.jsonl"}
    table = lance.dataset(str(tmp_path / "st")).to_table(columns=["path", "kind", "start", "vector"])
    # DuckDB has no half floats: the float16 column goes to it through a float32 cast in pyarrow.
    f32 = table.set_column(3, "vector", table.column("vector").cast(pa.list_(pa.float32(), DIM)))  # noqa: F841 (DuckDB reads it by name)
    for kind in ("file", "segment"):
        lines = [json.loads(x) for x in (out / names[kind]).read_text().splitlines()]
        by_arrow = table.filter(pc.equal(table.column("kind"), kind))
        arrow_vectors = np.array(by_arrow.column("vector").to_pylist(), dtype=np.float32)
        assert by_arrow.column("path").to_pylist() == [x["path"] for x in lines]
        np.testing.assert_array_equal(arrow_vectors, exported[kind])
        rows = duckdb.sql(f"SELECT path, start, vector FROM f32 WHERE kind = '{kind}'").fetchall()
        assert [r[0] for r in rows] == [x["path"] for x in lines]
        np.testing.assert_array_equal(np.array([r[2] for r in rows], dtype=np.float32), exported[kind])
    assert len(exported["segment"]) == sum(len(w) for w in WINDOWS.values())
