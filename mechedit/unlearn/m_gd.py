"""GD: gradient difference, GA on the forget set plus NLL on retain data (RWKU `GD`, TOFU).

L = -NLL_forget + retain_weight * NLL_retain, retain sampled from every other trained fact.
"""
from __future__ import annotations

from dataclasses import dataclass

from mechedit.edit.api import register_method
from mechedit.unlearn.loop import UnlearnParams, nll, run_unlearning


@dataclass(frozen=True)
class GDParams(UnlearnParams):
    lr: float = 1e-3
    retain_weight: float = 1.0


@register_method("gd", params=GDParams, kind="unlearn")
def gd(bundle, requests, p: GDParams):
    def loss(ctx, forget, retain):
        return -nll(ctx.model, forget) + p.retain_weight * nll(ctx.model, retain)

    return run_unlearning(bundle, requests, p, loss, method="gd")
