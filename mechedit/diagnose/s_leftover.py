"""The "leftover" suite: traces of forgotten facts - adversarial probes, MIA, linear probes, logit lens -
each for the original model ("before"), the unlearned one ("after") and the model retrained without
the forget facts ("retrained"), with the gap after - retrained. The target of unlearning is the
retrained value, not 0 or 0.5.

- adversarial: per RWKU family (see `adversarial.py`), recall and probability of the forgotten object;
- mia: LOSS / zlib / Min-K% / Min-K%++ ROC AUC (`k` option, default 0.2) on two spans ("sentence":
  every token; "answer": the object given the prompt), forget members vs vocabulary-matched
  non-members (`nonmembers.py`, restricted to the forgotten relations), forget vs retained members,
  and retained members vs non-members; one text per fact; seeded 95% bootstrap intervals (`n_boot`);
  the design, n, and the AUC of model-free baselines (unseen words, unigram frequency), which should
  be ~0.5 when members and non-members are matched;
- probes: per-relation probes fit on each model's own activations of retained train-split subjects,
  (layer, position) chosen on validation subjects, accuracy on the forget facts at that choice, with
  chance (`probes.py`);
- logit_lens: per layer, mean probability of the old object at the last prompt token.

Options: `reference` (a retrained Bundle) or `retrained` (default True: train or load the cached
reference, see `reference.py`; False leaves the retrained figures out with a note), `cache_dir`,
`nonmember_subjects` (20), `probe_max_train` (3000 prompts per relation), `n_boot` (1000), `seed`.

Headline keys (flattened scorecard), each with `.before`, `.after`, `.retrained`, `.gap_to_retrained`:
`leftover.adversarial.recall` (mean over the families except reverse_query, which was never
trained), `leftover.mia.<span>.auc_vs_nonmembers.<attack>` (span: sentence, answer; attack: loss,
zlib, min_k, min_k_pp), `leftover.probes.accuracy`, `leftover.logit_lens.last_layer`.
Strict JSON: a value that cannot be computed is None.
"""
from __future__ import annotations

import numpy as np

from mechedit.diagnose import metric, register_suite
from mechedit.diagnose.adversarial import adversarial_probes, score_adversarial
from mechedit.diagnose.cache import memo
from mechedit.diagnose.mia import ATTACKS, SPANS, mia_scores
from mechedit.diagnose.nonmembers import MiaText, main_relations, member_text, model_free_scores, nonmember_texts
from mechedit.diagnose.probes import logit_lens, probe_model, split_subjects
from mechedit.diagnose.stats import (auc_from_scores, bootstrap_auc, bootstrap_mean, bootstrap_mean_of_means,
                                     mean_of_means)
from mechedit.diagnose.strict import finite, strict_json
from mechedit.unlearn.targets import ForgetTarget, resolve_target

UNTRAINED_FAMILIES = ("reverse_query",)  # its prompt order was never trained: low even before unlearning


def _compare(values: dict[str, float | None]) -> dict:
    """{"before", "after", "retrained", "gap_to_retrained"} from per-model values."""
    out = {tag: finite(v) for tag, v in values.items()}
    a, r = out.get("after"), out.get("retrained")
    out["gap_to_retrained"] = None if a is None or r is None else a - r
    return out


def adversarial_section(models: dict, target: ForgetTarget, n_boot: int = 1000, seed: int = 0) -> dict:
    probes = adversarial_probes(target.world, list(target.forget), exclude=target.forget_ids)
    fams: dict = {}
    for tag, b in models.items():
        for fam, d in score_adversarial(b.model, b.tokenizer, probes).items():
            fams.setdefault(fam, {})[tag] = {"recall": metric(d["recall"]), "prob": metric(d["prob"])}
    out: dict = {"families": fams, "by_family": {}}
    for fam, d in fams.items():
        out["by_family"][fam] = _compare({t: d[t]["recall"]["agg_value"] for t in models})
    recall, ci = {}, {}
    trained = [fam for fam in fams if fam not in UNTRAINED_FAMILIES]
    facts = sorted({f for fam in trained for tag in models for f in fams[fam][tag]["recall"]["value_by_index"]})
    for tag in models:
        # [facts, families] recall, NaN where a fact has no probe of that family (synonym: no alias)
        table = np.array([[fams[fam][tag]["recall"]["value_by_index"].get(f, np.nan) for fam in trained]
                          for f in facts], dtype=float).reshape(len(facts), len(trained))
        recall[tag] = mean_of_means(table) if table.size else None
        ci[tag] = bootstrap_mean_of_means(table, n_boot, seed)
    out["recall"] = {**_compare(recall), "ci95": ci}
    out["note"] = ("recall: mean over the families (except " + ", ".join(UNTRAINED_FAMILIES) +
                   ") of each family's mean over facts; ci95: the same statistic bootstrapped over facts")
    return out


def roc_points(members: np.ndarray, nonmembers: np.ndarray) -> dict:
    from sklearn.metrics import roc_curve

    if len(members) == 0 or len(nonmembers) == 0:
        return {"fpr": [], "tpr": []}
    fpr, tpr, _ = roc_curve(np.r_[np.ones(len(members)), np.zeros(len(nonmembers))], np.r_[members, nonmembers])
    return {"fpr": [round(float(x), 5) for x in fpr], "tpr": [round(float(x), 5) for x in tpr]}


def mia_texts(target: ForgetTarget, nonmember_subjects: int = 20, seed: int = 0) -> tuple[dict[str, list[MiaText]], dict]:
    """Texts of each group: forget members, retained members (main subjects' facts) and non-members;
    `nonmember_forget_rel` are the non-members of the forgotten relations (compared with forget)."""
    world = target.world
    rels = set(main_relations(world))
    nonmembers, design = nonmember_texts(world, nonmember_subjects, seed)
    forget_rels = {f.relation for f in target.forget}
    retain = [f for f in target.retain if world.subjects[f.subject].kind == "subject" and f.relation in rels]
    groups = {"forget": [member_text(world, f) for f in target.forget],
              "retain": [member_text(world, f) for f in retain],
              "retain_forget_rel": [member_text(world, f) for f in retain if f.relation in forget_rels],
              "nonmember": nonmembers,
              "nonmember_forget_rel": [t for t in nonmembers if t.relation in forget_rels]}
    return groups, design


# comparison name -> (members group, non-members group)
COMPARISONS = {"auc_vs_nonmembers": ("forget", "nonmember_forget_rel"),
               "auc_vs_retain": ("forget", "retain_forget_rel"),
               "auc_retain_vs_nonmembers": ("retain", "nonmember")}


def mia_section(models: dict, target: ForgetTarget, k: float = 0.2, roc_attack: str = "min_k_pp",
                nonmember_subjects: int = 20, n_boot: int = 1000, seed: int = 0) -> dict:
    """AUCs keyed {span: {comparison: {attack: {before, after, retrained, gap_to_retrained, ci95}}}},
    model-free baselines, per-fact forget scores and ROC points of `roc_attack` (forget vs non-members)."""
    world = target.world
    groups, design = mia_texts(target, nonmember_subjects, seed)
    out: dict = {"design": design, "n": {g: len(t) for g, t in groups.items()}, "k": k, "n_boot": n_boot,
                 "unit": "one text per fact (its first trained cloze sentence + object)",
                 "roc_attack": roc_attack, "roc": {}, "forget_scores": {}}
    scores = {}
    for tag, b in models.items():
        scores[tag] = {g: memo("mia", b.model, (tuple(t.text for t in ts), k),
                               lambda ts=ts, b=b: mia_scores(b.model, b.tokenizer, [t.prompt for t in ts],
                                                             [t.answer for t in ts], k))
                       for g, ts in groups.items()}
    for span in SPANS:
        out[span] = {}
        for comp, (m, n) in COMPARISONS.items():
            out[span][comp] = {}
            for a in ATTACKS:
                vals = {tag: auc_from_scores(scores[tag][m][span][a], scores[tag][n][span][a]) for tag in models}
                ci = {tag: bootstrap_auc(scores[tag][m][span][a], scores[tag][n][span][a], n_boot, seed) for tag in models}
                out[span][comp][a] = {**_compare(vals), "ci95": ci}
        out["roc"][span] = {tag: roc_points(scores[tag]["forget"][span][roc_attack],
                                            scores[tag]["nonmember_forget_rel"][span][roc_attack]) for tag in models}
        out["forget_scores"][span] = {a: {tag: metric({t.key: v for t, v in zip(groups["forget"], scores[tag]["forget"][span][a])})
                                          for tag in models} for a in ATTACKS}
    out["model_free"] = {}
    for span in SPANS:
        mf = {g: model_free_scores(world, ts, span) for g, ts in groups.items()}
        out["model_free"][span] = {
            score: {comp: {"auc": finite(auc_from_scores(mf[m][score], mf[n][score])),
                           "ci95": bootstrap_auc(mf[m][score], mf[n][score], n_boot, seed)}
                    for comp, (m, n) in COMPARISONS.items() if comp != "auc_vs_retain"}
            for score in ("unseen_words", "unigram_logfreq")}
    return out


def probe_section(models: dict, target: ForgetTarget, max_train: int = 3000, seed: int = 0, n_boot: int = 1000) -> dict:
    world = target.world
    split = split_subjects(world, list(target.forget), target.retain, seed=seed)
    if not split.train or not split.validation:
        return {"note": "no retained subjects share the forgotten relations; no probe can be trained or validated"}
    forget = list(target.forget)
    out: dict = {"n_train_subjects": len(split.train), "n_validation_subjects": len(split.validation),
                 "split_seed": seed}
    acc, ci = {}, {}
    for tag, b in models.items():
        r = memo("probes", b.model, (target.hash(), max_train, seed),
                 lambda b=b: probe_model(b.model, b.tokenizer, world, forget, split, max_train, seed))
        out[tag] = {**{k: v for k, v in r.items() if k != "by_fact"}, "by_fact": metric(r["by_fact"])}
        acc[tag] = r["accuracy"]
        ci[tag] = bootstrap_mean(r["by_fact"].values(), n_boot, seed)
        out["chance"] = r["chance"]
    out["accuracy"] = {**_compare(acc), "ci95": ci}
    out["note"] = ("accuracy on the forget facts at the (layer, position) each model's probes chose on "
                   "validation subjects; chance = mean 1 / pool size of the forget facts' relations")
    return out


def lens_section(models: dict, target: ForgetTarget) -> dict:
    out: dict = {}
    last = {}
    for tag, b in models.items():
        p = logit_lens(b.model, b.tokenizer, target.world, list(target.forget))  # [n, layer]
        out[tag] = metric({l: float(p[:, l].mean()) for l in range(p.shape[1])}, agg=float(p[:, -1].mean()))
        last[tag] = float(p[:, -1].mean())
    out["last_layer"] = _compare(last)
    return out


@register_suite("leftover")
def leftover_suite(before, after, requests, forget=None, k: float = 0.2, probe_max_train: int = 3000,
                   reference=None, retrained: bool = True, cache_dir=None, nonmember_subjects: int = 20,
                   n_boot: int = 1000, seed: int = 0, **options) -> dict:
    """Adversarial probes, membership inference, linear probes and logit lens, beside the retrained model."""
    from mechedit.diagnose.reference import retrained_reference

    target = resolve_target(before.world, requests, forget)
    ref = reference or (retrained_reference(before, target, cache_dir) if retrained else None)
    models = {"before": before, "after": after, **({"retrained": ref} if ref is not None else {})}
    out = {"adversarial": adversarial_section(models, target, n_boot, seed),
           "mia": mia_section(models, target, k, nonmember_subjects=nonmember_subjects, n_boot=n_boot, seed=seed),
           "probes": probe_section(models, target, probe_max_train, seed, n_boot),
           "logit_lens": lens_section(models, target),
           "retrained_reference": None if ref is None else str(ref.path)}
    if ref is None:
        out["note"] = "no retrained reference (retrained = false): the figures have nothing to be compared with"
    return strict_json(out)
