"""`mlx-clap serve STORE`: a local web page to search, listen to, map and clean a sound library.

The model the store was embedded with is loaded once and kept warm; the page and its assets come
from the package (no network needed). Binds to 127.0.0.1 unless told otherwise, and a bind that other
machines can reach needs --allow-remote (see mlx_clap/serve/security.py for what protects the API).
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import click

from mlx_clap.cli.common import trust_pickle_option
from mlx_clap.cli.output import printable
from mlx_clap.cli.stores import (
    embed_settings,
    load_store_model,
    open_store,
    store_model_option,
    store_override,
)

DEFAULT_PORT = 8765


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free one); ClickException naming the cause."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise click.ClickException(f"--host {host}: cannot resolve it ({exc.strerror})") from exc
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        hint = "; choose another with --port (0 picks a free one)" if exc.errno == errno.EADDRINUSE else ""
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint}") from exc
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def page_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    shown = f"[{shown}]" if ":" in shown and not shown.startswith("[") else shown
    return f"http://{shown}:{port}/"


@click.command()
@click.argument("store_path", metavar="STORE", type=click.Path(file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True, help="0: any free port."
)
@click.option(
    "--allow-remote",
    is_flag=True,
    help="Allow a --host other machines can reach (0.0.0.0, a LAN address). Anyone who can reach it can "
    "search the store and play every file in it.",
)
@click.option(
    "--max-upload-mb",
    type=click.IntRange(1, 2048),
    default=50,
    show_default=True,
    help="Largest reference sound that can be dropped on the page.",
)
@click.option("--open", "open_browser", is_flag=True, help="Open the page in the default web browser.")
@store_model_option
@trust_pickle_option
def serve(
    store_path: Path,
    host: str,
    port: int,
    allow_remote: bool,
    max_upload_mb: int,
    open_browser: bool,
    model: str | None,
    trust_pickle: bool = False,
) -> None:
    """Serve a local web page to search, listen to, map and clean a sound library.

    The page: text search and a drop zone for a reference sound (most similar first), results with a
    waveform, score, duration, play and "more like this"; segments and a per-file timeline when the
    store has them; a 2-D map of the library (hover to hear, click to open; cached as STORE/map.json);
    near-duplicate groups side by side. Audio is served only for files that are rows of the store.
    Needs the `serve` extra: pip install 'mlx-clap[serve]'.

    \b
    Example:
      mlx-clap serve vectors/                 # then open http://127.0.0.1:8765/
      mlx-clap serve vectors/ --port 0 --open
    """
    from mlx_clap.serve.security import allowed_hosts, is_loopback

    if not is_loopback(host) and not allow_remote:
        raise click.UsageError(
            f"--host {host} can be reached from other machines; add --allow-remote if that is what you "
            "want (anyone who reaches it can search the store and play its files)"
        )
    try:
        import uvicorn

        from mlx_clap.serve.app import create_app
        from mlx_clap.serve.engine import Library, freeze_loaded
    except ImportError as exc:
        raise click.ClickException(
            f"serve needs the web server packages ({exc.name} is missing): pip install 'mlx-clap[serve]'"
        ) from exc
    # The port first: a busy one is said at once, not after the model has loaded.
    sock = bind_socket(host, port)
    try:
        store = open_store(store_path)
        clap = load_store_model(store, store_override(store, model), trust_pickle=trust_pickle)
        library = Library(store, clap, audio_options=embed_settings(store.manifest))
        library.warm()
    except BaseException:
        sock.close()
        raise
    freeze_loaded()
    app = create_app(library, hosts=allowed_hosts(host), max_upload=max_upload_mb * 1024 * 1024)
    bound = sock.getsockname()[1]
    url = page_url(host, bound)
    if not is_loopback(host):
        click.echo(
            f"warning: listening on {host}: anyone who can reach this machine on port {bound} "
            "can search the store and play every file in it",
            err=True,
        )
    click.echo(f"mlx-clap serve: {printable(str(store_path))} ({len(store)} files) at {url}  (Ctrl-C stops)")
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])
