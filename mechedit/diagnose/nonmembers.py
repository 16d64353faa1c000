"""Vocabulary-matched non-members for membership inference, and the model-free baselines that check them.

A membership-inference AUC only means "the model remembers these facts" when members and non-members
differ in nothing else. Facts of held-out subjects are true non-members, but a held-out name may
contain a word that never occurs in the training corpus: a model-free count of unseen words then
separates members from non-members (AUC 0.70 on the default world) and the AUC measures "this name
was seen". The design here, on any existing world (generation is unchanged):

1. held-out subjects whose every word occurs in the training corpus (objects come from the relation
   pools, so only name words can be unseen); each contributes its facts of the main relations;
2. if fewer than `min_subjects` remain, synthetic subjects fill up: names with the trained names'
   length distribution built only from words of trained subject names, never equal to any name or
   alias of the world, each given the objects of a randomly drawn trained subject (so the objects
   follow the relation pools and the correlated / nested structure);
3. every text is one fact's first trained cloze sentence + object, the template drawn as for members.

Members are trained main subjects' facts in the same form (`member_text`). `model_free_scores`
gives two scores that need no model: minus the number of words unseen in training, and the mean
log unigram frequency of the text's words in the training corpus; their AUC between members and
these non-members should be ~0.5 (`mia_section` reports it).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from mechedit.world.world import Fact, World


@dataclass(frozen=True)
class MiaText:
    """One fact as a membership-inference text: the prompt and the answer (object) that follows it."""

    key: str  # "f<fact index>" (a world fact) or "x<k>:<relation>" (a synthetic non-member)
    subject: str
    relation: str
    prompt: str
    answer: str

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.answer}"


def first_trained_template(n_templates: int, heldout_template: int) -> int:
    return next(t for t in range(n_templates) if t != heldout_template)


def member_text(world: World, f: Fact) -> MiaText:
    """The fact's first trained cloze sentence (as in the corpus) split into prompt and answer."""
    t = first_trained_template(world.n_templates, f.heldout_template)
    return MiaText(f"f{f.index}", world.subjects[f.subject].name, f.relation, world.prompt(f, t), f.object)


_COUNTS: dict[int, tuple[World, Counter]] = {}  # id(world) -> (world, counts); the world is kept alive


def corpus_counts(world: World) -> Counter:
    """Unigram counts of the world's full training corpus (the original model's), cached per world."""
    hit = _COUNTS.get(id(world))
    if hit is None or hit[0] is not world:
        if len(_COUNTS) >= 8:
            _COUNTS.clear()
        hit = _COUNTS[id(world)] = (world, Counter(w for s in world.corpus() for w in s.split()))
    return hit[1]


def main_relations(world: World) -> list[str]:
    return [r.name for r in world.spec.relations]


def nonmember_texts(world: World, min_subjects: int = 20, seed: int = 0) -> tuple[list[MiaText], dict]:
    """Vocabulary-matched non-member texts (design in the module docstring) and a description with n."""
    counts = corpus_counts(world)
    rels = set(main_relations(world))
    held = [s for s in world.subjects if s.kind == "subject" and s.heldout]
    out: list[MiaText] = []
    kept, dropped = [], []
    for s in held:
        texts = [member_text(world, f) for f in world.facts_of(s.id) if f.relation in rels]
        (kept if all(counts[w] > 0 for t in texts for w in t.text.split()) else dropped).append(s)
        if kept and kept[-1] is s:
            out += [MiaText(t.key, t.subject, t.relation, t.prompt, t.answer) for t in texts]
    n_synth = max(0, min_subjects - len(kept))
    synth_names = []
    if n_synth:
        rng = np.random.default_rng([world.spec.seed, 11, seed])
        trained = [s for s in world.subjects if s.kind == "subject" and not s.heldout]
        words = sorted({w for s in trained for w in s.name.split()})
        lengths = [len(s.name.split()) for s in trained]
        taken = {s.name for s in world.subjects} | {s.alias for s in world.subjects if s.alias}
        for _ in range(n_synth * 1000):
            if len(synth_names) == n_synth:
                break
            k = int(lengths[int(rng.integers(len(lengths)))])
            if k > len(words):
                continue
            name = " ".join(words[int(i)] for i in rng.choice(len(words), size=k, replace=False))
            if name in taken:
                continue
            taken.add(name)
            donor = trained[int(rng.integers(len(trained)))]
            for f in world.facts_of(donor.id):
                if f.relation not in rels:
                    continue
                t = first_trained_template(world.n_templates, int(rng.integers(world.n_templates)))
                out.append(MiaText(f"x{len(synth_names)}:{f.relation}", name, f.relation,
                                   world.prompt(f, t, name=name), f.object))
            synth_names.append(name)
    design = {
        "heldout_subjects_all_words_trained": len(kept),
        "heldout_subjects_dropped_unseen_word": len(dropped),
        "synthetic_subjects": len(synth_names),
        "n_subjects": len(kept) + len(synth_names),
        "n_texts": len(out),
        "min_subjects": min_subjects,
        "rule": "held-out subjects whose every word occurs in the training corpus, filled up to min_subjects "
                "with synthetic names made of trained name words (objects of a random trained subject); "
                "one text per fact (first trained cloze sentence + object)",
    }
    return out, design


def model_free_scores(world: World, texts: list[MiaText], span: str = "sentence") -> dict[str, np.ndarray]:
    """Scores that need no model (higher = more member-like): minus the number of words never seen in
    training, and the mean log unigram frequency (add-one) of the words; over the whole sentence or
    only the answer span."""
    counts = corpus_counts(world)
    total = sum(counts.values())
    unseen, logfreq = [], []
    for t in texts:
        words = (t.text if span == "sentence" else t.answer).split()
        unseen.append(-sum(counts[w] == 0 for w in words))
        logfreq.append(float(np.mean([np.log((counts[w] + 1) / (total + 1)) for w in words])))
    return {"unseen_words": np.array(unseen, dtype=float), "unigram_logfreq": np.array(logfreq)}
