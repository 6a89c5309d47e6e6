"""`mlx-clap search | dedupe | cluster | classify`: questions asked of an embedding store or of files.

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
    trust_pickle_option,
    weights_sha256,
)
from mlx_clap.cli.output import printable

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
    if path.is_absolute() or path.exists():
        return source
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
    help="flat: exact, every vector scored; ann: the usearch index `mlx-clap index STORE` built (an error "
    "when it is missing or out of date); auto: ann when an up-to-date index exists, else flat. A search "
    "never builds an index.",
)
@store_model_option
@trust_pickle_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with the backend that answered).")
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
    trust_pickle: bool = False,
) -> None:
    """Search a store by text, by an audio file, or by an item already in it.

    k larger than the store (or than the filtered rows) returns every row, with a note on stderr.
    Text and audio queries use the store's model (from its manifest) unless --model is given. Which
    backend answered is noted on stderr (a "backend" field with --json). Control characters in paths
    are printed escaped (\\n, \\x1b, ...); --json keeps the exact names.

    \b
    Example:
      mlx-clap search vectors/ --text "a dog barking" -k 5
      mlx-clap search vectors/ --audio query.wav --glob "*.flac" --json
      mlx-clap search vectors/ --like ~/Sounds/rain.wav
      mlx-clap index vectors/ && mlx-clap search vectors/ --text "rain" --backend ann
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
            raise click.ClickException(
                f"{printable(store_path)}: --like {printable(like)}: not in the store"
            ) from exc
        query = RowReader(store).take(np.array([row]))[0]
        exclude = [row]
        label = {"like": like}
    else:
        clap = load_store_model(store, store_override(store, model), trust_pickle=trust_pickle)
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
        index = open_index(store, backend)
        mask = path_mask(store.items, globs, contains)
        result = index.search(query, k, mask=mask, exclude=exclude)
    except SearchError as exc:
        raise click.ClickException(f"{printable(store_path)}: {exc}") from exc
    for n in [*getattr(index, "notes", []), *result.notes]:
        note(n)
    if not as_json:
        how = "exact" if index.name == "flat" else "approximate, rescored exactly"
        note(f"backend: {index.name} ({how})")
    hits = result.hits(store.items)
    if as_json:
        emit_json(
            {
                "query": label,
                "backend": index.name,
                "k": len(hits),
                "notes": [*getattr(index, "notes", []), *result.notes],
                "results": [{"rank": i + 1, **h.to_dict()} for i, h in enumerate(hits)],
            }
        )
        return
    for i, h in enumerate(hits, 1):
        click.echo(f"{i:>3}  {h.score:.4f}  {printable(h.path)}")


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
            click.echo(f"    {printable(store.items[r]['path'])}")


# ------------------------------------------------------------------------------------------ cluster
@click.command()
@click.argument("store_path", metavar="STORE", type=click.Path(file_okay=False, path_type=Path))
@click.option("-k", "k", type=int, required=True, help="Number of clusters.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the k-means++ start.")
@click.option("--max-iter", type=int, default=100, show_default=True)
@click.option(
    "--members",
    "members",
    type=click.IntRange(0, None),
    default=0,
    show_default=True,
    help="List up to N member paths under each cluster, most typical (closest to its centre) first.",
)
@click.option("--show-members", is_flag=True, help="List every member of every cluster.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print JSON (the summary, with a `members` list per cluster under --members/--show-members; "
    "every row's label is in clusters.json).",
)
def cluster(
    store_path: Path, k: int, seed: int, max_iter: int, members: int, show_members: bool, as_json: bool
) -> None:
    """Cluster a store with spherical k-means; print each cluster's size and medoid (most typical item).

    Columns: cluster id, size, mean cosine of the members to the cluster centre, medoid path.
    Writes STORE/clusters.json: the parameters, one summary per cluster and `labels`, the cluster id
    of each row in items.jsonl order. Cluster 0 is the largest.

    \b
    Example:
      mlx-clap cluster vectors/ -k 20 --seed 0
      mlx-clap cluster vectors/ -k 5 --members 3
      mlx-clap cluster vectors/ -k 5 --show-members --json > clusters-with-members.json
    """
    from mlx_clap.search.cluster import ClusterError, spherical_kmeans, write_assignments

    store = open_store(store_path)
    try:
        result = spherical_kmeans(store, k, seed=seed, max_iter=max_iter)
        path = write_assignments(store, result)  # ClusterError too: clusters.json a folder, read-only store
    except ClusterError as exc:
        raise click.ClickException(str(exc)) from exc
    summary = result.summary(store.items)
    limit = None if show_members else members
    if limit != 0:
        for c, rows in zip(summary, cluster_members(store, result, limit), strict=True):
            c["members"] = [str(store.items[r]["path"]) for r in rows]
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
    click.echo(f"{'id':>4}  {'size':>7}  {'cosine':>6}  medoid")
    for c in summary:
        click.echo(f"{c['id']:>4}  {c['size']:>7}  {c['mean_cosine']:>6.3f}  {printable(c['medoid_path'])}")
        for m in c.get("members", []):
            click.echo(f"{'':>4}  {'':>7}  {'':>6}    {printable(m)}")
        if "members" in c and len(c["members"]) < c["size"]:
            click.echo(f"{'':>4}  {'':>7}  {'':>6}    ... {c['size'] - len(c['members'])} more")
    if not result.converged:
        note(f"stopped after {result.iterations} iterations before converging (raise --max-iter)")
    click.echo(f"assignments written to {path}", err=True)


def cluster_members(store: Any, result: Any, limit: int | None) -> list[list[int]]:
    """Each cluster's rows, closest to its centre first (ties: store order), at most `limit` each.

    One pass over the shards scores every row against its own centroid, so memory stays O(n)."""
    scores = np.empty(len(store.items), dtype=np.float32)
    for first, shard in store.iter_shards():
        block = np.asarray(shard, dtype=np.float32)
        own = result.centroids[result.labels[first : first + block.shape[0]]]
        scores[first : first + block.shape[0]] = np.einsum("ij,ij->i", block, own)
    out = []
    for c in range(result.k):
        rows = np.nonzero(result.labels == c)[0]
        rows = rows[np.lexsort((rows, -scores[rows]))]
        out.append([int(r) for r in (rows if limit is None else rows[:limit])])
    return out


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
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--labels", help='Comma-separated labels, e.g. "dog,rain,siren".')
@click.option("--labels-file", type=click.Path(dir_okay=False, path_type=Path), help="One label per line.")
@click.option(
    "--template",
    default=None,
    help='Prompt around each label; "{}" marks the label ("" uses the bare label). '
    'Default: the model\'s own (LAION "This is a sound of {}.", msclap "this is the sound of {}").',
)
@store_model_option
@trust_pickle_option
@click.option("--top", type=int, default=3, show_default=True, help="Labels shown per file.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (all labels' probabilities).")
def classify(
    paths: tuple[Path, ...],
    labels: str | None,
    labels_file: Path | None,
    template: str | None,
    model: str,
    top: int,
    as_json: bool,
    trust_pickle: bool = False,
) -> None:
    """Zero-shot classification: the probability of each label for each audio file.

    A PATH may also be a store folder: its stored vectors are classified without decoding audio, with
    the model its manifest names (unless --model is given). The probabilities are a softmax over the
    labels given, so they always sum to 1: with a single label it always scores 1.000 (a note says so;
    --json has "single_label": true). A file that cannot be read is reported on stderr (and under
    "failures" with --json); the others are still classified and the exit status is 1.

    \b
    Example:
      mlx-clap classify dog.wav rain.flac --labels "dog barking,rain,siren"
      mlx-clap classify clips/*.wav --labels-file labels.txt --top 1 --json
      mlx-clap classify vectors/ --labels "dog,rain"
    """
    names = parse_labels(labels, labels_file)
    if template and "{}" not in template:
        raise click.BadParameter('must contain "{}" where the label goes (or be "")', param_hint="--template")
    if top < 1:
        raise click.BadParameter("must be at least 1", param_hint="--top")
    failures: list[dict[str, str]] = []
    files: list[Path] = []
    stores: list[Any] = []
    for p in paths:
        if p.is_dir() and (p / "manifest.json").is_file():
            stores.append(open_store(p))
        elif p.is_dir():
            raise click.ClickException(f"{printable(p)}: is a folder; give audio files or an embedding store")
        elif not p.exists() and not p.is_symlink():
            failures.append(classify_failure(p, "no such file or folder"))
        else:
            files.append(p)
    groups: list[tuple[Any, list[tuple[str, np.ndarray]]]] = []  # (model, [(name, unit embedding)])
    if files:
        clap = load_model(model, trust_pickle=trust_pickle)  # --model, else $MLX_CLAP_MODEL, else default
        rows = embed_files(clap, files, failures)
        if rows:
            groups.append((clap, rows))
    for store in stores:
        clap = load_store_model(store, store_override(store, model), trust_pickle=trust_pickle)
        m = store.matrix()
        groups.append((clap, [(str(it["path"]), m[i]) for i, it in enumerate(store.items)]))
    results = []
    used_template = template
    for clap, rows in groups:
        used_template = clap.family.default_template if template is None else template
        try:
            probs = clap.classify(np.stack([r[1] for r in rows]), names, template=used_template or None)
        except RuntimeError as exc:  # a model folder without tokenizer files
            raise click.ClickException(str(exc)) from exc
        results += [(name, probs[i]) for i, (name, _) in enumerate(rows)]
    report_classification(results, names, used_template, min(top, len(names)), failures, as_json)
    if failures:
        sys.exit(1)


def classify_failure(path: Path, cause: str) -> dict[str, str]:
    """Report a file classify cannot read, on stderr at once, and keep it for the JSON and exit status."""
    click.echo(f"error: {printable(path)}: {printable(cause)}", err=True)
    return {"path": str(path), "error": cause}


def embed_files(clap: Any, files: list[Path], failures: list[dict[str, str]]) -> list[tuple[str, np.ndarray]]:
    """Unit embeddings of the files that decode; the others go to `failures` and the rest go on."""
    from mlx_clap.preprocess.audio import AudioDecodeError

    try:
        return [(str(f), e) for f, e in zip(files, clap.embed_audio(files), strict=True)]
    except AudioDecodeError:
        pass  # find the bad files one by one; the good ones still get classified
    rows = []
    for f in files:
        try:
            rows.append((str(f), clap.embed_audio([f])[0]))
        except AudioDecodeError as exc:
            failures.append(classify_failure(f, getattr(exc, "cause", None) or str(exc)))
    return rows


def report_classification(
    results: list[tuple[str, np.ndarray]],
    names: list[str],
    template: str | None,
    top: int,
    failures: list[dict[str, str]],
    as_json: bool,
) -> None:
    """Print the top labels per file (or JSON with every probability and the failures)."""
    single = len(names) == 1
    if single:
        note(
            f"only one label ({printable(names[0])}): probabilities are a softmax over the labels given, so "
            "a single label always scores 1.000; give two or more labels to compare"
        )
    orders = [np.argsort(-p, kind="stable") for _, p in results]
    if as_json:
        emit_json(
            {
                "labels": names,
                "template": template,
                "single_label": single,
                "results": [
                    {
                        "path": name,
                        "top": [names[j] for j in order[:top]],
                        "probs": {names[j]: round(float(p[j]), 6) for j in order},
                    }
                    for (name, p), order in zip(results, orders, strict=True)
                ],
                "failures": failures,
            }
        )
        return
    for (name, p), order in zip(results, orders, strict=True):
        best = ", ".join(f"{printable(names[j])} {p[j]:.3f}" for j in order[:top])
        click.echo(f"{printable(name)}\t{best}")
