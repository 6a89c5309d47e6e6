"""`mlx-clap embed` as users move their library: a renamed or remounted root, rows of files gone
elsewhere (--prune-missing), files that fail on every run (--exclude, exit 3 for known failures),
non-regular files (a FIFO or a device named *.wav must never hang the run), and option checks.

The CLI tests use the session's tiny random model (conftest.tiny_model_dir)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import REPO_ROOT
from fixtures import run
from test_store_sync import summary_of

from mlx_clap.store import Store

SR = 48000
# A run that hangs on a FIFO must fail the test, not block the suite.
HANG_TIMEOUT_S = 180


def embed_args(inputs: Path | list[Path], model: Path, out: Path, *options: str) -> list[str]:
    named = inputs if isinstance(inputs, list) else [inputs]
    return [str(a) for a in ["embed", *named, "-r", "--model", model, "--out", out, "-q", *options]]


def write_clip(path: Path, seed: int, seconds: float = 1.0) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, 0.1 * rng.standard_normal(int(seconds * SR)).astype(np.float32), SR)


def stored_paths(store: Path) -> list[str]:
    items = Store.open(store).items
    paths = [str(it["path"]) for it in items]
    assert len(paths) == len(set(paths)), "two rows for one path"
    return sorted(paths)


def stored_vectors(store: Path) -> dict[str, np.ndarray]:
    st = Store.open(store)
    m = st.matrix()
    return {str(it["path"]): m[i] for i, it in enumerate(st.items)}


@pytest.fixture()
def library(tmp_path) -> Path:
    lib = tmp_path / "home" / "Sounds"
    for i, name in enumerate(["a.wav", "b.wav", "sub/c.wav"]):
        write_clip(lib / name, seed=i)
    return lib


# ------------------------------------------------------------------------ 1: the library moves
def test_a_renamed_root_moves_its_rows_instead_of_doubling_them(tiny_model_dir, library, tmp_path):
    store = tmp_path / "store"
    assert run(embed_args(library, tiny_model_dir, store)).exit_code == 0
    before = stored_vectors(store)
    moved = library.with_name("Audio")
    library.rename(moved)
    r = run(embed_args(moved, tiny_model_dir, store, "--summary-json"))
    assert r.exit_code == 0, r.output
    s = summary_of(r)
    assert (s["embedded"], s["reused"], s["removed"], s["moved"]) == (0, 3, 3, 3), s
    assert stored_paths(store) == sorted(str(p) for p in moved.rglob("*.wav"))
    after = stored_vectors(store)
    for old, vec in before.items():  # the vectors moved with their files
        np.testing.assert_array_equal(after[old.replace(str(library), str(moved))], vec)


def test_a_copy_elsewhere_keeps_its_row_and_an_unmounted_drive_is_not_a_move(
    tiny_model_dir, library, tmp_path
):
    """Only a gone row can be the old place of a moved file; a drive that is not mounted is gone from
    its mount folder, not moved into the home folder, so its rows stay."""
    store = tmp_path / "store"
    drive = tmp_path / "media" / "Backup"  # as /media/user/Backup: the folder goes when unmounted
    for i, name in enumerate(["a.wav", "b.wav"]):
        write_clip(drive / name, seed=i)  # the same content and names as the library's a.wav, b.wav
    keep = tmp_path / "keep"
    write_clip(keep / "a.wav", seed=0)  # a copy that stays where it is
    assert run(embed_args([drive, keep], tiny_model_dir, store)).exit_code == 0
    for p in drive.iterdir():
        p.unlink()
    drive.rmdir()  # "unmounted"
    r = run(embed_args(library, tiny_model_dir, store, "--summary-json"))
    assert r.exit_code == 0, r.output
    s = summary_of(r)
    assert (s["reused"], s["removed"], s["moved"]) == (2, 0, 0), s
    paths = stored_paths(store)
    assert str(drive / "a.wav") in paths and str(keep / "a.wav") in paths and len(paths) == 6


def test_prune_missing_drops_rows_of_gone_files_everywhere_and_only_those(tiny_model_dir, library, tmp_path):
    store = tmp_path / "store"
    other = tmp_path / "other"
    write_clip(other / "gone.wav", seed=10)
    write_clip(other / "stays.wav", seed=11)
    assert run(embed_args([library, other], tiny_model_dir, store)).exit_code == 0
    (other / "gone.wav").unlink()
    # Without the option a run naming only `library` is up to date and keeps other/gone.wav's row.
    r = run(embed_args(library, tiny_model_dir, store, "--summary-json"))
    assert summary_of(r)["up_to_date"] and str(other / "gone.wav") in stored_paths(store)
    r = run(embed_args(library, tiny_model_dir, store, "--summary-json", "--prune-missing"))
    assert r.exit_code == 0, r.output
    s = summary_of(r)
    assert (s["removed"], s["missing"], s["embedded"]) == (1, 1, 0), s
    paths = stored_paths(store)
    assert str(other / "gone.wav") not in paths and str(other / "stays.wav") in paths and len(paths) == 4
    r = run(["embed", library, "-r", "--model", tiny_model_dir, "--out", store, "--prune-missing"])
    assert r.exit_code == 0 and "removed" not in r.stderr  # nothing left to prune: up to date


def test_a_drive_mounted_elsewhere_is_cleaned_by_prune_missing(tiny_model_dir, tmp_path):
    store = tmp_path / "store"
    old = tmp_path / "media" / "Drive" / "lib"
    for i, name in enumerate(["x.wav", "y.wav"]):
        write_clip(old / name, seed=20 + i)
    assert run(embed_args(old, tiny_model_dir, store)).exit_code == 0
    new = tmp_path / "mnt" / "drive" / "lib"
    new.parent.mkdir(parents=True)
    old.rename(new)
    (tmp_path / "media" / "Drive").rmdir()
    r = run(embed_args(new, tiny_model_dir, store, "--summary-json", "--prune-missing"))
    assert r.exit_code == 0, r.output
    s = summary_of(r)
    assert (s["reused"], s["removed"], s["embedded"]) == (2, 2, 0), s
    assert stored_paths(store) == [str(new / "x.wav"), str(new / "y.wav")]


def test_naming_a_vanished_root_suggests_prune_missing(tiny_model_dir, library, tmp_path):
    store = tmp_path / "store"
    assert run(embed_args(library, tiny_model_dir, store)).exit_code == 0
    moved = library.with_name("Audio")
    library.rename(moved)
    r = run(embed_args(library, tiny_model_dir, store))
    assert r.exit_code == 1
    assert "no such file or folder" in r.output and "3 rows" in r.output and "--prune-missing" in r.output
    assert len(stored_paths(store)) == 3  # nothing pruned by the error
    # Named beside the new place: the run goes on, says so, and the rows move.
    r = run(embed_args([library, moved], tiny_model_dir, store))
    assert r.exit_code == 1 and "note:" in r.stderr and "3 rows" in r.stderr
    assert stored_paths(store) == sorted(str(p) for p in moved.rglob("*.wav"))


def test_prune_missing_needs_a_store_and_excludes_no_prune(tiny_model_dir, library, tmp_path):
    r = run(["embed", library, "--model", tiny_model_dir, "--prune-missing"])
    assert r.exit_code == 2 and "--prune-missing" in r.output
    r = run(embed_args(library, tiny_model_dir, tmp_path / "s", "--prune-missing", "--no-prune"))
    assert r.exit_code == 2 and "--no-prune" in r.output


# ------------------------------------------------------ 2: --exclude and exit status for known failures
def test_known_failures_exit_3_new_ones_exit_1_and_exclude_skips_them(tiny_model_dir, library, tmp_path):
    store = tmp_path / "store"
    (library / "sub" / "broken.wav").write_bytes(b"never audio")
    args = embed_args(library, tiny_model_dir, store, "--summary-json")
    r = run(args)
    assert r.exit_code == 1 and summary_of(r)["new_failures"] == 1
    r = run(args)  # the same file, the same cause: only known failures
    s = summary_of(r)
    assert r.exit_code == 3, r.output
    assert (s["failed"], s["new_failures"]) == (1, 0)
    (library / "worse.wav").write_bytes(b"also not audio")
    r = run(args)  # one known, one new
    assert r.exit_code == 1 and summary_of(r)["new_failures"] == 1
    (library / "sub" / "broken.wav").write_bytes(b"")  # the same file, a new cause
    (library / "worse.wav").unlink()
    r = run(args)
    assert r.exit_code == 1 and "empty file" in summary_of(r)["failures"][0]["error"]
    # Excluded by its path relative to the folder named: skipped, counted, gone from errors.jsonl.
    r = run([*args, "--exclude", "sub/broken.wav"])
    assert r.exit_code == 0, r.output
    s = summary_of(r)
    assert s["failed"] == 0 and s["not_considered"]["excluded"] == 1
    assert not (store / "errors.jsonl").exists()
    # By its name alone, wherever it lies; the note says what was passed over.
    r = run(["embed", library, "-r", "--model", tiny_model_dir, "--out", store, "--exclude", "broken.*"])
    assert r.exit_code == 0 and "1 files matching --exclude" in r.stderr
    # A pattern that names other files does not hide the failure.
    assert run([*args, "--exclude", "*.flac", "--exclude", "a.wav"]).exit_code == 1
    # A file named on the command line is always tried.
    r = run(["embed", library / "sub" / "broken.wav", "--format", "jsonl", "--model", tiny_model_dir,
             "--exclude", "*"])  # fmt: skip
    assert r.exit_code == 1 and "broken.wav" in r.stderr


def test_excluded_files_lose_their_rows_like_gone_ones(tiny_model_dir, library, tmp_path):
    store = tmp_path / "store"
    assert run(embed_args(library, tiny_model_dir, store)).exit_code == 0
    r = run(embed_args(library, tiny_model_dir, store, "--summary-json", "--exclude", "sub/*"))
    assert r.exit_code == 0 and summary_of(r)["removed"] == 1
    assert stored_paths(store) == [str(library / "a.wav"), str(library / "b.wav")]


def test_embed_help_documents_exclude_and_the_exit_statuses():
    r = run(["embed", "--help"])
    text = " ".join(r.output.split())
    assert "--exclude" in text and "--prune-missing" in text
    assert "status 3" in text and "status 1" in text and "130" in text


# ------------------------------------------------------------------- 3: FIFOs and devices never hang
@pytest.fixture()
def odd_files(tmp_path) -> Path:
    if not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"):
        pytest.skip("needs os.mkfifo and /dev/zero (POSIX)")
    folder = tmp_path / "odd"
    write_clip(folder / "good.wav", seed=1)
    os.mkfifo(folder / "pipe.wav")
    os.symlink("/dev/zero", folder / "zero.wav")
    return folder


def _cli(args: list, timeout: float = HANG_TIMEOUT_S) -> subprocess.CompletedProcess:
    """The CLI in a subprocess, killed after `timeout` (a hang fails the test instead of blocking)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "mlx_clap.cli", *map(str, args)]
    try:
        return subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"`mlx-clap {' '.join(map(str, args))}` hung on a non-regular file ({exc})")


def test_a_fifo_or_a_device_named_wav_is_refused_not_read(tiny_model_dir, odd_files, tmp_path):
    store = tmp_path / "store"
    # Not quiet: the progress bar probes durations, which must not open the FIFO either.
    r = _cli(["embed", odd_files, "--model", tiny_model_dir, "--out", store, "--summary-json"])
    assert r.returncode == 1, r.stderr
    assert f"{odd_files / 'pipe.wav'}: not a regular file (FIFO)" in r.stderr
    assert f"{odd_files / 'zero.wav'}: not a regular file (character device)" in r.stderr
    assert stored_paths(store) == [str(odd_files / "good.wav")], r.stdout + r.stderr
    errors = sorted(json.loads(x)["path"] for x in (store / "errors.jsonl").read_text().splitlines())
    assert errors == [str(odd_files / "pipe.wav"), str(odd_files / "zero.wav")]
    # Named on the command line, with JSON lines on stdout: refused before the model loads.
    r = _cli(["embed", odd_files / "pipe.wav", "--model", tiny_model_dir])
    assert r.returncode == 1 and "pipe.wav: not a regular file (FIFO)" in r.stderr and not r.stdout


def test_decoding_never_opens_a_fifo(odd_files):
    from mlx_clap.preprocess.decode_ahead import InputFile, decode_file

    got: list = []
    t = threading.Thread(
        target=lambda: got.append(decode_file(InputFile(odd_files / "pipe.wav", Path()), SR, True))
    )
    t.daemon = True
    t.start()
    t.join(30)
    assert not t.is_alive(), "decode_file blocked opening a FIFO"
    assert "not a regular file" in got[0].error


# ----------------------------------------------------------------------------- 4: option checks
def test_embed_text_into_an_existing_folder_is_a_clear_error(tiny_model_dir, tmp_path):
    r = run(["embed-text", "a dog", "--model", tiny_model_dir, "--format", "npy", "--out", tmp_path])
    assert r.exit_code == 2 and "is a folder" in r.output and not isinstance(r.exception, OSError)
    # A path that cannot be written (under a file): one line naming it, no traceback.
    (tmp_path / "afile").write_text("x")
    target = tmp_path / "afile" / "v.npy"
    r = run(["embed-text", "a dog", "--model", tiny_model_dir, "--format", "npy", "--out", target])
    assert r.exit_code == 1 and f"{target}: cannot write" in r.output and not isinstance(r.exception, OSError)


def test_embed_seed_takes_the_whole_randomstate_range(tmp_path):
    write_clip(tmp_path / "a.wav", seed=0)
    for seed in ("0", str(2**32 - 1)):  # parsed, then the (absent) model is what fails
        r = run(["embed", tmp_path / "a.wav", "--model", tmp_path / "no-model", "--seed", seed])
        assert r.exit_code == 1 and "cannot load model" in r.output, r.output


@pytest.mark.parametrize(
    "option",
    [["--seed", "-1"], ["--seed", str(2**32)], ["--hop", "nan"], ["--hop", "inf"], ["--hop", "-1"],
     ["--hop", "0"]],
)  # fmt: skip
def test_embed_options_out_of_range_are_usage_errors(option, tmp_path):
    write_clip(tmp_path / "a.wav", seed=0)
    r = run(["embed", tmp_path / "a.wav", "--model", tmp_path / "no-model", *option])
    assert r.exit_code == 2, r.output
    assert option[0] in r.output and "Invalid value" in r.output
