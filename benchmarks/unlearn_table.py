"""Unlearning table: methods x (forget recall cloze/paraphrase/adversarial, neighbour recall, MIA AUC,
best-layer probe accuracy, relearning recovery, forget quality, retain utility), for 1 and 10 subjects.

Usage: python benchmarks/unlearn_table.py [CHECKPOINT] [--methods ga,gd,npo,dpo,rt,rmu] [--sizes 1,10]
The retrained references (one per forget set) are trained once and cached beside the checkpoint
(`<checkpoint>.retrain-<hash>`); the first run therefore costs one training per size.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import mechedit
from mechedit.diagnose import diagnose
from mechedit.diagnose.reference import retrained_reference
from mechedit.edit.api import run_method
from mechedit.model.checkpoint import load_checkpoint
from mechedit.unlearn import parse_forget

COLS = ("fgt_cloze", "fgt_para", "fgt_adv", "nbr_rel", "mia_auc", "probe_acc", "relearn", "fq_ks_p", "retain")


def row(card: dict, side: str) -> dict:
    f, lo = card["forget"][side], card["leftover"]
    adv = [d[side]["recall"]["agg_value"] for fam, d in lo["adversarial"].items() if fam != "reverse_query"]
    pr = lo["probes"].get(side, {}).get("prompt_last", {}).get("by_layer", {}).get("agg_value", float("nan"))
    return {"fgt_cloze": f["forget"]["cloze"]["agg_value"], "fgt_para": f["forget"]["paraphrase"]["agg_value"],
            "fgt_adv": float(np.mean(adv)), "nbr_rel": f["neighbours_relation"]["cloze"]["agg_value"],
            "mia_auc": lo["mia"]["min_k_pp"][side]["auc_vs_nonmember"], "probe_acc": pr,
            "retain": f["retain"]["cloze"]["agg_value"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", nargs="?", default="/tmp/mechedit-default")
    ap.add_argument("--methods", default="ga,gd,npo,dpo,rt,rmu")
    ap.add_argument("--sizes", default="1,10")
    args = ap.parse_args()
    before = mechedit.load(args.checkpoint)
    w = before.world
    subjects = [s for s in w.subjects if s.kind == "subject" and not s.heldout]
    for n in [int(x) for x in args.sizes.split(",")]:
        target = parse_forget(w, [f"subject:{s.name}" for s in subjects[:n]])
        reqs = target.requests()
        t0 = time.perf_counter()
        ref = retrained_reference(before, target)
        print(f"\n== forget {n} subject(s): {len(target.forget)} facts (reference ready in {time.perf_counter() - t0:.0f}s)")
        print(f"{'method':10s}" + "".join(f"{c:>10s}" for c in COLS) + f"{'steps':>7s}{'sec':>6s}")
        for method in ["original", "retrained"] + args.methods.split(","):
            t0 = time.perf_counter()
            steps = "-"
            if method == "original":
                after = before
            elif method == "retrained":
                after = ref
            else:
                after = load_checkpoint(args.checkpoint)
                res = run_method(before, reqs, method)
                res.apply(after.model)
                steps = res.info["steps_run"]
            card = diagnose(before, after, reqs, ("forget", "leftover", "relearn", "forget_quality"), reference=ref)
            r = row(card, "after")
            r["relearn"] = card["relearn"]["unlearned"]["after"]
            r["fq_ks_p"] = card["forget_quality"]["forget_quality"]
            print(f"{method:10s}" + "".join(f"{r[c]:10.3f}" for c in COLS) + f"{steps!s:>7s}{time.perf_counter() - t0:6.0f}")
        print(f"(relearn on the retrained reference: {card['relearn']['retrained']['after']:.3f}; "
              f"MIA AUC = Min-K%++ forget vs held-out-subject facts; probe = best layer, last prompt token)")


if __name__ == "__main__":
    main()
