"""Batched answer scoring: recall and answer probabilities for (prompt, answer) pairs.

One forward pass per batch of right-padded sequences (prompt + answer tokens); the answer is
"recalled" when every answer token is the argmax under teacher forcing. This is the one scoring
path used by training, editing scorecards and diagnostics.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mechedit.world.world import PROBE_KINDS, Probe, World


@dataclass
class AnswerScores:
    correct: np.ndarray  # [n] bool: every answer token is the argmax
    logprob: np.ndarray  # [n] sum of answer-token log-probs
    prob_first: np.ndarray  # [n] probability of the first answer token
    top1: list[str]  # [n] argmax word at the first answer position


def encode_pairs(tokenizer, prompts: list[str], answers: list[str]):
    """Token ids of prompt+answer, with the index of each prompt's last token and answer lengths."""
    seqs, last, alen = [], [], []
    for p, a in zip(prompts, answers):
        pi = tokenizer(p)["input_ids"]
        ai = tokenizer(a, add_special_tokens=False)["input_ids"]
        seqs.append(pi + ai)
        last.append(len(pi) - 1)
        alen.append(len(ai))
    return seqs, last, alen


def pad(seqs: list[list[int]], pad_id: int, device: torch.device | str | None = None
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask [n, longest], built on the CPU and moved to `device` once."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long, device="cpu")
    mask = torch.zeros((len(seqs), n), dtype=torch.long, device="cpu")
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, device="cpu")
        mask[i, : len(s)] = 1
    return (ids, mask) if device is None else (ids.to(device), mask.to(device))


@torch.no_grad()
def score_answers(model, tokenizer, prompts: list[str], answers: list[str], batch_size: int = 512,
                  precision: str | None = None) -> AnswerScores:
    """Teacher-forced scoring of `answers` after `prompts` with an HF causal LM.

    The forward runs in `precision` (default: the process's inference precision,
    `mechedit.device.current_precision()`; bf16 = autocast, weights fp32); the log-softmax and
    everything after it in fp32.
    """
    from mechedit.device import inference_autocast

    was_training = model.training
    model.eval()
    seqs, last, alen = encode_pairs(tokenizer, prompts, answers)
    dev = model.device
    correct, logprob, pfirst, top1 = [], [], [], []
    for start in range(0, len(seqs), batch_size):
        chunk = slice(start, start + batch_size)
        ids, mask = pad(seqs[chunk], tokenizer.pad_token_id, dev)
        with inference_autocast(dev, "scoring", precision):
            logits = model(input_ids=ids, attention_mask=mask).logits
        logits = logits.float()  # [b, pos, vocab]
        logp = torch.log_softmax(logits, dim=-1)
        # every answer token of the chunk at once: (row, position predicting it, the token)
        rows = torch.tensor([b for b, k in enumerate(alen[chunk]) for _ in range(k)], device=dev)
        pos = torch.tensor([l + j for l, k in zip(last[chunk], alen[chunk]) for j in range(k)], device=dev)
        tgt = ids[rows, pos + 1]
        lp = logp[rows, pos, tgt]  # [answer tokens]
        hit = (logp[rows, pos].argmax(-1) == tgt).float()
        n = len(alen[chunk])
        lp_sum = torch.zeros(n, device=dev).index_add_(0, rows, lp)
        hits = torch.zeros(n, device=dev).index_add_(0, rows, hit)
        first = torch.tensor(last[chunk], device=dev)
        every = torch.arange(n, device=dev)
        correct += (hits == torch.tensor(alen[chunk], dtype=torch.float, device=dev)).tolist()
        logprob += lp_sum.tolist()
        pfirst += logp[every, first, ids[every, first + 1]].exp().tolist()
        top1 += logp[every, first].argmax(-1).tolist()
    if was_training:
        model.train()
    return AnswerScores(np.array(correct, dtype=bool), np.array(logprob), np.array(pfirst),
                        tokenizer.convert_ids_to_tokens(top1))


def recall_by(probes: list[Probe], scores: AnswerScores, world: World, key: str) -> dict[str, float]:
    """Mean recall grouped by `key`: "kind", "relation" or "template"."""
    groups: dict[str, list[bool]] = {}
    for p, ok in zip(probes, scores.correct):
        if key == "kind":
            g = p.kind
        elif key == "relation":
            g = world.facts[p.fact].relation
        else:
            g = "qa" if p.template < 0 else f"t{p.template}"
        groups.setdefault(g, []).append(bool(ok))
    return {g: float(np.mean(v)) for g, v in sorted(groups.items())}


def evaluate_recall(model, tokenizer, world: World, *, trained: bool = True, kinds=PROBE_KINDS,
                    batch_size: int = 512, exclude_facts: set[int] = frozenset(),
                    facts: list | None = None) -> dict:
    """Recall of the model on the world's probe sets (trained facts by default, else held-out subjects).

    Training's recall (its stopping rule and the checkpoint's final recall): always fp32, whatever
    the process's inference precision. `exclude_facts` leaves those facts out (a model retrained without them is scored on what it was
    trained on); `facts` scores exactly these facts instead.
    Returns {"by_kind": {...}, "cloze_by_relation": {...}, "cloze_by_template": {...}, "n": {...}}.
    """
    if facts is None:
        facts = world.train_facts if trained else world.heldout_facts
        facts = [f for f in facts if f.index not in exclude_facts]
    probes = world.probes(facts, kinds)
    if not probes:
        return {"by_kind": {}, "cloze_by_relation": {}, "cloze_by_template": {}, "n": {}}
    scores = score_answers(model, tokenizer, [p.prompt for p in probes], [p.answer for p in probes], batch_size,
                           precision="float32")
    cloze = [i for i, p in enumerate(probes) if p.kind == "cloze"]
    cloze_probes = [probes[i] for i in cloze]
    cloze_scores = AnswerScores(scores.correct[cloze], scores.logprob[cloze], scores.prob_first[cloze],
                                [scores.top1[i] for i in cloze])
    n: dict[str, int] = {}
    for p in probes:
        n[p.kind] = n.get(p.kind, 0) + 1
    return {
        "by_kind": recall_by(probes, scores, world, "kind"),
        "cloze_by_relation": recall_by(cloze_probes, cloze_scores, world, "relation"),
        "cloze_by_template": recall_by(cloze_probes, cloze_scores, world, "template"),
        "n": n,
    }


def evaluate_inference(model, tokenizer, world: World, batch_size: int = 512) -> dict:
    """Recall of the held-out inference facts of cyclic blocks, per kind (logical, compositional).

    None of their prompts was trained, so "cloze" scores every template (the held-out one too) and
    "qa" the question form; a fact's value is the mean over its prompts, the group's the mean over
    facts. Returns {kind: {"cloze": recall, "qa": recall, "n_facts": n}} ({} for a world without them).
    """
    out: dict = {}
    for kind in sorted(set(world.inference.values())):
        facts = world.inference_facts(kind)
        probes = world.probes(facts, ("cloze", "paraphrase", "qa"))
        sc = score_answers(model, tokenizer, [p.prompt for p in probes], [p.answer for p in probes], batch_size,
                           precision="float32")
        per: dict[str, dict[int, list[bool]]] = {"cloze": {}, "qa": {}}
        for p, ok in zip(probes, sc.correct):
            per["qa" if p.kind == "qa" else "cloze"].setdefault(p.fact, []).append(bool(ok))
        out[kind] = {k: float(np.mean([np.mean(v) for v in d.values()])) for k, d in per.items()}
        out[kind]["n_facts"] = len(facts)
    return out
