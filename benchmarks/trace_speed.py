"""Causal-tracing speed: facts/second of the batched engine vs the one-cell-at-a-time reference.

Both engines trace the same facts (all three sites, ROME's 10 noise samples) in this process,
each timed --repeats times (the best run counts, as in timeit); the script prints each one's
facts/second, the speed ratio and the largest difference between their results.

It also counts each engine's FLOPs (matmuls and attention, torch's FlopCounterMode, in an untimed run)
and prints the rate each achieves beside a matmul peak measured in this process: the FLOP ratio is
what skipping work buys; the rest of the speed ratio is efficiency. At the fp32 peak the batched
engine could be at most FLOP ratio x peak / reference's rate faster than the reference.

    python benchmarks/trace_speed.py runs/model --facts 10
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import mechedit
from mechedit.trace import select_facts, trace
from train_throughput import matmul_peak  # this folder is on sys.path when a benchmark runs as a script


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?", default="runs/model")
    ap.add_argument("--facts", type=int, default=10, help="facts traced by both engines")
    ap.add_argument("--extra", type=int, default=0, help="more facts for the batched engine's throughput alone")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=None, help="rows per forward (default: from a memory budget)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per engine; the best is reported")
    args = ap.parse_args()

    bundle = mechedit.load(args.checkpoint)
    bridge = bundle.bridge()
    facts = select_facts(bundle.world, n=args.facts, seed=args.seed)
    kw = dict(bridge=bridge, samples=args.samples, seed=args.seed)
    trace(bundle, facts[:2], batch_size=args.batch_size, **kw)  # warm-up (allocator, lazy init)

    def timed(**extra):  # best of --repeats, as timeit does: the least disturbed run
        best, res = float("inf"), None
        for _ in range(args.repeats):
            t = time.perf_counter()
            res = trace(bundle, facts, **kw, **extra)
            best = min(best, time.perf_counter() - t)
        return res, best

    fast, t_fast = timed(batch_size=args.batch_size)
    slow, t_slow = timed(engine="reference")
    diff = max(float(np.nanmax(np.abs(fast.p_restored[k] - slow.p_restored[k]))) for k in fast.kinds)
    n = fast.n_facts
    flops = {}
    for engine, extra in (("batched", {"batch_size": args.batch_size}), ("reference", {"engine": "reference"})):
        with FlopCounterMode(display=False) as fc:
            trace(bundle, facts, **kw, **extra)
        flops[engine] = fc.get_total_flops() / n
    print(f"model: {bundle.n_layers} layers, d_model {bundle.model.config.hidden_size}; {n} facts traced "
          f"({len(fast.skipped)} skipped), sites {', '.join(fast.kinds)}, {args.samples} samples")
    print(f"batched:   {n / t_fast:8.2f} facts/s ({t_fast:.2f} s)")
    print(f"reference: {n / t_slow:8.2f} facts/s ({t_slow:.2f} s)")
    print(f"speed ratio batched / reference: {t_slow / t_fast:.1f}x   (max |difference| {diff:.2e})")
    peak = matmul_peak(torch.float32)
    rate = {"batched": flops["batched"] * n / t_fast / 1e9, "reference": flops["reference"] * n / t_slow / 1e9}
    for engine in ("batched", "reference"):
        print(f"{engine + ':':10s} {flops[engine] / 1e9:6.2f} GFLOP per fact, {rate[engine]:6.1f} GFLOP/s "
              f"= {rate[engine] / peak:5.1%} of the fp32 matmul peak ({peak:.0f} GFLOP/s, {torch.get_num_threads()} threads)")
    ratio = flops["reference"] / flops["batched"]
    print(f"FLOP ratio reference / batched: {ratio:.1f}x; at the fp32 peak the batched engine would be at most "
          f"{ratio * peak / rate['reference']:.0f}x the reference at its rate here")

    if args.extra:
        many = select_facts(bundle.world, n=args.extra, seed=args.seed + 1)
        t = time.perf_counter()
        r = trace(bundle, many, batch_size=args.batch_size, **kw)
        dt = time.perf_counter() - t
        print(f"batched on {r.n_facts} facts: {r.n_facts / dt:.2f} facts/s ({dt:.2f} s)")


if __name__ == "__main__":
    main()
