"""`mlx-clap index STORE`: build or bring up to date the store's own Lance vector index (IVF_RQ).

Training takes 2-5 minutes per million 512-d vectors on 2 shared CPU cores (docs/performance.md), so
it is an explicit step with a progress bar; `search`, `serve` and `timeline` use the index it leaves
(and never build one).
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

import click

from mlx_clap.cli.output import INTERRUPTED_STATUS, printable
from mlx_clap.cli.targets import STORE


@click.command("index")
@click.argument("store_path", metavar="STORE", type=STORE)
@click.option("--rebuild", is_flag=True, help="Train the index again even when it covers the store.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def index(store_path: Path, rebuild: bool, quiet: bool) -> None:
    """Build or update STORE's vector index (Lance IVF_RQ, inside the dataset) for `search`.

    One index covers file and segment vectors; a search keeps to the kind it asks for. Running it
    again does nothing when the index covers every row; after `embed` appended rows it adds them to
    the index in seconds (the partitions trained before are kept: --rebuild trains again, e.g. after
    the collection changed a lot). Rows appended and not yet indexed are still found: searches score
    them exactly and merge them in. The index is committed atomically as a new store version: Ctrl-C
    or a kill leaves the store as it was, and the same command starts again.

    \b
    Example:
      mlx-clap index vectors/
      mlx-clap search vectors/ --text "a dog barking"          # uses the index (says so on stderr)
      mlx-clap search vectors/ --text "a dog barking" --backend flat   # exact, every vector scored
    """
    from mlx_clap.cli.stores import open_store
    from mlx_clap.search.index import SearchError
    from mlx_clap.search.lance_index import build_index
    from mlx_clap.store import Store, StoreError

    open_store(store_path)  # the usual one-line errors: no store, an old format, empty
    try:
        writer = Store.open(store_path, write=True)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from exc
    bars: dict[str, Any] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if quiet:
            return
        from tqdm import tqdm

        bar = bars.get(stage)
        if bar is None:
            for old in bars.values():
                old.close()
            bar = bars[stage] = tqdm(total=total, desc=f"index: {stage}", file=sys.stderr, leave=False)
        bar.update(done - bar.n)

    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["report"] = build_index(writer, rebuild=rebuild, progress=progress)
        except BaseException as exc:  # handed to the main thread
            outcome["error"] = exc

    # Lance trains in native code, where a Ctrl-C would wait for the whole build: the main thread waits
    # here instead, so the signal is handled at once (nothing is committed until Lance's last step).
    worker = threading.Thread(target=work, name="lance-index", daemon=True)
    try:
        worker.start()
        while worker.is_alive():
            worker.join(0.2)
    except KeyboardInterrupt:
        click.echo(
            f"interrupted: {printable(store_path)} keeps its last committed version (an index is committed "
            "whole or not at all); run the same command again",
            err=True,
        )
        sys.exit(INTERRUPTED_STATUS)
    finally:
        for bar in bars.values():
            bar.close()
        if not worker.is_alive():
            writer.close()
    error = outcome.get("error")
    if isinstance(error, (SearchError, StoreError)):
        raise click.ClickException(str(error)) from error
    if error is not None:
        raise error
    report = outcome["report"]
    cov = report.coverage
    where = printable(store_path)
    if report.action == "none":
        segments = " and their segments" if writer.has_segments else ""
        click.echo(
            f"{where}: the {cov.index_type} index covers all {cov.total:,} file rows{segments}; "
            "nothing to do (--rebuild trains it again)",
            err=True,
        )
        return
    verb = "built" if report.action == "built" else "updated (appended rows added)"
    click.echo(
        f"{where}: {cov.index_type} index {verb} in {report.seconds:.1f} s; "
        f"covers {cov.indexed:,} of {cov.total:,} file rows",
        err=True,
    )
