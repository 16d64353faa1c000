"""Train a GPT-NeoX model from scratch on a world's corpus (plain PyTorch loop).

Plain loop rather than the HF Trainer: for models this small the Trainer's per-step overhead
(callbacks, accelerate wrapping) is a large share of a step, and we need recall evaluation and
early stopping inside the loop anyway. Deterministic for a seed: one torch generator drives the
initialisation and the shuffling; there is no dropout.

Resumable: with `state_dir`, every `state_every` epochs the loop writes its whole state (weights,
AdamW moments, step, the shuffling generator, the global torch and numpy RNG states, the curve) to
`state_dir/state.pt` atomically, keyed by a hash of what determines the training (`training_key`).
A later call with the same key continues from there and ends with bit-identical weights.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from transformers import GPTNeoXForCausalLM

from mechedit import progress as P
from mechedit.errors import SpecError
from mechedit.faults import crash_point
from mechedit.fileio import atomic_path, dumps_json, read_json, write_text_atomic
from mechedit.model.evaluate import evaluate_inference, evaluate_recall, pad
from mechedit.model.spec import ModelSpec, TrainSpec
from mechedit.world.world import World

STATE_FILE = "state.pt"
KEY_FILE = "key.json"


@dataclass
class TrainResult:
    model: GPTNeoXForCausalLM
    curve: list[dict] = field(default_factory=list)  # one row per evaluation
    seconds: float = 0.0
    epochs: int = 0
    tokens: int = 0
    stopped_early: bool = False


def build_model(spec: ModelSpec, tokenizer, seed: int) -> GPTNeoXForCausalLM:
    torch.manual_seed(seed)
    cfg = spec.hf_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    with torch.device("cpu"):  # initialised on the CPU from the seed: the same start on every device
        return GPTNeoXForCausalLM(cfg)


def encode_corpus(tokenizer, sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [tokenizer(s)["input_ids"] for s in sentences]
    return pad(ids, tokenizer.pad_token_id)  # [n, pos]


def _length_bucketed_batches(lengths: torch.Tensor, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Shuffle, then sort by length inside windows of 32 batches: little padding, still random order."""
    perm = torch.randperm(len(lengths), generator=gen, device="cpu")
    window = 32 * batch_size
    batches = []
    for start in range(0, len(perm), window):
        chunk = perm[start : start + window]
        chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
        batches += list(chunk.split(batch_size))
    order = torch.randperm(len(batches), generator=gen, device="cpu")
    return [batches[int(i)] for i in order]


def _lr_at(step: int, total: int, spec: TrainSpec) -> float:
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    frac = min(1.0, (step - spec.warmup_steps) / max(1, total - spec.warmup_steps))
    return spec.lr * (spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def training_key(world: World, tokenizer, mspec: ModelSpec, tspec: TrainSpec,
                 exclude_facts: set[int] = frozenset(), stop_epoch: int | None = None) -> str:
    """A hash of everything that determines a training run: corpus, vocabulary, model and train specs
    (and the fixed stop epoch of a retrained reference, when there is one)."""
    h = hashlib.sha256()
    what = {"model": mspec.__dict__, "train": tspec.__dict__, "vocab": tokenizer.get_vocab(),
            "exclude": sorted(exclude_facts)}
    if stop_epoch is not None:
        what["stop_epoch"] = stop_epoch
    h.update(json.dumps(what, sort_keys=True).encode())
    for sentence in world.corpus(exclude_facts):
        h.update(sentence.encode() + b"\n")
    return h.hexdigest()


def state_key(state_dir: str | Path) -> str | None:
    """The training key a state directory was written for (None: no readable state there)."""
    state_dir = Path(state_dir)
    if not (state_dir / STATE_FILE).is_file():
        return None
    try:
        return read_json(state_dir / KEY_FILE, "training state key").get("key")
    except Exception:  # a half-written or foreign folder is simply not resumable
        return None


def _save_state(state_dir: Path, key: str, model, opt, gen: torch.Generator, result: "TrainResult",
                epoch: int, step: int, finished: bool, seconds: float) -> None:
    np_state = np.random.get_state()
    state = {"epoch": epoch, "step": step, "finished": finished, "seconds": seconds,
             "tokens": result.tokens, "stopped_early": result.stopped_early, "curve": json.dumps(result.curve),
             "model": model.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
             "torch_rng": torch.get_rng_state(),
             "numpy_rng": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    state_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(state_dir / KEY_FILE, dumps_json({"key": key}))
    with atomic_path(state_dir / STATE_FILE) as tmp:
        torch.save(state, tmp)


def _load_state(state_dir: Path, key: str) -> dict | None:
    if state_key(state_dir) != key:
        return None
    try:
        return torch.load(state_dir / STATE_FILE, weights_only=True, map_location="cpu")
    except Exception:  # unreadable state: start over rather than fail
        return None


def train_model(world: World, tokenizer, mspec: ModelSpec, tspec: TrainSpec, *,
                log_path: Path | None = None, progress: Callable[[dict], None] | None = None,
                exclude_facts: set[int] = frozenset(), stop_epoch: int | None = None,
                state_dir: Path | None = None, state_every: int = 5,
                device: torch.device | str | None = None,
                stop_at: Callable[[int], bool] | None = None,
                on_epoch: Callable[[int, bool], None] | None = None) -> TrainResult:
    """Train until cloze and paraphrase recall reach their targets or `max_epochs` run out.

    `exclude_facts` trains without those facts (the retrained reference for forget quality); recall
    is then evaluated on the remaining trained facts only. `stop_epoch` stops after exactly that
    many epochs instead of at the recall targets, with the learning-rate schedule of `max_epochs`
    unchanged (the retrained reference stops where the original stopped).
    `stop_at(epoch) -> bool` replaces the recall targets by an outside decision, asked at the epochs
    where the targets would be checked (every `eval_every`-th and the last): a retrained reference
    trained beside its original stops where the original stops (`mechedit.analysis.ahead`).
    `on_epoch(epoch, stopping)` is told the end of every epoch (`stopping`: the training ends there).
    `state_dir` makes the run resumable (module docstring); `state_every` epochs between states.
    `device` (default: the process's, `mechedit.device.current_device`) holds the model, the
    optimizer and the whole tokenized corpus; the batch order is drawn on the CPU from the seed, so
    the order (and on the CPU the weights) do not depend on the device.
    """
    from mechedit.device import current_device, resolve_device

    if stop_epoch is not None and not 1 <= stop_epoch <= tspec.max_epochs:
        raise SpecError(f"stop_epoch must be in 1..max_epochs ({tspec.max_epochs}), got {stop_epoch}")
    dev = current_device() if device is None else resolve_device(device)
    mspec.check_size(len(tokenizer))
    model = build_model(mspec, tokenizer, tspec.seed).to(dev)
    ids, mask = encode_corpus(tokenizer, world.corpus(exclude_facts))
    if ids.shape[1] > mspec.max_len:
        raise SpecError(f"the longest training sentence has {ids.shape[1]} tokens but model.max_len is "
                        f"{mspec.max_len}; raise max_len")
    labels = ids.clone()
    labels[mask == 0] = -100
    n = ids.shape[0]
    lengths = mask.sum(1)
    widths = lengths.tolist()
    ids, mask, labels = ids.to(dev), mask.to(dev), labels.to(dev)
    steps_per_epoch = math.ceil(n / tspec.batch_size)
    total = steps_per_epoch * tspec.max_epochs
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "layernorm" in name or "norm" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tspec.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tspec.lr, betas=(0.9, 0.98))
    gen = torch.Generator(device="cpu").manual_seed(tspec.seed)
    result = TrainResult(model)
    key = training_key(world, tokenizer, mspec, tspec, exclude_facts, stop_epoch) if state_dir is not None else ""
    state = _load_state(Path(state_dir), key) if state_dir is not None else None
    start, step, finished, seconds0 = 1, 0, False, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        np_state = state["numpy_rng"]
        np.random.set_state((np_state[0], np_state[1].numpy().astype(np.uint32), *np_state[2:]))
        start, step, finished, seconds0 = state["epoch"] + 1, state["step"], state["finished"], state["seconds"]
        result.curve, result.tokens = json.loads(state["curve"]), state["tokens"]
        result.stopped_early, result.epochs = state["stopped_early"], state["epoch"]
    log = open(log_path, "w", encoding="utf-8") if log_path else None
    if log:
        for row in result.curve:
            log.write(json.dumps(row) + "\n")
    t0 = time.perf_counter() - seconds0
    if state is not None:
        P.note(f"resuming the training after epoch {state['epoch']} (its saved state)")
    try:
        for epoch in range(start, tspec.max_epochs + 1):
            if finished:
                break
            model.train()
            losses = []
            batches = _length_bucketed_batches(lengths, tspec.batch_size, gen)
            for bi, idx in enumerate(batches):
                if bi % 10 == 0 and P.active():
                    P.status(f"epoch {epoch}/{stop_epoch or tspec.max_epochs}: batch {bi}/{len(batches)}"
                             + (f", loss {float(losses[-1]):.3f}" if losses else ""))
                rows = idx.tolist()
                width = max(widths[i] for i in rows)
                idx = idx.to(dev)
                x, m, y = ids[idx, :width], mask[idx, :width], labels[idx, :width]
                for g in opt.param_groups:
                    g["lr"] = _lr_at(step, total, tspec)
                ctx = torch.autocast(dev.type, dtype=torch.bfloat16) if tspec.bf16 else contextlib.nullcontext()
                with ctx:
                    loss = model(input_ids=x, attention_mask=m, labels=y).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), tspec.grad_clip)
                opt.step()
                losses.append(loss.detach())  # summed once per epoch: no device sync per step
                result.tokens += sum(widths[i] for i in rows)
                step += 1
            result.epochs = epoch
            last = epoch == (stop_epoch or tspec.max_epochs)
            epoch_loss = sum(torch.stack(losses).tolist()) / len(losses)
            line = f"epoch {epoch}/{stop_epoch or tspec.max_epochs}: loss {epoch_loss:.3f} ({time.perf_counter() - t0:.0f} s)"
            if epoch % tspec.eval_every == 0 or last:
                P.status(f"epoch {epoch}/{stop_epoch or tspec.max_epochs}: measuring recall")
                rec = evaluate_recall(model, tokenizer, world, kinds=("cloze", "paraphrase"),
                                      exclude_facts=exclude_facts)
                row = {"epoch": epoch, "step": step, "loss": epoch_loss,
                       "seconds": round(time.perf_counter() - t0, 3),
                       "cloze": rec["by_kind"].get("cloze", 0.0),
                       "paraphrase": rec["by_kind"].get("paraphrase", 0.0),
                       "cloze_by_relation": rec["cloze_by_relation"],
                       "cloze_by_template": rec["cloze_by_template"]}
                if world.inference:
                    row["inference"] = {k: v["cloze"] for k, v in evaluate_inference(model, tokenizer, world).items()}
                result.curve.append(row)
                if log:
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                if progress:
                    progress(row)
                line += (f"; recall cloze {row['cloze']:.3f}, held-out paraphrase {row['paraphrase']:.3f} "
                         f"(targets {tspec.target_recall:g} / {tspec.target_paraphrase:g})")
                if stop_at is not None:
                    if stop_at(epoch):
                        result.stopped_early = epoch < tspec.max_epochs
                        finished = True
                elif stop_epoch is not None:
                    if last:
                        result.stopped_early = epoch < tspec.max_epochs
                        P.note(line)
                        break
                elif row["cloze"] >= tspec.target_recall and row["paraphrase"] >= tspec.target_paraphrase:
                    result.stopped_early = epoch < tspec.max_epochs
                    finished = True
                    line += ": reached"
                P.note(line)  # recall as it is measured
            else:
                P.status(line)
            if on_epoch is not None:
                on_epoch(epoch, finished or last)
            crash_point("train.epoch")
            if state_dir is not None and (epoch % state_every == 0 or finished):
                _save_state(Path(state_dir), key, model, opt, gen, result, epoch, step, finished,
                            time.perf_counter() - t0)
                crash_point("train.state")
            if finished:
                break
    finally:
        if log:
            log.close()
    result.seconds = time.perf_counter() - t0
    model.eval()
    return result
