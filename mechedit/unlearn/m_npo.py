"""NPO: negative preference optimisation (Zhang et al. 2024), optional retain NLL.

L = -(2/beta) mean log sigmoid(-beta (log p_theta(y|x) - log p_ref(y|x))) over forget pairs, with
sequence log-probs of the answer and p_ref the frozen original model; plus retain_weight * NLL_retain
(open-unlearning's NPO default, alpha = 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mechedit.edit.api import register_method
from mechedit.errors import MecheditError
from mechedit.unlearn.loop import UnlearnParams, answer_logprob, nll, run_unlearning


@dataclass(frozen=True)
class NPOParams(UnlearnParams):
    lr: float = 1e-3
    beta: float = 0.1
    retain_weight: float = 1.0

    def validate(self) -> None:
        super().validate()
        if self.beta <= 0:
            raise MecheditError("npo: beta must be > 0")


@register_method("npo", params=NPOParams, kind="unlearn")
def npo(bundle, requests, p: NPOParams):
    def loss(ctx, forget, retain):
        lp, _ = answer_logprob(ctx.model, forget)  # [b]
        with torch.no_grad():
            lp_ref, _ = answer_logprob(ctx.ref, forget)
        out = -(2.0 / p.beta) * F.logsigmoid(-p.beta * (lp - lp_ref)).mean()
        if p.retain_weight > 0:
            out = out + p.retain_weight * nll(ctx.model, retain)
        return out

    return run_unlearning(bundle, requests, p, loss, method="npo")
