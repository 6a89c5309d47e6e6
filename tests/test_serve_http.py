"""`mlx-clap serve` at the HTTP level (Starlette's TestClient) on a tiny random-init model.

Covers: the page and its assets come from the package, with the security headers; text, "more like
this" and dropped-file search return the rows a brute-force search ranks first; audio byte ranges
(206 with the file's exact slice, 416 past the end); row ids out of range, '../' in parameters and
symbolic links (in the store, or swapped in after embedding) are refused; uploads over the limit get
413 and leave no temp folder; cross-site and token-less requests get 403, a foreign Host 400; the map
has one point per file and is cached until the store changes; duplicates are grouped; a store with
segments returns time ranges and per-file timelines; the command refuses a remote bind without
--allow-remote.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from fixtures import add_rows, create_store

pytest.importorskip("starlette", reason="the serve extra is not installed: pip install 'mlx-clap[serve]'")
pytest.importorskip("httpx", reason="Starlette's TestClient needs httpx")

from fixtures import assert_same_ranking  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from mlx_clap.serve.app import create_app  # noqa: E402
from mlx_clap.serve.engine import Library  # noqa: E402
from mlx_clap.store import Store  # noqa: E402

SR = 48000
TOKEN = "test-token"
BASE = "http://127.0.0.1:8765"
AUTH = {"X-MLX-Clap-Token": TOKEN}


# ------------------------------------------------------------------------------------------ helpers
def write_sounds(folder: Path, seconds: float = 3.0) -> list[Path]:
    """Four distinct sounds and an exact copy of the first (a duplicate pair)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * SR)) / SR
    sounds = {
        "tone 440.wav": 0.3 * np.sin(2 * np.pi * 440 * t),
        "noise.wav": 0.1 * rng.standard_normal(t.size),
        "chirp.flac": 0.3 * np.sin(2 * np.pi * (200 + 600 * t) * t),
        "clicks.wav": ((np.arange(t.size) % 4800) < 40) * 0.5,
    }
    paths = []
    for name, x in sounds.items():
        sf.write(folder / name, x.astype(np.float32), SR)
        paths.append(folder / name)
    shutil.copy(paths[0], folder / "tone copy.wav")
    paths.append(folder / "tone copy.wav")
    return paths


def item_of(path: Path) -> dict:
    st = os.stat(path)
    info = sf.info(str(path))
    return {
        "path": str(path),
        "size": st.st_size,
        "mtime": st.st_mtime,
        "duration": info.frames / info.samplerate,
        "channels": info.channels,
        "source_rate": info.samplerate,
    }


def build_store(folder: Path, paths: list[Path], model) -> Store:
    """A float32 store of `paths` embedded with `model` (Store.create + append), recording
    their folders as its library folders, as `mlx-clap embed` does."""
    roots = sorted({os.path.realpath(p.parent) for p in paths})
    manifest = {"model": "tiny", "library_roots": roots}
    store = create_store(folder, manifest, dim=model.embedding_dim, dtype="float32")
    store.write([item_of(p) for p in paths], model.embed_audio(paths))
    return Store.open(folder)


def client_for(store, model, **kwargs) -> TestClient:
    return TestClient(create_app(Library(store, model), token=TOKEN, **kwargs), base_url=BASE)


def post_search(client: TestClient, body: dict, headers: dict | None = None):
    return client.post("/api/search", json=body, headers=AUTH if headers is None else headers)


def leftover_uploads() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "mlx-clap-query-*")))


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    import mlx_clap

    return mlx_clap.load(tiny_model_dir)


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("serve")
    paths = write_sounds(root / "sounds")
    store = build_store(root / "store", paths, tiny_model)
    return store, paths


@pytest.fixture(scope="module")
def client(library, tiny_model):
    return client_for(library[0], tiny_model)


# ------------------------------------------------------------------------------------ page, assets
def test_page_assets_come_from_the_package_with_security_headers(client):
    r = client.get("/")
    assert r.status_code == 200 and f'content="{TOKEN}"' in r.text
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["cross-origin-resource-policy"] == "same-origin"
    refs = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert sorted(refs) == ["/static/app.css", "/static/app.js", "/static/icon.svg"]
    for ref in refs:  # offline: every asset is served here, none is fetched from elsewhere
        asset = client.get(ref)
        assert asset.status_code == 200 and asset.content
        assert not re.search(r"""(?:src|href|url|fetch|import)\s*[=(]\s*['"]?(?:https?:)?//""", asset.text), (
            ref
        )


def test_text_search_returns_the_rows_a_brute_force_ranks_first(client, library, tiny_model):
    store, _ = library
    r = post_search(client, {"text": "a pure tone", "k": 3})
    assert r.status_code == 200, r.text
    doc = r.json()
    q = tiny_model.embed_text(["a pure tone"])[0]
    every = store.matrix() @ q
    want = np.argsort(-every, kind="stable")[:3]
    assert_same_ranking([x["row"] for x in doc["results"]], want.tolist(), every)
    assert [x["score"] for x in doc["results"]] == pytest.approx(every[want], abs=1e-4)
    first = doc["results"][0]
    assert first["path"] == store.items[first["row"]]["path"] and first["duration"] == pytest.approx(3.0)
    assert all(isinstance(x["z"], float) for x in doc["results"])
    assert doc["segments"] is False and doc["took_ms"] >= 0


def test_more_like_this_leaves_the_row_out_and_finds_its_copy(client, library):
    store, paths = library
    doc = post_search(client, {"row": 0, "k": 4}).json()
    rows = [x["row"] for x in doc["results"]]
    assert 0 not in rows and rows[0] == 4  # the byte-identical copy of row 0
    assert doc["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_a_store_too_big_for_memory_streams_to_the_same_answers(library, tiny_model, monkeypatch):
    import mlx_clap.serve.engine as engine

    store, _ = library
    q = tiny_model.embed_text(["a pure tone"])[0]
    held = Library(store, tiny_model)
    monkeypatch.setattr(engine, "RESIDENT_BYTES", 0)
    streamed = Library(store, tiny_model)
    assert held.files.matrix is not None and streamed.files.matrix is None
    every = held.files.matrix @ q
    for exclude in (None, 0):
        a, b = held.search(q, 3, exclude_row=exclude), streamed.search(q, 3, exclude_row=exclude)
        # The same rows in the same order, except where two rows tie: "tone 440" and its copy differ by
        # float rounding only, and two BLAS products (numpy's, MLX's) may order such a pair either way.
        for x, y in zip(a["results"], b["results"], strict=True):
            assert x["row"] == y["row"] or abs(every[x["row"]] - every[y["row"]]) <= 1e-6, (x, y)
        assert [x["score"] for x in a["results"]] == pytest.approx(
            [x["score"] for x in b["results"]], abs=1e-4
        )
        assert [x["z"] for x in a["results"]] == pytest.approx([x["z"] for x in b["results"]], abs=0.02)


def test_bad_search_bodies_are_refused_with_a_reason(client):
    assert post_search(client, {"text": "   "}).status_code == 400
    assert post_search(client, {"text": 5}).status_code == 400
    assert post_search(client, {"row": 99}).status_code == 404
    assert post_search(client, {"row": "0"}).status_code == 400
    assert post_search(client, {"row": 0, "k": 0}).status_code == 400
    assert post_search(client, {"row": 0, "segment": 0}).status_code == 404  # no segments in this store
    r = client.post("/api/search", content=b"[1, 2]", headers=AUTH)
    assert r.status_code == 400 and "JSON object" in r.json()["error"]
    r = client.post("/api/search", content=b"x" * (70 * 1024), headers=AUTH)
    assert r.status_code == 413


def test_dropped_file_search_finds_the_same_sound_and_cleans_up(client, library):
    store, paths = library
    before = leftover_uploads()
    data = paths[2].read_bytes()  # chirp.flac
    r = client.post("/api/search/audio?k=2", content=data, headers={**AUTH, "X-Filename": "my%20chirp.flac"})
    assert r.status_code == 200, r.text
    first = r.json()["results"][0]
    assert first["row"] == 2 and first["score"] == pytest.approx(1.0, abs=1e-4)
    r = client.post("/api/search/audio", content=b"not audio at all", headers={**AUTH, "X-Filename": "x.wav"})
    assert r.status_code == 400 and "dropped file" in r.json()["error"]
    assert leftover_uploads() == before


def test_upload_over_the_limit_is_413_and_leaves_nothing(library, tiny_model):
    small = client_for(library[0], tiny_model, max_upload=1000)
    before = leftover_uploads()
    r = small.post("/api/search/audio", content=b"\0" * 2000, headers=AUTH)  # Content-Length says so
    assert r.status_code == 413 and "1000 byte upload limit" in r.json()["error"]

    def chunks():  # no Content-Length: counted while it streams
        for _ in range(4):
            yield b"\0" * 400

    r = small.post("/api/search/audio", content=chunks(), headers=AUTH)
    assert r.status_code == 413
    assert small.post("/api/search/audio", content=b"", headers=AUTH).status_code == 400
    assert leftover_uploads() == before


# ---------------------------------------------------------------------------------- cross-site, host
def test_cross_site_and_tokenless_requests_are_refused(client):
    body = {"text": "rain"}
    assert post_search(client, body, headers={}).status_code == 403
    assert post_search(client, body, headers={"X-MLX-Clap-Token": "guess"}).status_code == 403
    evil = {**AUTH, "Origin": "https://evil.example"}
    r = post_search(client, body, headers=evil)
    assert r.status_code == 403 and "Origin" in r.json()["error"]
    r = post_search(client, body, headers={**AUTH, "Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 403 and "cross-site" in r.json()["error"]
    assert post_search(
        client, body, headers={**AUTH, "Origin": BASE, "Sec-Fetch-Site": "same-origin"}
    ).is_success
    r = client.post("/api/search/audio", content=b"RIFF", headers={"Origin": "https://evil.example"})
    assert r.status_code == 403
    assert client.get("/api/map").status_code == 403  # reads need the token too
    assert client.get("/audio/0").status_code == 403  # the player's URL carries it
    assert client.get(f"/audio/0?t={TOKEN}", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    # DNS rebinding: a page served as evil.example that resolves to 127.0.0.1 sends its own Host.
    assert client.get("/", headers={"Host": "evil.example"}).status_code == 400


# ------------------------------------------------------------------------------------------- audio
def test_audio_byte_ranges(client, library):
    _, paths = library
    data = paths[1].read_bytes()
    full = client.get(f"/audio/1?t={TOKEN}")
    assert full.status_code == 200 and full.content == data
    assert full.headers["content-type"] == "audio/wav" and full.headers["accept-ranges"] == "bytes"
    r = client.get(f"/audio/1?t={TOKEN}", headers={"Range": "bytes=100-1099"})
    assert r.status_code == 206 and r.content == data[100:1100]
    assert r.headers["content-range"] == f"bytes 100-1099/{len(data)}"
    r = client.get(f"/audio/1?t={TOKEN}", headers={"Range": "bytes=-64"})
    assert r.status_code == 206 and r.content == data[-64:]
    r = client.get(f"/audio/1?t={TOKEN}", headers={"Range": f"bytes={len(data)}-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(data)}"
    assert client.get(f"/audio/2?t={TOKEN}").headers["content-type"] == "audio/flac"


def test_traversal_attempts_are_refused(client, library):
    _, paths = library
    t = f"t={TOKEN}"
    for bad in ("5", "99999999999", "-1", "1.0", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "..%2F0", "0%00"):
        r = client.get(f"/audio/{bad}?{t}")
        assert r.status_code == 404, bad
        assert client.get(f"/api/item/{bad}", headers=AUTH).status_code == 404, bad
        assert client.get(f"/api/peaks/{bad}", headers=AUTH).status_code == 404, bad
    for raw in ("/audio/../pyproject.toml", "/static/..%2f..%2f..%2fpyproject.toml", "/static/../app.py"):
        r = client.get(f"{raw}?{t}")
        assert r.status_code == 404 and b"[project]" not in r.content and b"import" not in r.content, raw
    # A client-given path is never read: only the row id counts.
    r = client.get(f"/audio/0?{t}&path=/etc/passwd")
    assert r.status_code == 200 and r.content == paths[0].read_bytes()
    for q in ("start=../../etc", "end=nan", "start=-1", "n=../3", "n=99999"):
        assert client.get(f"/api/peaks/0?{q}", headers=AUTH).status_code == 400, q
    assert client.get("/api/duplicates?threshold=..%2f", headers=AUTH).status_code == 400


def test_symbolic_links_in_the_store_are_refused(tmp_path, tiny_model):
    paths = write_sounds(tmp_path / "lib")
    secret = tmp_path / "outside" / "secret.wav"
    secret.parent.mkdir()
    shutil.copy(paths[1], secret)
    link = tmp_path / "lib" / "link.wav"
    link.symlink_to(secret)
    store = build_store(tmp_path / "store", [paths[0], link, paths[3]], tiny_model)
    c = client_for(store, tiny_model)
    r = c.get(f"/audio/1?t={TOKEN}")
    assert r.status_code == 403 and "symbolic link" in r.json()["error"] and "outside" not in r.text
    assert c.get("/api/peaks/1", headers=AUTH).status_code == 403
    # A file swapped for a link after it was embedded, and a folder swapped for a link, are refused too.
    paths[0].unlink()
    paths[0].symlink_to(secret)
    assert c.get(f"/audio/0?t={TOKEN}").status_code == 403
    moved = tmp_path / "moved"
    (tmp_path / "lib").rename(moved)
    (tmp_path / "lib").symlink_to(moved)
    assert c.get(f"/audio/2?t={TOKEN}").status_code == 403
    (tmp_path / "lib").unlink()
    assert c.get(f"/audio/2?t={TOKEN}").status_code == 404  # gone: said so, nothing else served


def test_a_library_reached_through_a_linked_folder_is_served(tmp_path, tiny_model_dir, tiny_model):
    """As macOS's /tmp -> /private/tmp, or ~/Music on another volume: the link was there at embed time."""
    from mlx_clap.cli import main

    real = tmp_path / "volume" / "Music"
    paths = write_sounds(real)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "Music").symlink_to(real, target_is_directory=True)
    out = tmp_path / "store"
    args = [
        "embed",
        str(tmp_path / "home" / "Music"),
        "--out",
        str(out),
        "--model",
        str(tiny_model_dir),
        "-q",
    ]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    store = Store.open(out)
    by_name = {Path(it["path"]).name: row for row, it in enumerate(store.items)}
    assert all(str(it["path"]).startswith(str(tmp_path / "home")) for it in store.items)  # as reached
    c = client_for(store, tiny_model)
    row = by_name[paths[0].name]
    r = c.get(f"/audio/{row}?t={TOKEN}")
    assert r.status_code == 200 and r.content == paths[0].read_bytes()
    assert c.get(f"/api/peaks/{row}", headers=AUTH).status_code == 200
    # Pointed elsewhere while the server runs: refused, without saying where it points now.
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.copy(paths[0], other / paths[0].name)
    (tmp_path / "home" / "Music").unlink()
    (tmp_path / "home" / "Music").symlink_to(other, target_is_directory=True)
    r = c.get(f"/audio/{row}?t={TOKEN}")
    assert r.status_code == 403 and "elsewhere" not in r.text


# ---------------------------------------------------------------------------------- thumbs, items
def test_peaks_and_item(client):
    doc = client.get("/api/peaks/3?n=50", headers=AUTH).json()
    assert len(doc["peaks"]) == 50 and max(doc["peaks"]) == 1.0 and min(doc["peaks"]) >= 0.0
    clicks = np.array(doc["peaks"])
    assert (clicks < 0.5).sum() > 10  # the silences between the clicks show
    part = client.get("/api/peaks/0?n=10&start=1&end=2", headers=AUTH).json()["peaks"]
    assert len(part) == 10 and min(part) > 0.5  # a steady tone is level throughout
    # The chirp rises to 3.8 kHz: decoded at its own rate it stays level (a low-rate decode drew silence).
    chirp = client.get("/api/peaks/2?n=20", headers=AUTH).json()["peaks"]
    assert min(chirp) > 0.5
    item = client.get("/api/item/2", headers=AUTH).json()
    assert item["name"] == "chirp.flac" and item["source_rate"] == SR and "segments" not in item


# ---------------------------------------------------------------------------------------- map, dupes
def test_map_has_one_point_per_item_and_is_cached_until_the_store_changes(tmp_path, tiny_model):
    paths = write_sounds(tmp_path / "lib")
    store = build_store(tmp_path / "store", paths[:4], tiny_model)
    c = client_for(store, tiny_model)
    doc = c.get("/api/map", headers=AUTH).json()
    assert len(doc["x"]) == len(doc["y"]) == len(doc["cluster"]) == 4 == doc["rows"]
    assert 0.9 <= max(abs(v) for v in doc["x"] + doc["y"]) <= 1.0  # layout.robust_scale: the rim is 0.9-1
    assert doc["k"] == len(set(doc["cluster"])) and doc["notes"] == []
    cached = tmp_path / "store" / "map.json"
    stamp = cached.stat().st_mtime_ns
    assert c.get("/api/map", headers=AUTH).json()["x"] == doc["x"]
    assert client_for(store, tiny_model).get("/api/map", headers=AUTH).status_code == 200
    assert cached.stat().st_mtime_ns == stamp  # reused by a new server on the same store
    add_rows(store.path, [item_of(paths[4])], tiny_model.embed_audio([paths[4]]))
    grown = Store.open(tmp_path / "store")
    doc = client_for(grown, tiny_model).get("/api/map", headers=AUTH).json()
    assert len(doc["x"]) == 5 and cached.stat().st_mtime_ns != stamp


def test_duplicates_are_grouped(client, library):
    doc = client.get("/api/duplicates?threshold=0.999", headers=AUTH).json()
    assert doc["count"] >= 1
    assert [it["row"] for it in doc["groups"][0]["items"]] == [0, 4]
    assert client.get("/api/duplicates?threshold=0.2", headers=AUTH).status_code == 400
    # Any threshold, not a multiple of a step (the README's own 0.99958), and scores reported as cosines.
    fine = client.get("/api/duplicates?threshold=0.99958", headers=AUTH).json()
    assert fine["threshold"] == 0.99958
    assert all(-1.0 <= g["min_score"] <= g["score"] <= 1.0 for g in fine["groups"])
    results = post_search(client, {"row": 0, "k": 3}).json()["results"]
    assert all(-1.0 <= r["score"] <= 1.0 for r in results)


# ------------------------------------------------------------------------------------------ segments
def test_segment_store_returns_time_ranges_and_timelines(tmp_path, tiny_model_dir, tiny_model):
    from mlx_clap.cli import main

    paths = write_sounds(tmp_path / "lib", seconds=14.0)[:3]
    out = tmp_path / "store"
    r = CliRunner().invoke(
        main,
        ["embed", *map(str, paths), "--out", str(out), "--model", str(tiny_model_dir), "--segments",
         "--hop", "2", "--store-dtype", "float32", "-q"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    store = Store.open(out)
    view = store.segment_view()
    assert store.has_segments and len(view) > len(store)
    c = client_for(store, tiny_model)
    doc = post_search(c, {"text": "a pure tone", "k": 3}).json()
    assert doc["segments"] is True and len(doc["results"]) == 3
    q = tiny_model.embed_text(["a pure tone"])[0]
    seg_scores = view.matrix() @ q
    first = doc["results"][0]
    best = first["segment"]  # windows of a steady tone tie to float rounding: any of the best will do
    assert seg_scores[best] == pytest.approx(seg_scores.max(), abs=1e-5)
    assert first["row"] == int(view.file_index[best]) and first["score"] == pytest.approx(
        seg_scores[best], abs=1e-4
    )
    assert (first["best_start"], first["best_end"]) == pytest.approx(
        (view.start[best], view.end[best]), abs=1e-3
    )
    # The result's time range is the stretch `search --segments` merges around that window (at z >= 2;
    # with every window passing, the whole file), or that window alone when no window passes.
    import mlx_clap.serve.engine as engine
    from mlx_clap.search.segments import search_segments

    def expected(result: dict, min_z: float) -> tuple:
        at = result["best_start"]
        hits = search_segments(view, q, k=None, min_z=min_z)[0]
        hits = [g for g in hits if g.file_index == result["row"] and g.start <= at + 1e-6 and at < g.end]
        if not hits:
            return result["best_start"], result["best_end"], 1
        return pytest.approx(hits[0].start, abs=1e-3), pytest.approx(hits[0].end, abs=1e-3), hits[0].windows

    for r in doc["results"]:
        assert (r["start"], r["end"], r["windows"]) == expected(r, 2.0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "DEFAULT_MIN_Z", -100.0)
        every = post_search(client_for(store, tiny_model), {"text": "a pure tone", "k": 3}).json()["results"]
    for r in every:
        windows = np.nonzero(view.file_index == r["row"])[0]
        assert r["windows"] == windows.size > 1
        assert (r["start"], r["end"]) == pytest.approx(
            (view.start[windows[0]], view.end[windows[-1]]), abs=1e-3
        )
        assert (r["start"], r["end"], r["windows"]) == expected(r, -100.0)
    mine = np.nonzero(view.file_index == first["row"])[0]
    assert first["timeline"]["score"] == pytest.approx(seg_scores[mine], abs=1e-4)
    assert first["timeline"]["start"] == pytest.approx(view.start[mine], abs=1e-3)
    assert len({x["row"] for x in doc["results"]}) == 3  # one entry per file
    like = post_search(c, {"row": first["row"], "segment": first["segment"], "k": 5}).json()
    assert like["results"] and first["row"] not in [x["row"] for x in like["results"]]
    other = int(mine[0]) - 1 if mine[0] > 0 else int(mine[-1]) + 1
    assert post_search(c, {"row": first["row"], "segment": other}).status_code == 400
    item = c.get(f"/api/item/{first['row']}", headers=AUTH).json()
    assert item["segments"]["first"] == int(mine[0]) and len(item["segments"]["start"]) == mine.size

    with pytest.MonkeyPatch.context() as mp:  # segments streamed through FlatIndex: the same answer
        mp.setattr(engine, "RESIDENT_BYTES", 0)
        streamed = client_for(store, tiny_model)
        again = post_search(streamed, {"text": "a pure tone", "k": 3}).json()
    scores = {x["row"]: x["score"] for x in doc["results"] + again["results"]}
    assert_same_ranking([x["row"] for x in again["results"]], [x["row"] for x in doc["results"]], scores)
    assert again["results"][0]["timeline"]["score"] == pytest.approx(first["timeline"]["score"], abs=1e-4)


# ------------------------------------------------------------------------------------------ command
def test_command_refuses_a_remote_bind_without_the_flag_and_a_busy_port(library):
    from mlx_clap.cli.serve import bind_socket, serve

    r = CliRunner().invoke(serve, [str(library[0].path), "--host", "0.0.0.0"])
    assert r.exit_code == 2 and "--allow-remote" in r.output
    r = CliRunner().invoke(serve, ["--help"])
    assert r.exit_code == 0 and "mlx-clap serve vectors/" in r.output
    busy = bind_socket("127.0.0.1", 0)
    try:
        import click

        with pytest.raises(click.ClickException, match="--port"):
            bind_socket("127.0.0.1", busy.getsockname()[1])
        # The command says so before loading anything (this model does not exist).
        args = [str(library[0].path), "--port", str(busy.getsockname()[1]), "--model", "/nonexistent/model"]
        r = CliRunner().invoke(serve, args)
        assert r.exit_code == 1 and "--port" in r.output and "nonexistent" not in r.output, r.output
    finally:
        busy.close()
