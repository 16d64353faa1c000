"""Relearning attacks and forget quality against a model retrained without the forget set.

Retrained reference: "the same training minus the forget facts". Same world, model spec, train spec
and seed as the checkpoint, the corpus without the forget facts (every other sentence unchanged,
`World.corpus(exclude_facts)`), the same learning-rate schedule (same `max_epochs`, so the cosine
decay is the same) and stopped at exactly the epoch the original stopped at (`epochs` in its
mechedit.json) instead of at the recall targets; recall during training is evaluated on the
retained facts only. The rule is recorded in the reference's mechedit.json (`retrain`), with the
source checkpoint's weight hash; a cached reference with another rule or source is stale and is
retrained (with a warning), never reused. Cached beside the checkpoint as
`<checkpoint>.retrain-<hash>` (hash of the forget fact indices), so each forget set is trained once;
a file lock makes concurrent callers (parallel analysis cases) wait for one training.

Relearning (Lynch et al. 2024; Hu et al. 2024): fine-tune for a few steps on half of the forget
facts (their cloze/QA forms, answer NLL) and measure cloze recall on the other half; the same attack
on the retrained reference gives the baseline of what "never knew" relearns.

Forget quality (TOFU, Maini et al. 2024): per forget prompt the truth ratio
R = (prod over perturbed objects p(o'))^(1/m) / p(o) (single-token objects, so |y| = 1 and the
length normalisation is the identity; perturbed = up to 5 other objects of the relation; the
prompts are the trained cloze templates and QA instead of TOFU's paraphrased answers), then ONE
value per fact: the mean of R over its prompts (a fact's prompts are not independent samples);
forget quality = KS-test p-value between the unlearned and the retrained model's per-fact R.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from mechedit.errors import MecheditError
from mechedit.model.checkpoint import load_checkpoint
from mechedit.model.evaluate import score_answers
from mechedit.unlearn.loop import forget_examples, make_batch, nll
from mechedit.unlearn.targets import ForgetTarget

log = logging.getLogger("mechedit")

RETRAIN_RULE = "same schedule (max_epochs) stopped at the original's epoch; recall evaluated on retained facts"
RETRAIN_VERSION = 2


def retrained_path(checkpoint: str | Path, target: ForgetTarget) -> Path:
    p = Path(checkpoint)
    return p.parent / f"{p.name}.retrain-{target.hash()}"


def weights_sha256(checkpoint: str | Path) -> str:
    """sha256 of a checkpoint's model.safetensors (ties a retrained reference to its source)."""
    h = hashlib.sha256()
    with open(Path(checkpoint) / "model.safetensors", "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def retrain_record(bundle, target: ForgetTarget) -> dict:
    """What a retrained reference of `bundle` without `target` must have been made with."""
    epochs = bundle.meta.get("epochs")
    if not isinstance(epochs, int) or epochs < 1:
        raise MecheditError("checkpoint has no training epoch count in mechedit.json; cannot retrain it the same way")
    return {"rule": RETRAIN_RULE, "version": RETRAIN_VERSION, "stop_epoch": epochs,
            "source_weights_sha256": weights_sha256(bundle.path) if bundle.path is not None else None,
            "excluded_facts": sorted(target.forget_ids),
            "stage2_stop_epoch": (bundle.meta.get("finetune_facts") or {}).get("epochs")}


def stale_reason(meta: dict, want: dict) -> str | None:
    """Why a cached reference (its mechedit.json `meta`) does not fit `want`; None when it does."""
    have = meta.get("retrain")
    if not isinstance(have, dict):
        return "it was trained with the old rule (no retrain record: early stop on recall that counted the excluded facts)"
    for key in ("version", "stop_epoch", "source_weights_sha256", "excluded_facts", "stage2_stop_epoch"):
        if have.get(key) != want[key]:
            return f"its {key} is {have.get(key)!r}, expected {want[key]!r}"
    if sorted(meta.get("excluded_facts", [])) != want["excluded_facts"]:
        return "it excludes other facts"
    return None


@contextlib.contextmanager
def _lock(path: Path, wait: bool = True):
    """An exclusive lock on `path` (a lock file) for the duration of the block (POSIX; no-op elsewhere).
    Yields True when held; with `wait=False` it yields False at once if another process holds it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield True
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def retrained_reference(bundle, target: ForgetTarget, cache_dir: str | Path | None = None):
    """Load (or train once and cache) the model retrained without the forget facts (rule above)."""
    from mechedit.model.pipeline import train_checkpoint
    from mechedit.model.spec import ModelSpec, TrainSpec
    from mechedit.specio import from_dict

    if bundle.path is None and cache_dir is None:
        raise MecheditError("the retrained reference needs a checkpoint path (or cache_dir) to cache it")
    out = Path(cache_dir) / f"retrain-{target.hash()}" if cache_dir else retrained_path(bundle.path, target)
    want = retrain_record(bundle, target)
    with _lock(out.parent / f".{out.name}.lock"):
        if (out / "mechedit.json").is_file():
            ref = load_checkpoint(out)
            why = stale_reason(ref.meta, want)
            if why is None:
                return ref
            log.warning("retraining the cached reference %s: %s", out, why)
        if bundle.meta.get("finetune_facts"):  # a second-stage checkpoint: both stages without the facts
            from mechedit.model.finetune import retrain_finetuned

            return retrain_finetuned(bundle, target.forget_ids, out, stop_epoch=want["stop_epoch"],
                                     meta_extra={"retrain": want})
        ms, ts = bundle.meta.get("model_spec"), bundle.meta.get("train_spec")
        if not ms or not ts:
            raise MecheditError("checkpoint has no model/train spec in mechedit.json; cannot retrain it")
        return train_checkpoint(bundle.world, from_dict(ModelSpec, ms, "model_spec"),
                                from_dict(TrainSpec, ts, "train_spec"), out, force=True,
                                exclude_facts=target.forget_ids, stop_epoch=want["stop_epoch"],
                                meta_extra={"retrain": want})


def split_halves(target: ForgetTarget) -> tuple[list, list]:
    """Deterministic halves of the forget facts (even / odd positions in index order)."""
    facts = list(target.forget)
    return facts[0::2], facts[1::2]


def relearn(model, tokenizer, world, train_facts, eval_facts, steps: int = 10, lr: float = 1e-3, seed: int = 0) -> dict:
    """Fine-tune a copy of `model` on `train_facts`; cloze recall on `eval_facts` before and after.

    Returns {"before", "after"} (means over facts) and "after_by_fact" (fact index -> recall over its
    cloze prompts): one value per fact, for intervals.
    """
    torch.manual_seed(seed)
    probes = world.probes(eval_facts, kinds=("cloze",))

    def rec(m) -> dict[int, float]:
        if not probes:
            return {}
        ok = score_answers(m, tokenizer, [p.prompt for p in probes], [p.answer for p in probes]).correct
        return per_fact([p.fact for p in probes], ok)

    work = copy.deepcopy(model)
    before = rec(work)
    prompts, answers, _ = forget_examples(world, train_facts)
    batch = make_batch(tokenizer, prompts, answers, work.device)
    opt = torch.optim.Adam(work.parameters(), lr=lr)
    work.train()
    for _ in range(steps):
        loss = nll(work, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    work.eval()
    after = rec(work)
    mean = lambda d: float(np.mean(list(d.values()))) if d else float("nan")  # noqa: E731
    return {"before": mean(before), "after": mean(after), "after_by_fact": after}


def per_fact(facts: list[int], values) -> dict[int, float]:
    """Mean of per-prompt `values` grouped by fact index: one value per fact."""
    acc: dict[int, list[float]] = {}
    for f, v in zip(facts, values):
        acc.setdefault(int(f), []).append(float(v))
    return {f: float(np.mean(v)) for f, v in acc.items()}


@torch.no_grad()
def prompt_truth_ratios(model, tokenizer, world, facts, n_perturbed: int = 5) -> tuple[np.ndarray, list[int]]:
    """TOFU truth ratio per forget prompt (cloze templates + QA): geo-mean p(wrong) / p(true), and the
    fact index of each prompt."""
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
    return np.exp(geo - true), fact_of


def truth_ratios(model, tokenizer, world, facts, n_perturbed: int = 5) -> dict[int, float]:
    """One truth ratio per fact: the mean of its prompts' truth ratios (fact index -> R)."""
    r, fact_of = prompt_truth_ratios(model, tokenizer, world, facts, n_perturbed)
    return per_fact(fact_of, r)


def ks_pvalue(a, b) -> float:
    """Two-sample KS p-value of two samples (here: one truth ratio per fact on each side)."""
    from scipy.stats import ks_2samp

    return float(ks_2samp(np.asarray(a, float), np.asarray(b, float)).pvalue)
