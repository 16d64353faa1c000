"""Editing speed: per-edit latency of ROME and the time of a 100-edit MEMIT call, with the share of time
spent on second-moment statistics, first uncached (computed) then cached (loaded).

    python benchmarks/edit_speed.py runs/model [--layer 0|traced] [--n-rome 10] [--n-memit 100]

The layer is resolved once up front ("traced": mechedit.trace.locate_for), so tracing is not timed;
MEMIT edits [layer] (what its "auto" window is on the 4-layer default).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import mechedit
import torch
from mechedit.edit import run_method
from mechedit.edit import stats


def timed(fn) -> tuple[float, float]:
    """(total seconds, seconds spent in statistics) of one call."""
    s0 = stats.TIMINGS["compute_s"] + stats.TIMINGS["load_s"]
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0, stats.TIMINGS["compute_s"] + stats.TIMINGS["load_s"] - s0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--layer", default="traced")
    ap.add_argument("--n-rome", type=int, default=10)
    ap.add_argument("--n-memit", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(1)  # small models: threading overhead dominates on a shared machine
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    from edit_quality import random_requests

    with tempfile.TemporaryDirectory() as cache:
        os.environ["MECHEDIT_CACHE"] = cache  # a fresh cache: the first call computes, later ones load
        bundle = mechedit.load(args.checkpoint)
        if args.layer == "traced":
            from mechedit.trace import locate_for

            args.layer = int(locate_for(bundle, n=50, seed=0).layer)
        args.layer = int(args.layer)
        print(json.dumps({"layer": args.layer}), flush=True)
        reqs = random_requests(bundle.world, max(args.n_rome, 1) + 1, 5)
        rows = []
        t, s = timed(lambda: run_method(bundle, reqs[:1], "rome", layer=args.layer))
        rows.append({"what": "rome, statistics uncached", "seconds": round(t, 3), "stats_share": round(s / t, 3)})
        ts, ss = [], []
        for r in reqs[1 : args.n_rome + 1]:
            t, s = timed(lambda: run_method(bundle, [r], "rome", layer=args.layer))
            ts.append(t)
            ss.append(s)
        rows.append({"what": f"rome per edit, statistics cached (mean of {len(ts)})",
                     "seconds": round(sum(ts) / len(ts), 3), "stats_share": round(sum(ss) / sum(ts), 3)})
        mreqs = random_requests(bundle.world, args.n_memit, 6)
        import shutil

        shutil.rmtree(cache)  # MEMIT's first call computes its statistics again
        os.makedirs(cache)
        t, s = timed(lambda: run_method(bundle, mreqs, "memit", layer=[args.layer]))
        rows.append({"what": f"memit {len(mreqs)} edits, statistics uncached",
                     "seconds": round(t, 3), "stats_share": round(s / t, 3)})
        t, s = timed(lambda: run_method(bundle, mreqs, "memit", layer=[args.layer]))
        rows.append({"what": f"memit {len(mreqs)} edits, statistics cached", "seconds": round(t, 3),
                     "stats_share": round(s / t, 3)})
        for r in rows:
            print(json.dumps(r))
        print(json.dumps({"rome_cached_vs_uncached_speedup": round(rows[0]["seconds"] / rows[1]["seconds"], 2),
                          "memit_cached_vs_uncached_speedup": round(rows[2]["seconds"] / rows[3]["seconds"], 2)}))


if __name__ == "__main__":
    main()
