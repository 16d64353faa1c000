"""Fine-tuning editor (Behemoth's FT; Zhu et al. 2020's norm-constrained FT-L): gradient descent on the
new facts' cloze prompts, optionally restricted to some layers and a component, with a max-norm
constraint on the change and a retain mix (other subjects with the same relation, subjects that
already had the new value, unrelated facts) to limit collateral.

    min_theta  mean NLL(new object | edit prompt) + retain_weight * mean NLL(original | retain prompt)
    s.t. |theta - theta_0|_inf <= norm_constraint  (projected after each step; 0 = off)

Trains a deep copy of the HF model, so the bundle's model is never changed.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from mechedit.edit.api import EditRequest, EditResult, register_method
from mechedit.edit.common import resolve_layers
from mechedit.edit.retain import edit_pairs, retain_pairs
from mechedit.errors import SpecError
from mechedit.model.evaluate import encode_pairs, pad
from mechedit.specio import to_dict

COMPONENTS = {"mlp": ("mlp.",), "attn": ("attention.",), "both": ("mlp.", "attention.")}


@dataclass(frozen=True)
class FinetuneParams:
    layer: int | list[int] | str = "all"  # layers to train: int, list, "traced" or "all"
    component: str = "mlp"  # mlp | attn | both
    steps: int = 50
    lr: float = 1e-3
    norm_constraint: float = 0.0  # L-inf bound on each weight change (0 = none)
    n_retain: int = 0  # retain pairs mixed into every step (Behemoth's mix)
    retain_weight: float = 1.0
    weights_only: bool = True  # train weight matrices only (not biases / layer norms)
    seed: int = 0

    def validate(self) -> None:
        if self.component not in COMPONENTS:
            raise SpecError(f"finetune: component must be one of {', '.join(COMPONENTS)}, got {self.component!r}")
        if self.steps < 1 or self.lr <= 0 or self.norm_constraint < 0 or self.n_retain < 0:
            raise SpecError("finetune: steps >= 1, lr > 0, norm_constraint >= 0, n_retain >= 0")


def _nll_batch(tokenizer, pairs: list[tuple[str, str]], device: torch.device | None = None):
    seqs, last, alen = encode_pairs(tokenizer, [p for p, _ in pairs], [a for _, a in pairs])
    ids, mask = pad(seqs, tokenizer.pad_token_id, device)
    labels = torch.full_like(ids, -100)
    for i, (s, l, k) in enumerate(zip(seqs, last, alen)):
        labels[i, l + 1 : l + 1 + k] = ids[i, l + 1 : l + 1 + k]
    return ids, mask, labels


def answer_nll(model, batch) -> torch.Tensor:
    ids, mask, labels = batch
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def answer_nll_rows(model, batch) -> torch.Tensor:
    """Mean answer-token NLL of every row of a `_nll_batch`. [rows]"""
    ids, mask, labels = batch
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # [b, pos-1, vocab]
    tgt = labels[:, 1:]
    keep = tgt != -100
    nll = -torch.log_softmax(logits, -1).gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (nll * keep).sum(1) / keep.sum(1).clamp_min(1)


def trainable_names(bundle, layer, component: str, requests, weights_only: bool) -> list[str]:
    layers = (list(range(bundle.n_layers)) if layer == "all"
              else resolve_layers(bundle, layer, requests, allow_list=True))
    names = []
    for n, p in bundle.model.named_parameters():
        parts = n.split(".")
        if len(parts) < 4 or parts[1] != "layers" or int(parts[2]) not in layers:
            continue
        rest = ".".join(parts[3:])
        if any(rest.startswith(c) for c in COMPONENTS[component]) and (not weights_only or p.ndim == 2):
            names.append(n)
    return names


@register_method("finetune", params=FinetuneParams)
def finetune(bundle, requests: list[EditRequest], p: FinetuneParams) -> EditResult:
    names = trainable_names(bundle, p.layer, p.component, requests, p.weights_only)
    model = copy.deepcopy(bundle.model)
    params = dict(model.named_parameters())
    for n, prm in params.items():
        prm.requires_grad_(n in names)
    orig = {n: params[n].detach().clone() for n in names}
    edit = _nll_batch(bundle.tokenizer, edit_pairs(bundle.world, requests), model.device)
    retain = retain_pairs(bundle.world, requests, p.n_retain, p.seed)
    retain_b = _nll_batch(bundle.tokenizer, retain, model.device) if retain else None
    torch.manual_seed(p.seed)
    opt = torch.optim.Adam([params[n] for n in names], lr=p.lr)
    model.eval()  # no dropout in these models; eval keeps HF from any train-only paths
    losses = []
    for _ in range(p.steps):
        loss = answer_nll(model, edit)
        if retain_b is not None:
            loss = loss + p.retain_weight * answer_nll(model, retain_b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if p.norm_constraint > 0:
            with torch.no_grad():
                for n in names:
                    params[n].copy_(orig[n] + (params[n] - orig[n]).clamp(-p.norm_constraint, p.norm_constraint))
    deltas = {n: (params[n].detach() - orig[n]) for n in names}
    return EditResult("finetune", to_dict(p), list(requests), deltas,
                      info={"params": names, "loss_first": losses[0], "loss_last": losses[-1], "n_retain": len(retain)})
