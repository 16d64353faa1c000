"""MEMIT: a batch of edits spread over several MLP layers (Meng et al. 2023, "Mass-Editing Memory in a
Transformer").

    z_i = h_L(i) + delta_i     target residual at the LAST edited layer L, subject's last token,
                               delta_i optimised as in ROME (NLL over prefixes), ||delta_i|| <= 0.75 ||h_L||
    for l in layers (ascending):
        K = keys of every edit at l on the current model          [d_mlp, N]
        R = (Z - h_L(current)) / (number of layers left)           [d_model, N]
        Delta_l = R K^T (lambda C_l + K K^T)^-1     (float64)     then apply Delta_l and continue

Where we deliberately differ: "auto" layers are a window of max(1, n_layers // 4) layers ending at
the traced layer (on the 4-layer default: [0]); the least-squares solve uses one key per (request,
prompt) row (`per_prompt_keys`), each mapped to its own residual + delta_i, instead of the mean key
(the template keys differ at the first layers); the target optimisation carries ROME's KL term on
the subject's other facts (`kl_weight`, `essence`); lambda (mom2_update_weight) defaults to a value tuned on small
models (reference 1.5e4 for GPT-J) and C_l is E[k k^T] on the world's corpus; the clamp and Adam
lr are relative to ||h_L||; keys and residuals are averaged over the same context prefixes as
ROME's k*. With Pythia's parallel residual, the residual after block L moves exactly by what is
added to the MLP output of block L, so the target is optimised on that MLP output.

Defaults measured on the default model, 100 edits in one call at the traced layer 0
(`benchmarks/edit_quality.py`, requests seed 2; efficacy, paraphrase; same-relation change, ppl change):
  steps 100, lr 0.1, clamp 1, kl 1 (earlier defaults):   0.857, 0.74; -9.0 pt, +0.17
  steps 200, lr 0.2 (only the search converged further): 0.893, 0.75; -9.8 pt, +0.17
  steps 200, lr 0.2, clamp 2, kl 0.5:                    0.957, 0.84; -10.7 pt, +0.33  (seed 7: 0.917)
The search now runs on FastNeoX, in bf16 where that is native ("auto" precision). Retrained default
model (25 epochs), same requests, one process on a loaded machine (seconds include the scorecard):
  fp32, steps 200, lr 0.2:                               0.910, 0.85; -13.3 pt   340 s
  bf16, steps 200, lr 0.2:                               0.930, 0.82; -14.0 pt   264 s
  bf16, steps 100, lr 0.4 (the defaults):                0.930, 0.84; -14.5 pt   138 s
  bf16, steps  60, lr 0.6:                               0.917, 0.84; -15.1 pt    80 s
Edits of the same subject share one layer-0 key (the key of its last word), so their targets must
agree on one value; those were the worst group (0.70-0.79) before the longer search.

Query merging (Li et al. 2025; `merge_queries`): the requests of one subject share one target
delta (their rows are one owner in the target search and the solve), as for ROME; `forms` adds
the QA form to the edit prompts. Forget defaults (every new object the refusal): `FORGET_DEFAULTS`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from mechedit.edit.api import EditRequest, EditResult, register_method
from mechedit.edit.common import (FORMS, Batch, build_batch, context_prefixes, mean_keys, optimize_targets,
                                  resolve_layers, subject_groups, unreachable_note)
from mechedit.edit.self_targets import check_forget_target
from mechedit.edit.stats import second_moment, w_out_name
from mechedit.errors import SpecError
from mechedit.specio import OMIT_DEFAULT, to_dict


@dataclass(frozen=True)
class MemitParams:
    layer: int | list[int] | str = "auto"  # list of MLP layers, an int, "traced", "all" or "auto" (window ending at the traced layer)
    mom2_weight: float = 100.0  # lambda: weight of C against the new keys
    n_prefixes: int = 0  # corpus prefixes (out of distribution for a model trained on single sentences)
    prefix_words: int = 5
    kl_weight: float = 0.5  # KL(p_orig || p_edit) on the subjects' other facts (see common.essence_prompts)
    essence: str = "relations"  # "possessive" or "relations"
    per_prompt_keys: bool = True  # one key per (request, prompt) row in the solve instead of the mean key
    through_edit: bool = True  # one layer: optimise the targets through the solved edit (cross-talk included)
    steps: int = 100  # with lr 0.4 as good as 200 steps at lr 0.2, in half the time (module doc)
    lr_factor: float = 0.4  # Adam lr = lr_factor * ||h_L|| / sqrt(d_model)
    clamp_factor: float = 2.0  # ||delta_i|| <= clamp_factor * ||h_L|| (MEMIT: 0.75; a small model needs more)
    weight_decay: float = 0.05
    stop_loss: float = 0.05
    n_stats: int | None = None
    forms: str = "cloze"  # edit prompts: "cloze" (trained templates) or "cloze+qa"
    merge_queries: bool = False  # one target per subject (its requests' rows share one delta) instead of per request
    engine: str = "fast"  # target search on FastNeoX ("fast") or through the HF modules ("hf": the reference)
    precision: str = "auto"  # the search's forward/backward: "float32", "bfloat16" (autocast) or "auto" (bf16 where native)
    seed: int = 0
    # editing as unlearning: the refusal token, or the model's own answer ("self", "self_instruction",
    # "self_heldout": self-improvement, mechedit.edit.self_targets)
    forget_target: str = field(default="refusal", metadata=OMIT_DEFAULT)

    def validate(self) -> None:
        check_forget_target("memit", self.forget_target)
        if self.engine not in ("fast", "hf"):
            raise SpecError(f"memit: engine must be 'fast' or 'hf', got {self.engine!r}")
        if self.precision not in ("auto", "float32", "bfloat16"):
            raise SpecError(f"memit: precision must be 'auto', 'float32' or 'bfloat16', got {self.precision!r}")
        if self.mom2_weight < 0 or self.steps < 1 or self.lr_factor <= 0 or self.clamp_factor <= 0:
            raise SpecError("memit: mom2_weight >= 0, steps >= 1, lr_factor > 0, clamp_factor > 0")
        if self.forms not in FORMS:
            raise SpecError(f"memit: forms must be one of {', '.join(FORMS)}, got {self.forms!r}")


def memit_layers(bundle, layer, requests) -> list[int]:
    if layer == "all":
        return list(range(bundle.n_layers))
    if layer == "auto":
        # MEMIT's window (GPT-J: layers 3-8 of 28) ends at the causally traced MLP layer: a target
        # set at a later layer's residual of the subject token is read too late to move the answer
        # (on the 4-layer default only layer 0's MLP output can). Width: max(1, n_layers // 4).
        (top,) = resolve_layers(bundle, "traced", requests, allow_list=False)
        width = max(1, bundle.n_layers // 4)
        return list(range(max(0, top - width + 1), top + 1))
    return resolve_layers(bundle, layer, requests, allow_list=True)


@torch.no_grad()
def _residual_at(model, batch: Batch, layer: int, n: int | None) -> torch.Tensor:
    """h_layer (after block `layer`) at the subject token, averaged per request ([n, d_model]) or per row (n=None)."""
    hs = model(input_ids=batch.ids, attention_mask=batch.mask, output_hidden_states=True).hidden_states
    h = hs[layer + 1][torch.arange(len(batch.subj), device=batch.subj.device), batch.subj].double()
    if n is None:
        return h
    out = torch.zeros(n, h.shape[1], dtype=torch.float64, device=h.device)
    out.index_add_(0, batch.owner, h)
    return out / torch.bincount(batch.owner, minlength=n).unsqueeze(1).double()


@torch.no_grad()
def _row_keys(model, batch: Batch, layer: int) -> torch.Tensor:
    """The key at the subject token of every row. [rows, d_mlp]"""
    from mechedit.edit.stats import capture_keys

    with capture_keys(model, [layer]) as store:
        model(input_ids=batch.ids, attention_mask=batch.mask)
    return store[layer][0][torch.arange(len(batch.subj), device=batch.subj.device), batch.subj].double()


def spread_update(bundle, requests: list[EditRequest], layers: list[int], p,
                  solve: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[dict, dict]:
    """MEMIT's target-then-spread loop; `solve(layer, R [d_model, N], K [d_mlp, N]) -> Delta [d_model, d_mlp]`.

    Applies each layer's update to compute the next one's keys and residuals, then restores the
    model. Returns (deltas by parameter name, info).
    """
    model = bundle.model
    owners = subject_groups(bundle.world, requests) if p.merge_queries else list(range(len(requests)))
    n = max(owners) + 1  # targets: one per request, or one per subject (query merging)
    L = layers[-1]
    prefixes = context_prefixes(bundle.world, p.n_prefixes, p.prefix_words, p.seed)
    batch = build_batch(bundle, requests, prefixes, forms=p.forms, owners=owners)
    essence = build_batch(bundle, requests, prefixes, essence=True, essence_kind=p.essence,
                          owners=owners) if p.kl_weight > 0 else None
    h0 = _residual_at(model, batch, L, n)  # [n, d_model]
    h_norm = h0.norm(dim=1)
    per_row = p.per_prompt_keys
    joint_u = None
    if p.through_edit and len(layers) == 1:
        # one layer: the solved edit is linear in the targets, Delta = delta^T U, so the targets can be
        # optimised through the final edit (keys of layer L do not depend on layer L's own edit)
        K = (_row_keys(model, batch, L) if per_row else mean_keys(model, batch, L, n)).T  # [d_mlp, N]
        M = solve(L, torch.eye(K.shape[1], dtype=torch.float64, device=K.device), K)  # [N, d_mlp]: Delta = R M
        if per_row:
            G = torch.zeros(K.shape[1], n, dtype=torch.float64, device=K.device)
            G[torch.arange(K.shape[1], device=K.device), batch.owner] = 1.0
            M = G.T @ M  # [n, d_mlp]
        joint_u = M
    delta, info = optimize_targets(
        model, batch, essence, L, n, clamp=p.clamp_factor * h_norm,
        lr=p.lr_factor * float(h_norm.mean()) / math.sqrt(model.config.hidden_size), steps=p.steps,
        kl_weight=p.kl_weight, weight_decay=p.weight_decay, ref_norm=h_norm, stop_loss=p.stop_loss,
        joint_u=joint_u, engine=p.engine, precision=p.precision)
    # the target is "the residual moved by delta_i" at every prompt (row) of request i
    Z = (_residual_at(model, batch, L, None) + delta[batch.owner]) if per_row else h0 + delta  # [rows or n, d_model]
    deltas: dict[str, torch.Tensor] = {}
    applied: list[EditResult] = []
    try:
        for i, l in enumerate(layers):
            if per_row:
                K = _row_keys(model, batch, l).T  # [d_mlp, rows]
                R = (Z - _residual_at(model, batch, L, None)).T / (len(layers) - i)  # [d_model, rows]
            else:
                K = mean_keys(model, batch, l, n).T  # [d_mlp, n]
                R = (Z - _residual_at(model, batch, L, n)).T / (len(layers) - i)  # [d_model, n]
            name = w_out_name(l)
            W = dict(model.named_parameters())[name]
            dW = solve(l, R, K).to(W.dtype)
            deltas[name] = dW
            applied.append(EditResult("memit", {}, list(requests), {name: dW}).apply(model))
    finally:
        for r in reversed(applied):
            r.restore(model)
    info.update(layers=layers, target_layer=L, h_norm=float(h_norm.mean()), delta_norm=float(delta.norm(dim=1).mean()))
    note = unreachable_note(bundle, L)  # the targets z live at the last edited layer's subject token
    if note:
        info["note"] = note
    return deltas, info


# Editing as unlearning: one merged target per subject over its cloze and QA prompts (tuned with
# `benchmarks/forget_defaults.py runs/unlearning`: two single-subject forget sets of subjects named in the
# training instructions of analyses/worlds/unlearning.toml, never the ones the unlearning table forgets;
# forget recall after (cloze / paraphrase / QA), retain and same-relation neighbour change)):
# clamp 2 / KL 0.5 (the counterfactual values) 0.03 / 0.08 / 0.00, -0.05 / -0.05 points; clamp 4 / KL 0 the same.
FORGET_DEFAULTS = {"merge_queries": True, "forms": "cloze+qa"}


@register_method("memit", params=MemitParams, forget_defaults=FORGET_DEFAULTS)
def memit(bundle, requests: list[EditRequest], p: MemitParams) -> EditResult:
    layers = memit_layers(bundle, p.layer, requests)

    def solve(l, R, K):
        C = second_moment(bundle, l, p.n_stats)
        A = p.mom2_weight * C + K @ K.T  # [d_mlp, d_mlp]
        A = A + 1e-10 * A.diagonal().mean() * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)  # dead units
        return torch.linalg.solve(A, K @ R.T).T  # R K^T A^-1 (A symmetric)

    deltas, info = spread_update(bundle, requests, layers, p, solve)
    return EditResult("memit", {**to_dict(p), "layer": layers}, list(requests), deltas, info=info)
