"""FastNeoX (the functional GPT-NeoX forward) against the HF model, and the editors' target search on
the fast path against the same search through the HF modules."""
from __future__ import annotations

import pytest
import torch

from mechedit.edit import EditRequest, run_method
from mechedit.model.evaluate import pad
from mechedit.model.fast import FastNeoX, Setter
from mechedit.model.spec import ModelSpec


def _random_model(parallel: bool, rotary_pct: float, n_layers: int = 3):
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = ModelSpec("t", n_layers, 32, 4, 64, 32, rotary_pct, parallel).hf_config(50, 1, 2, 0)
    model = GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial layer norms and biases
        for n, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def _ids(lengths, vocab=50, pad_id=0):
    g = torch.Generator().manual_seed(1)
    seqs = [[1] + torch.randint(3, vocab, (n - 1,), generator=g).tolist() for n in lengths]
    return pad(seqs, pad_id)


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("rotary_pct", [0.25, 1.0])
def test_fast_forward_equals_hf(parallel, rotary_pct):
    model = _random_model(parallel, rotary_pct)
    ids, mask = _ids([7, 5, 9, 3])
    fx = FastNeoX(model)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        x = fx.embed(ids)
        real = mask.bool()
        for j in range(fx.n_layers - 1):  # HF's last hidden state is after the final layer norm
            x = fx.block(j, x)
            torch.testing.assert_close(x[real], ref.hidden_states[j + 1][real], atol=1e-5, rtol=1e-5)
        x = fx.block(fx.n_layers - 1, x)
        torch.testing.assert_close(fx.unembed(x)[real], ref.logits[real], atol=1e-5, rtol=1e-5)
        last = mask.sum(1) - 1
        torch.testing.assert_close(fx.logits_at(ids, last), ref.logits[torch.arange(4), last], atol=1e-5, rtol=1e-5)
        # from a cached stream entering block 1
        x1 = fx.resid_at(ids, 1)
        torch.testing.assert_close(fx.logits_at(ids, last, x=x1, start_block=1), ref.logits[torch.arange(4), last],
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("parallel", [True, False])
def test_suffix_with_past_and_setters_equal_full_run(parallel):
    """Running tokens t0.. with the recorded keys/values of earlier tokens equals the full run; a
    Setter equals overwriting the output in a full run."""
    model = _random_model(parallel, 0.25)
    ids, _ = _ids([8, 8])
    fx = FastNeoX(model)
    t0 = 3
    with torch.no_grad():
        keep: dict = {}
        x = fx.embed(ids)
        outs = []
        for j in range(fx.n_layers):
            x = fx.block(j, x, keep=keep)
            outs.append(x)
        xs = fx.embed(ids)[:, t0:]
        for j in range(fx.n_layers):
            past = tuple(z[:, :, :t0] for z in keep[j])
            xs = fx.block(j, xs, start=t0, past=past)
            torch.testing.assert_close(xs, outs[j][:, t0:], atol=1e-5, rtol=1e-5)
        # a setter at block 1's MLP output, row 1, position 5
        val = torch.randn(1, 32)
        setter = Setter(torch.tensor([1]), torch.tensor([5]), val)
        x = fx.embed(ids)
        for j in range(fx.n_layers):
            x = fx.block(j, x, set_mlp=setter if j == 1 else None)

        def hook(m, i, o):
            o = o.clone()
            o[1, 5] = val[0]
            return o
        h = model.gpt_neox.layers[1].mlp.register_forward_hook(hook)
        try:
            ref = model(input_ids=ids).logits
        finally:
            h.remove()
        torch.testing.assert_close(fx.unembed(x), ref, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(x, outs[-1], atol=1e-4)


def _requests(world, n):
    facts = [f for f in world.train_facts if world.relation(f.relation).kind == "independent"]
    out = []
    for f in facts[:n]:
        new = next(o for o in world.relation(f.relation).objects if o != f.object)
        out.append(EditRequest(world.subjects[f.subject].name, f.relation, new))
    return out


def _same_subject_requests(world, n):
    """n requests on trained facts of one subject (the first subject with n + 1 of them)."""
    for s in range(len(world.subjects)):
        facts = [f for f in world.facts_of(s) if world.is_trained(f)]
        if len(facts) > n:
            return [EditRequest(world.subjects[s].name, f.relation,
                                next(o for o in world.relation(f.relation).objects if o != f.object))
                    for f in facts[:n]]
    raise AssertionError("no subject with enough trained facts")


@pytest.mark.parametrize("method, params", [
    ("rome", {"layer": 0, "steps": 15, "restarts": 2, "restart_nll": 10.0}),
    ("rome", {"layer": 0, "steps": 10, "restarts": 0, "through_edit": False}),
    ("rome", {"layer": 1, "steps": 10, "restarts": 0}),  # the last block: logits read off its cached output
    ("memit", {"layer": [0], "steps": 10, "precision": "float32"}),
    ("memit", {"layer": [0], "steps": 10, "precision": "float32", "through_edit": False}),
])
def test_fast_target_search_equals_hf_modules(tiny_bundle, method, params):
    """The editors give the same deltas on the fast path (block `layer` run once per search and moved
    by the edit's term) as through the HF modules (restarts included), step for step."""
    # MEMIT: two requests of one subject too, so that essence rows repeat (the fast path runs each once)
    reqs = _requests(tiny_bundle.world, 1) if method == "rome" else _requests(tiny_bundle.world, 2) + \
        _same_subject_requests(tiny_bundle.world, 2)
    fast = run_method(tiny_bundle, reqs, method, **params)
    slow = run_method(tiny_bundle, reqs, method, engine="hf", **params)
    infos = [(a, b) for a, b in zip(fast.info["per_request"], slow.info["per_request"])] if method == "rome" \
        else [(fast.info, slow.info)]
    for a, b in infos:
        assert a["steps"] == b["steps"] and a.get("restart") == b.get("restart")
        assert a["nll_first"] == pytest.approx(b["nll_first"], rel=1e-4, abs=1e-6)
        assert a["nll_last"] == pytest.approx(b["nll_last"], rel=1e-3, abs=1e-5)
    for name, d in fast.deltas.items():
        assert float(d.abs().max()) > 0
        torch.testing.assert_close(d, slow.deltas[name], atol=1e-4 * float(d.abs().max()), rtol=1e-3)


def test_fast_joint_search_with_several_starts_equals_the_hf_reference(tiny_bundle):
    """optimize_targets with a joint edit and several starts ([starts, n, d] init): each start's rows
    use that start's deltas, on the fast path (cached block) as through the HF hook."""
    from mechedit.edit.common import build_batch, optimize_targets

    model = tiny_bundle.model
    reqs = _requests(tiny_bundle.world, 2)
    batch = build_batch(tiny_bundle, reqs, [""])
    g = torch.Generator().manual_seed(1)
    d_mlp = model.gpt_neox.layers[0].mlp.dense_4h_to_h.in_features
    U = torch.randn(2, d_mlp, generator=g, dtype=torch.float64) * 1e-2
    init = torch.randn(3, 2, model.config.hidden_size, generator=g, dtype=torch.float64)
    opts = dict(clamp=torch.tensor([50.0]), lr=0.05, steps=6, kl_weight=0.0, weight_decay=0.0,
                ref_norm=torch.tensor([5.0]), stop_loss=0.0, joint_u=U, init=init)
    fast = optimize_targets(model, batch, None, 0, 2, engine="fast", **opts)
    hf = optimize_targets(model, batch, None, 0, 2, engine="hf", **opts)
    assert [i["nll_last"] for i in fast[1]] == pytest.approx([i["nll_last"] for i in hf[1]], rel=1e-4)
    assert len({round(i["nll_last"], 3) for i in hf[1]}) == 3  # the starts took different paths
    torch.testing.assert_close(fast[0], hf[0], rtol=1e-4, atol=1e-5)


def test_batched_starts_equal_separate_searches(tiny_bundle):
    """Several starts in one search (ROME's restarts) follow exactly the trajectories they follow alone,
    including a start that stops early (stop_loss) while the others go on."""
    from mechedit.edit.common import build_batch, optimize_targets, residual_norm

    model = tiny_bundle.model
    req = _requests(tiny_bundle.world, 1)[0]
    batch = build_batch(tiny_bundle, [req], [""])
    essence = build_batch(tiny_bundle, [req], [""], essence=True, essence_kind="relations")
    d = model.config.hidden_size
    h = residual_norm(model, batch, 0)
    g = torch.Generator().manual_seed(3)
    inits = torch.randn(3, 1, d, generator=g, dtype=torch.float64)
    inits *= torch.tensor([0.0, 0.5, 2.0]).view(3, 1, 1) * h / inits.norm(dim=-1, keepdim=True)
    opts = dict(clamp=torch.tensor([3 * h]), lr=0.3 * h / d ** 0.5, steps=60, kl_weight=1.0, weight_decay=0.05,
                ref_norm=torch.tensor([h]), stop_loss=0.5)
    together, infos = optimize_targets(model, batch, essence, 0, 1, init=inits, **opts)
    steps = set()
    for r in range(3):
        alone, info = optimize_targets(model, batch, essence, 0, 1, init=inits[r], **opts)
        torch.testing.assert_close(together[r], alone, atol=1e-4, rtol=1e-4)
        assert infos[r]["steps"] == info["steps"]
        steps.add(info["steps"])

    assert len(steps) > 1  # the starts stopped at different steps: the freezing is exercised


def test_device_and_precision_resolution(monkeypatch):
    from mechedit.device import resolve_device, resolve_precision
    from mechedit.errors import MecheditError

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(MecheditError, match="unknown device"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MecheditError, match="no CUDA GPU"):
        resolve_device("cuda:0")
    assert resolve_precision("float32", "cpu") == "float32"
    assert resolve_precision("auto", "cpu") in ("float32", "bfloat16")
    with pytest.raises(MecheditError):
        resolve_precision("half", "cpu")


def test_bf16_search_stays_close_to_fp32(tiny_bundle):
    """The bf16 target search (an option, "auto" for MEMIT) finds an edit of the same quality: the new
    object's NLL after the search is close to fp32's."""
    reqs = _requests(tiny_bundle.world, 3)
    a = run_method(tiny_bundle, reqs, "memit", layer=[0], steps=30, precision="float32")
    b = run_method(tiny_bundle, reqs, "memit", layer=[0], steps=30, precision="bfloat16")
    assert a.info["precision"] == "float32" and b.info["precision"] == "bfloat16"
    assert abs(a.info["nll_last"] - b.info["nll_last"]) < 0.25 + 0.25 * a.info["nll_last"]
