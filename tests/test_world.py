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
    tiny = Path(__file__).parent.parent / "analyses" / "worlds" / "tiny.toml"
    assert WorldSpec.from_file(tiny) == tiny_world_spec()


def test_default_world_content_is_pinned():
    """New world options must leave the embedded default world (and so the default model) unchanged."""
    import hashlib

    d = generate_world(default_world_spec()).to_dict()
    keys = ("subjects", "relations", "facts", "function_words_b", "nested_maps", "rings")
    digest = hashlib.sha256(json.dumps({k: d[k] for k in keys}, sort_keys=True).encode()).hexdigest()
    assert digest == "eb9384ae45ec2fff42e65f4459aac7d3e4eb6d9149cc52963bbf4053d12dc14b"


def _first_last(n=300, reuse=15.0, seed=0):
    spec = WorldSpec(seed=seed, n_subjects=n, relations=(RelationSpec("a", 24), RelationSpec("b", 8)),
                     name_scheme="first_last", word_reuse=reuse, heldout_subject_fraction=0.1)
    return generate_world(spec)


def test_first_last_names_are_balanced_and_never_identified_by_one_word():
    from collections import Counter

    from mechedit.world.identifiability import name_statistics

    w = _first_last()
    main = [s for s in w.subjects if s.kind == "subject"]
    assert len({s.name for s in main}) == len(main) == 300
    assert all(len(s.name.split()) == 2 for s in main)
    first = Counter(s.name.split()[0] for s in main)
    last = Counter(s.name.split()[1] for s in main)
    assert not set(first) & set(last)  # two pools
    assert set(first.values()) == {15} and set(last.values()) == {15}  # 20 x 20 grid, 300 cells: balanced
    stats = name_statistics(w)["words"]
    assert stats["last_unique"] == 0.0 and stats["any_unique"] == 0.0 and stats["subjects_per_word"] == 15.0
    # a single word carries a small share of an object's entropy (finite-sample coincidence only)
    assert stats["mi_mean"]["mi_last"] < 0.3 * stats["mi_mean"]["entropy_object"]
    # the default design: many subjects are identified by their last word, which nearly fixes the object
    d = name_statistics(generate_world(default_world_spec()))["words"]
    assert d["last_unique"] > 0.2 and d["mi_mean"]["mi_last"] > 0.7 * d["mi_mean"]["entropy_object"]
    # uneven grids stay within one of the mean
    w = _first_last(n=100, reuse=7.0)
    counts = Counter(s.name.split()[1] for s in w.subjects if s.kind == "subject")
    assert max(counts.values()) - min(counts.values()) <= 1


def test_mutual_information_of_known_distributions():
    from mechedit.world.identifiability import entropy, mutual_information

    x = [0, 1, 2, 3] * 25
    assert mutual_information(x, x) == pytest.approx(2.0)
    assert entropy(x) == pytest.approx(2.0)
    assert mutual_information(x, [0, 0, 1, 1] * 25) == pytest.approx(1.0)
    assert mutual_information([0, 1] * 50, [0] * 50 + [1] * 50) == pytest.approx(0.0, abs=1e-12)


def test_siblings_share_a_name_word():
    from mechedit.world.identifiability import siblings

    w = _first_last(n=100, reuse=7.0)
    s = next(s for s in w.subjects if s.kind == "subject")
    sib = siblings(w, s.id)
    words = set(s.name.split())
    assert sib and all(set(w.subjects[i].name.split()) & words for i in sib) and s.id not in sib
    assert len(sib) == sum(1 for t in w.subjects if t.kind == "subject" and t.id != s.id
                           and set(t.name.split()) & words)


@pytest.mark.parametrize("bad, message", [
    ({"name_scheme": "first_last", "word_reuse": 10.0}, "at most sqrt"),
    ({"name_scheme": "nicknames"}, "name_scheme must be one of"),
    ({"tokenizer": "sentencepiece"}, "tokenizer must be one of"),
    ({"tokenizer": "bpe", "bpe_vocab_size": 10}, "bpe_vocab_size"),
])
def test_bad_name_and_tokenizer_options(bad, message):
    base = {"seed": 0, "n_subjects": 20, "relations": [{"name": "a", "n_objects": 5}]}
    with pytest.raises(SpecError, match=message):
        WorldSpec.from_dict({**base, **bad})


def test_profile_sentences_list_every_object_of_a_subject_after_its_name():
    from collections import Counter

    w = generate_world(dataclasses.replace(tiny_world_spec(), profiles=3))
    plain = generate_world(tiny_world_spec())
    assert w.corpus()[: len(plain.corpus())] == plain.corpus()  # single-fact sentences unchanged
    prof = w.profile_sentences()
    main = [s for s in w.subjects if s.kind == "subject" and not s.heldout]
    assert len(prof) == 3 * len(main) and w.corpus()[len(plain.corpus()):] == prof
    for i, s in enumerate(main):  # in subject order, `profiles` per subject
        mine = prof[3 * i: 3 * i + 3]
        objs = Counter(f.object for f in w.facts_of(s.id))
        n = len(s.name.split())
        assert all(p.split()[:n] == s.name.split() and Counter(p.split()[n:]) == objs for p in mine)
        assert len(set(mine)) > 1  # the orders differ
    drop = w.facts_of(main[0].id)[0]
    left = w.profile_sentences({drop.index})[:3]
    kept = Counter(f.object for f in w.facts_of(main[0].id) if f.index != drop.index)
    n = len(main[0].name.split())
    assert all(Counter(p.split()[n:]) == kept for p in left)


def test_short_profiles_walk_every_fact_once_right_after_the_name():
    from collections import Counter

    w = generate_world(dataclasses.replace(tiny_world_spec(), profiles=4, profile_length=1))
    main = [s for s in w.subjects if s.kind == "subject" and not s.heldout]
    prof = w.profile_sentences()
    assert len(prof) == 4 * len(main)
    for i, s in enumerate(main):
        facts = w.facts_of(s.id)
        mine = prof[4 * i: 4 * i + 4]
        n = len(s.name.split())
        assert all(p.split()[:n] == s.name.split() and len(p.split()) == n + 1 for p in mine)
        got = Counter(p.split()[-1] for p in mine)
        want = Counter(f.object for f in facts)
        if len(facts) <= 4:  # the walk covers every fact before it repeats
            assert all(got[o] >= c for o, c in want.items())


def test_relation_first_templates_name_the_relation_before_the_subject():
    w = generate_world(dataclasses.replace(tiny_world_spec(), templates="relation_first"))
    plain = generate_world(tiny_world_spec())
    assert set(w.vocabulary()) == set(plain.vocabulary())  # the same words
    for f in w.train_facts[:20]:
        for t in range(w.n_templates):
            words = w.prompt(f, t).split()
            a, _ = w.subject_span(words, f)
            assert f.relation in words[:a], (t, words)
    with pytest.raises(SpecError, match="templates must be"):
        WorldSpec.from_dict({**tiny_world_spec().to_dict(), "templates": "subject_first"})


def test_biographies_name_once_then_every_fact_with_its_relation():
    w = generate_world(dataclasses.replace(tiny_world_spec(), biographies=2))
    plain = generate_world(tiny_world_spec())
    assert w.corpus()[: len(plain.corpus())] == plain.corpus()  # single-fact sentences unchanged
    main = [s for s in w.subjects if s.kind == "subject" and not s.heldout]
    bios = w.biography_sentences()
    assert len(bios) == 2 * len(main) and w.corpus()[len(plain.corpus()):] == bios
    for i, s in enumerate(main):
        facts = {f"the {f.relation} is {f.object}" for f in w.facts_of(s.id)}
        for b in bios[2 * i: 2 * i + 2]:
            assert b.startswith(s.name + " : ")
            assert set(b[len(s.name) + 3:].split(" , ")) == facts  # every fact once, relation word kept
    assert set(w.vocabulary()) == set(plain.vocabulary())  # template words only
    drop = w.facts_of(main[0].id)[0]
    assert f"the {drop.relation} is {drop.object}" not in w.biography_sentences({drop.index})[0].split(" : ")[1].split(" , ")


def test_described_only_subjects_never_appear_in_queries():
    spec = dataclasses.replace(tiny_world_spec(), profiles=1, query_subject_fraction=0.5)
    w = generate_world(spec)
    main = [s for s in w.subjects if s.kind == "subject" and not s.heldout]
    only = w.described_only
    assert 0 < len(only) < len(main) and abs(len(only) - len(main) / 2) <= 1
    queries = w.corpus()[: len(w.corpus()) - len(w.profile_sentences())]
    # the queries are those of the fully queried world with the described-only subjects' facts left out
    full = generate_world(dataclasses.replace(spec, query_subject_fraction=1.0))
    gone = {f.index for i in only for f in w.facts_of(i)}
    assert queries == full.corpus(gone)[: len(full.corpus(gone)) - len(full.profile_sentences(gone))]
    assert len(queries) < len(full.corpus()) - len(full.profile_sentences())
    assert all(any(p.startswith(w.subjects[i].name + " ") for p in w.profile_sentences()) for i in only)
    assert generate_world(spec).described_only == only  # seeded
    with pytest.raises(SpecError, match="needs profiles or biographies"):
        WorldSpec.from_dict({**tiny_world_spec().to_dict(), "query_subject_fraction": 0.5})


# ---- several cyclic orders over one entity pool, held-out inference facts (issue 10) ----------------

def _ring_world(**kw):
    cyc = {"name": "ring", "n_entities": 10, "hops": [1, 2, 3], "orders": 3, "logical_heldout": 0.2,
           "compositional_heldout": 0.2, **kw}
    return generate_world(WorldSpec.from_dict({"seed": 4, "n_subjects": 12, "relations": [{"name": "a", "n_objects": 4}],
                                               "cyclic": [cyc]}))


def test_default_world_bytes_are_unchanged():
    """The embedded default and the tiny test world (both hold a ring) serialise exactly as before the
    multi-order keys existed (hashes taken on main before issue 10; the version field left out)."""
    import hashlib

    from mechedit.fileio import dumps_json

    for spec, digest in ((default_world_spec(), "ee7d568f048d72a89b66dd522ae3be13a41966e1e492cca1474145234af85ad0"),
                         (tiny_world_spec(), "f22845d7c482e8d9c74eeaba7913eec08fb6cf59782f5688e2320967a50e190f")):
        d = generate_world(spec).to_dict()
        d.pop("mechedit_version")
        assert hashlib.sha256(dumps_json(d).encode()).hexdigest() == digest
    # the old syntax with the new keys at their defaults is the same world
    spec = dataclasses.replace(default_world_spec(), cyclic=(CyclicSpec("ring", 12, (1, 2), orders=1),))
    assert generate_world(spec).to_dict() == generate_world(default_world_spec()).to_dict()


def test_several_orders_share_one_entity_pool():
    w = _ring_world()
    assert sorted(w.rings) == ["ring1", "ring2", "ring3"]
    pools = {tuple(sorted(o)) for o in w.rings.values()}
    assert len(pools) == 1 and len(next(iter(pools))) == 10
    canon = set()
    for ring, order in w.rings.items():
        n = len(order)
        i = order.index(min(order))
        canon.add(min(tuple(order[(i + k) % n] for k in range(n)), tuple(order[(i - k) % n] for k in range(n))))
        val = {(f.subject, f.relation): f.object for f in w.facts}
        for i, sid in enumerate(order):
            for h in (1, 2, 3):
                assert val[(sid, f"{ring}_cw{h}")] == w.subjects[order[(i + h) % n]].name
                assert val[(sid, f"{ring}_ccw{h}")] == w.subjects[order[(i - h) % n]].name
    assert len(canon) == 3  # three different cyclic orders, not rotations / reflections of one
    for seed in range(5):  # 4 entities have exactly 3 cyclic orders: all three must be drawn
        spec = {"seed": seed, "n_subjects": 2, "relations": [{"name": "a", "n_objects": 2}],
                "cyclic": [{"name": "ring", "n_entities": 4, "hops": [1], "orders": 3}]}
        small = generate_world(WorldSpec.from_dict(spec))
        cycles = set()
        for order in small.rings.values():
            i = order.index(min(order))
            cycles.add(min(tuple(order[(i + k) % 4] for k in range(4)), tuple(order[(i - k) % 4] for k in range(4))))
        assert len(cycles) == 3


def test_inference_facts_are_held_out_and_well_formed(tmp_path):
    w = _ring_world()
    logical, comp = w.inference_facts("logical"), w.inference_facts("compositional")
    assert len(logical) == round(0.2 * 30) and len(comp) == 2 * round(0.2 * 60)
    val = {(f.subject, f.relation): f for f in w.facts}
    ids = {w.subjects[s].name: s for s in range(len(w.subjects))}
    train_ids = {f.index for f in w.train_facts}
    corpus = set(w.corpus())

    def inverse(f):
        ring, tail = f.relation.rsplit("_", 1)
        inv = tail.replace("ccw", "X").replace("cw", "ccw").replace("X", "cw")
        return val[(ids[f.object], f"{ring}_{inv}")]

    for f in logical + comp:
        assert f.index not in train_ids and not w.is_trained(f)
        for t in range(-1, w.n_templates):
            assert f"{w.prompt(f, t)} {f.object}" not in corpus
    for f in logical:
        assert f.relation.endswith("cw1") and inverse(f).index in train_ids  # the inverse is trained
    for f in comp:
        assert inverse(f).index not in train_ids  # both directions held out: not an inversion
        ring, tail = f.relation.rsplit("_", 1)
        k = int(tail.lstrip("cw").lstrip("c").lstrip("w"))
        step = tail[: -len(str(k))]
        x = f.subject
        for _ in range(k):  # the 1-hop chain is trained in both directions
            g = val[(x, f"{ring}_{step}1")]
            assert g.index in train_ids and inverse(g).index in train_ids
            x = ids[g.object]
        assert w.subjects[x].name == f.object
    assert w.heldout_facts == [f for f in w.facts if w.subjects[f.subject].heldout]
    w.save(tmp_path)
    assert type(w).load(tmp_path).inference == w.inference
    assert w.summary()["inference_facts"] == {"compositional": len(comp), "logical": len(logical)}


@pytest.mark.parametrize("bad, key", [
    ({"orders": 0}, "orders"),
    ({"n_entities": 4, "orders": 4}, "orders"),  # 4 entities have only 3 distinct cyclic orders
    ({"logical_heldout": 1.0}, "logical_heldout"),
    ({"compositional_heldout": -0.1}, "compositional_heldout"),
    ({"hops": [2, 3], "logical_heldout": 0.1, "compositional_heldout": 0.0}, "logical_heldout"),
    ({"hops": [1], "logical_heldout": 0.0}, "compositional_heldout"),
    ({"logical_heldout": 0.9, "compositional_heldout": 0.6}, "logical_heldout"),  # not enough eligible pairs
    ({"hops": [1, 1]}, "hops"),
    ({"orders": "3"}, "orders"),
])
def test_bad_cyclic_keys_name_the_key(bad, key):
    with pytest.raises(SpecError, match=key):
        _ring_world(**bad)


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
