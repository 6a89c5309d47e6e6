"""Every store command on an object-store URI (`s3://bucket/prefix`), against a local S3-compatible server
(moto's server mode on 127.0.0.1) configured through the usual AWS_* environment variables: the same
embed, sync, search, export and check as on a local folder give the same rows and answers; bad addresses
and two writers are one clear line naming the store, quickly."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path

import click
import numpy as np
import pytest
import soundfile as sf
from fixtures import moto_s3, run, s3_bucket, summary_of

moto_server = pytest.importorskip("moto.server", reason="moto is not installed (pip install 'moto[server]')")

SR = 48000


def write_clip(path: Path, seed: int, seconds: float = 1.0) -> None:
    rng = np.random.default_rng(seed)
    sf.write(path, 0.1 * rng.standard_normal(int(seconds * SR)).astype(np.float32), SR)


@pytest.fixture(scope="module")
def endpoint():
    with moto_s3() as url:
        yield url


@pytest.fixture
def bucket(endpoint, monkeypatch):
    """A fresh bucket on the local server, with the environment a user would set."""
    return s3_bucket(endpoint, monkeypatch)[0]


def _both(args_of, local: Path, uri: str, ok: bool = True) -> tuple:
    """Run the same command on the local store and on the URI; both must succeed (or both fail)."""
    a, b = run(args_of(local)), run(args_of(uri))
    if ok:
        assert a.exit_code == 0, a.output
        assert b.exit_code == 0, b.output
    return a, b


def _results(result) -> list[tuple[str, float]]:
    return [(h["path"], h["score"]) for h in json.loads(result.stdout)["results"]]


def _same_ranking(a: list[tuple[str, float]], b: list[tuple[str, float]]) -> None:
    """The same hits with the same scores; hits whose scores tie within float rounding may swap places."""
    assert len(a) == len(b)
    np.testing.assert_allclose([s for _, s in a], [s for _, s in b], atol=1e-6)
    for (pa_, sa), (pb, sb) in zip(a, b, strict=True):
        if pa_ != pb:
            assert abs(sa - sb) <= 1e-6, (a, b)


def test_every_command_on_s3_matches_a_local_folder(tiny_model_dir, bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a command that took the URI for a folder would write ./s3:/ here
    lib = tmp_path / "lib"
    (lib / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.wav", "b.wav", "c.wav", "sub/d.wav"]):
        write_clip(lib / name, seed=i)
    local, uri = tmp_path / "store", f"s3://{bucket}/prefix/vectors"

    def embed(out):
        return ["embed", lib, "-r", "--model", tiny_model_dir, "--out", out, "-q", "--summary-json"]

    a, b = _both(embed, local, uri)
    assert summary_of(a)["embedded"] == summary_of(b)["embedded"] == 4

    # Sync after an edit, a delete and a rename: merge/delete, one row per current file.
    write_clip(lib / "a.wav", seed=10)
    (lib / "b.wav").unlink()
    os.replace(lib / "c.wav", lib / "sub" / "c2.wav")
    (lib / "bad.wav").write_bytes(b"not audio at all")
    a, b = _both(embed, local, uri, ok=False)
    assert a.exit_code == b.exit_code != 0  # bad.wav failed in both, the rest went in
    sa, sb = summary_of(a), summary_of(b)
    for key in ("embedded", "failed", "removed", "reused"):
        assert sa[key] == sb[key], (key, sa, sb)
    assert sb["removed"] >= 1 and sb["embedded"] == 1

    from mlx_clap.store import Store

    ls, rs = Store.open(local), Store.open(uri)
    assert rs.items == ls.items
    assert sorted(it["path"] for it in rs.items) == sorted(
        str(p) for p in (lib / "a.wav", lib / "sub" / "d.wav", lib / "sub" / "c2.wav")
    )
    np.testing.assert_array_equal(rs.matrix(), ls.matrix())
    assert [r["path"] for r in rs.errors()] == [r["path"] for r in ls.errors()] == [str(lib / "bad.wav")]

    # Search by text and by audio.
    a, b = _both(lambda s: ["search", s, "--text", "rain on a roof", "--json", "-k", "3"], local, uri)
    _same_ranking(_results(a), _results(b))
    query = tmp_path / "query.wav"
    write_clip(query, seed=2)
    a, b = _both(lambda s: ["search", s, "--audio", query, "--json", "-k", "3"], local, uri)
    _same_ranking(_results(a), _results(b))

    # Export: the same vectors and rows, read back without mlx-clap.
    for fmt in ("npy", "parquet"):
        ea, eb = tmp_path / f"local-{fmt}", tmp_path / f"s3-{fmt}"
        run_a = run(["export", local, ea, "--to", fmt, "-q"])
        run_b = run(["export", uri, eb, "--to", fmt, "-q"])
        assert run_a.exit_code == 0, run_a.output
        assert run_b.exit_code == 0, run_b.output
        if fmt == "npy":
            np.testing.assert_array_equal(np.load(ea / "vectors.npy"), np.load(eb / "vectors.npy"))
        else:
            import pyarrow.parquet as pq

            ta, tb = pq.read_table(ea), pq.read_table(eb)
            assert ta.column("path").to_pylist() == tb.column("path").to_pylist()
            assert ta.column("vector").to_pylist() == tb.column("vector").to_pylist()

    # check, cluster (clusters.json beside the tables, as an object), and a second check.
    a, b = _both(lambda s: ["check", s, "--json"], local, uri)
    ra, rb = json.loads(a.stdout), json.loads(b.stdout)
    assert ra["ok"] == rb["ok"] and ra["items"] == rb["items"] == 3
    a, b = _both(lambda s: ["cluster", s, "-k", "2", "--json"], local, uri)
    assert json.loads(a.stdout)["clusters"] == json.loads(b.stdout)["clusters"]
    assert Store.open(uri).location.side("clusters.json").read_json()["rows"] == 3
    # Nothing was written to a local folder named after the URI (a Path folds s3:// into s3:/).
    assert not Path("s3:").exists()


def _fails_fast(args: list, *words: str, limit: float = 30.0) -> str:
    t0 = time.monotonic()
    r = run(args)
    took = time.monotonic() - t0
    assert r.exit_code != 0 and took < limit, (took, r.output)
    assert "Traceback" not in r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, r.output
    for w in words:
        assert w in lines[0], r.output
    return lines[0]


def test_bad_object_store_addresses_are_one_clear_line(tiny_model_dir, bucket, tmp_path, monkeypatch):
    lib = tmp_path / "lib"
    lib.mkdir()
    write_clip(lib / "a.wav", 0)
    uri = f"s3://{bucket}/v"
    embed = ["embed", lib, "--model", tiny_model_dir, "-q", "--out"]
    assert run([*embed, uri]).exit_code == 0

    # A bucket that does not exist.
    missing = f"s3://no-such-{uuid.uuid4().hex[:8]}/v"
    _fails_fast(["search", missing, "--text", "x"], missing, "no such bucket")
    _fails_fast([*embed, missing], missing, "no such bucket")

    # No credentials at all (and no profile or instance role to fall back to).
    with monkeypatch.context() as m:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            m.delenv(name)
        m.setenv("AWS_EC2_METADATA_DISABLED", "true")
        m.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        m.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        _fails_fast(["search", uri, "--text", "x"], uri, "credentials")

    # An endpoint nothing listens on.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    with monkeypatch.context() as m:
        m.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed}")
        _fails_fast(["search", uri, "--text", "x"], uri, "cannot reach")
        _fails_fast(["check", uri], uri, "cannot reach")
        _fails_fast([*embed, uri], uri, "cannot reach")


def test_two_writers_on_one_uri_never_lose_rows(tiny_model_dir, bucket, tmp_path, monkeypatch):
    """No lock file on an object store: when another writer commits while `embed` runs, embed's commit is
    refused with one line naming the store (nothing of it written, the other's rows kept), and a rerun
    brings every file in."""
    from mlx_clap.store import Store

    monkeypatch.chdir(tmp_path)

    lib = tmp_path / "lib"
    lib.mkdir()
    for i in range(3):
        write_clip(lib / f"{i}.wav", i)
    uri = f"s3://{bucket}/two"
    embed = ["embed", lib, "--model", tiny_model_dir, "-q", "--out", uri]
    assert run(embed).exit_code == 0
    write_clip(lib / "new.wav", 9)
    real, raced = Store.commit, []

    def racing(self, written=(), remove=()):
        if written and not raced:  # another process commits between embed's read and its commit
            raced.append(1)
            with Store.open(uri, write=True) as other:
                other.remove([str(lib / "0.wav")])
        return real(self, written, remove)

    with monkeypatch.context() as m:
        m.setattr(Store, "commit", racing)
        r = run(embed)
    assert raced and r.exit_code != 0 and "Traceback" not in r.output, r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and uri in errors[0] and "another writer" in errors[0], r.output
    # The other writer's commit stands; embed's was not written.
    assert sorted(it["path"] for it in Store.open(uri).items) == [str(lib / f"{i}.wav") for i in (1, 2)]
    monkeypatch.chdir(tmp_path)
    assert run(embed).exit_code == 0
    assert sorted(it["path"] for it in Store.open(uri).items) == sorted(str(p) for p in lib.iterdir())


def test_commits_racing_on_s3_lose_no_rows(bucket):
    """The window no check closes: two writers both read version v and commit. Lance's conditional commit
    on the object store sees the other's manifest: rows of other paths are rebased on top of it (and the
    writer told), the same paths are refused whole; no commit overwrites another."""
    from mlx_clap.store import Store, StoreBusyError

    uri = f"s3://{bucket}/race"

    def unit(seed: int) -> np.ndarray:
        x = np.random.default_rng(seed).standard_normal((1, 8)).astype(np.float32)
        return x / np.linalg.norm(x)

    def item(name: str) -> list[dict]:
        return [{"path": f"/lib/{name}.wav", "size": 1, "mtime": 0.0}]

    Store.create(uri, {"model": "m"}, dim=8).close()
    for other, cause in (("b", "went in on top of them as version 3, no rows lost"), ("a", "same rows")):
        a, b = Store.open(uri, write=True), Store.open(uri, write=True)
        b._check_latest = lambda: None  # b checked before a committed
        a.write(item("a"), unit(1))
        with pytest.raises(StoreBusyError, match=rf"{uri}: another writer .*{cause}"):
            b.write(item(other), unit(2))
        a.close()
        b.close()
    s = Store.open(uri)
    assert sorted(it["path"] for it in s.items) == ["/lib/a.wav", "/lib/b.wav"]
    np.testing.assert_allclose(
        s.matrix()[[it["path"] for it in s.items].index("/lib/a.wav")], unit(1)[0], atol=1e-3
    )


def test_serve_map_and_clusters_live_beside_an_s3_store(bucket, tmp_path, monkeypatch):
    """serve's map.json cache and cluster's clusters.json are objects under the store's prefix."""
    from mlx_clap.search.cluster import spherical_kmeans, write_assignments
    from mlx_clap.serve import layout
    from mlx_clap.store import Store

    uri = f"s3://{bucket}/map"
    x = np.random.default_rng(0).standard_normal((40, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    with Store.create(uri, {"model": "synthetic"}, dim=16, dtype="float32") as w:
        w.write([{"path": f"/lib/{i:02d}.wav", "size": 1, "mtime": 0.0} for i in range(40)], x)
    store = Store.open(uri)
    assert write_assignments(store, spherical_kmeans(x, 3, seed=0)) == f"{uri}/clusters.json"
    assert layout.saved_clusters(store, layout.store_key(store)) is not None  # read from the object
    doc, notes = layout.library_map(store)
    assert notes == [] and doc["rows"] == 40
    cached = store.location.side("map.json").read_json()
    assert cached is not None and cached["x"] == doc["x"]
    monkeypatch.setattr(layout, "build_map", lambda *a: pytest.fail("the cached map.json was not used"))
    again, _ = layout.library_map(Store.open(uri))
    assert again == cached


def test_a_store_argument_keeps_a_uri_whole(tmp_path, monkeypatch):
    """click.Path would fold `s3://b/p` into the local folder `s3:/b/p`; STORE keeps it a URI."""
    from mlx_clap.cli.targets import STORE

    monkeypatch.setenv("HOME", str(tmp_path))
    assert STORE.convert("s3://bucket/prefix/", None, None) == "s3://bucket/prefix"
    assert STORE.convert("~/vectors", None, None) == tmp_path / "vectors"
    assert STORE.convert("file:///data/vectors", None, None) == Path("/data/vectors")
    with pytest.raises(click.BadParameter, match="unsupported scheme ftp://"):
        STORE.convert("ftp://host/x", None, None)


def test_serve_answers_from_an_s3_store_as_from_a_folder(tiny_model_dir, bucket, tmp_path):
    """`serve`'s app on an s3:// store: the same text search answers as on a local copy, and the map."""
    pytest.importorskip("httpx", reason="Starlette's TestClient needs httpx (the serve extra)")
    from test_serve_http import AUTH, client_for, item_of, post_search, write_sounds

    import mlx_clap
    from mlx_clap.store import Store

    model = mlx_clap.load(tiny_model_dir)
    paths = write_sounds(tmp_path / "sounds")
    answers = []
    vectors = model.embed_audio(paths)
    for where in (tmp_path / "store", f"s3://{bucket}/serve"):
        with Store.create(where, {"model": "tiny"}, dim=model.embedding_dim, dtype="float32") as w:
            w.write([item_of(p) for p in paths], vectors)
        client = client_for(Store.open(where), model)
        doc = post_search(client, {"text": "a pure tone", "k": 3}).json()
        answers.append([(x["path"], x["score"]) for x in doc["results"]])
        r = client.get("/api/map", headers=AUTH)
        assert r.status_code == 200 and len(r.json()["x"]) == len(paths)
    _same_ranking(*answers)
