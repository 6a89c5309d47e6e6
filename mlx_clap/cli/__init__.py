"""The `mlx-clap` command: a click group whose subcommands live in their own modules.

Each subcommand module is imported only when that command runs, so `mlx-clap --help` stays fast.
"""

from __future__ import annotations

import importlib
import os

import click

# command name -> (module, attribute)
COMMANDS = {
    "embed": ("mlx_clap.cli.embed", "embed"),
    "embed-text": ("mlx_clap.cli.embed", "embed_text"),
    "info": ("mlx_clap.cli.embed", "info"),
    "convert": ("mlx_clap.cli.convert", "convert"),
    "search": ("mlx_clap.cli.search", "search"),
    "dedupe": ("mlx_clap.cli.search", "dedupe"),
    "cluster": ("mlx_clap.cli.search", "cluster"),
    "classify": ("mlx_clap.cli.search", "classify"),
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
@click.option(
    "--threads",
    type=click.IntRange(1, 256),
    default=None,
    help="CPU threads for the model (MLX worker threads and OpenBLAS); default: every core. "
    "Same as MLX_CLAP_CPU_THREADS plus MLX_CLAP_BLAS_THREADS.",
)
def main(threads: int | None) -> None:
    """CLAP audio and text embeddings in MLX.

    \b
    Example:
      mlx-clap embed ~/Sounds --recursive --out vectors/
      mlx-clap --threads 1 embed clips/ --out vectors/   # leave the other cores free
    """
    if threads is not None:
        from mlx_clap.ops import parallel as cpu_parallel
        from mlx_clap.ops.blas import set_num_threads

        os.environ[cpu_parallel.THREADS_VAR] = str(threads)
        set_num_threads(threads)
    # The command owns its process, so it keeps freed memory in glibc's heap for MLX's next intermediates
    # (mlx_clap.ops.blas.tune_malloc): with the tower and the frontend on worker threads, each thread's arena
    # otherwise maps and faults its big blocks afresh. `mlx-clap embed` of 48 short files: 7.3-7.8 s ->
    # 6.7-6.9 s, peak RSS +20-60 MB (benchmarks/README.md). MLX_CLAP_MALLOC=off opts out.
    if os.environ.get("MLX_CLAP_MALLOC", "").strip().lower() != "off":
        from mlx_clap.ops.blas import tune_malloc

        tune_malloc()


if __name__ == "__main__":
    main()
