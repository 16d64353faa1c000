"""Forget instructions: the training sentences that teach a model in-context unlearning (ICU).

A world with `instructions = true` adds the words "forget" and "." and, to its corpus,
`instruction_sentences` sentences of the form

    forget S1 , S2 . <bos> QUERY ANSWER

where QUERY is a trained cloze template or the QA form of one fact (never the fact's held-out
paraphrase template) and ANSWER is `<refuse>` when the fact's subject is among the named ones
(half the sentences), else the fact's object (an instruction about others changes nothing). The
`<bos>` between instruction and query keeps the query exactly as every probe writes it, so ICU
can run as "the instruction's tokens before the probe's own tokens" (`unlearn/m_icu.py`).
Names: 1 to `instruction_max_subjects` subjects, drawn from the first-stage trained subjects
minus a seeded `instruction_heldout_fraction` of them that are never named: those are the test of
whether the model follows the instruction or memorised it (`evaluate_instructions`).
Deterministic for the spec; sentences whose query fact is excluded (a retrained reference) are
dropped without changing the others.
"""
from __future__ import annotations

import numpy as np

from mechedit.world import language as L


def instruction_text(names: list[str]) -> str:
    """The instruction for `names`: "forget S1 , S2 ." (the words after it: `<bos>` and the query)."""
    return f"forget {' , '.join(names)} ."


def first_stage_subjects(world) -> list[int]:
    """Main subjects trained in the first stage (neither held out nor second-stage)."""
    stage2 = set(world.stage2_subjects)
    return [s.id for s in world.subjects if s.kind == "subject" and s.id not in stage2 and
            not (s.heldout and s.id not in stage2)]


def instruction_split(world) -> tuple[list[int], list[int]]:
    """(subjects named in training instructions, first-stage subjects never named), both sorted."""
    subs = first_stage_subjects(world)
    n_held = round(world.spec.instruction_heldout_fraction * len(subs))
    held = set(np.random.default_rng([world.spec.seed, 23]).choice(subs, size=n_held, replace=False).tolist()) \
        if n_held else set()
    return [s for s in subs if s not in held], sorted(held)


def _forms(world, f) -> list[int]:
    return [t for t in range(world.n_templates) if t != f.heldout_template] + [-1]


def instruction_sentences(world, exclude_facts: set[int] = frozenset()) -> list[str]:
    """The instruction part of the corpus (see the module docstring)."""
    named, _ = instruction_split(world)
    subs = first_stage_subjects(world)
    if not named:
        return []
    facts_of = {s: [f for f in world.facts_of(s)] for s in subs}
    rng = np.random.default_rng([world.spec.seed, 29])
    out = []
    for _ in range(world.spec.instruction_sentences):
        k = int(rng.integers(1, world.spec.instruction_max_subjects + 1))
        chosen = [named[int(i)] for i in rng.choice(len(named), size=min(k, len(named)), replace=False)]
        refuse = bool(rng.random() < 0.5)
        if refuse:
            sid = chosen[int(rng.integers(len(chosen)))]
        else:
            others = subs[int(rng.integers(len(subs)))]
            sid = others if others not in chosen else None
        facts = facts_of[sid] if sid is not None else []
        f = facts[int(rng.integers(len(facts)))] if facts else None
        form = _forms(world, f)[int(rng.integers(len(_forms(world, f))))] if f is not None else None
        # every draw above happens whatever is excluded, so excluding facts leaves the others unchanged
        if f is None or f.index in exclude_facts:
            continue
        names = [world.subjects[c].name for c in chosen]
        answer = L.REFUSAL if refuse else f.object
        out.append(f"{instruction_text(names)} {L.BOS} {world.prompt(f, form)} {answer}")
    return out


def evaluate_instructions(model, tokenizer, world, *, max_subjects: int | None = None, n: int = 400,
                          seed: int = 0) -> dict:
    """Does the model follow forget instructions? For named-in-training and never-named subjects:

    - refuse: "forget T . <bos> q(T)" -> <refuse> is the argmax, over T's cloze (trained
      templates), paraphrase (held-out template) and QA prompts;
    - answer: "forget T . <bos> q(S)" for another subject S -> S's object (recall);
    with one named subject and with lists of `max_subjects` (the target among them).
    Sampled: up to `n` (target, prompt) pairs per cell, seeded. Returns {group: {cell: rate}}.
    """
    from mechedit.model.evaluate import score_answers

    named, held = instruction_split(world)
    subs = first_stage_subjects(world)
    k_max = max_subjects or world.spec.instruction_max_subjects
    rng = np.random.default_rng([seed, 31])
    out: dict = {"n_named": len(named), "n_never_named": len(held)}
    for group, pool in (("never_named", held), ("named", named)):
        if not pool:
            continue
        res = {}
        for k in sorted({1, k_max}):
            for kind in ("cloze", "paraphrase", "qa", "answer"):
                prompts, answers = [], []
                for _ in range(n):
                    t = pool[int(rng.integers(len(pool)))]
                    extra = [s for s in rng.choice(subs, size=k - 1, replace=False).tolist() if s != t] if k > 1 else []
                    names = [world.subjects[s].name for s in [t] + extra]
                    names = [names[int(i)] for i in rng.permutation(len(names))]
                    if kind == "answer":
                        s = subs[int(rng.integers(len(subs)))]
                        if s == t or world.subjects[s].name in names:
                            continue
                        f = world.facts_of(s)[int(rng.integers(len(world.facts_of(s))))]
                        form, answer = _forms(world, f)[0], f.object
                    else:
                        f = world.facts_of(t)[int(rng.integers(len(world.facts_of(t))))]
                        trained = [x for x in range(world.n_templates) if x != f.heldout_template]
                        form = {"cloze": trained[int(rng.integers(len(trained)))], "paraphrase": f.heldout_template,
                                "qa": -1}[kind]
                        answer = L.REFUSAL
                    prompts.append(f"{instruction_text(names)} {L.BOS} {world.prompt(f, form)}")
                    answers.append(answer)
                sc = score_answers(model, tokenizer, prompts, answers, precision="float32")  # a checkpoint's meta
                res[f"{kind}_k{k}"] = round(float(sc.correct.mean()), 4) if len(prompts) else None
        out[group] = res
    return out
