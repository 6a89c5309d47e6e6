"""The one windowing implementation: how a waveform longer than the model's clip becomes clips.

Both families use it (LAION 10-s windows at 48 kHz, msclap 5/7-s windows at 44.1 kHz), for whole arrays
and for streams alike:
- "windows-mean": consecutive windows from 0 with a hop of one window; a remainder adds one last window
  aligned to the end, so every window is full and every sample is covered; a clip of at most one window
  is itself (unpadded: each family fills short clips its own way);
- "head" / "center": the first / middle window;
- segments (`segment_windows`): windows every `hop` samples for time-resolved search, streamed together
  with the "windows-mean" windows so one pass gives both.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

WINDOWED_MODES = ("windows-mean", "head", "center")


def sliding_windows(blocks: Iterable[np.ndarray], length: int) -> Iterator[np.ndarray]:
    """Cut a stream of 1-D blocks into windows of `length` at hop `length`, plus an end-aligned last one.

    A stream of at most `length` samples yields itself once (unpadded); an empty stream yields nothing.
    Holds about two windows of samples (plus one block), whatever the stream's length.
    """
    buf = np.zeros(0, dtype=np.float32)
    prev: np.ndarray | None = None  # the last window yielded
    total = 0
    for block in blocks:
        block = np.asarray(block, dtype=np.float32).reshape(-1)
        total += block.size
        buf = np.concatenate([buf, block]) if buf.size else block
        # A full window stays in `buf` until more data arrives: it may be the last one.
        while buf.size > length:
            prev = buf[:length].copy()
            yield prev
            buf = buf[length:]
    if total == 0:
        return
    if prev is None or buf.size == length:
        yield buf
    else:
        # A remainder: the last window ends at the stream's end and overlaps the previous one.
        yield np.concatenate([prev, buf])[-length:]


def _next_start(s: int, length: int, hop: int) -> int:
    """The smallest regular start after `s`: the next multiple of `hop` or of `length`."""
    return min((s // hop + 1) * hop, (s // length + 1) * length)


def segment_windows(
    blocks: Iterable[np.ndarray], length: int, hop: int
) -> Iterator[tuple[int, np.ndarray, bool, bool]]:
    """(start_sample, window, is_segment, is_mean) for segment windows and "windows-mean" windows at once.

    Segments start at every multiple of `hop` whose window fits, plus one aligned to the stream's end; the
    mean set is `sliding_windows`' windows (same samples). Their union comes in increasing start order,
    each window once with flags saying which set it belongs to. A stream of at most `length` samples is
    one window (start 0, itself unpadded, both flags); an empty stream yields nothing. Windows are copies.
    Holds at most `length` samples plus the newest block, whatever the stream's length.
    """
    if length < 1 or hop < 1:
        raise ValueError(f"length and hop must be >= 1, got length={length}, hop={hop}")
    # Pending blocks cover samples [base, total). They are joined only when a window can be cut, so many
    # small blocks do not each copy the held samples.
    pending: list[np.ndarray] = []
    base = 0
    total = 0
    nxt = 0  # the next regular start (a multiple of hop or of length) not yet yielded
    for block in blocks:
        block = np.asarray(block, dtype=np.float32).reshape(-1)
        if block.size == 0:
            continue
        pending.append(block)
        total += block.size
        # A window that ends exactly at the (so far) last sample waits: it may be the end-aligned one,
        # which belongs to both sets, and only the stream's end says so.
        if nxt + length >= total:
            continue
        buf = np.concatenate(pending) if len(pending) > 1 else pending[0]
        while nxt + length < total:
            at = nxt - base
            yield nxt, buf[at : at + length].copy(), nxt % hop == 0, nxt % length == 0
            nxt = _next_start(nxt, length, hop)
        # Keep what the next regular window or the end-aligned one can still need; copied so a large
        # block is not kept alive by a view of it.
        keep = max(base, min(nxt, total - length))
        pending = [buf[keep - base :].copy()]
        base = keep
    if total == 0:
        return
    buf = np.concatenate(pending) if len(pending) > 1 else pending[0]
    # For n > length the window at n - length is always in both sets: either a regular start of a set or
    # that set's end-aligned window. For n <= length the whole clip is the one window of both.
    start = max(total - length, 0)
    yield start, buf[start - base :].copy(), True, True


def clip_windows(wave: np.ndarray, length: int, mode: str = "windows-mean") -> Iterator[np.ndarray]:
    """The clips that stand for one 1-D waveform in a windowed mode (see the module docstring)."""
    if mode not in WINDOWED_MODES:
        raise ValueError(f"mode must be one of {', '.join(WINDOWED_MODES)}, not {mode!r}")
    n = wave.shape[0]
    if n <= length or mode == "windows-mean":
        yield from sliding_windows([wave], length)
    elif mode == "head":
        yield wave[:length]
    else:
        start = (n - length) // 2
        yield wave[start : start + length]


class WindowMean:
    """Running float64 sums of unit window embeddings per item; `result()` is each item's renormalized mean.

    Rows are added one by one in the order they come, so any batching of the same windows gives the same
    sums (the order `np.add.at` would use).
    """

    def __init__(self, n_items: int, dim: int):
        self.sums = np.zeros((n_items, dim), dtype=np.float64)
        self.counts = np.zeros(n_items, dtype=np.int64)

    def add(self, rows: np.ndarray, owner: np.ndarray | list[int]) -> None:
        for row, item in zip(np.asarray(rows, dtype=np.float64), owner, strict=True):
            self.sums[item] += row
            self.counts[item] += 1

    def result(self) -> np.ndarray:
        norms = np.linalg.norm(self.sums, axis=1, keepdims=True)
        return (self.sums / np.maximum(norms, 1e-12)).astype(np.float32)


def pool_windows(rows: np.ndarray, owner: np.ndarray, n_items: int) -> np.ndarray:
    """Mean of the unit embeddings that belong to each item, renormalized (one row per item)."""
    acc = WindowMean(n_items, rows.shape[1])
    acc.add(rows, owner)
    return acc.result()


__all__ = [
    "WINDOWED_MODES",
    "WindowMean",
    "clip_windows",
    "pool_windows",
    "segment_windows",
    "sliding_windows",
]
