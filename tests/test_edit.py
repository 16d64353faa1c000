"""Editing: exact restore, parameters touched, ROME's closed form, scorecards, the CLI's bad inputs."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from typer.testing import CliRunner

from mechedit.cli import app
from mechedit.diagnose import get_suite
from mechedit.edit import EditRequest, EditResult, run_method
from mechedit.edit.common import (_HFPath, build_batch, context_prefixes, edit_prompts, linear_edit, mean_keys,
                                  rank_one_edit)
from mechedit.model.fast import FastNeoX
from mechedit.edit.m_rome import RomeParams, inverse_second_moment, rank_one_update
from mechedit.edit.run import edited_bundle, frozen_copy, sequential_edits
from mechedit.edit.stats import compute_second_moment, second_moment, w_out_name
from mechedit.errors import MecheditError

pytestmark = pytest.mark.usefixtures("one_thread")


FAST = {"rome": {"layer": 0, "steps": 10, "n_prefixes": 3, "restarts": 0},
        "memit": {"layer": [0], "steps": 10, "n_prefixes": 3},
        "alphaedit": {"layer": [0], "steps": 10, "n_prefixes": 3},
        "finetune": {"layer": [1], "steps": 5},
        "lora": {"layer": 1, "steps": 5, "rank": 2}}


def _request(world, k=0):
    f = [f for f in world.train_facts if world.relation(f.relation).kind == "independent"][k]
    rel = world.relation(f.relation)
    new = next(o for o in rel.objects if o != f.object)
    return EditRequest(world.subjects[f.subject].name, f.relation, new)


@pytest.mark.parametrize("method", sorted(FAST))
def test_edit_changes_only_named_params_and_restores_exactly(tiny_bundle, method):
    model = tiny_bundle.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with warnings.catch_warnings(record=True) as caught:  # no library noise in a user's output
        warnings.simplefilter("always")
        res = run_method(tiny_bundle, [_request(tiny_bundle.world)], method, **FAST[method])
    noise = [f"{w.category.__name__}: {w.message}" for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not noise, noise
    for n, p in model.named_parameters():  # computing an edit leaves the model unchanged
        assert torch.equal(p, before[n]), n
        assert p.requires_grad, f"{method} left requires_grad off on {n}"  # e.g. a later relearning attack needs it
    assert res.deltas and any(float(d.abs().max()) > 0 for d in res.deltas.values())
    res.apply(model)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= set(res.deltas) and changed
    if method in ("rome", "memit", "alphaedit"):
        assert all(".mlp.dense_4h_to_h.weight" in n for n in res.deltas)
    if method == "lora":
        assert all(".layers.1.mlp." in n for n in res.deltas)
    res.restore(model)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def _min_norm_update(W: torch.Tensor, k: torch.Tensor, v: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Independent definition of ROME's update (Meng et al. 2022, eq. 2 as a constrained problem):
    the Delta minimising sum_i Delta_i C Delta_i^T subject to (W + Delta) k = v, solved row by row
    from its KKT system [[2C, k], [k^T, 0]] [delta; lambda] = [0; r_i] - no closed form used."""
    W, k, v, C = W.double(), k.double(), v.double(), C.double()
    d = C.shape[0]
    kkt = torch.zeros(d + 1, d + 1, dtype=torch.float64)
    kkt[:d, :d] = 2 * C
    kkt[:d, d] = k
    kkt[d, :d] = k
    rhs = torch.zeros(d + 1, W.shape[0], dtype=torch.float64)
    rhs[d] = v - W @ k
    return torch.linalg.solve(kkt, rhs)[:d].T  # [d_model, d_mlp]


def test_rank_one_update_is_the_minimum_norm_solution(tiny_bundle):
    """rank_one_update against the constrained least-squares definition, for a random target v."""
    W = dict(tiny_bundle.model.named_parameters())[w_out_name(0)].detach()
    C = second_moment(tiny_bundle, 0).double()
    C_reg = C + 1e-4 * C.diagonal().mean() * torch.eye(C.shape[0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    k = torch.rand(C.shape[0], generator=g, dtype=torch.float64)
    v = torch.randn(W.shape[0], generator=g, dtype=torch.float64) * 3
    got = rank_one_update(W, k, v, inverse_second_moment(C, 1e-4))
    want = _min_norm_update(W, k, v, C_reg)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9 * float(want.abs().max()))
    torch.testing.assert_close((W.double() + got) @ k, v)


def test_rome_writes_the_optimised_value_at_the_key(tiny_bundle, monkeypatch):
    """The whole ROME call: with k* recomputed and delta taken from the v* optimisation itself (not
    from the result), the update is rank one, maps k* to W k* + delta, and equals the
    minimum-norm update of the independent definition."""
    import mechedit.edit.m_rome as m_rome

    found = []
    real = m_rome.optimize_targets

    def spy(*a, **kw):
        out = real(*a, **kw)
        found.append(out[0].detach().clone())
        return out

    monkeypatch.setattr(m_rome, "optimize_targets", spy)
    req = _request(tiny_bundle.world, 1)
    p = {**FAST["rome"], "restarts": 0}
    res = run_method(tiny_bundle, [req], "rome", **p)
    assert len(found) == 1
    delta = found[0][0].double()  # [d_model]
    name = w_out_name(0)
    dW = res.deltas[name].double()
    assert torch.linalg.matrix_rank(dW, rtol=1e-6) == 1
    model = tiny_bundle.model
    batch = build_batch(tiny_bundle, [req], context_prefixes(tiny_bundle.world, p["n_prefixes"], 5, 0))
    k = mean_keys(model, batch, 0, 1)[0].double()
    W = dict(model.named_parameters())[name].detach().double()
    assert float(delta.norm()) > 1e-3 * float((W @ k).norm())  # the optimisation moved the value
    torch.testing.assert_close((W + dW) @ k, W @ k + delta, rtol=1e-4, atol=1e-4 * float(delta.abs().max()))
    C = second_moment(tiny_bundle, 0).double()
    C_reg = C + RomeParams().ridge * C.diagonal().mean() * torch.eye(C.shape[0], dtype=torch.float64)
    want = _min_norm_update(W, k, W @ k + delta, C_reg)
    torch.testing.assert_close(dW, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_second_moment_matches_naive_and_caches(tiny_bundle, tmp_path, monkeypatch):
    texts = tiny_bundle.world.corpus()[:7]
    C = compute_second_moment(tiny_bundle.model, tiny_bundle.tokenizer, texts, [0], batch_size=3)[0]
    ks = []
    from mechedit.edit.stats import capture_keys
    with capture_keys(tiny_bundle.model, [0]) as store, torch.no_grad():
        for t in texts:
            tiny_bundle.model(input_ids=torch.tensor([tiny_bundle.tokenizer(t)["input_ids"]]))
    ks = torch.cat([s[0] for s in store[0]]).double()
    assert torch.allclose(C, ks.T @ ks / len(ks), atol=1e-9)
    monkeypatch.setenv("MECHEDIT_CACHE", str(tmp_path))
    a = second_moment(tiny_bundle, 0, 5)
    assert list(tmp_path.rglob("mom2_layer0_n5.safetensors"))
    assert torch.equal(second_moment(tiny_bundle, 0, 5), a)


def test_scorecard_of_empty_edit_shows_no_change(tiny_bundle):
    req = _request(tiny_bundle.world)
    zero = EditResult("none", {}, [req], {w_out_name(0): torch.zeros_like(
        dict(tiny_bundle.model.named_parameters())[w_out_name(0)])})
    after = edited_bundle(tiny_bundle, zero)
    card = get_suite("edit").fn(tiny_bundle, after, [req], n_unrelated=20, n_retain=20)
    json.dumps(card)
    for k, v in card.items():
        if isinstance(v, dict) and "change" in v:
            assert v["change"] == 0.0, k
    assert card["efficacy"]["after"]["agg_value"] == card["efficacy"]["before"]["agg_value"]
    assert card["same_relation"]["n"] > 0 and card["unrelated"]["n"] == 20


def test_scorecard_before_cache_is_exact_and_keyed_on_weights(tiny_bundle, monkeypatch):
    from mechedit.diagnose import s_edit

    s_edit._BEFORE_CACHE.clear()
    req = _request(tiny_bundle.world)
    res = run_method(tiny_bundle, [req], "rome", **FAST["rome"])
    after = edited_bundle(tiny_bundle, res)
    fn = get_suite("edit").fn
    first = fn(tiny_bundle, after, [req], n_unrelated=20, n_retain=20)
    calls = []
    real = s_edit._score
    monkeypatch.setattr(s_edit, "_score", lambda b, rows: calls.append(b) or real(b, rows))
    second = fn(tiny_bundle, after, [req], n_unrelated=20, n_retain=20)
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)
    assert [c is after for c in calls] == [True]  # the before pass came from the cache
    fp = s_edit.weights_fingerprint(tiny_bundle.model)
    assert fp != s_edit.weights_fingerprint(after.model)
    w = dict(tiny_bundle.model.named_parameters())[w_out_name(1)]
    with torch.no_grad():
        old = float(w[3, 5])
        w[3, 5] += 1e-3  # one weight: the cache must miss
        try:
            assert s_edit.weights_fingerprint(tiny_bundle.model) != fp
            calls.clear()
            fn(tiny_bundle, after, [req], n_unrelated=20, n_retain=20)
            assert len(calls) == 2
        finally:
            w[3, 5] = old
    assert s_edit.weights_fingerprint(tiny_bundle.model) == fp


def test_rome_edit_takes_on_tiny_model(tiny_bundle):
    req = _request(tiny_bundle.world, 2)
    res = run_method(tiny_bundle, [req], "rome", layer=0, steps=60)
    card = get_suite("edit").fn(tiny_bundle, edited_bundle(tiny_bundle, res), [req], n_unrelated=20, n_retain=20)
    assert card["efficacy"]["before"]["agg_value"] == 0.0
    # a 2-layer d_model 32 model is a hard case for one rank-one update; demand that it clearly moved
    assert card["efficacy"]["after"]["agg_value"] >= 0.5
    assert card["prob_new_gt_old"]["after"]["agg_value"] > card["prob_new_gt_old"]["before"]["agg_value"]


def test_rome_restarts_keep_the_best_search(tiny_bundle):
    req = _request(tiny_bundle.world, 2)
    base = dict(layer=0, steps=8, n_prefixes=0)
    plain = run_method(tiny_bundle, [req], "rome", restarts=0, **base).info["per_request"][0]
    # restart_nll 0: every restart runs; the kept search is never worse than the one from zero
    again = [run_method(tiny_bundle, [req], "rome", restarts=3, restart_nll=0.0, **base) for _ in range(2)]
    best = again[0].info["per_request"][0]
    assert best["nll_last"] <= plain["nll_last"]
    assert all(torch.equal(again[0].deltas[k], again[1].deltas[k]) for k in again[0].deltas)  # seeded


def test_sequential_edits_restore(tiny_bundle):
    w = tiny_bundle.world
    before = {n: p.detach().clone() for n, p in tiny_bundle.model.named_parameters()}
    steps = sequential_edits(tiny_bundle, [[_request(w, 0)], [_request(w, 3)]], "alphaedit",
                             scorecard_options={"n_unrelated": 10, "n_retain": 10}, **FAST["alphaedit"])
    assert len(steps) == 2 and steps[1]["scorecard"]["n_requests"] == 2
    # the first batch's keys were kept: one per (prefix, trained prompt) row of its request (per_prompt_keys)
    rows = (FAST["alphaedit"]["n_prefixes"] + 1) * len(edit_prompts(w, _request(w, 0)))
    assert steps[1]["result"].info["preserved_keys"][0] == rows
    for n, p in tiny_bundle.model.named_parameters():
        assert torch.equal(p, before[n])


def test_layer_argument_errors(tiny_bundle):
    req = [_request(tiny_bundle.world)]
    with pytest.raises(MecheditError, match="out of range"):
        run_method(tiny_bundle, req, "rome", layer=7)
    with pytest.raises(MecheditError, match="one layer"):
        run_method(tiny_bundle, req, "rome", layer=[0, 1])
    with pytest.raises(MecheditError, match="no parameter"):
        run_method(tiny_bundle, req, "rome", nonsense=1)


def test_cli_edit_writes_loadable_checkpoint(tiny_checkpoint, tmp_path):
    import mechedit

    b = mechedit.load(tiny_checkpoint)
    req = _request(b.world, 2)
    out = tmp_path / "ed"
    r = CliRunner().invoke(app, ["edit", str(tiny_checkpoint), "--method", "rome", "--fact",
                                 f"{req.subject}|{req.relation}", "--new", req.new_object, "--layer", "0",
                                 "--param", "steps=15", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "efficacy" in r.output
    edited = mechedit.load(out)
    res = EditResult.load(out / "edit")
    res.apply(b.model)
    for (n, p), (_, q) in zip(b.model.named_parameters(), edited.model.named_parameters()):
        assert torch.equal(p, q), n
    assert json.loads((out / "scorecard.json").read_text())["n_requests"] == 1


@pytest.mark.parametrize("args,msg", [
    (["--method", "nope"], "unknown method"),
    (["--param", "bogus=1"], "no parameter"),
    (["--layer", "9"], "out of range"),
    (["--new", "notaword"], "not in the vocabulary"),
    (["--fact", "nobody|capital"], "unknown subject"),
])
def test_cli_edit_bad_inputs_exit_2(tiny_checkpoint, tmp_path, args, msg):
    import mechedit

    b = mechedit.load(tiny_checkpoint)
    req = _request(b.world)
    base = {"--method": "rome", "--fact": f"{req.subject}|{req.relation}", "--new": req.new_object, "--layer": "0"}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    argv = ["edit", str(tiny_checkpoint), "-o", str(tmp_path / "o")]
    for k, v in base.items():
        argv += [k, v]
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 2, r.output
    assert msg in r.output
    assert not (tmp_path / "o").exists()


def test_traced_layer_uses_locate_for(tiny_bundle, monkeypatch):
    import mechedit.trace as trace
    from types import SimpleNamespace

    calls = []

    def fake_locate_for(bundle, facts=None, **kw):
        calls.append(facts)
        return SimpleNamespace(layer=0, site="mlp")

    monkeypatch.setattr(trace, "locate_for", fake_locate_for)
    req = _request(tiny_bundle.world)
    res = run_method(tiny_bundle, [req], "rome", layer="traced", steps=3, n_prefixes=1)
    assert res.info["layer"] == 0 and list(res.deltas) == [w_out_name(0)]
    assert calls and calls[0][0] == tiny_bundle.world.fact(req.subject, req.relation)


def _edit_logits(model, batch, layer, edit):
    """Answer-position logits with `edit` applied, through FastNeoX and through the HF hook path."""
    with torch.no_grad():
        fast = FastNeoX(model).logits_at(batch.ids, batch.last, mlp_edit=edit)
        hf = _HFPath(model).logits_at(batch.ids, batch.last, start_block=layer, mlp_edit=edit)
    return fast, hf


def test_rank_one_edit_equals_weight_edit(tiny_bundle):
    """ROME optimises delta through `rank_one_edit`: it must give exactly the edited model's logits,
    on the fast path and through the HF hook."""
    model = tiny_bundle.model
    req = _request(tiny_bundle.world, 1)
    batch = build_batch(tiny_bundle, [req], [""])
    k = mean_keys(model, batch, 0, 1)[0]
    C_inv = inverse_second_moment(second_moment(tiny_bundle, 0), 1e-4)
    u = (C_inv @ k) / (k @ C_inv @ k)
    delta = torch.randn(1, model.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    fast, hf = _edit_logits(model, batch, 0, rank_one_edit(0, delta, u.unsqueeze(0), batch.owner))
    W = dict(model.named_parameters())[w_out_name(0)].detach()
    dW = rank_one_update(W, k, W.double() @ k + delta[0], C_inv)
    rows = torch.arange(len(batch.last))
    res = EditResult("rome", {}, [req], {w_out_name(0): dW.float()}).apply(model)
    with torch.no_grad():
        edited = model(input_ids=batch.ids, attention_mask=batch.mask).logits[rows, batch.last]
    res.restore(model)
    with torch.no_grad():
        plain = model(input_ids=batch.ids, attention_mask=batch.mask).logits[rows, batch.last]
    assert not torch.allclose(plain, edited, atol=1e-3)
    tol = 1e-3 * float(edited.abs().max())
    assert torch.allclose(fast, edited, atol=tol) and torch.allclose(hf, edited, atol=tol)


def test_joint_edit_equals_weight_edit(tiny_bundle):
    """linear_edit (MEMIT/AlphaEdit through_edit) adds exactly what Delta W = delta^T U does."""
    model = tiny_bundle.model
    reqs = [_request(tiny_bundle.world, k) for k in range(3)]
    batch = build_batch(tiny_bundle, reqs, [""])
    g = torch.Generator().manual_seed(0)
    d_mlp = model.gpt_neox.layers[0].mlp.dense_4h_to_h.in_features
    U = torch.randn(3, d_mlp, generator=g, dtype=torch.float64) * 1e-2
    delta = torch.randn(3, model.config.hidden_size, generator=g, dtype=torch.float64)
    fast, hf = _edit_logits(model, batch, 0, linear_edit(0, delta, U))
    rows = torch.arange(len(batch.last))
    with torch.no_grad():
        plain = model(input_ids=batch.ids, attention_mask=batch.mask).logits[rows, batch.last]
        res = EditResult("x", {}, reqs, {w_out_name(0): (delta.T @ U).float()}).apply(model)
        try:
            edited = model(input_ids=batch.ids, attention_mask=batch.mask).logits[rows, batch.last]
        finally:
            res.restore(model)
    assert not torch.allclose(fast, plain, atol=1e-3)
    torch.testing.assert_close(fast, edited, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hf, edited, atol=1e-4, rtol=1e-4)

