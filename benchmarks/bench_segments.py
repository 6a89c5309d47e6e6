"""Segment search, ANN over windows and recurring-segment detection on a synthetic window store.

    python benchmarks/bench_segments.py                  # 1,000,000 windows x 512 (about 12 min, 2 cores)
    python benchmarks/bench_segments.py --rows 200000    # a few minutes

The windows are laid out as a store's segment table is: float16 `.npy` blocks, memory-mapped, with
per-window file index, start and end (window 10 s, hop 2 s, one-hour files). Vectors are unit sums of
WINDOW/HOP consecutive "frames", so neighbouring windows share frames the way overlapping audio windows
do. Frames are drawn around "scenes" (2,000 random centres; a file changes scene every 30-120 s), so
windows of one scene are alike (cosine ~0.7) as the windows of one piece of music are, and the data
has the clustered shape real embeddings have (on structureless random vectors an HNSW graph of these
settings finds few true neighbours). Planted "jingles" (their own scene; frames copied with noise)
recur in several files and at two times of one file.

Measures, printed as a markdown table and written to benchmarks/results/segments-<date>[-tag].json:
- exact segment search (`search_segments`: every window scored, calibrated, merged): ms per query,
  one query at a time and a batch of queries, against the memory-bandwidth floor (one warm pass over
  the same bytes: an integer sum, and a float16 -> float32 sum);
- ANN (usearch HNSW over the windows, the settings `find_recurring` uses): build time, ms per query and
  recall@10 against the exact top 10, over a sweep of expansion_search;
- `find_recurring` over every window with that graph: neighbour search and grouping time, and how many
  planted jingles come back whole (all their occurrences in one group).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlx_clap.search.recurring import ANN_PARAMS, build_window_index, find_recurring  # noqa: E402
from mlx_clap.search.segments import score_windows, search_segments  # noqa: E402

DIM = 512
WINDOW, HOP = 10.0, 2.0
SPAN = int(WINDOW / HOP)  # frames per window
FILE_WINDOWS = 1800  # one hour at a 2 s hop
BLOCK_ROWS = 65536  # rows per .npy block (a store shard)
JINGLE_COPY_COS = 0.985  # frame copies: aligned windows of two occurrences at cosine ~0.97
SCENES = 2000
FRAME_WITHIN = 0.3  # cosine of two frames of one scene
SCENE_FRAMES = (15, 60)  # frames (2 s) a scene lasts


def scene_frames(rng: np.random.Generator, centres: np.ndarray, n: int) -> np.ndarray:
    """n frames of consecutive scenes: each frame its scene's centre plus noise (FRAME_WITHIN)."""
    spread = np.sqrt((1 / FRAME_WITHIN - 1) / DIM)
    lengths = rng.integers(*SCENE_FRAMES, size=n // SCENE_FRAMES[0] + 1)
    which = np.repeat(rng.integers(0, len(centres), lengths.size), lengths)[:n]
    return centres[which] + spread * rng.standard_normal((n, DIM), dtype=np.float32)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


class BlockView:
    """The SegmentView contract over memory-mapped float16 blocks in a folder."""

    def __init__(self, folder: Path):
        meta = np.load(folder / "windows.npz")
        self.file_index, self.start, self.end = meta["file_index"], meta["start"], meta["end"]
        self.blocks = [np.load(p, mmap_mode="r") for p in sorted(folder.glob("block-*.npy"))]
        self.firsts = np.cumsum([0] + [b.shape[0] for b in self.blocks[:-1]])
        self.dim = self.blocks[0].shape[1]

    def __len__(self) -> int:
        return int(self.start.size)

    def iter_blocks(self, block_rows: int = 65536):
        for first, b in zip(self.firsts, self.blocks, strict=True):
            for i in range(0, b.shape[0], block_rows):
                yield int(first + i), b[i : i + block_rows]

    def take(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        out = np.empty((idx.size, self.dim), dtype=np.float32)
        which = np.searchsorted(self.firsts, idx, side="right") - 1
        for w in np.unique(which):
            sel = np.flatnonzero(which == w)
            out[sel] = self.blocks[w][idx[sel] - self.firsts[w]]
        return out


def build(folder: Path, rows: int, seed: int) -> dict:
    """Write the synthetic windows; returns the planted jingles {id: [(file, first_window), ...]}."""
    rng = np.random.default_rng(seed)
    files = -(-rows // FILE_WINDOWS)
    lengths = np.full(files, FILE_WINDOWS)
    lengths[-1] = rows - FILE_WINDOWS * (files - 1)
    # Jingles: 6-window stretches, each in 4 random files (one of them twice, far apart).
    n_jingles = max(4, rows // 20000)
    jingle_windows = 6
    frames_per = jingle_windows + SPAN - 1
    centres = unit(rng.standard_normal((SCENES, DIM)))
    jingle_centres = unit(rng.standard_normal((n_jingles, DIM)))
    spread = np.sqrt((1 / FRAME_WITHIN - 1) / DIM)
    jingles = jingle_centres[:, None, :] + spread * rng.standard_normal((n_jingles, frames_per, DIM))
    jingles = jingles.astype(np.float32)
    plants: dict[int, list[tuple[int, int]]] = {}
    taken: dict[int, list[int]] = {}
    for j in range(n_jingles):
        targets = rng.choice(files, size=min(4, files), replace=False)
        where = [(int(f), None) for f in targets] + [(int(targets[0]), None)]
        for f, _ in where:
            for _ in range(50):  # a free place in the file, clear of other plants
                t = int(rng.integers(SPAN, max(SPAN + 1, lengths[f] - frames_per - SPAN)))
                if all(abs(t - u) > frames_per + SPAN for u in taken.get(f, [])):
                    taken.setdefault(f, []).append(t)
                    plants.setdefault(j, []).append((f, t))
                    break
    by_file: dict[int, list[tuple[int, int]]] = {}
    for j, occ in plants.items():
        for f, t in occ:
            by_file.setdefault(f, []).append((t, j))
    a = np.sqrt(1 / JINGLE_COPY_COS**2 - 1)
    buf = np.empty((BLOCK_ROWS, DIM), dtype=np.float16)
    have, block = 0, 0
    fi, st = [], []
    for f in range(files):
        n = int(lengths[f])
        frames = scene_frames(rng, centres, n + SPAN - 1)
        for t, j in by_file.get(f, []):
            # Noise of `a` times a frame's norm (1 / FRAME_WITHIN squared) puts a copy at JINGLE_COPY_COS.
            noise = rng.standard_normal((frames_per, DIM), dtype=np.float32) * np.sqrt(1 / FRAME_WITHIN / DIM)
            frames[t : t + frames_per] = (jingles[j] + a * noise) / np.sqrt(1 + a**2)
        c = np.cumsum(frames, axis=0, dtype=np.float64)
        sums = c[SPAN - 1 :] - np.concatenate([np.zeros((1, DIM)), c[:-SPAN]])
        vecs = unit(sums)
        fi.append(np.full(n, f, dtype=np.int64))
        st.append(np.arange(n) * HOP)
        pos = 0
        while pos < n:
            take = min(BLOCK_ROWS - have, n - pos)
            buf[have : have + take] = vecs[pos : pos + take]
            have += take
            pos += take
            if have == BLOCK_ROWS:
                np.save(folder / f"block-{block:05d}.npy", buf)
                block, have = block + 1, 0
    if have:
        np.save(folder / f"block-{block:05d}.npy", buf[:have])
    start = np.concatenate(st)
    np.savez(folder / "windows.npz", file_index=np.concatenate(fi), start=start, end=start + WINDOW)
    return {"files": files, "plants": plants, "jingle_windows": jingle_windows}


def timed(fn, repeat: int) -> tuple[list[float], object]:
    out, times = None, []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t) * 1000)
    return times, out


def bandwidth_floor(view: BlockView) -> dict:
    """Warm passes over the stored bytes: an integer sum (reading only) and a float16 -> float32 sum."""

    def int_pass():
        for _, b in view.iter_blocks():
            np.asarray(b).view(np.uint64).sum()

    def f32_pass():
        for _, b in view.iter_blocks():
            for i in range(0, b.shape[0], 8192):
                b[i : i + 8192].sum(dtype=np.float32)

    int_pass()  # warm the page cache
    ti, _ = timed(int_pass, 3)
    tf, _ = timed(f32_pass, 3)
    nbytes = len(view) * view.dim * 2
    return {
        "bytes": nbytes,
        "read_ms": round(min(ti), 1),
        "read_gb_s": round(nbytes / min(ti) / 1e6, 2),
        "f16_to_f32_sum_ms": round(min(tf), 1),
    }


def plant_recovery(groups, plants: dict, jingle_windows: int) -> dict:
    """Share of jingles found whole (every occurrence inside one group's occurrences) and of planted
    occurrences covered by some found occurrence; plus groups that hold no planted occurrence."""
    found = []  # (group id, file, start, end)
    for g_id, g in enumerate(groups):
        for o in g.occurrences:
            found.append((g_id, o.file_index, o.start, o.end))
    by_file: dict[int, list[tuple[int, float, float]]] = {}
    for g_id, f, s, e in found:
        by_file.setdefault(f, []).append((g_id, s, e))

    def group_of(f: int, t: int) -> int | None:
        s0, e0 = t * HOP, (t + jingle_windows - 1) * HOP + WINDOW
        for g_id, s, e in by_file.get(f, []):
            if s < e0 and e > s0:
                return g_id
        return None

    whole, covered, total, hit_groups = 0, 0, 0, set()
    for occ in plants.values():
        ids = [group_of(f, t) for f, t in occ]
        total += len(ids)
        covered += sum(i is not None for i in ids)
        hit_groups.update(i for i in ids if i is not None)
        whole += len(set(ids)) == 1 and ids[0] is not None
    return {
        "jingles": len(plants),
        "jingles_found_whole": round(whole / max(len(plants), 1), 4),
        "occurrences_covered": round(covered / max(total, 1), 4),
        "groups": len(groups),
        "groups_without_a_plant": len(groups) - len(hit_groups),
    }


def exact_top10(view: BlockView, q: np.ndarray) -> np.ndarray:
    s = score_windows(view, q)
    top = np.argpartition(-s, 10, axis=1)[:, :10]
    return top


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="windows in the synthetic store")
    ap.add_argument("--queries", type=int, default=10, help="segment-search queries timed one by one")
    ap.add_argument("--ann-queries", type=int, default=100, help="queries for ANN latency and recall")
    ap.add_argument("--skip-recurring", action="store_true", help="skip the ANN build and find_recurring")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="", help="suffix of the results file")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument(
        "--tmp", type=Path, default=None, help="folder for the synthetic store (default: $TMPDIR)"
    )
    args = ap.parse_args()

    t_all = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench-segments-", dir=args.tmp))
    res: dict = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "numpy": np.__version__,
            "load_average_at_start": os.getloadavg()[0],
        },
        "rows": args.rows,
        "dim": DIM,
        "dtype": "float16",
        "window_s": WINDOW,
        "hop_s": HOP,
    }
    try:
        log(f"writing {args.rows} x {DIM} float16 windows to {tmp}")
        t = time.perf_counter()
        truth = build(tmp, args.rows, args.seed)
        res["write_s"] = round(time.perf_counter() - t, 1)
        view = BlockView(tmp)
        res["files"] = truth["files"]

        log("bandwidth floor")
        res["floor"] = bandwidth_floor(view)

        log("exact segment search")
        rng = np.random.default_rng(args.seed + 1)
        # Queries: a planted jingle's occurrence (a middle window, perturbed), so there is an answer.
        jingle_ids = sorted(truth["plants"])
        picks = [jingle_ids[i % len(jingle_ids)] for i in range(args.queries)]
        first_of_file = np.searchsorted(view.file_index, np.arange(truth["files"]))
        rows = np.array(
            [first_of_file[truth["plants"][j][0][0]] + truth["plants"][j][0][1] + 2 for j in picks]
        )
        queries = unit(view.take(rows) + 0.02 * rng.standard_normal((len(rows), DIM)))
        search_segments(view, queries[0])  # warm
        times, hits = [], 0
        for j, q in zip(picks, queries, strict=True):
            tt, out = timed(lambda q=q: search_segments(view, q, k=10), 1)
            times += tt
            hits += bool(out[0]) and out[0][0].file_index in {f for f, _ in truth["plants"][j]}
        batch_ms, _ = timed(lambda: search_segments(view, queries, k=10), 1)
        res["segment_search"] = {
            "p50_ms": round(float(np.median(times)), 1),
            "min_ms": round(float(np.min(times)), 1),
            "batch_queries": len(queries),
            "batch_ms_per_query": round(batch_ms[0] / len(queries), 1),
            "top_hit_in_a_planted_file": round(hits / len(queries), 3),
            "ratio_to_read_floor": round(float(np.median(times)) / res["floor"]["read_ms"], 2),
            "ratio_to_f16_sum": round(float(np.median(times)) / res["floor"]["f16_to_f32_sum_ms"], 2),
        }

        if not args.skip_recurring:
            from usearch.index import Index  # noqa: F401  (the ann extra; fail early with its name)

            log(f"ANN graph over {len(view)} windows {ANN_PARAMS}")
            t = time.perf_counter()
            index = build_window_index(view, progress=None)
            build_s = time.perf_counter() - t
            res["ann"] = {
                "params": ANN_PARAMS,
                "build_s": round(build_s, 1),
                "rows_per_s": round(len(view) / build_s),
            }
            sel = rng.integers(0, len(view), args.ann_queries)
            aq = unit(view.take(np.sort(sel)) + 0.02 * rng.standard_normal((args.ann_queries, DIM)))
            log("exact top 10 for the ANN queries")
            truth10 = exact_top10(view, aq)
            sweep = {}
            for es in (32, 64, 128, 256):
                index.expansion_search = es
                per_q = []
                got = []
                for q in aq:
                    t = time.perf_counter()
                    m = index.search(q, 10)
                    per_q.append((time.perf_counter() - t) * 1000)
                    got.append(np.asarray(m.keys, dtype=np.int64))
                recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, truth10, strict=True)])
                sweep[es] = {
                    "recall_at_10": round(float(recall), 4),
                    "p50_ms": round(float(np.median(per_q)), 3),
                }
            index.expansion_search = ANN_PARAMS["expansion_search"]
            res["ann"]["sweep"] = sweep

            log("find_recurring over every window")
            stats: dict = {}
            groups = find_recurring(view, backend="ann", index=index, stats=stats, window=WINDOW, hop=HOP)
            res["recurring"] = {
                "threshold": stats["threshold"],
                "k_neighbors": 10,
                "neighbour_search_s": stats["ann_search_s"],
                "group_s": stats["group_s"],
                "find_s_without_build": stats["total_s"],
                "find_s_with_build": round(stats["total_s"] + build_s, 1),
                "pairs": stats["pairs"],
                **plant_recovery(groups, truth["plants"], truth["jingle_windows"]),
            }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["total_s"] = round(time.perf_counter() - t_all, 1)
    res["machine"]["load_average_at_end"] = os.getloadavg()[0]

    args.out.mkdir(parents=True, exist_ok=True)
    name = f"segments-{datetime.date.today().isoformat()}{'-' + args.tag if args.tag else ''}.json"
    (args.out / name).write_text(json.dumps(res, indent=2) + "\n")
    print(markdown(res))
    log(f"wrote {args.out / name}")


def markdown(res: dict) -> str:
    n = res["rows"]
    fl, ss = res["floor"], res["segment_search"]
    lines = [
        f"### Segments: {n:,} windows x {res['dim']} float16 ({res['files']} files), "
        f"{res['machine']['cpus']} CPUs",
        "",
        "| measure | value |",
        "|---|---|",
        f"| read floor (warm integer sum over {fl['bytes'] / 2**30:.2f} GiB) | {fl['read_ms']} ms "
        f"({fl['read_gb_s']} GB/s) |",
        f"| float16 -> float32 sum, same bytes | {fl['f16_to_f32_sum_ms']} ms |",
        f"| exact segment search, 1 query (p50) | {ss['p50_ms']} ms "
        f"({ss['ratio_to_read_floor']}x read floor, "
        f"{ss['ratio_to_f16_sum']}x f16 sum) |",
        f"| exact segment search, batch of {ss['batch_queries']} | {ss['batch_ms_per_query']} ms per query |",
    ]
    if "ann" in res:
        a, r = res["ann"], res["recurring"]
        graph = f"{a['params']['connectivity']}/{a['params']['expansion_add']}"
        lines.append(
            f"| ANN build (connectivity/expansion_add {graph}) | {a['build_s']} s "
            f"({a['rows_per_s']} windows/s) |"
        )
        for es, v in a["sweep"].items():
            lines.append(
                f"| ANN query, expansion_search {es} | {v['p50_ms']} ms, recall@10 {v['recall_at_10']} |"
            )
        lines += [
            f"| find_recurring (graph given): neighbours + groups | {r['neighbour_search_s']} s + "
            f"{r['group_s']} s |",
            f"| find_recurring with the build | {r['find_s_with_build']} s |",
            f"| planted jingles found whole / occurrences covered | {r['jingles_found_whole']} / "
            f"{r['occurrences_covered']} of {r['jingles']} jingles; {r['groups']} groups, "
            f"{r['groups_without_a_plant']} without a plant |",
        ]
    lines.append(f"| whole run | {res['total_s']} s |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
