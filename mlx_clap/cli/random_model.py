"""`mlx-clap random-model`: write a random-init model folder, to try every command offline."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mlx_clap.cli.convert import check_dest
from mlx_clap.cli.output import printable
from mlx_clap.convert.random_init import ARCHITECTURES


@click.command("random-model")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--arch",
    type=click.Choice(list(ARCHITECTURES)),
    default="htsat-tiny",
    show_default=True,
    help="Architecture: htsat-tiny (laion/clap-htsat-unfused's), htsat-tiny-fused, htsat-base "
    "(larger_clap_*), or toy (small towers, for tests and CI).",
)
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True, help="Random seed.")
@click.option(
    "--force",
    is_flag=True,
    help="Replace DEST if it is an earlier mlx-clap model folder (other non-empty folders are refused).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the manifest of the written folder as JSON.")
def random_model(dest: Path, arch: str, seed: int, force: bool, as_json: bool) -> None:
    """Write a model with RANDOM weights to DEST, in the layout `mlx-clap convert` writes.

    DEST gets the architecture's real config.json, model.safetensors, a roberta-base-sized tokenizer
    (50265 tokens, generated, not trained) and a manifest.json marked "random_weights": true. No
    download, torch or transformers is needed. Its vectors are meaningless, but every command runs on
    it: use it to try mlx-clap offline and to test the pipeline in CI.

    \b
    Example:
      mlx-clap random-model /tmp/clap-random
      mlx-clap embed clips/ --out vectors/ --model /tmp/clap-random
      mlx-clap search vectors/ --text "a dog barking" --model /tmp/clap-random
    """
    from mlx_clap.convert.random_init import write_random_model
    from mlx_clap.io.folder import MANIFEST_NAME, WeightsError

    check_dest(dest, force)
    try:
        out = write_random_model(dest, arch=arch, seed=seed)
    except (WeightsError, OSError) as exc:
        raise click.ClickException(f"{dest}: cannot write the model ({exc})") from exc
    if as_json:
        click.echo(json.dumps(json.loads((out / MANIFEST_NAME).read_text()), indent=2, sort_keys=True))
        return
    click.echo(f"wrote a random-init {arch} model (seed {seed}) -> {printable(out)}")
    click.echo("  weights are RANDOM: the vectors mean nothing, but every command works on it")
    click.echo(f"  try: mlx-clap info --model {printable(out)}")
