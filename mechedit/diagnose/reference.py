"""Relearning attacks and forget quality against a model retrained without the forget set.

Retrained reference: the same world, model spec, train spec and seed as the checkpoint, trained with
`exclude_facts` = the forget set; cached beside the checkpoint as `<checkpoint>.retrain-<hash>`
(hash of the forget fact indices), so each forget set is trained once.

Relearning (Lynch et al. 2024; Hu et al. 2024): fine-tune for a few steps on half of the forget
facts (their cloze/QA forms, answer NLL) and measure cloze recall on the other half; the same attack
on the retrained reference gives the baseline of what "never knew" relearns.

Forget quality (TOFU, Maini et al. 2024): per forget prompt the truth ratio
R = (prod over perturbed objects p(o'))^(1/m) / p(o) (single-token objects, so |y| = 1 and the
length normalisation is the identity; perturbed = up to 5 other objects of the relation; the
prompts are the trained cloze templates and QA instead of TOFU's paraphrased answers); forget
quality = KS-test p-value between the unlearned and the retrained model's R on the forget set.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from mechedit.errors import MecheditError
from mechedit.model.checkpoint import load_checkpoint
from mechedit.model.evaluate import score_answers
from mechedit.unlearn.loop import forget_examples, make_batch, nll
from mechedit.unlearn.targets import ForgetTarget


def retrained_path(checkpoint: str | Path, target: ForgetTarget) -> Path:
    p = Path(checkpoint)
    return p.parent / f"{p.name}.retrain-{target.hash()}"


def retrained_reference(bundle, target: ForgetTarget, cache_dir: str | Path | None = None):
    """Load (or train once and cache) the model retrained without the forget facts."""
    from mechedit.model.pipeline import train_checkpoint
    from mechedit.model.spec import ModelSpec, TrainSpec
    from mechedit.specio import from_dict

    if bundle.path is None and cache_dir is None:
        raise MecheditError("the retrained reference needs a checkpoint path (or cache_dir) to cache it")
    out = Path(cache_dir) / f"retrain-{target.hash()}" if cache_dir else retrained_path(bundle.path, target)
    if (out / "mechedit.json").is_file():
        ref = load_checkpoint(out)
        if sorted(ref.meta.get("excluded_facts", [])) != sorted(target.forget_ids):
            raise MecheditError(f"cached retrained reference {out} excludes other facts; delete it")
        return ref
    if bundle.meta.get("finetune_facts"):  # a second-stage checkpoint: retrain both stages without the facts
        from mechedit.model.finetune import retrain_finetuned

        return retrain_finetuned(bundle, target.forget_ids, out)
    ms, ts = bundle.meta.get("model_spec"), bundle.meta.get("train_spec")
    if not ms or not ts:
        raise MecheditError("checkpoint has no model/train spec in mechedit.json; cannot retrain it")
    return train_checkpoint(bundle.world, from_dict(ModelSpec, ms, "model_spec"), from_dict(TrainSpec, ts, "train_spec"),
                            out, force=True, exclude_facts=target.forget_ids)


def split_halves(target: ForgetTarget) -> tuple[list, list]:
    """Deterministic halves of the forget facts (even / odd positions in index order)."""
    facts = list(target.forget)
    return facts[0::2], facts[1::2]


def relearn(model, tokenizer, world, train_facts, eval_facts, steps: int = 10, lr: float = 1e-3, seed: int = 0) -> dict:
    """Fine-tune a copy of `model` on `train_facts`; cloze recall on `eval_facts` before and after."""
    torch.manual_seed(seed)
    probes = world.probes(eval_facts, kinds=("cloze",))

    def rec(m):
        if not probes:
            return float("nan")
        return float(score_answers(m, tokenizer, [p.prompt for p in probes], [p.answer for p in probes]).correct.mean())

    work = copy.deepcopy(model)
    before = rec(work)
    prompts, answers, _ = forget_examples(world, train_facts)
    batch = make_batch(tokenizer, prompts, answers)
    opt = torch.optim.Adam(work.parameters(), lr=lr)
    work.train()
    for _ in range(steps):
        loss = nll(work, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    work.eval()
    return {"before": before, "after": rec(work)}


@torch.no_grad()
def truth_ratios(model, tokenizer, world, facts, n_perturbed: int = 5) -> np.ndarray:
    """TOFU truth ratio per forget prompt (cloze templates + QA): geo-mean p(wrong) / p(true)."""
    prompts, answers, _ = forget_examples(world, facts)
    fact_of = [p.fact for p in world.probes(facts, kinds=("cloze", "qa"))]
    true = score_answers(model, tokenizer, prompts, answers).logprob
    wp, wa, owner = [], [], []
    for i, (pr, fi) in enumerate(zip(prompts, fact_of)):
        f = world.facts[fi]
        wrong = [o for o in world.relation_by_name[f.relation].objects if o != f.object]
        wrong = [wrong[(fi * 13 + j) % len(wrong)] for j in range(min(n_perturbed, len(wrong)))]
        wp += [pr] * len(wrong)
        wa += wrong
        owner += [i] * len(wrong)
    wl = score_answers(model, tokenizer, wp, wa).logprob
    owner = np.array(owner)
    geo = np.array([wl[owner == i].mean() for i in range(len(prompts))])
    return np.exp(geo - true)


def ks_pvalue(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import ks_2samp

    return float(ks_2samp(a, b).pvalue)
