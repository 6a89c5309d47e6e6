"""The `mlx-clap` command: a click group whose subcommands live in their own modules.

Each subcommand module is imported only when that command runs, so `mlx-clap --help` stays fast.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from mlx_clap.cli.output import INTERRUPTED_MESSAGE, INTERRUPTED_STATUS, exit_interrupted

_IN_COMMAND = False  # set while the command itself runs (LazyGroup.invoke)
_INTERRUPTED = False  # set by a Ctrl-C during the command (_on_sigint)


def _in_import(frame: Any) -> bool:
    """Whether Python is importing a module (the import machinery is on the stack)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _on_sigint(signum: int, frame: Any) -> None:
    """Ctrl-C in the command: KeyboardInterrupt, so it can keep what it wrote and say so (embed), then
    LazyGroup.invoke exits with 130. Before or after it, or during an import: leave at once.

    An exception raised inside an import can surface as something else (MLX's extension turns it into
    "ImportError: Encountered an error while initializing the extension"), hence no exception there.
    One handler for the whole process, switched by a flag: installing handlers while the command runs
    would leave moments where a Ctrl-C meets the wrong one."""
    global _INTERRUPTED
    if _IN_COMMAND and not _in_import(frame):
        _INTERRUPTED = True
        raise KeyboardInterrupt
    exit_interrupted(INTERRUPTED_MESSAGE if _IN_COMMAND else "interrupted")


def _started_as_command() -> bool:
    """True when this process is `mlx-clap` / `python -m mlx_clap.cli`, not a program importing us
    (while `-m` imports the package, sys.argv[0] is "-m"; later it is the __main__.py path)."""
    arg0 = sys.argv[0] if sys.argv else ""
    return os.path.basename(arg0) in ("mlx-clap", "-m") or arg0.endswith(os.path.join("cli", "__main__.py"))


_COMMAND_PROCESS = _started_as_command()


def _is_command_process() -> bool:
    return _COMMAND_PROCESS


# Installed before the heavy imports, so a Ctrl-C during them gives status 130 and no traceback.
if _COMMAND_PROCESS and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _on_sigint)

import importlib  # noqa: E402

import click  # noqa: E402

# command name -> (module, attribute)
COMMANDS = {
    "embed": ("mlx_clap.cli.embed", "embed"),
    "embed-text": ("mlx_clap.cli.embed", "embed_text"),
    "info": ("mlx_clap.cli.embed", "info"),
    "convert": ("mlx_clap.cli.convert", "convert"),
    "random-model": ("mlx_clap.cli.random_model", "random_model"),
    "search": ("mlx_clap.cli.search", "search"),
    "dedupe": ("mlx_clap.cli.search", "dedupe"),
    "cluster": ("mlx_clap.cli.search", "cluster"),
    "classify": ("mlx_clap.cli.search", "classify"),
    "index": ("mlx_clap.cli.index", "index"),
    "check": ("mlx_clap.cli.check", "check"),
    "export": ("mlx_clap.cli.export", "export"),
    "timeline": ("mlx_clap.cli.segments", "timeline"),
    "recurring": ("mlx_clap.cli.segments", "recurring"),
    "serve": ("mlx_clap.cli.serve", "serve"),
}


class LazyGroup(click.Group):
    def invoke(self, ctx: click.Context) -> object:
        """Run the command; in the `mlx-clap` process a Ctrl-C anywhere in it exits with status 130 and
        one clean message.

        The exit goes through os._exit (mlx_clap.cli.output.exit_interrupted): a normal interpreter
        exit with MLX threads alive can abort with SIGABRT.
        """
        global _IN_COMMAND
        try:
            _IN_COMMAND = True
            return super().invoke(ctx)
        except KeyboardInterrupt:
            _IN_COMMAND = False  # a second Ctrl-C now only repeats the clean exit
            if not _COMMAND_PROCESS:
                raise  # called from Python (tests, scripts): leave the process to its owner
            exit_interrupted()
        except SystemExit as exc:
            _IN_COMMAND = False
            if exc.code == INTERRUPTED_STATUS and _COMMAND_PROCESS:  # the command printed why already
                exit_interrupted(None)
            raise
        except Exception:
            # A library that runs our Python inside its own code can hand the KeyboardInterrupt back as
            # its own error (pyarrow/Lance: "ArrowInvalid: External error: KeyboardInterrupt"). After a
            # Ctrl-C, whatever comes up is that interrupt: the same clean exit.
            _IN_COMMAND = False
            if _INTERRUPTED and _COMMAND_PROCESS:
                exit_interrupted()
            raise
        finally:
            _IN_COMMAND = False
        return None

    def main(self, *args: object, **kwargs: object) -> object:
        """As click's main; in the `mlx-clap` process itself the exit then skips interpreter teardown.

        Python's finalization puts the default SIGINT handler back (a Ctrl-C there kills the process
        with a traceback-less -2) and tears down MLX's threads (which can abort); the output is flushed
        and the process leaves through os._exit with the command's status instead.
        """
        if not _is_command_process():
            return super().main(*args, **kwargs)  # type: ignore[arg-type]
        try:
            super().main(*args, **kwargs)  # type: ignore[arg-type]
            code: object = 0
        except SystemExit as exc:
            code = exc.code
        except KeyboardInterrupt:  # only reachable under a handler other than ours
            exit_interrupted()
        if code is not None and not isinstance(code, int):
            sys.stderr.write(f"{code}\n")
            code = 1
        exit_interrupted(None, status=code or 0)
        return None

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
