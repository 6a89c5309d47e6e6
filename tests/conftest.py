"""Shared pytest setup: offline hub, deterministic threads, and fixtures built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Without HF_HUB_OFFLINE the reference libraries retry the network for minutes.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TESTS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS_DIR))
REPO_ROOT = TESTS_DIR.parent
SHARED_DIR = REPO_ROOT.parent / "shared"
