"""Microsoft CLAP (msclap 1.3.4) models in MLX: 2022 (Cnn14 + BERT) and 2023 (HTSAT-tiny + GPT-2).

    import mlx_clap
    model = mlx_clap.load("weights/msclap-2023")        # a folder written by convert/msclap.py
    audio = model.embed_audio(["dog.wav"])               # (1, 1024) unit vectors
    probs = model.classify("dog.wav", ["dog", "rain"])   # prompts "this is the sound of <label>"

See `model.py` for the differences from the LAION models (un-normalized tower outputs, one logit scale,
44.1 kHz input, 5/7-s clips). Nothing heavy is imported here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlx_clap.models.msclap.model import MsClapModel

__all__ = ["MsClapConfig", "MsClapModel", "load_msclap_folder", "is_msclap_folder"]


def is_msclap_folder(folder) -> bool:
    """True when `folder/config.json` is a converted msclap config (`"family": "msclap"`); never raises."""
    import json
    from pathlib import Path

    try:
        data = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("family") == "msclap"


def load_msclap_folder(folder, dtype: Any = None) -> MsClapModel:
    """Load a converted msclap folder (see `convert/msclap.py`)."""
    from mlx_clap.models.msclap.model import load_msclap_folder as _load

    return _load(folder, dtype=dtype)


def __getattr__(name: str):
    if name == "MsClapModel":
        from mlx_clap.models.msclap.model import MsClapModel

        return MsClapModel
    if name == "MsClapConfig":
        from mlx_clap.models.msclap.config import MsClapConfig

        return MsClapConfig
    raise AttributeError(name)
