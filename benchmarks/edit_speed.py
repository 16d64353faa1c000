"""Editing speed: ROME seconds per edit and a 100-edit MEMIT call, on the fast path (FastNeoX, the edited
block run once per search, `mechedit.edit.common.optimize_targets`) against the same search through
the HF modules (`engine="hf"`, how the editors ran before FastNeoX), in one process, with the
second-moment statistics cached (their first computation is timed separately).

    python benchmarks/edit_speed.py runs/model [--layer 0|traced] [--n-rome 20] [--n-memit 100] [--memit-hf]

Prints one JSON line per measurement and the ratios. Efficacy and collateral are measured by
benchmarks/edit_quality.py (the same requests: ROME seed 1, MEMIT seed 2).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

import mechedit
from mechedit.edit import run_method
from mechedit.edit import stats


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--layer", default="traced")
    ap.add_argument("--n-rome", type=int, default=20)
    ap.add_argument("--n-memit", type=int, default=100)
    ap.add_argument("--memit-hf", action="store_true", help="also time MEMIT through the HF modules (slow)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.dirname(__file__))
    from edit_quality import random_requests

    with tempfile.TemporaryDirectory() as cache:
        os.environ["MECHEDIT_CACHE"] = cache  # a fresh cache: the first call computes the statistics
        bundle = mechedit.load(args.checkpoint)
        if args.layer == "traced":
            from mechedit.trace import locate_for

            args.layer = int(locate_for(bundle, n=50, seed=0).layer)
        layer = int(args.layer)
        print(json.dumps({"layer": layer, "threads": args.threads}), flush=True)
        t, _ = timed(lambda: stats.second_moment(bundle, layer))
        print(json.dumps({"what": "second-moment statistics of the layer (once, then cached)", "seconds": round(t, 3)}))

        reqs = random_requests(bundle.world, args.n_rome, 1)
        run_method(bundle, reqs[:1], "rome", layer=layer, steps=2)  # warm-up
        per = {}
        for engine in ("hf", "fast"):
            ts, steps, restarts = [], [], 0
            for r in reqs:
                t, res = timed(lambda: run_method(bundle, [r], "rome", layer=layer, engine=engine))
                ts.append(t)
                info = res.info["per_request"][0]
                steps.append(info["steps"])
                restarts += "restart" in info
            per[engine] = sum(ts) / len(ts)
            print(json.dumps({"what": f"rome per edit, engine={engine}", "n": len(ts), "seconds": round(per[engine], 3),
                              "mean_steps": round(sum(steps) / len(steps), 1), "restarted": restarts}), flush=True)
        print(json.dumps({"rome_speedup_fast_vs_hf": round(per["hf"] / per["fast"], 2)}), flush=True)

        mreqs = random_requests(bundle.world, args.n_memit, 2)
        rows = {}
        configs = [("fast", "float32"), ("fast", "bfloat16")] + ([("hf", "float32")] if args.memit_hf else [])
        for engine, precision in configs:
            t, res = timed(lambda: run_method(bundle, mreqs, "memit", layer=[layer], engine=engine, precision=precision))
            rows[(engine, precision)] = t
            print(json.dumps({"what": f"memit {len(mreqs)} edits in one call, engine={engine}, precision={precision}",
                              "seconds": round(t, 2), "steps": res.info.get("steps"),
                              "nll_last": round(res.info.get("nll_last", float("nan")), 4)}), flush=True)
        base = rows.get(("hf", "float32"), rows[("fast", "float32")])
        for key, t in rows.items():
            print(json.dumps({f"memit_speedup_{key[0]}_{key[1]}_vs_{'hf' if args.memit_hf else 'fast_float32'}":
                              round(base / t, 2)}))


if __name__ == "__main__":
    main()
