"""The "leftover" suite: traces of forgotten facts - adversarial probes, MIA, linear probes, logit lens.

- adversarial: per RWKU family (see `adversarial.py`), recall and probability of the forgotten object;
- mia: LOSS / zlib / Min-K% / Min-K%++ ROC AUC of forget members vs true non-members (facts of held-out
  subjects) and vs retained members, before and after (`k` option, default 0.2);
- probes: per layer and position, accuracy of probes trained on the original model's retained facts,
  on the forget facts with the original and the unlearned model (`probe_max_train` caps training prompts);
- logit_lens: per layer, mean probability of the old object at the last prompt token.
"""
from __future__ import annotations

import numpy as np

from mechedit.diagnose import metric, register_suite
from mechedit.diagnose.adversarial import adversarial_probes, score_adversarial
from mechedit.diagnose.mia import ATTACKS, auc, fact_texts, mia_scores
from mechedit.diagnose.probes import fit_probes, logit_lens, probe_accuracy, residuals
from mechedit.unlearn.targets import ForgetTarget, resolve_target


def adversarial_section(before, after, target: ForgetTarget) -> dict:
    probes = adversarial_probes(target.world, list(target.forget), exclude=target.forget_ids)
    out = {}
    for tag, b in (("before", before), ("after", after)):
        for fam, d in score_adversarial(b.model, b.tokenizer, probes).items():
            out.setdefault(fam, {})[tag] = {"recall": metric(d["recall"]), "prob": metric(d["prob"])}
    return out


def mia_section(before, after, target: ForgetTarget, k: float = 0.2) -> dict:
    world = target.world
    texts = {"forget": fact_texts(world, target.forget), "nonmember": fact_texts(world, world.heldout_facts),
             "retain": fact_texts(world, target.retain)}
    out: dict = {}
    for tag, b in (("before", before), ("after", after)):
        sc = {name: mia_scores(b.model, b.tokenizer, t, k) for name, t in texts.items()}
        for a in ATTACKS:
            out.setdefault(a, {})[tag] = {
                "auc_vs_nonmember": auc(sc["forget"][a], sc["nonmember"][a]),
                "auc_vs_retain": auc(sc["forget"][a], sc["retain"][a]),
                "auc_retain_vs_nonmember": auc(sc["retain"][a], sc["nonmember"][a]),
                "forget_scores": metric({f.index: v for f, v in zip(target.forget, sc["forget"][a])}),
            }
    return out


def probe_section(before, after, target: ForgetTarget, max_train: int = 3000, seed: int = 0) -> dict:
    world = target.world
    rels = {f.relation for f in target.forget}
    train = [f for f in target.retain if f.relation in rels]
    if not train:
        return {"note": "no retained facts share the forgotten relations; no probe can be trained"}
    rng = np.random.default_rng(seed)
    xs, ys, _ = residuals(before.model, before.tokenizer, world, train)
    if len(ys) > max_train:
        keep = np.sort(rng.choice(len(ys), max_train, replace=False))
        xs, ys = {k: v[keep] for k, v in xs.items()}, ys[keep]
    clfs = fit_probes(xs, ys, seed)
    out: dict = {"n_train": int(len(ys))}
    for tag, b in (("before", before), ("after", after)):
        xe, ye, fe = residuals(b.model, b.tokenizer, world, list(target.forget))
        acc = probe_accuracy(clfs, xe, ye)
        out[tag] = {pos: {"by_layer": metric({l: a for l, a in enumerate(v)}, agg=float(np.nanmax(v))),
                          "best_layer": int(np.nanargmax(v))} for pos, v in acc.items()}
    return out


def lens_section(before, after, target: ForgetTarget) -> dict:
    out = {}
    for tag, b in (("before", before), ("after", after)):
        p = logit_lens(b.model, b.tokenizer, target.world, list(target.forget))  # [n, layer]
        out[tag] = metric({l: float(p[:, l].mean()) for l in range(p.shape[1])}, agg=float(p[:, -1].mean()))
    return out


@register_suite("leftover")
def leftover_suite(before, after, requests, forget=None, k: float = 0.2, probe_max_train: int = 3000,
                   **options) -> dict:
    """Adversarial probes, membership inference, linear probes and logit lens on the forget set."""
    target = resolve_target(before.world, requests, forget)
    return {"adversarial": adversarial_section(before, after, target),
            "mia": mia_section(before, after, target, k),
            "probes": probe_section(before, after, target, probe_max_train),
            "logit_lens": lens_section(before, after, target)}
