"""The one training loop behind every loss-based unlearning method (GA, GD, NPO, DPO, RT, RMU).

Forget data = each forget fact's trained cloze templates plus its QA form; retain data = the same
forms of every other trained fact, sampled per step. Losses are computed on the answer tokens only.
A method supplies `loss(ctx, forget, retain) -> scalar`; the loop owns the copy of the model, the
choice of trainable parameters (full, layer/module-restricted, or LoRA through peft), Adam, early
stopping once forget-set cloze recall reaches `stop_recall`, and the deltas (trained - original).
The input model is never changed.

Early stopping is checked every step by default (`eval_every=1`): on the default model GA-type
methods go from recall 0.8 to 0 within ~5 steps, and checking every 5 steps overshot into ~1.5 points
more retain damage. The check scores only the forget cloze prompts (cheap).
"""
from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Callable

import torch

from mechedit import progress as P
from mechedit.edit.api import EditRequest, EditResult
from mechedit.errors import MecheditError
from mechedit.model.evaluate import encode_pairs, pad, score_answers
from mechedit.specio import to_dict
from mechedit.unlearn.targets import ForgetTarget
from mechedit.world.language import REFUSAL
from mechedit.world.tokenizer import subject_token_span
from mechedit.world.world import Fact, World

MODULES = {"all": None, "mlp": ("mlp.",), "attn": ("attention.",)}
LORA_TARGETS = {"all": ["dense_h_to_4h", "dense_4h_to_h", "query_key_value", "dense"],
                "mlp": ["dense_h_to_4h", "dense_4h_to_h"], "attn": ["query_key_value", "dense"]}


@dataclass(frozen=True)
class UnlearnParams:
    """Shared loop parameters; each method's params class extends these with its own."""

    steps: int = 100  # maximum optimiser steps
    lr: float = 1e-3
    forget_batch: int = 256  # forget sequences per step (the whole forget set when it is smaller)
    retain_batch: int = 64  # retain sequences sampled per step (methods with a retain term)
    retain_weight: float = 1.0  # weight of the retain term (0 disables it)
    layers: tuple[int, ...] = ()  # layers to update; () = every layer plus embeddings and head
    modules: str = "all"  # all | mlp | attn: which blocks of the chosen layers to update
    lora_rank: int = 0  # > 0: train a LoRA adapter of this rank on the chosen layers/modules, then merge
    lora_alpha: float = 16.0
    stop_recall: float = 0.0  # stop once forget-set cloze recall <= this (negative: never stop early)
    eval_every: int = 1  # steps between forget-recall checks (1: stop as soon as recall hits stop_recall)
    grad_clip: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        if self.steps < 1 or self.forget_batch < 1 or self.retain_batch < 1 or self.eval_every < 1:
            raise MecheditError("steps, forget_batch, retain_batch and eval_every must be >= 1")
        if self.lr <= 0:
            raise MecheditError(f"lr must be > 0, got {self.lr}")
        if self.retain_weight < 0:
            raise MecheditError("retain_weight must be >= 0")
        if self.modules not in MODULES:
            raise MecheditError(f"modules must be one of {', '.join(MODULES)}, got {self.modules!r}")
        if self.lora_rank < 0:
            raise MecheditError("lora_rank must be >= 0")


@dataclass
class Batch:
    ids: torch.Tensor  # [b, pos]
    mask: torch.Tensor  # [b, pos]
    labels: torch.Tensor  # [b, pos] next-token targets at answer positions (shifted), -100 elsewhere


def make_batch(tokenizer, prompts: list[str], answers: list[str], device: torch.device | None = None) -> Batch:
    """Right-padded prompt+answer ids; `labels[b, t]` is the token at t+1 when t+1 is an answer token.
    Built on the CPU, moved to `device` once."""
    seqs, last, alen = encode_pairs(tokenizer, prompts, answers)
    ids, mask = pad(seqs, tokenizer.pad_token_id)
    labels = torch.full_like(ids, -100)
    for b, (s, l, k) in enumerate(zip(seqs, last, alen)):
        labels[b, l : l + k] = torch.tensor(s[l + 1 : l + 1 + k], device="cpu")
    if device is not None:
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
    return Batch(ids, mask, labels)


def answer_logprob(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each sequence's answer tokens and their count: ([b], [b])."""
    logits = model(input_ids=batch.ids, attention_mask=batch.mask).logits.float()  # [b, pos, vocab]
    logp = torch.log_softmax(logits, dim=-1)
    keep = batch.labels != -100
    tok = logp.gather(-1, batch.labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep  # [b, pos]
    return tok.sum(1), keep.sum(1)


def nll(model, batch: Batch) -> torch.Tensor:
    """Mean per-token NLL of the answers (the usual LM loss restricted to answer tokens)."""
    lp, n = answer_logprob(model, batch)
    return -lp.sum() / n.sum().clamp(min=1)


def subset(batch: Batch, idx: torch.Tensor) -> Batch:
    width = int(batch.mask[idx].sum(1).max())
    return Batch(batch.ids[idx, :width], batch.mask[idx, :width], batch.labels[idx, :width])


def transformer_layers(model) -> torch.nn.ModuleList:
    """The GPT-NeoX block list of an HF model, also through a peft wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.gpt_neox.layers


@contextmanager
def capture_layer(model, layer: int):
    """Record the residual stream after block `layer` (`blocks.{layer}.hook_resid_post`) in `out["h"]`."""
    out: dict[str, torch.Tensor] = {}

    def hook(_m, _i, output):
        out["h"] = output[0] if isinstance(output, tuple) else output  # [b, pos, d_model]

    handle = transformer_layers(model)[layer].register_forward_hook(hook)
    try:
        yield out
    finally:
        handle.remove()


@dataclass
class UnlearnData:
    """Forget and retain examples (prompt, true object, alternative answer) as token batches."""

    target: ForgetTarget
    forget_prompts: list[str]
    forget_objects: list[str]
    forget_alt: list[str]  # refusal or counterfactual objects (RT, DPO)
    forget_cloze: list[int]  # indices of cloze prompts (early-stopping check)
    forget_subject_start: list[int]  # token position of each forget prompt's first subject token
    retain: Batch


def forget_examples(world: World, facts: list[Fact]) -> tuple[list[str], list[str], list[bool]]:
    probes = world.probes(facts, kinds=("cloze", "qa"))
    return [p.prompt for p in probes], [p.answer for p in probes], [p.kind == "cloze" for p in probes]


def counterfactual(world: World, fact: Fact) -> str:
    """A deterministic wrong object from the fact's relation (DPO's counterfactual answer)."""
    objs = [o for o in world.relation_by_name[fact.relation].objects if o != fact.object]
    return objs[(fact.index * 7919) % len(objs)]


def build_data(bundle, requests: list[EditRequest], alt: str = "refusal") -> UnlearnData:
    world = bundle.world
    target = ForgetTarget.from_requests(world, requests)
    prompts, objects, alts, cloze, starts = [], [], [], [], []
    for f in target.forget:
        p, o, c = forget_examples(world, [f])
        starts += [subject_token_span(bundle.tokenizer, world, q, f)[1][0] for q in p]
        prompts += p
        objects += o
        cloze += c
        alts += [REFUSAL if alt == "refusal" else counterfactual(world, f)] * len(p)
    rp, ro, _ = forget_examples(world, target.retain)
    if not rp:
        raise MecheditError("nothing left to retain: the forget target covers every trained fact")
    return UnlearnData(target, prompts, objects, alts, [i for i, c in enumerate(cloze) if c], starts,
                       make_batch(bundle.tokenizer, rp, ro, bundle.model.device))


@dataclass
class StepContext:
    """What a method's loss sees: the model being trained, the frozen original, params, step."""

    model: torch.nn.Module
    ref: torch.nn.Module
    params: UnlearnParams
    step: int
    tokenizer: object
    cache: dict


def _select(model, p: UnlearnParams) -> list[str]:
    n_layers = model.config.num_hidden_layers
    bad = [l for l in p.layers if not 0 <= l < n_layers]
    if bad:
        raise MecheditError(f"layer {bad[0]} is out of range (the model has {n_layers} layers)")
    names = []
    for name, _ in model.named_parameters():
        if not p.layers and p.modules == "all":
            names.append(name)
            continue
        parts = name.split(".")
        if len(parts) < 4 or parts[1] != "layers":
            continue
        layer, rest = int(parts[2]), ".".join(parts[3:])
        if p.layers and layer not in p.layers:
            continue
        prefixes = MODULES[p.modules]
        if prefixes is None or rest.startswith(prefixes):
            names.append(name)
    if not names:
        raise MecheditError("the chosen layers/modules select no parameters")
    return names


LossFn = Callable[[StepContext, Batch, Batch], torch.Tensor]


def run_unlearning(bundle, requests: list[EditRequest], p: UnlearnParams, loss_fn: LossFn, *, method: str,
                   forget_answer: str = "object", alt: str = "refusal") -> EditResult:
    """Train a copy of `bundle.model` with `loss_fn` and return the deltas as an `EditResult`.

    `forget_answer` picks the labels of forget batches: "object" (the true object: GA/GD/NPO/RMU),
    "alt" (the refusal or counterfactual: RT); DPO reads both through `ctx.cache`.
    """
    t0 = time.perf_counter()
    torch.manual_seed(p.seed)
    gen = torch.Generator(device="cpu").manual_seed(p.seed)
    data = build_data(bundle, requests, alt)
    tok = bundle.tokenizer
    answers = data.forget_alt if forget_answer == "alt" else data.forget_objects
    dev = bundle.model.device
    forget_all = make_batch(tok, data.forget_prompts, answers, dev)
    cache = {"forget_true": make_batch(tok, data.forget_prompts, data.forget_objects, dev),
             "forget_alt": make_batch(tok, data.forget_prompts, data.forget_alt, dev)}
    # [n, pos] 1 from the first subject token on: the positions whose context holds the forget subject
    cache["from_subject"] = (torch.arange(forget_all.ids.shape[1], device=dev)[None, :]
                             >= torch.tensor(data.forget_subject_start, device=dev)[:, None]) & forget_all.mask.bool()
    original = bundle.model
    ref = copy.deepcopy(original).eval()
    for q in ref.parameters():
        q.requires_grad_(False)
    work = copy.deepcopy(original)
    names = _select(work, p)
    for name, q in work.named_parameters():
        q.requires_grad_(name in names)
    if p.lora_rank > 0:
        from peft import LoraConfig

        from mechedit.edit.peft_quiet import peft_model

        cfg = LoraConfig(r=p.lora_rank, lora_alpha=p.lora_alpha, lora_dropout=0.0,
                         target_modules=LORA_TARGETS[p.modules],
                         layers_to_transform=list(p.layers) or None, layers_pattern="layers" if p.layers else None)
        work = peft_model(work, cfg)
    train_params = [q for q in work.parameters() if q.requires_grad]
    opt = torch.optim.Adam(train_params, lr=p.lr)
    cloze_prompts = [data.forget_prompts[i] for i in data.forget_cloze]
    cloze_answers = [data.forget_objects[i] for i in data.forget_cloze]
    n_forget, n_retain = forget_all.ids.shape[0], data.retain.ids.shape[0]
    history, stopped_at = [], None
    work.train()
    step = 0
    for step in range(1, p.steps + 1):
        # drawn on the CPU from the seed (the same order on every device), then moved
        fidx = (torch.arange(n_forget, device="cpu") if n_forget <= p.forget_batch
                else torch.randperm(n_forget, generator=gen, device="cpu")[: p.forget_batch]).to(dev)
        ridx = torch.randperm(n_retain, generator=gen, device="cpu")[: p.retain_batch].to(dev)
        ctx = StepContext(work, ref, p, step, tok, {**cache, "fidx": fidx})
        loss = loss_fn(ctx, subset(forget_all, fidx), subset(data.retain, ridx))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(train_params, p.grad_clip)
        opt.step()
        if step % p.eval_every == 0 or step == p.steps:
            # the method's stopping rule: fp32 whatever the inference precision of the diagnostics
            recall = float(score_answers(work, tok, cloze_prompts, cloze_answers, precision="float32").correct.mean())
            history.append({"step": step, "loss": float(loss.detach()), "forget_cloze_recall": recall})
            P.status(f"{method} step {step}/{p.steps}: loss {history[-1]['loss']:.3f}, forget cloze recall "
                     f"{recall:.3f} (stops at <= {p.stop_recall:g})")
            if recall <= p.stop_recall:
                stopped_at = step
                break
    work.eval()
    if p.lora_rank > 0:
        work = work.merge_and_unload()
    with torch.no_grad():
        orig = dict(original.named_parameters())
        deltas = {}
        for name, q in work.named_parameters():
            d = q.detach() - orig[name].detach()
            if bool(d.abs().max() > 0):
                deltas[name] = d.clone()
    info = {"steps_run": step, "stopped_at": stopped_at, "history": history,
            "n_forget_sequences": n_forget, "n_retain_sequences": n_retain,
            "trained_parameters": names if p.lora_rank == 0 else f"lora r={p.lora_rank} on {p.modules}",
            "forget_facts": [f.index for f in data.target.forget]}
    return EditResult(method, to_dict(p), list(requests), deltas, {"train_s": time.perf_counter() - t0}, info)


def param_fields(cls) -> list[str]:
    return [f.name for f in fields(cls)]
