"""The `mlx-clap` command: a click group whose subcommands live in their own modules.

Each subcommand module is imported only when that command runs, so `mlx-clap --help` stays fast.
"""

from __future__ import annotations

import importlib

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
    envvar="MLX_CLAP_CPU_THREADS",
    show_envvar=True,
    help="CPU threads for the model (MLX worker threads and OpenBLAS); default: every core (at most 8).",
)
def main(threads: int | None) -> None:
    """CLAP audio and text embeddings in MLX.

    \b
    Example:
      mlx-clap embed ~/Sounds --recursive --out vectors/
      mlx-clap --threads 1 embed clips/ --out vectors/   # leave the other cores free

    \b
    Environment (parsed once; `mlx-clap info` shows what is in force):
      MLX_CLAP_MODEL               default model of every command (laion/clap-htsat-unfused)
      MLX_CLAP_CACHE               converted-model cache (~/.cache/mlx-clap)
      MLX_CLAP_CPU_OPTIMIZATIONS   off: run the CPU exactly as Metal/CUDA run (no CPU-only paths)
      MLX_CLAP_CPU_KERNELS         off: MLX's own GELU/softmax/attention on the CPU
      MLX_CLAP_BLAS                auto, off or a CBLAS library path (Linux CPU)
      MLX_CLAP_BLAS_THREADS        OpenBLAS thread cap
      MLX_CLAP_MALLOC              tune (default on a Linux CPU) or off
      MLX_CLAP_VERBOSE             1: print the BLAS choice
    """
    from mlx_clap import settings

    try:
        current = settings.current()
    except settings.SettingsError as exc:
        raise click.ClickException(str(exc)) from exc
    if threads is not None and threads != current.cpu_threads:
        settings.configure(cpu_threads=threads, blas_threads=threads)
    elif threads is not None:
        settings.configure(blas_threads=threads)
    # The command owns its process: BLAS rebinding and malloc tuning (mlx_clap.ops.setup) apply now.
    # With the tower and the frontend on worker threads, keeping freed memory in glibc's heap saves each
    # thread's arena from mapping and faulting its big blocks afresh (`mlx-clap embed` of 48 short files:
    # 7.3-7.8 s -> 6.7-6.9 s, docs/performance.md). MLX_CLAP_MALLOC=off opts out.
    from mlx_clap.ops.setup import prepare_cpu

    prepare_cpu()


if __name__ == "__main__":
    main()
