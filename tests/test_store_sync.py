"""The store mirrors the library: sync (changed, deleted, renamed, copied files), superseded rows,
compaction, segments in the store (on Lance, mlx_clap.store; kill -9 at any moment of a write or a
compaction is tests/test_lance_store_integrity.py's, older formats are migrated there too).

The CLI tests use the session's tiny random model (conftest.tiny_model_dir)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import REPO_ROOT
from fixtures import run, summary_of

from mlx_clap.store import Store, StoreError

SR = 48000


def embed_args(
    inputs: Path | list[Path], model: Path, out: Path, *options: str, recursive: bool = True
) -> list[str]:
    """`mlx-clap embed` of `inputs` (with -r unless recursive=False) into the store `out`, quiet (-q),
    then `options`. As strings, so the same list also runs in a subprocess."""
    named = inputs if isinstance(inputs, list) else [inputs]
    args = ["embed", *named, *(["-r"] if recursive else []), "--model", model, "--out", out, "-q", *options]
    return [str(a) for a in args]


def write_clip(path: Path, seed: int, seconds: float = 1.0) -> None:
    rng = np.random.default_rng(seed)
    sf.write(path, 0.1 * rng.standard_normal(int(seconds * SR)).astype(np.float32), SR)


def live_state(store_path: Path) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """Path -> item (without mtime) and path -> vector of a store's live rows."""
    store = Store.open(store_path)
    m = store.matrix()
    assert len({it["path"] for it in store.items}) == len(store.items), "two rows for one path"
    items = {it["path"]: {k: v for k, v in it.items() if k not in ("mtime", "seg")} for it in store.items}
    return items, {it["path"]: m[i] for i, it in enumerate(store.items)}


@pytest.fixture()
def library(tmp_path) -> Path:
    lib = tmp_path / "lib"
    (lib / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.wav", "b.wav", "c.wav", "d.wav", "e.wav", "sub/f.wav"]):
        write_clip(lib / name, seed=i)
    return lib


# ------------------------------------------------------------------------------------------- sync
def test_edit_delete_rename_copy_touch_mirrors_the_folder(tiny_model_dir, library, tmp_path):
    store = tmp_path / "store"
    args = embed_args(library, tiny_model_dir, store, "--summary-json", "--batch-size", "1")
    first = run(args)
    assert first.exit_code == 0, first.output
    assert summary_of(first)["embedded"] == 6

    os.utime(library / "a.wav", (1_000_000, 1_000_000))  # touched: same content, new mtime
    write_clip(library / "b.wav", seed=99)  # new audio
    (library / "c.wav").unlink()  # deleted
    (library / "d.wav").rename(library / "d-renamed.wav")  # renamed
    shutil.copy(library / "e.wav", library / "sub" / "e-copy.wav")  # copied
    second = run(args)
    assert second.exit_code == 0, second.output
    s = summary_of(second)
    assert (s["embedded"], s["reused"], s["removed"], s["skipped"], s["failed"]) == (1, 3, 2, 2, 0)

    items, vectors = live_state(store)
    now = sorted(str(p) for p in library.rglob("*.wav"))
    assert sorted(items) == now  # exactly one row per current file, nothing for the gone ones
    # The same vectors as a fresh embed of the library as it is now.
    fresh = tmp_path / "fresh"
    # One file per model call in both runs: batch neighbours change float32 sums in their last bits.
    assert run(embed_args(library, tiny_model_dir, fresh, "--batch-size", "1")).exit_code == 0
    fresh_items, fresh_vectors = live_state(fresh)
    assert sorted(fresh_items) == now
    for p in now:
        np.testing.assert_array_equal(vectors[p], fresh_vectors[p])
        assert items[p]["sha256"] == fresh_items[p]["sha256"]
    st = Store.open(store)
    assert st.dead_rows == 0 and len(st.dataset.get_fragments()) == 1  # compacted at the end of the run

    third = run(args)  # nothing changed: nothing written
    assert summary_of(third)["skipped"] == 6 and summary_of(third)["embedded"] == 0
    assert summary_of(third)["up_to_date"]  # answered from stats alone: the model was not loaded
    assert Store.open(store).version == st.version


def test_search_and_dedupe_see_one_row_per_path(tiny_model_dir, library, tmp_path):
    store = tmp_path / "store"
    base = embed_args(library, tiny_model_dir, store)
    assert run(base).exit_code == 0
    write_clip(library / "b.wav", seed=42)
    assert run(base).exit_code == 0
    out = run(["search", store, "--audio", library / "b.wav", "-k", "10", "--json"])
    assert out.exit_code == 0, out.output
    paths = [h["path"] for h in json.loads(out.stdout)["results"]]
    assert len(paths) == len(set(paths)) == 6
    dd = run(["dedupe", store, "--threshold", "0.9999", "--json"])
    assert dd.exit_code == 0, dd.output
    for group in json.loads(dd.stdout)["groups"]:
        assert len(set(group["paths"])) == len(group["paths"])


def test_no_prune_keeps_gone_files_and_prune_is_scoped_to_the_folders_named(
    tiny_model_dir, library, tmp_path
):
    store = tmp_path / "store"
    other = tmp_path / "other"
    other.mkdir()
    write_clip(other / "x.wav", seed=7)
    assert run(embed_args([library, other], tiny_model_dir, store)).exit_code == 0
    (library / "a.wav").unlink()
    r = run(embed_args(library, tiny_model_dir, store, "--no-prune", "--summary-json"))
    assert summary_of(r)["removed"] == 0
    assert str(library / "a.wav") in live_state(store)[0]
    # Only `library` is named: other/x.wav stays although it was not part of this run.
    r = run(embed_args(library, tiny_model_dir, store, "--summary-json"))
    assert summary_of(r)["removed"] == 1
    items = live_state(store)[0]
    assert str(library / "a.wav") not in items and str(other / "x.wav") in items
    # Without -r, files in sub-folders are out of scope, so they are not pruned either.
    r = run(embed_args(library, tiny_model_dir, store, "--summary-json", recursive=False))
    assert summary_of(r)["removed"] == 0
    assert str(library / "sub" / "f.wav") in live_state(store)[0]


def test_a_changed_file_that_now_fails_loses_its_stale_row(tiny_model_dir, library, tmp_path):
    store = tmp_path / "store"
    args = embed_args(library, tiny_model_dir, store, "--summary-json")
    assert run(args).exit_code == 0
    (library / "a.wav").write_bytes(b"not audio any more")
    r = run(args)
    assert r.exit_code == 1
    s = summary_of(r)
    assert s["failed"] == 1 and s["removed"] == 1
    assert str(library / "a.wav") not in live_state(store)[0]
    errors = [json.loads(x) for x in (store / "errors.jsonl").read_text().splitlines()]
    assert [e["path"] for e in errors] == [str(library / "a.wav")]


def test_deleted_and_recreated_folder(tiny_model_dir, library, tmp_path):
    store = tmp_path / "store"
    args = embed_args(library, tiny_model_dir, store, "--summary-json")
    assert run(args).exit_code == 0
    shutil.rmtree(library)
    r = run(args)  # the folder is gone: a clear error, and the store keeps its rows
    assert r.exit_code != 0 and "no such file or folder" in r.output
    assert len(live_state(store)[0]) == 6
    library.mkdir()
    write_clip(library / "new.wav", seed=50)
    r = run(args)
    assert r.exit_code == 0, r.output
    assert sorted(live_state(store)[0]) == [str(library / "new.wav")]


def test_kill_during_sync_then_rerun_gives_the_same_store(tiny_model_dir, library, tmp_path):
    """SIGKILL a sync run (changes pending) at several moments; a rerun always ends as a fresh embed."""
    store = tmp_path / "store"
    args = embed_args(library, tiny_model_dir, store, "--batch-size", "1")
    assert run(args).exit_code == 0
    write_clip(library / "b.wav", seed=77)
    (library / "c.wav").unlink()
    for i in range(8):
        write_clip(library / f"new{i}.wav", seed=200 + i, seconds=3.0)
    fresh = tmp_path / "fresh"
    assert run(embed_args(library, tiny_model_dir, fresh, "--batch-size", "1")).exit_code == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for delay in (1.5, 3.0):
        proc = subprocess.Popen([sys.executable, "-m", "mlx_clap.cli", *args], env=env, cwd=REPO_ROOT)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert len({it["path"] for it in Store.open(store).items}) >= 5  # the last commit, whole
    assert run(args).exit_code == 0
    items, vectors = live_state(store)
    fresh_items, fresh_vectors = live_state(fresh)
    assert sorted(items) == sorted(fresh_items)
    for p in items:
        np.testing.assert_array_equal(vectors[p], fresh_vectors[p])
    assert Store.open(store).dead_rows == 0


# ------------------------------------------------------------------------------------- store level
def make_store(path: Path, n: int = 10, dim: int = 8, seed: int = 0, **kw) -> tuple[Store, np.ndarray]:
    """A store of `n` rows /x/0.wav... open for writing (the caller closes it, or lets it go)."""
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    store = Store.create(path, {"model": "test"}, dim=dim, dtype="float32", **kw)
    store.write([{"path": f"/x/{i}.wav", "size": i, "mtime": 1.0} for i in range(n)], v)
    return store, v


def test_a_later_row_supersedes_and_compaction_reclaims(tmp_path):
    store, v = make_store(tmp_path / "s")
    new = -v[3:4]
    store.write([{"path": "/x/3.wav", "size": 99, "mtime": 2.0}], new)
    assert len(store) == 10 and store.dead_rows == 1
    assert [it["path"] for it in store.items] == [f"/x/{i}.wav" for i in range(10) if i != 3] + ["/x/3.wav"]
    np.testing.assert_array_equal(store.matrix()[-1], new[0])
    reader = Store.open(tmp_path / "s")
    assert reader.items == store.items
    np.testing.assert_array_equal(reader.matrix(), store.matrix())
    before = reader.matrix()
    store.remove(["/x/5.wav"])
    stats = store.compact()
    assert stats["fragments_removed"] >= 2 and stats["fragments_added"] == 1
    after = Store.open(tmp_path / "s")
    assert len(after) == 9 and after.dead_rows == 0
    assert "/x/5.wav" not in {it["path"] for it in after.items}
    np.testing.assert_array_equal(after.matrix(), np.delete(before, 4, axis=0))
    np.testing.assert_array_equal(store.matrix(), after.matrix())  # the compacting writer follows
    np.testing.assert_array_equal(reader.matrix(), before)  # a pinned reader still reads its version
    # The compacted store still takes writes and a second compaction.
    store.write([{"path": "/x/new.wav", "size": 1, "mtime": 1.0}], v[:1])
    store.compact()
    store.close()
    assert [it["path"] for it in Store.open(tmp_path / "s").items][-1] == "/x/new.wav"


def test_segment_rows_follow_their_file_row(tmp_path):
    store, v = make_store(tmp_path / "s", n=2, segments={"hop": 1.0, "window": 2.0})
    seg = (np.array([0.0, 1.0, 2.0]), np.array([2.0, 3.0, 3.5]), np.stack([v[0], v[1], v[0]]))
    store.write([{"path": "/x/long.wav", "size": 1, "mtime": 1.0, "sha256": "c1"}], v[:1], segments=[seg])
    view = store.segment_view()
    assert len(view) == 3 and view.file_index.tolist() == [2, 2, 2]
    assert view.end.tolist() == [2.0, 3.0, 3.5]
    # A rename reuses its content's segments (copied with the file row, in the same commit).
    store.reuse([({"path": "/x/renamed.wav", "size": 1, "mtime": 2.0, "sha256": "c1"}, 2)])
    view = store.segment_view()
    assert view.file_index.tolist() == [2, 2, 2, 3, 3, 3]
    assert [it["path"] for it in store.items] == ["/x/0.wav", "/x/1.wav", "/x/long.wav", "/x/renamed.wav"]
    store.remove(["/x/long.wav"])  # its segment rows go with it
    store.compact()
    store.close()
    final = Store.open(tmp_path / "s")
    fv = final.segment_view()
    assert [final.items[i]["path"] for i in fv.file_index] == ["/x/renamed.wav"] * 3
    assert len(final.dataset.to_table(columns=["kind"])) == 2 + 1 + 3  # no segment row left behind
    np.testing.assert_array_equal(fv.matrix(), np.stack([v[0], v[1], v[0]]))


def test_segments_need_a_store_made_with_them(tmp_path):
    store, v = make_store(tmp_path / "s", n=2)
    assert not store.has_segments and len(store.segment_view()) == 0
    with pytest.raises(StoreError, match="without segments"):
        store.write(
            [{"path": "/x/a.wav", "size": 1, "mtime": 1.0}],
            v[:1],
            segments=[(np.array([0.0]), np.array([1.0]), v[:1])],
        )


def test_segments_option_on_a_store_made_without_them_is_refused(tiny_model_dir, library, tmp_path):
    store = tmp_path / "store"
    assert run(embed_args(library, tiny_model_dir, store, recursive=False)).exit_code == 0
    r = run(embed_args(library, tiny_model_dir, store, "--segments", recursive=False))
    assert r.exit_code != 0
    assert "made without --segments" in r.output and "--overwrite" in r.output


def test_embed_segments_stores_windows_beside_the_file_vector(tiny_model_dir, tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    write_clip(lib / "short.wav", seed=1, seconds=2.0)
    write_clip(lib / "long.wav", seed=2, seconds=31.0)  # streamed past 30 s
    write_clip(lib / "mid.wav", seed=3, seconds=14.0)
    store = tmp_path / "store"
    args = embed_args(lib, tiny_model_dir, store, "--segments", "--hop", "4", recursive=False)
    r = run([*args, "--summary-json"])
    assert r.exit_code == 0, r.output
    st = Store.open(store)
    assert st.segment_settings == {"hop": 4.0, "window": 10.0}
    view = st.segment_view()
    by_file = {st.items[i]["path"]: view.of_file(i) for i in range(len(st))}
    long_segs = by_file[str(lib / "long.wav")]
    # 31 s at hop 4 with 10-s windows: starts 0, 4, ..., 20 and the end-aligned 21.
    assert view.start[long_segs].tolist() == [0, 4, 8, 12, 16, 20, 21]
    assert view.end[long_segs][-1] == pytest.approx(31.0)
    assert view.start[by_file[str(lib / "short.wav")]].tolist() == [0.0]
    assert view.end[by_file[str(lib / "short.wav")]][0] == pytest.approx(2.0)
    # The file vectors are those of a store made without segments (up to float16 steps: the two runs
    # batch their windows differently).
    plain = tmp_path / "plain"
    assert run(embed_args(lib, tiny_model_dir, plain, recursive=False)).exit_code == 0
    p = Store.open(plain)
    np.testing.assert_allclose(st.matrix()[[st.row_of(x["path"]) for x in p.items]], p.matrix(), atol=1e-4)
    # A rerun without --segments keeps making them; a rename reuses the long file's windows.
    (lib / "long.wav").rename(lib / "long2.wav")
    r = run(embed_args(lib, tiny_model_dir, store, "--summary-json", recursive=False))
    assert summary_of(r)["reused"] == 1 and summary_of(r)["removed"] == 1
    st = Store.open(store)
    view = st.segment_view()
    assert len(view.of_file(st.row_of(lib / "long2.wav"))) == 7
    assert len(view) == 7 + 1 + 2  # mid: 0 and the end-aligned 4


def test_search_segments_finds_a_planted_sound_within_one_hop(tiny_model_dir, tmp_path):
    """A 10-s chirp planted at known offsets in long noise files is found by `search --audio --segments`."""
    lib = tmp_path / "lib"
    lib.mkdir()
    t = np.arange(10 * SR) / SR
    chirp = (0.5 * np.sin(2 * np.pi * (300 + 150 * t) * t)).astype(np.float32)
    offsets = {"one.wav": 12.0, "two.wav": 26.0}
    rng = np.random.default_rng(5)
    for name, off in offsets.items():
        x = (0.05 * rng.standard_normal(45 * SR)).astype(np.float32)
        x[int(off * SR) : int(off * SR) + chirp.size] += chirp
        sf.write(lib / name, x, SR)
    write_clip(lib / "noise.wav", seed=9, seconds=40.0)
    sf.write(tmp_path / "query.wav", chirp, SR)
    store = tmp_path / "store"
    r = run(embed_args(lib, tiny_model_dir, store, "--segments", recursive=False))
    assert r.exit_code == 0, r.output
    r = run(["search", store, "--audio", tmp_path / "query.wav", "--segments", "-k", "2", "--json"])
    assert r.exit_code == 0, r.output
    hits = json.loads(r.stdout)["results"]
    assert sorted(Path(h["path"]).name for h in hits) == ["one.wav", "two.wav"]
    for h in hits:
        assert abs(h["best_start"] - offsets[Path(h["path"]).name]) <= 2.0, h
        assert h["start"] <= offsets[Path(h["path"]).name] + 2.0 and h["z"] >= 2.0
    text = run(["search", store, "--audio", tmp_path / "query.wav", "--segments", "-k", "2"])
    assert text.exit_code == 0 and "one.wav" in text.stdout and "z " in text.stdout
    # File search reports the calibration too, and thresholds can be given as z.
    r = run(["search", store, "--audio", tmp_path / "query.wav", "--json", "--min-percentile", "50"])
    res = json.loads(r.stdout)
    assert {"mean", "std", "sample"} <= set(res["calibration"])
    assert all(h["percentile"] >= 50 for h in res["results"]) and res["results"]


# ------------------------------------------------------------------------------------ older stores
def test_a_store_of_an_older_mlx_clap_is_converted_by_embed_and_named_by_readers(
    tiny_model_dir, library, tmp_path
):
    """A format-2 store (.npy shards, items.jsonl) of the same pipeline: `search` names the command that
    converts it and writes nothing; `embed` converts it in place and embeds nothing again."""
    from legacy_store import write_legacy_store

    made = tmp_path / "made"
    assert run(embed_args(library, tiny_model_dir, made)).exit_code == 0
    now = Store.open(made)
    old = tmp_path / "old"
    manifest = {k: v for k, v in now.manifest.items() if k != "store"}
    write_legacy_store(old, manifest, now.items, now.matrix(), dtype=now.dtype)
    before = sorted(p.name for p in old.iterdir())
    assert "manifest.json" in before and "_versions" not in before

    r = run(["search", old, "--like", now.items[0]["path"]])
    assert r.exit_code == 1 and "older mlx-clap" in r.output and f"--out {old}" in r.output
    assert sorted(p.name for p in old.iterdir()) == before  # a reader never writes

    r = run(embed_args(library, tiny_model_dir, old, "--summary-json"))
    assert r.exit_code == 0, r.output
    s = summary_of(r)
    assert s["embedded"] == 0 and s["skipped"] == 6
    converted = Store.open(old)
    assert not (old / "manifest.json").exists() and converted.manifest["migrated_from_format"] == 2
    assert converted.items == now.items
    np.testing.assert_array_equal(converted.matrix(), now.matrix())
