"""World generator: determinism, structure invariants, probes, corpus, tokenizer, spec validation."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from mechedit.errors import MecheditError, SpecError
from mechedit.world import (CorrelatedSpec, CyclicSpec, NestedSpec, RelationSpec, WorldSpec, default_world_spec,
                            generate_world, tiny_world_spec)
from mechedit.world.tokenizer import build_tokenizer


def test_same_spec_gives_byte_identical_world(tmp_path):
    a = generate_world(default_world_spec()).save(tmp_path / "a")
    b = generate_world(default_world_spec()).save(tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()
    c = generate_world(dataclasses.replace(default_world_spec(), seed=1)).save(tmp_path / "c")
    assert a.read_bytes() != c.read_bytes()


def test_world_round_trips_through_json(tmp_path):
    w = generate_world(tiny_world_spec())
    w.save(tmp_path)
    w2 = type(w).load(tmp_path)
    assert w2.to_dict() == w.to_dict()
    assert w2.corpus() == w.corpus()


def test_correlation_matches_p_within_sampling_error():
    spec = WorldSpec(seed=3, n_subjects=2000, relations=(RelationSpec("a", 10), RelationSpec("b", 10)),
                     correlated=(CorrelatedSpec("a", "b", 0.6),), syllables=(2, 3))
    w = generate_world(spec)
    val = {(f.subject, f.relation): f.object for f in w.facts}
    main = [s.id for s in w.subjects if s.kind == "subject"]
    same = np.mean([val[(s, "a")] == val[(s, "b")] for s in main])
    se = np.sqrt(0.6 * 0.4 / len(main))
    assert abs(same - 0.6) < 4 * se
    assert w.relation("b").objects == w.relation("a").objects


def test_nested_facts_are_consistent():
    w = generate_world(default_world_spec())
    mapping = w.nested_maps["country"]
    val = {(f.subject, f.relation): f.object for f in w.facts}
    for s in w.subjects:
        if s.kind == "subject":
            assert val[(s.id, "country")] == mapping[val[(s.id, "capital")]]
    # object -> nested-object facts are written, one per parent object
    obj_facts = [f for f in w.facts if w.subjects[f.subject].kind == "object"]
    assert {w.subjects[f.subject].name: f.object for f in obj_facts} == mapping
    assert set(mapping) == set(w.relation("capital").objects)
    assert set(mapping.values()) == set(w.relation("country").objects)  # every group is non-empty


def test_cyclic_relations_are_k_hop_steps():
    w = generate_world(default_world_spec())
    order = w.rings["ring"]
    n = len(order)
    name = {i: w.subjects[i].name for i in order}
    val = {(f.subject, f.relation): f.object for f in w.facts}
    for i, sid in enumerate(order):
        for h in (1, 2):
            assert val[(sid, f"ring_cw{h}")] == name[order[(i + h) % n]]
            assert val[(sid, f"ring_ccw{h}")] == name[order[(i - h) % n]]


def test_names_mix_aliases_and_heldout_subjects():
    w = generate_world(default_world_spec())
    main = [s for s in w.subjects if s.kind == "subject"]
    lengths = {len(s.name.split()) for s in main}
    assert lengths == {1, 2, 3}
    assert len({s.name for s in main}) == len(main)
    assert sum(s.alias is not None for s in main) == round(0.3 * len(main))
    assert sum(s.heldout for s in main) == round(0.1 * len(main))
    words = set(w.vocabulary())
    assert "<refuse>" in words and len(words) == len(w.vocabulary())


def test_heldout_template_and_subjects_never_in_corpus():
    w = generate_world(tiny_world_spec())
    corpus = set(w.corpus())
    for f in w.facts:
        para = f"{w.prompt(f, f.heldout_template)} {f.object}"
        assert para not in corpus
        if w.subjects[f.subject].heldout:
            for t in range(-1, w.n_templates):
                for lang in "ab":
                    assert f"{w.prompt(f, t, lang=lang)} {f.object}" not in corpus
    # aliases and the second language appear in training
    assert any(w.prompt(f, t, lang="b") + " " + f.object in corpus for f in w.train_facts for t in range(4))
    alias_subjects = [s for s in w.subjects if s.alias and not s.heldout]
    assert any(s.alias in line for s in alias_subjects for line in corpus)


def test_excluding_facts_leaves_the_rest_of_the_corpus_unchanged():
    w = generate_world(tiny_world_spec())
    drop = {w.train_facts[0].index, w.train_facts[5].index}
    full, reduced = w.corpus(), w.corpus(exclude_facts=drop)
    kept = set(reduced)
    dropped = [s for s in full if s not in kept]
    assert len(dropped) >= 2 * (w.n_templates - 1 + 1)
    forms = set()
    for i in drop:
        f = w.facts[i]
        names = [w.subjects[f.subject].name] + ([w.subjects[f.subject].alias] if w.subjects[f.subject].alias else [])
        forms |= {f"{w.prompt(f, t, lang=lang, name=n)} {f.object}" for t in range(-1, w.n_templates)
                  for lang in "ab" for n in names}
    assert set(dropped) <= forms
    assert [s for s in full if s in kept] == reduced


def test_probe_sets_cover_every_fact():
    w = generate_world(tiny_world_spec())
    probes = w.probes()
    kinds = {p.kind for p in probes}
    assert kinds == {"cloze", "paraphrase", "qa", "alias", "crossling"}
    n_cloze = sum(p.kind == "cloze" for p in probes)
    assert n_cloze == len(w.facts) * (w.n_templates - 1)
    for p in probes:
        assert p.answer == w.facts[p.fact].object


def test_tokenizer_one_token_per_word_and_loads_with_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    w = generate_world(tiny_world_spec())
    tok = build_tokenizer(w)
    tok.save_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    for line in w.corpus()[:50]:
        ids = tok2(line)["input_ids"]
        assert ids[0] == tok2.bos_token_id
        assert len(ids) == len(line.split()) + 1
        assert tok2.unk_token_id not in ids
        assert ids == tok(line)["input_ids"]


@pytest.mark.parametrize("bad, message", [
    ({"relations": []}, "at least one relation"),
    ({"bogus": 1}, "unknown key 'bogus'"),
    ({"n_subjects": 100000, "syllables": [1, 1]}, "name generator"),
    ({"correlated": [{"source": "a", "target": "b", "p": 1.5}]}, "p must be in [0, 1]"),
    ({"relations": [{"name": "a", "n_objects": 1}]}, "n_objects"),
    ({"n_subjects": "many"}, "expected an integer"),
])
def test_bad_specs_raise_clear_errors(bad, message):
    base = {"seed": 0, "n_subjects": 20, "relations": [{"name": "a", "n_objects": 5}, {"name": "b", "n_objects": 5}]}
    with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        generate_world(WorldSpec.from_dict({**base, **bad}))


def test_unknown_fact_lookup_is_a_clear_error():
    w = generate_world(tiny_world_spec())
    with pytest.raises(MecheditError, match="unknown subject"):
        w.parse_fact("nobody|capital")
    with pytest.raises(MecheditError, match="unknown relation"):
        w.parse_fact(f"{w.subjects[0].name}|nothing")
    with pytest.raises(MecheditError, match="SUBJECT\\|RELATION"):
        w.parse_fact("no-bar")


def test_shipped_default_world_file_matches_the_embedded_default():
    from pathlib import Path

    path = Path(__file__).parent.parent / "analyses" / "worlds" / "default.toml"
    assert WorldSpec.from_file(path) == default_world_spec()


def test_tokenizer_is_a_function_of_the_world_content(tmp_path):
    """A world generated now and the same world loaded back from world.json give the same token ids
    (the second language's function words once came out in another order: 11 ids differed)."""
    from mechedit.world import World

    for spec in (default_world_spec(), tiny_world_spec(3)):
        fresh = generate_world(spec)
        fresh.save(tmp_path)
        loaded = World.load(tmp_path)
        a, b = build_tokenizer(fresh), build_tokenizer(loaded)
        assert a.get_vocab() == b.get_vocab()
        a.save_pretrained(tmp_path / "a")
        b.save_pretrained(tmp_path / "b")
        assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_spec_values_are_checked_by_type_and_range():
    base = {"seed": 1, "relations": [{"name": "a"}, {"name": "b"}]}
    for key, value, message in (("n_subjects", 10**18, "limit of 1,000,000"), ("seed", 10**20, "limit of"),
                                ("seed", -1, "below the limit"), ("alias_share", float("inf"), "not a finite"),
                                ("word_reuse", float("nan"), "not a finite"), ("n_subjects", True, "integer"),
                                ("name_words", [0.9, 0.9, 0.9], "sum to 1"), ("n_subjects", 600_000, "facts")):
        with pytest.raises(SpecError, match=message):
            WorldSpec.from_dict({**base, key: value})
    with pytest.raises(SpecError, match="not a finite"):  # built in code, not parsed: checked all the same
        generate_world(dataclasses.replace(tiny_world_spec(), alias_share=float("nan")))
