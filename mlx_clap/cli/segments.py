"""`mlx-clap timeline | recurring`, and the segment hits behind `search --segments`.

All three read the per-window vectors of a store made with `mlx-clap embed --segments`. Scores are
shown with their calibration (z: standard deviations above the query's mean score over the store's
windows; percentile: the share of windows scoring at or below), since raw cosines differ between
models and between text and audio queries.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from mlx_clap.cli.common import trust_pickle_option
from mlx_clap.cli.output import printable
from mlx_clap.cli.stores import (
    emit_json,
    load_model,
    load_store_model,
    note,
    open_store,
    query_vector,
    store_model_option,
    store_override,
)
from mlx_clap.cli.targets import STORE

PROGRESS_EVERY_S = 5.0  # a long `recurring` run says where it is this often (stderr)


# ------------------------------------------------------------------------------------------ helpers
def store_segments(store: Any, store_path: Path | str) -> Any:
    """The store's SegmentView, or ClickException when it keeps no segments."""
    view = store.segment_view() if getattr(store, "has_segments", False) else None
    if view is None or len(view) == 0:
        raise click.ClickException(
            f"{printable(store_path)}: the store has no segments (made without --segments; "
            "embed again with --segments)"
        )
    return view


def clock(seconds: float) -> str:
    """Seconds as M:SS.s (H:MM:SS.s from an hour on)."""
    tenths = int(round(float(seconds) * 10))
    h, rest = divmod(tenths, 36000)
    m, rest = divmod(rest, 600)
    s = rest / 10
    return f"{h}:{m:02d}:{s:04.1f}" if h else f"{m}:{s:04.1f}"


def _throttled(every_s: float = PROGRESS_EVERY_S):
    """A progress callback that prints a message to stderr at most every `every_s` seconds."""
    last = [time.monotonic()]

    def report(message: str) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s:
            last[0] = now
            note(message)

    return report


# -------------------------------------------------------------------------------- search --segments
def segment_results(store: Any, view: Any, queries: np.ndarray, **opts: Any) -> list[Any]:
    """`search_segments`'s answer with each query's calibration (`SegmentResult`s), for `queries`
    ((m, dim) or (dim,)).

    `opts` are `search_segments`'s (k, threshold | min_z | min_percentile, gap, min_length,
    file_mask); gap defaults to the store's hop. ClickException naming the store on bad options.
    """
    from mlx_clap.search.index import SearchError
    from mlx_clap.search.segments import merge_gap, segment_search

    try:
        if opts.get("gap") is None:
            opts["gap"] = merge_gap(view, getattr(store, "segment_settings", None))
        return segment_search(view, queries, **opts)
    except SearchError as exc:
        raise click.ClickException(f"{printable(store.path)}: {exc}") from exc


def hit_dicts(store: Any, results: list[Any]) -> list[dict[str, Any]]:
    """The segments of `segment_results` as JSON-ready dicts, query by query, best first: {"query",
    "rank", "path", "file_index", "start", "end", "best_start", "windows", "score", "z", "percentile"}."""
    return [
        {"query": qi, "rank": rank, **seg.to_dict(store.items)}
        for qi, res in enumerate(results)
        for rank, seg in enumerate(res.segments, 1)
    ]


def segment_hits(store: Any, view: Any, queries: np.ndarray, **opts: Any) -> list[dict[str, Any]]:
    """The best segments for `queries` as `hit_dicts` (`opts` as `segment_results` takes them)."""
    return hit_dicts(store, segment_results(store, view, queries, **opts))


def why_empty(
    result: Any,
    *,
    threshold: float | None = None,
    min_z: float | None = None,
    min_percentile: float | None = None,
    min_length: float = 0.0,
) -> str | None:
    """Why a query's segment search found nothing, with the best window's z (None when it found some):
    otherwise an empty answer gives no idea whether the query came close."""
    from mlx_clap.search.index import clip_cosine
    from mlx_clap.search.segments import DEFAULT_MIN_Z

    if result.segments:
        return None
    if not np.isfinite(result.best_score):
        return "no window to score: no file the filter keeps has segments"
    if result.passed:
        return (
            f"{result.passed} windows reached the threshold, but every stretch of them is shorter than "
            f"--min-length {min_length:g} s"
        )
    if threshold is not None:
        cut = f"score >= {threshold:g}"
    elif min_percentile is not None:
        cut = f"percentile >= {min_percentile:g}"
    elif min_z is not None:
        cut = f"z >= {min_z:g}"
    else:
        cut = f"z >= {DEFAULT_MIN_Z:g} (the default; --min-z lowers it)"
    pct = float(result.calibration.percentile(result.best_score))
    return (
        f"no segment reached {cut}; the best window has z {result.best_z:.2f} "
        f"(score {clip_cosine(result.best_score):.4f}, percentile {pct:.2f})"
    )


def print_segment_hits(hits: list[dict[str, Any]], notes: list[str] | None = None) -> None:
    """Plain text: rank, cosine, z, percentile, start-end and path per hit (a header per query when
    there are several). `notes` go to stderr first; without any, an empty answer gets a generic one."""
    for n in notes or []:
        note(n)
    if not hits:
        if not notes:
            note("no segment reached the threshold")
        return
    several = len({h["query"] for h in hits}) > 1
    current = None
    for h in hits:
        if several and h["query"] != current:
            current = h["query"]
            click.echo(f"query {current + 1}:")
        span = f"{clock(h['start'])}-{clock(h['end'])}"
        click.echo(
            f"{h['rank']:>3}  {h['score']:.4f}  z {h['z']:5.2f}  {h['percentile']:6.2f}%  "
            f"{span:>17}  {printable(h['path'])}"
        )


# ------------------------------------------------------------------------------------------ timeline
@click.command()
@click.argument("file", metavar="FILE")
@click.option(
    "--store",
    "store_path",
    type=STORE,
    help="The store (made with --segments) that holds FILE. Not needed with a frame-level model "
    "(--model, e.g. PE-Audio Frame), which scores FILE's own 40-ms frames.",
)
@click.option("--text", "text", help="Score every window against this description.")
@click.option(
    "--audio", "audio", type=click.Path(dir_okay=False, path_type=Path), help="Score against this sound."
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "json", "audacity"]),
    default="csv",
    show_default=True,
    help="csv / json: every window (start, end, score, z); audacity: a label track of the stretches "
    "at or above --min-z (or --threshold), importable with File > Import > Labels. With a frame-level "
    "model: every frame (start, end, score, probability), json adds the merged spans.",
)
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@click.option(
    "--min-z",
    type=float,
    default=None,
    help="z-score a window needs to be labelled (audacity; default 2.0).",
)
@click.option(
    "--threshold",
    type=click.FloatRange(-1.0, 1.0),
    default=None,
    help="Cosine a window needs to be labelled (audacity), instead of --min-z. With a frame-level "
    "model: the probability a frame needs to be in a span (default 0.5, the model's own decision).",
)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write here instead of stdout.")
@store_model_option
@trust_pickle_option
def timeline(
    file: str,
    store_path: Path,
    text: str | None,
    audio: Path | None,
    fmt: str,
    as_json: bool,
    min_z: float | None,
    threshold: float | None,
    out: Path | None,
    model: str,
    trust_pickle: bool = False,
) -> None:
    """Score every segment (window) of one stored FILE against a text or a sound.

    z is the window's score in standard deviations above the query's mean score over all the store's
    windows, as in `search --segments`. FILE is a path as stored (or one that resolves to it).

    With a frame-level model (PE-Audio Frame: --model, or the store's) and --text, FILE itself is
    decoded and every 40-ms frame is scored with the model's own probability, sigmoid(scale * cosine
    + bias); frames at or above --threshold (default 0.5) merge into spans. --store is then optional:
    a store's segments are pooled frames, the timeline refines them from the frames on demand.

    \b
    Example:
      mlx-clap timeline show.mp3 --store vectors/ --text "applause"
      mlx-clap timeline show.mp3 --store vectors/ --text "applause" --format audacity --out applause.txt
      mlx-clap timeline show.mp3 --store vectors/ --audio jingle.wav --json
      mlx-clap timeline show.mp3 --model weights/pe-a-frame-base --text "crowd noise" --json
    """
    from mlx_clap.search.index import SearchError
    from mlx_clap.search.segments import format_timeline
    from mlx_clap.search.segments import timeline as file_timeline
    from mlx_clap.store import StoreError

    if (text is None) == (audio is None):
        raise click.UsageError("give exactly one of --text, --audio")
    if min_z is not None and threshold is not None:
        raise click.UsageError("give at most one of --min-z, --threshold")
    fmt = "json" if as_json else fmt
    if store_path is None:
        frames_model = load_model(model, trust_pickle=trust_pickle)
        if not is_frame_level(frames_model):
            raise click.UsageError(
                f"give --store: the model {model!r} gives no frame embeddings (timeline without a store "
                "needs a frame-level model, e.g. PE-Audio Frame)"
            )
        frame_timeline(frames_model, Path(file), text, audio, fmt, min_z, threshold, out, file)
        return
    store = open_store(store_path)
    try:
        row = store.row_of(file)
    except (StoreError, KeyError) as exc:
        raise click.ClickException(f"{printable(file)}: not in the store {printable(store_path)}") from exc
    if text is None:
        view = store_segments(store, store_path)
        vector, label = query_vector(store, text, audio, model, trust_pickle)
    else:
        # The model is loaded once: a frame-level one refines from FILE's frames (the store may hold
        # pooled segments or none), any other scores the store's windows.
        store_model = load_store_model(store, store_override(store, model), trust_pickle=trust_pickle)
        if is_frame_level(store_model):
            path = Path(str(store.items[row]["path"]))
            frame_timeline(store_model, path, text, audio, fmt, min_z, threshold, out, file)
            return
        view = store_segments(store, store_path)
        try:
            vector, label = np.asarray(store_model.embed_text([text])[0], dtype=np.float32), text
        except RuntimeError as exc:  # a model folder without tokenizer files
            raise click.ClickException(f"--text: {exc}") from exc
    try:
        rows = file_timeline(view, row, vector, sample=index_calibration_sample(store, view))
    except SearchError as exc:
        raise click.ClickException(f"{printable(store_path)}: {exc}") from exc
    if not rows:
        raise click.ClickException(f"{printable(file)}: has no segments in {printable(store_path)}")
    meta = {
        "path": str(store.items[row]["path"]),
        "query": {"text": text} if text is not None else {"audio": str(audio)},
    }
    body = format_timeline(rows, fmt, label=label, min_z=min_z, threshold=threshold, meta=meta)
    echo_or_write(body, out, f"{len(rows)} windows ({fmt})")


def echo_or_write(body: str, out: Path | None, what: str) -> None:
    """A timeline's text to stdout, or atomically to `out` (a one-line error naming it if it cannot be
    written), then "wrote WHAT to OUT" on stderr."""
    if out is None:
        click.echo(body, nl=False)
        return
    from mlx_clap.io.files import atomic_write_bytes

    try:
        atomic_write_bytes(out, body.encode("utf-8"))
    except OSError as exc:
        raise click.ClickException(f"{printable(out)}: cannot write: {exc.strerror or exc}") from exc
    note(f"wrote {what} to {printable(out)}")


def index_calibration_sample(store: Any, view: Any) -> int | None:
    """With a vector index (mlx_clap.search.lance_index) over more windows than a calibration sample:
    that sample size, with a note. `search --segments` through the index calibrates on the same sample,
    so a window's z agrees, and no query pays a pass over every window. Else None: every window."""
    from mlx_clap.search import calibration
    from mlx_clap.search.lance_index import coverage

    cov = coverage(store, "segment") if hasattr(store, "dataset") else None
    sample = calibration.DEFAULT_SAMPLE
    if cov is None or len(view) <= sample:
        return None
    note(f"{cov.note()}; z calibrated on a sample of {sample:,} windows, as index searches do")
    return sample


def is_frame_level(model: Any) -> bool:
    """Whether `model` gives frame embeddings (PE-Audio Frame)."""
    config = getattr(model, "config", None)
    return bool(getattr(config, "is_frame_level", False))


def frame_timeline(
    model: Any,
    path: Path,
    text: str | None,
    audio: Path | None,
    fmt: str,
    min_z: float | None,
    threshold: float | None,
    out: Path | None,
    shown: str,
) -> None:
    """`timeline` from the frames of a frame-level model: every 40-ms frame of `path` scored against
    `text` with the model's probability, and the merged spans at or above `threshold` (default 0.5)."""
    from mlx_clap.preprocess.audio import AudioDecodeError

    if audio is not None:
        raise click.UsageError(
            "a frame-level timeline scores a text (--text): the model's probability is for audio-text pairs"
        )
    if min_z is not None:
        raise click.UsageError(
            "--min-z is for a store's windows; frames are kept by the model's probability (--threshold)"
        )
    cut = 0.5 if threshold is None else threshold
    if not 0.0 <= cut <= 1.0:
        raise click.BadParameter(f"{cut:g} is not a probability (0 to 1)", param_hint="--threshold")
    try:
        scores = model.family.frame_scores(path, text)
    except AudioDecodeError as exc:
        raise click.ClickException(f"{printable(path)}: {getattr(exc, 'cause', None) or exc}") from exc
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"{printable(path)}: {exc}") from exc
    except RuntimeError as exc:  # a model folder without tokenizer files
        raise click.ClickException(f"--text: {exc}") from exc
    spans = scores.spans(cut)
    body = format_frames(scores, spans, fmt, text, cut, str(path))
    echo_or_write(body, out, f"{len(scores.starts)} frames, {len(spans)} spans ({fmt})")


def format_frames(
    scores: Any, spans: list[tuple[float, float, float]], fmt: str, text: str, threshold: float, path: str
) -> str:
    """A frame timeline as json (frames and spans), csv (every frame) or an Audacity label track
    (the spans, labelled "<text> <best probability>")."""
    import csv
    import io
    import json

    if fmt == "audacity":
        label = " ".join(text.split())  # tabs and line breaks would split the label track's line
        return "".join(f"{a:.6f}\t{b:.6f}\t{label} {p:.3f}\n" for a, b, p in spans)
    rows = zip(scores.starts, scores.ends, scores.cosines, scores.probabilities, strict=True)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["start", "end", "score", "probability"])
        for a, b, c, p in rows:
            writer.writerow([f"{a:.6f}", f"{b:.6f}", f"{c:.6f}", f"{p:.6f}"])
        return buf.getvalue()
    doc = {
        "path": path,
        "query": {"text": text},
        "hop": round(scores.hop_seconds, 6),
        "threshold": threshold,
        "spans": [
            {"start": round(a, 6), "end": round(b, 6), "probability": round(p, 6)} for a, b, p in spans
        ],
        "frames": [
            {
                "start": round(a, 6),
                "end": round(b, 6),
                "score": round(float(c), 6),
                "probability": round(float(p), 6),
            }
            for a, b, c, p in rows
        ],
    }
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


# ----------------------------------------------------------------------------------------- recurring
@click.command()
@click.argument("store_path", metavar="STORE", type=STORE)
@click.option(
    "--threshold",
    type=click.FloatRange(-1.0, 1.0),
    default=None,
    help="Cosine at or above which two windows match (default 0.9).",
)
@click.option(
    "--min-z",
    type=float,
    default=None,
    help="Instead of --threshold: match when the cosine is this many standard deviations above that "
    "of two random windows of the store.",
)
@click.option(
    "--min-occurrences",
    type=click.IntRange(2, None),
    default=2,
    show_default=True,
    help="Occurrences a group needs.",
)
@click.option(
    "--neighbors",
    "k_neighbors",
    type=click.IntRange(1, None),
    default=10,
    show_default=True,
    help="Nearest windows each window is compared with (ann backend).",
)
@click.option(
    "--backend",
    type=click.Choice(["auto", "ivf", "ann", "exact"]),
    default="auto",
    show_default=True,
    help="exact: every pair of windows (time grows with the square of their number); ivf: each window "
    "compared exactly with the windows of its nearest k-means partitions (those of the store's Lance "
    "index when it has about as many; 1M windows in minutes); ann: a usearch graph built for this run "
    "(the `ann` extra); auto: exact up to 20,000 windows, else ivf.",
)
@click.option(
    "--probes",
    type=click.IntRange(1, None),
    default=3,
    show_default=True,
    help="Nearest partitions each window is compared with (ivf backend).",
)
@click.option(
    "-k", "k", type=click.IntRange(0, None), default=20, show_default=True, help="Groups shown (0: all)."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (every group shown, with statistics).")
def recurring(
    store_path: Path,
    threshold: float | None,
    min_z: float | None,
    min_occurrences: int,
    k_neighbors: int,
    backend: str,
    probes: int,
    k: int,
    as_json: bool,
) -> None:
    """Find audio that recurs: jingles, music beds, idents, ads; across files or within one.

    Windows that match (cosine >= threshold) are linked, a window's own overlapping neighbours in the
    same file excepted; matching windows next to each other form one occurrence; linked occurrences
    form a group. Groups are listed largest first, each occurrence as path and start-end.

    \b
    Example:
      mlx-clap recurring vectors/
      mlx-clap recurring vectors/ --threshold 0.95 --min-occurrences 3 -k 5
      mlx-clap recurring vectors/ --json > recurring.json
    """
    from mlx_clap.search.index import SearchError, clip_cosine
    from mlx_clap.search.recurring import find_recurring

    if min_z is not None and threshold is not None:
        raise click.UsageError("give at most one of --threshold, --min-z")
    store = open_store(store_path)
    view = store_segments(store, store_path)
    settings = getattr(store, "segment_settings", None) or {}
    stats: dict[str, Any] = {}
    try:
        groups = find_recurring(
            view,
            threshold=threshold,
            min_z=min_z,
            min_occurrences=min_occurrences,
            k_neighbors=k_neighbors,
            backend=backend,
            probes=probes,
            window=settings.get("window"),
            hop=settings.get("hop"),
            progress=_throttled(),
            stats=stats,
        )
    except SearchError as exc:
        raise click.ClickException(f"{printable(store_path)}: {exc}") from exc
    for n in stats.get("notes", []):
        note(n)
    shown = groups if k == 0 else groups[:k]
    if as_json:
        emit_json(
            {
                "store": str(store_path),
                "stats": stats,
                "groups_found": len(groups),
                "groups": [g.to_dict(store.items) for g in shown],
            }
        )
        return
    note(
        f"{stats['backend']} backend, cosine >= {stats['threshold']:.4f}: {stats['pairs']} matching window "
        f"pairs, {len(groups)} groups ({stats['total_s']:.1f} s)"
    )
    if not groups:
        click.echo(f"nothing recurs at cosine >= {stats['threshold']:.4f} among {stats['windows']} windows")
        return
    for i, g in enumerate(shown, 1):
        files = len({o.file_index for o in g.occurrences})
        click.echo(
            f"group {i}: {len(g.occurrences)} occurrences in {files} file{'s' if files != 1 else ''}, "
            f"mean cosine {clip_cosine(g.score):.4f}"
        )
        for o in g.occurrences:
            span = f"{clock(o.start)}-{clock(o.end)}"
            click.echo(f"    {span:>17}  {printable(store.items[o.file_index]['path'])}")
    if len(shown) < len(groups):
        note(f"{len(groups) - len(shown)} more groups; -k 0 shows them all")
