"""`mlx-clap check STORE [--repair] [--json]`: verify every row and fragment of a store, and that
every row names a file `serve` may read (inside the library folders the store records)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from mlx_clap.cli.output import printable
from mlx_clap.cli.targets import STORE


def _print_report(report: dict) -> None:
    click.echo(f"{report['store']}: {report['items']} items")
    for f in report.get("damaged_fragments", []):
        click.echo(f"  damaged fragment {f.get('fragment')}: {f.get('cause')}")
    for d in report["damaged_rows"][:50]:
        kind = "segment" if d.get("kind") == "segment" else "row"
        click.echo(f"  damaged {kind} ({printable(str(d['path']))}): {d['cause']}")
    if len(report["damaged_rows"]) > 50:
        click.echo(f"  ... and {len(report['damaged_rows']) - 50} more damaged rows")
    for n in report["notes"]:
        click.echo(f"  note: {n}")
    roots = report.get("library_roots")
    if roots:
        click.echo(f"  library folders: {', '.join(printable(r) for r in roots)}")
    unsafe = report.get("unsafe_rows", [])
    for u in unsafe[:50]:
        click.echo(f"  unsafe row {u['row']} ({printable(str(u['path']))}): {u['cause']}")
    if len(unsafe) > 50:
        click.echo(f"  ... and {len(unsafe) - 50} more unsafe rows")
    if report.get("repaired"):
        click.echo(f"  repaired: removed {report['removed_rows']} row(s); rerun embed to redo those files")
    elif not report["ok"]:
        click.echo("  DAMAGED (mlx-clap check STORE --repair removes these rows)")
    elif not unsafe:
        click.echo("  ok")
    if unsafe:
        click.echo(
            "  UNSAFE: rows name files outside the store's library folders or that are not audio; "
            "`mlx-clap serve` will not play them (a store from elsewhere? embed your own library instead)"
        )


@click.command()
@click.argument("store_path", metavar="STORE", type=STORE)
@click.option(
    "--repair",
    is_flag=True,
    help="Remove the damaged rows and bad item lines (rerun embed to redo those files).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check(store_path: Path, repair: bool, as_json: bool) -> None:
    """Verify a store: every row against its checksum (and for NaN/Inf, unit length), every data fragment,
    segment rows without a file row, and rows whose file changed or is gone since (listed, not damage).

    Rows that name a file outside the library folders the store records (a relative path, a file that is
    not audio, /etc/passwd in a store received from elsewhere) are listed as unsafe; --repair leaves them.

    Exit status 0 when the store is sound (or was repaired), 1 when damage was found and not repaired,
    or when a row is unsafe.
    --repair removes every row of a file with a damaged row, and unreadable fragments whole, in one
    commit under the store's writer lock; a following `mlx-clap embed` with the same inputs embeds those
    files again. A store from an older mlx-clap is converted by the next `mlx-clap embed ... --out STORE`.

    \b
    Example:
      mlx-clap check vectors/
      mlx-clap check vectors/ --repair && mlx-clap embed ~/Sounds -r --out vectors/
    """
    from mlx_clap.search.roots import check_rows
    from mlx_clap.store import StoreError, check_store, repair_store

    try:
        report = check_store(store_path)
        removed = repair_store(store_path, report) if repair else 0
        try:
            scope = check_rows(store_path)
        except StoreError as exc:  # damage that keeps the store from opening: the report above names it
            scope = {
                "library_roots": None,
                "unsafe_rows": [],
                "notes": [f"library folders not checked: {exc}"],
            }
    except StoreError as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:
        raise click.ClickException(
            f"{store_path}: cannot {'repair' if repair else 'read'} the store ({exc})"
        ) from exc
    if repair:
        report = {**report, "repaired": True, "removed_rows": removed}
    report = {
        **report,
        "library_roots": scope["library_roots"],
        "unsafe_rows": scope["unsafe_rows"],
        "notes": report["notes"] + scope["notes"],
    }
    if as_json:
        click.echo(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        _print_report(report)
    if (not report["ok"] and not repair) or report["unsafe_rows"]:
        sys.exit(1)
