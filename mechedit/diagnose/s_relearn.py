"""The "relearn" suite (expensive: may retrain the reference model once per forget set, cached).

Fine-tunes the unlearned model, the retrained reference and the original on half of the forget facts
for `relearn_steps` steps (lr `relearn_lr`) and reports cloze recall on the other half before and
after the attack; recovery well above the reference's means the knowledge was hidden, not removed.
One value per scored fact (recall over its cloze prompts), a seeded 95% bootstrap interval over the
scored facts, and the gap to the retrained model.
Headline: `relearn.recovery` = the unlearned model's recall on the scored half after the attack,
`relearn.recovery_retrained` / `relearn.recovery_original` the same for the reference / original,
`relearn.gap_to_retrained` = recovery - recovery_retrained.
"""
from __future__ import annotations

from mechedit.diagnose import metric, register_suite
from mechedit.diagnose.cache import memo
from mechedit.diagnose.reference import relearn, retrained_reference, split_halves
from mechedit.diagnose.stats import bootstrap_mean
from mechedit.diagnose.strict import strict_json
from mechedit.errors import MecheditError
from mechedit.unlearn.targets import resolve_target


@register_suite("relearn")
def relearn_suite(before, after, requests, forget=None, relearn_steps: int = 10, relearn_lr: float = 1e-3,
                  reference=None, cache_dir=None, **options) -> dict:
    """Relearning attack on half the forget set, scored on the other half, vs the retrained reference."""
    target = resolve_target(before.world, requests, forget)
    train, held = split_halves(target)
    if not train or not held:
        raise MecheditError("relearn needs at least two forget facts (one to relearn, one to score)")
    ref = reference or retrained_reference(before, target, cache_dir)
    w = before.world
    out = {"n_relearn_facts": len(train), "n_scored_facts": len(held), "steps": relearn_steps, "lr": relearn_lr,
           **{tag: memo("relearn", b.model, (target.hash(), relearn_steps, relearn_lr),
                        lambda b=b: relearn(b.model, b.tokenizer, w, train, held, relearn_steps, relearn_lr))
              for tag, b in (("unlearned", after), ("retrained", ref), ("original", before))}}
    for tag in ("unlearned", "retrained", "original"):
        by_fact = out[tag]["after_by_fact"]
        out[tag] = {"before": out[tag]["before"], "after": out[tag]["after"], "after_by_fact": metric(by_fact),
                    "ci95": bootstrap_mean(by_fact.values())}
    out["recovery"] = out["unlearned"]["after"]
    out["recovery_retrained"] = out["retrained"]["after"]
    out["recovery_original"] = out["original"]["after"]
    out["gap_to_retrained"] = out["recovery"] - out["recovery_retrained"]
    return strict_json(out)
