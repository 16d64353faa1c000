"""Inference precision (`--precision`, the spec's `precision`): it reaches every scoring and diagnostic
forward, bf16 moves the numbers a little without changing answers, fp32 is what it always was, training
and the methods' own stopping rules stay fp32, and the precision is recorded beside the device."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from clitools import invoke

from mechedit.device import current_precision, inference_precision, precision_record, use_precision
from mechedit.errors import MecheditError


@pytest.fixture(autouse=True)
def fp32_after():
    """Every test leaves the process in the default precision."""
    yield
    use_precision("float32")


class AutocastSeen:
    """Records, for each forward of `model`, whether bf16 autocast was on for the model's device."""

    def __init__(self, model):
        self.model, self.seen = model, []

    def __enter__(self):
        dev = self.model.device.type
        self.handle = self.model.register_forward_hook(
            lambda *_: self.seen.append(torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.bfloat16))
        return self.seen

    def __exit__(self, *exc):
        self.handle.remove()


def probes_of(bundle, kinds=("cloze", "paraphrase", "qa")):
    probes = bundle.world.probes(bundle.world.train_facts, kinds)
    return [p.prompt for p in probes], [p.answer for p in probes]


def todays_scores(model, tokenizer, prompts, answers):
    """Scoring as it was before the precision option (one batch): the fp32 reference, bit for bit."""
    from mechedit.model.evaluate import encode_pairs, pad

    seqs, last, alen = encode_pairs(tokenizer, prompts, answers)
    ids, mask = pad(seqs, tokenizer.pad_token_id, model.device)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
    out = []
    for b, (l, k) in enumerate(zip(last, alen)):
        out.append(sum(float(logp[b, l + j, ids[b, l + j + 1]]) for j in range(k)))
    return np.array(out)


def test_resolution_and_auto_per_path(monkeypatch):
    import mechedit.device as D

    assert current_precision() == "float32"
    assert use_precision("BFloat16") == "bfloat16" and current_precision() == "bfloat16"
    for bad in ("bf16", "", "half", 5, "fp32"):
        with pytest.raises(MecheditError, match="expected float32"):
            use_precision(bad)
    monkeypatch.setattr(D, "fast_bf16", lambda device: True)
    assert {p: inference_precision("cpu", p, "auto") for p in D.INFERENCE_PATHS} == \
        {p: ("bfloat16" if p in D.AUTO_BF16 else "float32") for p in D.INFERENCE_PATHS}
    assert inference_precision("cpu", "trace", "bfloat16") == "bfloat16"  # asked for explicitly: honoured
    monkeypatch.setattr(D, "fast_bf16", lambda device: False)
    assert {inference_precision("cpu", p, "auto") for p in D.INFERENCE_PATHS} == {"float32"}
    assert precision_record("cpu", "bfloat16") == {"asked": "bfloat16", **{p: "bfloat16" for p in D.INFERENCE_PATHS}}


def test_scoring_forward_runs_in_the_asked_precision(tiny_bundle):
    from mechedit.model.evaluate import score_answers

    m, tok = tiny_bundle.model, tiny_bundle.tokenizer
    prompts, answers = probes_of(tiny_bundle)
    with AutocastSeen(m) as seen:
        score_answers(m, tok, prompts[:8], answers[:8])
        use_precision("bfloat16")
        score_answers(m, tok, prompts[:8], answers[:8])
        score_answers(m, tok, prompts[:8], answers[:8], precision="float32")  # an explicit precision wins
    assert seen == [False, True, False]


def test_bf16_scoring_moves_logprobs_slightly_and_keeps_every_answer(tiny_bundle):
    from mechedit.model.evaluate import score_answers

    m, tok = tiny_bundle.model, tiny_bundle.tokenizer
    prompts, answers = probes_of(tiny_bundle)
    a = score_answers(m, tok, prompts, answers)
    b = score_answers(m, tok, prompts, answers, precision="bfloat16")
    d = np.abs(a.logprob - b.logprob)
    assert 0 < d.max() < 0.25, d.max()  # bf16 keeps 8 bits of mantissa: a visible, small change
    assert (a.correct == b.correct).all() and a.top1 == b.top1
    assert a.correct.mean() > 0.8  # the tiny model knows its facts: agreement is not agreement on noise


def test_float32_scoring_is_bit_identical_to_before(tiny_bundle):
    from mechedit.model.evaluate import score_answers

    m, tok = tiny_bundle.model, tiny_bundle.tokenizer
    prompts, answers = probes_of(tiny_bundle)
    prompts, answers = prompts[:60], answers[:60]
    ref = todays_scores(m, tok, prompts, answers)
    got = score_answers(m, tok, prompts, answers, batch_size=len(prompts)).logprob
    assert np.array_equal(np.float32(ref), np.float32(got))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


def test_diagnostic_forwards_honour_the_precision(tiny_bundle):
    from mechedit.analysis.cases import top_predictions
    from mechedit.diagnose.mia import mia_scores
    from mechedit.diagnose.probes import residuals

    m, tok, w = tiny_bundle.model, tiny_bundle.tokenizer, tiny_bundle.world
    prompts, answers = probes_of(tiny_bundle, ("cloze",))
    facts = w.train_facts[:3]
    runs = {}
    for prec in ("float32", "bfloat16"):
        use_precision(prec)
        with AutocastSeen(m) as seen:
            mia = mia_scores(m, tok, prompts[:6], answers[:6])
            states, _, _ = residuals(m, tok, w, facts)
            top_predictions(m, tok, prompts[:3])
        runs[prec] = (seen, mia, states)
    assert runs["float32"][0] == [False] * 3 and runs["bfloat16"][0] == [True] * 3
    for prec, (_, mia, states) in runs.items():  # the math after the forward stays fp64 / fp32
        assert all(v.dtype == np.float64 for d in mia.values() for v in d.values())
        assert all(v.dtype == np.float32 for v in states.values())
    a, b = runs["float32"][1]["answer"]["loss"], runs["bfloat16"][1]["answer"]["loss"]
    assert 0 < np.abs(a - b).max() < 0.25


def test_training_and_stopping_rules_stay_fp32(tiny_bundle):
    from mechedit.model.evaluate import evaluate_recall

    use_precision("bfloat16")
    with AutocastSeen(tiny_bundle.model) as seen:
        evaluate_recall(tiny_bundle.model, tiny_bundle.tokenizer, tiny_bundle.world, kinds=("cloze",))
    assert seen and not any(seen)


def test_diagnostics_memo_is_keyed_by_precision(tiny_bundle):
    from mechedit.diagnose.cache import memo

    calls = []
    for prec in ("float32", "bfloat16", "float32"):
        use_precision(prec)
        memo("test-precision", tiny_bundle.model, ("k",), lambda p=prec: calls.append(p) or p)
    assert calls == ["float32", "bfloat16"]


def test_trace_precision_follows_the_process(tiny_bundle):
    from mechedit.trace import trace

    f = tiny_bundle.world.train_facts[:4]
    kw = dict(sites=("mlp",), samples=2)
    a = trace(tiny_bundle, f, **kw)
    use_precision("bfloat16")
    b = trace(tiny_bundle, f, **kw)
    c = trace(tiny_bundle, f, precision="float32", **kw)
    use_precision("auto")
    d = trace(tiny_bundle, f, **kw)
    assert (a.config["precision"], b.config["precision"], c.config["precision"], d.config["precision"]) == \
        ("float32", "bfloat16", "float32", "float32")  # auto: tracing stays fp32 (README)
    diff = np.abs(a.p_restored["mlp"] - b.p_restored["mlp"]).max()
    assert 0 < diff < 0.2
    assert np.array_equal(a.p_restored["mlp"], c.p_restored["mlp"])


def test_cli_records_precision(tiny_bundle, tiny_checkpoint, tmp_path):
    subject = tiny_bundle.world.subjects[tiny_bundle.world.train_facts[0].subject].name
    r = invoke("trace", tiny_checkpoint, "--fact", f"{subject}|capital", "--samples", "1", "--sites", "mlp",
               "--precision", "bfloat16", "-o", tmp_path / "t")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "t" / "spec.json").read_text())["precision"] == "bfloat16"
    r = invoke("diagnose", tiny_checkpoint, tiny_checkpoint, "--forget", f"subject:{subject}", "-s", "forget",
               "--precision", "bfloat16", "-o", tmp_path / "d")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "d" / "scorecard.json").read_text())["_meta"]
    assert meta["device"] == "cpu" and meta["precision"]["asked"] == "bfloat16"
    assert meta["precision"]["scoring"] == "bfloat16"
    r = invoke("diagnose", tiny_checkpoint, tiny_checkpoint, "--forget", f"subject:{subject}", "-s", "forget",
               "-o", tmp_path / "d32")
    assert json.loads((tmp_path / "d32" / "scorecard.json").read_text())["_meta"]["precision"]["scoring"] == "float32"
    fp32, bf16 = (json.loads((tmp_path / d / "scorecard.json").read_text())["forget"] for d in ("d32", "d"))
    assert fp32 != bf16  # the option reached the scores (the logprob figures move a little)


def test_run_records_precision_and_refuses_to_mix(tiny_checkpoint, tmp_path, monkeypatch):
    import mechedit.analysis.runner as runner

    real = runner.executor

    def fresh_workers(name):  # each case as in a new worker process, which starts in fp32
        run = real(name)

        def go(cases, ctx, workers=None, **kw):
            for c in cases:
                use_precision("float32")
                yield from run([c], ctx, workers, **kw)
        return go

    monkeypatch.setattr(runner, "executor", fresh_workers)
    spec = tmp_path / "a.json"
    spec.write_text(json.dumps({
        "name": "prec", "precision": "bfloat16", "model": {"checkpoint": str(tiny_checkpoint)},
        "requests": {"one": {"relation": "capital", "n": 1}},
        "grid": [{"method": "finetune", "layers": [0], "params": {"steps": 1}}],
        "diagnostics": {"suites": ["edit"], "options": {"n_unrelated": 5, "n_retain": 5}}}))
    r = invoke("run", spec, "--workers", "1", "-o", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "run" / "spec.json").read_text())
    assert rec["precision"]["asked"] == "bfloat16" and rec["precision"]["scoring"] == "bfloat16"
    timing = json.loads(next((tmp_path / "run").glob("case_*.timing.json")).read_text())
    assert timing["precision"]["scoring"] == "bfloat16"  # what the case was scored in, not the worker's default
    r = invoke("run", spec, "--workers", "1", "--precision", "float32", "-o", tmp_path / "run")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "precision" in r.stderr
    r = invoke("report", tmp_path / "run", "-o", tmp_path / "rep")
    assert r.returncode == 0, r.stderr
    assert "inference in bfloat16" in (tmp_path / "rep" / "index.html").read_text()
