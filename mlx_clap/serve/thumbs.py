"""Waveform thumbnails: the peak level of a file (or of a time range of it) in a fixed number of buckets.

The file is decoded as a stream at its own sample rate (a lower rate would drop what lies above its
Nyquist frequency, and a hi-hat would draw as silence) and folded into a 100 Hz envelope as it goes,
so memory stays small for an hour-long recording; the buckets are then taken from that envelope.
Envelopes are kept in a small in-memory cache keyed by the file's path, size and mtime.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

ENVELOPE_RATE = 100  # envelope values per second
MAX_BUCKETS = 2000
CACHE_ENTRIES = 512


def envelope(path: str | Path, rate: int) -> np.ndarray:
    """Peak |sample| per 1/ENVELOPE_RATE s of the file (mono, decoded at `rate` Hz), float32;
    AudioDecodeError when it cannot be decoded."""
    from mlx_clap.preprocess.audio import AudioStream

    hop = max(1, rate // ENVELOPE_RATE)
    parts: list[np.ndarray] = []
    carry = np.zeros(0, dtype=np.float32)
    for block in AudioStream(path, rate):
        x = np.concatenate([carry, np.abs(block)]) if carry.size else np.abs(block)
        whole = x.size - x.size % hop
        if whole:
            parts.append(x[:whole].reshape(-1, hop).max(axis=1))
        carry = x[whole:]
    if carry.size:
        parts.append(np.array([carry.max()], dtype=np.float32))
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, dtype=np.float32)


def bucket_peaks(env: np.ndarray, buckets: int, start: float | None = None, end: float | None = None) -> list:
    """`buckets` peak values (0..1, scaled to the loudest bucket) of the envelope between start and end s."""
    lo = 0 if start is None else max(0, int(start * ENVELOPE_RATE))
    hi = env.size if end is None else min(env.size, int(np.ceil(end * ENVELOPE_RATE)))
    part = env[lo:hi]
    if part.size == 0:
        return [0.0] * buckets
    starts = np.minimum(np.linspace(0, part.size, buckets + 1)[:-1].astype(np.int64), part.size - 1)
    # reduceat gives a bucket narrower than one envelope value that value (not silence): short clips
    # drawn in many buckets look like themselves.
    peaks = np.maximum.reduceat(part, starts)
    top = float(peaks.max())
    scaled = peaks / top if top > 0 else peaks
    return [round(float(v), 3) for v in scaled]


class PeakCache:
    """Envelopes of recently drawn files, least recently used dropped first; safe across threads."""

    def __init__(self, entries: int = CACHE_ENTRIES):
        self.entries = entries
        self._cache: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def peaks(
        self,
        path: Path,
        key: tuple,
        rate: int,
        buckets: int,
        start: float | None = None,
        end: float | None = None,
    ) -> list:
        """Bucketed peaks of `path` decoded at `rate` Hz; `key` identifies its content (path, size, mtime)."""
        with self._lock:
            env = self._cache.get(key)
            if env is not None:
                self._cache.move_to_end(key)
        if env is None:
            env = envelope(path, rate)  # decoded outside the lock: other thumbnails need not wait
            with self._lock:
                self._cache[key] = env
                while len(self._cache) > self.entries:
                    self._cache.popitem(last=False)
        return bucket_peaks(env, buckets, start, end)
