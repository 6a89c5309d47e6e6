"""The `mlx-clap` command: a click group whose subcommands live in their own modules.

Each subcommand module is imported only when that command runs, so `mlx-clap --help` stays fast.
"""

from __future__ import annotations

import importlib

import click

# command name -> (module, attribute)
COMMANDS = {
    "embed": ("mlx_clap.cli_embed", "embed"),
    "embed-text": ("mlx_clap.cli_embed", "embed_text"),
    "info": ("mlx_clap.cli_embed", "info"),
    "convert": ("mlx_clap.cli_convert", "convert"),
    "search": ("mlx_clap.cli_search", "search"),
    "dedupe": ("mlx_clap.cli_search", "dedupe"),
    "cluster": ("mlx_clap.cli_search", "cluster"),
    "classify": ("mlx_clap.cli_search", "classify"),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module_name, attr = COMMANDS[name]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                return None  # command not built yet
            raise
        return getattr(module, attr, None)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlx-clap")
def main() -> None:
    """CLAP audio and text embeddings in MLX.

    \b
    Example:
      mlx-clap embed ~/Sounds --recursive --out vectors/
    """


if __name__ == "__main__":
    main()
