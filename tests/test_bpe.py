"""Sub-word (BPE) worlds: a deterministic tokenizer, and every token position of the suite token-span-correct."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mechedit.edit import EditRequest, run_method
from mechedit.edit.common import build_batch
from mechedit.edit.run import edited_bundle
from mechedit.model.evaluate import score_answers
from mechedit.world import generate_world, tiny_world_spec
from mechedit.world.tokenizer import build_tokenizer, subject_token_span, word_token_spans

ROOT = Path(__file__).resolve().parent.parent

_BUILD = """
import sys
sys.path.insert(0, {tests!r})
from conftest import tiny_bpe_world_spec
from mechedit.world import generate_world
from mechedit.world.tokenizer import build_tokenizer
build_tokenizer(generate_world(tiny_bpe_world_spec())).save_pretrained(sys.argv[1])
"""


def test_bpe_tokenizer_is_byte_identical_across_processes(tmp_path):
    # a fresh process each: the tokenizers library's hash maps are seeded per process
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-c", _BUILD.format(tests=str(ROOT / "tests")), str(tmp_path / name)],
                       check=True, cwd=ROOT)
    a, b = (tmp_path / "a" / "tokenizer.json").read_bytes(), (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert a == b


def test_bpe_splits_names_and_loads_with_autotokenizer(tiny_bpe_world, tmp_path):
    from transformers import AutoTokenizer

    tok = build_tokenizer(tiny_bpe_world)
    assert len(tok) == tiny_bpe_world.spec.bpe_vocab_size
    tok.save_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    main = [s for s in tiny_bpe_world.subjects if s.kind == "subject"]
    pieces = [len(tok(s.name, add_special_tokens=False)["input_ids"]) - len(s.name.split()) for s in main]
    assert np.mean(pieces) > 1  # names really are split into sub-word pieces
    assert max(len(tok(o, add_special_tokens=False)["input_ids"]) for o in tiny_bpe_world.objects) > 1
    for line in tiny_bpe_world.corpus()[:50] + [p.prompt for p in tiny_bpe_world.probes()[:50]]:
        ids = tok2(line)["input_ids"]
        assert ids == tok(line)["input_ids"]
        assert ids[0] == tok2.bos_token_id and tok2.unk_token_id not in ids
        assert tok2.decode(ids[1:]) == line
        # prompt + answer tokenised apart = tokenised together (what answer scoring relies on)
        words = line.split()
        head, tail = " ".join(words[:-1]), words[-1]
        assert tok(head)["input_ids"] + tok(tail, add_special_tokens=False)["input_ids"] == ids


@pytest.mark.parametrize("bpe", [False, True])
def test_subject_token_span_is_the_name(bpe, tiny_world, tiny_bpe_world):
    world = tiny_bpe_world if bpe else tiny_world
    tok = build_tokenizer(world)
    n_multi = 0
    for p in world.probes(kinds=("cloze", "qa")):
        f = world.facts[p.fact]
        name = world.subjects[f.subject].name
        ids, (a, b) = subject_token_span(tok, world, p.prompt, f)
        assert tok.decode(ids[a:b]) == name
        assert tok(name, add_special_tokens=False)["input_ids"] == ids[a:b]
        if not bpe:  # one token per word: the word span shifted by <bos>
            w = world.subject_span(p.prompt.split(), f)
            assert (a, b) == (w[0] + 1, w[1] + 1)
        n_multi += (b - a) > len(name.split())
    assert (n_multi > 0) == bpe
    # words and their token spans tile the tokens after <bos>
    ids, spans = word_token_spans(tok, p.prompt)
    assert spans[0][0] == 1 and spans[-1][1] == len(ids)
    assert all(s[1] == t[0] for s, t in zip(spans, spans[1:]))


def test_prepare_fact_spans_every_name_token(tiny_bpe_bundle):
    from mechedit.trace.api import prepare_fact

    b = tiny_bpe_bundle
    for f in b.world.train_facts[:40]:
        p = prepare_fact(b.world, b.tokenizer, f)
        a, e = p.subject
        assert b.tokenizer.decode(list(p.ids[a:e])) == b.world.subject_of(f).name
        assert p.answer_id == b.tokenizer(f.object, add_special_tokens=False)["input_ids"][0]
        assert p.n_tokens == len(b.tokenizer(p.prompt)["input_ids"])


def test_trace_runs_on_a_bpe_model(tiny_bpe_bundle):
    from mechedit.trace import trace
    from mechedit.trace.result import category_positions

    r = trace(tiny_bpe_bundle, [f.index for f in tiny_bpe_bundle.world.train_facts[:6]], sites=("mlp", "attn"),
              samples=3)
    assert r.n_facts > 0
    ie = r.indirect_effect("mlp")
    for i, d in enumerate(r.facts):
        a, e = d["subject_span"]
        assert e - a == len(tiny_bpe_bundle.tokenizer(d["subject"], add_special_tokens=False)["input_ids"])
        # before the subject nothing is corrupted, so restoring there changes nothing
        assert np.allclose(ie[i, :, :a], 0.0, atol=1e-6)
        assert category_positions(len(d["tokens"]), (a, e))["last_subject"] == [e - 1]


def test_edit_batch_teacher_forces_every_token_of_the_new_object(tiny_bpe_bundle):
    b = tiny_bpe_bundle
    tok = b.tokenizer
    f = next(f for f in b.world.train_facts if b.world.subjects[f.subject].kind == "subject"
             and len(b.world.subjects[f.subject].name.split()) > 1)
    new = max((o for o in b.world.relation(f.relation).objects if o != f.object),
              key=lambda o: len(tok(o, add_special_tokens=False)["input_ids"]))
    new_ids = tok(new, add_special_tokens=False)["input_ids"]
    assert len(new_ids) > 1
    req = EditRequest(b.world.subject_of(f).name, f.relation, new)
    batch = build_batch(b, [req], ["", "the color of"])
    rows, pos, tgt = batch.answers()
    assert len(tgt) == len(new_ids) * len(batch.last)
    for r in range(len(batch.last)):
        m = rows == r
        assert tgt[m].tolist() == new_ids
        assert pos[m].tolist() == list(range(int(batch.last[r]), int(batch.last[r]) + len(new_ids)))
        seq = batch.ids[r][batch.mask[r].bool()].tolist()
        assert seq[int(batch.last[r]) + 1:] == new_ids[:-1]  # teacher forcing: all but the last token
        # the subject's last token is the last piece of its name
        name_ids = tok(req.subject, add_special_tokens=False)["input_ids"]
        s = int(batch.subj[r])
        assert seq[s - len(name_ids) + 1: s + 1] == name_ids
    ess = build_batch(b, [req], [""], essence=True, essence_kind="relations")
    assert len(ess.answers()[0]) == 0


def test_rome_edits_a_multi_token_object_on_a_bpe_model(tiny_bpe_bundle):
    """New objects that start with the old object's first token: only a loss over every token of the
    new object (not its first token alone) has anything to change."""
    b = tiny_bpe_bundle
    tok = b.tokenizer
    gains, hits = [], []
    for f in b.world.train_facts:
        if b.world.subjects[f.subject].kind != "subject":
            continue
        old = tok(f.object, add_special_tokens=False)["input_ids"]
        new = next((o for o in b.world.relation(f.relation).objects if o != f.object
                    and len(tok(o, add_special_tokens=False)["input_ids"]) > 1
                    and tok(o, add_special_tokens=False)["input_ids"][0] == old[0]), None)
        if new is None:
            continue
        req = EditRequest(b.world.subject_of(f).name, f.relation, new)
        prompt = b.world.prompt(f, next(t for t in range(b.world.n_templates) if t != f.heldout_template))
        before = score_answers(b.model, tok, [prompt], [new])
        after = score_answers(edited_bundle(b, run_method(b, [req], "rome", layer=0)).model, tok, [prompt], [new])
        assert not before.correct[0]
        gains.append(after.logprob[0] - before.logprob[0])
        hits.append(after.correct[0])
        if len(hits) == 4:
            break
    assert len(hits) == 4
    assert np.mean(gains) > 3.0 and sum(hits) >= 3


def test_probe_residual_positions_on_bpe(tiny_bpe_bundle):
    from mechedit.diagnose.probes import residuals
    from mechedit.unlearn.loop import capture_layer

    b = tiny_bpe_bundle
    facts = b.world.train_facts[:3]
    states, labels, idx = residuals(b.model, b.tokenizer, b.world, facts)
    probes = b.world.probes(facts, kinds=("cloze",))
    for i, p in enumerate(probes):
        ids, (_, e) = subject_token_span(b.tokenizer, b.world, p.prompt, b.world.facts[p.fact])
        with capture_layer(b.model, 0) as cap, torch.no_grad():
            b.model(input_ids=torch.tensor([ids]))
        assert np.allclose(states["subject_last"][i, 0], cap["h"][0, e - 1].numpy(), atol=1e-5)
        assert np.allclose(states["prompt_last"][i, 0], cap["h"][0, len(ids) - 1].numpy(), atol=1e-5)


def test_unlearning_masks_from_the_first_name_token_on_bpe(tiny_bpe_bundle):
    from mechedit.unlearn.loop import build_data

    b = tiny_bpe_bundle
    f = next(f for f in b.world.train_facts if b.world.subjects[f.subject].kind == "subject")
    data = build_data(b, [EditRequest(b.world.subject_of(f).name, f.relation, "<refuse>")])
    name_ids = b.tokenizer(b.world.subject_of(f).name, add_special_tokens=False)["input_ids"]
    for prompt, start in zip(data.forget_prompts, data.forget_subject_start):
        ids = b.tokenizer(prompt)["input_ids"]
        assert ids[start:start + len(name_ids)] == name_ids


def test_new_object_outside_the_vocabulary_is_refused(tiny_bpe_bundle, tiny_bundle):
    from mechedit.errors import MecheditError

    for b, bad in ((tiny_bundle, "zzqx"), (tiny_bpe_bundle, "ZZ9")):
        f = b.world.train_facts[0]
        with pytest.raises(MecheditError, match="not in the vocabulary"):
            run_method(b, [EditRequest(b.world.subject_of(f).name, f.relation, bad)], "rome", layer=0)


def _same_first_piece_requests(b, n=4):
    """Requests (one per subject) whose new object has several tokens and starts with the old object's
    first token: an edit that teaches the first token alone leaves the old continuation in place."""
    tok = b.tokenizer
    ids = lambda o: tok(o, add_special_tokens=False)["input_ids"]  # noqa: E731
    out, seen = [], set()
    for f in b.world.train_facts:
        if b.world.subjects[f.subject].kind != "subject" or f.subject in seen:
            continue
        new = next((o for o in b.world.relation(f.relation).objects if o != f.object
                    and len(ids(o)) > 1 and ids(o)[0] == ids(f.object)[0]), None)
        if new is not None:
            seen.add(f.subject)
            out.append(EditRequest(b.world.subject_of(f).name, f.relation, new))
        if len(out) == n:
            return out
    pytest.fail("the tiny BPE world has too few objects sharing a first piece")


@pytest.mark.parametrize("method,params", [("grace", {"steps": 40}), ("wise", {"margin_weight": 0.1})])
def test_adaptor_editors_write_every_token_of_a_multi_token_object(tiny_bpe_bundle, one_thread, method, params):
    """GRACE keys every answer token (the prompt's last token and each teacher-forced piece) and WISE's
    loss covers every token: after the edit every piece of the new object is the argmax on every edit
    prompt. Keyed / trained on the first token only, the old object's continuation wins (0 here)."""
    from mechedit.edit.common import edit_prompts

    b = tiny_bpe_bundle
    reqs = _same_first_piece_requests(b)
    prompts, answers = [], []
    for r in reqs:
        ps = edit_prompts(b.world, r)
        prompts += ps
        answers += [r.new_object] * len(ps)
    assert not score_answers(b.model, b.tokenizer, prompts, answers).correct.any()
    res = run_method(b, reqs, method, **params)
    after = score_answers(edited_bundle(b, res).model, b.tokenizer, prompts, answers)
    assert after.correct.mean() >= 0.9, after.correct
    if method == "grace":  # one query per answer token of every edit prompt
        n_tokens = sum(len(b.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
        assert res.info["n_queries"] == n_tokens
