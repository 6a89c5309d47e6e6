"""mlx_clap.store on object storage: a local S3-compatible server (moto's server mode on 127.0.0.1),
configured through the usual AWS_* environment variables."""

from __future__ import annotations

import socket

import lance
import numpy as np
import pyarrow as pa
import pytest
from fixtures import moto_s3, s3_bucket

from mlx_clap.store import Store, StoreBusyError, StoreError, check_store, s3_options

moto_server = pytest.importorskip("moto.server")

DIM = 16
MANIFEST = {"model": "tiny", "weights_sha256": "w0", "settings": {"long_audio": "windows-mean"}}
SEGMENTS = {"hop": 5.0, "window": 10.0}


def _vecs(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _items(names, tag: str = "") -> list[dict]:
    return [{"path": f"/lib/{n}.wav", "size": 10, "mtime": 2.0, "sha256": f"s-{n}{tag}"} for n in names]


def _segs(n: int, seed: int) -> list:
    return [(np.array([0.0, 5.0]), np.array([10.0, 12.0]), _vecs(2, seed * 100 + i)) for i in range(n)]


@pytest.fixture(scope="module")
def endpoint():
    with moto_s3() as url:
        yield url


@pytest.fixture
def bucket(endpoint, monkeypatch):
    """A fresh bucket on the local server, with the environment a user would set."""
    return s3_bucket(endpoint, monkeypatch)[0]


def test_a_store_on_s3(bucket):
    uri = f"s3://{bucket}/lib/vectors"
    with Store.for_run(uri, MANIFEST, dim=DIM, segments=SEGMENTS) as w:
        assert w.path == uri and w.location.storage_options["allow_http"] == "true"
        w.write(_items("abc"), _vecs(3), _segs(3, 1))
        w.reuse([({"path": "/lib/copy.wav", "size": 10, "mtime": 3.0, "sha256": "s-a"}, 0)])
        w.write(_items("b", tag="2"), _vecs(1, 5), _segs(1, 5))
        w.remove(["/lib/c.wav"])
        w.record_error("/lib/bad.wav", "cannot decode")
        reader = Store.open(uri)
        w.compact()
        w.update_manifest({"library_roots": ["/lib"]})
    want = np.concatenate([_vecs(3)[:1], _vecs(3)[:1], _vecs(1, 5)])
    for s in (reader, Store.open(uri)):  # the reader pinned before the compaction, and a new one
        assert [it["path"] for it in s.items] == ["/lib/a.wav", "/lib/copy.wav", "/lib/b.wav"]
        np.testing.assert_allclose(s.matrix(), want, atol=1e-3)
        assert list(s.segment_view().file_index) == [0, 0, 1, 1, 2, 2]
    s = Store.open(uri)
    assert s.errors()[0]["path"] == "/lib/bad.wav" and s.manifest["library_roots"] == ["/lib"]
    report = check_store(uri, files=False)
    assert report["ok"] and report["items"] == 3 and report["segments"] == 6
    # No mlx-clap code: Lance with the same environment (plus allow_http) reads the same vectors.
    ds = lance.dataset(uri, storage_options=s3_options())
    files = ds.to_table(filter="kind = 'file'", columns=["vector"])
    np.testing.assert_array_equal(np.array(files.column("vector").to_pylist(), np.float32), s.matrix())


def test_two_writers_on_one_uri(bucket):
    """No lock file on object storage: the second writer's commit finds a version it did not write, is
    refused naming the store, and the first writer's rows are kept."""
    uri = f"s3://{bucket}/two"
    Store.create(uri, MANIFEST, dim=DIM).close()
    a = Store.open(uri, write=True)
    b = Store.open(uri, write=True)
    a.write(_items("a"), _vecs(1))
    with pytest.raises(
        StoreBusyError, match=rf"{uri}: another writer committed version 2 since this one read"
    ):
        b.write(_items("b"), _vecs(1, 1))
    a.write(_items("c"), _vecs(1, 2))
    assert [it["path"] for it in Store.open(uri).items] == ["/lib/a.wav", "/lib/c.wav"]


def test_bad_object_store_addresses_are_one_clear_error(bucket, monkeypatch):
    with pytest.raises(StoreError, match=rf"s3://{bucket}/nothing: holds no store"):
        Store.open(f"s3://{bucket}/nothing")
    # A Lance dataset another tool wrote is not taken for a store, nor written over.
    lance.write_dataset(pa.table({"x": [1]}), f"s3://{bucket}/other", storage_options=s3_options())
    with pytest.raises(StoreError, match="without mlx-clap metadata"):
        Store.open(f"s3://{bucket}/other")
    with pytest.raises(StoreError, match="without mlx-clap metadata.*refusing"):
        Store.create(f"s3://{bucket}/other", MANIFEST, dim=DIM, overwrite=True)
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed}")
    with pytest.raises(StoreError, match=rf"s3://{bucket}/x: .*cannot reach the object store"):
        Store.create(f"s3://{bucket}/x", MANIFEST, dim=DIM)
