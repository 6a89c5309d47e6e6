"""What the store commands share: the --model option of a store, opening a store with a clear error,
loading the model its manifest names (refusing one whose space differs), a progress bar, and output
helpers.

Text and audio queries need the model the store was embedded with: it is taken from the store's
manifest (`--model` overrides it), and a model whose embedding size or weights differ from the
store's is refused, since vectors from two models do not share a space.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
import numpy as np

from mlx_clap.cli.common import (
    DEFAULT_MODEL,
    MODEL_ENV,
    load_model_or_exit,
    weights_sha256,
)

# One default-model rule for every command (see mlx_clap.cli.common.model_option): --model, else
# $MLX_CLAP_MODEL, else DEFAULT_MODEL; except that a store is queried with the model named in its
# manifest unless --model is given on the command line (its vectors live in that model's space).
store_model_option = click.option(
    "--model",
    "model",
    default=DEFAULT_MODEL,
    envvar=MODEL_ENV,
    show_envvar=True,
    show_default=True,
    help="Model: a converted folder, a Hugging Face CLAP folder, a LAION .pt or a hub id. A store is "
    "queried with the model its manifest names unless --model is given.",
)


def model_given() -> bool:
    """Whether --model was typed on the command line (not taken from $MLX_CLAP_MODEL or the default)."""
    ctx = click.get_current_context()
    return ctx.get_parameter_source("model") == click.core.ParameterSource.COMMANDLINE


def store_override(store: Any, model: str) -> str | None:
    """The model to query `store` with instead of its manifest's: --model when given, else
    $MLX_CLAP_MODEL / the default only when the manifest names no model."""
    if model_given():
        return model
    return None if store_model_ref(store.manifest)["source"] else model


# ------------------------------------------------------------------------------------------ helpers
def holds_store(target: str | Path) -> bool:
    """Whether `target` holds a store: a Lance dataset (a local folder or an object-store URI), or one
    of an older mlx-clap (converted by the next `embed` that writes it)."""
    from mlx_clap.store import is_legacy, locate

    loc = locate(target)
    if loc.local is None:
        return bool(loc.version_files())
    return (loc.local / "_versions").is_dir() or is_legacy(loc)


def open_store(path: str | Path):
    """Open a store (a snapshot of its newest version) or raise ClickException naming it; an empty store
    is an error here too. A reader never writes: a store of an older mlx-clap is left for the next
    `embed` to convert."""
    from mlx_clap.store import LegacyStoreError, Store, StoreError

    try:
        store = Store.open(path)
    except LegacyStoreError as exc:
        raise click.ClickException(
            f"{path}: a store of an older mlx-clap; run `mlx-clap embed ... --out {path}` once (with the "
            "folders it was made from) to convert it, nothing is embedded again"
        ) from exc
    except StoreError as exc:
        raise click.ClickException(str(exc)) from exc
    if len(store) == 0:
        raise click.ClickException(f"{path}: the store is empty; embed some audio into it first")
    return store


def store_model_ref(manifest: dict[str, Any]) -> dict[str, Any]:
    """The model a store was embedded with, from the manifest `mlx-clap embed` writes:
    {"source": the --model it was given, "sha256": weights_sha256, "dtype": compute dtype}."""
    m = manifest.get("model")
    if isinstance(m, dict):  # tolerate a nested form: {"id"|"path", "weights_sha256"}
        source, sha = m.get("path") or m.get("id"), m.get("weights_sha256")
    else:
        source, sha = m, None
    settings = manifest.get("settings") or {}
    return {
        "source": source or manifest.get("model_source"),
        "sha256": sha or manifest.get("weights_sha256"),
        "dtype": settings.get("compute_dtype"),
    }


def load_model(source: str | None, dtype: str | None = None, trust_pickle: bool = False) -> Any:
    """Load a model (default: $MLX_CLAP_MODEL or DEFAULT_MODEL) with a user-facing error."""
    from mlx_clap import settings

    source = source or settings.current().model
    return load_model_or_exit(source, dtype or "float32", trust_pickle=trust_pickle)


def load_store_model(store: Any, override: str | None, trust_pickle: bool = False) -> Any:
    """The store's model (or `override`), checked against the store's dimension and weights."""
    source = override or store_model_ref(store.manifest)["source"]
    if source is None:
        raise click.ClickException(
            f"{store.path}: the manifest names no model; pass --model with the model it was embedded with"
        )
    if not override:
        source = recorded_model_path(store, str(source))
    model = load_model(str(source), store_model_ref(store.manifest)["dtype"], trust_pickle=trust_pickle)
    check_store_model(store, model, str(source))
    return model


def recorded_model_path(store: Any, source: str) -> str:
    """The manifest's model, with a relative path from an older store (which recorded --model as typed)
    resolved against the store folder's parent when it does not exist from here: the store was most
    likely made next to that folder."""
    path = Path(source).expanduser()
    if path.is_absolute() or path.exists() or not isinstance(store.path, Path):
        return source  # a store on an object store has no folder to look beside
    beside = Path(store.path).resolve().parent / path
    return str(beside) if beside.exists() else source


def check_store_model(store: Any, model: Any, source: str) -> None:
    """ClickException unless `model` makes vectors of the store's size, with the store's weights
    (when the manifest records their sha256 and the model came from a folder)."""
    ref = store_model_ref(store.manifest)
    if model.embedding_dim != store.dim:
        raise click.ClickException(
            f"{store.path}: holds {store.dim}-d vectors but model {source} makes {model.embedding_dim}-d "
            "ones; use the model the store was embedded with"
        )
    if ref["sha256"]:
        have = weights_sha256(model)
        if have is not None and have != ref["sha256"]:
            raise click.ClickException(
                f"{store.path}: was embedded with model {ref['source']} (weights sha256 "
                f"{ref['sha256'][:12]}...) but {source} has weights {have[:12]}...; vectors from different "
                "models are not comparable"
            )


def embed_settings(manifest: dict[str, Any]) -> dict[str, Any]:
    """Audio embedding options recorded in the manifest that `embed_audio` understands."""
    settings = manifest.get("settings") or {}
    out = {k: settings[k] for k in ("long_audio", "quantize_int16", "seed") if settings.get(k) is not None}
    return out


class VectorProgress:
    """A progress callback `(done, total)` drawing a bar of vectors on stderr. The bar is made on the
    first call, since only then is the total known; a run that reports nothing draws no bar."""

    def __init__(self, desc: str, quiet: bool) -> None:
        self.desc = desc
        self.quiet = quiet
        self.bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                unit="vec",
                desc=self.desc,
                disable=self.quiet,
                file=sys.stderr,
                dynamic_ncols=True,
            )
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def query_vector(
    store: Any, text: str | None, audio: Path | None, model: str, trust_pickle: bool = False
) -> tuple[np.ndarray, str]:
    """(unit query vector, label) from --text or --audio, embedded with the store's model (its audio
    settings from the manifest); ClickException naming the cause when that fails."""
    if (text is None) == (audio is None):
        raise click.UsageError("give exactly one of --text, --audio")
    clap = load_store_model(store, store_override(store, model), trust_pickle=trust_pickle)
    if text is not None:
        try:
            return np.asarray(clap.embed_text([text])[0], dtype=np.float32), text
        except RuntimeError as exc:  # a model folder without tokenizer files
            raise click.ClickException(f"--text: {exc}") from exc
    from mlx_clap.preprocess.audio import AudioDecodeError

    try:
        vec = clap.embed_audio([audio], **embed_settings(store.manifest))[0]
    except AudioDecodeError as exc:
        raise click.ClickException(str(exc)) from exc
    return np.asarray(vec, dtype=np.float32), Path(str(audio)).stem


def note(message: str) -> None:
    click.echo(f"note: {message}", err=True)


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, ensure_ascii=False))
