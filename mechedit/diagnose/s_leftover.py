"""The "leftover" suite: traces of forgotten facts - adversarial probes, MIA, linear probes, logit lens.

- adversarial: per RWKU family (see `adversarial.py`), recall and probability of the forgotten object;
- mia: LOSS / zlib / Min-K% / Min-K%++ ROC AUC of forget members vs true non-members (facts of held-out
  subjects) and vs retained members, before and after (`k` option, default 0.2);
- probes: per layer and position, accuracy of probes trained on the original model's retained facts,
  on the forget facts with the original and the unlearned model (`probe_max_train` caps training prompts);
- logit_lens: per layer, mean probability of the old object at the last prompt token.

Headline keys (flattened scorecard): `leftover.adversarial.recall_after` (mean recall over the families
except reverse_query, which was never trained), `leftover.adversarial.by_family.<family>.after`,
`leftover.mia.auc_vs_nonmembers.<attack>.after` (attack: loss, zlib, min_k, min_k_pp),
`leftover.mia.roc_after` ({attack, fpr, tpr}: Min-K%++ forget vs non-members),
`leftover.probes.best_accuracy_after` (best layer and position), and per-layer lists
`leftover.probes.{last,last_subject}_accuracy_by_layer_{before,after}` (`accuracy_by_layer_*` = last).
Strict JSON: a value that cannot be computed is None.
"""
from __future__ import annotations

import numpy as np

from mechedit.diagnose import metric, register_suite
from mechedit.diagnose.cache import memo
from mechedit.diagnose.adversarial import adversarial_probes, score_adversarial
from mechedit.diagnose.mia import ATTACKS, auc, fact_texts, mia_scores
from mechedit.diagnose.probes import fit_probes, logit_lens, probe_accuracy, residuals
from mechedit.diagnose.strict import finite, strict_json
from mechedit.unlearn.targets import ForgetTarget, resolve_target


UNTRAINED_FAMILIES = ("reverse_query",)  # its prompt order was never trained: low even before unlearning


def adversarial_section(before, after, target: ForgetTarget) -> dict:
    probes = adversarial_probes(target.world, list(target.forget), exclude=target.forget_ids)
    fams: dict = {}
    for tag, b in (("before", before), ("after", after)):
        for fam, d in score_adversarial(b.model, b.tokenizer, probes).items():
            fams.setdefault(fam, {})[tag] = {"recall": metric(d["recall"]), "prob": metric(d["prob"])}
    out: dict = {"families": fams, "by_family": {}}
    for fam, d in fams.items():
        out["by_family"][fam] = {t: d[t]["recall"]["agg_value"] for t in ("before", "after")}
    for tag in ("before", "after"):
        vals = [d[tag] for fam, d in out["by_family"].items() if fam not in UNTRAINED_FAMILIES]
        out[f"recall_{tag}"] = float(np.mean(vals)) if vals else None
    out["note"] = "recall_before/after: mean over families except " + ", ".join(UNTRAINED_FAMILIES)
    return out


def roc_points(members: np.ndarray, nonmembers: np.ndarray) -> dict:
    from sklearn.metrics import roc_curve

    if len(members) == 0 or len(nonmembers) == 0:
        return {"fpr": [], "tpr": []}
    fpr, tpr, _ = roc_curve(np.r_[np.ones(len(members)), np.zeros(len(nonmembers))], np.r_[members, nonmembers])
    return {"fpr": [round(float(x), 5) for x in fpr], "tpr": [round(float(x), 5) for x in tpr]}


def mia_section(before, after, target: ForgetTarget, k: float = 0.2, roc_attack: str = "min_k_pp") -> dict:
    """AUCs keyed {comparison: {attack: {before, after}}}; per-fact forget scores; ROC points of `roc_attack`."""
    world = target.world
    texts = {"forget": fact_texts(world, target.forget), "nonmember": fact_texts(world, world.heldout_facts),
             "retain": fact_texts(world, target.retain)}
    out: dict = {"auc_vs_nonmembers": {}, "auc_vs_retain": {}, "auc_retain_vs_nonmembers": {}, "forget_scores": {},
                 "n": {name: len(t) for name, t in texts.items()}, "k": k}
    for tag, b in (("before", before), ("after", after)):
        sc = {name: memo("mia", b.model, (name, target.hash(), len(t), k), lambda t=t: mia_scores(b.model, b.tokenizer, t, k))
              for name, t in texts.items()}
        for a in ATTACKS:
            out["auc_vs_nonmembers"].setdefault(a, {})[tag] = finite(auc(sc["forget"][a], sc["nonmember"][a]))
            out["auc_vs_retain"].setdefault(a, {})[tag] = finite(auc(sc["forget"][a], sc["retain"][a]))
            out["auc_retain_vs_nonmembers"].setdefault(a, {})[tag] = finite(auc(sc["retain"][a], sc["nonmember"][a]))
            out["forget_scores"].setdefault(a, {})[tag] = metric({f.index: v for f, v in zip(target.forget, sc["forget"][a])})
        out[f"roc_{tag}"] = {"attack": roc_attack, **roc_points(sc["forget"][roc_attack], sc["nonmember"][roc_attack])}
    return out


def probe_section(before, after, target: ForgetTarget, max_train: int = 3000, seed: int = 0) -> dict:
    world = target.world
    rels = {f.relation for f in target.forget}
    train = [f for f in target.retain if f.relation in rels]
    if not train:
        return {"note": "no retained facts share the forgotten relations; no probe can be trained"}
    def fit():  # the probes depend only on the original model: fit once per forget set
        rng = np.random.default_rng(seed)
        xs, ys, _ = residuals(before.model, before.tokenizer, world, train)
        if len(ys) > max_train:
            keep = np.sort(rng.choice(len(ys), max_train, replace=False))
            xs, ys = {k: v[keep] for k, v in xs.items()}, ys[keep]
        return fit_probes(xs, ys, seed), len(ys)

    clfs, n_train = memo("probes", before.model, (target.hash(), max_train, seed), fit)
    out: dict = {"n_train": int(n_train)}
    names = {"prompt_last": "last", "subject_last": "last_subject"}
    for tag, b in (("before", before), ("after", after)):
        xe, ye, fe = residuals(b.model, b.tokenizer, world, list(target.forget))
        acc = probe_accuracy(clfs, xe, ye)
        out[tag] = {pos: {"by_layer": metric({l: a for l, a in enumerate(v)}, agg=float(np.nanmax(v))),
                          "best_layer": int(np.nanargmax(v))} for pos, v in acc.items()}
        for pos, v in acc.items():
            out[f"{names[pos]}_accuracy_by_layer_{tag}"] = [finite(a) for a in v]
        out[f"accuracy_by_layer_{tag}"] = out[f"last_accuracy_by_layer_{tag}"]
        best = max(((a, l, pos) for pos, v in acc.items() for l, a in enumerate(v)), key=lambda t: t[0])
        out[f"best_accuracy_{tag}"] = best[0]
        out[f"best_layer_{tag}"] = best[1]
        out[f"best_position_{tag}"] = names[best[2]]
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
    return strict_json({"adversarial": adversarial_section(before, after, target),
                        "mia": mia_section(before, after, target, k),
                        "probes": probe_section(before, after, target, probe_max_train),
                        "logit_lens": lens_section(before, after, target)})
