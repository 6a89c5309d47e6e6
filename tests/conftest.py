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
# with --no-deps). In an environment without one, the tests that need it skip and say which, instead of
# erroring: test modules that import one at module level guard that import with pytest.importorskip, and
# the hooks below turn a ModuleNotFoundError for one, raised inside a test or fixture, into a skip.
# Only packages missing at session start count (so a test that hides an installed module still fails),
# and only where the import failed in test code or a third-party package: mlx_clap itself must never let
# a ModuleNotFoundError for a test-only package out (it says which extra to install), so that still fails.
TEST_ONLY_PACKAGES = (
    "torch", "transformers", "laion_clap", "msclap", "torchlibrosa", "librosa",
    "h5py", "sklearn", "ftfy", "regex", "usearch",
)  # fmt: skip
MISSING_TEST_PACKAGES = frozenset(n for n in TEST_ONLY_PACKAGES if importlib.util.find_spec(n) is None)
_RUNTIME_DIRS = [Path(d).resolve() for d in importlib.util.find_spec("mlx_clap").submodule_search_locations]
# Tests that need a missing package where the failure cannot show it (a CLI turns the error into an exit
# status): node-id prefixes, skipped up front.
NEEDS: dict[str, tuple[str, ...]] = {}


def _install_hint(name: str) -> str:
    return f"{name} is not installed (a test requirement: pip install -e '.[test]')"


def pytest_collection_modifyitems(config, items):
    for item in items:
        for name, prefixes in NEEDS.items():
            node = item.nodeid.rsplit("/", 1)[-1]
            if name in MISSING_TEST_PACKAGES and node.startswith(prefixes):
                item.add_marker(pytest.mark.skip(reason=_install_hint(name)))


def _skip_if_missing_test_package(exc: ModuleNotFoundError) -> None:
    root = (exc.name or "").partition(".")[0]
    if root not in MISSING_TEST_PACKAGES:
        return
    tb, where = exc.__traceback__, None
    while tb is not None:  # the innermost frame that is not importlib's: the failing import statement
        if not tb.tb_frame.f_code.co_filename.startswith("<"):
            where = Path(tb.tb_frame.f_code.co_filename).resolve()
        tb = tb.tb_next
    if where is None or not any(where.is_relative_to(d) for d in _RUNTIME_DIRS):
        pytest.skip(f"{_install_hint(root)}: {exc}")


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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A converted random-init tiny model folder (full 512-d projections, small towers) with a trained
    BPE tokenizer: the model of the CLI and store tests, built once per session."""
    import mlx.core as mx
    from fixtures import TINY_AUDIO, TINY_TEXT, train_bpe_files

    from mlx_clap.config import ClapAudioConfig, ClapConfig, ClapTextConfig
    from mlx_clap.io.folder import save_converted
    from mlx_clap.models.clap import ClapModel

    folder = tmp_path_factory.mktemp("tiny_model")
    mx.random.seed(0)
    cfg = ClapConfig(
        audio_config=ClapAudioConfig.from_dict(TINY_AUDIO), text_config=ClapTextConfig.from_dict(TINY_TEXT)
    )
    save_converted(ClapModel(cfg), folder)
    train_bpe_files(folder)
    return folder
