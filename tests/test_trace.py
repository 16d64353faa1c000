"""Causal tracing: batched engine vs the one-cell reference, invariants, locate, I/O, CLI errors."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from typer.testing import CliRunner

from mechedit.cli import app
from mechedit.errors import MecheditError
from mechedit.trace import (CATEGORIES, Location, TraceConfig, TraceResult, locate, locate_for, rank_locations,
                            prepare_fact, select_facts, trace)
from mechedit.trace.engine import window_bounds
from mechedit.trace.result import category_positions


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint):
    import mechedit

    return mechedit.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def bridge(bundle):
    return bundle.bridge()


@pytest.fixture(scope="module")
def facts(bundle):
    # two relations, to exercise per-relation summaries; trained subjects only
    out = []
    for rel in ("capital", "sport"):
        out += [f for f in bundle.world.train_facts if f.relation == rel][:2]
    return out


@pytest.fixture(scope="module")
def result(bundle, bridge, facts):
    return trace(bundle, facts, bridge=bridge, samples=4, severed=("mlp",), batch_size=97)


def test_batched_equals_reference(bundle, bridge, facts):
    kw = dict(bridge=bridge, samples=3, window=2, severed=("mlp", "attn"), seed=3)
    fast = trace(bundle, facts[:2], batch_size=50, **kw)
    slow = trace(bundle, facts[:2], engine="reference", **kw)
    assert fast.kinds == slow.kinds == ("resid", "mlp", "attn", "resid_sever_mlp", "resid_sever_attn")
    np.testing.assert_allclose(fast.p_clean, slow.p_clean, atol=1e-5)
    np.testing.assert_allclose(fast.p_corrupt_samples, slow.p_corrupt_samples, atol=1e-5)
    for k in fast.kinds:
        np.testing.assert_allclose(fast.p_restored[k], slow.p_restored[k], atol=1e-5, equal_nan=True)
    # the corruption does something on this model, so the comparison is not between constants
    assert np.all(fast.total_effect > 0.05)
    assert np.nanstd(fast.p_restored["resid"]) > 0.01


def test_restoring_last_layer_state(result):
    """h at the last layer and last token fixes the output; other tokens there change nothing."""
    L = result.n_layers
    for i, d in enumerate(result.facts):
        T = len(d["tokens"])
        assert result.p_restored["resid"][i, L - 1, T - 1] == pytest.approx(result.p_clean[i], abs=1e-5)
        np.testing.assert_allclose(result.p_restored["resid"][i, L - 1, : T - 1], result.p_corrupt[i], atol=1e-5)
        assert np.all(np.isnan(result.p_restored["resid"][i, :, T:]))


def test_zero_noise_gives_zero_effects(bundle, bridge, facts):
    r = trace(bundle, facts[:2], bridge=bridge, samples=2, noise=0.0, severed=("attn",))
    assert r.noise_scale == 0.0
    np.testing.assert_allclose(r.total_effect, 0.0, atol=1e-6)
    for k in r.kinds:
        ie = r.indirect_effect(k)
        np.testing.assert_allclose(ie[~np.isnan(ie)], 0.0, atol=1e-6)


def test_seed_reproducible(bundle, bridge, facts):
    a = trace(bundle, facts[:1], bridge=bridge, samples=3, sites=("mlp",), seed=7)
    b = trace(bundle, facts[:1], bridge=bridge, samples=3, sites=("mlp",), seed=7, batch_size=13)
    c = trace(bundle, facts[:1], bridge=bridge, samples=3, sites=("mlp",), seed=8)
    np.testing.assert_array_equal(a.p_corrupt_samples, b.p_corrupt_samples)
    np.testing.assert_allclose(a.p_restored["mlp"], b.p_restored["mlp"], atol=1e-6)
    assert not np.allclose(a.p_corrupt_samples, c.p_corrupt_samples)


def test_noise_level_and_fixed_scale(bundle, bridge, facts):
    a = trace(bundle, facts[:1], bridge=bridge, samples=2, sites=("mlp",), noise=3.0)
    b = trace(bundle, facts[:1], bridge=bridge, samples=2, sites=("mlp",), noise=6.0)
    c = trace(bundle, facts[:1], bridge=bridge, samples=2, sites=("mlp",), noise_scale=0.25)
    assert b.noise_scale == pytest.approx(2 * a.noise_scale)
    assert a.noise_scale == pytest.approx(3 * a.config["subject_embedding_std"])
    assert c.noise_scale == 0.25


def test_window_bounds():
    assert window_bounds(5, 10, 48) == (0, 10)
    assert window_bounds(20, 10, 48) == (15, 25)
    assert window_bounds(47, 10, 48) == (42, 48)
    assert window_bounds(2, 1, 4) == (2, 3)


def test_category_positions():
    # <bos> the capital of [a b c] is
    pos = category_positions(7, (3, 6))
    assert pos == {"first_subject": [3], "middle_subject": [4], "last_subject": [5], "first_subsequent": [],
                   "further": [], "last": [6]}
    pos = category_positions(6, (1, 3))  # <bos> [a b] 's capital is
    assert pos["first_subsequent"] == [3] and pos["further"] == [4] and pos["middle_subject"] == []


def test_locate_picks_argmax(result):
    for site in ("mlp", "resid", "attn"):
        ce = result.category_effects(site)[:, CATEGORIES.index("last_subject")]
        ranked = rank_locations(result, site)
        assert [r.layer for r in ranked][0] == int(np.argmax(np.nanmean(ce, axis=0)))
        assert ranked == sorted(ranked, key=lambda r: -r.score)
        assert locate(result, site) == ranked[0]
    rel = result.facts[0]["relation"]
    ce = result.category_effects("mlp")[result.rows(relation=rel), CATEGORIES.index("last")]
    assert locate(result, "mlp", relation=rel, token_category="last").layer == int(np.argmax(ce.mean(axis=0)))
    one = locate(result, "mlp", fact=result.facts[1]["index"])
    assert isinstance(one, Location) and one.site == "mlp" and one.token_category == "last_subject"


def test_locate_on_constructed_result():
    F, L, T = 3, 5, 4
    p = np.zeros((F, L, T))
    p[:, 3, 1] = 0.9  # last subject token is position 1 for every fact; layer 3 is the best
    p[:, 1, 1] = 0.5
    facts = [{"index": i, "subject": f"s{i}", "relation": "r", "object": "o", "template": 0, "prompt": "",
              "tokens": ["<bos>", "s", "x", "is"], "subject_span": [1, 2]} for i in range(F)]
    r = TraceResult({}, 1.0, L, facts, np.ones(F), np.full(F, 0.1), np.full((F, 2), 0.1), {"mlp": p})
    ranked = rank_locations(r, "mlp")
    assert [x.layer for x in ranked[:2]] == [3, 1]
    assert ranked[0].score == pytest.approx(0.8)
    with pytest.raises(MecheditError):
        locate(r, "attn")
    with pytest.raises(MecheditError):
        locate(r, "mlp", token_category="nowhere")


def test_summary_means_and_ci(result):
    s = result.summary()
    ce = result.category_effects("mlp")[:, CATEGORIES.index("last_subject")]
    m = s["overall"]["mlp"]["last_subject"]
    np.testing.assert_allclose(m["mean"], ce.mean(axis=0))
    np.testing.assert_allclose(m["ci95"], 1.96 * ce.std(axis=0, ddof=1) / np.sqrt(len(ce)))
    assert s["overall"]["total_effect"]["mean"] == pytest.approx(float(np.mean(result.total_effect)))
    assert set(s["by_relation"]) == {"capital", "sport"}


def test_save_load_roundtrip(result, tmp_path):
    result.save(tmp_path)
    back = TraceResult.load(tmp_path)
    assert back.facts == result.facts and back.config == result.config and back.kinds == result.kinds
    np.testing.assert_array_equal(back.p_clean, result.p_clean)
    np.testing.assert_array_equal(back.p_corrupt_samples, result.p_corrupt_samples)
    for k in result.kinds:
        np.testing.assert_array_equal(back.p_restored[k], result.p_restored[k])
    assert locate(back) == locate(result)


def test_bad_inputs(bundle, bridge):
    with pytest.raises(MecheditError, match="unknown subject"):
        trace(bundle, ["nobody|capital"], bridge=bridge)
    with pytest.raises(MecheditError, match="unknown relation"):
        select_facts(bundle.world, relation="nonsense")
    with pytest.raises(MecheditError, match="unknown site"):
        TraceConfig(sites=("mlp", "heads"))
    with pytest.raises(MecheditError, match="unknown site"):
        TraceConfig(severed=("resid",))
    with pytest.raises(MecheditError):
        TraceConfig(samples=0)
    held = bundle.world.heldout_facts[0]
    name = bundle.world.subject_of(held).name
    with pytest.raises(MecheditError, match="held-out"):
        select_facts(bundle.world, [f"{name}|{held.relation}"])


def test_unknown_facts_are_skipped(bundle, bridge):
    held = bundle.world.heldout_facts[:8]
    facts = select_facts(bundle.world, held, include_heldout=True)
    with pytest.raises(MecheditError, match="held-out"):
        trace(bundle, facts, bridge=bridge)
    r = trace(bundle, facts, bridge=bridge, samples=2, sites=("mlp",), include_heldout=True)
    assert r.n_facts + len(r.skipped) == len(held)
    assert len(r.skipped) >= 1  # never-trained subjects: the model cannot know most of them
    assert all("clean prediction wrong" in s["reason"] for s in r.skipped)
    traced = {d["index"] for d in r.facts}
    assert traced.isdisjoint({s["index"] for s in r.skipped})


def test_locate_for(bundle):
    loc = locate_for(bundle, relation="capital", n=3, samples=2)
    assert isinstance(loc, Location) and loc.site == "mlp" and 0 <= loc.layer < bundle.n_layers
    assert dataclasses.is_dataclass(loc)
    with pytest.raises(dataclasses.FrozenInstanceError):
        loc.layer = 0


def test_cli_trace(tiny_checkpoint, bundle, tmp_path):
    runner = CliRunner()
    f = bundle.world.train_facts[0]
    fact = f"{bundle.world.subject_of(f).name}|{f.relation}"
    out = tmp_path / "run"
    res = runner.invoke(app, ["trace", str(tiny_checkpoint), "--fact", fact, "--samples", "2", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "located mlp: layer" in res.output and "figures" in res.output
    for name in ("trace.json", "trace.npz", "summary.json", "locations.json", "spec.json", "figures/average.png"):
        assert (out / name).is_file(), name
    assert TraceResult.load(out).n_facts == 1
    again = runner.invoke(app, ["trace", str(tiny_checkpoint), "--fact", fact, "-o", str(out)])
    assert again.exit_code == 2 and "--force" in again.output
    for args, msg in ((["--fact", "nobody|capital"], "unknown subject"),
                      (["--relation", "nonsense"], "unknown relation"),
                      (["--all", "--sites", "mlp,heads"], "unknown site"),
                      ([], "choose facts")):
        r = runner.invoke(app, ["trace", str(tiny_checkpoint), *args, "-o", str(tmp_path / "x")])
        assert r.exit_code == 2 and msg in r.output, (args, r.output)


@pytest.mark.parametrize("window,min_rows", [(1, 1), (3, 1), (1, 10**6)])
def test_prefix_shared_batched_equals_reference(bundle, bridge, window, min_rows, monkeypatch):
    """Rows that start at their first affected block (grouped by start block and prompt length,
    several chunks per group) and run only the tokens from their chunk's first restored token on
    (one token per chunk, or tokens mixed) give the reference's numbers, for windows of one and of
    all layers, with both severed paths."""
    from mechedit.trace import engine

    monkeypatch.setattr(engine, "SUFFIX_MIN_ROWS", min_rows)
    by_len = {}
    for f in bundle.world.train_facts:
        n = len(prepare_fact(bundle.world, bundle.tokenizer, f).ids)
        by_len.setdefault(n, f)
    facts = list(by_len.values())[:3]
    assert len(facts) >= 2  # prompts of different lengths: several groups per start block
    kw = dict(bridge=bridge, samples=2, window=window, severed=("mlp", "attn"), seed=5)
    fast = trace(bundle, facts, batch_size=7, **kw)
    slow = trace(bundle, facts, engine="reference", **kw)
    assert fast.n_facts >= 2
    np.testing.assert_allclose(fast.p_corrupt_samples, slow.p_corrupt_samples, atol=1e-5)
    for k in fast.kinds:
        np.testing.assert_allclose(fast.p_restored[k], slow.p_restored[k], atol=1e-5, equal_nan=True)
    assert np.nanstd(fast.p_restored["mlp"]) > 0.01


@pytest.mark.parametrize("parallel", [False, True])
def test_engine_equals_reference_on_other_architectures(bundle, parallel):
    """A 3-layer model with a sequential (GPT-2 style) or parallel residual, random weights: the
    batched engine (prefix/suffix sharing, composed first blocks, last block's MLP at the last
    position only) gives the reference's numbers. Random weights, so every fact is traced."""
    from dataclasses import replace

    from mechedit.model.checkpoint import make_bridge
    from mechedit.model.fast import FastNeoX
    from mechedit.model.spec import PRESETS
    from mechedit.model.train import build_model
    from mechedit.trace import engine as E

    spec = replace(PRESETS["tiny"], n_layers=3, parallel_residual=parallel)
    model = build_model(spec, bundle.tokenizer, 7).eval()
    br = make_bridge(model)
    fx = FastNeoX(model)
    prepared = [prepare_fact(bundle.world, bundle.tokenizer, f) for f in bundle.world.train_facts[:3]]
    kw = dict(kinds=("resid", "mlp", "attn", "resid_sever_mlp", "resid_sever_attn"), noise_scale=0.5, samples=2,
              window=2, seed=1, n_layers=3, d_model=spec.d_model, pad_id=bundle.tokenizer.pad_token_id)
    fast = E.run_batched(fx, prepared, batch_size=11, **kw)
    slow = E.run_reference(br, prepared, **kw)
    # random weights give small probabilities: compare relatively
    np.testing.assert_allclose(fast.p_corrupt, slow.p_corrupt, rtol=1e-4, atol=1e-9)
    for k in kw["kinds"]:
        np.testing.assert_allclose(fast.p_restored[k], slow.p_restored[k], rtol=1e-4, atol=1e-9, equal_nan=True)
    spread = np.nanmax(fast.p_restored["resid"]) / np.nanmin(fast.p_restored["resid"])
    assert spread > 1.1  # restorations differ: not a comparison of constants


def test_prepared_subject_span_covers_exactly_the_subject_tokens(bundle):
    """The traced span (corrupted by noise, and the 'last subject token' of every summary) is the
    subject's name and nothing else, in every template and for names of every length."""
    w = bundle.world
    lengths = set()
    for f in w.train_facts[:60]:
        name = w.subject_of(f).name.split()
        for t in range(w.n_templates):
            p = prepare_fact(w, bundle.tokenizer, f, template=t)
            a, b = p.subject
            assert list(p.tokens[a:b]) == name, (p.prompt, p.subject)
            assert p.tokens[0] == "<bos>" and " ".join(p.tokens[1:]) == p.prompt
        lengths.add(len(name))
    assert len(lengths) >= 2  # one- and several-word names were both checked

