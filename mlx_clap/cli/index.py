"""`mlx-clap index STORE`: build or refresh the approximate-search (usearch HNSW) index of a store.

Building takes minutes per million vectors, so it is an explicit step with a progress bar; `search`
only uses the index it leaves (never builds one).
"""

from __future__ import annotations

from pathlib import Path

import click

from mlx_clap.cli.output import printable


@click.command("index")
@click.argument("store_path", metavar="STORE", type=click.Path(file_okay=False, path_type=Path))
@click.option("--rebuild", is_flag=True, help="Build from scratch even when the saved index is up to date.")
@click.option(
    "--connectivity", type=click.IntRange(2, 256), default=16, show_default=True, help="HNSW edges per node."
)
@click.option(
    "--expansion-add",
    type=click.IntRange(1, 4096),
    default=128,
    show_default=True,
    help="HNSW search width while building (higher: better recall, slower build).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def index(store_path: Path, rebuild: bool, connectivity: int, expansion_add: int, quiet: bool) -> None:
    """Build or refresh STORE's ANN index (STORE/ann.usearch + ann.json) for `search --backend ann`.

    Resumable: an up-to-date index is left alone, rows appended since the last build are added to it,
    and any other change rebuilds it. Saves are atomic, and a long build saves a checkpoint every two
    minutes: after Ctrl-C, run the same command again to go on from there. ANN answers are
    approximate: on vectors without cluster structure recall can be low, so `search` stays exact
    (flat) below 1M vectors unless --backend ann is given. Needs the `ann` extra
    (pip install usearch, or pip install -e '.[ann]' in the mlx-clap checkout).

    \b
    Example:
      mlx-clap index vectors/
      mlx-clap search vectors/ --text "a dog barking" --backend ann
    """
    from mlx_clap.cli.stores import VectorProgress, open_store
    from mlx_clap.search.index import AnnIndex, SearchError

    store = open_store(store_path)
    before = "missing" if rebuild else AnnIndex.status(store)
    progress = VectorProgress("index", quiet)
    try:
        ann = AnnIndex.open(
            store,
            rebuild=rebuild,
            connectivity=connectivity,
            expansion_add=expansion_add,
            progress=None if quiet else (lambda m: click.echo(printable(m), err=True)),
            on_rows=progress,
        )
    except SearchError as exc:
        raise click.ClickException(f"{printable(store_path)}: {exc}") from exc
    finally:
        progress.close()
    graph = AnnIndex.paths(store)[0]
    if AnnIndex.status(store) != "current":
        raise click.ClickException(f"{printable(store_path)}: the index could not be saved next to the store")
    if not ann.built_now:
        click.echo(f"{printable(graph)}: up to date ({len(store)} vectors); nothing to do", err=True)
    else:
        verb = {"stale": "updated", "partial": "finished (resumed)"}.get(before, "built")
        click.echo(f"{printable(graph)}: {verb}, {len(ann.index)} vectors", err=True)
