"""Fine-tuned knowledge: a second training stage that teaches a trained model new facts.

A world with `stage2_subject_fraction > 0` holds a share of its subjects out of the first stage
(they are held out, true non-members, for the first-stage model). `finetune_facts` continues
training a first-stage checkpoint on those subjects' sentences (every trained template, the QA
form, aliases, the second language, as in the first stage), mixed with `replay` first-stage
sentences per new one so the first-stage facts and the instruction following are kept, for at
most `epochs` epochs (AdamW, linear warm-up, cosine decay), stopping once the new facts' cloze and
paraphrase recall reach the targets. The result is a checkpoint whose world marks the stage-2
subjects as trained, with `finetune_facts` in mechedit.json (source checkpoint, spec, curve).
This is the "fine-tuned knowledge" of Li et al. 2025 (editing as unlearning), beside knowledge
learnt in the first stage ("pretrained").

The model retrained without forget facts F of a second-stage checkpoint (`retrain_finetuned`):
the first stage retrained without F's first-stage facts (or the source checkpoint itself when F
holds none: the first stage never saw F), then the same second stage without F, run for exactly the
epochs the original's second stage ran (the same schedule, not stopped at the recall targets).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mechedit.errors import CheckpointError, MecheditError, SpecError
from mechedit.fileio import commit_output_dir, prepare_output_dir
from mechedit.specio import from_dict, to_dict


@dataclass(frozen=True)
class FinetuneSpec:
    epochs: int = 30  # at most
    lr: float = 5e-4
    batch_size: int = 64
    replay: float = 3.0  # first-stage sentences replayed per new sentence (1.0 with lr 1e-3: first-stage cloze 0.957)
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    target_recall: float = 0.99  # stop once the new facts' cloze recall ...
    target_paraphrase: float = 0.9  # ... and held-out paraphrase recall reach these
    eval_every: int = 2
    seed: int = 0

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.eval_every < 1 or self.warmup_steps < 0:
            raise SpecError("finetune: epochs, batch_size, eval_every >= 1 and warmup_steps >= 0")
        if self.lr <= 0 or self.replay < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise SpecError("finetune: lr > 0, replay >= 0, 0 <= min_lr_ratio <= 1")
        for key in ("target_recall", "target_paraphrase"):
            if not 0 <= getattr(self, key) <= 1:
                raise SpecError(f"finetune: {key} must be in [0, 1]")


def stage2_facts(world) -> list:
    ids = set(world.stage2_subjects)
    return [f for f in world.facts if f.subject in ids]


def finetune_model(model, tokenizer, world, spec: FinetuneSpec, *, exclude_facts: set[int] = frozenset(),
                   stop_epoch: int | None = None, progress: Callable[[dict], None] | None = None) -> dict:
    """Train `model` in place on the world's second-stage facts (+ replay); returns curve and counts.

    `world` is the FIRST-stage world (stage-2 subjects held out). `stop_epoch` (a retrained reference):
    the same schedule run for exactly that many epochs instead of stopping at the recall targets.
    """
    if stop_epoch is not None and not 1 <= stop_epoch <= spec.epochs:
        raise MecheditError(f"finetune: stop_epoch {stop_epoch} outside 1..{spec.epochs}")
    from mechedit.model.evaluate import evaluate_recall
    from mechedit.model.train import _length_bucketed_batches, encode_corpus

    world2 = world.with_stage2_trained()
    new_ids = {f.index for f in stage2_facts(world)}
    keep = new_ids - set(exclude_facts)
    new = world2.corpus(exclude_facts={f.index for f in world2.facts} - keep)
    old = world.corpus(exclude_facts=set(exclude_facts))
    rng = np.random.default_rng([spec.seed, 37])
    n_old = min(len(old), int(round(spec.replay * len(new))))
    replay = [old[int(i)] for i in sorted(rng.choice(len(old), size=n_old, replace=False))] if n_old else []
    ids, mask = encode_corpus(tokenizer, new + replay)
    labels = ids.clone()
    labels[mask == 0] = -100
    lengths = mask.sum(1)
    gen = torch.Generator().manual_seed(spec.seed)
    torch.manual_seed(spec.seed)
    total = math.ceil(len(ids) / spec.batch_size) * spec.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.98))
    eval_facts = [f for f in world2.facts if f.index in keep]
    curve, step, t0 = [], 0, time.perf_counter()
    for epoch in range(1, (stop_epoch or spec.epochs) + 1):
        model.train()
        losses = []
        for idx in _length_bucketed_batches(lengths, spec.batch_size, gen):
            width = int(mask[idx].sum(1).max())
            frac = min(1.0, max(0, step - spec.warmup_steps) / max(1, total - spec.warmup_steps))
            lr = spec.lr * ((step + 1) / spec.warmup_steps if step < spec.warmup_steps else
                            spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))
            for g in opt.param_groups:
                g["lr"] = lr
            loss = model(input_ids=ids[idx, :width], attention_mask=mask[idx, :width], labels=labels[idx, :width]).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
            opt.step()
            losses.append(loss.item())
            step += 1
        if epoch % spec.eval_every == 0 or epoch == (stop_epoch or spec.epochs):
            model.eval()
            rec = evaluate_recall(model, tokenizer, world2, kinds=("cloze", "paraphrase"), facts=eval_facts) \
                if eval_facts else {"by_kind": {}}
            row = {"epoch": epoch, "loss": float(np.mean(losses)), "seconds": round(time.perf_counter() - t0, 3),
                   "stage2_cloze": rec["by_kind"].get("cloze", 0.0),
                   "stage2_paraphrase": rec["by_kind"].get("paraphrase", 0.0)}
            curve.append(row)
            if progress:
                progress(row)
            if stop_epoch is None and row["stage2_cloze"] >= spec.target_recall and \
                    row["stage2_paraphrase"] >= spec.target_paraphrase:
                break
    model.eval()
    return {"curve": curve, "epochs": curve[-1]["epoch"] if curve else 0, "n_new_sentences": len(new),
            "n_replay_sentences": len(replay), "seconds": round(time.perf_counter() - t0, 3)}


def finetune_checkpoint(checkpoint: str | Path, out: str | Path, params: dict | None = None, *, force: bool = False,
                        exclude_facts: set[int] = frozenset(), source=None, meta_extra: dict | None = None,
                        stop_epoch: int | None = None, progress: Callable[[dict], None] | None = None):
    """`mechedit finetune-facts`: a first-stage checkpoint in, the second-stage checkpoint out."""
    from mechedit.model.checkpoint import load_checkpoint
    from mechedit.model.evaluate import evaluate_recall
    from mechedit.world.instructions import evaluate_instructions

    spec = from_dict(FinetuneSpec, {**to_dict(FinetuneSpec()), **(params or {})}, "finetune params")
    bundle = source if source is not None else load_checkpoint(checkpoint)
    world = bundle.world
    if not world.stage2_subjects:
        raise MecheditError("this world has no second-stage subjects (world option stage2_subject_fraction)")
    if world.stage2_trained:
        raise MecheditError(f"{checkpoint} is already a second-stage checkpoint")
    if bundle.meta.get("adaptors"):
        raise MecheditError("finetune-facts takes a plain trained checkpoint, not an edited one")
    tmp = prepare_output_dir(out, force)
    try:
        stats = finetune_model(bundle.model, bundle.tokenizer, world, spec, exclude_facts=exclude_facts,
                               stop_epoch=stop_epoch, progress=progress)
        world2 = world.with_stage2_trained()
        new = [f for f in stage2_facts(world) if f.index not in exclude_facts]
        final = {"trained": evaluate_recall(bundle.model, bundle.tokenizer, world2, exclude_facts=set(exclude_facts)),
                 "heldout_subjects": evaluate_recall(bundle.model, bundle.tokenizer, world2, trained=False),
                 "stage2": evaluate_recall(bundle.model, bundle.tokenizer, world2, facts=new),
                 "first_stage": evaluate_recall(bundle.model, bundle.tokenizer, world2,
                                                facts=[f for f in world.train_facts if f.index not in exclude_facts])}
        meta = {**bundle.meta, "final_recall": final, "excluded_facts": sorted(exclude_facts),
                "finetune_facts": {"source": str(Path(checkpoint).resolve()), "spec": to_dict(spec),
                                   "n_subjects": len(world.stage2_subjects), "n_facts": len(new), **stats},
                **(meta_extra or {})}
        if world.spec.instructions:
            meta["instruction_following"] = evaluate_instructions(bundle.model, bundle.tokenizer, world2)
        from mechedit.model.checkpoint import save_checkpoint

        save_checkpoint(tmp, bundle.model, bundle.tokenizer, world2, meta)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_output_dir(tmp, out)
    return load_checkpoint(out)


def retrain_finetuned(bundle, forget_ids: set[int], out: str | Path, *, stop_epoch: int | None = None,
                      meta_extra: dict | None = None):
    """The second-stage checkpoint `bundle` as it would be had it never seen `forget_ids` (module doc).

    The first stage (when retrained) stops at `stop_epoch`, as a retrained reference of a first-stage
    checkpoint does (`diagnose/reference.py`); `meta_extra` goes into the result's mechedit.json.
    """
    from mechedit.model.checkpoint import load_checkpoint
    from mechedit.model.pipeline import train_checkpoint
    from mechedit.model.spec import ModelSpec, TrainSpec

    info = bundle.meta.get("finetune_facts") or {}
    world1 = _first_stage_world(bundle.world)
    first = {f.index for f in world1.train_facts} & set(forget_ids)
    out = Path(out)
    if first:
        ms, ts = bundle.meta.get("model_spec"), bundle.meta.get("train_spec")
        if not ms or not ts:
            raise MecheditError("checkpoint has no model/train spec in mechedit.json; cannot retrain it")
        stage1 = train_checkpoint(world1, from_dict(ModelSpec, ms, "model_spec"), from_dict(TrainSpec, ts, "train_spec"),
                                  out.parent / f"{out.name}.stage1", force=True, exclude_facts=first,
                                  stop_epoch=stop_epoch)
    else:
        src = Path(info.get("source", ""))
        try:
            stage1 = load_checkpoint(src)
        except CheckpointError as exc:
            raise MecheditError(f"the first-stage checkpoint of {bundle.path} is gone ({exc}); cannot retrain") from None
    return finetune_checkpoint(stage1.path, out, info.get("spec", {}), force=True, exclude_facts=set(forget_ids),
                               source=stage1, meta_extra=meta_extra, stop_epoch=info.get("epochs"))


def _first_stage_world(world2):
    from dataclasses import replace

    ids = set(world2.stage2_subjects)
    return replace(world2, subjects=tuple(replace(s, heldout=True) if s.id in ids else s for s in world2.subjects))
