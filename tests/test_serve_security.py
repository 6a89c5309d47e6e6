"""`mlx-clap serve` against hostile stores, clients and files (Starlette's TestClient, tiny model).

Covers: a file swapped for a link (or its folder for a link to another folder) while requests stream
never yields the link target's bytes; rows outside the library folders the store records, or without
an audio suffix, are never read and `mlx-clap check` lists them and exits 1; a store without recorded
folders plays nothing and one more `embed` records them; with --allow-remote the page carries no token
and the command prints it in the URL fragment; a long upload embeds its first MAX_QUERY_SECONDS only,
decoded no further, and a text query waits for at most one batch of its windows; malformed requests
(deep JSON, endless digits, NaN, wrong types, odd ranges) are 400s, never 500s.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

pytest.importorskip("starlette", reason="the serve extra is not installed: pip install 'mlx-clap[serve]'")
pytest.importorskip("httpx", reason="Starlette's TestClient needs httpx")

from fixtures import add_rows  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402
from test_serve_http import AUTH, BASE, TOKEN, build_store, client_for, item_of, write_sounds  # noqa: E402

from mlx_clap.serve import engine  # noqa: E402
from mlx_clap.serve.app import create_app  # noqa: E402
from mlx_clap.serve.engine import BACKGROUND, QUERY, Library, MLXThread, decode_head  # noqa: E402
from mlx_clap.store import Store  # noqa: E402

SECRET = b"TOP-SECRET-" * 4096  # what must never come out of the server


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    import mlx_clap

    return mlx_clap.load(tiny_model_dir)


def audio(client: TestClient, row: int, **headers: str):
    return client.get(f"/audio/{row}?t={TOKEN}", headers=headers)


def run_cli(*args: str):
    from mlx_clap.cli import main

    return CliRunner().invoke(main, list(args))


# ------------------------------------------------------------------------------------ swaps, links
def race(swap, request, seconds: float = 1.5) -> tuple[list, int]:
    """Run `swap()` in a loop on a thread while calling `request()` for `seconds`; (responses, swaps)."""
    stop = threading.Event()
    swaps = 0

    def swapper() -> None:
        nonlocal swaps
        while not stop.is_set():
            swap()
            swaps += 1

    thread = threading.Thread(target=swapper)
    thread.start()
    responses = []
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            responses.append(request())
    finally:
        stop.set()
        thread.join()
    return responses, swaps


def test_a_file_swapped_for_a_link_while_served_never_yields_the_target(tmp_path, tiny_model):
    paths = write_sounds(tmp_path / "lib")
    secret = tmp_path / "private" / "secret.wav"
    secret.parent.mkdir()
    secret.write_bytes(SECRET)
    store = build_store(tmp_path / "store", paths[:2], tiny_model)
    c = client_for(store, tiny_model)
    target, keep = paths[1], tmp_path / "lib" / "original.keep"
    original = target.read_bytes()
    os.link(target, keep)
    flip = [False]

    def swap() -> None:  # the file and a link to the secret take turns under the row's name (atomic renames)
        tmp = target.with_name(".swap")
        if flip[0]:
            os.link(keep, tmp)
        else:
            os.symlink(secret, tmp)
        os.replace(tmp, target)
        flip[0] = not flip[0]

    responses, swaps = race(swap, lambda: audio(c, 1))
    assert swaps > 10 and len(responses) > 10
    for r in responses:
        assert b"TOP-SECRET" not in r.content
        assert (r.status_code, r.content) == (200, original) or r.status_code == 403, r.status_code
    ranged, _ = race(swap, lambda: audio(c, 1, Range="bytes=0-99"), seconds=0.5)
    assert all(b"TOP-SECRET" not in r.content for r in ranged)


def test_a_folder_swapped_for_a_link_while_served_never_yields_the_target(tmp_path, tiny_model):
    lib = tmp_path / "lib"
    paths = write_sounds(lib)
    store = build_store(tmp_path / "store", paths[:2], tiny_model)
    c = client_for(store, tiny_model)
    original = paths[1].read_bytes()
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / paths[1].name).write_bytes(SECRET)
    link, aside = tmp_path / ".link", tmp_path / ".aside"
    os.symlink(decoy, link)
    flip = [False]

    def swap() -> None:  # the library folder and a link to the decoy take turns under its name
        if flip[0]:
            os.rename(lib, link)
            os.rename(aside, lib)
        else:
            os.rename(lib, aside)
            os.rename(link, lib)
        flip[0] = not flip[0]

    responses, swaps = race(swap, lambda: audio(c, 1))
    assert swaps > 10 and len(responses) > 10
    for r in responses:
        assert b"TOP-SECRET" not in r.content
        assert (r.status_code, r.content) == (200, original) or r.status_code in (403, 404), r.status_code


def test_a_link_row_is_refused_for_audio_peaks_and_head(tmp_path, tiny_model):
    paths = write_sounds(tmp_path / "lib")
    secret = tmp_path / "private" / "secret.wav"
    secret.parent.mkdir()
    shutil.copy(paths[1], secret)
    link = tmp_path / "lib" / "link.wav"
    link.symlink_to(secret)
    c = client_for(build_store(tmp_path / "store", [paths[0], link], tiny_model), tiny_model)
    for r in (audio(c, 1), c.head(f"/audio/1?t={TOKEN}"), c.get("/api/peaks/1", headers=AUTH)):
        assert r.status_code == 403 and "private" not in r.text, r.text
    assert "symbolic link" in audio(c, 1).json()["error"]
    fifo = tmp_path / "lib" / "fifo.wav"  # swapped in for a file: refused at once, the request never hangs
    paths[0].unlink()
    os.mkfifo(fifo)
    fifo.rename(paths[0])
    r = audio(c, 0)
    assert r.status_code == 403 and "not a regular file" in r.json()["error"]


def test_head_and_ranges_come_from_the_descriptor(tmp_path, tiny_model):
    paths = write_sounds(tmp_path / "lib")
    c = client_for(build_store(tmp_path / "store", paths[:2], tiny_model), tiny_model)
    data = paths[1].read_bytes()
    r = c.head(f"/audio/1?t={TOKEN}")
    assert r.status_code == 200 and r.content == b"" and r.headers["content-length"] == str(len(data))
    r = audio(c, 1, Range="bytes=0-0")
    assert r.status_code == 206 and r.content == data[:1]
    r = audio(c, 1, Range="bytes=10-5")  # not a valid range: ignored, the whole file
    assert r.status_code == 200 and r.content == data
    r = audio(c, 1, Range="bytes=0-9, 20-29")  # several ranges: the whole file, as RFC 9110 allows
    assert r.status_code == 200 and r.content == data
    etag = r.headers["etag"]
    r = audio(c, 1, Range="bytes=0-9", **{"If-Range": etag})
    assert r.status_code == 206 and r.content == data[:10]
    r = audio(c, 1, Range="bytes=0-9", **{"If-Range": '"stale"'})
    assert r.status_code == 200 and r.content == data
    r = audio(c, 1, Range="bytes=" + "9" * 18 + "-")
    assert r.status_code == 416
    r = audio(c, 1, Range="bytes=" + "9" * 5000 + "-")  # past what this reads: ignored, never a 500
    assert r.status_code == 200


# --------------------------------------------------------------------------------- library folders
def test_rows_outside_the_library_folders_are_never_read_and_check_lists_them(tmp_path, tiny_model):
    paths = write_sounds(tmp_path / "lib")
    outside = tmp_path / "elsewhere" / "private.wav"
    outside.parent.mkdir()
    shutil.copy(paths[1], outside)
    text = tmp_path / "lib" / "notes.txt"
    text.write_bytes(SECRET)
    store = build_store(tmp_path / "store", [paths[0]], tiny_model)  # records lib/ as its one folder
    # A store received from elsewhere: its rows name whatever its author wrote.
    hostile = [outside, Path("/etc/passwd"), text]
    add_rows(
        store.path,
        [{**item_of(paths[0]), "path": str(p)} for p in hostile],
        tiny_model.embed_audio([paths[0]] * 3),
    )
    store = Store.open(tmp_path / "store")
    c = client_for(store, tiny_model)
    assert audio(c, 0).status_code == 200
    causes = {}
    for row in (1, 2, 3):
        for r in (audio(c, row), c.get(f"/api/peaks/{row}", headers=AUTH)):
            assert r.status_code == 403 and b"TOP-SECRET" not in r.content and b"root:" not in r.content
        causes[row] = audio(c, row).json()["error"]
    assert "outside the library folders" in causes[1]
    assert "not an audio file name (no suffix)" in causes[2] and "(.txt)" in causes[3]
    r = run_cli("check", str(tmp_path / "store"), "--json")
    assert r.exit_code == 1, r.output
    report = json.loads(r.output)
    assert [u["row"] for u in report["unsafe_rows"]] == [1, 2, 3] and report["ok"] is True
    assert report["library_roots"] == [os.path.realpath(tmp_path / "lib")]
    r = run_cli("check", str(tmp_path / "store"))
    assert r.exit_code == 1 and "UNSAFE" in r.output and "/etc/passwd" in r.output


def test_a_store_without_folders_plays_nothing_until_embed_records_them(tmp_path, tiny_model_dir, tiny_model):
    from mlx_clap.cli.serve import describe_library

    lib, more = tmp_path / "lib", tmp_path / "more"
    write_sounds(lib)
    extra = write_sounds(more)[3]
    out = tmp_path / "store"
    args = ["embed", str(lib), "--out", str(out), "--model", str(tiny_model_dir), "-q"]
    assert run_cli(*args).exit_code == 0
    assert Store.open(out).manifest["library_roots"] == [os.path.realpath(lib)]
    with Store.open(out, write=True) as w:  # as a store made before they were recorded
        w.update_manifest({"library_roots": None})

    app = create_app(Library(Store.open(out), tiny_model), token=TOKEN)
    c = TestClient(app, base_url=BASE)
    r = audio(c, 0)
    assert r.status_code == 403 and "mlx-clap embed" in r.json()["error"]
    assert "records no library folders" in describe_library(out, app.state.files)[0]
    r = run_cli("check", str(out))
    assert r.exit_code == 0 and "records no library folders" in r.output

    assert run_cli(*args).exit_code == 0  # nothing changed: the model is not even loaded, the folder recorded
    assert Store.open(out).manifest["library_roots"] == [os.path.realpath(lib)]
    # A file argument adds its folder; the folders recorded before stay.
    assert (
        run_cli("embed", str(extra), "--out", str(out), "--model", str(tiny_model_dir), "-q").exit_code == 0
    )
    roots = Store.open(out).manifest["library_roots"]
    assert roots == sorted([os.path.realpath(lib), os.path.realpath(more)])
    store = Store.open(out)
    app = create_app(Library(store, tiny_model), token=TOKEN)
    c = TestClient(app, base_url=BASE)
    for row, it in enumerate(store.items):
        assert audio(c, row).content == Path(it["path"]).read_bytes()
    assert describe_library(out, app.state.files) == [f"plays files under: {', '.join(roots)}"]


# ------------------------------------------------------------------------------------------ remote
def test_remote_pages_carry_no_token_and_the_command_prints_it(
    tmp_path, tiny_model_dir, tiny_model, monkeypatch
):
    import uvicorn

    from mlx_clap.cli.serve import serve

    paths = write_sounds(tmp_path / "lib")[:2]
    store = build_store(tmp_path / "store", paths, tiny_model)
    c = TestClient(create_app(Library(store, tiny_model), token=TOKEN, remote=True), base_url=BASE)
    page = c.get("/")
    assert page.status_code == 200 and TOKEN not in page.text and 'content=""' in page.text
    r = c.get("/api/info")
    assert r.status_code == 403 and "#token=" in r.json()["error"]
    assert c.get("/api/info", headers=AUTH).status_code == 200 and audio(c, 0).status_code == 200

    out = tmp_path / "embedded"
    r = run_cli("embed", *map(str, paths), "--out", str(out), "--model", str(tiny_model_dir), "-q")
    assert r.exit_code == 0, r.output
    served = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: served.append(self.config.app))
    base = [str(out), "--host", "0.0.0.0", "--port", "0", "--allow-remote"]
    r = CliRunner().invoke(serve, base)
    assert r.exit_code == 0, r.output
    token = served[-1].state.token
    assert f"#token={token}" in r.output  # the terminal is the only place it is shown
    assert token not in TestClient(served[-1], base_url=BASE).get("/").text
    r = CliRunner().invoke(serve, base, env={"MLX_CLAP_SERVE_TOKEN": "my-own-long-token-42"})
    assert r.exit_code == 0 and served[-1].state.token == "my-own-long-token-42"
    assert "my-own-long-token-42" not in r.output and "asks for the token" in r.output
    r = CliRunner().invoke(serve, [*base, "--token", "short"])
    assert r.exit_code == 2 and "16 characters" in r.output


def test_a_remote_page_takes_the_token_from_the_fragment_or_asks_for_it(tmp_path, tiny_model):
    """In Chromium (skipped, saying why, where test_serve_browser.py is): the page carries no token, reads
    it from #token=... (then clears the fragment), or asks for it when there is none."""
    from test_serve_browser import bind_socket, chromium_page, uvicorn

    paths = write_sounds(tmp_path / "lib")[:2]
    app = create_app(
        Library(build_store(tmp_path / "store", paths, tiny_model), tiny_model), token=TOKEN, remote=True
    )
    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
    try:
        with chromium_page() as (page, errors):
            page.goto(url + f"#token={TOKEN}")
            page.wait_for_selector("body[data-ready='1']")
            assert page.evaluate("() => location.hash") == ""  # off the address bar
            asked: list[str] = []

            def answer(dialog) -> None:
                asked.append(dialog.message)
                dialog.accept(TOKEN)

            fresh = page.context.browser.new_page()  # another session: nothing kept, so the page asks
            fresh.on("dialog", answer)
            fresh.goto(url)
            fresh.wait_for_selector("body[data-ready='1']")
            assert asked and "Token" in asked[0]
            assert not errors, errors
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


# ------------------------------------------------------------------------------------ long uploads
def write_silence(path: Path, seconds: int, rate: int = 8000) -> Path:
    """A FLAC of silence, written a minute at a time (a 10-hour one is ~1 MB on disk)."""
    minute = np.zeros(60 * rate, dtype=np.int16)
    with sf.SoundFile(path, "w", rate, 1, subtype="PCM_16", format="FLAC") as f:
        for start in range(0, seconds, 60):
            f.write(minute[: (min(seconds, start + 60) - start) * rate])
    return path


def test_a_ten_hour_file_is_decoded_for_its_first_minutes_only(tmp_path):
    long = write_silence(tmp_path / "ten hours.flac", 10 * 3600, rate=2000)
    t0 = time.perf_counter()
    wave, total = decode_head(long, 48000, 600)
    took = time.perf_counter() - t0
    assert wave.shape == (600 * 48000,) and total == pytest.approx(36000.0)
    print(f"decoded the first 10:00 of a 10-hour FLAC in {took:.2f} s")
    short = write_silence(tmp_path / "short.flac", 30)
    wave, total = decode_head(short, 48000, 600)
    assert wave.shape == (30 * 48000,) and total is None
    assert engine.clock(600) == "10:00" and engine.clock(36000) == "10:00:00"


def test_a_long_upload_embeds_its_head_and_says_so(tmp_path, tiny_model, monkeypatch):
    from mlx_clap.preprocess.audio import load_audio

    paths = write_sounds(tmp_path / "lib")[:2]
    c = client_for(build_store(tmp_path / "store", paths, tiny_model), tiny_model)
    rng = np.random.default_rng(1)
    sf.write(tmp_path / "up.wav", (0.2 * rng.standard_normal(30 * 16000)).astype(np.float32), 16000)
    monkeypatch.setattr(engine, "MAX_QUERY_SECONDS", 20)
    data = (tmp_path / "up.wav").read_bytes()
    r = c.post("/api/search/audio?k=2", content=data, headers={**AUTH, "X-Filename": "up.wav"})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["notes"] == ["embedded the first 0:20 of 0:30"]
    head = load_audio(tmp_path / "up.wav", 48000).samples[: 20 * 48000]
    want = tiny_model.embed_waveforms([head])[0]
    every = Store.open(tmp_path / "store").matrix() @ want
    assert doc["results"][0]["score"] == pytest.approx(float(every.max()), abs=1e-4)


def test_queries_go_before_waiting_background_work():
    thread = MLXThread()
    gate, order = threading.Event(), []
    first = thread.submit(BACKGROUND, gate.wait)
    later = [
        thread.submit(BACKGROUND, order.append, "audio batch"),
        thread.submit(BACKGROUND, order.append, "map"),
        thread.submit(QUERY, order.append, "text"),
        thread.submit(QUERY, order.append, "search"),
    ]
    gate.set()
    for f in [first, *later]:
        f.result(timeout=30)
    assert order == ["text", "search", "audio batch", "map"]


class Recorder:
    """The model, with each audio batch and text embedding logged as (kind, windows, start, end)."""

    def __init__(self, model):
        self.model = model
        self.log: list[tuple[str, int, float, float]] = []
        self.audio_started = threading.Event()

    def __getattr__(self, name):
        return getattr(self.model, name)

    def embed_waveforms(self, waves, **kwargs):
        t0 = time.perf_counter()
        self.audio_started.set()
        out = self.model.embed_waveforms(waves, **kwargs)
        self.log.append(("audio", len(waves), t0, time.perf_counter()))
        return out

    def embed_text(self, texts, **kwargs):
        t0 = time.perf_counter()
        out = self.model.embed_text(texts, **kwargs)
        self.log.append(("text", len(texts), t0, time.perf_counter()))
        return out


class QueuedAt(MLXThread):
    """An MLX thread that notes when each query was queued."""

    def __init__(self):
        super().__init__()
        self.queued: list[float] = []

    def submit(self, lane, fn, *args, **kwargs):
        future = super().submit(lane, fn, *args, **kwargs)
        if lane == QUERY:
            self.queued.append(time.perf_counter())
        return future


def test_text_queries_wait_for_one_audio_batch_not_the_whole_upload(tmp_path, tiny_model):
    """A 10:30 upload (60 windows once capped) while text queries keep coming: the audio goes to the
    model WINDOWS_PER_CALL windows a call, and each text query runs as soon as the batch running when it
    was queued ends. The worst wait is printed (a measurement, not a bound this asserts)."""
    paths = write_sounds(tmp_path / "lib")[:2]
    model = Recorder(tiny_model)
    library = Library(build_store(tmp_path / "store", paths, tiny_model), model)
    library.mlx = QueuedAt()
    upload = write_silence(tmp_path / "upload.flac", 630)
    got: dict = {}
    worker = threading.Thread(target=lambda: got.update(r=library.audio_vector(upload, "the upload")))
    worker.start()
    assert model.audio_started.wait(60)
    while worker.is_alive():
        library.text_vector("rain on a tin roof")
    worker.join()
    assert got["r"][1] == ["embedded the first 10:00 of 10:30"]
    batches = [e for e in model.log if e[0] == "audio"]
    texts = [e for e in model.log if e[0] == "text"]
    assert sum(e[1] for e in batches) == 60 and max(e[1] for e in batches) <= engine.WINDOWS_PER_CALL
    assert texts and texts[0][2] < batches[-1][2]  # text ran between batches, not after the whole file
    waits = []
    for queued, (_, _, start, _) in zip(library.mlx.queued, texts, strict=True):
        assert len([b for b in batches if queued < b[3] <= start]) <= 1  # the one batch running, no more
        waits.append(start - queued)
    print(
        f"text waited at most {max(waits) * 1000:.0f} ms, behind batches of {engine.WINDOWS_PER_CALL} windows"
    )


# -------------------------------------------------------------------------------- malformed requests
def test_malformed_requests_are_400s_with_a_reason(tmp_path, tiny_model):
    paths = write_sounds(tmp_path / "lib")[:2]
    c = client_for(build_store(tmp_path / "store", paths, tiny_model), tiny_model)

    def search(raw: bytes):
        return c.post("/api/search", content=raw, headers=AUTH)

    r = search(b"[" * 60000)
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]
    r = c.get("/api/peaks/0?n=" + "9" * 5000, headers=AUTH)
    assert r.status_code == 400 and "n must be a whole number" in r.json()["error"]
    bad_bodies = [
        b'{"text": "rain", "k": NaN}',
        b'{"text": "rain", "k": Infinity}',
        b'{"text": "rain", "k": -5}',
        b'{"text": "rain", "k": 1.5}',
        b'{"text": "rain", "k": true}',
        b'{"text": "rain", "k": ' + b"9" * 5000 + b"}",
        b'{"text": ["rain"]}',
        b'{"text": {"a": 1}}',
        b'{"text": "' + b"x" * 2000 + b'"}',
        b'{"row": "0"}',
        b'{"row": 1e3}',
        b'{"row": 0, "segment": "1"}',
        b'{"row": ' + b"1" * 40 + b"}",
        b'{"nothing": 1}',
        b"{",
        b"\xff\xfe",
        b'"text"',
    ]
    for raw in bad_bodies:
        r = search(raw)
        assert r.status_code == 400 and r.json()["error"], (raw[:40], r.status_code, r.text[:200])
    for raw in (b'{"row": -1}', b'{"row": 99}', b'{"row": 0, "segment": -1}'):
        assert search(raw).status_code == 404, raw
    r = search(b'{"text": "\\ud800 rain"}')  # a lone surrogate, which no tokenizer takes
    assert r.status_code == 400 and "Unicode" in r.json()["error"], r.text
    for q in ("n=-1", "n=", "n=1e3", "n=%EF%BC%91%EF%BC%92", "start=nan", "start=inf", "end=1e400",
              "start=" + "9" * 5000, "start=-0.5"):  # fmt: skip
        assert c.get(f"/api/peaks/0?{q}", headers=AUTH).status_code == 400, q
    for q in ("threshold=nan", "threshold=-inf", "threshold=2", "threshold=" + "1" * 5000, "threshold=0x1"):
        assert c.get(f"/api/duplicates?{q}", headers=AUTH).status_code == 400, q
    for q in ("k=0", "k=-1", "k=" + "9" * 5000, "k=1.5"):
        r = c.post(f"/api/search/audio?{q}", content=paths[0].read_bytes(), headers=AUTH)
        assert r.status_code == 400, q
    for row in ("9" * 5000, "1e3", "0x1"):
        assert c.get(f"/api/item/{row}", headers=AUTH).status_code == 404
        assert audio(c, row).status_code == 404
    r = c.post(
        "/api/search/audio", content=b"RIFF", headers={**AUTH, "Content-Length": "9" * 5000}
    )  # declared far past the limit: refused before reading
    assert r.status_code == 413
