"""DPO for unlearning (Rafailov et al. 2023 as used by RWKU / TOFU "IdkDPO").

L = -log sigmoid(beta [(log p_theta(y+|x) - log p_ref(y+|x)) - (log p_theta(y-|x) - log p_ref(y-|x))]),
y- the true object, y+ the refusal token (`preferred="refusal"`) or a fixed counterfactual object of
the same relation (`preferred="counterfactual"`); plus retain_weight * NLL_retain.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mechedit.edit.api import register_method
from mechedit.errors import MecheditError
from mechedit.unlearn.loop import UnlearnParams, answer_logprob, nll, run_unlearning, subset


@dataclass(frozen=True)
class DPOParams(UnlearnParams):
    lr: float = 1e-3
    beta: float = 0.1
    preferred: str = "refusal"  # refusal | counterfactual
    retain_weight: float = 1.0

    def validate(self) -> None:
        super().validate()
        if self.beta <= 0:
            raise MecheditError("dpo: beta must be > 0")
        if self.preferred not in ("refusal", "counterfactual"):
            raise MecheditError(f"dpo: preferred must be refusal or counterfactual, got {self.preferred!r}")


@register_method("dpo", params=DPOParams, kind="unlearn")
def dpo(bundle, requests, p: DPOParams):
    def loss(ctx, forget, retain):
        fidx = ctx.cache["fidx"]
        pos, neg = subset(ctx.cache["forget_alt"], fidx), subset(ctx.cache["forget_true"], fidx)
        lp_pos, _ = answer_logprob(ctx.model, pos)
        lp_neg, _ = answer_logprob(ctx.model, neg)
        with torch.no_grad():
            ref_pos, _ = answer_logprob(ctx.ref, pos)
            ref_neg, _ = answer_logprob(ctx.ref, neg)
        out = -F.logsigmoid(p.beta * ((lp_pos - ref_pos) - (lp_neg - ref_neg))).mean()
        if p.retain_weight > 0:
            out = out + p.retain_weight * nll(ctx.model, retain)
        return out

    return run_unlearning(bundle, requests, p, loss, method="dpo", alt=p.preferred)
