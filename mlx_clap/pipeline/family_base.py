"""What every family adapter shares: its model, and the tokenizer read from the converted folder.

A module of its own rather than part of `pipeline/__init__.py`: that module imports the adapters, so
their importing it back would close an import circle (tests/test_architecture.py forbids one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class FamilyBase:
    """Base of the `pipeline.Family` adapters: holds `model` and the tokenizer.

    A subclass says how its folder's tokenizer is read (`read_tokenizer`) and what the error says when
    the folder has none (`missing_tokenizer_hint`). The error is raised on first text use, not at load:
    a folder without a tokenizer still embeds audio.
    """

    missing_tokenizer_hint = "this model has no tokenizer"

    def __init__(self, model: Any, source_dir: Path | None = None, tokenizer: Any = None):
        self.model = model
        self._tokenizer = tokenizer
        if tokenizer is None and source_dir is not None:
            self._tokenizer = self.read_tokenizer(Path(source_dir))

    def read_tokenizer(self, folder: Path) -> Any:
        """The tokenizer in `folder`, or None when it has no tokenizer files."""
        raise NotImplementedError

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            raise RuntimeError(self.missing_tokenizer_hint)
        return self._tokenizer


__all__ = ["FamilyBase"]
