"""The "forget" suite: recall on forget, retain and neighbour facts, before and after unlearning.

Sets: forget (the target's facts), neighbours_relation (same relation, other subjects),
neighbours_subject (same subject, other relations), retain (every other trained fact, neighbours
included). Probe kinds: cloze (trained templates), paraphrase (held-out template), qa. Values are
per-fact recall (mean over that fact's prompts of the kind).

Output: `before` / `after` hold the per-fact tables ({set: {kind: metric}}); the headline is
`{set: {kind: {"before", "after", "change"}}}` at the top level, so the flattened scorecard reads
`forget.forget.cloze.after`, `forget.neighbours_relation.cloze.after`, `forget.retain.qa.after`, ...
A set with no facts (`neighbours_subject` when whole subjects are forgotten) is left out and named in
`notes`; the scorecard is strict JSON (no NaN).
"""
from __future__ import annotations

import numpy as np

from mechedit.diagnose import metric, register_suite
from mechedit.diagnose.cache import memo
from mechedit.diagnose.strict import strict_json
from mechedit.model.evaluate import score_answers
from mechedit.unlearn.targets import ForgetTarget, resolve_target

KINDS = ("cloze", "paraphrase", "qa")


def recall_table(model, tokenizer, target: ForgetTarget) -> dict:
    world = target.world
    sets = {"forget": list(target.forget), "neighbours_relation": target.neighbours_relation,
            "neighbours_subject": target.neighbours_subject, "retain": target.retain}
    out: dict = {}
    for name, facts in sets.items():
        if not facts:
            continue
        probes = world.probes(facts, kinds=KINDS)
        sc = score_answers(model, tokenizer, [p.prompt for p in probes], [p.answer for p in probes]) if probes else None
        out[name] = {}
        for kind in KINDS:
            per: dict[int, list[float]] = {}
            if sc is not None:
                for p, ok in zip(probes, sc.correct):
                    if p.kind == kind:
                        per.setdefault(p.fact, []).append(float(ok))
            out[name][kind] = metric({k: float(np.mean(v)) for k, v in per.items()})
    return out


@register_suite("forget")
def forget_suite(before, after, requests, forget=None, **options) -> dict:
    """Forget / neighbour / retain recall on cloze, paraphrase and QA, before and after."""
    target = resolve_target(before.world, requests, forget)
    tables = {tag: memo("recall_table", b.model, (target.hash(),), lambda b=b: recall_table(b.model, b.tokenizer, target))
              for tag, b in (("before", before), ("after", after))}
    out: dict = {"n_forget_facts": len(target.forget), **tables, "notes": []}
    for name, kinds in tables["after"].items():
        out[name] = {}
        for kind, m in kinds.items():
            b, a = tables["before"][name][kind]["agg_value"], m["agg_value"]
            out[name][kind] = {"before": b, "after": a, "change": a - b, "n": len(m["value_by_index"])}
    if "neighbours_subject" not in tables["after"]:
        out["notes"].append("neighbours_subject left out: every trained fact of the forgotten subjects is forgotten")
    return strict_json(out)
