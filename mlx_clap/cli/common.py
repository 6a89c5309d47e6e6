"""What several commands share: the --model option (one default-model rule) and loading it clearly."""

from __future__ import annotations

from typing import Any

import click

from mlx_clap.cli.output import printable
from mlx_clap.settings import DEFAULT_MODEL
from mlx_clap.sync.manifest import weights_sha256  # noqa: F401 (the commands' import of it)

MODEL_ENV = "MLX_CLAP_MODEL"

model_option = click.option(
    "--model",
    "model_id",
    default=DEFAULT_MODEL,
    envvar=MODEL_ENV,
    show_envvar=True,
    show_default=True,
    help="Model: a converted folder, a Hugging Face CLAP folder, a LAION .pt or a hub id.",
)

# Reusable on every command that takes --model: pickled checkpoints are read with torch's weights-only
# unpickler unless the user opts in here (a released LAION .pt needs it; it can run code from the file).
trust_pickle_option = click.option(
    "--trust-pickle",
    "trust_pickle",
    is_flag=True,
    help="Allow a pickled checkpoint (LAION .pt, pytorch_model.bin, msclap .pth) that holds more than "
    "tensors to be fully unpickled. Unpickling can run code from the file: use it only for files from a "
    "source you trust.",
)


def load_model_or_exit(model_id: str, dtype: str = "float32", trust_pickle: bool = False) -> Any:
    """mlx_clap.load with a user-facing error (offline, unknown id, broken folder)."""
    from mlx_clap.loading import load

    try:
        model = load(model_id, dtype=dtype, trust_pickle=trust_pickle)
    except Exception as exc:
        raise click.ClickException(f"cannot load model {model_id!r}: {exc}") from exc
    if has_random_weights(model):
        click.echo(
            f"warning: {printable(model.source_dir)} has RANDOM weights (mlx-clap random-model): "
            "its vectors mean nothing",
            err=True,
        )
    return model


def has_random_weights(model: Any) -> bool:
    """Whether the loaded model's folder is marked random-init (`mlx-clap random-model`)."""
    from mlx_clap.convert.random_init import has_random_weights as folder_is_random

    return folder_is_random(getattr(model, "source_dir", None))


def describe_model(model: Any) -> dict[str, Any]:
    """A family-independent summary of a loaded model (for `info`)."""
    fam = model.family
    info: dict[str, Any] = {
        "folder": str(model.source_dir) if model.source_dir else None,
        "family": fam.name,
        "source": getattr(model.config, "source", None),
        "embedding_dim": model.embedding_dim,
        "sampling_rate": fam.sampling_rate,
        "clip_seconds": round(fam.clip_samples / fam.sampling_rate, 3),
        "template": fam.default_template,
        "random_weights": has_random_weights(model),
    }
    try:
        fam.tokenizer  # noqa: B018
        info["tokenizer"] = True
    except RuntimeError:
        info["tokenizer"] = False
    info.update(fam.describe())
    return info
