"""`mlx-clap embed`, `embed-text`, `info` on a tiny random-init converted model.

Covers: vectors equal `ClapModel.embed_audio`; store / json / jsonl outputs; resume and settings
mismatch; failures recorded while the run goes on (exit 1); SIGKILL mid-run then rerun gives the same
store as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from conftest import REPO_ROOT

from mlx_clap.cli import main
from mlx_clap.store import Store, check_store


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    import mlx_clap

    return mlx_clap.load(tiny_model_dir)


def _write_m4a(path: Path, x: np.ndarray, sr: int) -> None:
    import av

    with av.open(str(path), "w", format="mp4") as out:
        st = out.add_stream("aac", rate=sr)
        st.layout = "mono"
        for i in range(0, len(x), 1024):
            fr = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(x[None, i : i + 1024]), format="fltp", layout="mono"
            )
            fr.sample_rate, fr.pts, fr.time_base = sr, i, Fraction(1, sr)
            for p in st.encode(fr):
                out.mux(p)
        for p in st.encode(None):
            out.mux(p)


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory) -> Path:
    """Short, 12-s and 35-s (streamed) clips, stereo, 16/22.05/44.1/48 kHz, M4A, one bad file."""
    root = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(1)
    (root / "sub" / "deeper").mkdir(parents=True)
    sf.write(root / "a_short.wav", 0.1 * rng.standard_normal(44100 * 2), 44100)
    sf.write(root / "sub" / "stereo.flac", 0.1 * rng.standard_normal((22050 * 3, 2)), 22050)
    sf.write(root / "sub" / "twelve.ogg", 0.1 * rng.standard_normal(16000 * 12), 16000, format="OGG")
    sf.write(root / "sub" / "deeper" / "long.flac", 0.1 * rng.standard_normal(48000 * 35), 48000)
    sf.write(root / "sub" / "deeper" / "été ñ.wav", 0.1 * rng.standard_normal(8000), 8000)
    _write_m4a(root / "sub" / "clip.m4a", (0.1 * rng.standard_normal(48000 * 2)).astype(np.float32), 48000)
    (root / "broken.mp3").write_text("not audio at all")
    (root / "notes.txt").write_text("ignored: not an audio suffix")
    return root


GOOD = ["a_short.wav", "sub/clip.m4a", "sub/deeper/long.flac", "sub/deeper/été ñ.wav", "sub/stereo.flac",
        "sub/twelve.ogg"]  # fmt: skip


def _run(args: list[str]):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_store_vectors_equal_embed_audio(tiny_model_dir, tiny_model, audio_dir, tmp_path):
    out = tmp_path / "store"
    r = _run(["embed", str(audio_dir), "-r", "--model", str(tiny_model_dir), "--out", str(out),
              "--store-dtype", "float32", "--batch-size", "4", "--summary-json", "-q"])  # fmt: skip
    assert r.exit_code == 1, r.output
    summary = json.loads(r.stdout)
    assert (summary["embedded"], summary["failed"], summary["skipped"]) == (6, 1, 0)
    assert summary["failures"][0]["path"] == str(audio_dir / "broken.mp3")
    assert summary["realtime_factor"] > 0 and summary["audio_seconds"] == pytest.approx(
        2 + 3 + 12 + 35 + 1 + 2, 0.01
    )
    assert "broken.mp3" in r.stderr and "not a readable audio file" in r.stderr

    store = Store.open(out)
    paths = [it["path"] for it in store.items]
    assert paths == [str(audio_dir / g) for g in sorted(GOOD)]
    want = tiny_model.embed_audio(paths, batch_size=4)
    np.testing.assert_allclose(store.matrix(), want, atol=1e-6, rtol=0)
    errs = store.errors()
    assert len(errs) == 1 and errs[0]["path"].endswith("broken.mp3")
    m = store.manifest
    assert m["model"] == str(tiny_model_dir) and m["embedding_dim"] == 512 and len(m["weights_sha256"]) == 64
    assert m["settings"]["long_audio"] == "windows-mean" and m["store"]["dtype"] == "float32"

    # A rerun embeds nothing new: every good file is skipped, the bad one fails again.
    r = _run(["embed", str(audio_dir), "-r", "--model", str(tiny_model_dir), "--out", str(out),
              "--store-dtype", "float32", "--summary-json", "-q"])  # fmt: skip
    summary = json.loads(r.stdout)
    # The same failure as the run before: status 3, "only known failures".
    assert (summary["embedded"], summary["skipped"], summary["failed"], r.exit_code) == (0, 6, 1, 3)
    assert len(Store.open(out)) == 6

    # Other settings: a clear error; --overwrite starts fresh.
    r = _run(["embed", str(audio_dir), "-r", "--model", str(tiny_model_dir), "--out", str(out),
              "--store-dtype", "float32", "--long-audio", "head"])  # fmt: skip
    assert r.exit_code != 0 and "--overwrite" in r.output and "long_audio" in r.output
    r = _run(["embed", str(audio_dir), "-r", "--model", str(tiny_model_dir), "--out", str(out),
              "--long-audio", "head", "--overwrite", "-q"])  # fmt: skip
    assert r.exit_code == 1
    store = Store.open(out)
    assert len(store) == 6 and store.dtype == "float16"
    want = tiny_model.embed_audio([it["path"] for it in store.items], long_audio="head")
    np.testing.assert_allclose(store.matrix(), want, atol=2e-3, rtol=0)


def test_json_mirrors_tree_and_jsonl(tiny_model_dir, tiny_model, audio_dir, tmp_path):
    out = tmp_path / "json"
    r = _run(["embed", str(audio_dir), "-r", "--model", str(tiny_model_dir), "--out", str(out),
              "--format", "json", "-q"])  # fmt: skip
    assert r.exit_code == 1
    for g in GOOD:
        rec = json.loads((out / (g + ".json")).read_text(encoding="utf-8"))
        assert rec["path"] == str(audio_dir / g) and rec["filename"] == Path(g).name
        assert rec["model"] == str(tiny_model_dir) and rec["settings"]["long_audio"] == "windows-mean"
        assert rec["duration"] > 0 and len(rec["embedding"]) == 512
        want = tiny_model.embed_audio(str(audio_dir / g))[0]
        np.testing.assert_allclose(rec["embedding"], want, atol=1e-6)
    assert not (out / "broken.mp3.json").exists()
    assert "broken.mp3" in (out / "errors.jsonl").read_text()
    r = _run(["embed", str(audio_dir), "-r", "--model", str(tiny_model_dir), "--out", str(out),
              "--format", "json", "--summary-json", "-q"])  # fmt: skip
    assert json.loads(r.stdout)["skipped"] == 6

    # jsonl on stdout, summary on stderr; files named directly, in the order found.
    files = [str(audio_dir / "a_short.wav"), str(audio_dir / "sub" / "clip.m4a")]
    r = _run(["embed", *files, "--model", str(tiny_model_dir), "--summary-json", "-q"])
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["path"] for x in lines] == files
    np.testing.assert_allclose([x["embedding"] for x in lines], tiny_model.embed_audio(files), atol=1e-6)
    assert json.loads(r.stderr.strip().splitlines()[-1])["embedded"] == 2


def test_missing_paths_and_bad_model(tiny_model_dir, audio_dir, tmp_path):
    r = _run(["embed", str(audio_dir / "a_short.wav"), str(tmp_path / "nope.wav"), "--model",
              str(tiny_model_dir), "-q"])  # fmt: skip
    assert r.exit_code == 1 and "nope.wav: no such file" in r.stderr
    assert len(r.stdout.splitlines()) == 1
    r = _run(["embed", str(audio_dir), "--model", str(tmp_path / "no_model"), "-q"])
    assert r.exit_code == 1 and "cannot load model" in r.output
    (tmp_path / "empty").mkdir()
    r = _run(["embed", str(tmp_path / "empty"), "--model", str(tiny_model_dir)])
    assert r.exit_code == 1 and "no audio files found" in r.output
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    r = _run(["embed", str(audio_dir), "--model", str(tiny_model_dir), "--out", str(tmp_path / "other")])
    assert r.exit_code == 1 and "not an embedding store" in r.output
    assert (tmp_path / "other" / "keep.txt").exists()


def test_reference_mode_seeded_per_file(tiny_model_dir, audio_dir, tmp_path):
    f = str(audio_dir / "sub" / "twelve.ogg")
    g = str(audio_dir / "a_short.wav")
    runs = []
    for args in ([f, g], [f], [g, f]):
        r = _run(["embed", *args, "--model", str(tiny_model_dir), "--long-audio", "reference", "--seed", "3",
                  "--batch-size", "2", "-q"])  # fmt: skip
        assert r.exit_code == 0, r.output
        runs.append({json.loads(x)["path"]: json.loads(x)["embedding"] for x in r.stdout.splitlines()})
    # A file's random crop depends on the seed and the file only, not on its batch neighbours.
    assert runs[0][f] == runs[1][f] == runs[2][f]


def test_embed_text_and_info(tiny_model_dir, tiny_model, tmp_path):
    assert tiny_model.family._tokenizer is not None, "the tiny model fixture must carry a tokenizer"
    r = _run(["embed-text", "a dog barking", "rain", "--model", str(tiny_model_dir)])
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["text"] for x in lines] == ["a dog barking", "rain"]
    want = tiny_model.embed_text(["a dog barking", "rain"])
    np.testing.assert_allclose([x["embedding"] for x in lines], want, atol=1e-6)
    r = _run(["embed-text", "a dog barking", "--model", str(tiny_model_dir), "--format", "npy",
              "--out", str(tmp_path / "t.npy")])  # fmt: skip
    assert r.exit_code == 0, r.output
    np.testing.assert_allclose(np.load(tmp_path / "t.npy"), want[:1], atol=1e-6)
    r = _run(["info", "--model", str(tiny_model_dir), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["model"]["embedding_dim"] == 512 and rep["versions"]["mlx"] and rep["device"]
    r = _run(["info", "--model", str(tiny_model_dir)])
    assert "HTSAT hidden 128" in r.stdout and "numpy" in r.stdout


def test_threads_option_sets_workers_and_blas(tiny_model_dir, monkeypatch):
    from mlx_clap.ops import blas

    monkeypatch.delenv("MLX_CLAP_CPU_THREADS", raising=False)  # restored after the test
    before = blas.get_num_threads()
    try:
        r = _run(["--threads", "1", "info", "--model", str(tiny_model_dir), "--json"])
        assert r.exit_code == 0, r.output
        cpu = json.loads(r.stdout)["cpu"]
        assert cpu["workers"] == 1
        assert cpu["blas_threads"] in (1, None)  # None: no OpenBLAS active (MLX_CLAP_BLAS=off)
    finally:
        if before is not None:
            blas.set_num_threads(before)


# --------------------------------------------------------------------------------- kill and resume
def _embed_cmd(model_dir: Path, src: Path, out: Path) -> list[str]:
    opts = ["--batch-size", "1", "--workers", "1", "--store-dtype", "float32", "-q"]
    return [
        sys.executable,
        "-m",
        "mlx_clap.cli",
        "embed",
        str(src),
        "--model",
        str(model_dir),
        "--out",
        str(out),
        *opts,
    ]


def _committed_rows(out) -> int:
    """File rows of the newest version of the store in `out` (0 before its first commit)."""
    from mlx_clap.store import StoreError

    try:
        return len(Store.open(out)) if (out / "_versions").is_dir() else 0
    except StoreError:
        return 0


def test_sigkill_then_resume_equals_uninterrupted(tiny_model_dir, tmp_path):
    src = tmp_path / "many"
    src.mkdir()
    rng = np.random.default_rng(7)
    n_files = 16
    for i in range(n_files):
        sf.write(src / f"f{i:02d}.wav", 0.1 * rng.standard_normal(48000 * 4), 48000)
    (src / "f05.wav").write_bytes(b"RIFF0000WAVEjunk")  # one failure in the middle
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}

    out = tmp_path / "killed"
    proc = subprocess.Popen(_embed_cmd(tiny_model_dir, src, out), env=env, cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if _committed_rows(out) >= 3:  # three files committed: kill it mid-run
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    proc.stderr.close()
    partial = Store.open(out)
    assert 3 <= len(partial) < n_files - 1

    rerun = subprocess.run(_embed_cmd(tiny_model_dir, src, out), env=env, cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert rerun.returncode == 1, rerun.stderr  # f05.wav fails again
    ref_out = tmp_path / "reference"
    ref = subprocess.run(_embed_cmd(tiny_model_dir, src, ref_out), env=env, cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert ref.returncode == 1, ref.stderr

    resumed, whole = Store.open(out), Store.open(ref_out)
    assert len(resumed) == len(whole) == n_files - 1
    assert resumed.items == whole.items  # same rows, same order, no duplicates
    assert len({it["path"] for it in resumed.items}) == n_files - 1
    np.testing.assert_allclose(resumed.matrix(), whole.matrix(), atol=1e-6, rtol=0)
    assert check_store(out)["ok"] and resumed.dead_rows == 0  # compacted, nothing of the killed run left


def test_non_utf8_file_name(tiny_model_dir, tmp_path):
    """A file name that is not valid UTF-8 embeds, and is written so that it reads back unchanged."""
    src = tmp_path / "odd"
    src.mkdir()
    raw = os.path.join(os.fsencode(src), b"x\xff.wav")
    sf.write(raw, np.zeros(4800, np.float32), 48000)
    r = _run(["embed", str(src), "--model", str(tiny_model_dir), "--out", str(tmp_path / "st"), "-q"])
    assert r.exit_code == 0, r.output
    assert os.fsencode(Store.open(tmp_path / "st").items[0]["path"]) == raw
    r = _run(["embed", str(src), "--model", str(tiny_model_dir), "-q"])
    assert r.exit_code == 0 and os.fsencode(json.loads(r.stdout)["path"]) == raw


def test_tiny_decode_budget_no_deadlock(tiny_model_dir, tiny_model, audio_dir, monkeypatch):
    """With a decode budget smaller than any file, decoders wait their turn; the run still completes."""
    import mlx_clap.sync.run as sync_run

    monkeypatch.setattr(sync_run, "DECODE_BUDGET_BYTES", 1000)
    r = _run(["embed", str(audio_dir), "-r", "--model", str(tiny_model_dir), "--long-audio", "center",
              "--workers", "3", "--batch-size", "2", "-q"])  # fmt: skip
    assert r.exit_code == 1  # broken.mp3
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    paths = [x["path"] for x in lines]
    assert paths == [str(audio_dir / g) for g in sorted(GOOD)]
    want = tiny_model.embed_audio(paths, long_audio="center")
    np.testing.assert_allclose([x["embedding"] for x in lines], want, atol=1e-6)
