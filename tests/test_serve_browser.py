"""`mlx-clap serve` in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright.

The server runs on a free port in a thread, over a store of real 3-s sounds embedded with the tiny
random-init model. The browser types a query and sees one result row per file, plays a result (its
<audio> element's currentTime advances), drops a file on the drop zone and sees the same sound ranked
first, and draws the map with one point per file. The page is saved as a screenshot; with
MLX_CLAP_UPDATE_SCREENSHOT=1 it also replaces docs/serve.png, the README's picture (a plain test run
leaves the checkout as it was).
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

README_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "serve.png"
TIMEOUT_MS = 15_000


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
def chromium_page():
    """A page of headless Chromium and the list its script errors and console errors go to."""
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), args=["--autoplay-policy=no-user-gesture-required"]
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
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
        shot = tmp_path / "serve.png"
        page.screenshot(path=str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get("MLX_CLAP_UPDATE_SCREENSHOT") == "1":
            README_SCREENSHOT.parent.mkdir(exist_ok=True)
            shutil.copyfile(shot, README_SCREENSHOT)
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
