"""Causal-tracing speed: facts/second of the batched engine vs the one-cell-at-a-time reference.

Both engines trace the same facts (all three sites, ROME's 10 noise samples) in this process;
the script prints each one's facts/second, the speed ratio and the largest difference between
their results.

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
    args = ap.parse_args()

    bundle = mechedit.load(args.checkpoint)
    bridge = bundle.bridge()
    facts = select_facts(bundle.world, n=args.facts, seed=args.seed)
    kw = dict(bridge=bridge, samples=args.samples, seed=args.seed)
    trace(bundle, facts[:2], batch_size=args.batch_size, **kw)  # warm-up (allocator, lazy init)

    t = time.perf_counter()
    fast = trace(bundle, facts, batch_size=args.batch_size, **kw)
    t_fast = time.perf_counter() - t
    t = time.perf_counter()
    slow = trace(bundle, facts, engine="reference", **kw)
    t_slow = time.perf_counter() - t
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
