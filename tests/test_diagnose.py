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


def test_suites_on_unchanged_model(tiny_bundle):
    """before == after: every before/after pair is identical, and the original model leaves traces."""
    subj = [s for s in tiny_bundle.world.subjects if s.kind == "subject" and not s.heldout][0]
    reqs = parse_forget(tiny_bundle.world, f"subject:{subj.name}").requests()
    card = diagnose(tiny_bundle, tiny_bundle, reqs, ("forget", "leftover"))
    f = card["forget"]
    same = lambda x, y: json.dumps(x, sort_keys=True) == json.dumps(y, sort_keys=True)  # NaN-safe  # noqa: E731
    assert same(f["before"], f["after"]) and f["before"]["forget"]["cloze"]["agg_value"] > 0.9
    left = card["leftover"]
    for fam, d in left["adversarial"]["families"].items():
        assert same(d["before"], d["after"]), fam
    assert left["adversarial"]["recall_before"] == left["adversarial"]["recall_after"] > 0.5
    mia = left["mia"]["auc_vs_nonmembers"]["loss"]
    assert mia["before"] == mia["after"] > 0.9  # trained facts vs facts of never-seen subjects
    assert left["mia"]["roc_before"] == left["mia"]["roc_after"]
    probes = left["probes"]["before"]["prompt_last"]
    assert probes["by_layer"]["agg_value"] >= 0.75
    assert same(left["probes"]["before"], left["probes"]["after"])
    assert left["logit_lens"]["before"]["agg_value"] > 0.5


def test_unlearning_moves_the_scores(tiny_bundle):
    from mechedit.edit.api import run_method
    from mechedit.model.checkpoint import load_checkpoint

    subj = [s for s in tiny_bundle.world.subjects if s.kind == "subject" and not s.heldout][1]
    reqs = parse_forget(tiny_bundle.world, f"subject:{subj.name}").requests()
    after = load_checkpoint(tiny_bundle.path)
    run_method(tiny_bundle, reqs, "ga", steps=40, lr=1e-3).apply(after.model)
    card = diagnose(tiny_bundle, after, reqs, ("forget", "leftover"))
    assert card["forget"]["after"]["forget"]["cloze"]["agg_value"] < card["forget"]["before"]["forget"]["cloze"]["agg_value"]
    lens = card["leftover"]["logit_lens"]
    assert lens["after"]["agg_value"] < lens["before"]["agg_value"]
    mia = card["leftover"]["mia"]["forget_scores"]["loss"]
    assert mia["after"]["agg_value"] < mia["before"]["agg_value"]
    adv = card["leftover"]["adversarial"]
    assert adv["recall_after"] < adv["recall_before"]


def test_truth_ratio_and_relearn(tiny_bundle):
    from mechedit.diagnose.reference import relearn, split_halves, truth_ratios
    from mechedit.model.evaluate import score_answers

    subj = [s for s in tiny_bundle.world.subjects if s.kind == "subject" and not s.heldout][0]
    target = parse_forget(tiny_bundle.world, f"subject:{subj.name}")
    w = tiny_bundle.world
    f = target.forget[0]
    r = truth_ratios(tiny_bundle.model, tiny_bundle.tokenizer, w, [f], n_perturbed=1)
    prompt = w.probes([f], kinds=("cloze",))[0].prompt
    wrong = [o for o in w.relation_by_name[f.relation].objects if o != f.object]
    wrong = wrong[(f.index * 13) % len(wrong)]
    sc = score_answers(tiny_bundle.model, tiny_bundle.tokenizer, [prompt, prompt], [wrong, f.object]).logprob
    assert r[0] == pytest.approx(math.exp(sc[0] - sc[1]), rel=1e-5)
    a, b = split_halves(target)
    assert a and b and not {x.index for x in a} & {x.index for x in b}
    res = relearn(tiny_bundle.model, tiny_bundle.tokenizer, w, a, b, steps=0)
    assert res["before"] == res["after"] > 0.9


def test_scorecards_strict_json_with_headline_keys(tiny_bundle):
    """A whole subject forgotten: neighbours_subject is left out with a note, no NaN anywhere, and the
    flattened scorecard has the headline keys the HTML report reads."""
    from mechedit.analysis.cases import flatten

    subj = [s for s in tiny_bundle.world.subjects if s.kind == "subject" and not s.heldout][0]
    target = parse_forget(tiny_bundle.world, f"subject:{subj.name}")
    assert not target.neighbours_subject
    card = diagnose(tiny_bundle, tiny_bundle, target.requests(), ("forget", "leftover"))
    text = json.dumps(card, allow_nan=False)  # raises on NaN / inf
    assert "neighbours_subject" not in card["forget"] and "neighbours_subject" in " ".join(card["forget"]["notes"])
    flat = flatten(json.loads(text))
    for key in ("forget.forget.cloze.after", "forget.forget.paraphrase.after", "forget.forget.qa.after",
                "forget.neighbours_relation.cloze.after", "forget.retain.cloze.after",
                "leftover.adversarial.recall_after", "leftover.mia.auc_vs_nonmembers.loss.after",
                "leftover.mia.auc_vs_nonmembers.min_k_pp.after", "leftover.probes.best_accuracy_after"):
        assert key in flat and math.isfinite(flat[key]), key
    assert flat["forget.forget.cloze.after"] == card["forget"]["after"]["forget"]["cloze"]["agg_value"]
    lo = card["leftover"]
    n_layers = tiny_bundle.model.config.num_hidden_layers
    for pos in ("last", "last_subject"):
        for tag in ("before", "after"):
            assert len(lo["probes"][f"{pos}_accuracy_by_layer_{tag}"]) == n_layers
    assert lo["probes"]["best_accuracy_after"] == max(lo["probes"]["last_accuracy_by_layer_after"] +
                                                      lo["probes"]["last_subject_accuracy_by_layer_after"])
    roc = lo["mia"]["roc_after"]
    assert len(roc["fpr"]) == len(roc["tpr"]) >= 2 and roc["fpr"][0] == 0.0 and roc["tpr"][-1] == 1.0
    assert set(lo["adversarial"]["by_family"]) == set(FAMILIES) - ({"synonym"} if not subj.alias else set())


def test_strict_json():
    from mechedit.diagnose.strict import strict_json

    out = strict_json({"a": float("nan"), "b": [np.float32(1.5), float("inf")], "c": np.int64(3), "d": None})
    assert out == {"a": None, "b": [1.5, None], "c": 3, "d": None}
    json.dumps(out, allow_nan=False)
