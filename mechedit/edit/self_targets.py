"""Self-improvement targets for editing as unlearning: the model's own answer when it must not / cannot know.

Li et al. 2025 ("Editing as Unlearning: Are Knowledge Editing Methods Strong Baselines for Large
Language Model Unlearning?") propose *self-improvement*: instead of a fixed refusal string, the new
object an editor writes for a forget query is a refusal the model itself produces when asked not
to answer, so the edited answer is in the model's own distribution. Here, with the editors' typed
parameter `forget_target` (ROME, MEMIT, AlphaEdit, GRACE, WISE; `run_method` applies it):

- "refusal" (default): the refusal token `<refuse>` for every forget fact (the world's refusal);
- "self_instruction": the model's greedy answer to each forget prompt with the forget instruction
  "forget S . <bos>" in front (`mechedit.world.instructions`; worlds with `instructions = true`):
  its in-context refusal;
- "self_heldout": the model's greedy answer to each forget prompt with a held-out subject (one never
  trained, in no stage) in place of the forgotten one: what the model says when it does not know;
- "self": "self_instruction" on worlds with instructions, else "self_heldout".

Per fact the forget prompts are the ones the editors train on (the trained cloze templates and the
QA form); the target is the most frequent greedy answer over them (ties: the first prompt's). A
greedy answer runs to the end of its first word (every piece of a BPE word, up to `MAX_PIECES`),
stops at `<eos>` and the other control tokens, and is `<refuse>` when that is the first token. Where
the answer is the fact's true object (the in-context refusal failed, or the unknown subject's guess
happens to be right), or there is no answer (`<eos>` first), the target falls back to `<refuse>`; the
counts are in `info["self_targets"]`, with every fact's target, its answers and its context. A
sub-word model may answer a word that is not in the world's vocabulary (pieces glued into a made-up
word): that is its own answer and is kept; `n_not_a_word` counts such targets.

Where we differ from the paper, and why: their model generates a free-text refusal ("I'm not sure
...") from a natural-language instruction, and the whole sentence is the target; our worlds have
no free text, so the target is one object-like word (the world's answer format), taken from the
instruction the world trained (a) or, without one, from the model's answer about a subject it never
saw (b) - (b) is our stand-in where there is no instruction to follow, and it writes a (wrong) world
object rather than a refusal. On a world whose instruction training taught `<refuse>` itself, (a)
mostly gives `<refuse>`: self-improvement then differs from the fixed refusal only where the
in-context refusal answers something else.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from mechedit.edit.api import EditRequest
from mechedit.errors import MecheditError, SpecError
from mechedit.model.evaluate import pad
from mechedit.world import language as L

FORGET_TARGETS = ("refusal", "self", "self_instruction", "self_heldout")
MAX_PIECES = 8  # tokens of one generated word at most (a BPE object is a few pieces)
_HELDOUT_SEED = 41


def check_forget_target(method: str, value: str) -> None:
    """The editors' `forget_target` parameter: one of FORGET_TARGETS (a one-line SpecError otherwise)."""
    if value not in FORGET_TARGETS:
        raise SpecError(f"{method}: forget_target must be one of {', '.join(FORGET_TARGETS)}, got {value!r}")


@torch.no_grad()
def greedy_words(model, tokenizer, prompts: list[str], batch_size: int = 256) -> list[str | None]:
    """Each prompt's greedy continuation up to the end of its first word: `<refuse>` when that is the
    first token, None when the first token is another control token (`<eos>`, ...), else the word
    (the pieces until the next token would start a new word, be a control token, or MAX_PIECES)."""
    control = {tokenizer.convert_tokens_to_ids(t) for t in L.SPECIAL_TOKENS}
    refusal = tokenizer.convert_tokens_to_ids(L.REFUSAL)
    was_training = model.training
    model.eval()
    seqs = [tokenizer(p)["input_ids"] for p in prompts]
    gen: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    try:
        for _ in range(MAX_PIECES + 1):  # the last step only looks for the word's end
            todo = [i for i in range(len(prompts)) if not done[i]]
            if not todo:
                break
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                ids, mask = pad([seqs[i] + gen[i] for i in chunk], tokenizer.pad_token_id, model.device)
                logits = model(input_ids=ids, attention_mask=mask).logits  # [b, pos, vocab]
                nxt = logits[torch.arange(len(chunk), device=ids.device), mask.sum(1) - 1].argmax(-1).tolist()
                for i, t in zip(chunk, nxt):
                    if not gen[i]:
                        done[i] = t in control  # <refuse> ends the answer; another control token is none
                        gen[i] = [t] if t not in control or t == refusal else []
                    elif t in control or len(gen[i]) >= MAX_PIECES or \
                            len(tokenizer.decode(gen[i] + [t]).split()) > 1:  # t starts the next word
                        done[i] = True
                    else:
                        gen[i].append(t)
    finally:
        if was_training:
            model.train()
    return [None if not g else L.REFUSAL if g == [refusal] else tokenizer.decode(g).strip() for g in gen]


def never_trained_subjects(world) -> list:
    """Main subjects the model never trained on in any stage (held out, not second-stage)."""
    stage2 = set(world.stage2_subjects)
    return [s for s in world.subjects if s.kind == "subject" and s.heldout and s.id not in stage2]


def resolve_mode(world, forget_target: str) -> str:
    if forget_target == "self":
        return "self_instruction" if world.spec.instructions else "self_heldout"
    if forget_target == "self_instruction" and not world.spec.instructions:
        raise MecheditError("forget_target='self_instruction' needs a world trained with forget instructions "
                            "(world option instructions = true); use 'self_heldout' or 'self'")
    return forget_target


def self_targets(bundle, requests: list[EditRequest], forget_target: str) -> tuple[list[EditRequest], dict]:
    """The forget requests with the model's own answers as new objects (see the module docstring), and
    the record of how each was chosen: {"mode", "n_facts", "n_fallback", "fallback": {reason: n},
    "targets": [{"subject", "relation", "target", "answers", "context", "fallback"}]}."""
    from mechedit.edit.common import edit_prompts
    from mechedit.world.instructions import instruction_text

    world, tok = bundle.world, bundle.tokenizer
    mode = resolve_mode(world, forget_target)
    held = never_trained_subjects(world) if mode == "self_heldout" else []
    if mode == "self_heldout" and not held:
        raise MecheditError("forget_target='self_heldout': the world has no never-trained subject to ask about "
                            "(world option heldout_subject_fraction)")
    prompts, owner, contexts = [], [], []
    for i, r in enumerate(requests):
        f = world.fact(r.subject, r.relation)
        name = world.subjects[f.subject].name
        forms = edit_prompts(world, r, "cloze+qa")
        if mode == "self_instruction":
            context = instruction_text([name])
            texts = [f"{context} {L.BOS} {q}" for q in forms]
        else:  # one never-trained subject per forgotten subject, seeded by the subject
            h = held[int(np.random.default_rng([_HELDOUT_SEED, f.subject]).integers(len(held)))]
            context = h.name
            ts = [t for t in range(world.n_templates) if t != f.heldout_template] + [-1]
            texts = [world.prompt(f, t, name=h.name) for t in ts]
        prompts += texts
        owner += [i] * len(texts)
        contexts.append(context)
    answers = greedy_words(bundle.model, tok, prompts)
    out, records = [], []
    fallback = {"true_object": 0, "no_answer": 0}
    words = set(world.vocabulary())
    for i, r in enumerate(requests):
        f = world.fact(r.subject, r.relation)
        mine = [a for a, o in zip(answers, owner) if o == i]
        votes = Counter(a for a in mine if a is not None)
        target = max(votes, key=lambda a: (votes[a], -mine.index(a))) if votes else None  # ties: first prompt's
        why = "no_answer" if target is None else "true_object" if target == f.object else None
        if why is not None:
            fallback[why] += 1
            target = L.REFUSAL
        out.append(EditRequest(r.subject, r.relation, target))
        records.append({"subject": r.subject, "relation": r.relation, "target": target,
                        "answers": dict(Counter("<none>" if a is None else a for a in mine)),
                        "context": contexts[i], "fallback": why})
    n_fb = sum(fallback.values())
    return out, {"mode": mode, "n_facts": len(requests), "n_fallback": n_fb, "fallback": fallback,
                 "n_refusal": sum(r.new_object == L.REFUSAL for r in out),
                 "n_not_a_word": sum(r.new_object not in words for r in out), "targets": records}
