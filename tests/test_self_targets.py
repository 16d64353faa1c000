"""Self-improvement (Li et al. 2025): editing-as-unlearning targets from the model's own answers."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from typer.testing import CliRunner

from mechedit.cli import app
from mechedit.edit import EditRequest, run_method
from mechedit.edit.common import edit_prompts
from mechedit.edit.run import edited_bundle
from mechedit.edit.self_targets import never_trained_subjects
from mechedit.errors import MecheditError, SpecError
from mechedit.model.evaluate import score_answers
from mechedit.unlearn import parse_forget
from mechedit.world.language import REFUSAL, SPECIAL_TOKENS

pytestmark = pytest.mark.usefixtures("one_thread")


def _forget(world, n=3):
    subs = [s for s in world.subjects if s.kind == "subject" and not s.heldout][:n]
    return parse_forget(world, [f"subject:{s.name}" for s in subs]).requests()


def _forms(world, f):
    return [t for t in range(world.n_templates) if t != f.heldout_template] + [-1]


def _expected(model, tok, world, reqs, records, texts_of):
    """Independently of the module: each fact's top-1 word over its prompts (`texts_of(fact, record)`),
    the majority (ties: the first prompt's), and <refuse> where that is the true object."""
    out = []
    for r, rec in zip(reqs, records):
        f = world.fact(r.subject, r.relation)
        texts = texts_of(f, rec)
        top = score_answers(model, tok, texts, [REFUSAL] * len(texts)).top1  # word level: the top-1 word
        votes = Counter(top)
        best = max(votes, key=lambda a: (votes[a], -top.index(a)))
        out.append((dict(votes), REFUSAL if best == f.object else best))
    return out


def test_heldout_targets_are_the_models_answer_about_a_never_trained_subject(tiny_bundle):
    b = tiny_bundle
    w = b.world
    reqs = _forget(w)
    res = run_method(b, reqs, "rome", layer=0, steps=10, restarts=0, forget_target="self")
    st = res.info["self_targets"]
    assert st["mode"] == "self_heldout" and st["n_facts"] == len(reqs) == len(st["targets"])
    assert [r.new_object for r in res.requests] == [REFUSAL] * len(reqs)  # the requests as asked
    held = {s.name for s in never_trained_subjects(w)}
    forgotten = {r.subject for r in reqs}
    assert all(rec["context"] in held and rec["context"] not in forgotten for rec in st["targets"])
    exp = _expected(b.model, b.tokenizer, w, reqs, st["targets"],
                    lambda f, rec: [w.prompt(f, t, name=rec["context"]) for t in _forms(w, f)])
    for rec, (votes, target) in zip(st["targets"], exp):
        assert rec["answers"] == votes
        assert rec["target"] == target
        f = w.fact(rec["subject"], rec["relation"])
        assert rec["target"] != f.object
        assert (rec["fallback"] == "true_object") == (max(votes, key=votes.get) == f.object)
    assert st["n_fallback"] == sum(rec["fallback"] is not None for rec in st["targets"])
    # the guesses differ from the refusal and from the truth: the edit is not the fixed-refusal edit
    assert sum(rec["target"] != REFUSAL for rec in st["targets"]) >= len(reqs) // 2


def test_self_targets_are_what_the_editor_writes(tiny_bundle):
    """GRACE with self-improvement: the forget prompts answer the chosen targets afterwards."""
    b = tiny_bundle
    reqs = _forget(b.world, 1)
    res = run_method(b, reqs, "grace", forget_target="self_heldout", steps=60)
    targets = [rec["target"] for rec in res.info["self_targets"]["targets"]]
    after = edited_bundle(b, res).model
    prompts, answers = [], []
    for r, t in zip(reqs, targets):
        for q in edit_prompts(b.world, EditRequest(r.subject, r.relation, t), "cloze+qa"):
            prompts.append(q)
            answers.append(t)
    assert score_answers(after, b.tokenizer, prompts, answers).correct.mean() >= 0.9
    assert res.params["forget_target"] == "self_heldout"
    plain = run_method(b, reqs, "grace", steps=5)
    assert "forget_target" not in plain.params and "self_targets" not in plain.info  # the default leaves no trace


def test_heldout_targets_on_bpe_are_whole_words(tiny_bpe_bundle):
    """On a sub-word world a target is the whole greedy word (every piece), not its first token."""
    b = tiny_bpe_bundle
    w, tok = b.world, b.tokenizer
    reqs = _forget(w, 4)
    from mechedit.edit.self_targets import self_targets

    _, st = self_targets(b, reqs, "self_heldout")
    control = set(tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)))
    pieces = 0
    for rec in st["targets"]:
        if rec["fallback"] is not None or rec["target"] == REFUSAL:
            continue
        f = w.fact(rec["subject"], rec["relation"])
        ids = tok(rec["target"], add_special_tokens=False)["input_ids"]
        pieces = max(pieces, len(ids))
        texts = [w.prompt(f, t, name=rec["context"]) for t in _forms(w, f)]
        sc = score_answers(b.model, tok, texts, [rec["target"]] * len(texts))
        said = 0  # prompts whose greedy answer is the target: every piece, and then the word ends
        for text, ok in zip(texts, sc.correct):
            if ok:
                with torch.no_grad():
                    nxt = int(b.model(input_ids=torch.tensor([tok(text)["input_ids"] + ids])).logits[0, -1].argmax())
                said += nxt in control or len(tok.decode(ids + [nxt]).split()) > 1
        assert said == rec["answers"][rec["target"]]
    assert pieces > 1
    assert st["n_not_a_word"] == sum(rec["target"] not in set(w.vocabulary()) for rec in st["targets"])


def test_bad_forget_target_values_are_one_line_errors(tiny_bundle, tiny_checkpoint, tmp_path):
    b = tiny_bundle
    reqs = _forget(b.world, 1)
    with pytest.raises(SpecError, match="forget_target must be one of"):
        run_method(b, reqs, "memit", forget_target="mine")
    with pytest.raises(MecheditError, match="needs a world trained with forget instructions"):
        run_method(b, reqs, "wise", forget_target="self_instruction")
    f = b.world.fact(reqs[0].subject, reqs[0].relation)
    new = next(o for o in b.world.relation(f.relation).objects if o != f.object)
    with pytest.raises(MecheditError, match="editing as unlearning"):
        run_method(b, [EditRequest(reqs[0].subject, reqs[0].relation, new)], "alphaedit", forget_target="self")
    with pytest.raises(MecheditError, match="no parameter 'forget_target'"):
        run_method(b, reqs, "npo", forget_target="self")
    r = CliRunner().invoke(app, ["unlearn", str(tiny_checkpoint), "-m", "rome", "-f", f"subject:{reqs[0].subject}",
                                 "-p", "forget_target=refuse", "-o", str(tmp_path / "u")])
    assert r.exit_code == 2 and "forget_target must be one of" in r.output and "Traceback" not in r.output


def test_analysis_grid_takes_forget_target_on_forget_sets_only(tmp_path, tiny_checkpoint):
    from mechedit.analysis.spec import parse_analysis

    base = {"model": {"checkpoint": str(tiny_checkpoint)},
            "requests": {"f": {"forget": "relation:capital"}, "c": {"kind": "counterfactual", "n": 2}}}
    spec = parse_analysis({**base, "grid": [{"method": "grace", "requests": ["f"],
                                             "params": {"forget_target": ["refusal", "self"]}}]}, tmp_path)
    assert [c.params["forget_target"] for c in spec.cases] == ["refusal", "self"]
    with pytest.raises(SpecError, match="forget_target"):
        parse_analysis({**base, "grid": [{"method": "rome", "requests": ["c"], "params": {"forget_target": "self"}}]},
                       tmp_path)
    with pytest.raises(SpecError, match="forget_target must be one of"):
        parse_analysis({**base, "grid": [{"method": "rome", "requests": ["f"], "params": {"forget_target": "x"}}]},
                       tmp_path)
