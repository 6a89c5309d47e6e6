"""mlx_clap.store under damage: kill -9 mid-write, failed writes, damaged files and versions (check and
repair), and the one-time conversion of format-2 stores."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest
from legacy_store import write_legacy_store

from mlx_clap.store import LegacyStoreError, Store, StoreError, check_store, migrate_store, repair_store
from mlx_clap.store.errors import lance_failure
from mlx_clap.store.schema import rows_table

DIM = 16
MANIFEST = {"model": "tiny", "weights_sha256": "w0", "settings": {"long_audio": "windows-mean"}}
SEGMENTS = {"hop": 5.0, "window": 10.0}


def _vecs(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _items(names, tag: str = "") -> list[dict]:
    return [{"path": f"/lib/{n}.wav", "size": 10, "mtime": 2.0, "sha256": f"s-{n}{tag}"} for n in names]


def _segs(n: int, seed: int) -> list:
    return [(np.array([0.0, 5.0]), np.array([10.0, 12.0]), _vecs(2, seed * 100 + i)) for i in range(n)]


def _state(store: Store) -> tuple:
    view = store.segment_view()
    return (
        [it["path"] for it in store.items],
        store.matrix(),
        list(view.file_index),
        view.matrix(),
    )


def _same(a: tuple, b: tuple) -> None:
    assert a[0] == b[0] and a[2] == b[2]
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[3], b[3])


# ----------------------------------------------------------------------------------- kill -9
# The "same command": 240 files in batches of 6, one commit each, skipping files already stored, a
# compaction every 10 batches, then the removal of every 7th file and a final compaction.
RUN = textwrap.dedent(
    """
    import sys
    import numpy as np
    from mlx_clap.store import Store

    def vecs(n, seed):
        v = np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    out = sys.argv[1]
    seg = {"hop": 5.0, "window": 10.0}
    w = Store.for_run(out, {"model": "tiny", "weights_sha256": "w0"}, dim=16, segments=seg)
    print("ready", flush=True)
    done = {k[0] for k in w.done_keys()}
    for b in range(40):
        print("step", b, flush=True)
        names = [f"/lib/f{b * 6 + i}.wav" for i in range(6)]
        todo = [i for i, p in enumerate(names) if p not in done]
        if not todo:
            continue
        items = [{"path": names[i], "size": 10, "mtime": 2.0, "sha256": f"s{b * 6 + i}"} for i in todo]
        segs = [(np.array([0.0, 5.0]), np.array([10.0, 12.0]), vecs(2, 1000 + b * 6 + i)) for i in todo]
        w.write(items, vecs(6, b)[todo], segs)
        if b % 10 == 9:
            w.compact()
    print("step", 40, flush=True)
    w.remove([f"/lib/f{i}.wav" for i in range(0, 240, 7)])
    print("step", 41, flush=True)
    w.compact()
    w.close()
    print("finished", flush=True)
    """
)


def _run(out: Path, kill_at: tuple[int, float] | None) -> bool:
    """Run RUN on `out`; with `kill_at` (step, seconds), kill -9 it that long after it starts that step.
    True when it finished."""
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    if kill_at is not None:
        for line in proc.stdout:
            if line.strip() == f"step {kill_at[0]}":
                time.sleep(kill_at[1])
                proc.send_signal(signal.SIGKILL)
                break
    out_text, err = proc.communicate(timeout=300)
    if kill_at is None:
        assert proc.returncode == 0, err
    return proc.returncode == 0 and "finished" in out_text


def test_kill_9_at_any_moment_then_the_same_command_gives_the_same_store(tmp_path):
    _run(tmp_path / "whole", None)
    want = _state(Store.open(tmp_path / "whole"))
    assert len(want[0]) == 240 - 35
    rng = random.Random(0)
    out = tmp_path / "killed"
    # Kills in the middle of writes, commits and compactions (steps 9, 19, 29: compaction), in order.
    kills = 0
    for step in sorted(rng.sample(range(42), 6)) + [9, 41]:
        kills += not _run(out, (step, rng.uniform(0.0, 0.05)))
        # After each kill: the last committed version, whole, one row per path, nothing damaged.
        if any(out.glob("_versions/*.manifest")):
            s = Store.open(out)
            paths = [it["path"] for it in s.items]
            assert len(paths) == len(set(paths))
            report = check_store(out, files=False)
            assert report["ok"], report
    assert kills >= 6
    _run(out, None)
    _same(_state(Store.open(out)), want)
    # Data files of killed writers are gone too: what is left is what the kept versions name (versions
    # younger than the retention stay readable, and their files with them).
    named = set()
    for v in lance.dataset(str(out)).versions():
        for frag in lance.dataset(str(out), version=v["version"]).get_fragments():
            named |= {Path(f.path).name for f in frag.data_files()}
    assert {p.name for p in (out / "data").iterdir()} == named


def test_a_failed_write_is_one_line_naming_the_store_and_keeps_what_was_committed(tmp_path):
    """A file-size limit makes Lance's data-file write fail (as a full disk does, with another errno)."""
    out = tmp_path / "st.lance"
    with Store.create(out, MANIFEST, dim=DIM, dtype="float32") as w:
        w.write(_items("ab"), _vecs(2))
    code = textwrap.dedent(
        f"""
        import resource, signal, sys
        import numpy as np
        from mlx_clap.store import Store, StoreError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        w = Store.open({str(out)!r}, write=True)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
        items = [{{"path": f"/lib/n{{i}}.wav", "size": 1, "mtime": 1.0}} for i in range(2000)]
        v = np.ones((2000, {DIM}), np.float32) / 4.0
        try:
            w.write(items, v)
        except StoreError as e:
            print(e)
            sys.exit(3)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stdout + done.stderr
    line = done.stdout.strip()
    assert "\n" not in line and line.startswith(str(out)) and "cannot write the store" in line
    assert "file too large" in line
    s = Store.open(out)
    assert [it["path"] for it in s.items] == ["/lib/a.wav", "/lib/b.wav"]
    np.testing.assert_array_equal(s.matrix(), _vecs(2))


def test_lance_failures_in_plain_words():
    assert lance_failure(OSError(28, "No space left on device")) == "no space left on the device"
    io = "LanceError(IO): Generic LocalFileSystem error: Unable to open file /x/data/a.lance: Read-only file system (os error 30), /home/runner/work/lance/rust/lance-io/src/local.rs:12:5"  # noqa: E501
    assert lance_failure(ValueError(io)) == "permission denied (read-only folder?)"
    assert "endpoint unreachable" in lance_failure(
        OSError("error sending request for url (http://127.0.0.1:1)")
    )
    odd = "LanceError(IO): something else, /home/runner/work/lance/rust/x.rs:1:2"
    assert lance_failure(RuntimeError(odd)) == "something else"


# ------------------------------------------------------------------------------- check, repair
def _store_of_three_commits(tmp_path, dtype: str = "float32") -> Path:
    out = tmp_path / "st.lance"
    with Store.create(out, MANIFEST, dim=DIM, dtype=dtype, segments=SEGMENTS) as w:
        w.write(_items("abc"), _vecs(3), _segs(3, 1))
        w.write(_items("de"), _vecs(2, 1), _segs(2, 2))
        w.write(_items("f"), _vecs(1, 2), _segs(1, 3))
    return out


def _data_file_of(out: Path, path: str) -> Path:
    ds = lance.dataset(str(out))
    for frag in ds.get_fragments():
        if path in frag.to_table(columns=["path"]).column("path").to_pylist():
            (f,) = frag.data_files()
            return out / "data" / f.path
    raise AssertionError(path)


def _kept_rows_unchanged(out: Path, before: tuple, lost: set[str]) -> None:
    """After a repair: the store opens, check is clean, and every surviving path has its own vectors."""
    s = Store.open(out)
    after = _state(s)
    assert check_store(out, files=False)["ok"]
    keep = [i for i, p in enumerate(before[0]) if p not in lost]
    assert after[0] == [before[0][i] for i in keep]
    np.testing.assert_array_equal(after[1], before[1][keep])
    seg_keep = [j for j, f in enumerate(before[2]) if before[0][f] not in lost]
    np.testing.assert_array_equal(after[3], before[3][seg_keep])


def test_a_flipped_byte_in_a_vector_is_found_and_only_that_file_dropped(tmp_path):
    out = _store_of_three_commits(tmp_path)
    before = _state(Store.open(out))
    f = _data_file_of(out, "/lib/e.wav")
    data = bytearray(f.read_bytes())
    at = data.find(_vecs(2, 1)[1].tobytes())  # file row /lib/e.wav
    assert at > 0
    data[at + 5] ^= 0x40
    f.write_bytes(bytes(data))
    report = check_store(out, files=False)
    assert not report["ok"]
    assert [(d["path"], d["kind"]) for d in report["damaged_rows"]] == [("/lib/e.wav", "file")]
    assert report["damaged_rows"][0]["cause"].startswith("checksum mismatch")
    assert repair_store(out, report) == 3  # its file row and both its segments
    _kept_rows_unchanged(out, before, {"/lib/e.wav"})


def test_a_missing_data_file_is_found_and_never_re_points_other_rows(tmp_path):
    out = _store_of_three_commits(tmp_path)
    before = _state(Store.open(out))
    _data_file_of(out, "/lib/d.wav").unlink()
    with pytest.raises(StoreError, match=r"st.lance: cannot read the store's rows .*check STORE"):
        Store.open(out)
    report = check_store(out, files=False)
    (frag,) = report["damaged_fragments"]
    assert not report["ok"] and frag["rows"] == 6 and frag["paths"] is None
    assert "unreadable data" in frag["cause"]
    assert repair_store(out, report) == 6
    _kept_rows_unchanged(out, before, {"/lib/d.wav", "/lib/e.wav"})


def test_a_damaged_newest_version_is_named_and_set_aside(tmp_path):
    out = _store_of_three_commits(tmp_path)
    v = Store.open(out).version
    before = _state(Store.open(out, version=v - 1))
    newest = min((out / "_versions").glob("*.manifest"))  # Lance names versions in reverse order
    newest.write_bytes(newest.read_bytes()[:40])
    with pytest.raises(
        StoreError, match=rf"version {v} is damaged or half-written.*version {v - 1} is readable"
    ):
        Store.open(out)
    report = check_store(out, files=False)
    assert not report["ok"] and report["version"] == v - 1
    assert [u["version"] for u in report["unreadable_versions"]] == [v]
    repair_store(out, report)
    s = Store.open(out)
    assert s.version == v - 1
    _same(_state(s), before)
    assert (newest.parent / (newest.name + ".damaged")).is_file()
    with Store.open(out, write=True) as w:  # and it is writable again
        w.write(_items("g"), _vecs(1, 9), _segs(1, 9))


def test_rows_that_disagree_are_found(tmp_path):
    """A segment of no file row, a non-finite vector written by another tool, and a file changed on disk."""
    out = _store_of_three_commits(tmp_path)
    before = _state(Store.open(out))
    ds = lance.dataset(str(out))
    stray = rows_table(_items(["zz"]), _vecs(1, 5), _segs(1, 5), ds.schema, "x")
    stray = stray.filter(pa.compute.equal(stray.column("kind"), "segment"))
    nan = rows_table(_items(["n"]), _vecs(1, 6), None, ds.schema, "x")
    vec = pa.FixedSizeListArray.from_arrays(pa.array(np.full(DIM, np.nan, np.float32)), DIM)
    at = nan.schema.get_field_index("vector")
    nan = nan.set_column(at, nan.schema.field(at), [vec])
    lance.write_dataset(pa.concat_tables([stray, nan]), str(out), mode="append")
    real = tmp_path / "real.wav"
    real.write_bytes(b"x" * 10)
    with Store.open(out, write=True) as w:
        w.write([{"path": str(real), "size": 3, "mtime": 1.0}], _vecs(1, 7), _segs(1, 7))
    report = check_store(out)
    causes = {(d["path"], d["cause"].split(" (")[0]) for d in report["damaged_rows"]}
    assert causes == {
        ("/lib/zz.wav", "segment of no file row"),
        ("/lib/n.wav", "NaN or Inf values"),
        ("/lib/n.wav", "file row without segments in a segment store"),
    }
    assert report["orphan_rows"] == 2
    stale = {s["path"]: s["cause"] for s in report["stale_rows"]}
    assert stale[str(real)].startswith("file changed") and stale["/lib/a.wav"] == "file missing"
    repair_store(out, report)
    s = Store.open(out)
    assert [it["path"] for it in s.items] == [*before[0], str(real)]
    np.testing.assert_array_equal(s.matrix()[:-1], before[1])


# ------------------------------------------------------------------------------------ migration
def _format2_store(path: Path) -> dict:
    """A format-2 store as that format's writer left it after a compaction (generation 1) and more runs:
    segments, a superseded row, a copy sharing its segment rows, a path that is not UTF-8, errors.jsonl,
    and a torn last line of a killed append. Returns what its reader showed (live rows, in row order)."""
    odd = "/lib/x\udcff.wav"
    names = ["/lib/a.wav", odd, "/lib/b.wav", "/lib/b.wav", "/lib/c.wav"]
    items = [
        {"path": p, "size": 10, "mtime": 2.0, "duration": 12.0, "seg": [2 * k, 2]}
        for k, p in enumerate(names)
    ]
    items[0]["sha256"] = "sa"
    items[3]["size"] = 11  # b again: this row supersedes row 2
    items[4] = {"path": "/lib/c.wav", "size": 4, "mtime": 3.0, "seg": [0, 2]}  # a copy of a.wav
    seg_rows = [{"start": s, "end": e} for _ in range(4) for s, e in ((0.0, 10.0), (5.0, 12.0))]
    vectors, seg_vectors = _vecs(5), _vecs(8, 1)
    write_legacy_store(
        path,
        {"model": "tiny", "weights_sha256": "w0", "store_dtype": "float16"},
        items,
        vectors,
        dtype="float16",
        segments=SEGMENTS,
        seg_rows=seg_rows,
        seg_vectors=seg_vectors,
        generation=1,
    )
    with open(path / "data-1" / "items.jsonl", "ab") as fh:
        fh.write(b'{"path": "/lib/torn')
    (path / "errors.jsonl").write_text(json.dumps({"path": "/lib/bad.wav", "error": "cannot decode"}) + "\n")
    live = [0, 1, 3, 4]
    seg_of = {0: [0, 1], 1: [2, 3], 3: [6, 7], 4: [0, 1]}
    return {
        "paths": [names[r] for r in live],
        "sizes": [items[r]["size"] for r in live],
        "matrix": vectors[live].astype(np.float16).astype(np.float32),
        "raw": vectors[live].astype(np.float16),
        "segments": np.concatenate([seg_vectors[seg_of[r]] for r in live])
        .astype(np.float16)
        .astype(np.float32),
        "seg_files": [0, 0, 1, 1, 2, 2, 3, 3],
    }


def test_a_format2_store_is_migrated_once_with_the_same_rows(tmp_path):
    path = tmp_path / "old"
    old = _format2_store(path)
    assert old["paths"] == ["/lib/a.wav", "/lib/x\udcff.wav", "/lib/b.wav", "/lib/c.wav"]
    with pytest.raises(LegacyStoreError, match="older mlx-clap"):
        Store.open(path)
    s = Store.open(path, migrate=True)
    assert [it["path"] for it in s.items] == old["paths"]
    assert [it["size"] for it in s.items] == old["sizes"] and s.items[0]["sha256"] == "sa"
    assert s.dtype == "float16"
    raw = np.concatenate([b for _, b in s.iter_shards()])
    assert raw.dtype == np.float16 and raw.tobytes() == old["raw"].tobytes()  # bit for bit
    view = s.segment_view()
    assert list(view.file_index) == old["seg_files"]
    np.testing.assert_array_equal(view.matrix(), old["segments"])
    assert s.manifest["migrated_from_format"] == 2 and s.segment_settings == SEGMENTS
    assert sorted(p.name for p in path.iterdir()) == [
        ".writer.lock",
        "_transactions",
        "_versions",
        "data",
        "errors.jsonl",
    ]
    assert s.errors()[0]["path"] == "/lib/bad.wav"
    assert check_store(path, files=False)["ok"]
    with Store.for_run(path, {"weights_sha256": "w0", "store_dtype": "float16"}, dim=DIM) as w:
        assert len(w) == 4  # the same pipeline goes on in the converted store


def test_a_migration_cut_short_leaves_the_old_store_and_is_redone(tmp_path, monkeypatch):
    from mlx_clap.store import migrate as mig
    from mlx_clap.store.legacy import LegacyStore

    path = tmp_path / "old"
    old = _format2_store(path)
    calls = {"n": 0}
    real_rows_table = mig.rows_table

    def failing(*a, **k):  # the process dies while the data files are written, before the commit
        calls["n"] += 1
        raise KeyboardInterrupt

    monkeypatch.setattr(mig, "rows_table", failing)
    with pytest.raises(KeyboardInterrupt):
        migrate_store(path)
    assert calls["n"] == 1 and not list((path / "_versions").glob("*.manifest"))
    assert [it["path"] for it in LegacyStore(path).items] == old["paths"]  # the old store is whole
    monkeypatch.setattr(mig, "rows_table", real_rows_table)
    # Killed after the commit, before the old files were removed: the next open finishes the job.
    monkeypatch.setattr(mig, "remove_legacy_entries", lambda loc: None)
    migrate_store(path)
    assert (path / "manifest.json").is_file() and list((path / "_versions").glob("*.manifest"))
    monkeypatch.undo()
    s = Store.open(path, migrate=True)
    assert not (path / "manifest.json").exists() and not (path / "shards").exists()
    np.testing.assert_array_equal(s.matrix(), old["matrix"])


def test_a_format1_store_is_migrated(tmp_path):
    path = write_legacy_store(tmp_path / "v1", {"model": "m"}, _items("ab"), _vecs(2), format_version=None)
    r = Store.open(path, migrate=True)
    assert r.manifest["migrated_from_format"] == 1 and not r.has_segments
    np.testing.assert_array_equal(r.matrix(), _vecs(2))
    assert os.listdir(path).count("items.jsonl") == 0
