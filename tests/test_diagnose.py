"""Diagnostics: MIA scores against direct computation, adversarial probes, probes, suites on the tiny model."""
from __future__ import annotations

import json
import math
import zlib

import numpy as np
import pytest
import torch

from mechedit.diagnose import diagnose
from mechedit.diagnose.adversarial import FAMILIES, adversarial_probes
from mechedit.diagnose.mia import auc, scores_from_stats, token_stats
from mechedit.unlearn import parse_forget


def _direct(logits: np.ndarray, ids: list[int], text: str, k: float) -> dict:
    """Slow reference: loop over tokens with plain numpy."""
    ls, zs = [], []
    for t in range(1, len(ids)):
        row = logits[t - 1].astype(np.float64)
        logp = row - np.log(np.exp(row - row.max()).sum()) - row.max()
        p = np.exp(logp)
        mu = float((p * logp).sum())
        sigma = max(math.sqrt(max(float((p * logp**2).sum()) - mu**2, 0.0)), 1e-6)
        ls.append(float(logp[ids[t]]))
        zs.append((ls[-1] - mu) / sigma)
    kk = max(1, int(k * len(ls)))
    loss = -float(np.mean(ls))
    return {"loss": -loss, "zlib": -loss / len(zlib.compress(text.encode())),
            "min_k": float(np.mean(sorted(ls)[:kk])), "min_k_pp": float(np.mean(sorted(zs)[:kk]))}


@pytest.mark.parametrize("k", [0.2, 0.5, 1.0, 0.01])
def test_mia_scores_match_direct_computation(k):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 11)) * 3
    ids = [0, 3, 5, 1, 10, 2, 4]
    text = "alpha beta gamma delta"
    got = scores_from_stats(*token_stats(torch.tensor(logits), torch.tensor(ids)), text, k)
    want = _direct(logits, ids, text, k)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-9), key


def test_min_k_pp_with_fewer_than_one_token_and_zero_sigma():
    logits = torch.full((3, 5), -1e4)
    logits[:, 2] = 0.0  # a one-hot next-token distribution: sigma = 0 -> clamped
    ids = torch.tensor([0, 2, 1])
    s = scores_from_stats(*token_stats(logits, ids), "x y", k=0.1)  # k*N = 0.2 < 1 -> one token
    assert all(math.isfinite(v) for v in s.values())
    l, mu, sigma = token_stats(logits, ids)
    assert float(sigma.min()) >= 1e-6
    assert s["min_k"] == pytest.approx(float(l.min()))
    assert s["min_k_pp"] == pytest.approx(float(((l - mu) / sigma).min()))
    assert s["min_k_pp"] < -1e6  # token 1 is impossible under a one-hot distribution


def test_auc_orientation():
    assert auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert auc(np.array([0.0]), np.array([1.0])) == 0.0
    assert math.isnan(auc(np.array([]), np.array([1.0])))


def test_adversarial_probes_deterministic_and_in_vocabulary(tiny_world, tiny_bundle):
    subj = next(s for s in tiny_world.subjects if s.kind == "subject" and not s.heldout and s.alias)
    target = parse_forget(tiny_world, f"subject:{subj.name}")
    a = adversarial_probes(tiny_world, list(target.forget), exclude=target.forget_ids)
    b = adversarial_probes(tiny_world, list(target.forget), exclude=target.forget_ids)
    assert a == b
    assert {p.family for p in a} == set(FAMILIES)
    unk = tiny_bundle.tokenizer.unk_token_id
    for p in a:
        assert unk not in tiny_bundle.tokenizer(f"{p.prompt} {p.answer}")["input_ids"], p
    mc = [p for p in a if p.family == "multiple_choice"]
    assert all(p.answer in p.prompt.split() for p in mc)
    assert all(p.answer == subj.name for p in a if p.family == "reverse_query")
    helpers = [p for p in a if p.family in ("prefix_injection", "in_context")]
    assert helpers and all(subj.name not in p.prompt.replace(tiny_world.prompt(tiny_world.facts[p.fact], -1), "")
                           .replace(tiny_world.prompt(tiny_world.facts[p.fact],
                                                      next(t for t in range(4) if t != tiny_world.facts[p.fact].heldout_template)), "")
                           for p in helpers)


def test_mia_spans_on_a_real_model(tiny_bundle):
    """mia_scores: the sentence span scores every token after <bos>, the answer span only the
    object's tokens, each equal to the direct computation on the model's own logits."""
    from mechedit.diagnose.mia import mia_scores
    from mechedit.model.evaluate import encode_pairs

    w = tiny_bundle.world
    facts = w.train_facts[:3]
    prompts = [w.prompt(f, 0) for f in facts]
    answers = [f.object for f in facts]
    got = mia_scores(tiny_bundle.model, tiny_bundle.tokenizer, prompts, answers, k=0.5)
    seqs, _, alen = encode_pairs(tiny_bundle.tokenizer, prompts, answers)
    for i, (ids, a) in enumerate(zip(seqs, alen)):
        with torch.no_grad():
            logits = tiny_bundle.model(input_ids=torch.tensor([ids])).logits[0].double().numpy()
        full = _direct(logits, ids, f"{prompts[i]} {answers[i]}", 0.5)
        n = len(ids)
        # the answer span: the last `a` predictions only (logits of positions n-a-1 .. n-2)
        ans = _direct(logits[n - a - 1 :], ids[n - a - 1 :], answers[i], 0.5)
        for key in full:
            assert got["sentence"][key][i] == pytest.approx(full[key], rel=1e-6, abs=1e-6), key
            assert got["answer"][key][i] == pytest.approx(ans[key], rel=1e-6, abs=1e-6), key
    assert not np.allclose(got["sentence"]["loss"], got["answer"]["loss"])


def test_bootstrap_intervals():
    from sklearn.metrics import roc_auc_score

    from mechedit.diagnose.stats import auc_from_scores, bootstrap_auc, bootstrap_mean

    rng = np.random.default_rng(1)
    m, n = rng.normal(1, 1, 40).round(1), rng.normal(0, 1, 60).round(1)  # rounded: ties count half
    want = roc_auc_score(np.r_[np.ones(40), np.zeros(60)], np.r_[m, n])
    assert auc_from_scores(m, n) == pytest.approx(want)
    lo, hi = bootstrap_auc(m, n, seed=3)
    assert lo < want < hi and hi - lo < 0.35 and (lo, hi) == bootstrap_auc(m, n, seed=3)
    lo, hi = bootstrap_mean([0.0, 1.0] * 20)
    assert lo < 0.5 < hi
    assert bootstrap_mean([1.0, 1.0]) == (1.0, 1.0) and bootstrap_mean([None]) is None
    assert bootstrap_auc([], n) is None
    # a mean over groups of per-group means (adversarial families; NaN = no probe of that family)
    from mechedit.diagnose.stats import bootstrap_mean_of_means, mean_of_means

    table = np.where(rng.random((30, 4)) < 0.2, np.nan, (rng.random((30, 4)) < [[0.1, 0.3, 0.6, 0.9]]).astype(float))
    point = mean_of_means(table)
    assert point == pytest.approx(np.mean([np.nanmean(table[:, j]) for j in range(4)]))
    lo, hi = bootstrap_mean_of_means(table, seed=1)
    assert lo < point < hi and hi - lo < 0.3


def test_nonmembers_are_vocabulary_matched(tiny_world):
    """Non-members use only trained words, never a world name; model-free scores cannot tell them
    from retained members, while the naive design (every held-out fact) has unseen words."""
    from mechedit.diagnose.nonmembers import corpus_counts, member_text, model_free_scores, nonmember_texts
    from mechedit.diagnose.stats import auc_from_scores

    counts = corpus_counts(tiny_world)
    nm, design = nonmember_texts(tiny_world, min_subjects=12)
    assert design["n_subjects"] >= 12 and design["n_texts"] == len(nm)
    assert design["heldout_subjects_all_words_trained"] + design["heldout_subjects_dropped_unseen_word"] == sum(
        s.heldout for s in tiny_world.subjects)
    assert all(counts[x] > 0 for t in nm for x in t.text.split())
    names = {s.name for s in tiny_world.subjects} | {s.alias for s in tiny_world.subjects if s.alias}
    trained = {s.name for s in tiny_world.subjects if not s.heldout}
    assert not {t.subject for t in nm} & trained
    assert all(t.subject in names for t in nm if t.key.startswith("f")) and not any(
        t.subject in names for t in nm if t.key.startswith("x"))
    assert len({t.subject for t in nm}) == design["n_subjects"]
    members = [member_text(tiny_world, f) for f in tiny_world.train_facts if tiny_world.subjects[f.subject].kind == "subject"]
    naive = [member_text(tiny_world, f) for f in tiny_world.heldout_facts]
    for span in ("sentence", "answer"):
        a, b = model_free_scores(tiny_world, members, span), model_free_scores(tiny_world, nm, span)
        assert auc_from_scores(a["unseen_words"], b["unseen_words"]) == 0.5
        assert abs(auc_from_scores(a["unigram_logfreq"], b["unigram_logfreq"]) - 0.5) < 0.15
    c = model_free_scores(tiny_world, naive, "sentence")
    assert auc_from_scores(model_free_scores(tiny_world, members)["unseen_words"], c["unseen_words"]) > 0.55
    assert nonmember_texts(tiny_world, min_subjects=12) == (nm, design)  # seeded


def test_probe_split_is_disjoint_and_excludes_the_forget_subjects(tiny_world, tiny_forget):
    from mechedit.diagnose.probes import split_subjects

    split = split_subjects(tiny_world, list(tiny_forget.forget), tiny_forget.retain)
    gone = {f.subject for f in tiny_forget.forget}
    assert split.train and split.validation
    assert not set(split.train) & set(split.validation)
    assert not (set(split.train) | set(split.validation)) & gone
    assert all(not tiny_world.subjects[s].heldout for s in split.train + split.validation)


def test_probe_choice_is_validated_on_held_out_subjects(tiny_bundle, tiny_forget, monkeypatch):
    """Probes are fit on the train subjects, chosen on the validation subjects and scored on the
    forget facts - three disjoint sets of prompts. With the retained facts' objects shuffled across
    subjects nothing carries over to new subjects, so the validation accuracy of the chosen probe
    stays near chance."""
    import dataclasses

    import mechedit.diagnose.probes as P

    w = tiny_bundle.world
    rng = np.random.default_rng(0)
    gone = tiny_forget.forget_ids
    facts = list(w.facts)
    for rel in {f.relation for f in tiny_forget.forget}:
        idx = [i for i, f in enumerate(facts) if f.relation == rel and f.index not in gone and w.is_trained(f)]
        objs = [facts[i].object for i in idx]
        for i, j in zip(idx, rng.permutation(len(idx))):
            facts[i] = dataclasses.replace(facts[i], object=objs[int(j)])
    scrambled = dataclasses.replace(w, facts=tuple(facts))
    split = P.split_subjects(scrambled, list(tiny_forget.forget), tiny_forget.retain)
    calls = []
    real = P.residuals
    monkeypatch.setattr(P, "residuals", lambda m, t, world, fs, **kw: calls.append({f.subject for f in fs}) or
                        real(m, t, world, fs, **kw))
    r = P.probe_model(tiny_bundle.model, tiny_bundle.tokenizer, scrambled, list(tiny_forget.forget), split)
    rels = {f.relation for f in tiny_forget.forget}
    assert len(calls) == 3 * len(rels)  # per relation: train, validation, forget - in this order
    for fit_on, chosen_on, scored_on in zip(calls[0::3], calls[1::3], calls[2::3]):
        assert fit_on <= set(split.train) and chosen_on <= set(split.validation) and fit_on and chosen_on
        assert scored_on == {f.subject for f in tiny_forget.forget}
    assert r["n_validation_facts"] >= 10
    assert r["validation_accuracy"] < 0.5, r["validation_accuracy"]
    assert r["chance"] == pytest.approx(np.mean([1 / len(w.relation(f.relation).objects) for f in tiny_forget.forget]))


def test_original_keeps_traces_that_the_retrained_model_lacks(tiny_bundle, tiny_forget, tiny_retrained):
    """The leftover suite on the ORIGINAL model beside the model retrained without the facts: the
    original's answers are recognised (MIA) and decodable (probes), the retrained model's less so,
    and every figure carries the retrained value and the gap to it."""
    card = diagnose(tiny_bundle, tiny_bundle, tiny_forget.requests(), ("forget", "leftover"), reference=tiny_retrained)
    lo = card["leftover"]
    probes = lo["probes"]["accuracy"]
    assert probes["before"] > probes["retrained"] + 0.2 and probes["gap_to_retrained"] == pytest.approx(
        probes["after"] - probes["retrained"])
    assert lo["probes"]["before"]["validation_accuracy"] > 0.8 and lo["probes"]["chance"] < 0.5
    mia = lo["mia"]
    for span in ("sentence", "answer"):
        m = mia[span]["auc_vs_nonmembers"]["loss"]
        assert m["before"] > m["retrained"] + 0.1, (span, m)
        assert m["ci95"]["before"][0] <= m["before"] <= m["ci95"]["before"][1]
    assert mia["n"]["forget"] == len(tiny_forget.forget) and mia["design"]["n_subjects"] >= 20
    assert mia["model_free"]["sentence"]["unseen_words"]["auc_retain_vs_nonmembers"]["auc"] == 0.5
    rec = card["forget"]["forget"]["cloze"]
    assert rec["before"] == 1.0 and rec["retrained"] < 0.8 and rec["gap_to_retrained"] == pytest.approx(
        rec["after"] - rec["retrained"])
    adv = lo["adversarial"]["recall"]
    assert adv["before"] > adv["retrained"]
    for tag in ("before", "retrained"):  # the interval is of the reported statistic
        assert adv["ci95"][tag][0] <= adv[tag] <= adv["ci95"][tag][1]


def test_unlearning_moves_the_scores(tiny_bundle, tiny_forget, tiny_retrained):
    from mechedit.edit.api import run_method
    from mechedit.model.checkpoint import load_checkpoint

    reqs = tiny_forget.requests()
    after = load_checkpoint(tiny_bundle.path)
    run_method(tiny_bundle, reqs, "ga", steps=40, lr=1e-3).apply(after.model)
    card = diagnose(tiny_bundle, after, reqs, ("forget", "leftover"), reference=tiny_retrained)
    assert card["forget"]["after"]["forget"]["cloze"]["agg_value"] < card["forget"]["before"]["forget"]["cloze"]["agg_value"]
    lens = card["leftover"]["logit_lens"]
    assert lens["after"]["agg_value"] < lens["before"]["agg_value"]
    mia = card["leftover"]["mia"]["forget_scores"]["answer"]["loss"]
    assert mia["after"]["agg_value"] < mia["before"]["agg_value"]
    adv = card["leftover"]["adversarial"]["recall"]
    assert adv["after"] < adv["before"]


def test_truth_ratio_and_relearn(tiny_bundle, tiny_forget):
    from mechedit.diagnose.reference import prompt_truth_ratios, relearn, split_halves, truth_ratios
    from mechedit.model.evaluate import score_answers

    w = tiny_bundle.world
    f = tiny_forget.forget[0]
    r, owners = prompt_truth_ratios(tiny_bundle.model, tiny_bundle.tokenizer, w, [f], n_perturbed=1)
    prompt = w.probes([f], kinds=("cloze",))[0].prompt
    wrong = [o for o in w.relation_by_name[f.relation].objects if o != f.object]
    wrong = wrong[(f.index * 13) % len(wrong)]
    sc = score_answers(tiny_bundle.model, tiny_bundle.tokenizer, [prompt, prompt], [wrong, f.object]).logprob
    assert r[0] == pytest.approx(math.exp(sc[0] - sc[1]), rel=1e-5)
    assert owners == [f.index] * len(r) and len(r) == w.n_templates  # 3 trained templates + QA
    per = truth_ratios(tiny_bundle.model, tiny_bundle.tokenizer, w, [f], n_perturbed=1)
    assert per == {f.index: pytest.approx(float(np.mean(r)))}
    a, b = split_halves(tiny_forget)
    assert a and b and not {x.index for x in a} & {x.index for x in b}
    res = relearn(tiny_bundle.model, tiny_bundle.tokenizer, w, a, b, steps=2)
    assert set(res["after_by_fact"]) == {x.index for x in b}
    assert res["after"] == pytest.approx(np.mean(list(res["after_by_fact"].values())))


def test_forget_quality_counts_one_truth_ratio_per_fact(tiny_bundle, tiny_forget, tiny_retrained):
    """KS is computed on one value per fact (the mean over its prompts), n = forget facts."""
    from scipy.stats import ks_2samp

    from mechedit.diagnose.reference import prompt_truth_ratios
    from mechedit.edit.api import run_method
    from mechedit.model.checkpoint import load_checkpoint

    w = tiny_bundle.world
    reqs = tiny_forget.requests()
    after = load_checkpoint(tiny_bundle.path)
    run_method(tiny_bundle, reqs, "ga", steps=10, lr=1e-3).apply(after.model)
    card = diagnose(tiny_bundle, after, reqs, ("forget_quality",), reference=tiny_retrained)["forget_quality"]
    facts = list(tiny_forget.forget)
    assert card["n_facts"] == len(facts)

    def per_fact(b):
        r, owners = prompt_truth_ratios(b.model, b.tokenizer, w, facts)
        return [float(np.mean([x for x, o in zip(r, owners) if o == f.index])) for f in facts], r

    (u, u_prompts), (t, t_prompts) = per_fact(after), per_fact(tiny_retrained)
    assert card["ks_pvalue"] == pytest.approx(float(ks_2samp(u, t).pvalue))
    assert float(ks_2samp(u_prompts, t_prompts).pvalue) != pytest.approx(card["ks_pvalue"])  # the test can tell
    assert sorted(card["truth_ratio"]["unlearned"]["value_by_index"]) == sorted(str(f.index) for f in facts)
    assert card["forget_recall"]["original"] == 1.0 and card["forget_recall"]["retrained"] < 1.0


def test_retrained_reference_follows_the_rule(tiny_bundle, tiny_forget, tiny_retrained):
    """Same training minus the forget facts: same schedule, stopped at the original's epoch, recall
    evaluated on the retained facts; the forget facts are not known; the rule is recorded."""
    from mechedit.diagnose.reference import RETRAIN_VERSION, weights_sha256

    meta = tiny_retrained.meta
    assert meta["retrain"]["version"] == RETRAIN_VERSION
    assert meta["epochs"] == meta["retrain"]["stop_epoch"] == tiny_bundle.meta["epochs"]
    assert meta["train_spec"] == tiny_bundle.meta["train_spec"]  # same max_epochs: the same cosine schedule
    assert meta["retrain"]["source_weights_sha256"] == weights_sha256(tiny_bundle.path)
    assert sorted(meta["excluded_facts"]) == sorted(tiny_forget.forget_ids)
    final = meta["final_recall"]
    n_retained = len(tiny_bundle.world.train_facts) - len(tiny_forget.forget)
    assert final["trained"]["n"]["qa"] == n_retained and final["excluded"]["n"]["qa"] == len(tiny_forget.forget)
    assert final["trained"]["by_kind"]["cloze"] > 0.95
    assert final["excluded"]["by_kind"]["cloze"] < 0.8  # never seen: guessed from small pools at best


def test_stale_reference_is_retrained_not_reused(tiny_bundle, tiny_forget, tmp_path, monkeypatch, caplog):
    import shutil

    import mechedit.model.pipeline as pipeline
    from mechedit.diagnose.reference import retrain_record, retrained_reference
    from mechedit.fileio import read_json, write_json_atomic

    cached = tmp_path / f"retrain-{tiny_forget.hash()}"
    shutil.copytree(tiny_bundle.path, cached)
    meta = read_json(cached / "mechedit.json")
    meta["excluded_facts"] = sorted(tiny_forget.forget_ids)  # right facts, old rule (no retrain record)
    write_json_atomic(cached / "mechedit.json", meta)
    calls = []

    def fake_train(world, mspec, tspec, out, *, force=False, exclude_facts=frozenset(), stop_epoch=None,
                   meta_extra=None, **kw):
        calls.append({"exclude": set(exclude_facts), "stop_epoch": stop_epoch, "meta": meta_extra, "tspec": tspec})
        return tiny_bundle

    monkeypatch.setattr(pipeline, "train_checkpoint", fake_train)
    with caplog.at_level("WARNING", logger="mechedit"):
        retrained_reference(tiny_bundle, tiny_forget, cache_dir=tmp_path)
    assert len(calls) == 1 and "old rule" in caplog.text
    call = calls[0]
    assert call["exclude"] == tiny_forget.forget_ids and call["stop_epoch"] == tiny_bundle.meta["epochs"]
    assert call["tspec"].max_epochs == tiny_bundle.meta["train_spec"]["max_epochs"]
    # a reference made by the current rule from this very checkpoint is reused
    write_json_atomic(cached / "mechedit.json", {**meta, "retrain": retrain_record(tiny_bundle, tiny_forget)})
    ref = retrained_reference(tiny_bundle, tiny_forget, cache_dir=tmp_path)
    assert len(calls) == 1 and ref.path == cached


def test_name_word_siblings_in_the_edit_scorecard(tiny_bundle):
    """Subjects sharing a name word (and the last word in particular) with the edited subject: their
    facts of the edited relation are a collateral category of their own."""
    from mechedit.diagnose.s_edit import _items
    from mechedit.edit import EditRequest

    w = tiny_bundle.world
    subs = [s for s in w.subjects if s.kind == "subject" and not s.heldout]
    last = {}
    for s in subs:
        last.setdefault(s.name.split()[-1], []).append(s)
    edited = next(g[0] for g in last.values() if len(g) > 1)
    f = w.fact(edited.name, "capital")
    new = next(o for o in w.relation("capital").objects if o != f.object)
    rows = _items(w, [EditRequest(edited.name, "capital", new)], 5, 5, 0)
    cat = lambda c: {int(r[1].split(":")[0]) for r in rows if r[0] == c}  # noqa: E731
    words = set(edited.name.split())
    want_any = {g.index for g in w.train_facts if g.relation == "capital" and g.subject != edited.id
                and w.subjects[g.subject].kind == "subject" and words & set(w.subjects[g.subject].name.split())}
    want_last = {g.index for g in w.train_facts if g.relation == "capital" and g.subject != edited.id
                 and w.subjects[g.subject].kind == "subject"
                 and w.subjects[g.subject].name.split()[-1] == edited.name.split()[-1]}
    assert want_last and want_last <= want_any
    assert cat("name_word_siblings") == want_any and cat("last_word_siblings") == want_last
    assert cat("last_word_siblings_new") == {i for i in want_last if w.facts[i].object != new}
    assert all(r[3] == new for r in rows if r[0] == "last_word_siblings_new")


def test_scorecards_strict_json_with_headline_keys(tiny_bundle, tiny_forget, tiny_retrained):
    """A whole subject forgotten: neighbours_subject is left out with a note, no NaN anywhere, and the
    flattened scorecard has the headline keys the HTML report and the unlearning table read."""
    from mechedit.analysis.cases import flatten
    from mechedit.report.build import FORGET_COLUMNS

    target = tiny_forget
    assert not target.neighbours_subject
    card = diagnose(tiny_bundle, tiny_bundle, target.requests(), ("forget", "leftover"), reference=tiny_retrained)
    text = json.dumps(card, allow_nan=False)  # raises on NaN / inf
    assert "neighbours_subject" not in card["forget"] and "neighbours_subject" in " ".join(card["forget"]["notes"])
    flat = flatten(json.loads(text))
    for key, _ in FORGET_COLUMNS:
        if key.startswith(("forget.neighbours_subject", "relearn", "forget_quality")):
            continue
        assert key in flat and math.isfinite(flat[key]), key
    assert flat["forget.forget.cloze.after"] == card["forget"]["after"]["forget"]["cloze"]["agg_value"]
    lo = card["leftover"]
    n_layers = tiny_bundle.model.config.num_hidden_layers
    for tag in ("before", "after", "retrained"):
        p = lo["probes"][tag]
        assert set(p["cells"]) == {"subject_last", "prompt_last"}
        assert all(len(v) == n_layers for c in p["cells"].values() for v in c.values())
        sel = p["selected"]
        assert p["validation_accuracy"] == max(x for c in p["cells"].values() for x in c["validation"])
        assert p["accuracy"] == p["cells"][sel["position"]]["forget"][sel["layer"]]
    roc = lo["mia"]["roc"]["answer"]["after"]
    assert len(roc["fpr"]) == len(roc["tpr"]) >= 2 and roc["fpr"][0] == 0.0 and roc["tpr"][-1] == 1.0
    subj = tiny_bundle.world.subjects[target.forget[0].subject]
    assert set(lo["adversarial"]["by_family"]) == set(FAMILIES) - ({"synonym"} if not subj.alias else set())


def test_strict_json():
    from mechedit.diagnose.strict import strict_json

    out = strict_json({"a": float("nan"), "b": [np.float32(1.5), float("inf")], "c": np.int64(3), "d": None})
    assert out == {"a": None, "b": [1.5, None], "c": 3, "d": None}
    json.dumps(out, allow_nan=False)


def test_recall_table_scores_each_set_as_if_alone(tiny_bundle, tiny_forget):
    """The forget suite's table scores the union of its overlapping sets once; every set's per-fact
    recall must be what scoring that set alone gives (the slow reference, written out here)."""
    from mechedit.diagnose.s_forget import KINDS, recall_table
    from mechedit.model.evaluate import score_answers

    b, world = tiny_bundle, tiny_forget.world
    table = recall_table(b.model, b.tokenizer, tiny_forget)
    sets = {"forget": list(tiny_forget.forget), "neighbours_relation": tiny_forget.neighbours_relation,
            "retain": tiny_forget.retain}
    assert set(sets) <= set(table) and all(sets.values())
    for name, facts in sets.items():
        probes = world.probes(facts, kinds=KINDS)
        sc = score_answers(b.model, b.tokenizer, [p.prompt for p in probes], [p.answer for p in probes])
        for kind in KINDS:
            per: dict[int, list[float]] = {}
            for p, ok in zip(probes, sc.correct):
                if p.kind == kind:
                    per.setdefault(p.fact, []).append(float(ok))
            want = {str(k): float(np.mean(v)) for k, v in per.items()}
            assert table[name][kind]["value_by_index"] == want, (name, kind)
