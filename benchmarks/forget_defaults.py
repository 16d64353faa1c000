"""Tuning the editors' refusal defaults (editing as unlearning) on forget sets NOT used for reporting.

    OMP_NUM_THREADS=1 python benchmarks/forget_defaults.py runs/unlearning [--methods rome,...]
        [--subjects 2] [--json out.json]

For each editor (ROME, MEMIT, AlphaEdit, GRACE, WISE) and RepE, a small grid of candidate settings
is run on single-subject forget sets that the unlearning table never forgets: on a world with
forget instructions (analyses/worlds/unlearning.toml) the last `--subjects` subjects NAMED in the
training instructions (the table forgets never-named and second-stage subjects), else the last
`--subjects` trained subjects. A model that never produced `<refuse>` (a world without
instructions: the default world) cannot be tuned for it: on the default model a merged ROME edit
moved the refusal's NLL only from 20.8 to 11.8, with or without the clamp and the KL term.
Each setting prints one JSON line: forget recall after
(cloze / held-out paraphrase / QA, mean over the tuning sets), retain and same-relation neighbour
cloze recall change, seconds. Choice rule (applied by `choose` and printed at the end): the lowest
mean forget recall over the three probe kinds among settings that cost at most 2 points of retain
cloze recall and 5 points of same-relation neighbour recall; ties go to the smaller retain cost.
The chosen values are what `forget_defaults` in each method's registration holds.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import mechedit
from mechedit.analysis.cases import flatten
from mechedit.diagnose import diagnose
from mechedit.edit.api import run_method
from mechedit.edit.run import edited_bundle
from mechedit.unlearn import parse_forget

BASE = {"merge_queries": True, "forms": "cloze+qa"}
GRID = {
    "rome": [{**BASE, "clamp_factor": c, "kl_weight": k} for c in (2.0, 4.0) for k in (4.0, 0.5)],
    "memit": [{**BASE, "clamp_factor": 2.0, "kl_weight": 0.5}, {**BASE, "clamp_factor": 4.0, "kl_weight": 0.0}],
    "alphaedit": [{**BASE, "clamp_factor": 1.3}, {**BASE, "clamp_factor": 4.0}],
    # without a cap every eps_factor refused 18-37% of the retained facts (coverage expansions chain when
    # every label is the refusal: m_grace's module doc), so the grid caps expansion
    "grace": [{"forms": "cloze+qa", "eps_factor": e, "max_eps_factor": m} for e, m in ((0.5, 1.0), (1.0, 1.0))],
    "wise": [{"forms": "cloze+qa", "n_shards": 1, "mask_ratio": 1.0}, {"forms": "cloze+qa", "n_shards": 2, "mask_ratio": 0.5}],
    "repe": [{"mode": "subtract", "alpha": 0.05}, {"mode": "subtract", "alpha": 0.1}, {"mode": "project", "alpha": 1.0}],
}
KEYS = {"cloze": "forget.forget.cloze.after", "paraphrase": "forget.forget.paraphrase.after",
        "qa": "forget.forget.qa.after", "retain_change": "forget.retain.cloze.change",
        "neighbour_change": "forget.neighbours_relation.cloze.change"}


def choose(rows: list[dict]) -> dict | None:
    ok = [r for r in rows if r["retain_change"] >= -0.02 and r["neighbour_change"] >= -0.05]
    if not ok:
        return None
    return min(ok, key=lambda r: (round(np.mean([r["cloze"], r["paraphrase"], r["qa"]]), 4), -r["retain_change"]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--methods", default=",".join(GRID))
    ap.add_argument("--subjects", type=int, default=2, help="tuning forget sets: the last N trained subjects, one each")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    b = mechedit.load(args.checkpoint)
    if b.world.spec.instructions:
        from mechedit.world.instructions import instruction_split

        pool = [b.world.subjects[i] for i in instruction_split(b.world)[0]]
    else:
        pool = [s for s in b.world.subjects if s.kind == "subject" and not s.heldout]
    subs = pool[-args.subjects:]
    targets = [parse_forget(b.world, f"subject:{s.name}") for s in subs]
    print(json.dumps({"checkpoint": args.checkpoint, "tuning_subjects": [s.name for s in subs]}), flush=True)
    out: dict = {}
    for method in args.methods.split(","):
        rows = []
        for params in GRID[method]:
            t0 = time.perf_counter()
            vals = []
            for t in targets:
                reqs = t.requests()
                res = run_method(b, reqs, method, **params)
                flat = flatten(diagnose(b, edited_bundle(b, res), reqs, ("forget",), retrained=False))
                vals.append({k: flat.get(v, float("nan")) for k, v in KEYS.items()})
            row = {"method": method, "params": params,
                   **{k: round(float(np.mean([v[k] for v in vals])), 4) for k in KEYS},
                   "seconds": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        best = choose(rows)
        out[method] = {"rows": rows, "chosen": best}
        print(json.dumps({"method": method, "chosen": best and best["params"]}), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
