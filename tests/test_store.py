"""EmbeddingStore: layout, round trips, resume keys, and repair after a killed writer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlx_clap.search.store import EmbeddingStore, StoreError


def _items(start: int, n: int) -> list[dict]:
    return [
        {"path": f"/a/{i}.wav", "size": 100 + i, "mtime": 1.5 + i, "duration": 2.0}
        for i in range(start, start + n)
    ]


def _vecs(start: int, n: int, dim: int = 8) -> np.ndarray:
    rng = np.random.default_rng(start)
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_roundtrip_across_shards(tmp_path):
    s = EmbeddingStore.create(tmp_path / "st", {"model": "m"}, dim=8, dtype="float32", shard_size=4)
    s.append(_items(0, 3), _vecs(0, 3))
    s.append(_items(3, 6), _vecs(3, 6))
    s.append([], np.zeros((0, 8), np.float32))
    s2 = EmbeddingStore.open(tmp_path / "st")
    assert len(s2) == 9 and s2.dim == 8
    assert s2.manifest["model"] == "m"
    want = np.concatenate([_vecs(0, 3), _vecs(3, 6)])
    np.testing.assert_array_equal(s2.matrix(), want)
    shards = list(s2.iter_shards())
    assert [f for f, _ in shards] == [0, 4, 8]
    assert [a.shape[0] for _, a in shards] == [4, 4, 1]
    assert sorted(p.name for p in (tmp_path / "st" / "shards").iterdir()) == [
        "emb-00000.npy",
        "emb-00001.npy",
        "emb-00002.npy",
    ]
    assert s2.row_of("/a/5.wav") == 5
    with pytest.raises(StoreError, match="nope"):
        s2.row_of("/nope.wav")
    with pytest.raises(KeyError):
        s2.row_of("/nope.wav")
    assert ("/a/2.wav", 102, 3.5) in s2.done_keys()


def test_float16_default(tmp_path):
    s = EmbeddingStore.create(tmp_path / "st", {}, dim=8)
    s.append(_items(0, 2), _vecs(0, 2))
    s2 = EmbeddingStore.open(tmp_path / "st")
    assert s2.dtype == "float16"
    assert s2.matrix().dtype == np.float32
    np.testing.assert_allclose(s2.matrix(), _vecs(0, 2), atol=1e-3)


def test_bad_input_rejected(tmp_path):
    s = EmbeddingStore.create(tmp_path / "st", {}, dim=8)
    with pytest.raises(StoreError, match="dim 8"):
        s.append(_items(0, 1), np.zeros((1, 4), np.float32))
    with pytest.raises(StoreError, match="items for"):
        s.append(_items(0, 2), _vecs(0, 1))
    with pytest.raises(StoreError, match="non-finite"):
        s.append(_items(0, 1), np.full((1, 8), np.nan, np.float32))
    with pytest.raises(StoreError, match="already exists"):
        EmbeddingStore.create(tmp_path / "st", {}, dim=8)
    with pytest.raises(StoreError, match="dtype"):
        EmbeddingStore.create(tmp_path / "x", {}, dim=8, dtype="int8")


def test_open_missing_empty_corrupt(tmp_path):
    with pytest.raises(StoreError, match="no such"):
        EmbeddingStore.open(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="manifest.json"):
        EmbeddingStore.open(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="unreadable manifest"):
        EmbeddingStore.open(tmp_path / "bad")
    s = EmbeddingStore.create(tmp_path / "mid", {}, dim=8)
    s.append(_items(0, 3), _vecs(0, 3))
    lines = (tmp_path / "mid" / "items.jsonl").read_text().splitlines()
    lines[1] = "garbage"
    (tmp_path / "mid" / "items.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(StoreError, match="line 2"):
        EmbeddingStore.open(tmp_path / "mid")


def test_repair_after_kill(tmp_path):
    """Shard rows without items, a torn item line and temp files are all discarded on open."""
    root = tmp_path / "st"
    s = EmbeddingStore.create(root, {}, dim=8, dtype="float32", shard_size=4)
    s.append(_items(0, 3), _vecs(0, 3))
    # Simulate a kill after the shard was rewritten with 2 more rows, mid-way through the items append.
    full = np.concatenate([_vecs(0, 3), _vecs(3, 2)])
    np.save(root / "shards" / "emb-00000.npy", full[:4])
    np.save(root / "shards" / "emb-00001.npy", full[4:])
    (root / "shards" / ".emb-00002.npy.abc.tmp").write_bytes(b"\x93NUMPY partial")
    with open(root / "items.jsonl", "a") as fh:
        fh.write(json.dumps(_items(3, 1)[0])[:20])
    s2 = EmbeddingStore.open(root)
    assert len(s2) == 3
    np.testing.assert_array_equal(s2.matrix(), _vecs(0, 3))
    assert not list((root / "shards").glob("*.tmp"))
    assert (root / "items.jsonl").read_bytes().endswith(b"\n")
    # The next append overwrites the orphan rows, giving the same files as an uninterrupted writer.
    s2.append(_items(3, 3), _vecs(3, 3))
    ref = EmbeddingStore.create(tmp_path / "ref", {}, dim=8, dtype="float32", shard_size=4)
    ref.append(_items(0, 6), np.concatenate([_vecs(0, 3), _vecs(3, 3)]))
    for name in ("items.jsonl", "shards/emb-00000.npy", "shards/emb-00001.npy"):
        assert (root / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


def test_items_without_shard_rows_dropped(tmp_path):
    root = tmp_path / "st"
    s = EmbeddingStore.create(root, {}, dim=8, dtype="float32", shard_size=4)
    s.append(_items(0, 6), _vecs(0, 6))
    (root / "shards" / "emb-00001.npy").unlink()
    s2 = EmbeddingStore.open(root)
    assert len(s2) == 4
    assert len((root / "items.jsonl").read_text().splitlines()) == 4


def test_errors_log(tmp_path):
    s = EmbeddingStore.create(tmp_path / "st", {}, dim=8)
    s.record_error("/x/bad.mp3", "not an audio file")
    errs = EmbeddingStore.open(tmp_path / "st").errors()
    assert errs[0]["path"] == "/x/bad.mp3" and "not an audio" in errs[0]["error"]


def test_non_utf8_path_roundtrip(tmp_path):
    """A file name that is not valid UTF-8 (os.fsdecode surrogates) is stored and read back unchanged."""
    odd = "/a/x\udcff\udcfe.wav"
    nice = "/a/été 犬.wav"
    s = EmbeddingStore.create(tmp_path / "st", {}, dim=8)
    s.append([{"path": odd, "size": 1, "mtime": 2.0}, {"path": nice, "size": 1, "mtime": 2.0}], _vecs(0, 2))
    s.record_error(odd, "bad")
    s2 = EmbeddingStore.open(tmp_path / "st")
    assert [it["path"] for it in s2.items] == [odd, nice]
    assert s2.row_of(odd) == 0 and s2.errors()[0]["path"] == odd
    assert "été" in (tmp_path / "st" / "items.jsonl").read_text(encoding="utf-8")
