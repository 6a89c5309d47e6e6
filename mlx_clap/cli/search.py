"""`mlx-clap search | dedupe | cluster | classify`: questions asked of an embedding store or of files.

Text and audio queries need the model the store was embedded with: it is taken from the store's
manifest (`--model` overrides it), and a model whose embedding size or weights differ from the
store's is refused, since vectors from two models do not share a space.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import numpy as np

from mlx_clap.cli.common import DEFAULT_MODEL, MODEL_ENV, load_model_or_exit, weights_sha256


# ------------------------------------------------------------------------------------------ helpers
def open_store(path: str | Path):
    """Open a store or raise ClickException naming it; an empty store is an error here too."""
    from mlx_clap.search.store import EmbeddingStore, StoreError

    try:
        store = EmbeddingStore.open(path, repair=False)
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


def load_model(source: str | None, dtype: str | None = None) -> Any:
    """Load a model (default: $MLX_CLAP_MODEL or DEFAULT_MODEL) with a user-facing error."""
    from mlx_clap import settings

    return load_model_or_exit(source or settings.current().model, dtype or "float32")


def load_store_model(store: Any, override: str | None) -> Any:
    """The store's model (or `override`), checked against the store's dimension and weights."""
    source = override or store_model_ref(store.manifest)["source"]
    if source is None:
        raise click.ClickException(
            f"{store.path}: the manifest names no model; pass --model with the model it was embedded with"
        )
    model = load_model(str(source), store_model_ref(store.manifest)["dtype"])
    check_store_model(store, model, str(source))
    return model


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


def note(message: str) -> None:
    click.echo(f"note: {message}", err=True)


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, ensure_ascii=False))


# ------------------------------------------------------------------------------------------- search
@click.command()
@click.argument("store_path", metavar="STORE", type=click.Path(file_okay=False, path_type=Path))
@click.option("--text", "text", help="Find the stored audio closest to this description.")
@click.option(
    "--audio", "audio", type=click.Path(dir_okay=False, path_type=Path), help="Find audio like this file."
)
@click.option("--like", "like", help="Find audio like this path already in the store (itself left out).")
@click.option("-k", "k", type=int, default=10, show_default=True, help="Number of results.")
@click.option("--glob", "globs", multiple=True, help="Only paths matching this glob (repeatable).")
@click.option("--contains", "contains", multiple=True, help="Only paths containing this text (repeatable).")
@click.option(
    "--backend",
    type=click.Choice(["auto", "flat", "ann"]),
    default="auto",
    show_default=True,
    help="flat: exact; ann: usearch graph saved next to the store; auto: ann from 1M vectors.",
)
@click.option("--model", help="Model folder or hub id; default: the one named in the store's manifest.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def search(
    store_path: Path,
    text: str | None,
    audio: Path | None,
    like: str | None,
    k: int,
    globs: tuple[str, ...],
    contains: tuple[str, ...],
    backend: str,
    model: str | None,
    as_json: bool,
) -> None:
    """Search a store by text, by an audio file, or by an item already in it.

    k larger than the store (or than the filtered rows) returns every row, with a note on stderr.

    \b
    Example:
      mlx-clap search vectors/ --text "a dog barking" -k 5
      mlx-clap search vectors/ --audio query.wav --glob "*.flac" --json
      mlx-clap search vectors/ --like ~/Sounds/rain.wav
    """
    from mlx_clap.search.index import RowReader, SearchError, open_index, path_mask

    given = [name for name, v in (("--text", text), ("--audio", audio), ("--like", like)) if v is not None]
    if len(given) != 1:
        raise click.UsageError("give exactly one of --text, --audio, --like")
    if k < 1:
        raise click.BadParameter("must be at least 1", param_hint="-k")
    store = open_store(store_path)
    exclude: list[int] = []
    if like is not None:
        from mlx_clap.search.store import StoreError

        try:
            row = store.row_of(like)
        except (StoreError, KeyError) as exc:
            raise click.ClickException(f"{store_path}: --like {like}: not in the store") from exc
        query = RowReader(store).take(np.array([row]))[0]
        exclude = [row]
        label = {"like": like}
    else:
        clap = load_store_model(store, model)
        if text is not None:
            try:
                query = clap.embed_text([text])[0]
            except RuntimeError as exc:  # a model folder without tokenizer files
                raise click.ClickException(f"--text: {exc}") from exc
            label = {"text": text}
        else:
            from mlx_clap.preprocess.audio import AudioDecodeError

            try:
                query = clap.embed_audio([audio], **embed_settings(store.manifest))[0]
            except AudioDecodeError as exc:
                raise click.ClickException(str(exc)) from exc
            label = {"audio": str(audio)}
    try:
        index = open_index(store, backend, progress=lambda m: click.echo(m, err=True))
        mask = path_mask(store.items, globs, contains)
        result = index.search(query, k, mask=mask, exclude=exclude)
    except SearchError as exc:
        raise click.ClickException(f"{store_path}: {exc}") from exc
    for n in result.notes:
        note(n)
    hits = result.hits(store.items)
    if as_json:
        emit_json(
            {
                "query": label,
                "backend": index.name,
                "k": len(hits),
                "notes": result.notes,
                "results": [{"rank": i + 1, **h.to_dict()} for i, h in enumerate(hits)],
            }
        )
        return
    for i, h in enumerate(hits, 1):
        click.echo(f"{i:>3}  {h.score:.4f}  {h.path}")


# ------------------------------------------------------------------------------------------- dedupe
@click.command()
@click.argument("store_path", metavar="STORE", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--threshold",
    type=click.FloatRange(-1.0, 1.0),
    default=0.97,
    show_default=True,
    help="Cosine at or above which two items count as near-duplicates.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def dedupe(store_path: Path, threshold: float, as_json: bool) -> None:
    """Groups of near-duplicate audio in a store (re-encodes, trims, gain changes), largest first.

    Items are grouped when linked by cosine >= threshold, directly or through other members. The
    store is compared with itself in tiles, so memory stays small; time grows with n^2 (about a
    minute for 100k items on a laptop CPU).

    \b
    Example:
      mlx-clap dedupe vectors/ --threshold 0.97
      mlx-clap dedupe vectors/ --json > duplicates.json
    """
    from mlx_clap.search.index import SearchError, near_duplicates

    store = open_store(store_path)
    try:
        groups = near_duplicates(store, threshold)
    except SearchError as exc:
        raise click.ClickException(f"{store_path}: {exc}") from exc
    if as_json:
        emit_json(
            {
                "store": str(store_path),
                "threshold": threshold,
                "items": len(store),
                "groups": [g.to_dict(store.items) for g in groups],
            }
        )
        return
    if not groups:
        click.echo(f"no near-duplicates at cosine >= {threshold} among {len(store)} items")
        return
    for i, g in enumerate(groups, 1):
        click.echo(
            f"group {i}: {len(g.rows)} items, mean cosine {g.score:.4f} (weakest link {g.min_score:.4f})"
        )
        for r in g.rows:
            click.echo(f"    {store.items[r]['path']}")


# ------------------------------------------------------------------------------------------ cluster
@click.command()
@click.argument("store_path", metavar="STORE", type=click.Path(file_okay=False, path_type=Path))
@click.option("-k", "k", type=int, required=True, help="Number of clusters.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the k-means++ start.")
@click.option("--max-iter", type=int, default=100, show_default=True)
@click.option(
    "--json", "as_json", is_flag=True, help="Print JSON (the summary; labels are in clusters.json)."
)
def cluster(store_path: Path, k: int, seed: int, max_iter: int, as_json: bool) -> None:
    """Cluster a store with spherical k-means; print each cluster's size and medoid (most typical item).

    Writes STORE/clusters.json: the parameters, one summary per cluster and `labels`, the cluster id
    of each row in items.jsonl order. Cluster 0 is the largest.

    \b
    Example:
      mlx-clap cluster vectors/ -k 20 --seed 0
    """
    from mlx_clap.search.cluster import ClusterError, spherical_kmeans, write_assignments

    store = open_store(store_path)
    try:
        result = spherical_kmeans(store, k, seed=seed, max_iter=max_iter)
    except ClusterError as exc:
        raise click.ClickException(str(exc)) from exc
    path = write_assignments(store, result)
    summary = result.summary(store.items)
    if as_json:
        emit_json(
            {
                "store": str(store_path),
                "k": k,
                "seed": seed,
                "iterations": result.iterations,
                "converged": result.converged,
                "assignments": str(path),
                "clusters": summary,
            }
        )
        return
    for c in summary:
        click.echo(f"{c['id']:>4}  {c['size']:>7}  {c['mean_cosine']:.3f}  {c['medoid_path']}")
    if not result.converged:
        note(f"stopped after {result.iterations} iterations before converging (raise --max-iter)")
    click.echo(f"assignments written to {path}", err=True)


# ----------------------------------------------------------------------------------------- classify
def parse_labels(labels: str | None, labels_file: Path | None) -> list[str]:
    """Labels from a comma-separated string or a file (one per line; blank lines and #comments skipped)."""
    if (labels is None) == (labels_file is None):
        raise click.UsageError("give exactly one of --labels or --labels-file")
    if labels is not None:
        out = [x.strip() for x in labels.split(",")]
    else:
        try:
            lines = labels_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise click.ClickException(f"{labels_file}: cannot read labels ({exc})") from exc
        out = [x.strip() for x in lines if not x.strip().startswith("#")]
    out = [x for x in out if x]
    if not out:
        raise click.ClickException("no labels given (empty --labels / --labels-file)")
    dupes = sorted({x for x in out if out.count(x) > 1})
    if dupes:
        raise click.ClickException(f"labels repeated: {', '.join(dupes)}")
    return out


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--labels", help='Comma-separated labels, e.g. "dog,rain,siren".')
@click.option("--labels-file", type=click.Path(dir_okay=False, path_type=Path), help="One label per line.")
@click.option(
    "--template",
    default=None,
    help='Prompt around each label; "{}" marks the label ("" uses the bare label). '
    'Default: the model\'s own (LAION "This is a sound of {}.", msclap "this is the sound of {}").',
)
@click.option("--model", help=f"Model folder or hub id [default: ${MODEL_ENV} or {DEFAULT_MODEL}].")
@click.option("--top", type=int, default=3, show_default=True, help="Labels shown per file.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (all labels' probabilities).")
def classify(
    paths: tuple[Path, ...],
    labels: str | None,
    labels_file: Path | None,
    template: str | None,
    model: str | None,
    top: int,
    as_json: bool,
) -> None:
    """Zero-shot classification: the probability of each label for each audio file.

    A PATH may also be a store folder: its stored vectors are classified without decoding audio
    (the model must be the store's).

    \b
    Example:
      mlx-clap classify dog.wav rain.flac --labels "dog barking,rain,siren"
      mlx-clap classify clips/*.wav --labels-file labels.txt --top 1 --json
    """
    from mlx_clap.preprocess.audio import AudioDecodeError

    names = parse_labels(labels, labels_file)
    if template and "{}" not in template:
        raise click.BadParameter('must contain "{}" where the label goes (or be "")', param_hint="--template")
    if top < 1:
        raise click.BadParameter("must be at least 1", param_hint="--top")
    clap = load_model(model)
    rows: list[tuple[str, np.ndarray]] = []  # (name, unit audio embedding)
    files = []
    for p in paths:
        if p.is_dir() and (p / "manifest.json").is_file():
            store = open_store(p)
            check_store_model(store, clap, model or "the default model")
            m = store.matrix()
            rows.extend((str(it["path"]), m[i]) for i, it in enumerate(store.items))
        elif p.is_dir():
            raise click.ClickException(f"{p}: is a folder; give audio files or an embedding store")
        else:
            files.append(p)
    if files:
        try:
            emb = clap.embed_audio(files)
        except AudioDecodeError as exc:
            raise click.ClickException(str(exc)) from exc
        rows = [(str(f), e) for f, e in zip(files, emb, strict=True)] + rows
    try:
        if template is None:
            template = clap.family.default_template
        probs = clap.classify(np.stack([r[1] for r in rows]), names, template=template or None)
    except RuntimeError as exc:  # a model folder without tokenizer files
        raise click.ClickException(str(exc)) from exc
    if top > len(names):
        top = len(names)
    order = np.argsort(-probs, axis=1, kind="stable")
    if as_json:
        emit_json(
            {
                "labels": names,
                "template": template,
                "results": [
                    {
                        "path": name,
                        "top": [names[j] for j in order[i, :top]],
                        "probs": {names[j]: round(float(probs[i, j]), 6) for j in order[i]},
                    }
                    for i, (name, _) in enumerate(rows)
                ],
            }
        )
        return
    for i, (name, _) in enumerate(rows):
        best = ", ".join(f"{names[j]} {probs[i, j]:.3f}" for j in order[i, :top])
        click.echo(f"{name}\t{best}")
