"""The library behind the page: one store, its model kept warm, and the questions the page asks.

Queries are vectors: a text's or a dropped sound's embedding, or a stored row's (or segment's) own vector
for "more like this". They are answered by exact search (`ExactSearch`: every row of an in-memory matrix
in the stored dtype when the vectors fit a budget, else `FlatIndex` streaming the store), on the
request's thread. A store with segments is searched segment by segment; results are then files, each with
its best segment, the stretch of matching windows around it (merged as `search --segments` merges them:
windows at z >= 2 within one hop; playback starts there) and the scores of all its segments for the file
view's timeline. A store without segments (or a store class without the segment API) is searched file by
file. Every score comes with its z-score (`mlx_clap.search.calibration`): how many standard deviations it
lies above the query's mean score over a fixed sample of the store.

MLX work (the model, clustering, duplicates) runs on one thread of its own (`MLXThread`),
one call at a time: MLX streams belong to the thread that made them, the page's requests arrive on
Starlette's worker threads (or, under a test client, on a thread that ends), and the model's own
worker pool and compile cache (`mlx_clap.ops.parallel`) are not made for two callers at once. Queries
(text embeddings, searches) go first: a dropped sound is decoded on the request's thread, at most its
first MAX_QUERY_SECONDS, and embedded WINDOWS_PER_CALL windows per call, so a text query waits for one
such call at most, never for a whole file; the map and duplicate groups also yield to queries.
"""

from __future__ import annotations

import gc
import itertools
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlx_clap.search.index import clip_cosine
from mlx_clap.search.segments import DEFAULT_MIN_Z, merge_gap, stretch_around

RESIDENT_BYTES = 1 << 30  # vectors kept in memory (in the stored dtype) up to this size, else streamed
MAX_K = 200
CANDIDATES_PER_RESULT = 8  # segments fetched per wanted file
MIN_CANDIDATES = 64
MAX_TEXT = 1000
MAX_GROUPS = 200
# Rows a query's scores are calibrated on (z-score), drawn as mlx_clap.search.calibration draws them:
# z from 20k rows is within ~1% of z from every row (std error of a std estimate ~ 1/sqrt(2n)).
CALIBRATION_ROWS = 20_000
# A dropped sound is embedded up to this length (decoded no further): a 10-hour upload must not hold the
# model for minutes. Its windows go to the model this many at a time (one batch; queries run between).
MAX_QUERY_SECONDS = 600
WINDOWS_PER_CALL = 8
QUERY, BACKGROUND = 0, 1  # MLXThread lanes: lower runs first


class QueryError(ValueError):
    """A query the library cannot answer; `status` is the HTTP status, `str()` says why."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class MLXThread:
    """A daemon thread with its own MLX stream that runs the calls handed to it, one at a time: queries
    (`call`) before background work (`call_background`), each lane in the order it came.

    A daemon that never exits, as `mlx_clap.ops.parallel`'s workers: a thread that has run an
    `mx.compile`d function aborts the process when it ends (MLX 0.32)."""

    _shared: MLXThread | None = None
    _shared_lock = threading.Lock()

    def __init__(self) -> None:
        self.tasks: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()  # ties in a lane: first come, first served
        threading.Thread(target=self._work, name="mlx-clap-serve", daemon=True).start()

    @classmethod
    def shared(cls) -> MLXThread:
        """The process's one MLX thread (made on first use)."""
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def _work(self) -> None:
        import mlx.core as mx

        with mx.stream(mx.new_stream(mx.default_device())):
            while True:
                _, _, (fn, args, kwargs, future) = self.tasks.get()
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:  # re-raised in the caller by Future.result()
                    future.set_exception(exc)

    def submit(self, lane: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        """Queue fn(*args, **kwargs) in `lane` (QUERY or BACKGROUND); its Future."""
        future: Future = Future()
        self.tasks.put((lane, next(self._order), (fn, args, kwargs, future)))
        return future

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """fn(*args, **kwargs) on the MLX thread, ahead of background work; waits and returns (or raises)."""
        return self.submit(QUERY, fn, *args, **kwargs).result()

    def call_background(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """As `call`, after every query waiting (an audio embed's batch, clustering, duplicates)."""
        return self.submit(BACKGROUND, fn, *args, **kwargs).result()


def clock(seconds: float) -> str:
    """m:ss, or h:mm:ss from an hour on."""
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def decode_head(path: Path, rate: int, seconds: float) -> tuple[np.ndarray, float | None]:
    """The first `seconds` of a file, mono float32 at `rate` Hz, decoded no further; and the file's
    length in seconds when it is longer (float("inf") when the header does not say how long)."""
    from mlx_clap.preprocess.audio import AudioStream

    limit = int(round(seconds * rate))
    stream = AudioStream(path, rate)
    blocks = iter(stream)
    parts: list[np.ndarray] = []
    n = 0
    try:
        for block in blocks:
            parts.append(block[: limit + 1 - n])  # one sample past the limit tells "longer"
            n += parts[-1].size
            if n > limit:
                break
    finally:
        blocks.close()  # closes the decoder's file
    wave = np.concatenate(parts) if len(parts) != 1 else parts[0]
    if n <= limit:
        return wave, None
    total = stream.duration_s
    return wave[:limit], (total if total > seconds else float("inf"))


class SegmentRows:
    """A store's segment vectors in the shape `FlatIndex` reads (rows = segments)."""

    def __init__(self, store: Any, view: Any):
        self.path = Path(store.path)
        self.dim = int(view.dim)
        self.items: list[dict[str, Any]] = []
        self.manifest = store.manifest
        self.view = view

    def __len__(self) -> int:
        return len(self.view)

    def iter_shards(self) -> Iterator[tuple[int, np.ndarray]]:
        return self.view.iter_blocks()


def segment_view(store: Any) -> Any | None:
    """The store's SegmentView when it has segments (None for stores without, or without the API)."""
    if not getattr(store, "has_segments", False) or not hasattr(store, "segment_view"):
        return None
    view = store.segment_view()
    return view if len(view) else None


@dataclass
class Ranked:
    """One query's best rows (or segments), best first, with the query's calibration; `scores_of`
    gives the query's scores of any index range (a file's segments, for its timeline)."""

    rows: np.ndarray
    scores: np.ndarray
    calibration: Any
    scores_of: Callable[[int, int], np.ndarray]


def top_k(scores: np.ndarray, k: int, exclude: tuple[int, int] = (0, 0)) -> tuple[np.ndarray, np.ndarray]:
    """The k best of `scores` outside [exclude[0], exclude[1]), by score then index (as FlatIndex)."""
    lo, hi = exclude
    if hi > lo:
        scores = scores.copy()
        scores[lo:hi] = -np.inf
    k = min(k, scores.size - max(0, hi - lo))
    idx = np.argpartition(-scores, k - 1)[:k] if k < scores.size else np.arange(scores.size)
    idx = idx[np.lexsort((idx, -scores[idx]))]
    return idx.astype(np.int64), scores[idx]


class ExactSearch:
    """Exact top-k by cosine over one set of vectors (the file rows, or the segments).

    Held in memory as one matrix in the stored dtype when it fits RESIDENT_BYTES: a query then scores
    every row (`exact.all_scores`: NumKong on float16 rows with the query split in two float16 parts,
    BLAS sgemv on float32 ones; float32-product accuracy, no row converted), and those scores give the
    calibration sample for free. A larger set streams through `FlatIndex` (each block scored as it is
    read, in the stored dtype), with the sample's vectors kept instead. Neither runs MLX, so a search
    runs on the request's thread and never waits behind the model.
    """

    def __init__(self, rows: Any, take: Callable[[np.ndarray], np.ndarray], mlx: MLXThread):
        from mlx_clap.search.calibration import sample_rows
        from mlx_clap.search.index import FlatIndex, iter_blocks

        self.n, self.dim, self.take, self.mlx = len(rows), int(rows.dim), take, mlx
        self.sample = sample_rows(self.n, CALIBRATION_ROWS)
        self.matrix: np.ndarray | None = None
        self.flat = None
        blocks = iter_blocks(rows)
        first_block = next(blocks, None)
        itemsize = 4 if first_block is None else first_block[1].dtype.itemsize
        if self.n * self.dim * itemsize <= RESIDENT_BYTES:
            dtype = np.float32 if first_block is None else first_block[1].dtype
            self.matrix = np.empty((self.n, self.dim), dtype=dtype)
            for first, block in itertools.chain([first_block] if first_block else [], blocks):
                self.matrix[first : first + block.shape[0]] = block
        else:
            blocks.close()
            self.flat = FlatIndex(rows)
            self.sample_vectors = take(self.sample)

    def search(self, q: np.ndarray, k: int, exclude: tuple[int, int] = (0, 0)) -> Ranked:
        """The k best for the unit query `q`, leaving out indexes exclude[0] .. exclude[1] - 1."""
        from mlx_clap.search import exact
        from mlx_clap.search.calibration import Calibration

        if self.matrix is not None:
            every = exact.all_scores(exact.row_blocks(self.matrix), q, self.n)[0]
            rows, scores = top_k(every, k, exclude)
            return Ranked(rows, scores, Calibration.fit(every[self.sample]), lambda a, b: every[a:b])
        res = self.flat.search(q, k, exclude=list(range(*exclude)))
        keep = res.rows[0] >= 0
        return Ranked(
            res.rows[0][keep],
            res.scores[0][keep],
            Calibration.fit(self.sample_vectors @ q),
            lambda a, b: self.take(np.arange(a, b, dtype=np.int64)) @ q,
        )


def freeze_loaded() -> None:
    """Leave everything loaded so far out of the cyclic garbage collector, for a server process.

    The store's items and the model live as long as the server; frozen (`gc.freeze`), they are no
    longer walked by the collector's full passes, which take ~50 ms over a 100k-item store and would
    land, now and then, inside a query."""
    gc.collect()
    gc.freeze()


def item_summary(items: list[dict[str, Any]], row: int) -> dict[str, Any]:
    """What the page shows of a file row."""
    it = items[row]
    path = str(it["path"])
    duration = it.get("duration")
    return {
        "row": row,
        "name": os.path.basename(path),
        "folder": os.path.dirname(path),
        "path": path,
        "duration": None if duration is None else round(float(duration), 3),
    }


class Library:
    """A store and its model, answering the page's questions (see the module docstring)."""

    def __init__(self, store: Any, model: Any, *, audio_options: dict[str, Any] | None = None):
        from mlx_clap.search.index import RowReader

        self.store = store
        self.items: list[dict[str, Any]] = store.items
        self.model = model
        self.audio_options = dict(audio_options or {})
        self.mlx = MLXThread.shared()
        family = getattr(model, "family", None)
        if family is not None:
            import mlx.core as mx

            # Weights load lazily, as graph nodes on this thread's stream, which the MLX thread cannot
            # run: materialize them here, as mlx_clap.ops.parallel does before its workers start.
            mx.eval(family.text_modules, family.audio_modules)
        from mlx_clap.search.lance_index import ann_search

        self.rows = RowReader(store)
        # The store's Lance vector index when it has one (`mlx-clap index`), else exact search.
        self.files = ann_search(store, "file", self.rows.take, CALIBRATION_ROWS) or ExactSearch(
            store, self.rows.take, self.mlx
        )
        self.view = segment_view(store)
        self.segments = None
        if self.view is not None:
            self.segments = ann_search(store, "segment", self.view.take, CALIBRATION_ROWS) or ExactSearch(
                SegmentRows(store, self.view), self.view.take, self.mlx
            )
            self._index_file_segments()
        self._duplicates: dict[float, list[Any]] = {}
        self._map_lock = threading.Lock()

    def _index_file_segments(self) -> None:
        """seg_first[row], seg_end[row]: each file's run of segments (-1 for a file with none)."""
        fi = np.asarray(self.view.file_index, dtype=np.int64)
        cuts = np.flatnonzero(np.diff(fi)) + 1
        starts = np.concatenate([[0], cuts]).astype(np.int64)
        ends = np.concatenate([cuts, [fi.size]]).astype(np.int64)
        self.seg_first = np.full(len(self.items), -1, dtype=np.int64)
        self.seg_end = np.full(len(self.items), -1, dtype=np.int64)
        self.seg_first[fi[starts]] = starts
        self.seg_end[fi[starts]] = ends
        self.seg_start = np.asarray(self.view.start, dtype=np.float64)
        self.seg_stop = np.asarray(self.view.end, dtype=np.float64)
        self.seg_file = fi
        self.gap = merge_gap(self.view, getattr(self.store, "segment_settings", None))  # as search --segments

    # ------------------------------------------------------------------------------------- queries
    def warm(self) -> None:
        """Run one text query end to end, so the first real one pays no first-call costs."""
        self.search(self.text_vector("warm up"), 1)

    def text_vector(self, text: str) -> np.ndarray:
        """The unit embedding of a description."""
        text = text.strip() if isinstance(text, str) else ""
        if not text:
            raise QueryError("type a description to search for")
        if len(text) > MAX_TEXT:
            raise QueryError(f"the description is longer than {MAX_TEXT} characters")
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate ("\ud800" in the JSON): no tokenizer takes it
                raise QueryError("the description is not valid Unicode text") from None
        try:
            return self.mlx.call(self.model.embed_text, [text])[0]
        except RuntimeError as exc:  # a model folder without tokenizer files
            raise QueryError(f"text search is not available: {exc}", 500) from exc

    def text_search(self, text: str, k: int = 20) -> dict[str, Any]:
        """`search` for a description's embedding (one call: the page's text query)."""
        return self.search(self.text_vector(text), k)

    def audio_vector(self, path: Path, label: str) -> tuple[np.ndarray, list[str]]:
        """The unit embedding of an uploaded sound (decoded with the store's embedding settings), and
        notes for the page. At most its first MAX_QUERY_SECONDS are decoded (here, on the caller's
        thread) and embedded, WINDOWS_PER_CALL windows per MLX call, so queries run in between."""
        from mlx_clap.preprocess.audio import AudioDecodeError
        from mlx_clap.preprocess.windows import WindowMean, clip_windows

        family = self.model.family
        try:
            wave, total = decode_head(path, family.sampling_rate, MAX_QUERY_SECONDS)
        except AudioDecodeError as exc:
            raise QueryError(f"{label}: {exc.cause}") from exc
        notes = []
        if total is not None:
            of = "" if total == float("inf") else f" of {clock(total)}"
            notes.append(f"embedded the first {clock(MAX_QUERY_SECONDS)}{of}")
        options = dict(self.audio_options)
        mode = options.pop("long_audio", "windows-mean")
        embed = self.model.embed_waveforms
        try:
            if mode != "windows-mean":  # one window, or one bounded call on the whole (capped) clip
                return self.mlx.call_background(embed, [wave], long_audio=mode, **options)[0], notes
            # The windows embed_waveforms would take, each one embedded as its own clip, then averaged
            # as it averages them (mean of unit vectors, renormalized).
            windows = list(clip_windows(wave, family.clip_samples, "windows-mean"))
            acc = WindowMean(1, self.model.embedding_dim)
            for i in range(0, len(windows), WINDOWS_PER_CALL):
                part = windows[i : i + WINDOWS_PER_CALL]
                rows = self.mlx.call_background(embed, part, long_audio="windows-mean", **options)
                acc.add(rows, [0] * len(part))
            return acc.result()[0], notes
        except ValueError as exc:  # a waveform the model refuses (e.g. empty)
            raise QueryError(f"{label}: {exc}") from exc

    def row_vector(self, row: int) -> np.ndarray:
        """A stored file row's vector."""
        self.check_row(row)
        return self.rows.take(np.array([row]))[0]

    def segment_vector(self, row: int, segment: int) -> np.ndarray:
        """A stored segment's vector; it must be one of file row `row`'s segments."""
        self.check_row(row)
        if self.view is None or not 0 <= segment < len(self.view):
            raise QueryError(f"no segment {segment} in the store", 404)
        if int(self.seg_file[segment]) != row:
            raise QueryError(f"segment {segment} is not a segment of row {row}")
        return self.view.take(np.array([segment], dtype=np.int64))[0]

    def check_row(self, row: int) -> None:
        """QueryError 404 unless `row` is a row of the store."""
        if not 0 <= row < len(self.items):
            raise QueryError(f"no row {row} in the store (it holds {len(self.items)})", 404)

    def search(self, query: np.ndarray, k: int = 20, *, exclude_row: int | None = None) -> dict[str, Any]:
        """The k files closest to `query` (best first), by segment when the store has segments.

        `exclude_row` leaves one file out (the file a "more like this" started from)."""
        if not 1 <= k <= MAX_K:
            raise QueryError(f"k must be from 1 to {MAX_K}")
        from mlx_clap.search.index import SearchError, unit_queries

        t0 = time.perf_counter()
        try:
            q = unit_queries(query, self.store.dim)[0]
        except SearchError as exc:
            raise QueryError(str(exc)) from exc
        if self.segments is not None:
            results, notes = self._search_segments(q, k, exclude_row)
        else:
            results, notes = self._search_files(q, k, exclude_row)
        searched = self.segments if self.segments is not None else self.files
        return {
            "results": results,
            "notes": [*getattr(searched, "notes", []), *notes],  # an index says how much it covers
            "segments": self.segments is not None,
            "took_ms": round((time.perf_counter() - t0) * 1000, 2),
        }

    def _search_files(self, q: np.ndarray, k: int, exclude_row: int | None) -> tuple[list, list]:
        exclude = (0, 0) if exclude_row is None else (exclude_row, exclude_row + 1)
        if len(self.items) - (exclude[1] - exclude[0]) < 1:
            return [], ["the store holds no other file"]
        ranked = self.files.search(q, k, exclude)
        out = []
        for row, score in zip(ranked.rows, ranked.scores, strict=True):
            out.append({**item_summary(self.items, int(row)), **self._score(float(score), ranked)})
        return out, []

    def _search_segments(self, q: np.ndarray, k: int, exclude_row: int | None) -> tuple[list, list]:
        exclude = (0, 0)
        if exclude_row is not None and self.seg_first[exclude_row] >= 0:
            exclude = (int(self.seg_first[exclude_row]), int(self.seg_end[exclude_row]))
        available = len(self.view) - (exclude[1] - exclude[0])
        if available < 1:
            return [], ["the store holds no other segment"]
        # A file's overlapping windows crowd the top: fetch several per wanted file, list each file once.
        ranked = self.segments.search(q, max(MIN_CANDIDATES, k * CANDIDATES_PER_RESULT), exclude)
        threshold = ranked.calibration.score_for_z(DEFAULT_MIN_Z)
        out: list[dict[str, Any]] = []
        seen: set[int] = set()
        for seg, score in zip(ranked.rows, ranked.scores, strict=True):
            if len(out) == k:
                break
            row = int(self.seg_file[seg])
            if row in seen:
                continue  # a file is listed once, at its best segment
            seen.add(row)
            a, b = int(self.seg_first[row]), int(self.seg_end[row])
            file_scores = ranked.scores_of(a, b)
            start, end, windows = stretch_around(
                self.seg_start[a:b], self.seg_stop[a:b], file_scores, int(seg) - a, threshold, self.gap
            )
            out.append(
                {
                    **item_summary(self.items, row),
                    **self._score(float(score), ranked),
                    "segment": int(seg),
                    "start": round(start, 3),
                    "end": round(end, 3),
                    "windows": windows,
                    "best_start": round(float(self.seg_start[seg]), 3),
                    "best_end": round(float(self.seg_stop[seg]), 3),
                    "timeline": self._timeline(a, b, file_scores),
                }
            )
        return out, []

    @staticmethod
    def _score(score: float, ranked: Ranked) -> dict[str, float]:
        """The cosine and its z-score: standard deviations above the query's mean score over the
        store's sample (raw cosines differ between models, and between text and audio queries)."""
        return {"score": round(clip_cosine(score), 4), "z": round(float(ranked.calibration.z(score)), 2)}

    def _segment_times(self, a: int, b: int) -> dict[str, list]:
        """Start and end seconds of segments a..b-1 (one file's)."""
        return {
            "start": [round(float(v), 3) for v in self.seg_start[a:b]],
            "end": [round(float(v), 3) for v in self.seg_stop[a:b]],
        }

    def _timeline(self, a: int, b: int, scores: np.ndarray) -> dict[str, list]:
        """Segments a..b-1 (one file's) with their scores for the query (the file view's strip)."""
        return {**self._segment_times(a, b), "score": [round(clip_cosine(v), 4) for v in scores]}

    # ---------------------------------------------------------------------------------- other views
    def item(self, row: int) -> dict[str, Any]:
        """A file row's details, with its segment times when the store has segments."""
        self.check_row(row)
        it = self.items[row]
        out = {
            **item_summary(self.items, row),
            "size": it.get("size"),
            "channels": it.get("channels"),
            "source_rate": it.get("source_rate"),
        }
        if self.view is not None and self.seg_first[row] >= 0:
            a, b = int(self.seg_first[row]), int(self.seg_end[row])
            out["segments"] = {"first": a, **self._segment_times(a, b)}
        return out

    def duplicates(self, threshold: float) -> dict[str, Any]:
        """Near-duplicate groups at cosine >= threshold (computed once per threshold, then cached)."""
        from mlx_clap.search.index import near_duplicates

        if not 0.5 <= threshold <= 1.0:
            raise QueryError("threshold must be a cosine from 0.5 to 1")
        threshold = round(threshold, 6)  # the README's 0.99958 stays 0.99958
        t0 = time.perf_counter()
        groups = self._duplicates.get(threshold)
        if groups is None:
            groups = self.mlx.call_background(near_duplicates, self.store, threshold)
            self._duplicates[threshold] = groups
        return {
            "threshold": threshold,
            "count": len(groups),
            "groups": [
                {
                    "score": round(clip_cosine(g.score), 4),
                    "min_score": round(clip_cosine(g.min_score), 4),
                    "items": [item_summary(self.items, r) for r in g.rows],
                }
                for g in groups[:MAX_GROUPS]
            ],
            "took_ms": round((time.perf_counter() - t0) * 1000, 1),
        }

    def library_map(self) -> tuple[dict[str, Any], list[str]]:
        """The 2-D map (see `layout`). The projection (minutes at 100k files) runs on the caller's thread,
        so queries keep the MLX thread; only the k-means colouring goes there, as background work. One
        map is made at a time: a second request waits for the first and reads its cache."""
        from mlx_clap.serve.layout import library_map

        with self._map_lock:
            return library_map(self.store, on_mlx=self.mlx.call_background)

    def describe(self) -> dict[str, Any]:
        """The store at a glance, for the page's header."""
        from mlx_clap.store.schema import model_id

        return {
            "store": str(self.store.path),
            "items": len(self.items),
            "segments": 0 if self.view is None else len(self.view),
            "dim": self.store.dim,
            "model": model_id(self.store.manifest),
            "max_k": MAX_K,
        }
