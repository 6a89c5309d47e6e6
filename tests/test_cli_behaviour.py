"""What a new user of the command line hit, on a tiny random-init model: batch runs that go on past bad
files, the default-model rule, inputs checked before the model, progress in audio seconds, an
errors.jsonl that describes the store as it is, refused output mixes, escaped control characters,
cluster columns and members, counted skips, the one-label note, Ctrl-C, and the explicit ANN index."""

from __future__ import annotations

import json
import os
import random
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
from fixtures import create_store, default_sigint
from test_index import clustered, make_store, unit

from mlx_clap.cli import main
from mlx_clap.store import Store


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """dog.wav (1 s), rain.flac (2 s), long.wav (40 s: streamed through the model), bad.mp3 (not audio)."""
    root = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    sf.write(root / "dog.wav", 0.1 * rng.standard_normal(48000), 48000)
    sf.write(root / "rain.flac", 0.1 * np.sin(np.arange(88200) / 7), 44100)
    sf.write(root / "long.wav", 0.1 * rng.standard_normal(16000 * 40), 16000)
    (root / "bad.mp3").write_bytes(b"this is not audio")
    return root


def run(args: list, env: dict | None = None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def store_of(tmp_path: Path, names: list[str], dim: int = 16) -> Store:
    vecs = unit(np.random.default_rng(1).standard_normal((len(names), dim)))
    return make_store(tmp_path / "store", vecs, names=names, shard_size=8)


# ------------------------------------------------------------------------------------ 1, 17: classify
def test_classify_goes_on_past_a_bad_file_and_exits_1(tiny_model_dir, clips):
    bad, dog = clips / "bad.mp3", clips / "dog.wav"
    r = run(["classify", bad, dog, clips / "missing.wav", "--labels", "dog,rain", "--model", tiny_model_dir])
    assert r.exit_code == 1, r.output
    assert "bad.mp3" in r.stderr and "missing.wav" in r.stderr and "Traceback" not in r.output
    assert r.stdout.startswith(f"{dog}\t") and len(r.stdout.splitlines()) == 1
    r = run(["classify", bad, dog, "--labels", "dog,rain", "--model", tiny_model_dir, "--json"])
    doc = json.loads(r.stdout)
    assert r.exit_code == 1 and [x["path"] for x in doc["results"]] == [str(dog)]
    assert [f["path"] for f in doc["failures"]] == [str(bad)]


def test_classify_one_label_says_it_always_wins(tiny_model_dir, clips):
    r = run(["classify", clips / "dog.wav", "--labels", "dog", "--model", tiny_model_dir])
    assert r.exit_code == 0 and "dog 1.000" in r.stdout
    assert "note:" in r.stderr and "single label always scores 1.000" in r.stderr
    r = run(["classify", clips / "dog.wav", "--labels", "dog", "--model", tiny_model_dir, "--json"])
    assert json.loads(r.stdout)["single_label"] is True
    r = run(["classify", clips / "dog.wav", "--labels", "dog,cat", "--model", tiny_model_dir, "--json"])
    assert json.loads(r.stdout)["single_label"] is False and "note:" not in r.stderr


# -------------------------------------------------------------------------------- 2, 3: model rule
def test_classify_and_search_use_the_store_model_over_the_env(tiny_model_dir, clips, tmp_path):
    import mlx_clap

    model = mlx_clap.load(tiny_model_dir)
    store = create_store(tmp_path / "s", {"model": str(tiny_model_dir)}, 512)
    store.write(
        [{"path": str(clips / "dog.wav"), "size": 1, "mtime": 0.0}], model.embed_audio([clips / "dog.wav"])
    )
    # The environment names a model that does not exist: the store's own model must still be used.
    env = {"MLX_CLAP_MODEL": str(tmp_path / "no-such-model"), "HF_HUB_OFFLINE": "1"}
    r = run(["classify", store.path, "--labels", "dog,rain"], env=env)
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(str(clips / "dog.wav"))
    r = run(["search", store.path, "--text", "a dog", "--json"], env=env)
    assert r.exit_code == 0, r.output
    # --model given on the command line wins over the manifest (here: a model that cannot load).
    r = run(["classify", store.path, "--labels", "dog,rain", "--model", tmp_path / "no-such-model"])
    assert r.exit_code == 1 and "no-such-model" in r.output


def test_model_env_is_the_default_of_classify(tiny_model_dir, clips):
    r = run(
        ["classify", clips / "dog.wav", "--labels", "dog,rain"], env={"MLX_CLAP_MODEL": str(tiny_model_dir)}
    )
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("cmd", ["embed", "embed-text", "info", "classify", "search"])
def test_help_shows_the_one_default_model_rule(cmd):
    r = run([cmd, "--help"])
    text = "".join(r.output.split())  # click wraps the option help anywhere
    assert r.exit_code == 0 and "envvar:MLX_CLAP_MODEL" in text and "default:laion/clap-htsat-unfused" in text


@pytest.mark.parametrize(
    "cmd", ["embed", "embed-text", "info", "convert", "search", "dedupe", "cluster", "classify", "index"]
)
def test_every_command_help_has_a_runnable_example(cmd):
    r = run([cmd, "--help"])
    assert r.exit_code == 0 and "Example" in r.output and f"mlx-clap {cmd} " in r.output


# ----------------------------------------------------------------------------- 7: inputs before model
def test_embed_reports_a_typo_before_loading_the_model(tmp_path):
    out = tmp_path / "x"
    r = run(["embed", tmp_path / "nonexistent" / "folder", "--out", out, "--model", tmp_path / "no-model"])
    assert r.exit_code == 1
    assert "nonexistent/folder: no such file or folder" in r.output and "no-model" not in r.output
    assert not out.exists()  # no empty store left behind


# ---------------------------------------------------------------------------- 10: progress in seconds
def test_progress_counts_audio_seconds(tiny_model_dir, clips, tmp_path, monkeypatch):
    from mlx_clap.cli.embed import EmbedRun, estimate_seconds
    from mlx_clap.preprocess.decode_ahead import discover

    files, _ = discover((str(clips / "dog.wav"), str(clips / "rain.flac"), str(clips / "long.wav")), False)
    assert estimate_seconds(files) == pytest.approx([1.0, 2.0, 40.0], abs=0.01)
    steps: list[tuple[str, float]] = []
    advance = EmbedRun._advance

    def spy(self, path, seconds):
        steps.append((path, seconds))
        advance(self, path, seconds)

    monkeypatch.setattr(EmbedRun, "_advance", spy)
    r = run(["embed", clips / "dog.wav", clips / "rain.flac", clips / "long.wav", "--out", tmp_path / "o",
             "--model", tiny_model_dir])  # fmt: skip
    assert r.exit_code == 0, r.output
    # The bar's total is the audio seconds (its rendering is throttled, so read its updates instead).
    assert "43/43 s" in r.stderr and "file/s" not in r.stderr
    long_steps = [sec for path, sec in steps if path.endswith("long.wav")]
    assert len(long_steps) > 1 and 0 < long_steps[0] < 40, steps  # moved inside the streamed 40-s file


# ------------------------------------------------------------------------------- 11: errors.jsonl
def test_errors_jsonl_describes_the_current_failures(tiny_model_dir, clips, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    sf.write(src / "good.wav", 0.1 * np.ones(4800), 48000)
    (src / "later.wav").write_bytes(b"broken for now")
    (src / "bad.mp3").write_bytes(b"never audio")
    out = tmp_path / "store"
    args = ["embed", src, "--out", out, "--model", tiny_model_dir]
    r = run(args)
    assert r.exit_code == 1 and f"failures listed in {out / 'errors.jsonl'}" in r.stderr
    r = run(args)  # a resume: the same two failures, listed once each, known (status 3)
    errs = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert r.exit_code == 3 and sorted(Path(e["path"]).name for e in errs) == ["bad.mp3", "later.wav"]
    sf.write(src / "later.wav", 0.1 * np.ones(4800), 48000)  # fixed: embedded now, its entry goes
    r = run([*args, "--summary-json", "-q"])
    errs = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert [Path(e["path"]).name for e in errs] == ["bad.mp3"]
    assert json.loads(r.stdout)["errors_file"] == str(out / "errors.jsonl")
    (src / "bad.mp3").unlink()
    r = run(args)
    assert r.exit_code == 0 and not (out / "errors.jsonl").exists()


# ------------------------------------------------------------------------------ 12: json into store
def test_json_format_into_a_store_is_refused(tiny_model_dir, clips, tmp_path):
    out = tmp_path / "store"
    assert run(["embed", clips / "dog.wav", "--out", out, "--model", tiny_model_dir, "-q"]).exit_code == 0
    before = sorted(p.name for p in out.iterdir())
    r = run(["embed", clips / "dog.wav", "--out", out, "--format", "json", "--model", tiny_model_dir])
    assert r.exit_code == 1 and "is an embedding store" in r.output and "--format json" in r.output
    assert sorted(p.name for p in out.iterdir()) == before


# ------------------------------------------------------------------------------ 13: control chars
def test_printable_escapes_control_characters():
    from mlx_clap.cli.output import printable

    assert printable("a\nb\rc\td") == "a\\nb\\rc\\td"
    assert printable("\x1b[2J\x07\x7f\x9b") == "\\x1b[2J\\x07\\x7f\\x9b"
    assert printable("evil\u202etxt.wav\u2028") == "evil\\u202etxt.wav\\u2028"
    assert printable("caf\udce9.wav") == "caf\\udce9.wav"  # an undecodable byte of a file name
    assert printable("été ñ 東京.wav") == "été ñ 東京.wav"


NASTY = ["/s/line\nbreak.wav", "/s/\x1b[31mred\x1b[0m.wav", "/s/cr\rback.wav", "/s/tab\there.wav"]


def test_search_dedupe_cluster_escape_paths_and_json_keeps_them(tmp_path):
    names = NASTY + [f"/s/plain_{i}.wav" for i in range(8)]
    store = store_of(tmp_path, names)
    r = run(["search", store.path, "--like", "/s/plain_0.wav", "-k", "11"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert len(lines) == 11 and not any(c in r.stdout for c in "\x1b\r\t")
    assert "line\\nbreak.wav" in r.stdout and "\\x1b[31mred\\x1b[0m.wav" in r.stdout
    r = run(["search", store.path, "--like", "/s/plain_0.wav", "-k", "11", "--json"])
    assert {x["path"] for x in json.loads(r.stdout)["results"]} == set(names) - {"/s/plain_0.wav"}
    r = run(["cluster", store.path, "-k", "2", "--show-members"])
    assert r.exit_code == 0 and not any(c in r.stdout for c in "\x1b\r\t")
    assert sum("line\\nbreak.wav" in ln for ln in r.stdout.splitlines()) >= 1
    vecs = np.tile(unit(np.ones((1, 16))), (2, 1))
    dup = make_store(tmp_path / "d2", vecs, names=["/s/a\x1b]0;pwned\x07.wav", "/s/b\n.wav"])
    r = run(["dedupe", dup.path])
    assert r.exit_code == 0 and "\x1b" not in r.stdout and "\\x1b]0;pwned\\x07" in r.stdout


def test_embed_and_classify_escape_paths(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad\x1b[2J\n.wav"
    bad.write_bytes(b"not audio")
    good = tmp_path / "go\rod.wav"
    sf.write(good, 0.1 * np.ones(4800), 48000)
    r = run(["embed", bad, good, "--model", tiny_model_dir, "-q"])
    assert r.exit_code == 1 and "bad\\x1b[2J\\n.wav" in r.stderr and "\x1b" not in r.stderr
    r = run(["classify", bad, good, "--labels", "a,b", "--model", tiny_model_dir])
    assert r.exit_code == 1 and "\x1b" not in r.output and "\r" not in r.output
    assert "go\\rod.wav" in r.stdout


# ---------------------------------------------------------------------------------- 14: cluster
def test_cluster_has_a_header_and_lists_members(tmp_path):
    vecs = clustered(30, 16, centers=3, within=0.9, seed=2)
    store = make_store(tmp_path / "s", vecs, names=[f"/c/{i:02d}.wav" for i in range(30)])
    r = run(["cluster", store.path, "-k", "3"])
    assert r.exit_code == 0 and r.stdout.splitlines()[0].split() == ["id", "size", "cosine", "medoid"]
    r = run(["cluster", store.path, "-k", "3", "--members", "2", "--json"])
    doc = json.loads(r.stdout)
    assert all(len(c["members"]) == min(2, c["size"]) for c in doc["clusters"])
    assert all(c["members"][0] == c["medoid_path"] for c in doc["clusters"])  # most typical first
    r = run(["cluster", store.path, "-k", "3", "--show-members", "--json"])
    doc = json.loads(r.stdout)
    labels = json.loads((Path(store.path) / "clusters.json").read_text())["labels"]
    for c in doc["clusters"]:
        assert sorted(c["members"]) == [f"/c/{i:02d}.wav" for i, lab in enumerate(labels) if lab == c["id"]]
    r = run(["cluster", store.path, "-k", "3", "--members", "1"])
    assert r.exit_code == 0 and "more" in r.stdout and len(r.stdout.splitlines()) > 4


# ------------------------------------------------------------------------------ 15: skipped counts
def test_embed_counts_what_it_passed_over(tiny_model_dir, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    sf.write(src / "a.wav", 0.1 * np.ones(4800), 48000)
    sf.write(src / ".hidden.wav", 0.1 * np.ones(4800), 48000)
    sf.write(src / "noextension", 0.1 * np.ones(4800), 48000, format="WAV")
    sf.write(src / "sub" / "b.wav", 0.1 * np.ones(4800), 48000)
    os.symlink(tmp_path / "elsewhere", src / "linked")
    r = run(["embed", src, "--model", tiny_model_dir, "--out", tmp_path / "o1", "--summary-json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["not_considered"] == {
        "hidden": 1, "not_audio_name": 1, "symlinked_folders": 1, "subfolders": 1
    }  # fmt: skip
    r = run(["embed", src, "-r", "--model", tiny_model_dir, "--out", tmp_path / "o2"])
    assert r.exit_code == 0, r.output
    assert "not considered: 1 hidden" in r.stderr and "1 files without an audio extension" in r.stderr
    assert "symbolic links to folders" in r.stderr and "name a file or folder on the command line" in r.stderr


# ------------------------------------------------------------------------------------ Ctrl-C
def _cli_command() -> list[str]:
    script = Path(sys.executable).parent / "mlx-clap"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "mlx_clap.cli"]


def _wait_until_mapped(pid: int, library: str, timeout: float = 30.0) -> bool:
    maps = Path(f"/proc/{pid}/maps")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if library in maps.read_text():
                return True
        except OSError:
            return False
        time.sleep(0.005)
    return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see when MLX is loaded")
def test_ctrl_c_exits_130_cleanly_every_time(tiny_model_dir, tmp_path):
    src = tmp_path / "many"
    src.mkdir()
    rng = np.random.default_rng(3)
    for i in range(60):
        sf.write(src / f"{i:02d}.wav", 0.1 * rng.standard_normal(48000 * 3), 48000)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MLX_CLAP_CPU_THREADS": "2"}
    rnd = random.Random(6)
    codes = []
    for attempt in range(6):
        cmd = _cli_command() if attempt % 2 else [sys.executable, "-m", "mlx_clap.cli"]
        out = tmp_path / f"out{attempt}"
        p = subprocess.Popen(
            [*cmd, "embed", str(src), "--model", str(tiny_model_dir), "--out", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
            preexec_fn=default_sigint,  # the test must not depend on how its own parent was started
        )
        # From the imports (MLX, the model code) to the middle of the run. Python's own start-up (site,
        # before any mlx-clap code runs) is no moment a handler of ours can cover, so wait for MLX.
        assert _wait_until_mapped(p.pid, "libmlx"), "the command never loaded MLX"
        time.sleep(rnd.uniform(0.0, 1.2))
        p.send_signal(signal.SIGINT)
        stdout, stderr = p.communicate(timeout=60)
        text = stderr.decode(errors="replace")
        codes.append(p.returncode)
        why = text[text.find("Traceback") :][:3000] if "Traceback" in text else text[-2000:]
        assert p.returncode in (0, 130), (attempt, p.returncode, why)  # 0: done before the signal
        assert "terminate called" not in text and "Traceback" not in text, why
        if p.returncode == 0:
            continue
        assert "interrupted" in text
        if out.exists() and (out / "_versions").is_dir():  # a Lance version was committed
            Store.open(out)  # what was written reopens cleanly
    assert codes.count(130) >= 4, codes


# ------------------------------------------------------------------------------ hardening 11: index
# `mlx-clap index` builds the store's Lance vector index: its tests (an explicit step that search never
# takes, "nothing to do" when current, appended rows, Ctrl-C and kill -9 during a build) are in
# test_lance_index.py.


def test_ctrl_c_that_a_library_wraps_in_its_own_error_still_exits_130(tmp_path):
    """pyarrow/Lance run Python inside their readers and hand a KeyboardInterrupt back as their own error
    ("ArrowInvalid: External error: KeyboardInterrupt"): after a Ctrl-C that is the interrupt, not a
    traceback and status 1."""
    script = tmp_path / "wrapped.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "sys.argv[0] = 'mlx-clap'\n"
        "import click\n"
        "import mlx_clap.cli as cli\n"
        "@click.command('boom')\n"
        "def boom():\n"
        "    try:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        time.sleep(5)\n"
        "    except KeyboardInterrupt:\n"
        "        raise RuntimeError('External error: KeyboardInterrupt: ') from None\n"
        "cli.COMMANDS['boom'] = ('__main__', 'boom')\n"
        "cli.main(['boom'])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    p = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, timeout=60, preexec_fn=default_sigint
    )
    err = p.stderr.decode(errors="replace")
    assert p.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err, err
