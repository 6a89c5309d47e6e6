"""Helpers shared by the converters: reading safetensors with numpy, the HF -> MLX key/layout mapping.

Torch-free: the HF safetensors path needs only numpy. Pickled checkpoints (LAION `.pt`,
`pytorch_model.bin`) are read by `torch_state_dict`, which imports torch only when called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mlx_clap.extras import install_hint
from mlx_clap.io.files import sha256_file
from mlx_clap.io.folder import WeightsError, parse_safetensors_header

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
    header, start = parse_safetensors_header(path, data, len(data))
    body = memoryview(data)[start:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
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


TRUST_HINT = (
    "pass --trust-pickle (mlx-clap) or trust_pickle=True (mlx_clap.load and the converters) only if the "
    "file comes from a source you trust: unpickling it can run arbitrary code"
)


def torch_state_dict(
    path: Path, what: str, weights_only: bool | None = None, *, trust_pickle: bool = False
) -> Any:
    """torch.load a pickled checkpoint (needs the optional torch extra); returns the loaded object.

    The file is always read with torch's `weights_only=True` unpickler first, which builds tensors and
    plain containers only and so cannot run code. Released LAION `.pt` files also pickle numpy scalars and
    the training arguments, which that unpickler refuses; they are then read with the full unpickler only
    when the caller opts in with `trust_pickle=True` (`weights_only=False` is the older spelling of the
    same opt-in), else refused with a WeightsError that says how to opt in.
    """
    trusted = trust_pickle or weights_only is False
    try:
        import torch
    except ImportError as exc:
        raise WeightsError(
            f"{path}: {what} is a torch pickle and converting it needs PyTorch, which is not installed; "
            f"install it with {install_hint('convert')} (or convert a folder with model.safetensors)"
        ) from exc
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt pickles
        if not _needs_full_unpickler(exc):
            raise WeightsError(
                f"{path}: cannot load the {what} checkpoint ({type(exc).__name__}: {exc})"
            ) from exc
        if not trusted:
            raise WeightsError(
                f"{path}: the {what} checkpoint cannot be read with torch's safe weights-only unpickler "
                f"({_unpickler_cause(exc)}); it pickles Python objects besides tensors (released LAION .pt "
                f"files hold numpy scalars and training arguments), and reading those can execute code "
                f"from the file, so it was refused. To convert it anyway, {TRUST_HINT}."
            ) from exc
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise WeightsError(
            f"{path}: cannot load the {what} checkpoint ({type(exc).__name__}: {exc})"
        ) from exc


def _unpickler_cause(exc: BaseException) -> str:
    """The one useful line of torch's long weights-only message (what it refused)."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    text = text.split("Check the documentation", 1)[0].split("Please use", 1)[0]
    text = " ".join(text.split()).rstrip(". ")
    return text[:240] or type(exc).__name__


def _needs_full_unpickler(exc: BaseException) -> bool:
    """Whether torch's weights-only unpickler refused a global (the file is a valid but richer pickle),
    as opposed to a corrupt or truncated file (which stays a plain "cannot load" error)."""
    import pickle

    # A corrupt file fails with e.g. "Unsupported operand"; only a refused global means "valid, but richer".
    return isinstance(exc, pickle.UnpicklingError) and "Unsupported global" in str(exc)


def require_tokenizer_files(folder: str | Path) -> Path:
    """A tokenizer folder given explicitly (`--tokenizer DIR`) as a Path, checked to hold tokenizer
    files (tokenizer.json, or vocab.json + merges.txt): without them it would be ignored and the
    converted folder left without a tokenizer, unsaid. WeightsError naming the folder otherwise."""
    from mlx_clap.preprocess.tokenizer import has_tokenizer_files

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise WeightsError(f"{folder}: tokenizer folder not found")
    if not has_tokenizer_files(folder):
        raise WeightsError(
            f"{folder}: no tokenizer files (expected tokenizer.json, or vocab.json + merges.txt)"
        )
    return folder


def check_tokenizer_fits(folder: Path, text_config: Any) -> None:
    """Refuse tokenizer files that do not fit the model's text tower (`ClapTextConfig`).

    The same check loading runs (vocabulary size equal to the word-embedding rows, RoBERTa's special
    ids), done at convert time: otherwise the conversion succeeds and text embedding fails much later.
    A folder without tokenizer files passes (the converted folder then has none, as its manifest says).
    """
    from mlx_clap.preprocess.tokenizer import TokenizerError, load_tokenizer

    try:
        load_tokenizer(folder, text_config)
    except TokenizerError as exc:
        raise WeightsError(f"{folder}: the tokenizer does not fit this model: {exc}") from exc
    except (OSError, RuntimeError) as exc:
        raise WeightsError(f"{folder}: cannot read the tokenizer files ({exc})") from exc


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


__all__ = [
    "TRUST_HINT",
    "check_tokenizer_fits",
    "hf_state_to_mlx",
    "read_safetensors",
    "require_tokenizer_files",
    "sha256_file",
    "to_numpy",
    "torch_state_dict",
]
