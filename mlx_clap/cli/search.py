"""`mlx-clap search | dedupe | cluster | classify`: questions asked of an embedding store or of files.

Text and audio queries are embedded with the model the store was embedded with (mlx_clap.cli.stores
says how it is chosen and checked).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
import numpy as np

from mlx_clap.cli.common import trust_pickle_option
from mlx_clap.cli.output import printable
from mlx_clap.cli.stores import (
    emit_json,
    holds_store,
    load_model,
    load_store_model,
    note,
    open_store,
    query_vector,
    store_model_option,
    store_override,
)
from mlx_clap.cli.targets import STORE


# ------------------------------------------------------------------------------------------- search
@click.command()
@click.argument("store_path", metavar="STORE", type=STORE)
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
    help="flat: exact, every vector scored; ann: the store's Lance vector index (`mlx-clap index STORE` "
    "builds it; an error when there is none); auto: the index when the store has one, else flat. Rows "
    "appended since the index was built are scored exactly and merged in; a search never builds an "
    "index. Which backend answered, and how much of the store its index covers, is noted on stderr.",
)
@click.option(
    "--segments",
    "segments",
    is_flag=True,
    help="Return time ranges inside files {path, start, end, score}: the stored windows (embed "
    "--segments) above the threshold, adjacent ones merged, best first, at most -k.",
)
@click.option(
    "--min-z", type=float, default=None, help="Keep results whose z-score reaches this (segments default 2)."
)
@click.option(
    "--min-percentile",
    type=click.FloatRange(0, 100),
    default=None,
    help="Keep results at or above this percentile.",
)
@click.option("--min-score", type=float, default=None, help="Keep results whose cosine reaches this.")
@click.option(
    "--gap",
    type=click.FloatRange(0),
    default=None,
    help="Segments: merge windows this many seconds apart (default: the hop).",
)
@click.option(
    "--min-length",
    type=click.FloatRange(0),
    default=0.0,
    show_default=True,
    help="Segments: drop shorter ones (seconds).",
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
    segments: bool,
    min_z: float | None,
    min_percentile: float | None,
    min_score: float | None,
    gap: float | None,
    min_length: float,
    model: str | None,
    as_json: bool,
    trust_pickle: bool = False,
) -> None:
    """Search a store by text, by an audio file, or by an item already in it.

    Every score comes with a calibration: raw CLAP cosines differ between models and between text and
    audio queries, so each result also gets its z-score (standard deviations above this query's mean
    score over the store) and percentile; --min-z / --min-percentile / --min-score keep results above
    such a threshold. --segments searches the per-window vectors of a store made with
    `embed --segments` and returns time ranges.

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
      mlx-clap search vectors/ --text "crowd noise" --segments --min-z 3 --json
    """
    from mlx_clap.search.index import RowReader, SearchError, path_mask
    from mlx_clap.search.lance_index import open_index

    given = [name for name, v in (("--text", text), ("--audio", audio), ("--like", like)) if v is not None]
    if len(given) != 1:
        raise click.UsageError("give exactly one of --text, --audio, --like")
    if k < 1:
        raise click.BadParameter("must be at least 1", param_hint="-k")
    store = open_store(store_path)
    view = None
    if segments:  # before the query is embedded: these need no model to say
        from mlx_clap.cli.segments import store_segments

        view = store_segments(store, store_path)
        if backend == "ann":
            from mlx_clap.search.lance_index import coverage

            if coverage(store) is None:
                raise click.ClickException(
                    f"{printable(store_path)}: --backend ann: the store has no ANN index; build it with: "
                    f"mlx-clap index {printable(store_path)} (or use --backend flat or auto)"
                )
    exclude: list[int] = []
    if like is not None:
        from mlx_clap.store import StoreError

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
        query, _ = query_vector(store, text, audio, model, trust_pickle)
        label = {"text": text} if text is not None else {"audio": str(audio)}
    if sum(v is not None for v in (min_z, min_percentile, min_score)) > 1:
        raise click.UsageError("give at most one of --min-z, --min-percentile, --min-score")
    if segments:
        search_segments_command(
            store, view, query, label, k=k, min_score=min_score, min_z=min_z,
            min_percentile=min_percentile, gap=gap, min_length=min_length,
            file_mask=path_mask(store.items, globs, contains), as_json=as_json, backend=backend,
        )  # fmt: skip
        return
    try:
        index = open_index(store, backend)
        mask = path_mask(store.items, globs, contains)
        result = index.search(query, k, mask=mask, exclude=exclude)
        cal = calibration_for(store, query)
    except SearchError as exc:
        raise click.ClickException(f"{printable(store_path)}: {exc}") from exc
    for n in [*getattr(index, "notes", []), *result.notes]:
        note(n)
    if not as_json:
        how = "exact" if index.name == "flat" else "Lance vector index, candidates rescored exactly"
        note(f"backend: {index.name} ({how})")
    hits = result.hits(store.items)
    threshold = min_score
    if min_z is not None:
        threshold = cal.score_for_z(min_z)
    elif min_percentile is not None:
        threshold = cal.score_for_percentile(min_percentile)
    if threshold is not None:
        hits = [h for h in hits if h.score >= threshold]
    rows = [
        {"rank": i + 1, **h.to_dict(), "z": round(float(cal.z(h.score)), 3),
         "percentile": round(float(cal.percentile(h.score)), 3)}
        for i, h in enumerate(hits)
    ]  # fmt: skip
    if as_json:
        emit_json(
            {
                "query": label,
                "backend": index.name,
                "k": len(hits),
                "calibration": cal.to_dict(),
                "notes": [*getattr(index, "notes", []), *result.notes],
                "results": rows,
            }
        )
        return
    if threshold is not None and not hits:
        note("no result reached the threshold")
    for r in rows:
        click.echo(
            f"{r['rank']:>3}  {r['score']:.4f}  z {r['z']:5.2f}  {r['percentile']:6.2f}%  "
            f"{printable(r['path'])}"
        )


def search_segments_command(
    store: Any,
    view: Any,
    query: np.ndarray,
    label: dict[str, Any],
    *,
    k: int,
    min_score: float | None,
    min_z: float | None,
    min_percentile: float | None,
    gap: float | None,
    min_length: float,
    file_mask: np.ndarray | None,
    as_json: bool,
    backend: str = "flat",
) -> None:
    """`search --segments`: the time ranges, with the backend, calibration and notes file search gives.
    `backend` "ann", or "auto" on a store with a vector index, asks the index for the nearest windows
    (mlx_clap.search.lance_index.ann_segment_search); otherwise every window is scored."""
    from mlx_clap.cli.segments import hit_dicts, print_segment_hits, segment_results, why_empty

    thresholds = dict(threshold=min_score, min_z=min_z, min_percentile=min_percentile)
    notes: list[str] = []
    used = "flat"
    if backend != "flat" and hasattr(store, "dataset"):
        from mlx_clap.search.index import SearchError
        from mlx_clap.search.lance_index import ann_segment_search, coverage
        from mlx_clap.search.segments import merge_gap

        if coverage(store) is not None:
            try:
                result, notes = ann_segment_search(
                    store, view, np.asarray(query), k=k, **thresholds,
                    gap=merge_gap(view, store.segment_settings) if gap is None else gap,
                    min_length=min_length, file_mask=file_mask,
                )  # fmt: skip
            except SearchError as exc:
                raise click.ClickException(f"{printable(store.path)}: {exc}") from exc
            used = "ann"
    if used == "flat":
        (result,) = segment_results(
            store, view, np.asarray(query)[None, :], k=k, **thresholds, gap=gap, min_length=min_length,
            file_mask=file_mask,
        )  # fmt: skip
    hits = hit_dicts(store, [result])
    empty = why_empty(result, **thresholds, min_length=min_length)
    notes = [*notes, empty] if empty else notes
    if as_json:
        emit_json(
            {
                "query": label,
                "segments": True,
                "backend": used,
                "k": len(hits),
                "calibration": result.calibration.to_dict(),
                "notes": notes,
                "results": hits,
            }
        )
        return
    if used == "flat":
        note(f"backend: flat (exact, every one of {len(view)} windows scored)")
    else:
        note("backend: ann (the windows nearest to the query, their files' windows scored exactly)")
    print_segment_hits(hits, notes)


def calibration_for(store: Any, query: np.ndarray) -> Any:
    """The query's score distribution over (a sample of) the store's file vectors."""
    from mlx_clap.search.calibration import calibrate_query
    from mlx_clap.search.index import RowReader

    return calibrate_query(RowReader(store).take, len(store), np.asarray(query))


# ------------------------------------------------------------------------------------------- dedupe
@click.command()
@click.argument("store_path", metavar="STORE", type=STORE)
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
    from mlx_clap.search.index import SearchError, clip_cosine, near_duplicates

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
            f"group {i}: {len(g.rows)} items, mean cosine {clip_cosine(g.score):.4f} "
            f"(weakest link {clip_cosine(g.min_score):.4f})"
        )
        for r in g.rows:
            click.echo(f"    {printable(store.items[r]['path'])}")


# ------------------------------------------------------------------------------------------ cluster
@click.command()
@click.argument("store_path", metavar="STORE", type=STORE)
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
    --json has "single_label": true). A sigmoid-trained model (PE-Audio) scores each label on its own,
    sigmoid(scale * cosine + bias): the probabilities do not sum to 1 and one label is fine. A file
    that cannot be read is reported on stderr (and under "failures" with --json); the others are
    still classified and the exit status is 1.

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
        if p.is_dir() and holds_store(p):
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
    # Sigmoid-trained models (PE-Audio) score each label on its own: one label is meaningful there.
    softmax = any(getattr(clap.family, "scores", None) is None for clap, _ in groups)
    report_classification(results, names, used_template, min(top, len(names)), failures, as_json, softmax)
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
    softmax: bool = True,
) -> None:
    """Print the top labels per file (or JSON with every probability and the failures)."""
    single = len(names) == 1
    if single and softmax:
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
