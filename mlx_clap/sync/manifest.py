"""The pipeline identity a run records in its output: model, weights, settings, store dtype.

A store refuses a run whose identity differs (mlx_clap.store.schema.identity_diff), so every engine (the
single process, a Ray job) must build it here, the same way.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

DECODE_NOTE = "soundfile|pyav, channel mean, soxr HQ, librosa length"


def weights_sha256(model: Any) -> str | None:
    """sha256 of model.safetensors: from the converted folder's manifest when recorded, else hashed."""
    from mlx_clap.io.files import sha256_file

    folder = getattr(model, "source_dir", None)
    if folder is None:
        return None
    folder = Path(folder)
    try:
        recorded = (
            json.loads((folder / "manifest.json").read_text()).get("files", {}).get("model.safetensors")
        )
        if recorded:
            return str(recorded)
    except (OSError, ValueError, AttributeError):
        pass
    weights = folder / "model.safetensors"
    return sha256_file(weights) if weights.is_file() else None


def recorded_model_id(model_id: str) -> str:
    """How the manifest names the model: a local one by its absolute path, so the store can be searched
    from any folder; a hub id as typed."""
    local = Path(model_id).expanduser()
    return str(local.resolve()) if local.exists() else model_id


def wanted_settings(long_audio: str, seed: int | None, quantize_int16: bool, compute_dtype: str) -> dict:
    """The settings a store's manifest must record for a run to add to it (known before the model loads)."""
    return {
        "long_audio": long_audio,
        "seed": seed if long_audio == "reference" else None,
        "quantize_int16": bool(quantize_int16),
        "compute_dtype": compute_dtype,
    }


def pipeline_settings(
    model: Any, long_audio: str, seed: int | None, quantize_int16: bool, compute_dtype: str
) -> dict:
    """Every setting that shapes a vector: the run's choices plus the model's frontend."""
    return {
        **wanted_settings(long_audio, seed, quantize_int16, compute_dtype),
        "sample_rate": int(model.config.feature_config.sampling_rate),
        "decode": DECODE_NOTE,
        "feature_config": model.config.feature_config.to_dict(),
    }


def build_manifest(model: Any, model_id: str, settings: dict, store_dtype: str | None) -> dict:
    """The manifest of an output: the tool, the model and its weights, the settings, the store dtype."""
    from mlx_clap.version import __version__

    return {
        "tool": "mlx-clap embed",
        "mlx_clap_version": __version__,
        "model": recorded_model_id(model_id),
        "model_source": model.config.source or (str(model.source_dir) if model.source_dir else None),
        "weights_sha256": weights_sha256(model),
        "embedding_dim": int(model.embedding_dim),
        "store_dtype": store_dtype,
        "settings": settings,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def segment_settings(model: Any, hop: float) -> dict:
    """The segment layout of a store: windows of the model's clip length every `hop` seconds, or for a
    frame-level model (PE-Audio Frame) segments pooled from its frames, each one hop long."""
    family = model.family
    if getattr(family, "pools_frames", False):
        return {"hop": float(hop), "window": family.segment_seconds(hop)}
    return {"hop": float(hop), "window": family.clip_samples / family.sampling_rate}
