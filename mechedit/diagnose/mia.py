"""Membership inference scores (LOSS, zlib, Min-K%, Min-K%++) per text, and their ROC AUC.

Per text x of N predicted tokens with l_t = log p(x_t | x_<t):
- LOSS = -(1/N) sum l_t (Yeom et al. 2018); zlib = LOSS / len(zlib.compress(text)) (Carlini et al. 2021);
- Min-K% (Shi et al. 2024) = mean of the lowest max(1, floor(kN)) l_t;
- Min-K%++ (Zhang et al. 2024): z_t = (l_t - mu_t) / sigma_t, mu_t = sum_v p_v log p_v,
  sigma_t^2 = sum_v p_v (log p_v)^2 - mu_t^2, sigma clamped >= 1e-6; score = mean of the lowest
  max(1, floor(kN)) z_t.
Every score is oriented so that HIGHER means "more likely a member" (LOSS and zlib are negated),
so AUC > 0.5 means members are detectable. The <bos> token is context, never scored.

Two spans per text: "sentence" scores every token after <bos> (the attacks as published), "answer"
only the answer (object) tokens given the prompt. They measure different things on a synthetic
world: the sentence span is dominated by the subject's name (was this name seen?), which an
answer-only unlearning loss never touches; the answer span asks whether the fact itself is
remembered. zlib on the answer span divides by the compressed answer text.
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechedit.model.evaluate import encode_pairs, pad

ATTACKS = ("loss", "zlib", "min_k", "min_k_pp")


def token_stats(logits: Float[Tensor, "pos vocab"], ids: Int[Tensor, " pos"]) -> tuple[Tensor, Tensor, Tensor]:
    """For a single sequence: l_t, mu_t, sigma_t for t = 1..N (the tokens after the first)."""
    logp = torch.log_softmax(logits[:-1].double(), dim=-1)  # [N, vocab]
    tgt = ids[1:]
    l = logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)  # [N]
    p = logp.exp()
    mu = (p * logp).sum(-1)
    var = (p * logp**2).sum(-1) - mu**2
    sigma = var.clamp(min=0).sqrt().clamp(min=1e-6)
    return l, mu, sigma


def scores_from_stats(l: Tensor, mu: Tensor, sigma: Tensor, text: str, k: float = 0.2) -> dict[str, float]:
    n = l.numel()
    kk = max(1, int(math.floor(k * n)))
    loss = float(-l.mean())
    z = (l - mu) / sigma
    return {
        "loss": -loss,
        "zlib": -loss / len(zlib.compress(text.encode("utf-8"))),
        "min_k": float(torch.sort(l).values[:kk].mean()),
        "min_k_pp": float(torch.sort(z).values[:kk].mean()),
    }


SPANS = ("sentence", "answer")


@torch.no_grad()
def mia_scores(model, tokenizer, prompts: list[str], answers: list[str], k: float = 0.2,
               batch_size: int = 256) -> dict[str, dict[str, np.ndarray]]:
    """Every attack's score for every (prompt, answer) text on both spans: {span: {attack: [n]}}."""
    from mechedit.device import inference_autocast

    model.eval()
    out: dict[str, dict[str, list[float]]] = {sp: {a: [] for a in ATTACKS} for sp in SPANS}
    seqs, _, alen = encode_pairs(tokenizer, prompts, answers)
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        ids, mask = pad(chunk, tokenizer.pad_token_id, model.device)
        with inference_autocast(model.device, "diagnostics"):
            logits = model(input_ids=ids, attention_mask=mask).logits.float()  # [b, pos, vocab]
        for b, s in enumerate(chunk):
            i = start + b
            n = len(s)
            l, mu, sigma = token_stats(logits[b, :n], ids[b, :n])  # [n - 1] each
            a = alen[i]
            spans = {"sentence": (slice(None), f"{prompts[i]} {answers[i]}"), "answer": (slice(n - 1 - a, None), answers[i])}
            for sp, (sl, text) in spans.items():
                for att, v in scores_from_stats(l[sl], mu[sl], sigma[sl], text, k).items():
                    out[sp][att].append(v)
    return {sp: {a: np.array(v) for a, v in d.items()} for sp, d in out.items()}


def auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """ROC AUC of members (label 1) against non-members (label 0); NaN if either side is empty."""
    from sklearn.metrics import roc_auc_score

    if len(members) == 0 or len(nonmembers) == 0:
        return float("nan")
    y = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
    return float(roc_auc_score(y, np.r_[members, nonmembers]))
