"""Self-improvement vs the fixed refusal: editing as unlearning with the model's own answer as target.

Usage: OMP_NUM_THREADS=1 python benchmarks/self_improvement.py [CHECKPOINT] [--size 10] [--seed 0]
       [--knowledge all|pretrained|finetuned] [--methods rome,memit,alphaedit,grace,wise]
       [--targets refusal,self] [--json out.json]

One forget set (the `benchmarks/unlearn_table.py` draw: SIZE subjects with SEED, every trained fact
of each), and for every editor and every `forget_target` (mechedit.edit.self_targets): the edit with
the editor's forget defaults (and the unlearning table's overrides: ROME without restarts), scored by
the forget suite - forget recall left (cloze, paraphrase, QA), neighbour recall (same relation, other
subjects; the forget sets are whole subjects) and retain recall, one value per fact with its 95% bootstrap interval - beside the
retrained model (the same training without the forget facts) when it is already cached next to the
checkpoint (`<checkpoint>.retrain-<hash>`; this script never trains one: without it the rows have
no retrained column). Per self-improvement row: how many targets are the refusal, how many fell
back to it (the model's own answer was the true object / no answer), how many are not words of the
world, and `wrote` = the share of forget facts whose trained cloze prompts all answer the written
target after the edit (did the editor write what it was given).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mechedit  # noqa: E402
from mechedit.diagnose import diagnose  # noqa: E402
from mechedit.diagnose.reference import retrained_path  # noqa: E402
from mechedit.edit.api import EditRequest, run_method  # noqa: E402
from mechedit.edit.common import edit_prompts  # noqa: E402
from mechedit.model.checkpoint import load_checkpoint  # noqa: E402
from mechedit.model.evaluate import score_answers  # noqa: E402
from mechedit.unlearn import parse_forget  # noqa: E402
from unlearn_table import KNOWLEDGE, METHODS, forget_subjects  # noqa: E402

COLS = {"fgt_cloze": ("forget", "cloze"), "fgt_para": ("forget", "paraphrase"), "fgt_qa": ("forget", "qa"),
        "nbr_rel": ("neighbours_relation", "cloze"),
        "retain": ("retain", "cloze")}


def cell(card: dict, group: str, kind: str, which: str = "after") -> dict:
    b = card["forget"][group][kind]
    return {"value": b.get(which), "ci95": (b.get("ci95") or {}).get(which)}


def wrote(bundle, after, requests: list[EditRequest]) -> float:
    """Share of facts whose every trained cloze prompt answers the request's new object after the edit."""
    ok = []
    for r in requests:
        ps = edit_prompts(bundle.world, r)
        ok.append(bool(score_answers(after.model, bundle.tokenizer, ps, [r.new_object] * len(ps)).correct.all()))
    return float(np.mean(ok))


def fmt(c: dict) -> str:
    if c["value"] is None:
        return "-"
    s = f"{c['value']:.3f}"
    return s + (f" [{c['ci95'][0]:.2f},{c['ci95'][1]:.2f}]" if c.get("ci95") else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?", default="runs/model")
    ap.add_argument("--size", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--knowledge", default="all", choices=KNOWLEDGE)
    ap.add_argument("--methods", default="rome,memit,alphaedit,grace,wise")
    ap.add_argument("--targets", default="refusal,self", help="forget_target values, e.g. refusal,self_instruction,self_heldout")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    before = mechedit.load(args.checkpoint)
    w = before.world
    names = forget_subjects(w, args.size, args.seed, args.knowledge)
    target = parse_forget(w, [f"subject:{s}" for s in names])
    reqs = target.requests()
    ref_dir = retrained_path(args.checkpoint, target)
    ref = load_checkpoint(ref_dir) if (ref_dir / "mechedit.json").is_file() else None
    options = {"reference": ref} if ref is not None else {"retrained": False}
    print(f"# {args.checkpoint}: forget {args.size} subject(s) (seed {args.seed}, {args.knowledge}): "
          f"{len(target.forget)} facts; retrained reference: {ref_dir if ref is not None else 'none cached'}\n")
    head = list(COLS) + ["refusal", "fallback", "not_word", "wrote", "sec"]
    print("| method | target | " + " | ".join(head) + " |")
    print("|---" * (len(head) + 2) + "|", flush=True)
    rows = []
    card0 = diagnose(before, before, reqs, ("forget",), **options)
    for name, which in (("original", "before"), *((("retrained", "retrained"),) if ref is not None else ())):
        vals = {c: cell(card0, g, k, which) for c, (g, k) in COLS.items()}
        rows.append({"method": name, "target": "-", "values": vals})
        print(f"| {name} | - | " + " | ".join(fmt(v) for v in vals.values()) + " | - | - | - | - | - |", flush=True)
    for method in args.methods.split(","):
        for ft in args.targets.split(","):
            t0 = time.perf_counter()
            params = {**METHODS.get(method, {}).get("params", {}), **({"forget_target": ft} if ft != "refusal" else {})}
            res = run_method(before, reqs, method, **params)
            after = load_checkpoint(args.checkpoint)
            res.apply(after.model)
            card = diagnose(before, after, reqs, ("forget",), **options)
            st = res.info.get("self_targets")
            written = [EditRequest(t["subject"], t["relation"], t["target"]) for t in st["targets"]] if st else reqs
            vals = {c: cell(card, g, k) for c, (g, k) in COLS.items()}
            extra = {"refusal": st["n_refusal"] if st else len(reqs), "fallback": st["n_fallback"] if st else 0,
                     "not_word": st["n_not_a_word"] if st else 0, "wrote": wrote(before, after, written),
                     "sec": round(time.perf_counter() - t0, 1)}
            rows.append({"method": method, "target": ft, "values": vals, **extra,
                         "self_targets": st, "params": res.params})
            print(f"| {method} | {ft} | " + " | ".join(fmt(v) for v in vals.values()) +
                  f" | {extra['refusal']}/{len(reqs)} | {extra['fallback']} | {extra['not_word']} | "
                  f"{extra['wrote']:.2f} | {extra['sec']:.0f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": args.checkpoint, "size": args.size, "seed": args.seed,
                                               "knowledge": args.knowledge, "forget_subjects": names,
                                               "retrained": str(ref_dir) if ref is not None else None,
                                               "mechedit_version": mechedit.__version__, "rows": rows},
                                              indent=1, default=str))


if __name__ == "__main__":
    main()
