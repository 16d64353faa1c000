"""Unlearning: forget targets, the shared loop, each method on the tiny model, the CLI's errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mechedit.cli import app
from mechedit.edit.api import run_method
from mechedit.errors import MecheditError
from mechedit.model.evaluate import score_answers
from mechedit.unlearn import parse_forget
from mechedit.unlearn.loop import make_batch

METHODS = ("ga", "gd", "npo", "dpo", "rt", "rmu")


def _subject(world, i=0):
    return [s for s in world.subjects if s.kind == "subject" and not s.heldout][i]


def test_parse_forget_kinds(tiny_world):
    s = _subject(tiny_world)
    t = parse_forget(tiny_world, f"subject:{s.name}")
    assert {f.subject for f in t.forget} == {s.id} and len(t.forget) == len(tiny_world.facts_of(s.id))
    f = t.forget[0]
    t1 = parse_forget(tiny_world, f"fact:{s.name}|{f.relation}")
    assert [g.index for g in t1.forget] == [f.index]
    tr = parse_forget(tiny_world, "relation:color")
    assert all(g.relation == "color" for g in tr.forget) and all(tiny_world.is_trained(g) for g in tr.forget)
    s2 = _subject(tiny_world, 1)
    both = parse_forget(tiny_world, [f"subject:{s.name},subject:{s2.name}"])
    assert {g.subject for g in both.forget} == {s.id, s2.id}
    assert not set(both.forget_ids) & {g.index for g in both.retain}
    assert all(g.subject in (s.id, s2.id) for g in both.neighbours_subject)
    assert t.hash() != both.hash() and t.hash() == parse_forget(tiny_world, f"subject:{s.name}").hash()


@pytest.mark.parametrize("spec", ["subject:nobody_here", "fact:x", "colour:red", "relation:nope", "", "subject:"])
def test_parse_forget_errors(tiny_world, spec):
    with pytest.raises(MecheditError):
        parse_forget(tiny_world, spec)


def test_heldout_subject_refused(tiny_world):
    s = next(s for s in tiny_world.subjects if s.heldout)
    with pytest.raises(MecheditError, match="held out"):
        parse_forget(tiny_world, f"subject:{s.name}")


def test_make_batch_labels_only_answer(tiny_bundle):
    b = make_batch(tiny_bundle.tokenizer, ["the capital of x is"], ["<refuse>"])
    keep = (b.labels != -100).nonzero()
    assert keep.tolist() == [[0, 5]]  # <bos> + 5 words: the label sits at the last prompt position
    assert int(b.labels[0, 5]) == tiny_bundle.tokenizer.convert_tokens_to_ids("<refuse>")


def _forget_logprob(bundle, target):
    probes = bundle.world.probes(list(target.forget), kinds=("cloze", "qa"))
    return score_answers(bundle.model, bundle.tokenizer, [p.prompt for p in probes], [p.answer for p in probes]).logprob


@pytest.mark.parametrize("method", METHODS)
def test_method_lowers_forget_probability(tiny_bundle, method):
    s = _subject(tiny_bundle.world)
    target = parse_forget(tiny_bundle.world, f"subject:{s.name}")
    orig = {n: p.detach().clone() for n, p in tiny_bundle.model.named_parameters()}
    before = _forget_logprob(tiny_bundle, target)
    # RMU moves activations, not the output directly: more steps, the last of the tiny model's 2 layers
    kw = {"layer": 1, "lr": 3e-3, "steps": 60} if method == "rmu" else {"steps": 15}
    res = run_method(tiny_bundle, target.requests(), method, eval_every=15, stop_recall=-1.0, **kw)
    for n, p in tiny_bundle.model.named_parameters():  # the input model is left unchanged
        assert torch.equal(p, orig[n]), n
    assert res.deltas and set(res.deltas) <= set(orig)
    res.apply(tiny_bundle.model)
    after = _forget_logprob(tiny_bundle, target)
    res.restore(tiny_bundle.model)
    assert after.mean() < before.mean() - 0.05, (method, before.mean(), after.mean())


def test_layer_restricted_and_lora(tiny_bundle):
    s = _subject(tiny_bundle.world)
    reqs = parse_forget(tiny_bundle.world, f"subject:{s.name}").requests()
    res = run_method(tiny_bundle, reqs, "gd", steps=3, layers=[1], modules="mlp")
    assert res.deltas and all(n.startswith("gpt_neox.layers.1.mlp.") for n in res.deltas)
    lora = run_method(tiny_bundle, reqs, "rt", steps=3, layers=[0], modules="attn", lora_rank=2)
    assert lora.deltas and all(n.startswith("gpt_neox.layers.0.attention.") and n.endswith("weight")
                               for n in lora.deltas)
    assert all(torch.linalg.matrix_rank(d) <= 2 for d in lora.deltas.values())
    with pytest.raises(MecheditError):
        run_method(tiny_bundle, reqs, "gd", layers=[7])
    with pytest.raises(MecheditError):
        run_method(tiny_bundle, reqs, "npo", beta=0.0)


def test_retrained_reference_never_sees_forget_facts(tiny_bundle, tmp_path, monkeypatch):
    import mechedit.model.pipeline as pipeline
    from mechedit.diagnose.reference import retrained_reference

    s = _subject(tiny_bundle.world)
    target = parse_forget(tiny_bundle.world, f"subject:{s.name}")
    seen = {}

    def fake_train(world, mspec, tspec, out, *, force=False, exclude_facts=frozenset(), stop_epoch=None, **kw):
        seen["corpus"] = world.corpus(exclude_facts)
        seen["tspec"] = tspec
        seen["stop_epoch"] = stop_epoch
        return tiny_bundle

    monkeypatch.setattr(pipeline, "train_checkpoint", fake_train)
    retrained_reference(tiny_bundle, target, cache_dir=tmp_path)
    full = tiny_bundle.world.corpus()
    words = set(s.name.split()) | ({s.alias} if s.alias else set())
    assert not any(words <= set(line.split()) for line in seen["corpus"] if s.name in line)
    assert not [line for line in seen["corpus"] if f" {s.name} " in f" {line} "]
    assert len(full) > len(seen["corpus"])
    assert seen["tspec"].seed == tiny_bundle.meta["train_spec"]["seed"]
    assert seen["tspec"].max_epochs == tiny_bundle.meta["train_spec"]["max_epochs"]  # the same cosine schedule
    assert seen["stop_epoch"] == tiny_bundle.meta["epochs"]  # stopped where the original stopped


def test_cli_bad_inputs(tiny_checkpoint, tmp_path):
    runner = CliRunner()
    s = _subject(__import__("mechedit").load(tiny_checkpoint).world)
    cases = [
        ["unlearn", str(tiny_checkpoint), "--forget", "subject:nobody_here", "-o", str(tmp_path / "a")],
        ["unlearn", str(tiny_checkpoint), "--forget", f"subject:{s.name}", "-m", "nomethod", "-o", str(tmp_path / "b")],
        ["unlearn", str(tiny_checkpoint), "--forget", "planet:x", "-o", str(tmp_path / "c")],
        ["unlearn", str(tiny_checkpoint), "--forget", f"subject:{s.name}", "-p", "nokey=1", "-o", str(tmp_path / "d")],
        ["unlearn", str(tmp_path / "missing"), "--forget", f"subject:{s.name}", "-o", str(tmp_path / "e")],
        ["diagnose", str(tiny_checkpoint), str(tiny_checkpoint), "-s", "nosuite", "-o", str(tmp_path / "f")],
        ["diagnose", str(tiny_checkpoint), str(tiny_checkpoint), "-s", "forget", "-o", str(tmp_path / "g")],
    ]
    for args in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        assert "error:" in r.output


def test_cli_unlearn_then_diagnose(tiny_checkpoint, tmp_path):
    import json

    runner = CliRunner()
    s = _subject(__import__("mechedit").load(tiny_checkpoint).world)
    out = tmp_path / "u"
    r = runner.invoke(app, ["unlearn", str(tiny_checkpoint), "--forget", f"subject:{s.name}", "-m", "rt",
                            "-p", "steps=30", "-o", str(out)])
    assert r.exit_code == 0, r.output
    card = json.loads((out / "scorecard.json").read_text())["forget"]
    assert card["after"]["forget"]["cloze"]["agg_value"] < card["before"]["forget"]["cloze"]["agg_value"]
    assert card["forget"]["cloze"]["after"] == card["after"]["forget"]["cloze"]["agg_value"]
    assert "NaN" not in (out / "scorecard.json").read_text()
    assert (out / "deltas.safetensors").is_file() and (out / "model.safetensors").is_file()
    r = runner.invoke(app, ["diagnose", str(tiny_checkpoint), str(out), "-s", "forget", "-o", str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "d" / "scorecard.json").read_text())
    assert d["forget"]["n_forget_facts"] == card["n_forget_facts"]
    assert np.isclose(d["forget"]["after"]["retain"]["cloze"]["agg_value"], card["after"]["retain"]["cloze"]["agg_value"])
