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


def _json_object(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_mlx_clap_output(folder: Path) -> bool:
    """True when `folder` was written by an mlx-clap converter (either family): its manifest.json or its
    config.json carries our `format_version`. Used to decide what `convert --force` may replace."""
    folder = Path(folder)
    for name in (MANIFEST_NAME, CONFIG_NAME):
        data = _json_object(folder / name)
        if data is not None and "format_version" in data:
            return True
    return False


def already_converted_problem(folder: Path) -> str | None:
    """Why `folder` cannot be a conversion *source* (it is an mlx-clap output already), or None.

    A folder whose config.json lost `format_version` but whose model.safetensors says {"format": "mlx"}
    (what our converters write) is a damaged converted folder: reading it as a Hugging Face folder would
    only end in a confusing weight-shape error.
    """
    folder = Path(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        return None
    config = _json_object(folder / CONFIG_NAME) or {}
    if "format_version" in config and "feature_config" in config:
        return (
            f"{folder}: this folder is already converted (an mlx-clap folder); there is nothing to convert: "
            f"use it directly, e.g. `mlx-clap info --model {folder}`"
        )
    manifest = _json_object(folder / MANIFEST_NAME) or {}
    ours = "format_version" in config or "format_version" in manifest
    if ours or safetensors_metadata(weights).get("format") == "mlx":
        return (
            f"{folder}: a damaged converted mlx-clap folder: {WEIGHTS_NAME} holds converted (MLX-layout) "
            f"weights but {CONFIG_NAME} lost its format_version or feature_config; convert the original "
            "model again "
            f"(`mlx-clap convert ORIGINAL {folder} --force`)"
        )
    return None


def check_replaceable(dest: Path) -> None:
    """Refuse to replace `dest` unless it is absent, an empty folder, or an mlx-clap converted folder.

    `convert --force` replaces its destination; without this check a typo (`--force ~`) would delete a
    folder that mlx-clap never wrote.
    """
    dest = Path(dest)
    if not dest.exists() and not dest.is_symlink():
        return
    if dest.is_symlink() or not dest.is_dir():
        raise WeightsError(f"{dest}: exists and is not a folder; refusing to replace it")
    if not any(dest.iterdir()) or is_mlx_clap_output(dest):
        return
    raise WeightsError(
        f"{dest}: not an mlx-clap converted folder (no manifest.json or config.json with format_version) "
        "and not empty; refusing to replace it, even with --force. Choose a new or empty destination"
    )


def save_converted(model, folder: Path) -> None:
    """Write `config.json` and `model.safetensors` for an MLX ClapModel (used by converters and tests)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    flat = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}
    from safetensors.numpy import save

    atomic_write_bytes(folder / WEIGHTS_NAME, save(flat, metadata={"format": "mlx"}))
    atomic_write_json(folder / CONFIG_NAME, model.config.to_dict())


# Bytes per element of the safetensors dtypes mlx-clap may meet (the header check needs them).
ST_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
# A real header is a few hundred kB at most; anything larger is a wrong or hostile file.
MAX_HEADER_BYTES = 100 * 1024 * 1024


def parse_safetensors_header(path: Path, head: bytes, file_size: int) -> tuple[dict[str, Any], int]:
    """Validate a safetensors header; return (header, data start). `head` is the file's first bytes
    (at least the 8-byte length and the JSON header when the file has them).

    Checked before any tensor is read, so a damaged or hostile file is a WeightsError naming it and the
    cause, never a traceback or an allocation sized by the file: the length fits the file, the JSON is an
    object, every tensor has a known dtype, a shape of non-negative ints, and offsets that lie inside the
    data, match the shape and do not overlap.
    """
    path = Path(path)
    if file_size < 8 or len(head) < 8:
        raise WeightsError(
            f"{path}: cannot read safetensors: not a safetensors file (shorter than its 8-byte header length)"
        )
    header_len = int.from_bytes(head[:8], "little")
    if header_len < 2 or header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
        raise WeightsError(
            f"{path}: cannot read safetensors: not a safetensors file (bad header length {header_len} "
            f"for a {file_size}-byte file)"
        )
    if len(head) < 8 + header_len:
        raise WeightsError(f"{path}: cannot read safetensors: the header is cut short; the file is truncated")
    try:
        header = json.loads(head[8 : 8 + header_len])
    except (UnicodeDecodeError, ValueError) as exc:
        raise WeightsError(
            f"{path}: cannot read safetensors: not a safetensors file (the header is not valid JSON: {exc})"
        ) from exc
    if not isinstance(header, dict):
        raise WeightsError(
            f"{path}: cannot read safetensors: not a safetensors file (the header is not a JSON object)"
        )
    body = file_size - 8 - header_len
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and not isinstance(info, dict):
                raise WeightsError(
                    f"{path}: cannot read safetensors: bad header (__metadata__ is not an object)"
                )
            continue
        spans.append(_tensor_span(path, name, info, body))
    spans.sort()
    for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:], strict=False):
        if b1 < e0:
            raise WeightsError(f"{path}: cannot read safetensors: bad header (tensors {n0} and {n1} overlap)")
    return header, 8 + header_len


def _tensor_span(path: Path, name: str, info: Any, body: int) -> tuple[int, int, str]:
    """(begin, end, name) of one header entry, after checking it against the data size."""
    bad = f"{path}: cannot read safetensors: bad header for tensor {name!r}"
    if not isinstance(info, dict):
        raise WeightsError(f"{bad} (not an object)")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in ST_ITEMSIZE:
        raise WeightsError(f"{bad} (unsupported dtype {dtype!r})")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise WeightsError(f"{bad} (shape {shape!r} is not a list of non-negative integers)")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise WeightsError(f"{bad} (data_offsets {offsets!r} are not [begin, end])")
    begin, end = offsets
    if end > body:
        raise WeightsError(f"{bad} (data runs past the end of the file; the file is truncated)")
    count = 1
    for d in shape:
        count *= d
    if count * ST_ITEMSIZE[dtype] != end - begin:
        raise WeightsError(f"{bad} ({end - begin} bytes of data for shape {shape} of {dtype})")
    return begin, end, name


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The validated header of a safetensors file (only the header is read)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) == 8:
                want = int.from_bytes(head, "little")
                if 2 <= want <= MAX_HEADER_BYTES and 8 + want <= size:
                    head += fh.read(want)
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read ({exc})") from exc
    return parse_safetensors_header(path, head, size)


def safetensors_metadata(path: Path) -> dict[str, Any]:
    """The `__metadata__` of a safetensors file ({} when absent or unreadable); never raises."""
    try:
        header, _ = read_safetensors_header(path)
    except WeightsError:
        return {}
    meta = header.get("__metadata__")
    return meta if isinstance(meta, dict) else {}


def check_float_weights(weights: dict[str, Any], where: Path) -> None:
    """A converted folder stores float32 only: an integer or bool tensor means a wrong or edited file."""
    for key in sorted(weights):
        if not mx.issubdtype(weights[key].dtype, mx.floating):
            raise WeightsError(
                f"{where}: tensor {key} has dtype {str(weights[key].dtype).removeprefix('mlx.core.')}; only "
                "float weights are expected"
            )


def read_safetensors(path: Path) -> dict[str, mx.array]:
    """The tensors of a converted model.safetensors as MLX arrays (read by MLX: no numpy copy).

    The header is validated first (`parse_safetensors_header`), so a malformed one is a WeightsError.
    """
    read_safetensors_header(path)
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
    check_replaceable(folder)  # only our own earlier output (or nothing) is ever replaced
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
