"""The converted-folder format: file names, strict checks, reading and writing.

A converted folder holds `config.json` (fully resolved, tagged with `model_type`, `family` and
`format_version`), `model.safetensors` (MLX names and layouts, float32), the tokenizer files and
`manifest.json` (source, converter, sha256 of every file). This module knows the format only; the
model classes (`mlx_clap.models`) build themselves from it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_clap.config import FORMAT_VERSION, ClapConfig
from mlx_clap.io.files import atomic_write_bytes, atomic_write_json, publish_folder, sha256_file

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


def read_safetensors(path: Path) -> dict[str, mx.array]:
    """The tensors of a converted model.safetensors as MLX arrays (read by MLX: no numpy copy)."""
    try:
        weights = mx.load(str(path))
    except (RuntimeError, OSError, ValueError) as exc:
        raise WeightsError(
            f"{path}: cannot read safetensors ({exc}); the file may be truncated or corrupt"
        ) from exc
    if not isinstance(weights, dict):
        raise WeightsError(f"{path}: not a safetensors file")
    return weights


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


TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
SUPPORTED_FAMILIES = ("laion",)


def read_config(folder: Path) -> ClapConfig:
    """The `ClapConfig` of a converted folder, with format, model type and family checks."""
    folder = Path(folder)
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise WeightsError(f"{folder}: no {CONFIG_NAME}; is this a converted mlx-clap folder?")
    try:
        data = json.loads(cfg_path.read_text())
    except ValueError as exc:
        raise WeightsError(f"{cfg_path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise WeightsError(f"{cfg_path}: expected a JSON object")
    version = data.get("format_version")
    if version is None or "feature_config" not in data:
        raise WeightsError(
            f"{folder}: not a converted mlx-clap folder (no format_version); run `mlx-clap convert` first"
        )
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise WeightsError(f"{cfg_path}: format_version {version!r} is not one this mlx-clap reads")
    if data.get("model_type") != "clap":
        raise WeightsError(f"{cfg_path}: model_type {data.get('model_type')!r} is not a CLAP model")
    if data.get("family", "laion") not in SUPPORTED_FAMILIES:
        raise WeightsError(f"{cfg_path}: model family {data.get('family')!r} is not supported here")
    try:
        return ClapConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"{cfg_path}: invalid config ({exc})") from exc


def save_converted_arrays(
    folder: Path,
    config: ClapConfig,
    weights: dict[str, np.ndarray],
    manifest: dict[str, Any],
    tokenizer_dir: Path | None = None,
    expected: dict[str, tuple] | None = None,
) -> Path:
    """Write a converted folder from numpy weights (MLX names and layouts), after a strict shape check
    against `expected` (the model's `parameter_shapes`).

    The folder is assembled beside `folder` and renamed into place, so a crash never leaves a folder
    that looks converted but is not. Writes config.json, model.safetensors, the tokenizer files found
    in `tokenizer_dir`, and manifest.json (the given fields plus sha256 of every written file).
    """
    from safetensors.numpy import save_file

    folder = Path(folder)
    if expected is not None:
        check_weights(expected, weights, Path(manifest.get("source", "source")))
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        # No copies of arrays that are already float32 and C-ordered (hub models are ~600 MB).
        flat = {k: _c_float32(v) for k, v in sorted(weights.items())}
        save_file(flat, str(tmp / WEIGHTS_NAME), metadata={"format": "mlx"})
        atomic_write_json(tmp / CONFIG_NAME, config.to_dict())
        copied = []
        for name in TOKENIZER_FILES:
            if tokenizer_dir is not None and (Path(tokenizer_dir) / name).is_file():
                shutil.copyfile(Path(tokenizer_dir) / name, tmp / name)
                copied.append(name)
        manifest = dict(manifest)
        manifest["tokenizer_files"] = copied
        manifest["format_version"] = FORMAT_VERSION
        manifest["files"] = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        atomic_write_json(tmp / MANIFEST_NAME, manifest)
        publish_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _c_float32(value: np.ndarray) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float32)
    # np.ascontiguousarray turns 0-d arrays (the logit scales) into 1-d ones, so only use it when needed.
    return arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)


def read_json(path: Path) -> Any:
    """The parsed JSON of `path`, None when the file does not exist; invalid JSON is a WeightsError."""
    if not Path(path).is_file():
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{path}: not valid JSON ({exc})") from exc


def hf_safetensors_files(folder: Path) -> list[Path]:
    """The safetensors file(s) of a Hugging Face folder (model.safetensors or a sharded index)."""
    folder = Path(folder)
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = read_json(index)
        if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
            raise WeightsError(f"{index}: no weight_map")
        files = [folder / s for s in sorted(set(data["weight_map"].values()))]
        for f in files:
            if not f.is_file():
                raise WeightsError(f"{index}: shard {f.name} is missing")
        return files
    raise WeightsError(f"{folder}: no model.safetensors (or sharded index) in this Hugging Face folder")
