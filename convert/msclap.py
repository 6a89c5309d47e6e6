"""Runnable entry point: `python convert/msclap.py --help`.

The converter lives in `mlx_clap.convert.msclap`.
"""

from mlx_clap.convert.msclap import main

if __name__ == "__main__":
    main()
