"""mlx-clap: CLAP (Contrastive Language-Audio Pretraining) in MLX.

    import mlx_clap
    model = mlx_clap.load("laion/clap-htsat-unfused")      # hub id, Hugging Face folder or converted folder
    audio = model.embed_audio(["dog.wav", "rain.flac"])     # (2, 512) unit vectors
    text = model.embed_text(["a dog barking", "rain"])      # (2, 512)
    probs = model.classify("dog.wav", ["dog", "rain"])      # zero-shot

`load` returns an `Embedder` (`mlx_clap.pipeline`); its `.model` is the MLX module (`ClapModel` or
`MsClapModel`). Importing this package has no side effects and imports nothing heavy: BLAS rebinding
and allocator tuning happen in `load()` on a Linux CPU (see `mlx_clap.settings` for the opt-outs).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlx_clap.version import __version__

if TYPE_CHECKING:
    from mlx_clap.models.clap import ClapModel
    from mlx_clap.models.msclap.model import MsClapModel
    from mlx_clap.pipeline import Embedder

__all__ = [
    "load",
    "Embedder",
    "ClapModel",
    "MsClapModel",
    "embed_audio",
    "embed_text",
    "classify",
    "__version__",
]


def load(
    source: str | Path | None = None,
    dtype: Any = None,
    revision: str | None = None,
    trust_pickle: bool = False,
) -> Embedder:
    """Load a model (default `$MLX_CLAP_MODEL`, else laion/clap-htsat-unfused); see `mlx_clap.loading.load`.

    `trust_pickle=True` allows a pickled checkpoint that holds more than tensors (released LAION `.pt`
    files) to be fully unpickled, which can run code from the file: only for files you trust.
    """
    from mlx_clap.loading import load as _load

    return _load(source, dtype=dtype, revision=revision, trust_pickle=trust_pickle)


def embed_audio(model: Embedder, inputs: Any, **kwargs: Any) -> Any:
    """Shorthand for `model.embed_audio(inputs, **kwargs)`."""
    return model.embed_audio(inputs, **kwargs)


def embed_text(model: Embedder, texts: Any, **kwargs: Any) -> Any:
    """Shorthand for `model.embed_text(texts, **kwargs)`."""
    return model.embed_text(texts, **kwargs)


def classify(model: Embedder, audio: Any, labels: Any, **kwargs: Any) -> Any:
    """Shorthand for `model.classify(audio, labels, **kwargs)`."""
    return model.classify(audio, labels, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "ClapModel":
        from mlx_clap.models.clap import ClapModel

        return ClapModel
    if name == "MsClapModel":
        from mlx_clap.models.msclap.model import MsClapModel

        return MsClapModel
    if name == "Embedder":
        from mlx_clap.pipeline import Embedder

        return Embedder
    raise AttributeError(name)
