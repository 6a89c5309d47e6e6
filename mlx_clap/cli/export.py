"""`mlx-clap export STORE --to FORMAT OUT`: a store's vectors as JSON files, Parquet, or `.npy` + JSON lines.

The work is mlx_clap.search.export.export_store; this module maps its errors to clean messages, draws the
progress bar and prints the summary.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from mlx_clap.cli.output import INTERRUPTED_STATUS, printable
from mlx_clap.cli.targets import STORE

# Kept here (not imported) so `--help` does not load numpy; tests hold them equal to the library's.
FORMAT_CHOICES = ("json", "parquet", "npy")
LEVEL_CHOICES = ("file", "segment", "both")


@click.command("export")
@click.argument("store_path", metavar="STORE", type=STORE)
@click.argument("out", metavar="OUT", type=click.Path(path_type=Path))
@click.option(
    "--to",
    "fmt",
    type=click.Choice(FORMAT_CHOICES),
    required=True,
    help="json: one JSON per audio file in folder OUT; parquet: one file OUT (needs the `parquet` extra); "
    "npy: folder OUT with vectors.npy + index.jsonl (and segments.npy + segments.jsonl).",
)
@click.option(
    "--level",
    type=click.Choice(LEVEL_CHOICES),
    default=None,
    help="Rows per file, per segment or both (parquet, npy; json takes file or both). "
    "Default: both when the store has segments, else file.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace OUT when it is a previous mlx-clap export (never any other file or folder).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print a JSON summary (rows, files, segments, out, seconds)."
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def export(
    store_path: Path, out: Path, fmt: str, level: str | None, overwrite: bool, as_json: bool, quiet: bool
) -> None:
    """Write STORE's vectors to OUT for other tools (pandas, DuckDB, LanceDB, numpy, clip-retrieval).

    The export is built beside OUT and renamed into place when complete: a failure or Ctrl-C leaves
    OUT as it was. An existing OUT is refused unless --overwrite, which replaces only a previous
    export of ours. Vectors are float32 unit vectors (cosine similarity = dot product). Parquet and
    npy stream millions of rows in bounded memory; json writes a file per audio file (about a thousand
    a second), so it suits smaller stores.

    \b
    Example:
      mlx-clap export vectors/ --to parquet vectors.parquet
      mlx-clap export vectors/ --to npy vectors-npy/ --level file --json
      mlx-clap export vectors/ --to json vectors-json/ --overwrite
      python -c "import numpy as np; print(np.load('vectors-npy/vectors.npy').shape)"
    """
    from mlx_clap.cli.stores import VectorProgress, open_store
    from mlx_clap.search.export import ExportError, export_store

    store = open_store(store_path)
    progress = VectorProgress("export", quiet)
    try:
        summary = export_store(store, out, fmt, level=level, overwrite=overwrite, progress=progress)
    except ExportError as exc:
        raise click.ClickException(printable(exc)) from exc
    except KeyboardInterrupt:
        progress.close()  # end the bar first, so the message starts on a line of its own
        click.echo(f"interrupted: nothing was written ({printable(out)} is as it was)", err=True)
        sys.exit(INTERRUPTED_STATUS)  # the group then exits quietly: the message is said
    finally:
        progress.close()
    if as_json:
        click.echo(json.dumps(summary.to_dict(), sort_keys=True))
    else:
        seg = f", {summary.segments} segments" if summary.segments else ""
        click.echo(
            f"{printable(out)}: {summary.files} files{seg} ({summary.rows} vectors of dim {summary.dim}) "
            f"exported as {fmt} in {summary.seconds:.1f} s",
            err=True,
        )
