"""Convert a Hugging Face CLAP model folder (hub layout) into an mlx-clap converted folder.

Torch-free for `model.safetensors` (numpy only); `pytorch_model.bin` needs torch (optional extra).

    from mlx_clap.convert.hf import convert_hf_folder
    convert_hf_folder("clap-htsat-unfused/", "weights/clap-htsat-unfused")
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mlx_clap.config import config_from_hf
from mlx_clap.convert.common import (
    hf_state_to_mlx,
    read_safetensors,
    require_tokenizer_files,
    to_numpy,
    torch_state_dict,
)
from mlx_clap.convert.output import provenance_manifest, save_clap_folder
from mlx_clap.io.folder import WeightsError, already_converted_problem
from mlx_clap.version import __version__

CONVERTER = "mlx_clap.convert.hf"
CONVERTER_VERSION = f"mlx-clap {__version__} ({CONVERTER} 1)"


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise WeightsError(f"{path}: not valid JSON ({exc})") from exc


def read_hf_weights(folder: Path, trust_pickle: bool = False) -> tuple[dict[str, np.ndarray], list[Path]]:
    """The state dict of an HF folder as numpy, and the files it came from.

    Prefers model.safetensors (or a sharded index); falls back to pytorch_model.bin through torch.
    """
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif index.is_file():
        shards = sorted(set((_read_json(index) or {}).get("weight_map", {}).values()))
        files = [folder / s for s in shards]
        for f in files:
            if not f.is_file():
                raise WeightsError(f"{index}: shard {f.name} is missing")
    elif (folder / "pytorch_model.bin").is_file():
        path = folder / "pytorch_model.bin"
        state = torch_state_dict(path, "pytorch_model.bin", trust_pickle=trust_pickle)
        return to_numpy(state), [path]
    else:
        raise WeightsError(f"{folder}: no model.safetensors or pytorch_model.bin to convert")
    state: dict[str, np.ndarray] = {}
    for f in files:
        state.update(read_safetensors(f))
    return state, files


def open_hf_source(src: str | Path, tokenizer_dir: str | Path | None) -> tuple[Path, Path]:
    """The checks every Hugging Face converter starts with; returns (source folder, tokenizer folder).

    WeightsError when `src` is not a folder or is already one of our converted folders, or when an
    explicit `tokenizer_dir` holds no tokenizer files. Without `tokenizer_dir` the source's own files are
    used (they may be absent: the converted folder then has none, as its manifest says).
    """
    src = Path(src)
    if not src.is_dir():
        raise WeightsError(f"{src}: not a folder")
    # A folder given explicitly must hold tokenizer files (it would otherwise be ignored, unsaid).
    tok = require_tokenizer_files(tokenizer_dir) if tokenizer_dir is not None else src
    problem = already_converted_problem(src)
    if problem:
        raise WeightsError(problem)
    return src, tok


def read_hf_mlx_weights(
    src: Path, to_mlx: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], trust_pickle: bool = False
) -> tuple[dict[str, np.ndarray], list[Path]]:
    """The folder's weights mapped by `to_mlx` (a mapping error names the weights file), and their files."""
    state, files = read_hf_weights(src, trust_pickle=trust_pickle)
    try:
        return to_mlx(state), files
    except WeightsError as exc:
        raise WeightsError(f"{files[0]}: {exc}") from exc


def hf_manifest(
    converter: str, converter_version: str, source: str, src: Path, weight_files: list[Path], **fields: Any
) -> dict[str, Any]:
    """The provenance manifest of a Hugging Face folder: config.json, the weight files and the
    preprocessor config when present are hashed; `fields` are the converter's own."""
    sources = [src / "config.json", *weight_files]
    if (src / "preprocessor_config.json").is_file():
        sources.append(src / "preprocessor_config.json")
    return provenance_manifest(converter, converter_version, source, "huggingface", sources, **fields)


def convert_hf_folder(
    src: str | Path,
    dest: str | Path,
    *,
    source_name: str | None = None,
    revision: str | None = None,
    tokenizer_dir: str | Path | None = None,
    trust_pickle: bool = False,
) -> Path:
    """Convert an HF CLAP folder into `dest` (replaced if it exists); returns `dest`.

    Tokenizer files are copied from `tokenizer_dir` when given, else from the source folder; their
    vocabulary must fit the model's embedding table. `trust_pickle=True` allows a `pytorch_model.bin`
    that pickles more than tensors (full unpickling can run code: trusted files only).
    """
    src, tok = open_hf_source(src, tokenizer_dir)
    cfg = _read_json(src / "config.json")
    if cfg is None:
        raise WeightsError(f"{src}: no config.json (not a Hugging Face model folder)")
    try:
        config = config_from_hf(cfg, _read_json(src / "preprocessor_config.json"), source_name or str(src))
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"{src / 'config.json'}: {exc}") from exc
    weights, files = read_hf_mlx_weights(src, hf_state_to_mlx, trust_pickle=trust_pickle)
    manifest = hf_manifest(
        CONVERTER, CONVERTER_VERSION, source_name or str(src), src, files, revision=revision
    )
    return save_clap_folder(dest, config, weights, manifest, tokenizer_dir=tok)


def main(argv: list[str] | None = None) -> None:
    """`python -m mlx_clap.convert.hf SRC DEST`: the same as `mlx-clap convert` for a local folder."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Convert a Hugging Face CLAP folder to an mlx-clap folder")
    parser.add_argument("src", type=Path)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--revision", default=None, help="revision to record in the manifest")
    parser.add_argument(
        "--trust-pickle", action="store_true", help="allow full unpickling (can run code): trusted files only"
    )
    args = parser.parse_args(argv)
    try:
        out = convert_hf_folder(args.src, args.dest, revision=args.revision, trust_pickle=args.trust_pickle)
    except WeightsError as exc:
        sys.exit(f"error: {exc}")
    print(f"converted {args.src} -> {out}")


if __name__ == "__main__":
    main()
