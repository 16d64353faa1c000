"""Does localization inform editing? The regression of Hase et al. (2023), the rewrite suite, the run and report."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mechedit.analysis.hase import hase_table, pearson_ci, r_squared

HERE = Path(__file__).parent


def _synthetic(F=80, L=4, seed=0, te_weight=0.0):
    rng = np.random.default_rng(seed)
    te = rng.random((F, L))
    layer_effect = np.array([0.9, 0.6, 0.3, 0.1])[:L]
    s = layer_effect[None, :] + te_weight * te + 0.05 * rng.standard_normal((F, L))
    return te, s


def test_r_squared_matches_a_direct_least_squares_fit():
    te, s = _synthetic(te_weight=0.5)
    F, L = te.shape
    r2 = r_squared(te, s)
    y = s.ravel()
    layer = np.tile(np.arange(L), F)
    X = np.hstack([np.eye(L)[layer], te.ravel()[:, None]])
    beta = np.linalg.lstsq(X, y, rcond=None)[0]
    assert r2["layer_te"] == pytest.approx(1 - np.sum((y - X @ beta) ** 2) / np.sum((y - y.mean()) ** 2))
    # the layer-only model is the per-layer means
    means = s.mean(0)
    assert r2["layer"] == pytest.approx(1 - np.sum((s - means) ** 2) / np.sum((s - s.mean()) ** 2))
    assert r2["layer"] <= r2["layer_te"] <= r2["layer_x_te"] + 1e-12


def test_tracing_effect_adds_nothing_when_success_depends_on_the_layer_only():
    t = hase_table(*_synthetic(te_weight=0.0), n_boot=200)
    assert t["r2"]["layer"] > 0.9
    assert abs(t["gain"]) < 0.01 and t["gain_ci95"][0] <= 0.0 + 1e-3
    assert all(abs(b["r"]) < 0.4 for b in t["by_layer"])


def test_tracing_effect_adds_what_it_explains():
    t = hase_table(*_synthetic(te_weight=0.5), n_boot=200)
    assert t["gain"] > 0.1 and t["gain_ci95"][0] > 0.05
    assert all(b["r"] > 0.8 and b["r_ci95"][0] < b["r"] < b["r_ci95"][1] for b in t["by_layer"])


def test_best_layer_agreement_and_missing_cells():
    te = np.array([[0.9, 0.1], [0.1, 0.9], [0.8, 0.2]])
    s = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    t = hase_table(te, s, n_boot=10)
    assert t["best_is_traced"] == pytest.approx(2 / 3) and t["chance"] == 0.5
    s[2, 1] = np.nan  # a missing cell drops the fact from the best-layer count, not from the fit
    t = hase_table(te, s, n_boot=10)
    assert t["n_best"] == 2 and t["n_facts"] == 3
    r, lo, hi, n = pearson_ci(np.array([1.0, 2, 3, 4, 5]), np.array([2.0, 4, 6, 8, 10.5]))
    assert n == 5 and r > 0.99 and lo < r


def test_rewrite_scores_zero_for_no_edit_and_one_for_a_perfect_edit(tiny_bundle):
    from mechedit.diagnose import get_suite
    from mechedit.edit import EditRequest

    w = tiny_bundle.world
    f = next(f for f in w.train_facts if w.subjects[f.subject].kind == "subject")
    new = next(o for o in w.relation(f.relation).objects if o != f.object)
    req = EditRequest(w.subject_of(f).name, f.relation, new)
    card = get_suite("rewrite").fn(tiny_bundle, tiny_bundle, [req])
    assert card["rewrite_score"]["agg_value"] == pytest.approx(0.0, abs=1e-9)
    assert card["prob_margin"]["agg_value"] < 0  # the old object still wins
    # a "model" that puts all mass on the new object: swap the two objects' output rows
    import copy

    import torch

    from mechedit.model.checkpoint import Bundle

    m = copy.deepcopy(tiny_bundle.model)
    tok = tiny_bundle.tokenizer
    a, b = tok.convert_tokens_to_ids(f.object), tok.convert_tokens_to_ids(new)
    with torch.no_grad():
        W = m.get_output_embeddings().weight
        W[[a, b]] = W[[b, a]].clone()
    after = Bundle(m, tok, w)
    card = get_suite("rewrite").fn(tiny_bundle, after, [req])
    assert card["rewrite_score"]["agg_value"] > 0.5 and card["prob_margin"]["agg_value"] > 0


HASE_TINY = """
name = "hase-tiny"
[world]
spec = "default"
[model]
checkpoint = "CHECKPOINT"
[requests.facts]
n = 4
mode = "each"
[trace]
requests = "facts"
samples = 3
sites = ["resid", "mlp"]
[[grid]]
method = "rome"
layers = [0, 1]
requests = ["facts"]
params = { steps = 10, n_prefixes = 0 }
[diagnostics]
suites = ["rewrite"]
"""


def test_hase_run_traces_the_edited_facts_and_reports(tmp_path, tiny_checkpoint):
    from mechedit.analysis import run_analysis
    from mechedit.report.build import build_report
    from mechedit.trace.result import TraceResult

    spec = tmp_path / "hase.toml"
    spec.write_text(HASE_TINY.replace("CHECKPOINT", str(tiny_checkpoint)))
    res = run_analysis(spec, tmp_path / "run", workers=1)
    assert res["done"] == res["total"] == 2
    saved = json.loads((tmp_path / "run" / "spec.json").read_text())
    edited = {(r["subject"], r["relation"]) for r in saved["request_sets"]["facts"]["requests"]}
    traced = {(d["subject"], d["relation"]) for d in TraceResult.load(tmp_path / "run" / "trace").facts}
    skipped = {(d["subject"], d["relation"]) for d in json.loads((tmp_path / "run" / "trace" / "trace.json").read_text())["skipped"]}
    assert traced | skipped == edited and traced
    # the tracing effect of each (fact, layer) cell is the IE at that fact's last subject token
    from mechedit.report.hase_section import hase_arrays, hase_groups

    from mechedit.report.build import load_run

    result = TraceResult.load(tmp_path / "run" / "trace")
    (by_layer,) = hase_groups(load_run(tmp_path / "run")[1]).values()
    te, s = hase_arrays(result, by_layer, "rewrite.rewrite_score", "resid")
    rows = {(d["subject"], d["relation"]): i for i, d in enumerate(result.facts)}
    facts = sorted(set(rows) & edited)
    ie = result.indirect_effect("resid")
    for fi, key in enumerate(facts):
        i = rows[key]
        end = result.facts[i]["subject_span"][1]
        assert np.allclose(te[fi], ie[i, :, end - 1])
    assert not np.isnan(s).any()
    html = build_report(tmp_path / "run", tmp_path / "report").read_text()
    assert "Does localization inform editing?" in html and "R² layer + TE" in html


def test_trace_requests_must_name_a_counterfactual_set(tmp_path, tiny_checkpoint):
    from mechedit.analysis import load_analysis
    from mechedit.errors import SpecError

    spec = tmp_path / "bad.toml"
    spec.write_text(HASE_TINY.replace("CHECKPOINT", str(tiny_checkpoint)).replace('requests = "facts"\nsamples',
                                                                                    'requests = "nope"\nsamples'))
    with pytest.raises(SpecError, match="trace.requests"):
        load_analysis(spec)


def test_shipped_hase_specs_parse():
    from mechedit.analysis import load_analysis

    for name in ("hase.toml", "hase_subject_level.toml", "subject_level.toml"):
        spec = load_analysis(HERE.parent / "analyses" / name)
        assert spec.trace.get("requests", "single") in spec.request_sets
