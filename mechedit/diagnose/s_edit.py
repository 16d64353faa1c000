"""The "edit" scorecard: did the edit take, does it generalise, and what collateral did it cause.

Categories follow Behemoth (Iofinova & Alistarh 2026): the edited facts (efficacy on the trained
cloze templates, P(new) > P(old), the held-out paraphrase template, the QA form); other subjects
with the same relation; subjects that already had the new value; the edited subject's other
relations; unrelated facts (a seeded sample); facts implied through nested / correlated relations
(does the edit propagate?); and perplexity on a retain sample of the corpus. Added here: NAME-WORD
SIBLINGS, the facts of the edited relation of other subjects whose names share a word with the
edited subject (`name_word_siblings`), and in particular its last word (`last_word_siblings`):
their recall of the old object, and (`*_new`) the share whose cloze prompts now give the NEW
object. In a parallel-residual model the layer-0 MLP at the last subject token sees only that
token's embedding, so a layer-0 edit is keyed on the last word and these subjects take part of it
while the same-relation average, diluted over every subject, hides it. Every category is
scored before and after with one batched `score_answers` pass per model, and reported as
{"before": metric, "after": metric, "change": after - before} in the shared metric schema.

The BEFORE model's scores are cached (`_BEFORE_CACHE`, a few entries) keyed on a fingerprint of its
weights (`weights_fingerprint`), its attached adaptors and the exact (prompt, answer) rows: the analysis runner scores the
same unedited model on the same rows for every method and parameter setting of a request set.
A hit returns the very arrays a fresh pass would compute, so results are identical.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import torch

from mechedit.diagnose import metric, register_suite
from mechedit.model.evaluate import score_answers


def _items(world, requests, n_unrelated: int, n_retain: int, seed: int):
    """(category, item id, prompt, answer, kind) rows; kind "top1" (recall) or "ppl" (perplexity)."""
    rows = []
    edited = [world.fact(r.subject, r.relation) for r in requests]
    edited_subjects = {f.subject for f in edited}
    edited_ids = {f.index for f in edited}
    rel_of = world.relation_by_name
    trained = [f for f in world.train_facts if f.index not in edited_ids]

    def cloze(f, t=None):
        tpls = [t] if t is not None else [x for x in range(world.n_templates) if x != f.heldout_template]
        return [world.prompt(f, x) for x in tpls]

    for i, (r, f) in enumerate(zip(requests, edited)):
        for t, p in enumerate(cloze(f)):
            rows.append(("efficacy", f"{i}:{t}", p, r.new_object, "top1"))
            rows.append(("efficacy_old", f"{i}:{t}", p, f.object, "top1"))
        rows.append(("paraphrase", str(i), world.prompt(f, f.heldout_template), r.new_object, "top1"))
        rows.append(("qa", str(i), world.prompt(f, -1), r.new_object, "top1"))
    # collateral: the original answers should survive
    seen: set[tuple[str, int]] = set()

    def add(cat, f, answer=None):
        if (cat, f.index) in seen:
            return
        seen.add((cat, f.index))
        for t, p in enumerate(cloze(f)):
            rows.append((cat, f"{f.index}:{t}", p, answer or f.object, "top1"))

    new_by_rel = {(r.relation, r.new_object) for r in requests}
    for f in trained:
        if f.subject in edited_subjects:
            continue
        if any(f.relation == r.relation for r in requests):
            add("same_relation", f)
        if (f.relation, f.object) in new_by_rel:
            add("same_new_value", f)
    implied: list[tuple] = []
    for r, f in zip(requests, edited):
        for g in world.facts_of(f.subject):
            if g.index in edited_ids or not world.is_trained(g):
                continue
            rel = rel_of[g.relation]
            if rel.source == f.relation and rel.kind == "nested":
                implied.append((g, world.nested_maps[g.relation].get(r.new_object)))
            elif rel.source == f.relation and rel.kind == "correlated" and g.object == f.object:
                implied.append((g, r.new_object))  # it copied the old value: does it copy the new one?
            else:
                add("same_subject", g)
    for g, new in implied:
        add("implied_kept", g)
        if new is not None and new != g.object:
            add("implied_follows", g, new)
    # name-word siblings: other subjects sharing a word of the edited subject's name (any word / the
    # last word), their facts of the edited relation: kept (old object) and flipped (new object)
    for r, f in zip(requests, edited):
        words = world.subjects[f.subject].name.split()
        for g in trained:
            if g.subject in edited_subjects or g.relation != r.relation or world.subjects[g.subject].kind != "subject":
                continue
            other = world.subjects[g.subject].name.split()
            if not set(words) & set(other):
                continue
            add("name_word_siblings", g)
            if r.new_object != g.object:
                add("name_word_siblings_new", g, r.new_object)
            if other[-1] == words[-1]:
                add("last_word_siblings", g)
                if r.new_object != g.object:
                    add("last_word_siblings_new", g, r.new_object)

    rng = np.random.default_rng(seed)
    others = [f for f in trained if f.subject not in edited_subjects and
              all(f.relation != r.relation for r in requests)]
    for j in rng.choice(len(others), size=min(n_unrelated, len(others)), replace=False):
        f = others[int(j)]
        rows.append(("unrelated", f"{f.index}", world.prompt(f, 0 if f.heldout_template else 1), f.object, "top1"))
    corpus = world.corpus()
    names = {world.subjects[s].name for s in edited_subjects}
    retain = [s for s in corpus if not any(n in s for n in names)]
    for j in rng.choice(len(retain), size=min(n_retain, len(retain)), replace=False):
        words = retain[int(j)].split()
        rows.append(("retain_ppl", str(int(j)), words[0], " ".join(words[1:]), "ppl"))
    return rows


CATEGORIES = ("efficacy", "paraphrase", "qa", "same_relation", "same_new_value", "same_subject", "unrelated",
              "implied_kept", "implied_follows", "name_word_siblings", "name_word_siblings_new",
              "last_word_siblings", "last_word_siblings_new")

_BEFORE_CACHE: OrderedDict = OrderedDict()  # (weights fingerprint, rows digest) -> _score result
_BEFORE_CACHE_SIZE = 8


@torch.no_grad()
def weights_fingerprint(model) -> tuple:
    """Per parameter: name, shape, float64 sum and a position-weighted sum (1 + i mod 7 for element i).

    Any single changed weight changes the weighted sum unless the change is below float64
    resolution; a rank-one edit, a LoRA merge or a restore-to-original are all told apart.
    Costs one pass over the parameters (milliseconds for the models here).
    """
    out = []
    for name, p in model.named_parameters():
        x = p.detach().reshape(-1).double()
        w = (torch.arange(x.numel(), dtype=torch.float64, device=x.device) % 7) + 1
        out.append((name, tuple(p.shape), float(x.sum()), float(x @ w)))
    return tuple(out)


def _rows_digest(rows) -> str:
    h = hashlib.sha1()
    for r in rows:
        h.update(f"{r[2]}\x00{r[3]}\x01".encode())
    return h.hexdigest()


def _score_cached(bundle, rows):
    """`_score` of an (unedited) model, reusing an earlier pass over identical weights and rows."""
    from mechedit.edit.adaptors import adaptor_fingerprint

    key = (weights_fingerprint(bundle.model), adaptor_fingerprint(bundle.model), _rows_digest(rows))
    hit = _BEFORE_CACHE.get(key)
    if hit is not None:
        _BEFORE_CACHE.move_to_end(key)
        return tuple(a.copy() for a in hit)
    res = _score(bundle, rows)
    _BEFORE_CACHE[key] = tuple(a.copy() for a in res)
    while len(_BEFORE_CACHE) > _BEFORE_CACHE_SIZE:
        _BEFORE_CACHE.popitem(last=False)
    return res


def _score(bundle, rows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scores = score_answers(bundle.model, bundle.tokenizer, [r[2] for r in rows], [r[3] for r in rows])
    ntok = np.array([len(r[3].split()) for r in rows])
    return scores.correct.astype(float), scores.logprob, ntok


def _group(rows, values, cat) -> dict[str, float]:
    """Per item (the part of the id before ':'), mean over its templates."""
    acc: dict[str, list[float]] = {}
    for r, v in zip(rows, values):
        if r[0] == cat:
            acc.setdefault(r[1].split(":")[0], []).append(float(v))
    return {k: float(np.mean(v)) for k, v in acc.items()}


@register_suite("edit")
def edit_scorecard(before, after, requests, *, n_unrelated: int = 200, n_retain: int = 300, seed: int = 0,
                   **_options) -> dict:
    """Edit efficacy, generalisation and collateral by Behemoth's categories (before vs after)."""
    world = after.world
    rows = _items(world, requests, n_unrelated, n_retain, seed)
    res = {}
    res["before"] = _score_cached(before, rows)
    res["after"] = _score(after, rows)
    out: dict = {"n_requests": len(requests)}
    # P(new) > P(old) on the trained templates
    eff_new = [i for i, r in enumerate(rows) if r[0] == "efficacy"]
    eff_old = [i for i, r in enumerate(rows) if r[0] == "efficacy_old"]
    for cat in CATEGORIES:
        if not any(r[0] == cat for r in rows):
            continue
        b = metric(_group(rows, res["before"][0], cat))
        a = metric(_group(rows, res["after"][0], cat))
        out[cat] = {"before": b, "after": a, "change": a["agg_value"] - b["agg_value"],
                    "n": len(a["value_by_index"])}
    for name in ("before", "after"):
        lp = res[name][1]
        wins = [float(lp[i] > lp[j]) for i, j in zip(eff_new, eff_old)]
        out.setdefault("prob_new_gt_old", {})[name] = metric(_group([rows[i] for i in eff_new], wins, "efficacy"))
    pn = out["prob_new_gt_old"]
    pn["change"] = pn["after"]["agg_value"] - pn["before"]["agg_value"]
    ppl_idx = [i for i, r in enumerate(rows) if r[0] == "retain_ppl"]
    if ppl_idx:
        ppl = {}
        for name in ("before", "after"):
            _, lp, nt = res[name]
            ppl[name] = float(np.exp(-lp[ppl_idx].sum() / nt[ppl_idx].sum()))
        out["retain_perplexity"] = {**ppl, "change": ppl["after"] - ppl["before"], "n": len(ppl_idx)}
    out["headline"] = {k: out[k]["after"]["agg_value"] for k in ("efficacy", "paraphrase", "qa") if k in out}
    out["headline"].update({f"{k}_change": out[k]["change"] for k in
                            ("same_relation", "same_subject", "unrelated", "last_word_siblings") if k in out})
    if "last_word_siblings_new" in out:
        out["headline"]["last_word_siblings_new"] = out["last_word_siblings_new"]["after"]["agg_value"]
    return out
