"""The library behind `mlx-clap embed`, from Python (mlx_clap.sync): sync a folder into a store, sync
again after edits, read the report and the error records, search the store, and the worker/driver split
another engine (Ray) runs through (`embed_files` in a worker, `SyncJob.commit_batch` on the driver).

The model is the session's tiny random model (conftest.tiny_model_dir)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from fixtures import assert_same_ranking, moto_s3, s3_bucket

from mlx_clap.store import Store
from mlx_clap.sync import Progress, SyncError, SyncJob, collect_inputs, embed_files, search, sync

SR = 48000


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    import mlx_clap

    return mlx_clap.load(tiny_model_dir)


def write_clip(path: Path, seed: int, seconds: float = 1.0) -> None:
    rng = np.random.default_rng(seed)
    sf.write(path, 0.1 * rng.standard_normal(int(seconds * SR)).astype(np.float32), SR)


@pytest.fixture
def library(tmp_path) -> Path:
    """a.wav, b.wav, sub/c.wav (distinct noise) and bad.mp3 (not audio)."""
    src = tmp_path / "music"
    (src / "sub").mkdir(parents=True)
    write_clip(src / "a.wav", 1)
    write_clip(src / "b.wav", 2)
    write_clip(src / "sub" / "c.wav", 3, seconds=1.5)
    (src / "bad.mp3").write_bytes(b"not audio at all")
    return src


def rows(out: Path | str) -> dict[str, np.ndarray]:
    store = Store.open(out)
    assert len({it["path"] for it in store.items}) == len(store.items), "two rows for one path"
    return {str(it["path"]): v for it, v in zip(store.items, store.matrix(), strict=True)}


def test_sync_a_folder_then_an_edit_from_python(model, tiny_model_dir, library, tmp_path):
    out = tmp_path / "vectors.lance"
    report = sync([library], out, model=model, model_id=str(tiny_model_dir))
    assert (report.embedded, report.failed, report.reused, report.removed) == (3, 1, 0, 0)
    assert [Path(e["path"]).name for e in report.errors] == ["bad.mp3"]
    assert report.errors_file == str(out / "errors.jsonl") and report.new_failures == 1
    assert [Path(e["path"]).name for e in Store.open(out).errors()] == ["bad.mp3"]
    got = rows(out)
    paths = sorted(str(p) for p in (library / "a.wav", library / "b.wav", library / "sub" / "c.wav"))
    assert sorted(got) == paths
    want = model.embed_audio(paths)
    # float16 in the store: within its rounding of unit vectors
    np.testing.assert_allclose(np.stack([got[p] for p in paths]), want, atol=1e-3)

    # An edit, a delete, a rename: one row per current file, equal to a fresh sync of the folder.
    write_clip(library / "a.wav", 10)
    (library / "b.wav").unlink()
    shutil.move(library / "sub" / "c.wav", library / "c-renamed.wav")
    again = sync([library], out, model=model, model_id=str(tiny_model_dir))
    assert (again.embedded, again.reused, again.removed, again.skipped) == (1, 1, 2, 0)
    assert again.failed == 1 and again.new_failures == 0  # bad.mp3 failed as on the last run
    fresh = sync([library], tmp_path / "fresh.lance", model=model, model_id=str(tiny_model_dir))
    assert fresh.embedded == 2
    now, ref = rows(out), rows(tmp_path / "fresh.lance")
    assert (
        sorted(now) == sorted(ref) == sorted(str(p) for p in (library / "a.wav", library / "c-renamed.wav"))
    )
    for p in ref:
        np.testing.assert_array_equal(now[p], ref[p])

    # Nothing changed: everything skipped; the fixed file leaves the error records.
    write_clip(library / "bad.mp3", 4)  # now a WAV under an .mp3 name: decodes
    last = sync([library], out, model=model, model_id=str(tiny_model_dir))
    assert (last.embedded, last.skipped, last.failed, last.errors, last.errors_file) == (1, 2, 0, [], None)
    assert Store.open(out).errors() == [] and not (out / "errors.jsonl").exists()


def test_sync_refuses_what_it_cannot_do(model, tmp_path, library):
    with pytest.raises(SyncError, match=r"nothing to embed: .*nowhere: no such file or folder"):
        sync([tmp_path / "nowhere"], tmp_path / "s.lance", model=model)
    assert not (tmp_path / "s.lance").exists()
    with pytest.raises(SyncError, match="needs a fused model"):
        sync([library], tmp_path / "s.lance", model=model, long_audio="fusion")
    with pytest.raises(SyncError, match="segments need long_audio 'windows-mean'"):
        sync([library], tmp_path / "s.lance", model=model, segments=True, long_audio="head")


def test_progress_callbacks_see_the_run(model, library, tmp_path):
    class Seen(Progress):
        wants_estimates = True

        def __init__(self):
            self.total, self.done, self.failures = 0.0, 0.0, []

        def start(self, total_seconds: float) -> None:
            self.total = total_seconds

        def advance(self, seconds: float) -> None:
            self.done += seconds

        def failed(self, path: str, cause: str) -> None:
            self.failures.append(Path(path).name)

    seen = Seen()
    report = sync([library], tmp_path / "s.lance", model=model, progress=seen)
    assert report.embedded == 3 and seen.failures == ["bad.mp3"]
    assert seen.total == pytest.approx(3.5, abs=0.01) and seen.done == pytest.approx(seen.total, abs=0.01)


def test_a_worker_writes_and_the_driver_commits(model, tiny_model_dir, library, tmp_path):
    """The split another engine runs: `embed_files` writes uncommitted rows (as a Ray actor would), the
    driver commits them; the store equals a single-process sync, segments included."""
    batches = []

    def engine(job, run, files):
        half = len(files) // 2
        for part in (files[:half], files[half:]):  # two "workers"
            batch = embed_files(
                model,
                part,
                job.store.target(),
                job.settings,
                planned=job.plan.planned,
                segments=job.sink.segments,
            )
            batches.append(batch)
            job.commit_batch(run, batch)

    inputs = collect_inputs([library], True)
    with SyncJob(inputs, tmp_path / "split.lance", model, model_id=str(tiny_model_dir), segments=True) as job:
        job.make_plan()
        split = job.run(engine=engine)
    plain = sync(
        [library], tmp_path / "plain.lance", model=model, model_id=str(tiny_model_dir), segments=True
    )
    assert len(batches) == 2 and sum(b.embedded for b in batches) == 3
    assert (split.embedded, split.failed) == (plain.embedded, plain.failed) == (3, 1)
    assert [e["path"] for e in split.errors] == [e["path"] for e in plain.errors]
    a, b = rows(tmp_path / "split.lance"), rows(tmp_path / "plain.lance")
    assert sorted(a) == sorted(b)
    for p in a:
        np.testing.assert_array_equal(a[p], b[p])
    sa, sb = (
        Store.open(tmp_path / "split.lance").segment_view(),
        Store.open(tmp_path / "plain.lance").segment_view(),
    )
    assert len(sa) == len(sb) >= 3
    np.testing.assert_array_equal(sa.matrix(), sb.matrix())


def test_search_a_store_from_python(model, tiny_model_dir, library, tmp_path):
    """search() by vector, audio and text ranks the rows as an exact scan of the stored vectors does."""
    out = tmp_path / "s.lance"
    sync([library], out, model=model, model_id=str(tiny_model_dir))
    store = Store.open(out)
    matrix = store.matrix().astype(np.float64)
    target = str(library / "b.wav")
    vector = store.take([store.row_of(target)])[0]
    queries = [  # (search arguments, the query vector they stand for)
        (dict(vector=vector), vector),
        (dict(audio=target, model=model), model.embed_audio([target])[0]),
        (dict(text="a dog barking", model=model), model.embed_text(["a dog barking"])[0]),
    ]
    for query, q in queries:
        hits = search(store, k=2, **query)
        q = np.asarray(q, np.float64) / np.linalg.norm(q)
        scores = matrix @ q
        want = [int(r) for r in np.argsort(-scores, kind="stable")[:2]]
        assert_same_ranking([h["row"] for h in hits], want, scores)
    from mlx_clap.search.index import SearchError

    with pytest.raises(SearchError, match="exactly one"):
        search(store, text="x", vector=np.ones(512), model=model)
    with pytest.raises(SearchError, match="needs the store's model"):
        search(store, text="x")


def test_sync_into_an_object_store(model, tiny_model_dir, library, tmp_path, monkeypatch):
    """The same sync into s3://bucket/prefix (a local moto server): rows, errors.jsonl through the store."""
    with moto_s3() as endpoint:
        bucket, _ = s3_bucket(endpoint, monkeypatch)
        uri = f"s3://{bucket}/lib/vectors"
        report = sync([library], uri, model=model, model_id=str(tiny_model_dir))
        assert (report.embedded, report.failed, report.errors_file) == (3, 1, f"{uri}/errors.jsonl")
        local = sync([library], tmp_path / "local.lance", model=model, model_id=str(tiny_model_dir))
        remote_rows = rows(uri)
        assert sorted(remote_rows) == sorted(rows(tmp_path / "local.lance"))
        assert [Path(e["path"]).name for e in Store.open(uri).errors()] == ["bad.mp3"]
        (library / "a.wav").unlink()
        again = sync([library], uri, model=model, model_id=str(tiny_model_dir))
        assert (again.embedded, again.removed, again.skipped) == (0, 1, 2) and local.embedded == 3
        assert str(library / "a.wav") not in rows(uri)
