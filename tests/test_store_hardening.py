"""Store integrity: the writer lock, no writes outside the store, per-row checksums with `mlx-clap check`,
and recoverable creation and writes (disk full, read-only folders), on the Lance store the commands
write; and the validation of the older format's manifests and items, which `migrate_store` reads."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from conftest import REPO_ROOT
from legacy_store import write_legacy_store

from mlx_clap.cli import main
from mlx_clap.io.files import append_lines, atomic_write_bytes
from mlx_clap.store import Store, StoreError, migrate_store
from mlx_clap.store import StoreBusyError as LanceBusyError


# ------------------------------------------------------------------------------------------ helpers
def _vecs(seed: int, n: int, dim: int = 8) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _items(start: int, n: int) -> list[dict]:
    return [{"path": f"/a/{i}.wav", "size": i, "mtime": 1.5} for i in range(start, start + n)]


def _store(root: Path, n: int = 6) -> Path:
    """A format-2 store (the .npy layout a migration reads) of rows /a/0.wav ... /a/{n-1}.wav."""
    return write_legacy_store(root, {"model": "m"}, _items(0, n), _vecs(0, n))


def _lance_store(root: Path, n: int = 6) -> None:
    """A float32 store (mlx_clap.store, on Lance) of rows /a/0.wav ... /a/{n-1}.wav."""
    with Store.create(root, {"model": "m"}, dim=8, dtype="float32") as s:
        if n:
            s.write(_items(0, n), _vecs(0, n))


def _run(args: list[str]):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    return env


LANCE_HOLDER = """
import sys, time
from mlx_clap.store import Store
s = Store.open(sys.argv[1], write=True)
print("held", flush=True)
time.sleep(120)
"""


def _hold_in_subprocess(root: Path, code: str = LANCE_HOLDER) -> subprocess.Popen:
    p = subprocess.Popen(
        [sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE, text=True, env=_env()
    )
    assert p.stdout.readline().strip() == "held"
    return p


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(3)
    (root / "sub").mkdir()
    for name in ("a.wav", "b.wav", "sub/c.wav"):
        sf.write(root / name, 0.1 * rng.standard_normal(8000), 8000)
    return root


def _embed(model: Path, src: Path, out: Path, *extra: str):
    return _run(["embed", str(src), "-r", "--model", str(model), "--out", str(out), "-q", *extra])


# --------------------------------------------------------------------------------------- 1. the lock
def test_second_writer_fails_at_once_naming_pid_and_kill9_frees_it(tiny_model_dir, clips, tmp_path):
    out = tmp_path / "st"
    assert _embed(tiny_model_dir, clips, out).exit_code == 0
    holder = _hold_in_subprocess(out, LANCE_HOLDER)
    try:
        t0 = time.monotonic()
        # A second process: `mlx-clap embed` on the same --out.
        cmd = [sys.executable, "-m", "mlx_clap.cli", "embed", str(clips), "-r",
               "--model", str(tiny_model_dir), "--out", str(out), "-q", "--overwrite"]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=120)
        assert r.returncode != 0
        assert f"in use by PID {holder.pid}" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert "Use --overwrite" not in r.stderr  # it would not help
        r = _embed(tiny_model_dir, clips, out)  # a resume, in this process: refused the same way
        assert r.exit_code != 0 and f"in use by PID {holder.pid}" in r.output
        assert time.monotonic() - t0 < 60
        # In this process too (library): a reader reads, a writer is refused, the store is untouched.
        before = Store.open(out)
        assert before.read_only and len(before) == 3
        with pytest.raises(LanceBusyError, match=f"PID {holder.pid}"):
            Store.open(out, write=True)
        assert Store.open(out).version == before.version
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # kill -9 left the lock file behind, but not the lock: a new run proceeds.
    assert (out / ".writer.lock").exists()
    r = _embed(tiny_model_dir, clips, out, "--overwrite")
    assert r.exit_code == 0, r.output
    assert len(Store.open(out)) == 3


# ---------------------------------------------------------------------------- 3. nothing outside
@pytest.mark.parametrize("name", ["data", "errors.jsonl", "_versions"])
def test_symlinked_store_entry_is_refused(tiny_model_dir, clips, tmp_path, name):
    out = tmp_path / "st"
    assert _embed(tiny_model_dir, clips, out).exit_code == 0
    outside = tmp_path / "outside"
    outside.mkdir()
    real = out / name
    target = outside / name
    if real.exists():
        os.replace(real, target)
    else:
        target.write_text("precious\n")
    os.symlink(target, real)
    snapshot = {p: p.read_bytes() for p in outside.rglob("*") if p.is_file()}
    with pytest.raises(StoreError, match="symbolic link"):
        Store.open(out, write=True)
    extra = tmp_path / "more"
    extra.mkdir()
    sf.write(extra / "d.wav", np.zeros(800), 8000)
    r = _embed(tiny_model_dir, extra, out)
    assert r.exit_code != 0 and "symbolic link" in r.output and "Traceback" not in r.output
    assert {p: p.read_bytes() for p in outside.rglob("*") if p.is_file()} == snapshot


def test_append_lines_does_not_follow_a_link(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep\n")
    os.symlink(target, tmp_path / "log.jsonl")
    with pytest.raises(OSError, match="symbolic link"):
        append_lines(tmp_path / "log.jsonl", [{"a": 1}])
    assert target.read_text() == "keep\n"


def test_atomic_write_replaces_the_link_not_its_target(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep\n")
    link = tmp_path / "out.json"
    os.symlink(target, link)
    atomic_write_bytes(link, b"new\n")
    assert not link.is_symlink() and link.read_bytes() == b"new\n"
    assert target.read_text() == "keep\n"


def test_json_format_refuses_a_symlinked_subfolder(tiny_model_dir, clips, tmp_path):
    out = tmp_path / "json"
    out.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, out / "sub")
    r = _run(
        ["embed", str(clips), "-r", "--model", str(tiny_model_dir), "--out", str(out), "--format", "json"]
    )
    assert r.exit_code != 0 and "outside --out" in r.output and "Traceback" not in r.output
    assert list(outside.iterdir()) == []


# -------------------------------------------------------------------------------- 4. validation
@pytest.mark.parametrize(
    ("field", "value"), [("dim", "8"), ("dim", 0), ("format_version", "1"), ("dtype", 3)]
)
def test_bad_manifest_field_is_named(tmp_path, field, value):
    root = tmp_path / "st"
    _store(root, 3)
    m = json.loads((root / "manifest.json").read_text())
    m["store"][field] = value
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match=rf"manifest.json: .*store.{field}"):
        migrate_store(root)
    assert not (root / "_versions").exists()


@pytest.mark.parametrize("value", [0, -5, "4", 1.5, True, None])
def test_bad_shard_size_is_refused_not_a_hang(tmp_path, value):
    root = tmp_path / "st"
    _store(root, 3)
    m = json.loads((root / "manifest.json").read_text())
    m["store"]["shard_size"] = value
    (root / "manifest.json").write_text(json.dumps(m))
    if isinstance(value, int) and value <= 0:
        # These hung at 100% CPU: open in a child process, so a regression fails instead of hanging.
        code = "import sys; from mlx_clap.store import migrate_store; migrate_store(sys.argv[1])"
        r = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True,
                           env=_env(), timeout=60)  # fmt: skip
        assert r.returncode != 0 and "field store.shard_size" in r.stderr, r.stderr
        return
    with pytest.raises(StoreError, match=r"manifest.json: field store.shard_size"):
        migrate_store(root)


@pytest.mark.parametrize(
    ("field", "value"),
    [("size", "12"), ("size", -1), ("size", 1.5), ("mtime", "x"), ("mtime", None), ("path", 5), ("path", "")],
)
def test_bad_item_field_names_file_line_and_field(tmp_path, field, value):
    root = tmp_path / "st"
    _store(root, 3)
    lines = (root / "items.jsonl").read_text().splitlines()
    obj = json.loads(lines[1])
    obj[field] = value
    lines[1] = json.dumps(obj)
    (root / "items.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(StoreError, match=rf"items.jsonl: line 2: field '{field}'"):
        migrate_store(root)


@pytest.mark.parametrize("how", ["missing", "file"])
def test_repair_never_erases_items_when_shards_is_missing(tmp_path, how):
    root = tmp_path / "st"
    _store(root, 6)
    before = (root / "items.jsonl").read_bytes()
    import shutil

    shutil.rmtree(root / "shards")
    if how == "file":
        (root / "shards").write_text("oops")
    with pytest.raises(StoreError, match="shards: is missing or not a folder"):
        migrate_store(root)
    assert (root / "items.jsonl").read_bytes() == before


@pytest.mark.parametrize("damage", ["missing shard", "short shard", "flipped byte"])
def test_a_damaged_old_store_is_refused_whole_and_left_as_it_was(tmp_path, damage):
    """The old format's data-loss case: a missing shard made its open cut items.jsonl. A migration
    converts every row or none: the damaged file is named and nothing is written or removed."""
    root = _store(tmp_path / "st", 10)  # shards of 4, 4 and 2 rows
    shard = root / "shards" / "emb-00001.npy"
    if damage == "missing shard":
        shard.unlink()
    elif damage == "short shard":
        np.save(shard, np.load(shard)[:2])
    else:
        arr = np.load(shard)
        arr[1, 3] += 0.5
        np.save(shard, arr)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    cause = {"missing shard": "unreadable shard", "short shard": "but 4 rows", "flipped byte": "checksum"}
    with pytest.raises(StoreError, match=rf"emb-00001.npy: .*{cause[damage]}"):
        migrate_store(root)
    after = {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != ".writer.lock"}
    assert after == before and not (root / "_versions").exists()


def test_cluster_clusters_json_folder_or_read_only(tmp_path, monkeypatch):
    root = tmp_path / "st"
    _lance_store(root, 6)
    (root / "clusters.json").mkdir()
    r = _run(["cluster", str(root), "-k", "2"])
    assert r.exit_code != 0 and "clusters.json: is a folder" in r.output
    (root / "clusters.json").rmdir()

    import mlx_clap.io.files as files

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(files, "atomic_write_json", denied)
    r = _run(["cluster", str(root), "-k", "2"])
    assert r.exit_code != 0 and "cannot write the cluster assignments" in r.output
    assert "Traceback" not in r.output


# ------------------------------------------------------------------------------- 5. checksums
def test_bit_flip_found_by_check_then_repaired(tmp_path):
    root = tmp_path / "st"
    _lance_store(root, 10)
    (data,) = (root / "data").iterdir()
    raw = bytearray(data.read_bytes())
    at = raw.find(_vecs(0, 10)[5].tobytes())  # the vector of /a/5.wav
    assert at > 0
    raw[at + 10] ^= 0x40
    data.write_bytes(bytes(raw))
    r = _run(["check", str(root), "--json"])
    assert r.exit_code == 1
    report = json.loads(r.stdout)
    assert [d["path"] for d in report["damaged_rows"]] == ["/a/5.wav"]
    assert "checksum" in report["damaged_rows"][0]["cause"]
    r = _run(["check", str(root), "--repair"])
    assert r.exit_code == 0 and "removed 1 row" in r.output
    s = Store.open(root)
    want = [i for i in range(10) if i != 5]
    assert [it["path"] for it in s.items] == [f"/a/{i}.wav" for i in want]
    np.testing.assert_array_equal(s.matrix(), _vecs(0, 10)[want])  # each path keeps its own vector
    assert ("/a/5.wav", 5, 1.5) not in s.done_keys()  # so a rerun of embed redoes it
    assert _run(["check", str(root)]).exit_code == 0
    with Store.open(root, write=True) as w:  # and the store takes new rows afterwards
        w.write(_items(5, 1), _vecs(0, 10)[5:6])
    assert len(Store.open(root)) == 10


# ------------------------------------------------------------------------------- 6. creation
def _failing(exc: BaseException):
    def fail(*a, **k):
        raise exc

    return fail


def test_disk_full_at_creation_is_one_clear_error(tmp_path, monkeypatch, tiny_model_dir, clips):
    import lance

    monkeypatch.setattr(lance, "write_dataset", _failing(OSError(errno.ENOSPC, "No space left on device")))
    r = _embed(tiny_model_dir, clips, tmp_path / "st")
    assert r.exit_code != 0 and "no space left" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "st" / "_versions").exists()  # no store, not even an empty one
    monkeypatch.undo()
    assert _embed(tiny_model_dir, clips, tmp_path / "st").exit_code == 0


def test_disk_full_while_writing_keeps_what_was_written(tmp_path, monkeypatch, tiny_model_dir, clips):
    import lance.fragment

    out = tmp_path / "st"
    assert _embed(tiny_model_dir, clips, out).exit_code == 0
    before = Store.open(out)
    more = tmp_path / "more"
    more.mkdir()
    sf.write(more / "d.wav", 0.1 * np.random.default_rng(0).standard_normal(8000), 8000)
    enospc = OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(lance.fragment, "write_fragments", _failing(enospc))
    r = _embed(tiny_model_dir, more, out)
    assert r.exit_code != 0 and "no space left" in r.output and "Traceback" not in r.output
    after = Store.open(out)
    assert after.items == before.items and len(after) == 3


def test_read_only_output_folder_is_a_clear_error(tmp_path, monkeypatch, tiny_model_dir, clips):
    import lance

    # As in a read-only folder (tests run as root, so chmod would not stop them).
    monkeypatch.setattr(lance, "write_dataset", _failing(PermissionError(errno.EACCES, "Permission denied")))
    r = _embed(tiny_model_dir, clips, tmp_path / "st")
    assert r.exit_code != 0 and "permission denied" in r.output and "Traceback" not in r.output


def test_killed_creation_is_redone_by_the_next_run(tmp_path, monkeypatch, tiny_model_dir, clips):
    import lance

    monkeypatch.setattr(lance, "write_dataset", _failing(KeyboardInterrupt()))  # killed before its commit
    with pytest.raises(KeyboardInterrupt):
        Store.create(tmp_path / "st", {}, dim=8)
    monkeypatch.undo()
    (tmp_path / "st" / "data").mkdir(exist_ok=True)
    (tmp_path / "st" / "data" / "dead.lance").write_bytes(b"half a data file")  # a SIGKILLed creation's
    assert _embed(tiny_model_dir, clips, tmp_path / "st").exit_code == 0
    assert len(Store.open(tmp_path / "st")) == 3
    assert not (tmp_path / "st" / "data" / "dead.lance").exists()


def test_overwrite_starts_fresh_but_never_wipes_other_files(tmp_path, tiny_model_dir, clips):
    out = tmp_path / "st"
    assert _embed(tiny_model_dir, clips, out).exit_code == 0
    first = Store.open(out)
    r = _embed(tiny_model_dir, clips, out, "--overwrite", "--summary-json")
    assert r.exit_code == 0, r.output
    again = Store.open(out)
    assert json.loads(r.output.strip().splitlines()[-1])["embedded"] == 3  # nothing kept from before
    assert again.version > first.version and again.items == first.items
    # A folder holding other files is never wiped, even with --overwrite.
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("x")
    r = _embed(tiny_model_dir, clips, other, "--overwrite")
    assert r.exit_code != 0 and (other / "thesis.tex").exists()


def test_check_help_has_example():
    r = _run(["check", "--help"])
    assert r.exit_code == 0 and "mlx-clap check vectors/ --repair" in r.output


def test_lock_without_fcntl_takes_over_a_dead_holder_only(tmp_path, monkeypatch):
    """The O_EXCL fallback (platforms without fcntl): a live holder's PID is named, a dead one's lock is
    taken over."""
    import socket

    from mlx_clap.search import lock

    monkeypatch.setattr(lock, "fcntl", None)
    folder = tmp_path / "st"
    folder.mkdir()
    rec = {"pid": 1, "host": socket.gethostname(), "since": "then"}  # PID 1 is always alive
    (folder / lock.LOCK_NAME).write_text(json.dumps(rec))
    with pytest.raises(lock.StoreLockedError, match="in use by PID 1 "):
        lock.acquire(folder)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / lock.LOCK_NAME).write_text(json.dumps({**rec, "pid": dead.pid}))
    lock.acquire(folder)
    try:
        assert json.loads((folder / lock.LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release(folder)
    assert not (folder / lock.LOCK_NAME).exists()


def test_out_given_as_a_link_to_an_empty_folder(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "link")
    with Store.create(tmp_path / "link", {}, dim=8) as s:
        s.write(_items(0, 1), _vecs(0, 1))
    assert (tmp_path / "link").is_symlink() and (real / "_versions").is_dir()
    assert len(Store.open(tmp_path / "link")) == 1


def test_check_reports_a_missing_data_file_and_repair_drops_its_rows(tmp_path):
    """A store that cannot even be opened (a data file gone) gets its report, not a one-line error."""
    root = tmp_path / "st"
    _lance_store(root, 4)
    with Store.open(root, write=True) as w:
        w.write(_items(4, 2), _vecs(4, 2))
    newest = max((root / "data").iterdir(), key=lambda p: p.stat().st_mtime_ns)
    newest.unlink()  # the fragment of /a/4.wav and /a/5.wav
    r = _run(["check", str(root), "--json"])
    assert r.exit_code == 1
    report = json.loads(r.stdout)
    assert [f["rows"] for f in report["damaged_fragments"]] == [2] and not report["ok"]
    r = _run(["check", str(root), "--repair"])
    assert r.exit_code == 0 and "removed 2 row" in r.output, r.output
    assert [it["path"] for it in Store.open(root).items] == [f"/a/{i}.wav" for i in range(4)]


def test_an_interrupt_inside_a_commit_stays_an_interrupt(tmp_path):
    """Ctrl-C while Lance commits reaches the command as KeyboardInterrupt (exit 130, the clean message),
    in a fresh process where nothing imported lance.commit before."""
    code = (
        "import sys, numpy as np, lance\n"
        "from mlx_clap.store import Store\n"
        "w = Store.create(sys.argv[1], {}, dim=8)\n"
        "def stop(*a, **k):\n"
        "    raise KeyboardInterrupt\n"
        "lance.LanceDataset.commit = staticmethod(stop)\n"
        "try:\n"
        "    w.write([{'path': '/a.wav', 'size': 1, 'mtime': 0.0}], np.eye(8, dtype=np.float32)[:1])\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted')\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "st")], capture_output=True, text=True,
                       env=_env(), timeout=120)  # fmt: skip
    assert r.stdout.strip() == "interrupted", r.stderr
