"""mlx-clap: CLAP (Contrastive Language-Audio Pretraining) in MLX.

    import mlx_clap
    model = mlx_clap.load("laion/clap-htsat-unfused")      # hub id or converted folder
    audio = model.embed_audio(["dog.wav", "rain.flac"])     # (2, 512) unit vectors
    text = model.embed_text(["a dog barking", "rain"])      # (2, 512)
    probs = model.classify("dog.wav", ["dog", "rain"])      # zero-shot

Nothing heavy is imported here until it is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Linux CPU: route MLX's matmuls to an optimized BLAS (no-op elsewhere; MLX_CLAP_BLAS=off opts out).
from mlx_clap.ops.blas import setup_blas as _setup_blas  # noqa: E402

_setup_blas()

if TYPE_CHECKING:
    from mlx_clap.models.clap import ClapModel

__all__ = ["load", "ClapModel", "embed_audio", "embed_text", "classify", "__version__"]


def load(source: str | Path, dtype: Any = None, **kwargs: Any) -> ClapModel:
    """Load a model from a converted folder, a Hugging Face model folder, a LAION `.pt` or a hub id.

    Hub ids are downloaded and converted into the cache once (see `mlx_clap.io.folder`).
    `dtype` is an MLX dtype or one of "float32", "float16", "bfloat16".
    """
    from mlx_clap.io.folder import load_model

    return load_model(source, dtype=dtype, **kwargs)


def embed_audio(model: ClapModel, inputs, **kwargs):
    """Shorthand for `model.embed_audio(inputs, **kwargs)`."""
    return model.embed_audio(inputs, **kwargs)


def embed_text(model: ClapModel, texts, **kwargs):
    """Shorthand for `model.embed_text(texts, **kwargs)`."""
    return model.embed_text(texts, **kwargs)


def classify(model: ClapModel, audio, labels, **kwargs):
    """Shorthand for `model.classify(audio, labels, **kwargs)`."""
    return model.classify(audio, labels, **kwargs)


def __getattr__(name: str):
    if name == "ClapModel":
        from mlx_clap.models.clap import ClapModel

        return ClapModel
    raise AttributeError(name)
