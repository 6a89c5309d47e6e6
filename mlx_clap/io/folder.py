"""Resolve a model source, and save/load converted folders with strict checks.

A converted folder holds:
- `config.json`: `ClapConfig.to_dict()` (fully resolved, sorted, `model_type` and `format_version`);
- `model.safetensors`: the flattened MLX parameter tree (float32, MLX layouts: convs OHWI);
- tokenizer files when the source had them (tokenizer.json, or vocab.json + merges.txt);
- `manifest.json`: source, revision, sha256 of source and output files, converter version.

Sources `load_model` resolves: a converted folder (loaded), a Hugging Face CLAP folder or a LAION `.pt`
(converted once into `$MLX_CLAP_CACHE` or ~/.cache/mlx-clap/<name>-<hash>, then loaded), a hub id
`org/name` (downloaded with huggingface_hub, then the same), and msclap folders (their own loader).

The runtime reads safetensors and JSON only: no pickle is loaded unless a `.pt`/`.bin` source has to be
converted, and that goes through the `convert` package and torch.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_clap.config import FORMAT_VERSION, ClapConfig
from mlx_clap.io.files import atomic_write_bytes, atomic_write_json, publish_folder

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


def _read_safetensors(path: Path) -> dict[str, mx.array]:
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


# Parameters that stay float32 when a model is loaded in half precision: bn0 normalizes raw log-mels
# (values near -100 dB, where float16 steps are 0.06) and the logit scales are exponentiated.
KEEP_FLOAT32 = ("audio_model.audio_encoder.batch_norm.", "logit_scale_a", "logit_scale_t")

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


def expected_shapes(config: ClapConfig) -> dict[str, tuple]:
    """Parameter name -> shape of the MLX ClapModel for `config` (arrays are lazy: nothing is computed)."""
    from mlx_clap.models.clap import ClapModel

    model = ClapModel(config)
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def save_converted_arrays(
    folder: Path,
    config: ClapConfig,
    weights: dict[str, np.ndarray],
    manifest: dict[str, Any],
    tokenizer_dir: Path | None = None,
) -> Path:
    """Write a converted folder from numpy weights (MLX names and layouts), after a strict shape check.

    The folder is assembled beside `folder` and renamed into place, so a crash never leaves a folder
    that looks converted but is not. Writes config.json, model.safetensors, the tokenizer files found
    in `tokenizer_dir`, and manifest.json (the given fields plus sha256 of every written file).
    """
    import shutil

    from safetensors.numpy import save_file

    folder = Path(folder)
    check_weights(expected_shapes(config), weights, Path(manifest.get("source", "source")))
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
        manifest["files"] = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
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


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_converted(folder: Path, dtype: Any = None):
    """Load a converted folder into a ClapModel, with strict key/shape checks.

    `dtype` float16/bfloat16 casts the weights except `KEEP_FLOAT32`; the towers keep their numerically
    sensitive steps (mel side, LayerNorm, softmax) in float32.
    """
    from mlx_clap.models.clap import ClapModel

    folder = Path(folder)
    from mlx_clap.models.msclap import is_msclap_folder  # msclap hook: Microsoft CLAP has its own model class

    if is_msclap_folder(folder):
        from mlx_clap.models.msclap import load_msclap_folder

        return load_msclap_folder(folder, dtype=dtype)
    config = read_config(folder)
    target = parse_dtype(dtype)
    if not (folder / WEIGHTS_NAME).is_file():
        raise WeightsError(f"{folder}: no {WEIGHTS_NAME}")
    weights = _read_safetensors(folder / WEIGHTS_NAME)
    model = ClapModel(config)
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    check_weights(expected, weights, folder / WEIGHTS_NAME)
    arrays = []
    for key, arr in weights.items():
        if (
            target != mx.float32
            and mx.issubdtype(arr.dtype, mx.floating)
            and not key.startswith(KEEP_FLOAT32)
        ):
            arr = arr.astype(target)
        arrays.append((key, arr))
    model.load_weights(arrays, strict=True)
    model.eval()
    model.source_dir = folder
    try:
        from mlx_clap.preprocess.tokenizer import load_tokenizer
    except ImportError:
        model._tokenizer = None
    else:
        model._tokenizer = load_tokenizer(folder, config.text_config)
    return model


# --------------------------------------------------------------------------------------- resolving
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PT_SUFFIXES = (".pt", ".pth", ".ckpt")


def cache_root() -> Path:
    """`$MLX_CLAP_CACHE`, else ~/.cache/mlx-clap."""
    env = os.environ.get("MLX_CLAP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mlx-clap"


def _fingerprint(paths: list[Path]) -> str:
    """Cheap identity of local source files (path, size, mtime): a changed source converts again."""
    import hashlib

    digest = hashlib.sha256()
    for p in paths:
        if p.is_file():
            st = p.stat()
            digest.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns};".encode())
    return digest.hexdigest()[:12]


def cache_dir_for(name: str, key: str) -> Path:
    """Cache folder `<name>-<hash>` for a source identified by `key`."""
    import hashlib

    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"
    return cache_root() / f"{safe}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _source_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def convert_to_cache(
    source: str | Path, revision: str | None = None, name: str | None = None, label: str | None = None
) -> Path:
    """Convert an HF model folder or a LAION `.pt` into the cache once; return the converted folder.

    `name` names the cache entry (default: the folder or file name); `label` is the source recorded in
    the manifest (default: the path), e.g. the hub id for a downloaded snapshot.
    """
    path = Path(source).expanduser().resolve()
    if path.is_dir():
        key = f"hf:{path}:{revision or _fingerprint(_source_files(path))}"
    else:
        key = f"pt:{path}:{_fingerprint([path])}"
    dest = cache_dir_for(name or (path.name if path.is_dir() else path.stem), key)
    if is_converted_folder(dest):
        return dest
    if path.is_dir():
        from mlx_clap.convert.hf import convert_hf_folder

        convert_hf_folder(path, dest, source_name=label or str(path), revision=revision)
    else:
        from mlx_clap.convert.laion_pt import convert_laion_pt

        convert_laion_pt(path, dest, source_name=label or str(path))
    return dest


def download_hub(repo_id: str, revision: str | None = None) -> Path:
    """snapshot_download the files a conversion needs; a clear WeightsError when that is impossible."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # a declared dependency, but say so plainly
        raise WeightsError(f"{repo_id}: huggingface_hub is needed to download hub models") from exc
    patterns = ["*.json", "merges.txt", "*.safetensors"]
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
        if not any(folder.glob("*.safetensors")):
            # Older repos hold only pytorch_model.bin (converted with torch, an optional extra).
            folder = Path(
                snapshot_download(repo_id, revision=revision, allow_patterns=patterns + ["pytorch_model.bin"])
            )
    except Exception as exc:  # offline, unknown repo, network errors: all end the same way for the user
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        raise WeightsError(
            f"{repo_id}: could not download it from the Hugging Face hub ({type(exc).__name__}: {exc})."
            + (" HF_HUB_OFFLINE is set, so the hub is not contacted." if offline else "")
            + " If you are offline, copy the model folder here and convert it: "
            "`mlx-clap convert /path/to/clap-folder converted/` then load `converted/`."
        ) from exc
    return folder


def load_model(source: str | Path, dtype: Any = None, revision: str | None = None):
    """Load a model from any supported source.

    - a converted mlx-clap folder: loaded directly;
    - a Hugging Face CLAP folder (config.json + model.safetensors or pytorch_model.bin): converted into
      the cache (`$MLX_CLAP_CACHE` or ~/.cache/mlx-clap/<name>-<hash>) once, then loaded;
    - a LAION `.pt` checkpoint: the same (needs torch for the one-time conversion);
    - a hub id `org/name`: downloaded with huggingface_hub, converted into the cache once, loaded.
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_dir():
            from mlx_clap.models.msclap import is_msclap_folder, load_msclap_folder

            if is_msclap_folder(path):  # converted by convert/msclap.py: its own model class
                return load_msclap_folder(path, dtype=dtype)
            if is_converted_folder(path):
                return load_converted(path, dtype=dtype)
            if (path / CONFIG_NAME).is_file():
                return load_converted(convert_to_cache(path, revision=revision), dtype=dtype)
            raise WeightsError(
                f"{path}: neither a converted mlx-clap folder nor a Hugging Face model folder "
                "(no config.json)"
            )
        if path.suffix in PT_SUFFIXES:
            return load_converted(convert_to_cache(path), dtype=dtype)
        raise WeightsError(f"{path}: not a model folder or a LAION checkpoint (.pt); cannot load it")
    if HUB_ID.match(text):
        snapshot = download_hub(text, revision=revision)
        # The snapshot folder is named by its commit: that is the cache key and the recorded revision.
        dest = convert_to_cache(snapshot, revision=snapshot.name, name=text.replace("/", "--"), label=text)
        return load_converted(dest, dtype=dtype)
    raise WeightsError(f"{text}: no such file or folder, and not a hub id of the form org/name")
