"""The "rewrite" scores: continuous edit success per request, as Hase et al. (2023) and ROME define it.

For each request (s, r, o -> o*) on its trained cloze templates (the prompts the edit was made on)
and on its held-out paraphrase template, with p(x) the probability of the whole answer x (the
product over its tokens, teacher-forced), averaged over the templates:

  rewrite_score     = (p_after(o*) - p_before(o*)) / (1 - p_before(o*))   (ROME's / Hase et al.'s
                      "rewrite score": the share of the possible increase of p(o*) the edit achieved)
  prob_margin       = p_after(o*) - p_after(o)          (P(new) - P(old) after the edit)
  paraphrase_rewrite_score, paraphrase_prob_margin: the same on the held-out paraphrase template.

One value per request (`value_by_index` keyed by request position), so a request set edited one
request at a time gives one number per fact and edited layer: the success S[f, l] of
`mechedit.analysis.hase`.
"""
from __future__ import annotations

import numpy as np

from mechedit.diagnose import metric, register_suite
from mechedit.model.evaluate import score_answers


def _probs(bundle, prompts: list[str], answers: list[str]) -> np.ndarray:
    return np.exp(score_answers(bundle.model, bundle.tokenizer, prompts, answers).logprob)


@register_suite("rewrite")
def rewrite_scores(before, after, requests, **_options) -> dict:
    """Rewrite score and P(new) - P(old) per request (Hase et al. 2023's edit success)."""
    world = after.world
    rows = []  # (request, split, prompt)
    for i, r in enumerate(requests):
        f = world.fact(r.subject, r.relation)
        for t in range(world.n_templates):
            if t != f.heldout_template:
                rows.append((i, "trained", world.prompt(f, t)))
        rows.append((i, "paraphrase", world.prompt(f, f.heldout_template)))
    prompts = [p for _, _, p in rows]
    new = [requests[i].new_object for i, _, _ in rows]
    old = [world.fact(requests[i].subject, requests[i].relation).object for i, _, _ in rows]
    p_new_b, p_new_a, p_old_a = _probs(before, prompts, new), _probs(after, prompts, new), _probs(after, prompts, old)
    out = {}
    for split, prefix in (("trained", ""), ("paraphrase", "paraphrase_")):
        rs, margin = {}, {}
        for i in range(len(requests)):
            idx = [k for k, (j, s, _) in enumerate(rows) if j == i and s == split]
            pb, pa, po = p_new_b[idx], p_new_a[idx], p_old_a[idx]
            rs[i] = float(np.mean((pa - pb) / np.maximum(1.0 - pb, 1e-12)))
            margin[i] = float(np.mean(pa - po))
        out[f"{prefix}rewrite_score"] = metric(rs)
        out[f"{prefix}prob_margin"] = metric(margin)
    return out
