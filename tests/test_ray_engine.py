"""`mlx-clap embed --engine ray` (mlx_clap.sync.ray_engine) on a local Ray cluster of two nodes on this
machine (ray.cluster_utils.Cluster: a head and one more node), two workers: the same store as the
single-process embed (rows, file and segment vectors within 1e-6, errors), sync after edits, deletes and
renames, and kill -9 of a worker or of the driver mid-run.

Marked `ray` (deselect with -m 'not ray'); they run in CI, where `.ci/run` installs the ray extra. One
cluster for the module, one CPU per node: this machine has two cores and other tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import REPO_ROOT
from fixtures import encode_pyav, moto_s3, noise, run, s3_bucket

from mlx_clap.store import Store

pytestmark = pytest.mark.ray
SR = 48000
TOL = 1e-6


@pytest.fixture(scope="module")
def cluster():
    """A head and one more node, one CPU each (one worker each), a small object store."""
    pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[test]' or '.[ray]')")
    from ray.cluster_utils import Cluster

    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": 80 * 2**20, "include_dashboard": False},
    )
    c.add_node(num_cpus=1, object_store_memory=80 * 2**20)
    c.wait_for_nodes()
    yield c.address
    c.shutdown()


def embed_args(lib: Path, model: Path, out: Path, *extra: str) -> list[str]:
    # float32 in the store: the comparison is of the model's vectors, not of float16 rounding.
    args = [
        "embed",
        lib,
        "-r",
        "--model",
        model,
        "--out",
        out,
        "-q",
        "--segments",
        "--store-dtype",
        "float32",
    ]
    return [str(a) for a in [*args, "--batch-size", "2", *extra]]


def ray_args(lib: Path, model: Path, out: Path, address: str, *extra: str) -> list[str]:
    return embed_args(lib, model, out, "--engine", "ray", "--ray-address", address, "--workers", "2", *extra)


def write_library(lib: Path, n_clips: int = 6) -> Path:
    """Several formats, a long file (segments), broken files."""
    (lib / "sub").mkdir(parents=True)
    for i in range(n_clips):
        sf.write(lib / f"clip{i}.wav", noise(SR + 4000 * i, channels=1, seed=i)[:, 0], SR)
    sf.write(lib / "sub" / "tone.flac", noise(2 * SR, seed=20), SR)
    sf.write(lib / "sub" / "voice.ogg", noise(3 * SR, seed=21), SR, format="OGG", subtype="VORBIS")
    try:
        encode_pyav(lib / "sub" / "song.m4a", noise(3 * SR, seed=22), SR, "aac", "mp4")
    except Exception:  # noqa: BLE001 - a PyAV build without an AAC encoder: the other formats remain
        pass
    sf.write(lib / "long.wav", noise(25 * SR, channels=1, seed=23)[:, 0], SR)  # 3 windows' worth
    (lib / "broken.mp3").write_bytes(b"this is not audio at all" * 10)
    (lib / "empty.flac").write_bytes(b"")
    (lib / "sub" / "cut.wav").write_bytes(open(lib / "clip1.wav", "rb").read()[:30])  # a cut header
    return lib


def state(out: Path | str) -> tuple[dict, dict, dict]:
    """path -> item (no mtime), path -> file vector, path -> (starts, ends, segment vectors)."""
    store = Store.open(out)
    items = store.items
    assert len({it["path"] for it in items}) == len(items), "two rows for one path"
    m = store.matrix()
    view = store.segment_view()
    segs = {}
    for i, it in enumerate(items):
        idx = view.of_file(i)
        segs[it["path"]] = (view.start[idx], view.end[idx], view.take(idx))
    rows = {it["path"]: {k: v for k, v in it.items() if k not in ("mtime", "seg")} for it in items}
    return rows, {it["path"]: m[i] for i, it in enumerate(items)}, segs


def errors(out: Path) -> set[tuple[str, str]]:
    path = out / "errors.jsonl"
    if not path.exists():
        return set()
    return {(r["path"], r["error"]) for r in map(json.loads, path.read_text().splitlines())}


def assert_same_store(got: Path, want: Path) -> None:
    g_rows, g_vec, g_seg = state(got)
    w_rows, w_vec, w_seg = state(want)
    assert g_rows == w_rows
    for p in w_vec:
        np.testing.assert_allclose(g_vec[p], w_vec[p], atol=TOL, rtol=0, err_msg=p)
        for a, b in zip(g_seg[p][:2], w_seg[p][:2], strict=True):
            np.testing.assert_array_equal(a, b, err_msg=p)
        np.testing.assert_allclose(g_seg[p][2], w_seg[p][2], atol=TOL, rtol=0, err_msg=p)
    assert errors(got) == errors(want)


def test_ray_embed_and_sync_match_single_process(cluster, tiny_model_dir, tmp_path):
    lib = write_library(tmp_path / "lib")
    ref, got = tmp_path / "ref", tmp_path / "got"
    want = run(embed_args(lib, tiny_model_dir, ref))
    res = run(ray_args(lib, tiny_model_dir, got, cluster))
    assert res.exit_code == want.exit_code == 1, res.output + want.output  # new failures: status 1
    assert_same_store(got, ref)
    rows, _, segs = state(got)
    assert len(segs[str(lib / "long.wav")][0]) > 1  # the long file has its windows
    assert len(errors(got)) == 3

    # Edit, delete, rename, add; then both engines sync their own store.
    sf.write(lib / "clip0.wav", noise(SR, channels=1, seed=99)[:, 0], SR)
    (lib / "clip2.wav").unlink()
    os.rename(lib / "clip3.wav", lib / "sub" / "moved.wav")
    sf.write(lib / "new.wav", noise(SR, channels=1, seed=98)[:, 0], SR)
    (lib / "broken.mp3").unlink()
    want = run(embed_args(lib, tiny_model_dir, ref, "--summary-json"))
    res = run(ray_args(lib, tiny_model_dir, got, cluster, "--summary-json"))
    assert res.exit_code == want.exit_code == 3, res.output + want.output  # only known failures left
    assert_same_store(got, ref)
    g, w = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (res, want))
    for key in ("embedded", "reused", "removed", "moved", "skipped", "failed"):
        assert g[key] == w[key], key
    assert g["embedded"] == 2 and g["reused"] == 1  # the edit and the new file; the rename reused


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of this machine's processes, from /proc (Linux)."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((d / "stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        out[int(d.name)] = (ppid, cmd)
    return out


def _raylets() -> set[int]:
    """The raylets running now (the module's cluster: two of them)."""
    return {pid for pid, (_, cmd) in _processes().items() if "/raylet" in cmd.split(" ")[0]}


def _workers_of(raylets: set[int]) -> list[int]:
    """PIDs of the pool's actors (Ray titles them ray::MapWorker(MapBatches(EmbedActor))), which the
    raylets of this module's cluster started."""
    return [
        pid
        for pid, (ppid, cmd) in _processes().items()
        if ppid in raylets and "MapWorker" in cmd and "EmbedActor" in cmd
    ]


def _data_files(out: Path) -> int:
    return len(list((out / "data").glob("*.lance"))) if (out / "data").is_dir() else 0


def _wait(cond, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_kill_9_of_a_worker_and_of_the_driver(cluster, tiny_model_dir, tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    for i in range(24):
        sf.write(lib / f"c{i:02d}.wav", noise(SR // 2 + 1000 * i, channels=1, seed=i)[:, 0], SR)
    ref = tmp_path / "ref"
    assert run(embed_args(lib, tiny_model_dir, ref)).exit_code == 0
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "mlx_clap.cli"]

    # A worker killed once it has written data files: Ray restarts it and retries its task.
    out = tmp_path / "killed_worker"
    raylets = _raylets()
    proc = subprocess.Popen([*cmd, *ray_args(lib, tiny_model_dir, out, cluster)], env=env)
    if not Path("/proc").is_dir():
        pytest.skip("finding Ray's worker processes reads /proc (Linux)")
    _wait(lambda: _data_files(out) >= 1 or proc.poll() is not None, 120, "a worker's first data file")
    victims = _workers_of(raylets)
    assert victims and proc.poll() is None, "the job ended before a worker could be killed"
    os.kill(victims[0], signal.SIGKILL)
    assert proc.wait(timeout=300) == 0
    assert_same_store(out, ref)

    # The driver killed after its first commit: the same command again finishes the same store.
    out = tmp_path / "killed_driver"
    proc = subprocess.Popen([*cmd, *ray_args(lib, tiny_model_dir, out, cluster)], env=env)

    def committed() -> bool:
        try:
            return len(Store.open(out)) > 0
        except Exception:  # noqa: BLE001 - not made yet
            return False

    _wait(lambda: committed() or proc.poll() is not None, 120, "the driver's first commit")
    assert proc.poll() is None, "the job ended before the driver could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < len(Store.open(out)) < 24  # killed mid-run, with something committed
    res = run(ray_args(lib, tiny_model_dir, out, cluster))
    assert res.exit_code == 0, res.output
    assert_same_store(out, ref)
    shutil.rmtree(out)


def test_only_the_ray_engine_imports_ray():
    """Ray is an optional extra: no other module of the package imports it, at any level."""
    import ast

    package = REPO_ROOT / "mlx_clap"
    found = []
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            if any(n == "ray" or n.startswith("ray.") for n in names):
                found.append(str(path.relative_to(package)))
    assert sorted(set(found)) == ["sync/ray_engine.py"]


def test_s3_store_written_by_ray_workers(cluster, tiny_model_dir, tmp_path, monkeypatch):
    """Workers write their data files to object storage (a local S3 server), the driver commits there:
    the same rows as a single-process sync into a local folder."""
    from mlx_clap.loading import load
    from mlx_clap.sync.api import SyncJob, sync
    from mlx_clap.sync.inputs import collect_inputs
    from mlx_clap.sync.ray_engine import RayEngine, RayOptions

    with moto_s3() as endpoint:
        bucket, _ = s3_bucket(endpoint, monkeypatch)
        lib = tmp_path / "lib"
        lib.mkdir()
        for i in range(5):
            sf.write(lib / f"c{i}.wav", noise(SR + 3000 * i, channels=1, seed=i)[:, 0], SR)
        sf.write(lib / "long.wav", noise(14 * SR, channels=1, seed=9)[:, 0], SR)
        (lib / "bad.wav").write_bytes(b"RIFF0000WAVE")
        model = load(str(tiny_model_dir))
        opts = dict(model_id=str(tiny_model_dir), segments=True, store_dtype="float32", batch_size=2)
        want = sync([lib], tmp_path / "ref", model=model, **opts)
        uri = f"s3://{bucket}/vectors"
        with SyncJob(collect_inputs([str(lib)], True, ()), uri, model, **opts) as job:
            got = job.run(engine=RayEngine(RayOptions(address=cluster, workers=2)))
        assert (got.embedded, got.failed) == (want.embedded, want.failed) == (6, 1)
        rows, vec, segs = state(uri)
        w_rows, w_vec, w_segs = state(tmp_path / "ref")
        assert rows == w_rows
        for p in w_vec:
            np.testing.assert_allclose(vec[p], w_vec[p], atol=TOL, rtol=0, err_msg=p)
            np.testing.assert_allclose(segs[p][2], w_segs[p][2], atol=TOL, rtol=0, err_msg=p)
        assert {(r["path"], r["error"]) for r in Store.open(uri).errors()} == errors(tmp_path / "ref")


def test_a_worker_that_cannot_load_the_model_fails_the_job_with_its_cause(cluster, tiny_model_dir, tmp_path):
    """Ray does not restart an actor whose model load fails: the job stops at once with that cause."""
    from mlx_clap.loading import load
    from mlx_clap.sync.api import SyncJob
    from mlx_clap.sync.inputs import collect_inputs
    from mlx_clap.sync.ray_engine import RayEngine, RayEngineError, RayOptions

    lib = tmp_path / "lib"
    lib.mkdir()
    sf.write(lib / "a.wav", noise(SR, channels=1)[:, 0], SR)
    gone = tmp_path / "not_a_model"
    with SyncJob(collect_inputs([str(lib)], True, ()), tmp_path / "out", load(str(tiny_model_dir))) as job:
        with pytest.raises(RayEngineError, match=f"the Ray job failed: {gone}: no such file or folder"):
            job.run(engine=RayEngine(RayOptions(address=cluster, workers=1), model_id=str(gone)))
    assert len(Store.open(tmp_path / "out")) == 0
