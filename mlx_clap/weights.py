"""Resolve a model source, and save/load converted folders with strict checks.

A converted folder holds:
- `config.json`: `ClapConfig.to_dict()` (fully resolved, sorted, `model_type` and `format_version`);
- `model.safetensors`: the flattened MLX parameter tree (float32, MLX layouts: convs OHWI);
- tokenizer files when the source had them (tokenizer.json, or vocab.json + merges.txt);
- `manifest.json`: source, revision, sha256 of source and output files, converter version.

The runtime reads safetensors and JSON only: no pickle is ever loaded here.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .config import FORMAT_VERSION, ClapConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MANIFEST_NAME = "manifest.json"

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


class WeightsError(ValueError):
    """A model folder or checkpoint that cannot be loaded; the message names the file and the cause."""


def parse_dtype(dtype: Any) -> mx.Dtype:
    if dtype is None:
        return mx.float32
    if isinstance(dtype, mx.Dtype):
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see either the old or the whole new content, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def is_converted_folder(folder: Path) -> bool:
    cfg = Path(folder) / CONFIG_NAME
    if not cfg.is_file() or not (Path(folder) / WEIGHTS_NAME).is_file():
        return False
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "format_version" in data and "feature_config" in data


def save_converted(model, folder: Path) -> None:
    """Write `config.json` and `model.safetensors` for an MLX ClapModel (used by converters and tests)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    flat = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}
    from safetensors.numpy import save

    atomic_write_bytes(folder / WEIGHTS_NAME, save(flat, metadata={"format": "mlx"}))
    atomic_write_json(folder / CONFIG_NAME, model.config.to_dict())


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{path}: cannot read safetensors ({exc}); the file may be truncated") from exc


def check_weights(expected: dict[str, tuple], weights: dict[str, np.ndarray], where: Path) -> None:
    """Strict key and shape check: every mismatch is named."""
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
    if extra:
        problems.append(f"unexpected keys: {', '.join(extra[:8])}" + (" ..." if len(extra) > 8 else ""))
    for key in sorted(set(expected) & set(weights)):
        if tuple(weights[key].shape) != tuple(expected[key]):
            problems.append(f"{key}: shape {tuple(weights[key].shape)} in file, model wants {expected[key]}")
    if problems:
        raise WeightsError(f"{where}: weights do not match the model config: " + "; ".join(problems[:10]))


def load_converted(folder: Path, dtype: Any = None):
    """Load a converted folder into a ClapModel, with strict key/shape checks."""
    from .model import ClapModel

    folder = Path(folder)
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise WeightsError(f"{folder}: no {CONFIG_NAME}; is this a converted mlx-clap folder?")
    try:
        data = json.loads(cfg_path.read_text())
    except ValueError as exc:
        raise WeightsError(f"{cfg_path}: not valid JSON ({exc})") from exc
    version = data.get("format_version")
    if version is None or "feature_config" not in data:
        raise WeightsError(
            f"{folder}: not a converted mlx-clap folder (no format_version); run `mlx-clap convert` first"
        )
    if version > FORMAT_VERSION:
        raise WeightsError(f"{folder}: format_version {version} is newer than this mlx-clap reads")
    if data.get("model_type") != "clap":
        raise WeightsError(f"{folder}: model_type {data.get('model_type')!r} is not a CLAP model")
    config = ClapConfig.from_dict(data)
    model = ClapModel(config)
    weights = _read_safetensors(folder / WEIGHTS_NAME)
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    check_weights(expected, weights, folder / WEIGHTS_NAME)
    target = parse_dtype(dtype)
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    if target != mx.float32:
        model.set_dtype(target)
    model.eval()
    model.source_dir = folder
    try:
        from .tokenizer import load_tokenizer

        model._tokenizer = load_tokenizer(folder, config.text_config)
    except ImportError:
        model._tokenizer = None
    return model


def load_model(source: str | Path, dtype: Any = None, **kwargs: Any):
    """Load from a converted folder; other sources (HF folder, .pt, hub id) go through conversion."""
    path = Path(source).expanduser()
    if path.is_dir() and is_converted_folder(path):
        return load_converted(path, dtype=dtype)
    raise WeightsError(f"{source}: not a converted mlx-clap folder (conversion of other sources: TODO)")
