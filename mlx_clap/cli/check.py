"""`mlx-clap check STORE [--repair] [--json]`: verify every vector and item line of a store."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click


def _print_report(report: dict) -> None:
    click.echo(f"{report['store']}: {report['items']} items")
    for b in report["bad_lines"]:
        click.echo(f"  bad items line {b['line']}: {b['cause']}")
    for d in report["damaged_rows"][:50]:
        click.echo(f"  damaged row {d['row']} ({d['path']}): {d['cause']}")
    if len(report["damaged_rows"]) > 50:
        click.echo(f"  ... and {len(report['damaged_rows']) - 50} more damaged rows")
    if report["orphan_rows"]:
        click.echo(
            f"  {report['orphan_rows']} orphan shard row(s) without an item "
            "(harmless; overwritten by the next embed)"
        )
    for n in report["notes"]:
        click.echo(f"  note: {n}")
    if report.get("repaired"):
        click.echo(f"  repaired: removed {report['removed_rows']} row(s); rerun embed to redo those files")
    else:
        click.echo("  ok" if report["ok"] else "  DAMAGED (mlx-clap check STORE --repair removes these rows)")


@click.command()
@click.argument("store_path", metavar="STORE", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--repair",
    is_flag=True,
    help="Remove the damaged rows and bad item lines (rerun embed to redo those files).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check(store_path: Path, repair: bool, as_json: bool) -> None:
    """Verify a store: every row against its checksum (and for NaN/Inf, unit length), every items.jsonl
    line, and orphan shard rows.

    Exit status 0 when the store is sound (or was repaired), 1 when damage was found and not repaired.
    --repair removes the damaged rows' items in steps that each leave a valid store, under the store's
    writer lock; a following `mlx-clap embed` with the same inputs embeds those files again. A store
    from an older mlx-clap (no checksums) gets them recorded by --repair.

    \b
    Example:
      mlx-clap check vectors/
      mlx-clap check vectors/ --repair && mlx-clap embed ~/Sounds -r --out vectors/
    """
    from mlx_clap.search.store import StoreError, check_store, repair_store

    try:
        report = check_store(store_path)
        removed = repair_store(store_path, report) if repair else 0
    except StoreError as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:
        raise click.ClickException(
            f"{store_path}: cannot {'repair' if repair else 'read'} the store ({exc})"
        ) from exc
    if repair:
        report = {**report, "repaired": True, "removed_rows": removed}
    if as_json:
        click.echo(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        _print_report(report)
    if not report["ok"] and not repair:
        sys.exit(1)
