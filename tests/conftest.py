"""Shared pytest setup: offline hub, deterministic threads, and fixtures built once per session."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

# Without HF_HUB_OFFLINE the reference libraries retry the network for minutes.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TESTS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS_DIR))
REPO_ROOT = TESTS_DIR.parent
SHARED_DIR = REPO_ROOT.parent / "shared"
# Real-world audio corpus (not part of the repository): $MLX_CLAP_TEST_CORPUS, by default ../shared/corpus
# beside the checkout; a relative path is taken from the repository root. Tests that need it skip, with
# the path they looked at, when it is absent.
_corpus = os.environ.get("MLX_CLAP_TEST_CORPUS") or "../shared/corpus"
CORPUS_DIR = (REPO_ROOT / os.path.expanduser(_corpus)).resolve()


# Reference implementations and other test-only packages (pip install -e '.[test]'; laion_clap and msclap
# with --no-deps): in an environment without one, the tests that need it skip and say which, instead of
# erroring. Test modules that import one at module level guard that import with pytest.importorskip; the
# hooks below cover imports inside tests and fixtures. Only packages missing at session start count, so
# with everything installed an import error (or a test that hides a module) still fails as before.
TEST_ONLY_PACKAGES = (
    "torch", "transformers", "laion_clap", "msclap", "torchlibrosa", "librosa",
    "h5py", "sklearn", "ftfy", "regex", "usearch",
)  # fmt: skip
MISSING_TEST_PACKAGES = frozenset(n for n in TEST_ONLY_PACKAGES if importlib.util.find_spec(n) is None)


def _skip_if_missing_test_package(exc: ModuleNotFoundError) -> None:
    root = (exc.name or "").partition(".")[0]
    if root in MISSING_TEST_PACKAGES:
        pytest.skip(f"{root} is not installed (a test requirement: pip install -e '.[test]'): {exc}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    try:
        return (yield)
    except ModuleNotFoundError as exc:
        _skip_if_missing_test_package(exc)
        raise


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    try:
        return (yield)
    except ModuleNotFoundError as exc:
        _skip_if_missing_test_package(exc)
        raise


@pytest.fixture(autouse=True)
def _fresh_settings():
    """Each test parses MLX_CLAP_* anew (mlx_clap.settings keeps the parsed object for the process)."""
    from mlx_clap import settings

    settings.reset()
    yield
    settings.reset()
