"""Object-store inputs (`mlx-clap embed s3://bucket/prefix`, mlx_clap.sync.remote_inputs) against a local
S3-compatible server (moto's server mode on 127.0.0.1, configured through the usual AWS_* variables, as
tests/test_cli_s3.py does for stores): the same rows and vectors as the same files in a local folder,
sync after an edit and a delete, a broken object named by its URI, --exclude and suffix filtering, the
Ray engine with S3 input and S3 output, and one clear line for a bucket or endpoint that is not there."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from fixtures import moto_s3, noise, run, s3_bucket, summary_of

from mlx_clap.store import Store

moto_server = pytest.importorskip("moto.server", reason="moto is not installed (pip install 'moto[server]')")

SR = 48000
TOL = 1e-6


@pytest.fixture(scope="module")
def endpoint():
    with moto_s3() as url:
        yield url


@pytest.fixture
def s3(endpoint, monkeypatch):
    """(bucket name, pyarrow S3FileSystem) of a fresh bucket, with the environment a user would set."""
    return s3_bucket(endpoint, monkeypatch)


def write_library(lib: Path) -> list[str]:
    """Several formats (one long enough to stream), a broken file, and files passed over; returns the
    names embedded from it."""
    (lib / "sub").mkdir(parents=True)
    (lib / "drafts").mkdir()
    sf.write(lib / "a.wav", noise(SR, channels=1, seed=1)[:, 0], SR)
    sf.write(lib / "b.flac", noise(2 * SR, seed=2), SR)
    sf.write(lib / "sub" / "c.ogg", noise(3 * SR, seed=3), SR, format="OGG", subtype="VORBIS")
    sf.write(lib / "long.wav", noise(32 * SR, channels=1, seed=4)[:, 0], SR)  # streamed (> 30 s)
    (lib / "bad.wav").write_bytes(b"RIFF0000WAVE but no audio at all")
    sf.write(lib / "drafts" / "x.wav", noise(SR, channels=1, seed=5)[:, 0], SR)  # --exclude 'drafts/*'
    (lib / "notes.txt").write_text("not audio")
    sf.write(lib / ".hidden.wav", noise(SR, channels=1, seed=6)[:, 0], SR)
    return ["a.wav", "b.flac", "long.wav", "sub/c.ogg"]


def upload(fs, lib: Path, prefix: str) -> None:
    for p in sorted(lib.rglob("*")):
        if p.is_file():
            with fs.open_output_stream(f"{prefix}/{p.relative_to(lib).as_posix()}") as out:
                out.write(p.read_bytes())


def by_name(store: Path | str, root: str) -> dict[str, tuple[dict, np.ndarray]]:
    """name under `root` -> (row without path and mtime, file vector)."""
    s = Store.open(store)
    m = s.matrix()
    out = {}
    for i, it in enumerate(s.items):
        path = str(it["path"])
        assert path.startswith(root + "/"), path
        out[path[len(root) + 1 :]] = ({k: v for k, v in it.items() if k not in ("path", "mtime")}, m[i])
    return out


def embed_args(src: object, out: object, *extra: object) -> list:
    return [
        "embed",
        src,
        "-r",
        "--out",
        out,
        "-q",
        "--summary-json",
        "--store-dtype",
        "float32",
        "--exclude",
        "drafts/*",
        *extra,
    ]


def test_s3_prefix_embeds_as_the_local_folder_and_syncs(tiny_model_dir, s3, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a command that took the URI for a path would write ./s3:/ here
    bucket, fs = s3
    lib = tmp_path / "lib"
    names = write_library(lib)
    upload(fs, lib, f"{bucket}/in")
    uri = f"s3://{bucket}/in"
    model = ["--model", tiny_model_dir]

    a = run([*embed_args(lib, tmp_path / "ref", *model)])
    b = run([*embed_args(uri, tmp_path / "got", *model)])
    assert a.exit_code == b.exit_code == 1, (a.output, b.output)  # bad.wav: a new failure in both
    sa, sb = summary_of(a), summary_of(b)
    for key in ("files", "embedded", "failed", "skipped", "not_considered"):
        assert sa[key] == sb[key], (key, sa, sb)
    assert sb["embedded"] == len(names) and sb["failed"] == 1
    assert sb["not_considered"] == {"hidden": 1, "not_audio_name": 1, "excluded": 1}
    # The broken object is named by its URI (never the temporary copy), in the output and errors.jsonl.
    assert [f["path"] for f in sb["failures"]] == [f"{uri}/bad.wav"]
    assert sb["failures"][0]["error"] == sa["failures"][0]["error"]
    assert f"error: {uri}/bad.wav: " in b.output and "mlx-clap-" not in b.output
    assert [r["path"] for r in Store.open(tmp_path / "got").errors()] == [f"{uri}/bad.wav"]

    want, got = by_name(tmp_path / "ref", str(lib)), by_name(tmp_path / "got", uri)
    assert sorted(got) == sorted(want) == names
    for name in names:
        assert got[name][0] == want[name][0], name  # size, duration, channels, rate, sha256 of the bytes
        np.testing.assert_allclose(got[name][1], want[name][1], atol=TOL, rtol=0, err_msg=name)

    # One object named exactly: always taken, row path = the URI as given.
    one = run([*embed_args(f"{uri}/sub/c.ogg", tmp_path / "one", *model)])
    assert one.exit_code == 0, one.output
    (row,) = Store.open(tmp_path / "one").items
    assert row["path"] == f"{uri}/sub/c.ogg"
    np.testing.assert_allclose(
        Store.open(tmp_path / "one").matrix()[0], want["sub/c.ogg"][1], atol=TOL, rtol=0
    )

    # Unchanged objects are skipped from the listing alone (size + mtime), the broken one is retried.
    again = run([*embed_args(uri, tmp_path / "got", *model)])
    assert again.exit_code == 3, again.output  # only the known failure is left
    s = summary_of(again)
    assert (s["embedded"], s["skipped"], s["removed"], s["failed"]) == (0, len(names), 0, 1)

    # Edit one object, delete another: the edit is re-embedded, the deleted one's row removed.
    edited = lib / "a.wav"
    sf.write(edited, noise(SR, channels=1, seed=11)[:, 0], SR)
    with fs.open_output_stream(f"{bucket}/in/a.wav") as out:
        out.write(edited.read_bytes())
    fs.delete_file(f"{bucket}/in/b.flac")
    (lib / "b.flac").unlink()
    a = run([*embed_args(lib, tmp_path / "ref", *model)])
    b = run([*embed_args(uri, tmp_path / "got", *model)])
    sa, sb = summary_of(a), summary_of(b)
    assert (sb["embedded"], sb["removed"], sb["skipped"]) == (1, 1, len(names) - 2), sb
    for key in ("embedded", "removed", "skipped", "reused", "failed"):
        assert sa[key] == sb[key], (key, sa, sb)
    want, got = by_name(tmp_path / "ref", str(lib)), by_name(tmp_path / "got", uri)
    assert sorted(got) == sorted(want) == [n for n in names if n != "b.flac"]
    assert got["a.wav"][0]["sha256"] == hashlib.sha256(edited.read_bytes()).hexdigest()
    for name in want:
        np.testing.assert_allclose(got[name][1], want[name][1], atol=TOL, rtol=0, err_msg=name)


def test_unchanged_objects_answer_without_the_model_and_a_delete_is_still_seen(
    tiny_model_dir, s3, tmp_path, monkeypatch
):
    """The stat-only rerun (no model load) over object inputs: up to date when nothing changed, and not
    when an object was deleted under the prefix (its row is removed). JSON lines name objects by URI."""
    monkeypatch.chdir(tmp_path)
    bucket, fs = s3
    for i in range(3):
        with fs.open_output_stream(f"{bucket}/in/c{i}.wav") as out:
            path = tmp_path / f"c{i}.wav"
            sf.write(path, noise(SR // 2, channels=1, seed=i)[:, 0], SR)
            out.write(path.read_bytes())
    uri, store = f"s3://{bucket}/in", tmp_path / "store"
    args = [
        "embed",
        uri,
        "--model",
        tiny_model_dir,
        "--out",
        store,
        "-q",
        "--summary-json",
        "--store-dtype",
        "float32",
    ]
    assert summary_of(run(args))["embedded"] == 3
    again = summary_of(run(args))
    assert again.get("up_to_date") is True and again["skipped"] == 3, again
    fs.delete_file(f"{bucket}/in/c1.wav")
    after = summary_of(run(args))
    assert not after.get("up_to_date") and (after["removed"], after["skipped"]) == (1, 2), after
    assert sorted(it["path"] for it in Store.open(store).items) == [f"{uri}/c0.wav", f"{uri}/c2.wav"]

    lines = run(["embed", uri, "--model", tiny_model_dir, "--format", "jsonl", "-q"])
    assert lines.exit_code == 0, lines.output
    rows = [json.loads(line) for line in lines.stdout.splitlines()]
    assert [(r["path"], r["filename"]) for r in rows] == [
        (f"{uri}/c0.wav", "c0.wav"),
        (f"{uri}/c2.wav", "c2.wav"),
    ]
    m = Store.open(store).matrix()
    np.testing.assert_allclose([r["embedding"] for r in rows], m, atol=TOL, rtol=0)


def test_missing_bucket_refused_credentials_or_unreachable_endpoint_is_one_line_naming_the_uri(
    tiny_model_dir, s3, tmp_path, monkeypatch
):
    """Refused before the model loads or a store is made, each as the last line: the URI and the cause."""
    import moto.settings

    monkeypatch.chdir(tmp_path)
    bucket, fs = s3
    with fs.open_output_stream(f"{bucket}/in/a.wav") as out:
        out.write(b"RIFF")

    def refusal(uri: str) -> str:
        res = run(["embed", uri, "--model", tiny_model_dir, "--out", tmp_path / "store", "-q"])
        assert res.exit_code == 1, res.output
        assert not (tmp_path / "store").exists()
        return res.output.strip().splitlines()[-1]

    name = f"no-such-{uuid.uuid4().hex[:8]}"
    assert refusal(f"s3://{name}/in") == f"Error: nothing to embed: s3://{name}/in: no such bucket: {name}"
    uri = f"s3://{bucket}/in"
    assert (
        refusal(f"{uri}/nothing-here")
        == f"Error: nothing to embed: {uri}/nothing-here: no such object or prefix"
    )

    # The server checks signatures from now on (moto runs in this process): these keys are unknown to it.
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    assert refusal(uri) == (
        f"Error: nothing to embed: {uri}: cannot list it: access denied by the object store "
        "(check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
    )
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    assert refusal(uri) == (
        f"Error: nothing to embed: {uri}: cannot list it: "
        "cannot reach the object store (endpoint unreachable)"
    )


@pytest.mark.ray
def test_ray_engine_with_s3_input_and_s3_output(tiny_model_dir, s3, tmp_path, monkeypatch):
    """Ray workers read their inputs from the object store and write the store there: the same rows and
    vectors as the single-process run over the same objects into a local folder."""
    pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[test]' or '.[ray]')")
    import ray
    from ray.cluster_utils import Cluster

    monkeypatch.chdir(tmp_path)
    bucket, fs = s3
    lib = tmp_path / "lib"
    names = write_library(lib)
    upload(fs, lib, f"{bucket}/in")
    uri, out = f"s3://{bucket}/in", f"s3://{bucket}/vectors"
    if ray.is_initialized():  # the engine forwards the AWS_* settings to the workers when it connects
        ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": 80 * 2**20, "include_dashboard": False},
    )
    try:
        cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
        cluster.wait_for_nodes()
        model = ["--model", tiny_model_dir, "--batch-size", "2"]
        ref = run([*embed_args(uri, tmp_path / "ref", *model)])
        got = run(
            [
                *embed_args(uri, out, *model),
                "--engine",
                "ray",
                "--ray-address",
                cluster.address,
                "--workers",
                "2",
            ]
        )
    finally:
        cluster.shutdown()
    assert ref.exit_code == got.exit_code == 1, (ref.output, got.output)
    sr, sg = summary_of(ref), summary_of(got)
    assert (sg["embedded"], sg["failed"]) == (sr["embedded"], sr["failed"]) == (len(names), 1)
    want, have = by_name(tmp_path / "ref", uri), by_name(out, uri)
    assert sorted(have) == sorted(want) == names
    for name in names:
        assert have[name][0] == want[name][0], name
        np.testing.assert_allclose(have[name][1], want[name][1], atol=TOL, rtol=0, err_msg=name)
    assert [r["path"] for r in Store.open(out).errors()] == [f"{uri}/bad.wav"]
