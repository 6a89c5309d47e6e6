"""Install hints name commands that work: mlx-clap is not on PyPI, so `pip install 'mlx-clap[x]'` fails
outside a checkout. Hints list the extra's own packages, as pyproject.toml declares them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

from mlx_clap.extras import FALLBACK, extra_requirements, install_hint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


@pytest.mark.parametrize("extra", sorted(FALLBACK))
def test_hint_lists_the_packages_pyproject_declares(extra):
    declared = [re.sub(r"\s*#.*$", "", r).strip() for r in EXTRAS[extra]]
    assert sorted(r.replace(" ", "") for r in extra_requirements(extra)) == sorted(
        r.replace(" ", "") for r in declared
    )
    hint = install_hint(extra)
    assert "mlx-clap[" not in hint and f"-e '.[{extra}]'" in hint
    assert all(f"'{r}'" in hint for r in extra_requirements(extra)), hint


def test_no_message_or_readme_line_says_install_mlx_clap_from_pypi():
    offenders = []
    for path in [ROOT / "README.md", *sorted((ROOT / "mlx_clap").rglob("*.py"))]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"pip install ['\"]?mlx-clap\[", line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
