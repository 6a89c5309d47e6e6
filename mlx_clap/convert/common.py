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

from mlx_clap.io.folder import WeightsError

# Buffers that HF/LAION state dicts carry but the MLX model derives or never uses (docs/numerics.md §6.2, §6.4).
DROPPED_SUFFIXES = (
    "num_batches_tracked",
    "relative_position_index",
    "position_ids",
    "token_type_ids",
    "attn_mask",
)

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
    """HF `ClapModel` state dict -> MLX parameter dict.

    Names are kept (the MLX modules use the HF names); derived buffers are dropped; convolutions go from
    OIHW to OHWI; float tensors are stored as float32.
    """
    out = {}
    for key, value in state.items():
        if key.endswith(DROPPED_SUFFIXES):
            continue
        arr = np.asarray(value)
        if not np.issubdtype(arr.dtype, np.floating):
            raise WeightsError(f"tensor {key} has dtype {arr.dtype}; only float weights are expected")
        if arr.ndim == 4:
            arr = arr.transpose(0, 2, 3, 1)
        elif key.startswith("logit_scale") and arr.size == 1:
            arr = arr.reshape(())  # HF stores (1,), LAION a 0-d tensor; the MLX model holds a scalar
        out[key] = np.array(arr, dtype=np.float32, order="C")  # ascontiguousarray makes 0-d 1-d
    return out


def sha256_file(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
