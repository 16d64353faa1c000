"""Linear probes and the logit lens: is a forgotten object still decodable from the residual stream?

Probes (Alain & Bengio 2016; the "leftover knowledge" test of unlearning papers), with held-out data:
- one multinomial logistic regression per (relation, layer, position); its classes are that
  relation's objects (chance = 1 / the relation's pool size), fit on h_l
  (`blocks.{l}.hook_resid_post`) of the trained cloze prompts of retained facts;
- subjects (never the forgotten ones) are split into train and validation (`split_subjects`,
  seeded); the probe is fit on the train subjects only, and ONE (layer, position) is chosen per
  model by its accuracy on the validation subjects (one value per fact, pooled over the relations);
- the reported figure is the accuracy on the forget facts at that choice (one value per fact: the
  mean over its cloze prompts), never the best cell on the forget facts themselves;
- every model (original, unlearned, retrained reference) gets probes fit on its OWN activations:
  a probe fit on the original model and applied to a retrained model measures how far the two
  models' bases differ, not what the retrained model knows.
Positions: the last prompt token (where the model predicts the object) and the last subject token.
A probe with one class set for all relations (the old design, 66 classes) was at chance at the
subject token even before unlearning: in three of the four trained templates the relation word
comes after the subject, so that position cannot know WHICH relation's object is asked. With one
probe per relation the question is fixed by the probe, and the position is informative (default
model, 10 forgotten subjects: validation accuracy 0.30-0.37 at the subject token vs chance 0.09,
0.29-0.96 at the last token); keeping only the templates with the relation before the subject
made it no better (0.30-0.34), so every trained template is used at both positions.
The logit lens reads the old object's probability from h_l through the model's own final layer norm
and unembedding.
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import torch

from mechedit.model.evaluate import pad
from mechedit.unlearn.loop import capture_layer
from mechedit.world.tokenizer import subject_token_span
from mechedit.world.world import Fact, World

POSITIONS = ("subject_last", "prompt_last")


@dataclass(frozen=True)
class ProbeSplit:
    """Subject ids the probes are fit on and those the (layer, position) is chosen on; disjoint, and
    never a subject of the forget set."""

    train: tuple[int, ...]
    validation: tuple[int, ...]


def split_subjects(world: World, forget: list[Fact], retain: list[Fact], val_fraction: float = 0.3,
                   seed: int = 0) -> ProbeSplit:
    """A seeded split of the subjects that have retained facts of the forgotten relations."""
    rels = {f.relation for f in forget}
    gone = {f.subject for f in forget}
    cands = sorted({f.subject for f in retain if f.relation in rels and f.subject not in gone})
    order = [cands[i] for i in np.random.default_rng([seed, 17]).permutation(len(cands))]
    n_val = min(len(order) - 1, max(1, round(val_fraction * len(order)))) if len(order) > 1 else 0
    return ProbeSplit(tuple(sorted(order[n_val:])), tuple(sorted(order[:n_val])))


@torch.no_grad()
def residuals(model, tokenizer, world: World, facts: list[Fact], batch_size: int = 256):
    """h_l at both positions for every trained cloze prompt of `facts`.

    Returns (states {position: [n, layers, d_model]}, labels [n] object strings, fact index [n]).
    The forward runs in the process's inference precision (`mechedit.device`); states are fp32.
    """
    from mechedit.device import inference_autocast

    model.eval()
    probes = world.probes(facts, kinds=("cloze",))
    n_layers = model.config.num_hidden_layers
    states = {p: [] for p in POSITIONS}
    for start in range(0, len(probes), batch_size):
        chunk = probes[start : start + batch_size]
        spans = [subject_token_span(tokenizer, world, p.prompt, world.facts[p.fact]) for p in chunk]
        seqs = [ids for ids, _ in spans]
        ids, mask = pad(seqs, tokenizer.pad_token_id, model.device)
        with ExitStack() as stack:
            caps = [stack.enter_context(capture_layer(model, l)) for l in range(n_layers)]
            stack.enter_context(inference_autocast(model.device, "diagnostics"))
            model(input_ids=ids, attention_mask=mask)
        hs = torch.stack([c["h"] for c in caps], dim=1).cpu()  # [b, layer, pos, d]
        for b, (row_ids, (_, end)) in enumerate(spans):
            states["subject_last"].append(hs[b, :, end - 1].float())  # the subject's last token
            states["prompt_last"].append(hs[b, :, len(row_ids) - 1].float())
    out = {k: torch.stack(v).numpy() if v else np.zeros((0, n_layers, model.config.hidden_size)) for k, v in states.items()}
    return out, np.array([p.answer for p in probes]), np.array([p.fact for p in probes], dtype=int)


def _fit(x: np.ndarray, y: np.ndarray, seed: int):
    """A standardised multinomial logistic regression, or the constant class when only one is seen."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classes = np.unique(y)
    if len(classes) == 1:
        return _Constant(classes[0])
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, C=1.0, random_state=seed)).fit(x, y)


@dataclass
class _Constant:
    label: str

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.full(len(x), self.label)


def _per_fact(facts: np.ndarray, hits: np.ndarray) -> dict[int, float]:
    acc: dict[int, list[float]] = {}
    for f, h in zip(facts, hits):
        acc.setdefault(int(f), []).append(float(h))
    return {f: float(np.mean(v)) for f, v in acc.items()}


def probe_model(model, tokenizer, world: World, forget: list[Fact], split: ProbeSplit, max_train: int = 3000,
                seed: int = 0) -> dict:
    """Fit this model's probes on the train subjects, choose (layer, position) on the validation
    subjects, and score the forget facts there.

    Returns {"selected": {"layer", "position"}, "validation_accuracy", "accuracy" (forget facts at the
    choice), "by_fact" {fact: accuracy}, "cells" {position: {"validation": [L], "forget": [L]}},
    "chance", "n_train_prompts", "n_validation_facts", "n_forget_facts"}.
    """
    rels = sorted({f.relation for f in forget})
    by_rel = {r: {"train": [], "validation": []} for r in rels}
    train_ids, val_ids = set(split.train), set(split.validation)
    for f in world.train_facts:
        if f.relation in by_rel:
            if f.subject in train_ids:
                by_rel[f.relation]["train"].append(f)
            elif f.subject in val_ids:
                by_rel[f.relation]["validation"].append(f)
    rng = np.random.default_rng(seed)
    n_layers = model.config.num_hidden_layers
    # per position and layer: {fact: accuracy} on validation and on the forget facts
    val = {p: [dict() for _ in range(n_layers)] for p in POSITIONS}
    fgt = {p: [dict() for _ in range(n_layers)] for p in POSITIONS}
    n_train = 0
    for r in rels:
        parts = {name: residuals(model, tokenizer, world, facts) for name, facts in
                 (("train", by_rel[r]["train"]), ("validation", by_rel[r]["validation"]),
                  ("forget", [f for f in forget if f.relation == r]))}
        if not len(parts["train"][1]):
            continue
        xs, ys, _ = parts["train"]
        idx = np.arange(len(ys))
        if len(idx) > max_train:
            idx = np.sort(rng.choice(idx, max_train, replace=False))
        n_train += len(idx)
        for pos in POSITIONS:
            for l in range(n_layers):
                clf = _fit(xs[pos][idx, l], ys[idx], seed)
                for name, store in (("validation", val), ("forget", fgt)):
                    x, y, fa = parts[name]
                    if len(y):
                        store[pos][l].update(_per_fact(fa, clf.predict(x[pos][:, l]) == y))
    cells = {p: {"validation": [float(np.mean(list(d.values()))) if d else float("nan") for d in val[p]],
                 "forget": [float(np.mean(list(d.values()))) if d else float("nan") for d in fgt[p]]}
             for p in POSITIONS}
    scored = [f for f in forget if f.index in fgt["prompt_last"][0]] or forget  # relations with a probe
    chance = float(np.mean([1.0 / len(world.relation_by_name[f.relation].objects) for f in scored]))
    options = [(cells[p]["validation"][l], p, l) for p in POSITIONS for l in range(n_layers)
               if np.isfinite(cells[p]["validation"][l]) and np.isfinite(cells[p]["forget"][l])]
    out = {"cells": cells, "chance": chance, "n_train_prompts": int(n_train),
           "n_validation_facts": len(val["prompt_last"][0]), "n_forget_facts": len(fgt["prompt_last"][0])}
    if not options:
        return {**out, "selected": None, "validation_accuracy": None, "accuracy": None, "by_fact": {}}
    best_val, pos, layer = max(options, key=lambda t: (t[0], t[1] == "prompt_last", -t[2]))
    by_fact = fgt[pos][layer]
    return {**out, "selected": {"layer": int(layer), "position": pos}, "validation_accuracy": float(best_val),
            "accuracy": float(np.mean(list(by_fact.values()))), "by_fact": by_fact}


@torch.no_grad()
def logit_lens(model, tokenizer, world: World, facts: list[Fact]) -> np.ndarray:
    """[n_prompts, layers] probability of the (first) object token read from h_l at the last prompt token."""
    from mechedit.device import inference_autocast

    states, labels, _ = residuals(model, tokenizer, world, facts)
    h = torch.from_numpy(states["prompt_last"]).to(model.device)  # [n, layer, d]
    with inference_autocast(model.device, "diagnostics"):
        logits = model.get_output_embeddings()(model.gpt_neox.final_layer_norm(h))  # [n, layer, vocab]
    probs = torch.softmax(logits.float(), -1)
    tgt = torch.tensor([tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in labels], device=model.device)
    return probs[torch.arange(len(tgt), device=model.device), :, tgt].cpu().numpy() if len(tgt) else np.zeros((0, model.config.num_hidden_layers))
