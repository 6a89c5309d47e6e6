"""Runnable entry point: `python convert/hf.py --help`. The converter lives in `mlx_clap.convert.hf`."""

from mlx_clap.convert.hf import main

if __name__ == "__main__":
    main()
