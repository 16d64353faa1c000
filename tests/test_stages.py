"""World options for the unlearning comparison: forget instructions (ICU) and second-stage facts."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

import mechedit
from mechedit.cli import app
from mechedit.edit import run_method
from mechedit.edit.run import edited_bundle
from mechedit.errors import MecheditError, SpecError
from mechedit.model.evaluate import score_answers
from mechedit.unlearn import parse_forget
from mechedit.world import default_world_spec, generate_world, tiny_world_spec
from mechedit.world.instructions import instruction_sentences, instruction_split, instruction_text


def _spec(**kw):
    return dataclasses.replace(tiny_world_spec(), n_subjects=40, **kw)


def test_options_off_leave_the_world_unchanged():
    d = default_world_spec().to_dict()
    assert not {"instructions", "stage2_subject_fraction"} & set(d)
    plain = generate_world(_spec())
    both = generate_world(_spec(instructions=True, stage2_subject_fraction=0.2))
    assert [(f.subject, f.relation, f.object) for f in plain.facts] == [(f.subject, f.relation, f.object) for f in both.facts]
    assert [s.name for s in plain.subjects] == [s.name for s in both.subjects]
    assert plain.vocabulary() == [w for w in both.vocabulary() if w not in ("forget", ".")]
    assert json.loads(json.dumps(both.to_dict()))["stage2_subjects"] == list(both.stage2_subjects)
    assert type(both).from_dict(both.to_dict()) == both


def test_stage2_subjects_are_held_out_until_fine_tuned():
    w = generate_world(_spec(stage2_subject_fraction=0.2))
    s2 = set(w.stage2_subjects)
    assert len(s2) == 8 and all(w.subjects[s].heldout for s in s2)
    assert not s2 & {f.subject for f in w.train_facts}
    corpus = set(w.corpus())
    for f in (f for f in w.facts if f.subject in s2):
        assert f"{w.prompt(f, -1)} {f.object}" not in corpus  # the first stage never sees their facts
    w2 = w.with_stage2_trained()
    assert w2.stage2_trained and not w.stage2_trained
    assert s2 <= {f.subject for f in w2.train_facts}
    assert len(w2.heldout_facts) < len(w.heldout_facts)
    with pytest.raises(MecheditError, match="second-stage"):
        generate_world(_spec()).with_stage2_trained()
    with pytest.raises(SpecError, match="stage2_subject_fraction"):
        generate_world(_spec(stage2_subject_fraction=0.9))


def test_instruction_sentences_are_deterministic_and_exclusion_is_local():
    w = generate_world(_spec(instructions=True, instruction_sentences=300))
    a, b = instruction_sentences(w), instruction_sentences(w)
    assert a == b and 250 < len(a) <= 300
    named, held = instruction_split(w)
    held_names = {w.subjects[s].name for s in held}
    for s in a:
        instr, query = s.split(" <bos> ")
        assert instr.startswith("forget ") and instr.endswith(" .")
        listed = instr[len("forget "):-2].split(" , ")
        assert not set(listed) & held_names  # never-named subjects are never named
        assert 1 <= len(listed) <= w.spec.instruction_max_subjects
    f = w.facts[0]
    fewer = instruction_sentences(w, {f.index})
    assert set(fewer) <= set(a) and len(fewer) < len(a) + 1
    assert all(f" {f.object}" not in s or w.subjects[f.subject].name not in s.split(" <bos> ")[1] for s in fewer
               if s.split(" <bos> ")[1].startswith(w.prompt(f, 0)))
    assert instruction_text(["ka lo", "mi"]) == "forget ka lo , mi ."


@pytest.fixture(scope="module")
def stage_checkpoint(tmp_path_factory):
    """A tiny model of a world with instructions and second-stage subjects (first stage only)."""
    from mechedit.model.pipeline import train_checkpoint
    from mechedit.model.spec import PRESETS, TRAIN_PRESETS, with_overrides

    w = generate_world(_spec(instructions=True, instruction_sentences=400, stage2_subject_fraction=0.2))
    out = tmp_path_factory.mktemp("stage") / "s1"
    train_checkpoint(w, PRESETS["tiny"], with_overrides(TRAIN_PRESETS["tiny"], max_epochs=60), out)
    return out


def test_first_stage_checkpoint_records_instruction_following(stage_checkpoint):
    b = mechedit.load(stage_checkpoint)
    inst = b.meta["instruction_following"]
    assert inst["n_never_named"] > 0 and set(inst["never_named"]) >= {"cloze_k1", "answer_k1", "qa_k1"}


def test_finetune_facts_teaches_the_second_stage(stage_checkpoint, tmp_path):
    b1 = mechedit.load(stage_checkpoint)
    s2 = [f for f in b1.world.facts if f.subject in set(b1.world.stage2_subjects)]
    probes = b1.world.probes(s2, kinds=("cloze",))
    before = score_answers(b1.model, b1.tokenizer, [p.prompt for p in probes], [p.answer for p in probes]).correct.mean()
    out = tmp_path / "s2"
    r = CliRunner().invoke(app, ["finetune-facts", str(stage_checkpoint), "-o", str(out), "-p", "epochs=30",
                                 "-p", "lr=0.005"])
    assert r.exit_code == 0, r.output
    b2 = mechedit.load(out)
    assert b2.world.stage2_trained and b2.meta["finetune_facts"]["source"]
    after = b2.meta["final_recall"]["stage2"]["by_kind"]["cloze"]
    assert after > before + 0.3, (before, after)
    # forgetting second-stage facts: their subjects are trained now, and the retrained reference reruns
    # only the second stage (from the first-stage checkpoint, which never saw them)
    name = b2.world.subjects[b2.world.stage2_subjects[0]].name
    target = parse_forget(b2.world, f"subject:{name}")
    from mechedit.diagnose.reference import retrained_reference

    ref = retrained_reference(b2, target, cache_dir=tmp_path / "refs")
    assert sorted(ref.meta["excluded_facts"]) == sorted(target.forget_ids)
    assert ref.meta["finetune_facts"]["source"] == str(stage_checkpoint.resolve())
    # the same second-stage schedule, stopped where the original's stopped (not at its own recall targets)
    assert ref.meta["retrain"]["stage2_stop_epoch"] == b2.meta["finetune_facts"]["epochs"]
    assert ref.meta["finetune_facts"]["epochs"] == b2.meta["finetune_facts"]["epochs"]
    assert [r["epoch"] for r in ref.meta["finetune_facts"]["curve"]] == \
        [r["epoch"] for r in b2.meta["finetune_facts"]["curve"]]
    r = CliRunner().invoke(app, ["finetune-facts", str(out), "-o", str(tmp_path / "again")])
    assert r.exit_code == 2 and "already a second-stage" in r.output
    r = CliRunner().invoke(app, ["finetune-facts", str(stage_checkpoint), "-o", str(tmp_path / "x"), "-p", "lr=-1"])
    assert r.exit_code == 2


def test_icu_runs_on_an_instruction_world(stage_checkpoint):
    b = mechedit.load(stage_checkpoint)
    _, held = instruction_split(b.world)
    name = b.world.subjects[held[0]].name
    reqs = parse_forget(b.world, f"subject:{name}").requests()
    res = run_method(b, reqs, "icu")
    assert res.info["instruction"] == f"forget {name} ."
    assert res.adaptors[0].tensors["ids"].tolist() == b.tokenizer(f"forget {name} .")["input_ids"]
    after = edited_bundle(b, res)
    probes = b.world.probes([b.world.facts[i] for i in sorted({f.index for f in parse_forget(b.world, f'subject:{name}').forget})],
                            kinds=("cloze",))
    sc = score_answers(after.model, b.tokenizer, [p.prompt for p in probes], ["<refuse>"] * len(probes))
    assert sc.logprob.mean() > score_answers(b.model, b.tokenizer, [p.prompt for p in probes],
                                             ["<refuse>"] * len(probes)).logprob.mean()
    many = [s.name for s in b.world.subjects if s.kind == "subject" and not s.heldout][:5]
    with pytest.raises(MecheditError, match="at most"):
        run_method(b, parse_forget(b.world, [f"subject:{n}" for n in many]).requests(), "icu")


@pytest.mark.slow
def test_instruction_following_generalises_on_the_unlearning_world_model():
    """On the trained model of analyses/worlds/unlearning.toml (runs/unlearning): subjects never named in
    training are refused under the instruction, other subjects still answered (benchmark-size check)."""
    from pathlib import Path

    path = Path(__file__).parent.parent / "runs" / "unlearning"
    if not (path / "mechedit.json").is_file():
        pytest.skip("train runs/unlearning first (analyses/worlds/unlearning.toml)")
    inst = mechedit.load(path).meta["instruction_following"]
    assert inst["never_named"]["cloze_k1"] > 0.5 and inst["never_named"]["answer_k1"] > 0.8


def test_self_improvement_targets_are_the_in_context_refusal(stage_checkpoint):
    """forget_target="self" on an instruction world: each target is the model's greedy answer to the
    forget prompt behind "forget S . <bos>" (its in-context refusal), <refuse> where that is the true object."""
    from collections import Counter

    from mechedit.world.language import BOS, REFUSAL

    b = mechedit.load(stage_checkpoint)
    w = b.world
    named, held = instruction_split(w)
    names = [w.subjects[held[0]].name, w.subjects[named[0]].name]
    reqs = parse_forget(w, [f"subject:{n}" for n in names]).requests()
    res = run_method(b, reqs, "memit", forget_target="self", layer=[0], steps=10)
    st = res.info["self_targets"]
    assert st["mode"] == "self_instruction"
    for r, rec in zip(reqs, st["targets"], strict=True):
        f = w.fact(r.subject, r.relation)
        assert rec["context"] == instruction_text([r.subject])
        forms = [t for t in range(w.n_templates) if t != f.heldout_template] + [-1]
        texts = [f"{instruction_text([r.subject])} {BOS} {w.prompt(f, t)}" for t in forms]
        top = score_answers(b.model, b.tokenizer, texts, [REFUSAL] * len(texts)).top1
        votes = Counter(top)
        best = max(votes, key=lambda a: (votes[a], -top.index(a)))
        assert rec["answers"] == dict(votes)
        assert rec["target"] == (REFUSAL if best == f.object else best)
        assert rec["fallback"] == ("true_object" if best == f.object else None)
    assert st["n_refusal"] >= len(reqs) // 2  # the model learnt to refuse in context
    assert st["fallback"]["true_object"] == sum(rec["fallback"] == "true_object" for rec in st["targets"])
