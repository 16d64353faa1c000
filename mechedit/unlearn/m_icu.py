"""ICU: in-context unlearning - the forget instruction before every input, no weight change (RWKU,
Jin et al. 2024; Pawelczyk et al. 2023).

The model must have learnt to follow the instruction: worlds with `instructions = true` train it on
"forget S1 , S2 . <bos> QUERY ANSWER" sentences (`mechedit.world.instructions`; the forget subjects
of an ICU row should be ones never named in training, so the row measures instruction following,
not a memorised refusal). ICU is an adaptor of kind "prefix" on the whole model: before every
forward it runs the instruction's tokens ("<bos> forget S1 , S2 .") and hands their keys and values
to the model as a cache, so the caller's `<bos> QUERY ...` follows the instruction exactly as in
training while the caller's positions, logits, hidden states and hooks stay its own. Every
diagnostic therefore sees "the instructed model" unchanged in form:
- recall and adversarial probes: the probe's prompt after the instruction;
- membership inference: the log-probabilities of the text's own tokens with the instruction as
  context (the instruction is never scored) - what an attacker querying the deployed system sees;
- linear probes and the logit lens: the residual states at the query's positions, with the
  instruction in context;
- relearning: fine-tuning the weights with the instruction still in front of every input.

Where we deliberately differ from RWKU: their instruction is natural language given to an
instruction-tuned LLM; ours is the world's own instruction form, learnt in training. An instruction
names whole subjects (the granularity the model was taught), so a forget set of single facts
refuses the subject's other facts too. Forget sets with more subjects than the model saw in one
instruction (`instruction_max_subjects`) are refused unless `max_subjects` allows them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mechedit.edit.adaptors import SITES_ATTR, Adaptor, adaptor_fingerprint, register_adaptor_kind
from mechedit.edit.api import EditRequest, EditResult, register_method
from mechedit.errors import MecheditError, SpecError
from mechedit.specio import to_dict
from mechedit.world.instructions import instruction_text


@register_adaptor_kind("prefix")
class InstructionPrefix:
    """Adaptor kind: tensor `ids` [P] (the instruction's token ids, <bos> first), on the model itself.

    The prefix's keys and values are computed once per weights version (and attached adaptors),
    without gradients; a model in training mode with gradients on recomputes them every forward,
    with gradients (so fine-tuning the instructed model trains through the instruction too).
    """

    hook = "pre"

    @staticmethod
    def check(a: Adaptor, module) -> None:
        ids = a.tensors.get("ids")
        if ids is None or ids.ndim != 1 or ids.numel() == 0 or ids.dtype != torch.long:
            raise MecheditError("prefix adaptor needs ids, a non-empty 1-d long tensor")
        if not hasattr(module, "gpt_neox") or int(ids.max()) >= module.config.vocab_size:
            raise MecheditError("prefix adaptor: attach it to the causal LM itself, with ids inside its vocabulary")
        if module.__dict__.get(SITES_ATTR, {}).get("prefix"):
            raise MecheditError("a model takes one instruction prefix at a time (restore the other first)")

    @staticmethod
    def prepare(site, module) -> None:
        with torch.no_grad():
            _prefix_cache(site, module)

    @staticmethod
    def pre(site, module, args, kwargs):
        if kwargs.get("past_key_values") is not None or kwargs.get("inputs_embeds") is not None:
            return None  # a caller with its own cache or embeddings: left alone
        kwargs = dict(kwargs)
        ids = kwargs.pop("input_ids", None)
        if ids is None and args:
            ids, args = args[0], args[1:]
        if ids is None:
            return None
        layers = _prefix_cache(site, module)
        from transformers import DynamicCache

        b, p = ids.shape[0], layers[0][0].shape[2]
        cache = DynamicCache()
        for i, (k, v) in enumerate(layers):
            cache.update(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1), i)
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(ids.shape, dtype=torch.long, device=ids.device)
        kwargs["attention_mask"] = torch.cat([torch.ones(b, p, dtype=mask.dtype, device=mask.device), mask], 1)
        kwargs["past_key_values"] = cache
        kwargs["input_ids"] = ids
        return args, kwargs


def _prefix_cache(site, module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The instruction's (keys, values) per layer, [1, heads, P, head_dim] each."""
    ids = site.entries[0].tensors["ids"].to(module.device)
    if module.training and torch.is_grad_enabled() and any(q.requires_grad for q in module.parameters()):
        return _run_prefix(module, ids)
    key = (tuple(q._version for q in module.parameters()), tuple(id(q) for q in module.parameters()),
           adaptor_fingerprint(module))
    if site.cache.get("key") != key:
        with torch.no_grad():
            site.cache["layers"] = _run_prefix(module, ids)
        site.cache["key"] = key
    return site.cache["layers"]


def _run_prefix(module, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = module.gpt_neox(input_ids=ids[None], use_cache=True)
    return [(layer.keys, layer.values) for layer in out.past_key_values.layers]


@dataclass(frozen=True)
class ICUParams:
    max_subjects: int = 0  # most subjects in one instruction; 0 = the world's instruction_max_subjects

    def validate(self) -> None:
        if self.max_subjects < 0:
            raise SpecError("icu: max_subjects must be >= 0")


def fit_error(world, n_subjects: int, max_subjects: int = 0) -> str | None:
    """Why ICU cannot forget `n_subjects` subjects at once in `world` (None when it can): the model
    needs forget instructions, naming at most `instruction_max_subjects` subjects unless `max_subjects`
    lifts the limit. Checked by the method and, before a run starts, by the analysis runner."""
    if not world.spec.instructions:
        return ("icu needs a model trained with forget instructions (world option instructions = true; "
                "see analyses/worlds/unlearning.toml)")
    if n_subjects > (max_subjects or world.spec.instruction_max_subjects):
        return (f"icu: the forget set has {n_subjects} subjects but the model learnt instructions of at most "
                f"{world.spec.instruction_max_subjects} (raise max_subjects to try anyway)")
    return None


@register_method("icu", params=ICUParams, kind="unlearn")
def icu(bundle, requests: list[EditRequest], p: ICUParams) -> EditResult:
    world = bundle.world
    if not world.spec.instructions:
        raise MecheditError(fit_error(world, 0))
    sids: list[int] = []
    for r in requests:
        sid = world.fact(r.subject, r.relation).subject
        if sid not in sids:
            sids.append(sid)
    error = fit_error(world, len(sids), p.max_subjects)
    if error:
        raise MecheditError(error)
    text = instruction_text([world.subjects[s].name for s in sids])
    ids = torch.tensor(bundle.tokenizer(text)["input_ids"], dtype=torch.long, device="cpu")  # moved at use
    adaptor = Adaptor("prefix", "", {"ids": ids}, {"text": text})
    return EditResult("icu", to_dict(p), list(requests), {}, info={"instruction": text, "n_subjects": len(sids),
                                                                   "prefix_tokens": int(ids.numel())},
                      adaptors=[adaptor])
