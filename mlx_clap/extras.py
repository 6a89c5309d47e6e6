"""What to install for an optional feature, said as a command that works.

mlx-clap is installed from a checkout (it is not on PyPI), so installing `mlx-clap[ann]` by name fails
anywhere but inside one. A hint names the extra's own packages, which pip finds everywhere, with the
versions pyproject.toml declares (read back from the installed metadata, so the two never disagree),
and the checkout form beside it.
"""

from __future__ import annotations

import re
from importlib import metadata

# Used when the package metadata cannot be read (running from a source tree without an install).
FALLBACK = {
    "ann": ["usearch>=2.9"],
    "convert": ["torch==2.13.0"],
    "parquet": ["pyarrow>=14"],
    "serve": ["starlette>=1.5.1", "uvicorn>=0.29", "pacmap>=0.9"],
}


def extra_requirements(extra: str) -> list[str]:
    """The requirement strings of one optional extra, e.g. ["usearch>=2.9"] for "ann"."""
    try:
        declared = metadata.requires("mlx-clap") or []
    except metadata.PackageNotFoundError:
        declared = []
    marker = re.compile(r"""^\s*(?P<req>[^;]+?)\s*;\s*extra\s*==\s*["'](?P<extra>[^"']+)["']\s*$""")
    found = [m["req"] for line in declared if (m := marker.match(line)) and m["extra"] == extra]
    return found or FALLBACK.get(extra, [])


def install_hint(extra: str) -> str:
    """`pip install 'usearch>=2.9'` (or `pip install -e '.[ann]'` in the mlx-clap checkout)."""
    packages = " ".join(f"'{r}'" for r in extra_requirements(extra))
    return f"pip install {packages} (or `pip install -e '.[{extra}]'` in the mlx-clap checkout)"


__all__ = ["extra_requirements", "install_hint"]
