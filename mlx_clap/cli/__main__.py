"""`python -m mlx_clap.cli`: the same as the `mlx-clap` command."""

from mlx_clap.cli import main

main()
