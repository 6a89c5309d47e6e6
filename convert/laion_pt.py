"""Runnable entry point: `python convert/laion_pt.py --help`.

The converter lives in `mlx_clap.convert.laion_pt`.
"""

from mlx_clap.convert.laion_pt import main

if __name__ == "__main__":
    main()
