"""GA: gradient ascent on the forget set's answer NLL (RWKU / open-unlearning `GradAscent`).

L = -NLL_forget. Unbounded below: the loop's early stop (forget cloze recall <= stop_recall)
is what keeps it from destroying the model; there is no retain term (use `gd` for that).
"""
from __future__ import annotations

from dataclasses import dataclass

from mechedit.edit.api import register_method
from mechedit.unlearn.loop import UnlearnParams, nll, run_unlearning


@dataclass(frozen=True)
class GAParams(UnlearnParams):
    lr: float = 3e-4
    retain_weight: float = 0.0


@register_method("ga", params=GAParams, kind="unlearn")
def ga(bundle, requests, p: GAParams):
    def loss(ctx, forget, retain):
        out = -nll(ctx.model, forget)
        if p.retain_weight > 0:
            out = out + p.retain_weight * nll(ctx.model, retain)
        return out

    return run_unlearning(bundle, requests, p, loss, method="ga")
