"""What every converter writes besides the weights: the manifest's provenance and the CLAP folder save.

One place for the fields a converted folder's `manifest.json` starts with (who converted it, from what,
with the sha256 of each source file), so the three converters cannot drift apart, and the save that the
two LAION/HF converters share (tokenizer check, strict shape check, atomic folder write).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from mlx_clap.config import ClapConfig
from mlx_clap.convert.common import check_tokenizer_fits
from mlx_clap.io.files import sha256_file
from mlx_clap.io.folder import save_converted_arrays
from mlx_clap.models.clap import ClapModel


def provenance_manifest(
    converter: str,
    converter_version: str,
    source: str,
    source_format: str,
    source_files: Iterable[Path],
    **fields: Any,
) -> dict[str, Any]:
    """The manifest fields every converter records, then the converter's own `fields`.

    `source` names what was converted (hub id, folder or file), `source_format` its kind ("huggingface",
    "laion-pt", "msclap-pth"); `source_files` are hashed by name (`{name: sha256}`). The JSON writer sorts
    the keys, so the order of `fields` does not change the bytes written.
    """
    return {
        "converter": converter,
        "converter_version": converter_version,
        "source": source,
        "source_format": source_format,
        "source_files": {p.name: sha256_file(p) for p in source_files},
        **fields,
    }


def save_clap_folder(
    dest: str | Path,
    config: ClapConfig,
    weights: dict[str, np.ndarray],
    manifest: dict[str, Any],
    tokenizer_dir: Path | None,
) -> Path:
    """Write a LAION/HF-family converted folder at `dest` (replaced if ours); returns `dest`.

    The tokenizer is checked against the text tower first (a misfit fails here, not at the first text
    embedding); `tokenizer_dir=None` writes a folder without one. The weights must match the shapes
    `ClapModel` builds from `config` exactly.
    """
    if tokenizer_dir is not None:
        check_tokenizer_fits(tokenizer_dir, config.text_config)
    return save_converted_arrays(
        Path(dest),
        config,
        weights,
        manifest,
        tokenizer_dir=tokenizer_dir,
        expected=ClapModel.parameter_shapes(config),
    )


__all__ = ["provenance_manifest", "save_clap_folder"]
