"""Adaptor edits (GRACE, WISE, RepE, ICU): exact apply/restore, deferral, routing, sign, save/load."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import mechedit
from mechedit.cli import app
from mechedit.diagnose import get_suite
from mechedit.edit import EditRequest, EditResult, run_method
from mechedit.edit.adaptors import SITES_ATTR, Adaptor, adaptor_fingerprint, attached
from mechedit.edit.common import build_batch
from mechedit.edit.m_grace import last_token_io, lookup
from mechedit.edit.run import edited_bundle, sequential_edits
from mechedit.errors import MecheditError
from mechedit.model.evaluate import pad
from mechedit.unlearn import parse_forget


pytestmark = pytest.mark.usefixtures("one_thread")


FAST = {"grace": {"steps": 40, "lr_factor": 0.5}, "wise": {"steps": 40},
        "repe": {"n_contrast": 5}}


def _requests(world, n=3, offset=0):
    facts = [f for f in world.train_facts if world.relation(f.relation).kind == "independent"
             and world.subjects[f.subject].kind == "subject"]
    seen, out = set(), []
    for f in facts[offset:]:
        if f.subject in seen:
            continue
        seen.add(f.subject)
        new = next(o for o in world.relation(f.relation).objects if o != f.object)
        out.append(EditRequest(world.subjects[f.subject].name, f.relation, new))
        if len(out) == n:
            break
    return out


def _separable_requests(bundle, n):
    """Requests whose last-token keys at the last layer are farthest from every other fact's: the tiny
    model gives some prompts of different subjects the very same key, which no codebook can tell apart."""
    from mechedit.edit.m_grace import reference_keys

    w = bundle.world
    keys, facts = reference_keys(bundle, bundle.n_layers - 1, set(), 10_000, 0)
    d = torch.cdist(keys, keys)
    d[torch.tensor(facts)[:, None] == torch.tensor(facts)[None, :]] = float("inf")
    nearest: dict[int, float] = {}
    for f, v in zip(facts.tolist(), d.min(1).values.tolist()):
        nearest[f] = min(nearest.get(f, float("inf")), v)
    out, seen = [], set()
    for f in sorted(nearest, key=lambda i: -nearest[i]):
        fact = w.facts[f]
        if w.subjects[fact.subject].kind != "subject" or fact.subject in seen:
            continue
        seen.add(fact.subject)
        new = next(o for o in w.relation(fact.relation).objects if o != fact.object)
        out.append(EditRequest(w.subjects[fact.subject].name, fact.relation, new))
        if len(out) == n:
            return out


def _corpus_batch(bundle, n=200):
    seqs = [bundle.tokenizer(s)["input_ids"] for s in bundle.world.corpus()[:n]]
    return pad(seqs, bundle.tokenizer.pad_token_id)


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _hooks(model):
    return {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._forward_pre_hooks_with_kwargs),
                dict(m._forward_hooks_with_kwargs)) for n, m in model.named_modules()}


def _forget_requests(world, i=0):
    s = [s for s in world.subjects if s.kind == "subject" and not s.heldout][i]
    return parse_forget(world, f"subject:{s.name}").requests()


def _result(bundle, method):
    if method in ("grace", "wise"):
        return run_method(bundle, _requests(bundle.world), method, **FAST[method])
    return run_method(bundle, _forget_requests(bundle.world), method, **FAST.get(method, {}))


@pytest.mark.parametrize("method", ["grace", "wise", "repe", "icu"])
def test_apply_restore_is_exact_and_leaves_no_trace(tiny_bundle, method):
    if method == "icu":  # the tiny world has no instructions: the mechanism alone (a prefix adaptor)
        ids = torch.tensor(tiny_bundle.tokenizer("the capital of")["input_ids"])
        res = EditResult("icu", {}, [], {}, adaptors=[Adaptor("prefix", "", {"ids": ids})])
    else:
        res = _result(tiny_bundle, method)
    model = tiny_bundle.model
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids, mask = _corpus_batch(tiny_bundle)
    before = _logits(model, ids, mask)
    hooks = _hooks(model)  # transformers installs hooks of its own: they must be exactly as before
    assert res.adaptors and not res.deltas
    res.apply(model)
    during = _logits(model, ids, mask)
    for n, p in model.named_parameters():  # an adaptor never touches a weight
        assert torch.equal(p, weights[n]), n
    assert not torch.equal(before, during)
    assert attached(model) and adaptor_fingerprint(model)
    twin = copy.deepcopy(model)  # a deep copy keeps computing the edited function ...
    res.restore(model)
    assert torch.equal(_logits(model, ids, mask), before)  # bit-identical
    assert not attached(model) and adaptor_fingerprint(model) == ()
    for _, m in model.named_modules():
        assert SITES_ATTR not in m.__dict__
    assert _hooks(model) == hooks
    assert torch.equal(_logits(twin, ids, mask), during)  # ... also after the original was restored
    with pytest.raises(MecheditError, match="not applied"):
        res.restore(model)


def test_grace_defers_outside_every_ball(tiny_bundle):
    """Positions whose input lies outside every epsilon-ball get the unedited module output, bit for bit;
    a sentence with no such position is scored exactly as by the unedited model."""
    model = tiny_bundle.model
    res = run_method(tiny_bundle, _requests(tiny_bundle.world), "grace", **FAST["grace"])
    a = res.adaptors[0]
    layer = a.config["layer"]
    ids, mask = _corpus_batch(tiny_bundle, 400)
    mod = model.gpt_neox.layers[layer].mlp.dense_4h_to_h
    outs = []
    before = _logits(model, ids, mask)
    res.apply(model)
    h = mod.register_forward_hook(lambda m, i, o: outs.append((i[0].detach(), o.detach())))  # sees the codebook's output
    try:
        after = _logits(model, ids, mask)
    finally:
        h.remove()
        res.restore(model)
    x, o_after = outs[0]
    with torch.no_grad():
        o_before = mod(x)
    dist = torch.cdist(x.reshape(-1, x.shape[-1]), a.tensors["keys"])  # membership, independently of `lookup`
    hit = (dist <= a.tensors["eps"][None]).any(1).reshape(x.shape[:-1])
    assert 0 < int(hit.sum()) < hit.numel() * 0.2, int(hit.sum())
    untouched_rows = ~(hit & mask.bool()).any(1)
    assert int(untouched_rows.sum()) > 50
    assert torch.equal(after[untouched_rows], before[untouched_rows])
    # the edit prompts' last tokens are inside a ball and get the trained value
    batch = build_batch(tiny_bundle, res.requests, [""])
    q, _ = last_token_io(model, layer, batch.ids, batch.mask, batch.last)
    assert bool(lookup(q, a.tensors["keys"], a.tensors["eps"])[0].all())
    assert torch.equal(o_after[~hit], o_before[~hit])
    assert not torch.equal(o_after[hit], o_before[hit])


def test_grace_codebook_replaces_exactly_inside_the_balls(tiny_bundle):
    """A hand-made codebook with one small and one large radius: a position is replaced iff it lies in
    the ball of its nearest key, and then by that key's value; every other output is bit-identical.
    Membership is computed here independently of the adaptor's own lookup."""
    from mechedit.edit.m_grace import grace_module

    model, layer = tiny_bundle.model, tiny_bundle.n_layers - 1
    ids, mask = _corpus_batch(tiny_bundle, 300)
    mod = model.gpt_neox.layers[layer].mlp.dense_4h_to_h
    outs = []
    h = mod.register_forward_hook(lambda m, i, o: outs.append((i[0].detach(), o.detach())))
    try:
        _logits(model, ids, mask)
        x = outs[0][0][mask.bool()]  # [positions, d_mlp]
        d = torch.cdist(x, x)
        d.fill_diagonal_(float("inf"))
        i0 = int(d.min(1).values.argmax())  # an isolated position: its key gets a radius that reaches a few others
        r0 = float(d[i0].sort().values[3]) * 1.01
        far = x[i0] + 50 * x.std(0)  # a key far from every input, with a radius that reaches none of them
        r1 = float(torch.cdist(far[None], x).min()) * 0.9
        keys = torch.stack([x[i0], far])
        eps = torch.tensor([r0, r1])
        values = torch.randn(2, mod.out_features, generator=torch.Generator().manual_seed(0)) * 10
        a = Adaptor("grace", grace_module(layer), {"keys": keys, "values": values, "eps": eps,
                                                  "labels": torch.tensor([1, 2])})
        res = EditResult("grace", {}, [], {}, adaptors=[a]).apply(model)
        late = mod.register_forward_hook(lambda m, i, o: outs.append((i[0].detach(), o.detach())))  # after the codebook
        try:
            _logits(model, ids, mask)
        finally:
            late.remove()
            res.restore(model)
    finally:
        h.remove()
    x_all, o_plain = outs[0]
    o_edit = outs[2][1]
    dist = torch.cdist(x_all.reshape(-1, x_all.shape[-1]), keys)  # [b*pos, 2]
    near = dist.argmin(1)
    inside = dist.gather(1, near[:, None])[:, 0] <= eps[near]
    flat_plain, flat_edit = o_plain.reshape(-1, o_plain.shape[-1]), o_edit.reshape(-1, o_edit.shape[-1])
    assert 2 <= int(inside.sum()) < 50
    assert torch.equal(flat_edit[~inside], flat_plain[~inside])
    assert torch.equal(flat_edit[inside], values[near[inside]])
    assert int(((dist[:, 0] > r0) & (dist[:, 0] <= r1)).sum()) > 0  # positions the large radius would wrongly take


def test_grace_edit_takes_and_sequential_edits_never_overwrite(tiny_bundle):
    w = tiny_bundle.world
    reqs = _separable_requests(tiny_bundle, 4)
    first, second = reqs[:2], reqs[2:]
    steps = sequential_edits(tiny_bundle, [first, second], "grace", restore=False,
                             scorecard_options={"n_unrelated": 20, "n_retain": 20}, **FAST["grace"])
    try:
        r1, r2 = steps[0]["result"], steps[1]["result"]
        assert r2.info["n_prior_entries"] == r1.info["n_entries"]
        card = steps[1]["scorecard"]  # all four edits, after both calls
        assert card["efficacy"]["after"]["agg_value"] >= 0.75, card["efficacy"]
        # the first call's codebook is untouched by the second and still answers its own keys
        batch = build_batch(tiny_bundle, first, [""])
        q, out = last_token_io(tiny_bundle.model, r1.adaptors[0].config["layer"], batch.ids, batch.mask, batch.last)
        k1 = r1.adaptors[0].tensors
        hit, idx = lookup(q, k1["keys"], k1["eps"])
        assert bool(hit.all())
        assert torch.allclose(out, k1["values"][idx])
    finally:
        for s in reversed(steps):
            s["result"].restore(tiny_bundle.model)
    assert not attached(tiny_bundle.model)


def test_wise_router_defers_irrelevant_inputs(tiny_bundle):
    """Inputs whose activation gap stays under the threshold keep the main memory's exact output; the
    edit prompts go to the side memory. (A router that always picks the side memory fails this.)"""
    model = tiny_bundle.model
    reqs = _requests(tiny_bundle.world)
    res = run_method(tiny_bundle, reqs, "wise", **FAST["wise"])
    assert res.info["irrelevant_routed"] < 0.5, res.info
    ids, mask = _corpus_batch(tiny_bundle, 400)
    names = {r.subject for r in reqs}
    other = torch.tensor([not any(f" {n} " in f" {s} " for n in names) for s in tiny_bundle.world.corpus()[:400]])
    before = _logits(model, ids, mask)
    after = _logits(edited_bundle(tiny_bundle, res).model, ids, mask)
    same = (after == before).all(-1).all(-1)
    assert int((same & other).sum()) > 0.5 * int(other.sum())  # most unrelated sentences: bit-identical
    batch = build_batch(tiny_bundle, reqs, [""])
    b0, b1 = _logits(model, batch.ids, batch.mask), _logits(edited_bundle(tiny_bundle, res).model, batch.ids, batch.mask)
    rows = torch.arange(len(batch.last))
    assert not torch.equal(b0[rows, batch.last], b1[rows, batch.last])  # the edit prompts are routed
    card = get_suite("edit").fn(tiny_bundle, edited_bundle(tiny_bundle, res), reqs, n_unrelated=20, n_retain=20)
    assert card["efficacy"]["after"]["agg_value"] > card["efficacy"]["before"]["agg_value"]


def test_repe_reading_vector_points_at_the_target(tiny_bundle):
    """The reading vector is target minus contrast: its projection separates the target's prompts, and
    subtracting it lowers the forgotten objects' probability (a flipped sign raises it instead). The sign
    matters in "subtract" mode only: "project" removes the span, whatever the basis vectors' signs."""
    from mechedit.model.evaluate import score_answers
    from mechedit.unlearn.m_repe import _prompts, mean_states

    w, model = tiny_bundle.world, tiny_bundle.model
    reqs = _forget_requests(w)
    res = run_method(tiny_bundle, reqs, "repe", layer=[0, 1], mode="subtract", alpha=1.0, **FAST["repe"])
    v = res.adaptors[0].tensors["vectors"][0].double()
    target = parse_forget(w, [f"subject:{reqs[0].subject}"])
    about = mean_states(model, tiny_bundle.tokenizer, _prompts(w, list(target.forget)), [0])[0]
    others = [f for f in target.retain if f.subject not in {g.subject for g in target.forget}][:60]
    contrast = mean_states(model, tiny_bundle.tokenizer, _prompts(w, others), [0])[0]
    assert float((about - contrast) @ v) > 0
    probes = w.probes(list(target.forget), kinds=("cloze", "qa"))
    prompts, answers = [p.prompt for p in probes], [p.answer for p in probes]
    base = score_answers(model, tiny_bundle.tokenizer, prompts, answers).logprob.mean()
    steered = score_answers(edited_bundle(tiny_bundle, res).model, tiny_bundle.tokenizer, prompts, answers).logprob.mean()
    flipped = copy.deepcopy(res)
    flipped.adaptors = [Adaptor("steer", a.module, {"vectors": -a.tensors["vectors"]}, a.config) for a in res.adaptors]
    anti = score_answers(edited_bundle(tiny_bundle, flipped).model, tiny_bundle.tokenizer, prompts, answers).logprob.mean()
    assert steered < base - 0.1 and steered < anti - 0.1


def test_prefix_adaptor_equals_prepended_tokens(tiny_bundle):
    """ICU's prefix adaptor computes exactly what the instruction's tokens followed by the input give, at
    the input's own positions (padding and hooks included)."""
    from mechedit.unlearn.loop import capture_layer

    tok, model = tiny_bundle.tokenizer, tiny_bundle.model
    prefix = tok("the capital of")["input_ids"]
    texts = tiny_bundle.world.corpus()[:7]
    seqs = [tok(t)["input_ids"] for t in texts]
    ids, mask = pad(seqs, tok.pad_token_id)
    res = EditResult("icu", {}, [], {}, adaptors=[Adaptor("prefix", "", {"ids": torch.tensor(prefix)})]).apply(model)
    try:
        with torch.no_grad(), capture_layer(model, 0) as cap:
            got = model(input_ids=ids, attention_mask=mask).logits
        h_got = cap["h"]
    finally:
        res.restore(model)
    full_ids, full_mask = pad([prefix + s for s in seqs], tok.pad_token_id)
    with torch.no_grad(), capture_layer(model, 0) as cap:
        want = model(input_ids=full_ids, attention_mask=full_mask).logits
    P = len(prefix)
    for i, s in enumerate(seqs):
        torch.testing.assert_close(got[i, : len(s)], want[i, P : P + len(s)], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(h_got[i, : len(s)], cap["h"][i, P : P + len(s)], atol=1e-4, rtol=1e-4)
    assert got.shape[1] == ids.shape[1]


def test_memo_and_scorecard_caches_see_adaptors(tiny_bundle):
    from mechedit.diagnose.cache import memo

    res = run_method(tiny_bundle, _requests(tiny_bundle.world), "grace", **FAST["grace"])
    after = edited_bundle(tiny_bundle, res)
    calls = []
    memo("t", tiny_bundle.model, (1,), lambda: calls.append(0))
    memo("t", after.model, (1,), lambda: calls.append(1))  # same weights, another function
    assert calls == [0, 1]


def test_edit_result_and_checkpoint_round_trip(tiny_bundle, tmp_path):
    res = run_method(tiny_bundle, _requests(tiny_bundle.world), "wise", **FAST["wise"])
    res2 = run_method(tiny_bundle, _forget_requests(tiny_bundle.world), "repe", **FAST["repe"])
    res.save(tmp_path / "e")
    back = EditResult.load(tmp_path / "e")
    assert [a.digest for a in back.adaptors] == [a.digest for a in res.adaptors]
    ids, mask = _corpus_batch(tiny_bundle, 50)
    want = _logits(edited_bundle(edited_bundle(tiny_bundle, res), res2).model, ids, mask)
    assert torch.equal(_logits(edited_bundle(edited_bundle(tiny_bundle, back), res2).model, ids, mask), want)
    b = edited_bundle(edited_bundle(tiny_bundle, res), res2)
    b.save(tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "mechedit.json").read_text())
    assert meta["adaptors"]["kinds"] == ["steer", "wise"]
    loaded = mechedit.load(tmp_path / "ck")
    assert torch.equal(_logits(loaded.model, ids, mask), want)
    loaded.save(tmp_path / "ck2")  # saving a loaded edited checkpoint keeps its adaptors
    assert torch.equal(_logits(mechedit.load(tmp_path / "ck2").model, ids, mask), want)
    (tmp_path / "ck" / "adaptors.safetensors").write_bytes(b"junk")
    with pytest.raises(MecheditError, match="corrupt checkpoint"):
        mechedit.load(tmp_path / "ck")


def test_cli_edit_then_diagnose_sees_adaptor_edit(tiny_checkpoint, tmp_path):
    b = mechedit.load(tiny_checkpoint)
    req = _requests(b.world, 1)[0]
    out = tmp_path / "ed"
    r = CliRunner().invoke(app, ["edit", str(tiny_checkpoint), "--method", "grace", "--fact",
                                 f"{req.subject}|{req.relation}", "--new", req.new_object, "--param", "steps=40",
                                 "--param", "lr_factor=0.5", "-o", str(out)])
    assert r.exit_code == 0, r.output
    card = json.loads((out / "scorecard.json").read_text())
    assert card["efficacy"]["after"]["agg_value"] > 0
    edited = mechedit.load(out)
    assert [a.kind for a in attached(edited.model)] == ["grace"]
    res = EditResult.load(out / "edit")
    assert res.adaptors and not res.deltas
    d = tmp_path / "d"
    r = CliRunner().invoke(app, ["diagnose", str(tiny_checkpoint), str(out), "-s", "forget",
                                 "--forget", f"fact:{req.subject}|{req.relation}", "-o", str(d)])
    assert r.exit_code == 0, r.output
    seen = json.loads((d / "scorecard.json").read_text())["forget"]["forget"]["cloze"]
    assert seen["after"] < seen["before"]  # the old object is gone where the edit took: diagnose saw the codebook


def test_unlearn_cli_with_adaptor_method(tiny_checkpoint, tmp_path):
    b = mechedit.load(tiny_checkpoint)
    s = [s for s in b.world.subjects if s.kind == "subject" and not s.heldout][0]
    out = tmp_path / "u"
    r = CliRunner().invoke(app, ["unlearn", str(tiny_checkpoint), "--forget", f"subject:{s.name}", "-m", "repe",
                                 "-p", "mode=subtract", "-p", "alpha=2.0", "-p", "layer=[0, 1]", "-o", str(out)])
    assert r.exit_code == 0, r.output
    card = json.loads((out / "scorecard.json").read_text())["forget"]
    assert card["forget"]["cloze"]["after"] < card["forget"]["cloze"]["before"]
    loaded = mechedit.load(out)
    assert {a.kind for a in attached(loaded.model)} == {"steer"}
    r = CliRunner().invoke(app, ["diagnose", str(tiny_checkpoint), str(out), "-s", "forget", "-o", str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "d" / "scorecard.json").read_text())["forget"]
    assert np.isclose(d["forget"]["cloze"]["after"], card["forget"]["cloze"]["after"])


def test_icu_needs_an_instruction_world(tiny_bundle):
    with pytest.raises(MecheditError, match="instructions"):
        run_method(tiny_bundle, _forget_requests(tiny_bundle.world), "icu")


@pytest.mark.parametrize("method,params,msg", [
    ("grace", {"forms": "nope"}, "forms"), ("grace", {"layer": 9}, "out of range"),
    ("wise", {"mask_ratio": 0.0}, "mask_ratio"), ("repe", {"mode": "rotate"}, "mode"),
    ("repe", {"layer": [5]}, "out of range")])
def test_bad_parameters_are_one_line_errors(tiny_bundle, method, params, msg):
    reqs = _requests(tiny_bundle.world, 1) if method != "repe" else _forget_requests(tiny_bundle.world)
    with pytest.raises(MecheditError, match=msg):
        run_method(tiny_bundle, reqs, method, **params)


def test_analysis_grid_and_report_with_adaptor_methods(tmp_path, tiny_checkpoint):
    from mechedit.analysis import run_analysis
    from mechedit.report import build_report

    spec = tmp_path / "a.toml"
    spec.write_text(f'''name = "adaptors"
[model]
checkpoint = "{tiny_checkpoint}"
[requests.single]
relation = "capital"
n = 2
mode = "each"
[requests.forget]
subjects = 1
[[grid]]
method = "grace"
requests = ["single"]
params = {{ steps = 30 }}
[[grid]]
method = "wise"
requests = ["forget"]
params = {{ steps = 20 }}
[[grid]]
method = "repe"
layers = [[0, 1]]
requests = ["forget"]
params = {{ alpha = 1.0, n_contrast = 5 }}
[diagnostics]
suites = ["edit"]
forget_suites = ["forget", "leftover"]
options = {{ n_unrelated = 20, n_retain = 20, probe_max_train = 200 }}
''')
    res = run_analysis(spec, tmp_path / "run", workers=1)
    assert res["done"] == res["total"] == 3
    recs = {json.loads(p.read_text())["method"]: json.loads(p.read_text())
            for p in (tmp_path / "run").glob("case_*.json") if not p.name.endswith(".timing.json")}
    assert recs["grace"]["summary"]["edit.efficacy.after"] > 0
    assert recs["wise"]["per_edit"][0]["info"]["defaults"] == "forget"  # refusal targets: the forget defaults
    assert recs["repe"]["summary"]["forget.forget.cloze.after"] < recs["repe"]["summary"]["forget.forget.cloze.before"]
    index = build_report(tmp_path / "run", tmp_path / "report")
    html = index.read_text()
    assert all(m in html for m in ("grace", "wise", "repe"))


def test_forget_defaults_and_query_merging(tiny_bundle):
    """Refusal targets switch an editor to its forget defaults (explicit values win); query merging makes
    the requests of one subject ONE rank-one ROME edit (a shared key and one value) instead of one each."""
    from mechedit.edit.api import get_method
    from mechedit.edit.stats import w_out_name

    reqs = _forget_requests(tiny_bundle.world)[:3]
    assert len({r.subject for r in reqs}) == 1 and len(reqs) == 3
    fast = {"layer": 0, "steps": 10, "restarts": 0}
    merged = run_method(tiny_bundle, reqs, "rome", **fast)
    assert merged.info["defaults"] == "forget"
    assert merged.params["merge_queries"] is True and merged.params["forms"] == "cloze+qa"
    assert get_method("rome").forget_defaults["merge_queries"] is True
    dW = merged.deltas[w_out_name(0)].double()
    assert torch.linalg.matrix_rank(dW, rtol=1e-6) == 1 and len(merged.info["per_request"]) == 1
    apart = run_method(tiny_bundle, reqs, "rome", merge_queries=False, **fast)
    assert apart.params["forms"] == "cloze+qa" and len(apart.info["per_request"]) == 3
    counterfactual = run_method(tiny_bundle, _requests(tiny_bundle.world, 1), "rome", **fast)
    assert counterfactual.info["defaults"] == "counterfactual" and counterfactual.params["merge_queries"] is False
    # MEMIT: one target per subject, every row of the subject owned by it
    from mechedit.edit.common import build_batch, subject_groups

    other = next(r for r in _requests(tiny_bundle.world, 5) if r.subject != reqs[0].subject)
    assert subject_groups(tiny_bundle.world, reqs + [other]) == [0, 0, 0, 1]
    b = build_batch(tiny_bundle, reqs, [""], forms="cloze+qa", owners=[0, 0, 0])
    assert set(b.owner.tolist()) == {0} and len(b.owner) == sum(len(tiny_bundle.world.probes(
        [tiny_bundle.world.fact(r.subject, r.relation)], kinds=("cloze", "qa"))) for r in reqs)
    ess = build_batch(tiny_bundle, reqs, [""], essence=True, essence_kind="relations", owners=[0, 0, 0])
    edited = {q for r in reqs for q in tiny_bundle.world.probes([tiny_bundle.world.fact(r.subject, r.relation)],
                                                                kinds=("cloze", "qa"))}
    texts = [tiny_bundle.tokenizer.decode(row[m.bool()][1:]) for row, m in zip(ess.ids, ess.mask)]
    assert not {p.prompt for p in edited} & set(texts)  # a prompt being edited is never kept by the KL term


@pytest.mark.parametrize("method", ["grace", "wise"])
def test_one_token_objects_edit_exactly_as_the_first_token_path(tiny_bundle, monkeypatch, method):
    """On a one-token world the every-answer-token path of GRACE / WISE is bit-identical to keying and
    training on each prompt's last token and the new object's (only) token."""
    import dataclasses

    import mechedit.edit.common as common
    import mechedit.edit.m_grace as m_grace
    import mechedit.edit.m_wise as m_wise

    reqs = _requests(tiny_bundle.world)
    kw = {**FAST[method], "steps": 15}
    full = run_method(tiny_bundle, reqs, method, **kw)
    batch = common.build_batch(tiny_bundle, reqs, [""])
    assert torch.equal(batch.ans_pos, batch.last) and torch.equal(batch.ans_tgt, batch.target)

    def first_token_only(*args, **kwargs):  # the batch without answer spans: (last, target) per row
        return dataclasses.replace(common.build_batch(*args, **kwargs), ans_row=None, ans_pos=None, ans_tgt=None)

    monkeypatch.setattr({"grace": m_grace, "wise": m_wise}[method], "build_batch", first_token_only)
    first = run_method(tiny_bundle, reqs, method, **kw)
    for a, b in zip(full.adaptors, first.adaptors, strict=True):
        assert set(a.tensors) == set(b.tensors)
        assert all(torch.equal(a.tensors[n], b.tensors[n]) for n in a.tensors)


def test_answer_token_nll_is_the_first_token_nll_on_one_token_rows():
    """The per-row loss of every answer token equals -log p(target | prompt) exactly, value and gradient,
    when each row has one answer token; with several it is the mean over the row's tokens."""
    from mechedit.edit.common import answer_token_nll

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 11, generator=g, requires_grad=True)
    last, target = torch.tensor([2, 5, 3, 4]), torch.tensor([1, 7, 0, 10])
    rows = torch.arange(4)
    _, per_row = answer_token_nll(logits, rows, last, target, 4)
    ref = -torch.log_softmax(logits[rows, last].float(), -1)[rows, target]
    assert torch.equal(per_row, ref)
    (ga,) = torch.autograd.grad(per_row.mean(), logits)
    (gb,) = torch.autograd.grad(ref.mean(), logits)
    assert torch.equal(ga, gb)
    rows2, pos2, tgt2 = torch.tensor([0, 0, 1]), torch.tensor([2, 3, 5]), torch.tensor([1, 4, 7])
    tok, per_row2 = answer_token_nll(logits, rows2, pos2, tgt2, 2)
    lp = torch.log_softmax(logits.detach(), -1)
    assert torch.allclose(tok, -lp[rows2, pos2, tgt2])
    assert torch.allclose(per_row2, torch.stack([-(lp[0, 2, 1] + lp[0, 3, 4]) / 2, -lp[1, 5, 7]]))
