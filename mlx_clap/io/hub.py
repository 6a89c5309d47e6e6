"""Hugging Face hub downloads and the converted-model cache folders.

The hub is reached only through `huggingface_hub.snapshot_download`; offline (or with HF_HUB_OFFLINE=1)
the error says what to do instead, with the exact command.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from mlx_clap import settings as _settings
from mlx_clap.io.folder import WeightsError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE is set (huggingface_hub's own switch, read where it is used)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cache_root() -> Path:
    """`$MLX_CLAP_CACHE`, else ~/.cache/mlx-clap."""
    return _settings.current().cache_dir


def cache_dir_for(name: str, key: str) -> Path:
    """Cache folder `<name>-<hash>` for a source identified by `key`."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"
    return cache_root() / f"{safe}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def fingerprint(paths: list[Path]) -> str:
    """Cheap identity of local source files (path, size, mtime): a changed source converts again."""
    digest = hashlib.sha256()
    for p in paths:
        if p.is_file():
            st = p.stat()
            digest.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns};".encode())
    return digest.hexdigest()[:12]


def download_hub(repo_id: str, revision: str | None = None) -> Path:
    """snapshot_download the files a model needs; a clear WeightsError when that is impossible."""
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
        raise WeightsError(offline_message(repo_id, exc)) from exc
    return folder


def offline_message(repo_id: str, exc: BaseException | None = None) -> str:
    """Why a hub id could not be fetched, and the one exact next step (no overlapping hints)."""
    name = repo_id.rsplit("/", 1)[-1]
    if hub_offline():
        why = "HF_HUB_OFFLINE is set, so the hub is not contacted and the model is not in its cache"
    else:
        # huggingface_hub's own message can run to several lines with its own advice: keep the first.
        first = str(exc).strip().splitlines()[0] if exc is not None and str(exc).strip() else ""
        why = f"{type(exc).__name__}: {first}" if exc is not None else "unknown error"
    return (
        f"{repo_id}: could not download it from the Hugging Face hub ({why}). Next: on a machine with "
        f"network run `hf download {repo_id} --local-dir {name}`, copy the {name}/ folder here and pass "
        f"`--model {name}/` (it loads in place). To try mlx-clap with no hub at all: "
        f"`mlx-clap random-model demo/` writes a model with random weights."
    )


__all__ = [
    "HUB_ID",
    "cache_dir_for",
    "cache_root",
    "download_hub",
    "fingerprint",
    "hub_offline",
    "offline_message",
]
