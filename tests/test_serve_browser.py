"""`mlx-clap serve` in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright.

The server runs on a free port in a thread, over a store of real 3-s sounds embedded with the tiny
random-init model. The browser types a query and sees one result row per file, plays a result (its
<audio> element's currentTime advances), drops a file on the drop zone and sees the same sound ranked
first, and draws the map with one point per file. It also checks the layout: duplicate cards show whole
names, a 420 px wide window keeps the names and the header in view, the map of a clustered library says
how it was placed. Screenshots go to the test's folder; with MLX_CLAP_UPDATE_SCREENSHOT=1 they also
replace the pictures in docs/ (serve.png, the README's, and serve-1280/420/map.png), and a plain test run
leaves the checkout as it was.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)", allow_module_level=True)
pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install 'mlx-clap[serve]'")

import uvicorn  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402
from test_serve_http import build_store, write_sounds  # noqa: E402

from mlx_clap.cli.serve import bind_socket  # noqa: E402
from mlx_clap.serve.app import create_app  # noqa: E402
from mlx_clap.serve.engine import Library  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"
TIMEOUT_MS = 15_000
NARROW = 420
# A copy of "tone 440.wav" deep in the library, with a name too long for one line of a card.
LONG_FOLDER = ("2019 Iceland", "Day 3")
LONG_NAME = "hydrophone under the glacier, long take with the boat idling (tone 440 reference copy).wav"


def screenshot(page, tmp_path: Path, name: str) -> None:
    """Save the page as `name` in the test's folder, and in docs/ when MLX_CLAP_UPDATE_SCREENSHOT=1."""
    shot = tmp_path / name
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("MLX_CLAP_UPDATE_SCREENSHOT") == "1":
        DOCS.mkdir(exist_ok=True)
        shutil.copyfile(shot, DOCS / name)


@contextlib.contextmanager
def server_for(library: Library):
    """The page's URL while a uvicorn server for `library` runs in a thread."""
    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(library), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "the server did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@contextlib.contextmanager
def chromium_page(width: int = 1280, height: int = 860):
    """A page of headless Chromium and the list its script errors and console errors go to."""
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), args=["--autoplay-policy=no-user-gesture-required"]
        )
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(TIMEOUT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            yield page, errors
        finally:
            browser.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    """(page URL, store, sound paths) of a server running in a thread for this module."""
    import mlx_clap

    model = mlx_clap.load(tiny_model_dir)
    root = tmp_path_factory.mktemp("serve_browser")
    paths = write_sounds(root / "Field recordings")
    deep = root.joinpath("Field recordings", *LONG_FOLDER)
    deep.mkdir(parents=True)
    paths.append(Path(shutil.copy(paths[0], deep / LONG_NAME)))
    store = build_store(root / "store", paths, model)
    library = Library(store, model)
    library.warm()
    with server_for(library) as url:
        yield url, store, paths


def test_search_play_drop_and_map_in_chromium(served, tmp_path):
    url, store, paths = served
    with chromium_page() as (page, errors):
        # Waits are given as functions: the page's CSP (no 'unsafe-eval') refuses Playwright's
        # string predicates, which is the policy working.
        page.goto(url)
        page.wait_for_selector("body[data-ready='1']")

        # Type a query: one row per file (the store is smaller than k).
        page.fill("#query", "a pure tone")
        page.press("#query", "Enter")
        page.wait_for_function(
            f"() => document.querySelectorAll('#results li.result').length === {len(store)}"
        )
        names = page.locator("#results .name").all_text_contents()
        assert sorted(names) == sorted(p.name for p in paths)

        # Play the first result: the player's clock moves.
        page.click("#results li.result >> nth=0 >> button.play")
        page.wait_for_function("() => document.getElementById('player').currentTime > 0.3")
        assert not page.evaluate("() => document.getElementById('player').paused")
        page.evaluate("() => document.getElementById('player').pause()")

        # Drop a file on the drop zone (a real DataTransfer with a File): the same sound comes first.
        data = base64.b64encode(paths[2].read_bytes()).decode()
        page.evaluate(
            """(b64) => {
                const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                const dt = new DataTransfer();
                dt.items.add(new File([bytes], "reference chirp.flac", { type: "audio/flac" }));
                const zone = document.getElementById("drop-zone");
                const drop = new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true });
                zone.dispatchEvent(drop);
            }""",
            data,
        )
        page.wait_for_function(
            "() => document.getElementById('status').textContent"
            ".includes('files for sounds like reference chirp.flac')"
        )
        assert page.locator("#results li.result").first.get_attribute("data-row") == "2"

        # The map: one point per file, drawn on the canvas.
        page.click("#tabs button[data-tab='map']")
        page.wait_for_function(f"() => document.getElementById('map').dataset.total === '{len(store)}'")
        assert page.get_attribute("#map", "data-points") == str(len(store))

        # Duplicates: "tone 440" and its copy in one group, side by side, each playable (random
        # weights put every file of this tiny store close together, so others may join the group).
        page.click("#tabs button[data-tab='duplicates']")
        page.click("#dup-form button[type='submit']")
        page.wait_for_function("() => document.querySelectorAll('#dup-groups .member').length >= 2")
        groups = page.locator("#dup-groups .group")
        names = [groups.nth(g).locator(".member .name").all_text_contents() for g in range(groups.count())]
        assert any({paths[0].name, paths[4].name} <= set(group) for group in names), names
        page.click("#dup-groups .member >> nth=1 >> button.play")
        page.wait_for_function("() => !document.getElementById('player').paused")
        page.evaluate("() => document.getElementById('player').pause()")

        # The screenshot for the README: the results of the dropped sound, its file view open.
        page.click("#tabs button[data-tab='results']")
        page.click("#results li.result >> nth=0 >> button.name")
        page.wait_for_selector("#file-view:not([hidden])")
        page.wait_for_timeout(300)  # the thumbnails are drawn as their peaks arrive
        screenshot(page, tmp_path, "serve.png")
        assert not errors, errors


def test_duplicates_take_any_threshold_and_cards_show_whole_names(served, tmp_path):
    """The threshold takes five decimals (0.99958, the README's codec-variant cut; the old step=0.005
    refused it) and refuses what is out of range with a line saying so; a card shows the whole name
    (the old card cut it to a few characters) and the folder's last components, the full one in its title."""
    url, _, paths = served
    with chromium_page() as (page, errors):
        page.goto(url)
        page.wait_for_selector("body[data-ready='1']")
        page.click("#tabs button[data-tab='duplicates']")
        page.fill("#dup-threshold", "0.99958")
        assert page.evaluate("() => document.getElementById('dup-threshold').validity.valid")
        with page.expect_request(lambda r: "/api/duplicates" in r.url) as request:
            page.click("#dup-form button[type='submit']")
        assert "threshold=0.99958" in request.value.url
        page.wait_for_function("() => document.querySelectorAll('#dup-groups .member').length >= 3")
        assert "error" not in (page.get_attribute("#dup-status", "class") or "")

        # The three copies of the tone (one with a long name, deep in the library) are one group.
        card = page.locator("#dup-groups .member", has_text=LONG_NAME)
        assert card.count() == 1
        name = card.locator(".name")
        assert name.text_content() == LONG_NAME
        # Whole on screen: nothing cut off inside the name's box (an ellipsis would leave scrollWidth
        # larger than clientWidth), and the box inside the card and the window.
        assert name.evaluate("(n) => n.scrollWidth <= n.clientWidth && n.scrollHeight <= n.clientHeight")
        box, card_box = name.bounding_box(), card.bounding_box()
        assert box["width"] > 100 and box["x"] >= card_box["x"]
        assert box["x"] + box["width"] <= card_box["x"] + card_box["width"] <= 1280
        where = card.locator(".folder .where")
        assert where.text_content() == "…/" + "/".join(LONG_FOLDER)
        assert where.get_attribute("title") == str(paths[-1].parent)
        screenshot(page, tmp_path, "serve-1280.png")

        # Out of range: a line that says so, no request.
        for bad in ("1.5", "0.2", ""):
            page.fill("#dup-threshold", bad)
            page.click("#dup-form button[type='submit']")
            page.wait_for_function("() => document.getElementById('dup-status').classList.contains('error')")
            assert "must be a cosine from 0.5 to 1" in page.text_content("#dup-status")
            page.evaluate("() => document.getElementById('dup-status').classList.remove('error')")
        assert not errors, errors


def test_a_narrow_window_keeps_names_and_header_in_view(served, tmp_path):
    """At 420 px (a phone) the header wraps inside the window and each result row keeps its name readable
    (the old five-column row gave the name a zero-width column and the header ran off the right edge)."""
    url, store, paths = served
    with chromium_page(NARROW, 860) as (page, errors):
        page.goto(url)
        page.wait_for_selector("body[data-ready='1']")
        page.fill("#query", "a pure tone")
        page.press("#query", "Enter")
        page.wait_for_function(
            f"() => document.querySelectorAll('#results li.result').length === {len(store)}"
        )
        page.wait_for_timeout(300)  # the thumbnails are drawn as their peaks arrive
        assert page.evaluate("() => document.documentElement.scrollWidth") <= NARROW
        for selector in ("header", "#search-form", "#query", "#drop-zone", "#tabs"):
            box = page.locator(selector).bounding_box()
            assert box["x"] >= 0 and box["x"] + box["width"] <= NARROW, (selector, box)
        names = page.locator("#results .name")
        assert sorted(names.all_text_contents()) == sorted(p.name for p in paths)
        for i in range(names.count()):
            name = names.nth(i)
            box = name.bounding_box()
            assert box["width"] > 0 and box["height"] > 0, (name.text_content(), box)
            assert box["x"] >= 0 and box["x"] + box["width"] <= NARROW, (name.text_content(), box)
            assert name.evaluate("(n) => n.scrollWidth <= n.clientWidth"), name.text_content()
            # The column names live in keeps most of the row, not a sliver beside the waveform.
            assert page.locator("#results .meta").nth(i).bounding_box()["width"] > NARROW / 2
        screenshot(page, tmp_path, "serve-420.png")
        assert not errors, errors


def test_the_map_of_a_clustered_library_says_how_it_was_placed(tmp_path, tiny_model_dir):
    """A store of 600 synthetic vectors (no audio needed to draw a map): 4 families of 2 kinds each, a kind
    a curved 2-d sheet. Every point is drawn, and the status line names the projection (PaCMAP with the
    serve extra, else PCA and how to get more)."""
    import importlib.util

    import numpy as np

    import mlx_clap
    from mlx_clap.store import Store

    model = mlx_clap.load(tiny_model_dir)
    rng = np.random.default_rng(0)
    n, clusters, dim = 600, 8, model.embedding_dim
    labels = np.arange(n) % clusters
    families = rng.standard_normal((clusters // 2, dim))
    centres = families.repeat(2, axis=0) + 0.7 * rng.standard_normal((clusters, dim))
    basis = rng.standard_normal((clusters, 4, dim))
    z = rng.uniform(-1, 1, (n, 2))
    sheet = np.einsum("nf,nfd->nd", np.concatenate([z, np.sin(2 * z)], axis=1), basis[labels])
    x = centres[labels] + 0.4 * sheet + 0.05 * rng.standard_normal((n, dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    kinds = ["rain", "birds", "engines", "voices", "water", "wind", "bells", "steps"]
    items = [{"path": f"/library/{kinds[c]}/{kinds[c]} {i:03d}.wav", "size": 1, "mtime": 0.0, "duration": 3.0}
             for i, c in enumerate(labels)]  # fmt: skip
    with Store.create(tmp_path / "store", {"model": "tiny"}, dim=dim, dtype="float32") as store:
        store.write(items, x)
    library = Library(Store.open(tmp_path / "store"), model)
    pacmap = importlib.util.find_spec("pacmap") is not None
    with server_for(library) as url, chromium_page() as (page, errors):
        page.goto(url)
        page.wait_for_selector("body[data-ready='1']")
        page.click("#tabs button[data-tab='map']")
        page.wait_for_function(
            f"() => document.getElementById('map').dataset.total === '{n}'", timeout=120_000
        )
        assert page.get_attribute("#map", "data-points") == str(n)
        assert page.get_attribute("#map", "data-projection") == ("pacmap" if pacmap else "pca")
        status = page.text_content("#map-status")
        assert ("Placed by PaCMAP" if pacmap else "install pacmap") in status, status
        screenshot(page, tmp_path, "serve-map.png")
        assert not errors, errors


def test_segment_results_show_time_ranges_and_play_from_a_segment(tmp_path, tiny_model_dir):
    """A store made with `embed --segments`: each result names its time range, and a click on the file
    view's timeline plays from the start of the segment under the pointer."""
    from click.testing import CliRunner

    import mlx_clap
    from mlx_clap.cli import main
    from mlx_clap.store import Store

    paths = write_sounds(tmp_path / "lib", seconds=14.0)[:3]
    out = tmp_path / "store"
    args = ["embed", *map(str, paths), "--out", str(out), "--model", str(tiny_model_dir), "--segments"]
    r = CliRunner().invoke(main, [*args, "--hop", "2", "-q"])
    assert r.exit_code == 0, r.output
    model = mlx_clap.load(tiny_model_dir)
    library = Library(Store.open(out), model)
    expected = library.text_search("a pure tone", 3)["results"]
    first = expected[0]
    starts = library.item(first["row"])["segments"]["start"]
    assert len(starts) > 2
    with server_for(library) as url, chromium_page() as (page, errors):
        page.goto(url)
        page.wait_for_selector("body[data-ready='1']")
        page.fill("#query", "a pure tone")
        page.press("#query", "Enter")
        page.wait_for_function("() => document.querySelectorAll('#results li.result').length === 3")
        assert page.locator("#results .name").all_text_contents() == [x["name"] for x in expected]
        # The row shows the stretch (start–end), and its play button plays from the stretch's start.
        assert "–" in page.locator("#results li.result >> nth=0 >> .folder").text_content()
        page.click("#results li.result >> nth=0 >> button.play")
        page.wait_for_function(
            "(t) => { const p = document.getElementById('player'); return !p.paused && p.currentTime > t; }",
            arg=first["start"] + 0.2,
            timeout=3000,
        )
        page.evaluate("() => document.getElementById('player').pause()")
        # The file view: a click at 90% of the timeline plays from the last segment starting before there.
        page.click("#results li.result >> nth=0 >> button.name")
        page.wait_for_selector("#file-view:not([hidden])")
        box = page.locator("#fv-timeline").bounding_box()
        page.mouse.click(box["x"] + 0.9 * box["width"], box["y"] + box["height"] / 2)
        at = max(s for s in starts if s <= 0.9 * library.item(first["row"])["duration"])
        # Reached within 3 s of a segment starting later than that: playing from 0 could not get there.
        assert at > 3.5
        page.wait_for_function(
            "(t) => { const p = document.getElementById('player'); return !p.paused && p.currentTime >= t; }",
            arg=at,
            timeout=3000,
        )
        assert page.evaluate("() => document.getElementById('player').currentTime") < at + 5
        assert not errors, errors
