"""The "forget_quality" suite (expensive: retrains the model without the forget set once, cached).

TOFU forget quality: KS-test p-value between the unlearned and the retrained model's truth ratios on
the forget set, ONE truth ratio per fact (the mean over its cloze and QA prompts; `reference.py`),
so n = the number of forget facts (`n_facts`); the same for the original model; retain utility
(cloze recall on retained facts) of all three, and the forget recall of each (the retrained
model's is the target, near chance).
Headline: `forget_quality.ks_pvalue` (unlearned vs retrained), `forget_quality.ks_pvalue_original`,
`forget_quality.retain_utility.unlearned`, `forget_quality.n_facts`.
"""
from __future__ import annotations

from mechedit.diagnose import metric, register_suite
from mechedit.diagnose.cache import memo
from mechedit.diagnose.reference import ks_pvalue, retrained_reference, truth_ratios
from mechedit.diagnose.strict import strict_json
from mechedit.model.evaluate import score_answers
from mechedit.unlearn.targets import resolve_target


def retain_utility(b, facts) -> float:
    return memo("retain_utility", b.model, (tuple(f.index for f in facts),), lambda: _retain_utility(b, facts))


def _retain_utility(b, facts) -> float:
    probes = b.world.probes(facts, kinds=("cloze",))
    return float(score_answers(b.model, b.tokenizer, [p.prompt for p in probes], [p.answer for p in probes]).correct.mean())


@register_suite("forget_quality")
def forget_quality_suite(before, after, requests, forget=None, reference=None, cache_dir=None, **options) -> dict:
    """KS-test forget quality (one truth ratio per fact) against the retrained reference, and retain utility."""
    target = resolve_target(before.world, requests, forget)
    ref = reference or retrained_reference(before, target, cache_dir)
    w, facts = before.world, list(target.forget)
    models = (("original", before), ("unlearned", after), ("retrained", ref))
    r = {name: memo("truth_ratios", b.model, (target.hash(),), lambda b=b: truth_ratios(b.model, b.tokenizer, w, facts))
         for name, b in models}
    vals = {name: [v[f.index] for f in facts] for name, v in r.items()}
    return strict_json({
        "ks_pvalue": ks_pvalue(vals["unlearned"], vals["retrained"]),
        "ks_pvalue_original": ks_pvalue(vals["original"], vals["retrained"]),
        "n_facts": len(facts),
        "unit": "one truth ratio per fact (mean over its cloze and QA prompts)",
        "truth_ratio": {k: metric(v) for k, v in r.items()},
        "retain_utility": {name: retain_utility(b, target.retain) for name, b in models},
        "forget_recall": {name: retain_utility(b, facts) for name, b in models},
        "retrained_forget_recall": retain_utility(ref, facts),
    })
