"""Representation shattering: R and ring-ness against numpy, invariances, the representation against the
TransformerLens bridge, the suite on the tiny model, ring request sets, bad options, the report section."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import invoke as cli  # in-process CLI

from mechedit.analysis.requests import request_groups, request_set_record
from mechedit.analysis.spec import RequestSet
from mechedit.diagnose import diagnose
from mechedit.diagnose.geometry import (RingSet, entity_prompts, entity_representations, pairwise_distances,
                                        ring_sets, ringness, shattering_r)
from mechedit.edit.api import EditRequest
from mechedit.errors import MecheditError


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean rank), plain numpy."""
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=float)
    for v in np.unique(x):
        r[x == v] = r[x == v].mean()
    return r


def test_r_and_ringness_equal_a_direct_computation():
    rng = np.random.default_rng(0)
    n, d = 9, 5
    h0, h1 = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    loop = lambda h: np.array([[np.sqrt(sum((h[i, k] - h[j, k]) ** 2 for k in range(d))) for j in range(n)]  # noqa: E731
                               for i in range(n)])
    d0, d1 = loop(h0), loop(h1)
    np.testing.assert_allclose(pairwise_distances(h0), d0, rtol=1e-12, atol=1e-12)
    want_r = np.sqrt(((d1 - d0) ** 2).sum()) / np.sqrt((d0 ** 2).sum())
    assert shattering_r(pairwise_distances(h0), pairwise_distances(h1)) == pytest.approx(want_r, rel=1e-12)
    pos = rng.permutation(n)
    cyc = np.array([[min(abs(pos[i] - pos[j]), n - abs(pos[i] - pos[j])) for j in range(n)] for i in range(n)])
    iu = np.triu_indices(n, 1)
    a, b = _ranks(cyc[iu].astype(float)), _ranks(d0[iu])
    want_rho = ((a - a.mean()) * (b - b.mean())).sum() / np.sqrt(((a - a.mean()) ** 2).sum() * ((b - b.mean()) ** 2).sum())
    assert ringness(d0, cyc)[0] == pytest.approx(want_rho, rel=1e-10)
    # a perfect ring: points on a circle in their cyclic order
    theta = 2 * np.pi * pos / n
    circle = np.stack([np.cos(theta), np.sin(theta)], 1)
    assert ringness(np.round(pairwise_distances(circle), 9), cyc)[0] == pytest.approx(1.0)  # chords tie exactly
    assert shattering_r(d0, d0) == 0.0


def test_r_unchanged_when_entities_are_reindexed():
    rng = np.random.default_rng(1)
    h0, h1 = rng.normal(size=(12, 7)), rng.normal(size=(12, 7))
    perm = rng.permutation(12)
    r = shattering_r(pairwise_distances(h0), pairwise_distances(h1))
    assert shattering_r(pairwise_distances(h0[perm]), pairwise_distances(h1[perm])) == pytest.approx(r, rel=1e-12)


@pytest.fixture(scope="module")
def ring(tiny_world):
    (rs,) = ring_sets(tiny_world)
    return rs


def test_ring_set_of_the_tiny_world(tiny_world, ring):
    order = tiny_world.rings["ring"]
    assert sorted(order) == list(ring.entities)
    c = ring.cyclic_distances("ring")
    i, j = ring.index(order[0]), ring.index(order[2])
    assert c[i, j] == 2 and c[i, ring.index(order[-1])] == 1 and c.max() == len(order) // 2


def test_representations_equal_the_bridge_resid_post_at_the_entity_token(tiny_bundle, tiny_world, ring):
    """Independent path: TransformerLens bridge cache, one prompt at a time, the entity's token found by its id;
    plain and context-centred averages. A wrong layer (off by one block) or a wrong token position (the
    token after / before) fails here."""
    bridge = tiny_bundle.bridge()
    tok = tiny_bundle.tokenizer
    n_layers = tiny_bundle.n_layers
    prompts, owner, _, ctx = entity_prompts(tiny_world, ring)
    states = []
    for p, o in zip(prompts, owner):
        ids = tok(p, return_tensors="pt")["input_ids"]
        ent_id = tok.convert_tokens_to_ids(tiny_world.subjects[ring.entities[o]].name)
        (pos,) = (ids[0] == ent_id).nonzero()[:, 0].tolist()
        with torch.no_grad():
            _, cache = bridge.run_with_cache(ids)
        states.append([cache["blocks.0.hook_resid_pre"][0, pos].double().numpy()] +
                      [cache[f"blocks.{l}.hook_resid_post"][0, pos].double().numpy() for l in range(n_layers)])
    states = np.array(states)  # [prompts, layers + 1, d]
    owner = np.array(owner)
    plain = np.stack([states[owner == e].mean(0) for e in range(ring.n)], 1)
    centred = states.copy()
    for key in set(ctx):
        rows = [i for i, k in enumerate(ctx) if k == key]
        centred[rows] -= states[rows].mean(0)
    centred = np.stack([centred[owner == e].mean(0) for e in range(ring.n)], 1)
    for center, want in ((False, plain), (True, centred)):
        got = entity_representations(tiny_bundle.model, tok, tiny_world, ring, center=center)  # [L+1, n, d]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_representations_follow_entity_reindexing(tiny_bundle, tiny_world, ring):
    perm = np.random.default_rng(2).permutation(ring.n)
    ents = tuple(ring.entities[i] for i in perm)
    shuffled = RingSet(ents, {r: p[perm] for r, p in ring.positions.items()})
    h = entity_representations(tiny_bundle.model, tiny_bundle.tokenizer, tiny_world, ring)
    hp = entity_representations(tiny_bundle.model, tiny_bundle.tokenizer, tiny_world, shuffled)
    np.testing.assert_array_equal(hp, h[:, perm])
    np.testing.assert_array_equal(shuffled.cyclic_distances("ring"), ring.cyclic_distances("ring")[np.ix_(perm, perm)])


def _ring_fact(world, k: int = 0):
    facts = [f for f in world.train_facts if world.relation_by_name[f.relation].kind == "cyclic"]
    return facts[k]


def test_suite_gives_zero_for_an_intervention_that_changes_nothing(tiny_bundle, tiny_checkpoint):
    from mechedit.model.checkpoint import load_checkpoint

    w = tiny_bundle.world
    f = _ring_fact(w)
    req = [EditRequest(w.subjects[f.subject].name, f.relation, f.object)]
    card = diagnose(tiny_bundle, load_checkpoint(tiny_checkpoint), req, ("shattering",))["shattering"]
    assert card["R"] == 0.0 and card["R_others"] == 0.0 and all(v == 0.0 for v in card["keep"]["R_by_layer"])
    assert card["ringness_before"] == card["ringness_after"]
    assert card["edit_distance"] == 0.0
    for g, a in card["accuracy"].items():
        assert a["change"] == 0.0, g
    assert {"edited_new", "edited_old", "ring_direct", "non_ring"} <= set(card["accuracy"])
    assert card["accuracy"]["ring_direct"]["before"] > 0.9
    assert all(v == 0.0 for v in card["displacement"].values())
    assert card["keep"]["pca_before"] == card["keep"]["pca_after"]


def test_suite_after_a_real_edit(tiny_bundle):
    from mechedit.edit.api import run_method
    from mechedit.edit.run import edited_bundle
    from mechedit.diagnose.s_shattering import edit_distance

    w = tiny_bundle.world
    f = _ring_fact(w, 3)
    order = w.rings["ring"]
    old = w.subject_by_name[f.object].id
    new = w.subjects[order[(order.index(old) + 3) % len(order)]].name
    req = [EditRequest(w.subjects[f.subject].name, f.relation, new)]
    assert edit_distance(w, req[0]) == 3
    after = edited_bundle(tiny_bundle, run_method(tiny_bundle, req, "rome", layer=0, steps=30))
    card = diagnose(tiny_bundle, after, req, ("shattering",), shattering_layer=0)["shattering"]
    assert card["layer"] == "0" and card["layer_index"] == 1 and card["layer_chosen_by"] == "option"
    assert card["R"] > 0 and card["edit_distance"] == 3.0
    h0 = entity_representations(tiny_bundle.model, tiny_bundle.tokenizer, w, ring_sets(w)[0])[1]
    h1 = entity_representations(after.model, after.tokenizer, w, ring_sets(w)[0])[1]
    assert card["R"] == pytest.approx(shattering_r(pairwise_distances(h0), pairwise_distances(h1)), rel=1e-9)
    others = [i for i in range(h0.shape[0]) if i != card["edited"][0]["entity"]]
    assert card["R_others"] == pytest.approx(shattering_r(pairwise_distances(h0[others]), pairwise_distances(h1[others])),
                                             rel=1e-9)
    assert 0 < card["R_others"] < card["R"]  # the edited subject moves most
    assert card["accuracy"]["edited_new"]["after"] > card["accuracy"]["edited_new"]["before"]
    json.dumps(card, allow_nan=False)


def test_ring_request_sets(tiny_world):
    rset = RequestSet("r", "ring", "batch", n=3, seed=1, distances=(0, 1, 3))
    rec = request_set_record(tiny_world, rset)
    reqs = [EditRequest(**d) for d in rec["requests"]]
    assert rec["kind"] == "counterfactual" and rec["groups"] == [0] * 3 + [1] * 3 + [3] * 3
    from mechedit.diagnose.s_shattering import edit_distance

    assert [edit_distance(tiny_world, r) for r in reqs] == rec["groups"]
    facts = [(r.subject, r.relation) for r in reqs]
    assert facts[:3] == facts[3:6] == facts[6:]  # the same facts at every distance
    assert [len(g) for g in request_groups(rec, reqs)] == [3, 3, 3]
    assert len(request_groups({**rec, "mode": "each"}, reqs)) == 9
    default = request_set_record(tiny_world, RequestSet("r", "ring", "each", n=2))
    assert sorted(set(default["groups"])) == list(range(len(tiny_world.rings["ring"]) // 2 + 1))
    forget = request_set_record(tiny_world, RequestSet("f", "ring_forget", "each", n=2))
    assert forget["kind"] == "forget" and all(r["new_object"] == "<refuse>" for r in forget["requests"])
    with pytest.raises(MecheditError, match="requests.r.distances"):
        request_set_record(tiny_world, RequestSet("r", "ring", "each", n=2, distances=(4,)))
    with pytest.raises(MecheditError, match="requests.r.relation"):
        request_set_record(tiny_world, RequestSet("r", "ring", "each", n=2, relation="capital"))




@pytest.fixture(scope="module")
def after_dir(tmp_path_factory, tiny_checkpoint, tiny_world):
    """An AFTER directory: the unchanged checkpoint with an edit.json naming a ring request (the null edit)."""
    d = tmp_path_factory.mktemp("after") / "after"
    shutil.copytree(tiny_checkpoint, d)
    f = _ring_fact(tiny_world)
    (d / "edit.json").write_text(json.dumps({"requests": [
        {"subject": tiny_world.subjects[f.subject].name, "relation": f.relation, "new_object": f.object}]}))
    return d


def test_diagnose_cli_shattering(tmp_path, tiny_checkpoint, after_dir):
    r = cli("diagnose", tiny_checkpoint, after_dir, "--suite", "shattering", "-o", tmp_path / "d")
    assert r.returncode == 0, r.stderr
    card = json.loads((tmp_path / "d" / "scorecard.json").read_text())["shattering"]
    assert card["R"] == 0.0 and card["layer_chosen_by"] == "selection prompts"
    # the command ends with the suite's headline figures, read from the scorecard's own keys
    assert "R(D*) 0.000" in r.stdout and "ring-ness" in r.stdout and "other ring facts recall" in r.stdout


@pytest.mark.parametrize("option, key", [
    ({"shattering_layer": 7}, "shattering_layer"),
    ({"shattering_layer": "middle"}, "shattering_layer"),
    ({"shattering_layer": True}, "shattering_layer"),
    ({"shattering_n_nonring": -1}, "shattering_n_nonring"),
    ({"shattering_layr": 1}, "shattering_layr"),
])
def test_bad_suite_options_are_one_line_errors(tmp_path, tiny_checkpoint, after_dir, option, key):
    from mechedit.unlearn.run import diagnose_checkpoints

    with pytest.raises(MecheditError, match=key):
        diagnose_checkpoints(tiny_checkpoint, after_dir, ["shattering"], tmp_path / "d", options=option)


def test_bad_suite_option_exits_2(tmp_path, tiny_checkpoint, after_dir):
    r = cli("diagnose", tiny_checkpoint, after_dir, "--suite", "shattering", "--option", "shattering_layer=7",
            "-o", tmp_path / "d")
    assert r.returncode == 2 and "shattering_layer" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_run_and_report_of_ring_edits(tmp_path, tiny_checkpoint):
    """Ring request sets through `mechedit run` (one case per method, edits at every distance), then the
    report's shattering section with its tables, figures and shattering.json."""
    from mechedit.analysis import run_analysis
    from mechedit.report import build_report

    spec = tmp_path / "rings.toml"
    spec.write_text((Path(__file__).parent / "analysis_rings_tiny.toml").read_text().replace("CHECKPOINT", str(tiny_checkpoint)))
    res = run_analysis(spec, tmp_path / "run", workers=1)
    assert res["done"] == res["total"] == 3
    cases = {json.loads(p.read_text())["method"]: json.loads(p.read_text())
             for p in (tmp_path / "run").glob("case_*.json") if not p.name.endswith(".timing.json")}
    rome = cases["rome"]
    assert len(rome["per_edit"]) == 6 and all("kept" in e for e in rome["per_edit"])
    dists = [e["summary"]["shattering.edit_distance"] for e in rome["per_edit"]]
    assert dists == [0, 0, 1, 1, 3, 3]
    assert [len(e["requests"]) for e in cases["memit"]["per_edit"]] == [3, 3]  # one batch per distance
    assert cases["ga"]["request_kind"] == "forget" and "shattering.R" in cases["ga"]["per_edit"][0]["summary"]
    index = build_report(tmp_path / "run", tmp_path / "report")
    html = index.read_text()
    for text in ("Representation shattering", "R by edit distance", "null floor", "Does unlearning shatter too?",
                 "R grows with the cyclic distance", "memit (steps=10, layer=[0], batch 3)",
                 "ρ(R, d) per request set", "ring: "):
        assert text in html, text
    figs = sorted(p.name for p in (tmp_path / "report" / "figures").glob("shattering_*.png"))
    assert figs == ["shattering_displacement.png", "shattering_drop_vs_r.png", "shattering_layers.png",
                    "shattering_r_vs_d.png", "shattering_rings.png"]
    summary = json.loads((tmp_path / "report" / "shattering.json").read_text())
    assert summary["n_null"] == 2 + 1 and summary["by_method"][0]["table"][0]["d"] == 0
    from conftest import render_in_chromium

    result = render_in_chromium(index, tmp_path)
    if result is not None:  # every figure of the report (training curve + the five shattering figures) renders
        assert result["errors"] == [] and result["images"] >= 6 and result["broken"] == 0


@pytest.mark.parametrize("edit, key", [
    (lambda t: t.replace("distances = [0, 1, 3]", "distances = [1, 1]"), "requests.ring.distances"),
    (lambda t: t.replace("distances = [0, 1, 3]", "distances = [-1]"), "requests.ring.distances"),
    (lambda t: t.replace('kind = "ring_forget"', 'kind = "rings"'), "requests.ring_forget.kind"),
    (lambda t: t.replace('kind = "ring_forget"', 'kind = "ring_forget"\ndistances = [1]'), "requests.ring_forget.distances"),
    (lambda t: t.replace("shattering_layer = 0", 'shattering_layer = "middle"'), "shattering_layer"),
    (lambda t: t.replace("shattering_layer = 0", "shattering_layr = 0"), "shattering_layr"),
])
def test_bad_ring_analysis_specs_name_the_key(tmp_path, tiny_checkpoint, edit, key):
    from mechedit.analysis import load_analysis
    from mechedit.errors import SpecError

    spec = tmp_path / "rings.toml"
    spec.write_text(edit((Path(__file__).parent / "analysis_rings_tiny.toml").read_text().replace("CHECKPOINT", str(tiny_checkpoint))))
    with pytest.raises(SpecError, match=key.replace(".", r"\.")):
        load_analysis(spec)


def test_run_statistics_on_synthetic_cases():
    """summarise(): per-distance means, the null floor from d = 0 only, Spearman over d >= 1 only, Pearson of R
    with the drop over every edit call, batch labels, unlearning rows kept apart."""
    from scipy.stats import pearsonr, spearmanr

    from mechedit.analysis.shattering import summarise

    rng = np.random.default_rng(0)
    edits, rows = [], []
    for d in (0, 1, 2, 4):
        for _ in range(5):
            R = 0.01 + 0.05 * d + rng.normal(0, 0.01)
            drop = 0.3 * R + rng.normal(0, 0.005)
            rows.append((d, R, drop))
            edits.append({"requests": [{}], "summary": {"shattering.R": R, "shattering.edit_distance": float(d),
                                                        "shattering.accuracy.ring_direct.before": 1.0,
                                                        "shattering.accuracy.ring_direct.change": -drop}})
    # two request sets of one method (alternate edits): pooled in the tables, apart in trend_by_requests
    cases = [{"id": "a", "method": "rome", "params": {}, "layer": 0, "mode": "each", "request_kind": "counterfactual",
              "requests": "ring", "per_edit": edits[0::2]},
             {"id": "a2", "method": "rome", "params": {}, "layer": 0, "mode": "each", "request_kind": "counterfactual",
              "requests": "ring_b", "per_edit": edits[1::2]},
             {"id": "b", "method": "ga", "params": {}, "layer": None, "mode": "each", "request_kind": "forget",
              "requests": "f", "per_edit": [{"requests": [{}], "summary": {"shattering.R": 0.5}}]}]
    s = summarise(cases, n_boot=200)
    (m,) = s["by_method"]
    assert m["method"] == "rome (layer=0)"
    for t in m["table"]:
        assert t["R"] == pytest.approx(np.mean([r for d, r, _ in rows if d == t["d"]])) and t["n"] == 5
        assert t["R_lo"] <= t["R"] <= t["R_hi"]
    assert s["null_floor"]["R"] == pytest.approx(np.mean([r for d, r, _ in rows if d == 0])) and s["n_null"] == 5
    cf = [(d, r) for d, r, _ in rows if d >= 1]
    assert m["trend"]["rho"] == pytest.approx(spearmanr(*zip(*cf)).statistic) and m["trend"]["n"] == 15
    for name, part in (("ring", rows[0::2]), ("ring_b", rows[1::2])):
        sub = [(d, r) for d, r, _ in part if d >= 1]
        got = m["trend_by_requests"][name]
        assert got["rho"] == pytest.approx(spearmanr(*zip(*sub)).statistic) and got["n"] == len(sub)
    want = pearsonr([r for _, r, _ in rows], [x for *_, x in rows]).statistic
    c = s["costs"]["ring_direct"]
    assert c["r"] == pytest.approx(want) and c["r2"] == pytest.approx(want ** 2) and c["n"] == 20
    assert c["r_lo"] <= c["r"] <= c["r_hi"]
    assert [u["method"] for u in s["unlearning"]] == ["ga"] and s["unlearning"][0]["R"] == 0.5
    assert s["claims"][0]["verdict"] == "confirmed"
    assert s["claims"][1]["verdict"] == ("confirmed" if c["r2_hi"] >= 0.905 else "confirmed in direction, weaker than the paper's")


@pytest.mark.parametrize("trend, cost, verdicts", [
    ({"rho": 0.5, "p": 0.01, "n": 30}, {"r": 0.6, "r_lo": 0.5, "r_hi": 0.7, "r2": 0.36, "r2_lo": 0.25, "r2_hi": 0.49},
     ["confirmed", "confirmed in direction, weaker than the paper's"]),
    ({"rho": 0.5, "p": 0.2, "n": 8}, {"r": 0.97, "r_lo": 0.95, "r_hi": 0.99, "r2": 0.94, "r2_lo": 0.9, "r2_hi": 0.98},
     ["refuted", "confirmed"]),
    ({"rho": -0.4, "p": 0.01, "n": 30}, {"r": 0.3, "r_lo": -0.1, "r_hi": 0.6, "r2": 0.09, "r2_lo": 0.0, "r2_hi": 0.36},
     ["refuted", "refuted"]),
])
def test_claim_verdicts(trend, cost, verdicts):
    """The paper's two claims: R grows with d (rho > 0 at p < 0.05); R tracks the drop (r's interval above 0),
    as strongly as the paper's r^2 = 0.905 only when the r^2 interval reaches it."""
    from mechedit.analysis.shattering import claims

    s = {"trend_pooled": trend, "by_method": [], "costs": {"ring_direct": {**cost, "n": 40, "p": 0.01}}}
    assert [c["verdict"] for c in claims(s)] == verdicts


def test_suite_on_a_world_with_several_orders(tmp_path):
    """Three cyclic orders over one entity pool (a briefly trained tiny model): ring-ness per order equals the
    direct Spearman with that order's cyclic distances, the joint statistic uses every order, the edit distance
    is measured in the edited relation's own order, and a null edit gives R = 0."""
    import dataclasses

    from mechedit.diagnose.geometry import joint_ringness
    from mechedit.diagnose.s_shattering import edit_distance
    from mechedit.model.checkpoint import load_checkpoint
    from mechedit.model.spec import PRESETS, TRAIN_PRESETS, with_overrides
    from mechedit.model.pipeline import train_checkpoint
    from mechedit.world import generate_world, tiny_world_spec
    from mechedit.world.spec import CyclicSpec

    spec = dataclasses.replace(tiny_world_spec(), cyclic=(CyclicSpec("ring", 9, (1, 2), orders=3, logical_heldout=0.2,
                                                                    compositional_heldout=0.2),))
    world = generate_world(spec)
    train_checkpoint(world, PRESETS["tiny"], with_overrides(TRAIN_PRESETS["tiny"], max_epochs=2), tmp_path / "m")
    before, after = load_checkpoint(tmp_path / "m"), load_checkpoint(tmp_path / "m")
    (rs,) = ring_sets(world)
    assert sorted(rs.positions) == ["ring1", "ring2", "ring3"]
    f = next(f for f in world.train_facts if f.relation == "ring2_cw1")
    order = world.rings["ring2"]
    old = order.index(world.subject_by_name[f.object].id)
    new = world.subjects[order[(old + 3) % len(order)]].name
    req = EditRequest(world.subjects[f.subject].name, f.relation, new)
    assert edit_distance(world, req) == 3  # in ring2's order, not in ring1's
    card = diagnose(before, after, [req], ("shattering",), shattering_layer=0)["shattering"]
    assert card["R"] == 0.0 and card["rings"] == ["ring1", "ring2", "ring3"] and card["edit_distance"] == 3.0
    h = entity_representations(before.model, before.tokenizer, world, rs)[1]
    d = pairwise_distances(h)
    for r in ("ring1", "ring2", "ring3"):
        assert card["ringness_by_order_before"][r] == pytest.approx(ringness(d, rs.cyclic_distances(r))[0], rel=1e-9)
    assert card["ringness_before"] == pytest.approx(joint_ringness(d, rs), rel=1e-9)
    assert {"logical", "compositional"} <= set(card["accuracy"])


def test_spearman_p_is_exact_for_few_edits():
    """Few pairs (a MEMIT batch per distance gives 3-7 points): the p-value is the share of the orderings of x
    against y that correlate as strongly; scipy's t approximation would call rho = 1 over 3 pairs significant
    (p = 0). Above 9 pairs: scipy's."""
    from itertools import permutations

    from scipy.stats import spearmanr

    from mechedit.analysis.shattering import spearman

    assert spearman([1, 2, 3], [0.1, 0.2, 0.3]) == {"rho": 1.0, "p": pytest.approx(2 / 6), "n": 3}
    x, y = [1, 2, 4, 6, 9, 12, 12], [0.2, 0.5, 0.3, 0.5, 0.6, 0.9, 0.4]  # ties in both
    rho = spearmanr(x, y).statistic
    brute = np.mean([abs(spearmanr(np.array(x)[list(p)], y).statistic) >= abs(rho) - 1e-9
                     for p in permutations(range(7))])
    got = spearman(x, y)
    assert got["rho"] == pytest.approx(rho) and got["p"] == pytest.approx(brute) and got["n"] == 7
    x, y = np.arange(30), np.random.default_rng(0).normal(size=30) + 0.1 * np.arange(30)
    got, want = spearman(x, y), spearmanr(x, y)
    assert got["rho"] == pytest.approx(want.statistic) and got["p"] == pytest.approx(want.pvalue)
