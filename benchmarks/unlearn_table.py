"""Unlearning table: methods x (forget recall cloze/paraphrase/QA/adversarial, neighbour recall, MIA AUC,
best-layer probe accuracy, relearning recovery, forget quality, retain utility), for 1 and 10 subjects.

Usage: OMP_NUM_THREADS=1 python benchmarks/unlearn_table.py [CHECKPOINT] [--methods ...] [--sizes 1,10]
       [--json out.json]
Methods: the loss-based unlearners (ga, gd, npo, dpo, rt, rmu) with their defaults, and editing as
unlearning (rome, memit, alphaedit with "<refuse>" as the new object, registered editors' defaults).
The forget sets are the first N trained subjects (every trained fact of each). The retrained
references (one per forget set) are trained once and cached beside the checkpoint
(`<checkpoint>.retrain-<hash>`); the first run costs one training per size. Every figure is read from
the flattened scorecard (`mechedit.analysis.cases.flatten`) by the keys in COLS.
"""
from __future__ import annotations

import argparse
import json
import time

import mechedit
from mechedit.analysis.cases import flatten
from mechedit.diagnose import diagnose
from mechedit.diagnose.reference import retrained_reference
from mechedit.edit.api import run_method
from mechedit.model.checkpoint import load_checkpoint
from mechedit.unlearn import parse_forget

# column -> flattened scorecard key
COLS = {
    "fgt_cloze": "forget.forget.cloze.after",
    "fgt_para": "forget.forget.paraphrase.after",
    "fgt_qa": "forget.forget.qa.after",
    "fgt_adv": "leftover.adversarial.recall_after",
    "nbr_rel": "forget.neighbours_relation.cloze.after",
    "nbr_subj": "forget.neighbours_subject.cloze.after",
    "mia_loss": "leftover.mia.auc_vs_nonmembers.loss.after",
    "mia_mkpp": "leftover.mia.auc_vs_nonmembers.min_k_pp.after",
    "probe": "leftover.probes.best_accuracy_after",
    "relearn": "relearn.recovery",
    "fq_ks_p": "forget_quality.ks_pvalue",
    "retain": "forget.retain.cloze.after",
}
SUITES = ("forget", "leftover", "relearn", "forget_quality")


def fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", nargs="?", default="runs/model")
    ap.add_argument("--methods", default="ga,gd,npo,dpo,rt,rmu,rome,memit,alphaedit")
    ap.add_argument("--sizes", default="1,10")
    ap.add_argument("--json", default="", help="also write every row (and the sanity figures) to this file")
    args = ap.parse_args()
    before = mechedit.load(args.checkpoint)
    w = before.world
    subjects = [s for s in w.subjects if s.kind == "subject" and not s.heldout]
    dump: dict = {}
    for n in [int(x) for x in args.sizes.split(",")]:
        target = parse_forget(w, [f"subject:{s.name}" for s in subjects[:n]])
        reqs = target.requests()
        t0 = time.perf_counter()
        ref = retrained_reference(before, target)
        print(f"\n## forget {n} subject(s): {len(target.forget)} facts (reference ready in {time.perf_counter() - t0:.0f}s)\n")
        print("| method | " + " | ".join(COLS) + " | steps | sec |")
        print("|---" * (len(COLS) + 3) + "|")
        rows = {}
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
                steps = res.info.get("steps_run", "-")
            card = diagnose(before, after, reqs, SUITES, reference=ref)
            flat = flatten(card)
            r = {c: flat.get(k) for c, k in COLS.items()}
            rows[method] = {**r, "steps": steps, "sec": time.perf_counter() - t0}
            print(f"| {method} | " + " | ".join(fmt(r[c]) for c in COLS) + f" | {steps} | {rows[method]['sec']:.0f} |",
                  flush=True)
            if method == "original":
                lo = card["leftover"]
                sanity = {"probe_best_accuracy_original": lo["probes"]["best_accuracy_before"],
                          "probe_best_layer_original": lo["probes"]["best_layer_before"],
                          "probe_best_position_original": lo["probes"]["best_position_before"],
                          "probe_n_train": lo["probes"]["n_train"],
                          "mia_auc_forget_vs_nonmember_original": lo["mia"]["auc_vs_nonmembers"],
                          "mia_auc_retain_vs_nonmember_original": lo["mia"]["auc_retain_vs_nonmembers"],
                          "mia_n": lo["mia"]["n"]}
        print(f"\nrelearn on the retrained reference: {fmt(card['relearn']['recovery_retrained'])}, on the original: "
              f"{fmt(card['relearn']['recovery_original'])} (recall of the scored half after "
              f"{card['relearn']['steps']} steps on the other half)")
        print("sanity (original model): probe best accuracy "
              f"{sanity['probe_best_accuracy_original']:.3f} (layer {sanity['probe_best_layer_original']}, "
              f"{sanity['probe_best_position_original']} token, {sanity['probe_n_train']} training prompts); "
              "MIA AUC members vs true non-members: forget set " +
              ", ".join(f"{a} {fmt(v['before'])}" for a, v in sanity["mia_auc_forget_vs_nonmember_original"].items()) +
              "; all retained facts " +
              ", ".join(f"{a} {fmt(v['before'])}" for a, v in sanity["mia_auc_retain_vs_nonmember_original"].items()) +
              f" (n = {sanity['mia_n']})")
        dump[str(n)] = {"n_facts": len(target.forget), "rows": rows, "sanity": sanity, "keys": COLS}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dump, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
