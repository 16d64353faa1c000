"""RT: rejection tuning (RWKU) - fine-tune the forget prompts to answer the refusal token.

L = NLL(<refuse> | forget prompt) + retain_weight * NLL_retain. The same as "editing as unlearning"
with a fine-tuning editor (Li et al. 2025).
"""
from __future__ import annotations

from dataclasses import dataclass

from mechedit.edit.api import register_method
from mechedit.unlearn.loop import UnlearnParams, nll, run_unlearning


@dataclass(frozen=True)
class RTParams(UnlearnParams):
    lr: float = 1e-3
    retain_weight: float = 1.0


@register_method("rt", params=RTParams, kind="unlearn")
def rt(bundle, requests, p: RTParams):
    def loss(ctx, forget, retain):
        out = nll(ctx.model, forget)
        if p.retain_weight > 0:
            out = out + p.retain_weight * nll(ctx.model, retain)
        return out

    return run_unlearning(bundle, requests, p, loss, method="rt", forget_answer="alt")
