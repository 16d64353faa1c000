"""The "forget" suite: recall on forget, retain and neighbour facts, before and after unlearning.

Sets: forget (the target's facts), neighbours_relation (same relation, other subjects),
neighbours_subject (same subject, other relations), retain (every other trained fact, neighbours
included). Probe kinds: cloze (trained templates), paraphrase (held-out template), qa. Values are
per-fact recall (mean over that fact's prompts of the kind).

Output: `before` / `after` / `retrained` hold the per-fact tables ({set: {kind: metric}}) of the
original, the unlearned model and the model retrained without the forget facts (options
`reference`, `retrained` (default True; False leaves it out), `cache_dir`; see `reference.py`); the
headline is `{set: {kind: {"before", "after", "retrained", "change", "gap_to_retrained", "n",
"ci95"}}}` at the top level (ci95: seeded 95% bootstrap over facts), so the flattened scorecard reads
`forget.forget.cloze.after`, `forget.neighbours_relation.cloze.after`, `forget.retain.qa.after`, ...
A set with no facts (`neighbours_subject` when whole subjects are forgotten) is left out and named in
`notes`; the scorecard is strict JSON (no NaN).
"""
from __future__ import annotations

import numpy as np

from mechedit.diagnose import metric, register_suite
from mechedit.diagnose.cache import memo
from mechedit.diagnose.stats import bootstrap_mean
from mechedit.diagnose.strict import strict_json
from mechedit.model.evaluate import score_answers
from mechedit.unlearn.targets import ForgetTarget, resolve_target

KINDS = ("cloze", "paraphrase", "qa")


def recall_table(model, tokenizer, target: ForgetTarget) -> dict:
    """Recall of the forget set, its neighbours and the retained facts, per kind (one value per fact:
    the mean over its prompts). The sets overlap (a forgotten subject's relations reach nearly every
    retained fact), so every distinct prompt is scored once, in one call, and each set reads its own."""
    world = target.world
    sets = {"forget": list(target.forget), "neighbours_relation": target.neighbours_relation,
            "neighbours_subject": target.neighbours_subject, "retain": target.retain}
    union = sorted({f.index: f for facts in sets.values() for f in facts}.values(), key=lambda f: f.index)
    probes = world.probes(union, kinds=KINDS)
    sc = score_answers(model, tokenizer, [p.prompt for p in probes], [p.answer for p in probes]) if probes else None
    hits: dict[tuple[int, str], list[float]] = {}  # (fact, kind) -> one hit per prompt
    for p, c in zip(probes, sc.correct if sc is not None else []):
        hits.setdefault((p.fact, p.kind), []).append(float(c))
    out: dict = {}
    for name, facts in sets.items():
        if not facts:
            continue
        out[name] = {kind: metric({f.index: float(np.mean(hits[f.index, kind])) for f in facts if (f.index, kind) in hits})
                     for kind in KINDS}
    return out


@register_suite("forget")
def forget_suite(before, after, requests, forget=None, reference=None, retrained: bool = True, cache_dir=None,
                 n_boot: int = 1000, seed: int = 0, **options) -> dict:
    """Forget / neighbour / retain recall on cloze, paraphrase and QA: before, after and retrained."""
    from mechedit.diagnose.reference import retrained_reference

    target = resolve_target(before.world, requests, forget)
    ref = reference or (retrained_reference(before, target, cache_dir) if retrained else None)
    models = {"before": before, "after": after, **({"retrained": ref} if ref is not None else {})}
    tables = {tag: memo("recall_table", b.model, (target.hash(),), lambda b=b: recall_table(b.model, b.tokenizer, target))
              for tag, b in models.items()}
    out: dict = {"n_forget_facts": len(target.forget), **tables, "notes": []}
    for name, kinds in tables["after"].items():
        out[name] = {}
        for kind, m in kinds.items():
            vals = {tag: tables[tag][name][kind] for tag in models}
            row = {tag: v["agg_value"] for tag, v in vals.items()}
            row["change"] = row["after"] - row["before"]
            if "retrained" in row:
                row["gap_to_retrained"] = row["after"] - row["retrained"]
            row["n"] = len(m["value_by_index"])
            row["ci95"] = {tag: bootstrap_mean(v["value_by_index"].values(), n_boot, seed) for tag, v in vals.items()
                           if tag != "before"}
            out[name][kind] = row
    if "neighbours_subject" not in tables["after"]:
        out["notes"].append("neighbours_subject left out: every trained fact of the forgotten subjects is forgotten")
    if ref is None:
        out["notes"].append("no retrained reference (retrained = false)")
    return strict_json(out)
