"""`find_recurring` over a synthetic window store: the backends side by side in one run.

    python benchmarks/bench_recurring.py                      # 1,000,000 windows: ivf (3 and 2 probes)
    python benchmarks/bench_recurring.py --partitions 244     # also ivf over Lance-index-sized partitions
    python benchmarks/bench_recurring.py --ann-rows 200000 --exact-rows 40000   # usearch beside it

The windows are bench_segments.py's (512-d float16 memory-mapped blocks, window 10 s, hop 2 s, clustered
"scenes", planted "jingles" recurring in 4 files and twice in one). For each backend: seconds per stage,
the pairs found, the recall of the planted pairs (pairs of windows lying wholly inside two occurrences of
one jingle whose exact cosine reaches the threshold), jingles found whole and groups without a plant.
`--exact-rows N` also runs the exact backend over the first N windows and reports each backend's recall
of every exact pair there (all pairs, not only planted ones). `uptime` is printed before and after: the
machine is shared, so compare backends within one run. Results: benchmarks/results/recurring-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_segments import HOP, WINDOW, BlockView, build, log, plant_recovery  # noqa: E402

from mlx_clap.search.recurring import (  # noqa: E402
    ANN_PARAMS,
    DEFAULT_THRESHOLD,
    _non_trivial,
    find_recurring,
)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"load average {os.getloadavg()}"


class Prefix:
    """The first `rows` windows of a view (whole files only matter for the exact cross-check)."""

    def __init__(self, view: BlockView, rows: int):
        self.view, self.rows = view, rows
        self.file_index, self.start, self.end = view.file_index[:rows], view.start[:rows], view.end[:rows]
        self.dim = view.dim

    def __len__(self) -> int:
        return self.rows

    def iter_blocks(self, block_rows: int = 65536):
        for first, b in self.view.iter_blocks(block_rows):
            if first >= self.rows:
                return
            yield first, b[: self.rows - first]

    def take(self, idx: np.ndarray) -> np.ndarray:
        return self.view.take(idx)


def planted_pairs(view: BlockView, truth: dict, threshold: float) -> set[tuple[int, int]]:
    """Pairs (i < j) of windows wholly inside two occurrences of one jingle, cosine >= threshold."""
    first_of_file = np.searchsorted(view.file_index, np.arange(truth["files"]))
    out: set[tuple[int, int]] = set()
    for occ in truth["plants"].values():
        rows = np.concatenate(
            [first_of_file[f] + t + np.arange(truth["jingle_windows"]) for f, t in occ]
        ).astype(np.int64)
        x = view.take(rows)
        s = x @ x.T
        a, b = np.nonzero(np.triu(s >= threshold, k=1))
        ok = _non_trivial(view.file_index, view.start, rows[a], rows[b], WINDOW)
        out |= {(int(min(i, j)), int(max(i, j))) for i, j in zip(rows[a][ok], rows[b][ok], strict=True)}
    return out


def pair_set(view, **kwargs) -> tuple[set, dict, list]:
    """Run find_recurring and capture its pairs (through a wrapped group_pairs)."""
    import mlx_clap.search.recurring as rec

    captured: dict = {}
    original = rec.group_pairs

    def spy(v, i, j, s, **kw):
        captured["pairs"] = set(zip(i.tolist(), j.tolist(), strict=True))
        return original(v, i, j, s, **kw)

    rec.group_pairs = spy
    try:
        stats: dict = {}
        t = time.perf_counter()
        groups = find_recurring(view, stats=stats, window=WINDOW, hop=HOP, **kwargs)
        stats["wall_s"] = round(time.perf_counter() - t, 1)
    finally:
        rec.group_pairs = original
    return captured.get("pairs", set()), stats, groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--probes", type=int, nargs="+", default=[3, 2], help="ivf runs, one per probe count")
    ap.add_argument(
        "--partitions",
        type=int,
        nargs="*",
        default=[],
        help="also ivf (3 probes) over this many partitions (Lance's IVF index chose 244 at 1M rows)",
    )
    ap.add_argument(
        "--ann-rows",
        type=int,
        default=0,
        help="also the usearch HNSW backend (ANN_PARAMS) beside ivf over the first N windows (at 1M it "
        "took 764 s, bench_segments.py)",
    )
    ap.add_argument("--exact-rows", type=int, default=0, help="cross-check every pair over this many rows")
    ap.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--tmp", type=Path, default=None)
    args = ap.parse_args()

    res: dict = {"rows": args.rows, "threshold": args.threshold, "uptime_start": uptime(), "runs": []}
    log(res["uptime_start"])
    tmp = Path(tempfile.mkdtemp(prefix="bench-recurring-", dir=args.tmp))
    try:
        t = time.perf_counter()
        truth = build(tmp, args.rows, args.seed)
        res["write_s"] = round(time.perf_counter() - t, 1)
        view = BlockView(tmp)
        planted = planted_pairs(view, truth, args.threshold)
        res["planted_pairs"] = len(planted)
        runs = [(f"ivf, {p} probes", {"backend": "ivf", "probes": p}) for p in args.probes]
        runs += [
            (f"ivf, {n} partitions, 3 probes", {"backend": "ivf", "partitions": n, "probes": 3})
            for n in args.partitions
        ]
        for name, kwargs in runs:
            log(f"{name} over {args.rows} windows")
            pairs, stats, groups = pair_set(view, threshold=args.threshold, **kwargs)
            entry = {"name": name, **{k: v for k, v in stats.items() if k != "notes"}}
            entry["notes"] = stats.get("notes", [])
            entry["planted_pair_recall"] = round(len(pairs & planted) / max(len(planted), 1), 4)
            entry.update(plant_recovery(groups, truth["plants"], truth["jingle_windows"]))
            entry["uptime_after"] = uptime()
            res["runs"].append(entry)
            log(json.dumps(entry))
        if args.ann_rows:
            part = Prefix(view, min(args.ann_rows, len(view)))
            inside = {(i, j) for i, j in planted if j < len(part)}
            res["ann_check"] = {"rows": len(part), "planted_pairs": len(inside)}
            found = {}
            for name, kwargs in [runs[0], (f"ann (usearch HNSW {ANN_PARAMS})", {"backend": "ann"})]:
                log(f"{name} over the first {len(part)} windows")
                pairs, stats, _ = pair_set(part, threshold=args.threshold, **kwargs)
                found[name] = pairs
                res["ann_check"][name] = {
                    **{k: v for k, v in stats.items() if k.endswith("_s") or k == "pairs"},
                    "planted_pair_recall": round(len(pairs & inside) / max(len(inside), 1), 4),
                    "uptime_after": uptime(),
                }
            union = set().union(*found.values())
            for name, pairs in found.items():
                res["ann_check"][name]["share_of_all_pairs_found"] = round(len(pairs) / max(len(union), 1), 4)
            log(json.dumps(res["ann_check"]))
        if args.exact_rows:
            part = Prefix(view, min(args.exact_rows, len(view)))
            log(f"exact over the first {len(part)} windows")
            exact, ex_stats, _ = pair_set(part, threshold=args.threshold, backend="exact")
            res["exact_check"] = {"rows": len(part), "pairs": len(exact), "exact_s": ex_stats["wall_s"]}
            for name, kwargs in runs:
                pairs, stats, _ = pair_set(part, threshold=args.threshold, **kwargs)
                res["exact_check"][name] = {
                    "recall_of_exact_pairs": round(len(pairs & exact) / max(len(exact), 1), 4),
                    "pairs_not_in_exact": len(pairs - exact),
                    "wall_s": stats["wall_s"],
                }
            log(json.dumps(res["exact_check"]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["uptime_end"] = uptime()
    log(res["uptime_end"])
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"recurring-{datetime.date.today().isoformat()}{'-' + args.tag if args.tag else ''}.json"
    (args.out / name).write_text(json.dumps(res, indent=2) + "\n")
    print(markdown(res))
    log(f"wrote {args.out / name}")


def markdown(res: dict) -> str:
    lines = [
        f"### find_recurring over {res['rows']:,} windows (cosine >= {res['threshold']}, "
        f"{res['planted_pairs']} planted pairs)",
        f"uptime before: `{res['uptime_start']}`; after: `{res['uptime_end']}`",
        "",
        "| backend | s total | stages (s) | pairs | planted-pair recall | jingles whole | stray groups |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in res["runs"]:
        stages = ", ".join(
            f"{k[:-2]} {r[k]}"
            for k in ("read_s", "kmeans_s", "assign_s", "compare_s", "ann_build_s", "ann_search_s")
            if k in r
        )
        lines.append(
            f"| {r['name']} | {r['total_s']} | {stages} | {r['pairs']} | {r['planted_pair_recall']} | "
            f"{r['jingles_found_whole']} of {r['jingles']} | {r['groups_without_a_plant']} |"
        )
    if "ann_check" in res:
        ac = res["ann_check"]
        lines += ["", f"Over the first {ac['rows']:,} windows ({ac['planted_pairs']} planted pairs; every "
                  "pair found is a true one: the share is of the pairs either backend found):"]  # fmt: skip
        for name, v in ac.items():
            if isinstance(v, dict):
                lines.append(
                    f"- {name}: {v['total_s']} s, {v['pairs']} pairs ({v['share_of_all_pairs_found']} of all "
                    f"found), planted-pair recall {v['planted_pair_recall']}"
                )
    if "exact_check" in res:
        ec = res["exact_check"]
        lines += ["", f"Every exact pair over the first {ec['rows']:,} windows ({ec['pairs']} pairs, "
                  f"exact {ec['exact_s']} s):"]  # fmt: skip
        for name, v in ec.items():
            if isinstance(v, dict):
                lines.append(
                    f"- {name}: recall {v['recall_of_exact_pairs']}, {v['pairs_not_in_exact']} pairs not in "
                    f"exact, {v['wall_s']} s"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
