"""Causal-tracing speed: facts/second of the batched engine vs the one-cell-at-a-time reference.

Both engines trace the same facts (all three sites, ROME's 10 noise samples) in this process,
each timed --repeats times (the best run counts, as in timeit); the script prints each one's
facts/second, the speed ratio and the largest difference between their results.

    python benchmarks/trace_speed.py runs/model --facts 10
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import mechedit
from mechedit.trace import select_facts, trace


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
    print(f"model: {bundle.n_layers} layers, d_model {bundle.model.config.hidden_size}; {n} facts traced "
          f"({len(fast.skipped)} skipped), sites {', '.join(fast.kinds)}, {args.samples} samples")
    print(f"batched:   {n / t_fast:8.2f} facts/s ({t_fast:.2f} s)")
    print(f"reference: {n / t_slow:8.2f} facts/s ({t_slow:.2f} s)")
    print(f"speed ratio batched / reference: {t_slow / t_fast:.1f}x   (max |difference| {diff:.2e})")

    if args.extra:
        many = select_facts(bundle.world, n=args.extra, seed=args.seed + 1)
        t = time.perf_counter()
        r = trace(bundle, many, batch_size=args.batch_size, **kw)
        dt = time.perf_counter() - t
        print(f"batched on {r.n_facts} facts: {r.n_facts / dt:.2f} facts/s ({dt:.2f} s)")


if __name__ == "__main__":
    main()
