"""`mlx-clap serve STORE`: a local web page to search, listen to, map and clean a sound library.

The model the store was embedded with is loaded once and kept warm; the page and its assets come
from the package (no network needed). Binds to 127.0.0.1 unless told otherwise, and a bind that other
machines can reach needs --allow-remote and a token the user brings (see mlx_clap/serve/security.py
for what protects the API). Only files inside the library folders the store records are played.
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path
from typing import TYPE_CHECKING

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
from mlx_clap.cli.targets import STORE
from mlx_clap.extras import install_hint

if TYPE_CHECKING:
    from mlx_clap.serve.media import RowFiles

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


def page_url(host: str, port: int, token: str | None = None) -> str:
    """The page's address; with `token`, in the fragment (#token=...), which browsers never send."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    shown = f"[{shown}]" if ":" in shown and not shown.startswith("[") else shown
    return f"http://{shown}:{port}/" + (f"#token={token}" if token else "")


def describe_library(store_path: Path, files: RowFiles) -> list[str]:
    """What the page will and will not play, said at startup (`files`: the app's `media.RowFiles`)."""
    where = printable(str(store_path))
    if not files.has_roots:
        return [
            f"note: {where} records no library folders (it was made before mlx-clap recorded them): its "
            "files will not play; run `mlx-clap embed` over the library once more to record them "
            "(nothing is embedded again)"
        ]
    lines = []
    if files.refused:
        lines.append(
            f"warning: {len(files.refused)} row(s) of {where} name files outside its library folders or "
            f"without an audio suffix; they will not play (`mlx-clap check {where}` lists them)"
        )
    more = f" and {len(files.roots) - 5} more" if len(files.roots) > 5 else ""
    lines.append("plays files under: " + ", ".join(printable(r) for r in files.roots[:5]) + more)
    return lines


@click.command()
@click.argument("store_path", metavar="STORE", type=STORE)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True, help="0: any free port."
)
@click.option(
    "--allow-remote",
    is_flag=True,
    help="Allow a --host other machines can reach (0.0.0.0, a LAN address). The page then asks for the "
    "token (--token, or one printed here in the URL to open); whoever has it can search the store and "
    "play its files. Plain HTTP: use it on a network you trust.",
)
@click.option(
    "--token",
    envvar="MLX_CLAP_SERVE_TOKEN",
    show_envvar=True,
    help="The access token with --allow-remote (at least 16 letters, digits, - . _ ~); default: a random "
    "one, printed in the URL to open.",
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
    token: str | None = None,
    trust_pickle: bool = False,
) -> None:
    """Serve a local web page to search, listen to, map and clean a sound library.

    The page: text search and a drop zone for a reference sound (most similar first), results with a
    waveform, score, duration, play and "more like this"; segments and a per-file timeline when the
    store has them; a 2-D map of the library (hover to hear, click to open; cached as STORE/map.json);
    near-duplicate groups side by side. Audio is served only for files that are rows of the store.
    Needs the `serve` extra: pip install starlette uvicorn (or pip install -e '.[serve]' in the checkout).

    \b
    Example:
      mlx-clap serve vectors/                 # then open http://127.0.0.1:8765/
      mlx-clap serve vectors/ --port 0 --open
      mlx-clap serve vectors/ --host 0.0.0.0 --allow-remote   # open the URL it prints, #token=... included
    """
    from mlx_clap.serve.security import allowed_hosts, is_loopback, new_token, token_problem

    remote = not is_loopback(host)
    if remote and not allow_remote:
        raise click.UsageError(
            f"--host {host} can be reached from other machines; add --allow-remote if that is what you "
            "want (anyone with the token it prints can search the store and play its files)"
        )
    if token is not None and token_problem(token):
        raise click.UsageError(f"--token (or MLX_CLAP_SERVE_TOKEN) {token_problem(token)}")
    try:
        import uvicorn

        from mlx_clap.serve.app import create_app
        from mlx_clap.serve.engine import Library, freeze_loaded
    except ImportError as exc:
        raise click.ClickException(
            f"serve needs the web server packages ({exc.name} is missing): {install_hint('serve')}"
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
    given = token is not None
    token = token or new_token()
    app = create_app(
        library, token=token, hosts=allowed_hosts(host), max_upload=max_upload_mb * 1024 * 1024, remote=remote
    )
    for line in describe_library(store_path, app.state.files):
        click.echo(line, err=True)
    bound = sock.getsockname()[1]
    # Remote: the token is handed out here only, never by the page; a token the user chose is not echoed.
    url = page_url(host, bound, token if remote and not given else None)
    if remote:
        click.echo(
            f"warning: listening on {host}: whoever reaches port {bound} with the token can search the store "
            "and play its files; the traffic is not encrypted",
            err=True,
        )
        if given:
            click.echo(
                "the page asks for the token given with --token (or add #token=... to the URL)", err=True
            )
    click.echo(f"mlx-clap serve: {printable(str(store_path))} ({len(store)} files) at {url}  (Ctrl-C stops)")
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])
