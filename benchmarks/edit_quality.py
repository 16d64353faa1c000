"""Edit quality on a checkpoint: ROME single edits, MEMIT/AlphaEdit 100-edit batches, LoRA single edits
and the LoRA rank needed for 10 distinct edits; GRACE and WISE (adaptor editors) and ROME / MEMIT /
AlphaEdit as 100 SEQUENTIAL edits (one request per call, each call on the model edited by the
earlier ones, scored once at the end on all of them: `--only grace_seq,wise_seq,rome_seq,...`), and
GRACE / WISE as one 100-edit batch (`grace_batch`, `wise_batch`). Prints one JSON line per measurement.

Collateral includes the name-word siblings of the edited subjects (`diagnose/s_edit.py`):
`last_word_siblings` (recall of the old object by subjects whose name ends in the edited subject's
last word, after; `_change` = after - before), `last_word_siblings_new` (the share of them that
now answer the NEW object), the same for any shared name word, and how many edits had such
siblings (`_n_edits`; the means are over those edits).

    python benchmarks/edit_quality.py runs/model [--layer N|traced] [--n-single 50] [--n-batch 100]
        [--precision float32|bfloat16|auto] [--batch-seed 2]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

import mechedit
import torch
from mechedit.diagnose import get_suite
from mechedit.edit import EditRequest, run_method
from mechedit.edit.run import edited_bundle


def random_requests(world, n: int, seed: int, kinds=("independent", "correlated", "nested")) -> list[EditRequest]:
    """`n` distinct facts of trained main subjects; new object = another object of the same relation's pool."""
    rng = np.random.default_rng(seed)
    facts = [f for f in world.train_facts if world.subjects[f.subject].kind == "subject"
             and world.relation(f.relation).kind in kinds]
    out = []
    for i in rng.choice(len(facts), size=n, replace=False):
        f = facts[int(i)]
        pool = [o for o in world.relation(f.relation).objects if o != f.object]
        out.append(EditRequest(world.subjects[f.subject].name, f.relation, pool[int(rng.integers(len(pool)))]))
    return out


def summarize(cards: list[dict]) -> dict:
    keys = ("efficacy", "prob_new_gt_old", "paraphrase", "qa", "same_relation", "same_new_value", "same_subject",
            "unrelated", "implied_kept", "implied_follows", "name_word_siblings", "last_word_siblings",
            "name_word_siblings_new", "last_word_siblings_new")
    out = {}
    for k in keys:
        vals = [c[k] for c in cards if k in c]
        if vals:
            out[k] = round(float(np.mean([v["after"]["agg_value"] for v in vals])), 4)
            if k not in ("efficacy", "prob_new_gt_old", "paraphrase", "qa") and not k.endswith("_new"):
                out[k + "_change"] = round(float(np.mean([v["change"] for v in vals])), 4)
            if k.endswith("_siblings"):  # edits that have such siblings at all (a unique name has none)
                out[k + "_n_edits"] = len(vals)
    ppl = [c["retain_perplexity"] for c in cards if "retain_perplexity" in c]
    if ppl:
        out["retain_ppl_change"] = round(float(np.mean([p["change"] for p in ppl])), 4)
    return out


def singles(bundle, reqs, method, params, card_opts) -> dict:
    suite = get_suite("edit")
    cards, t0 = [], time.perf_counter()
    for r in reqs:
        res = run_method(bundle, [r], method, **params)
        cards.append(suite.fn(bundle, edited_bundle(bundle, res), [r], **card_opts))
    return {"method": method, "params": params, "n": len(reqs), "mode": "single",
            "s_per_edit": round((time.perf_counter() - t0) / len(reqs), 3), **summarize(cards)}


def batch(bundle, reqs, method, params, card_opts) -> dict:
    t0 = time.perf_counter()
    res = run_method(bundle, reqs, method, **params)
    card = get_suite("edit").fn(bundle, edited_bundle(bundle, res), reqs, **card_opts)
    return {"method": method, "params": params, "n": len(reqs), "mode": "batch",
            "seconds": round(time.perf_counter() - t0, 2),
            "s_per_edit": round((time.perf_counter() - t0) / len(reqs), 3), **summarize([card])}


def sequential(bundle, reqs, method, params, card_opts) -> dict:
    """`len(reqs)` edit calls in a row (one request each), then one scorecard on all of them."""
    from mechedit.edit.run import frozen_copy, sequential_edits

    before = frozen_copy(bundle)
    t0 = time.perf_counter()
    steps = sequential_edits(bundle, [[r] for r in reqs], method, score=False, restore=False, **params)
    try:
        card = get_suite("edit").fn(before, bundle, reqs, **card_opts)
    finally:
        for s in reversed(steps):
            s["result"].restore(bundle.model)
    return {"method": method, "params": params, "n": len(reqs), "mode": "sequential",
            "s_per_edit": round((time.perf_counter() - t0) / len(reqs), 3), **summarize([card])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--layer", default="traced", help="ROME/LoRA layer: an int or 'traced'")
    ap.add_argument("--n-single", type=int, default=50)
    ap.add_argument("--n-lora", type=int, default=20)
    ap.add_argument("--n-batch", type=int, default=100)
    ap.add_argument("--only", default="rome,memit,alphaedit,lora,lora_rank")
    ap.add_argument("--precision", default=None, choices=("float32", "bfloat16", "auto"),
                    help="the target search's precision for ROME and MEMIT (default: each method's own)")
    ap.add_argument("--batch-seed", type=int, default=2, help="request seed of the MEMIT / AlphaEdit batch rows")
    ap.add_argument("--seq-seeds", default="2", help="request seeds of the sequential rows (one row each)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # small models: threading overhead dominates on a shared machine
    bundle = mechedit.load(args.checkpoint)
    layer = args.layer if args.layer == "traced" else int(args.layer)
    if layer == "traced":
        from mechedit.trace import locate_for

        layer = int(locate_for(bundle, n=50, seed=0).layer)
    print(json.dumps({"checkpoint": args.checkpoint, "edit_layer": layer, "layer_source": args.layer}), flush=True)
    opts = {"n_unrelated": 200, "n_retain": 200}
    prec = {} if args.precision is None else {"precision": args.precision}
    only = args.only.split(",")
    if "rome" in only:
        print(json.dumps(singles(bundle, random_requests(bundle.world, args.n_single, 1), "rome", {"layer": layer, **prec},
                                 opts)), flush=True)
    breqs = random_requests(bundle.world, args.n_batch, args.batch_seed)
    for m in ("memit", "alphaedit"):
        if m in only:
            print(json.dumps(batch(bundle, breqs, m, prec if m == "memit" else {}, opts)), flush=True)
    for m in ("grace", "wise", "rome", "memit", "alphaedit"):
        for seed in [int(x) for x in args.seq_seeds.split(",")] if f"{m}_seq" in only else []:
            sreqs = random_requests(bundle.world, args.n_batch, seed)  # seed 2: the batch rows' requests
            row = sequential(bundle, sreqs, m, {"layer": layer} if m == "rome" else {}, opts)
            print(json.dumps({**row, "requests_seed": seed}), flush=True)
        if f"{m}_batch" in only and m in ("grace", "wise"):
            print(json.dumps(batch(bundle, breqs, m, {}, opts)), flush=True)
    if "lora" in only:
        print(json.dumps(singles(bundle, random_requests(bundle.world, args.n_lora, 3), "lora",
                                 {"layer": layer, "rank": 8}, opts)), flush=True)
    if "lora_rank" in only:
        reqs10 = random_requests(bundle.world, 10, 4)
        for rank in (1, 2, 4, 8, 16):
            row = batch(bundle, reqs10, "lora", {"layer": layer, "rank": rank}, opts)
            print(json.dumps(row), flush=True)
            if row["efficacy"] >= 0.95:
                print(json.dumps({"lora_rank_for_10_edits": rank, "layer": layer}), flush=True)
                break


if __name__ == "__main__":
    main()
