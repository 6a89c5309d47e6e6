"""Helpers shared by the converters: reading safetensors with numpy, the HF -> MLX key/layout mapping.

Torch-free: the HF safetensors path needs only numpy. Pickled checkpoints (LAION `.pt`,
`pytorch_model.bin`) are read by `torch_state_dict`, which imports torch only when called.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from mlx_clap.io.files import sha256_file
from mlx_clap.io.folder import WeightsError

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as numpy arrays (BF16 is widened to float32).

    A small reader of the documented format (8-byte header length, JSON header, raw data), so bfloat16
    checkpoints, which numpy cannot hold, still convert without torch.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read ({exc})") from exc
    try:
        (header_len,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + header_len])
    except (struct.error, ValueError) as exc:
        raise WeightsError(f"{path}: not a safetensors file (bad header: {exc})") from exc
    body = memoryview(data)[8 + header_len :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        if end > len(body):
            raise WeightsError(f"{path}: tensor {name} runs past the end of the file; the file is truncated")
        raw = body[begin:end]
        if info["dtype"] == "BF16":
            bits = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
            arr = bits.view(np.float32)
        elif info["dtype"] in _ST_DTYPES:
            arr = np.frombuffer(raw, dtype=_ST_DTYPES[info["dtype"]])
        else:
            raise WeightsError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        # Views into `data` (kept alive by them): no second copy of a 600 MB checkpoint.
        out[name] = arr.reshape(info["shape"])
    return out


def torch_state_dict(path: Path, what: str, weights_only: bool = True) -> Any:
    """torch.load a pickled checkpoint (needs the optional torch extra); returns the loaded object.

    `weights_only=False` is for the LAION `.pt` files, which also pickle numpy scalars and the training
    arguments; only load those from a source you trust.
    """
    try:
        import torch
    except ImportError as exc:
        raise WeightsError(
            f"{path}: {what} is a torch pickle and converting it needs PyTorch, which is not installed; "
            "install it with `pip install 'mlx-clap[convert]'` (or convert a folder with model.safetensors)"
        ) from exc
    try:
        return torch.load(str(path), map_location="cpu", weights_only=weights_only)
    except Exception as exc:  # torch raises many types for corrupt pickles
        raise WeightsError(
            f"{path}: cannot load the {what} checkpoint ({type(exc).__name__}: {exc})"
        ) from exc


def to_numpy(tensors: dict) -> dict[str, np.ndarray]:
    """torch tensors -> float32/int numpy arrays (bfloat16 and half widened to float32)."""
    import torch

    out = {}
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            continue
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.to(torch.float32)
        out[key] = value.numpy()
    return out


def hf_state_to_mlx(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF `ClapModel` state dict (numpy) -> MLX parameters (numpy float32) through `ClapModel.sanitize`.

    Names are kept (the MLX modules use the HF names); derived buffers are dropped; convolutions go from
    OIHW to OHWI.
    """
    import mlx.core as mx

    from mlx_clap.models.clap import ClapModel

    kept = {k: mx.array(np.asarray(v)) for k, v in state.items()}
    return {k: _c_float32(np.array(v.astype(mx.float32))) for k, v in ClapModel.sanitize(kept).items()}


def _c_float32(arr: np.ndarray) -> np.ndarray:
    # np.ascontiguousarray turns 0-d arrays (the logit scales) into 1-d ones, so only use it when needed.
    return arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)


__all__ = ["hf_state_to_mlx", "read_safetensors", "sha256_file", "to_numpy", "torch_state_dict"]
