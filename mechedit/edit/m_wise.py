"""WISE: a side memory routed by its activation (Wang et al. 2024, "WISE: Rethinking the Knowledge
Memory for Lifelong Model Editing of Large Language Models").

Dual memory at one layer's MLP down projection W (`dense_4h_to_h`, the reference's value matrix):
the main memory W stays frozen, the side memory W' = W + Delta is the only thing edited. With
a_t the module's input (the MLP's hidden activation) at position t:
    act_t = ||a_t (W' - W)^T|| = ||Delta a_t||            the activation gap of side vs main memory
    route to W' when act(x) > eps,  eps = act_ratio x min over edit prompts of act   (fixed from the edit data)
Training the side memory (edit loss + margin losses; reference alpha, beta, gamma):
    L = NLL(new object | edit prompt; W') + mean relu(act(x_irr) - alpha) + mean relu(beta - act(x_e))
        + mean_pairs relu(gamma - (act(x_e) - act(x_irr)))
with x_irr irrelevant inputs (corpus sentences about other subjects). Knowledge sharding: the
edits are split into `n_shards` shards; each shard trains its own Delta_i from 0 with a fixed
random gradient mask M_i (a fraction `mask_ratio` = rho of W's entries), Delta_i = Theta_i * M_i;
the shards are merged by Ties-merging (Yadav et al. 2023): keep each Delta_i's top `density`
entries by magnitude, elect a sign per entry (the sign of the sum), average the kept entries that
agree with it.

Where we deliberately differ, and why:
- act(x) at position t is the running maximum of act over positions <= t (METHODS: the max over
  tokens) and routing is decided per position. The reference routes a whole input by the mean
  act over its tokens (batch size 1); the running max is the causal version of a max over the
  prompt: a teacher-forced text is routed at each position exactly as generation up to there
  would be, right padding never influences a real position, and positions before the edited
  subject keep the main memory's bit-identical output;
- the margins are relative to the scale of the module's output (alpha, beta, gamma = factor x
  the mean ||W a|| on the irrelevant sentences): the reference's absolute 5 / 20 / 10 fit LLaMA's
  activations, not ours; we drop the reference's activation function on the outputs and use the
  plain norm of the gap (the routing quantity METHODS names);
- the edit loss is the NLL of every token of the new object, teacher-forced (per edit prompt the
  mean over the object's tokens, as ROME/MEMIT's target search): a new object of several tokens
  (BPE worlds) is learnt whole, not its first token alone (one token per object: the reference's loss);
- every shard trains on all of its edits jointly (Adam, lr relative to W's entry scale) instead
  of one edit after the other, and the threshold is computed on the MERGED memory (the reference
  keeps the min act seen while training the shards, before merging);
- one call = one side memory. Sequential calls each add a memory (the reference's `retrieve` mode
  with a memory per save_freq edits): a position is routed to the memory with the largest
  act / eps if that exceeds 1, so later edits never overwrite earlier ones. The reference's replay
  losses across memories are not implemented;
- the default layer is the last one ("auto"), where the last prompt token's activation already
  distinguishes subject and relation (the reference edits a late layer too, 27 of LLaMA-2's 32);
- defaults measured on the default model (10 counterfactual edits in one call, requests seed 11;
  efficacy / paraphrase / share of held-out corpus sentences routed to the side memory):
  one shard, rho 1:    1.00 / 0.90-1.00 / 3-4%   (the defaults, lr 5 x std(W), 70 steps)
  one shard, rho 0.5:  0.87-0.90 / 0.80-1.00 / 3-16%
  two shards, rho 0.5: 0.67-0.83 / 0.70-0.80 / 10-27%   (Ties-merged)
  two shards, rho 1:   0.90 / 0.80-0.90 / 47-96%, same-relation -7 to -8 points
  rho 0.2 (reference) did not reach the targets in 70-300 steps (efficacy 0.33-0.67): the 128 x 512
  matrix of a small model has too few free entries left; sharding splits the edits over shards
  that each change the whole output for the other shards' prompts, which the merge cannot undo.
  Margins at alpha 0.05 (ratio 1 : 10 to beta) are unreachable here (the best linear read-out
  separates an edit prompt from irrelevant inputs by ~3x at the max over positions).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch

from mechedit.edit.adaptors import Adaptor, register_adaptor_kind
from mechedit.edit.api import EditRequest, EditResult, register_method
from mechedit.edit.common import FORMS, answer_token_nll, build_batch, frozen_weights
from mechedit.edit.m_grace import adapted_layer, grace_module
from mechedit.edit.self_targets import check_forget_target
from mechedit.errors import MecheditError, SpecError
from mechedit.model.evaluate import pad
from mechedit.specio import OMIT_DEFAULT, to_dict

MEMORY_CHUNK = 16  # memories whose gaps are computed in one matmul at inference


def wise_module(layer: int) -> str:
    """The side memory's site: the layer's MLP down projection (GRACE's site too)."""
    return grace_module(layer)


@register_adaptor_kind("wise")
class WiseMemory:
    """Adaptor kind: tensors delta [d_out, d_in] (W' - W) and threshold [1] (eps)."""

    hook = "forward"

    @staticmethod
    def check(a: Adaptor, module) -> None:
        d, t = a.tensors.get("delta"), a.tensors.get("threshold")
        if d is None or t is None:
            raise MecheditError("wise adaptor needs delta and threshold")
        if tuple(d.shape) != tuple(module.weight.shape) or t.numel() != 1:
            raise MecheditError(f"wise adaptor shapes {tuple(d.shape)} / {t.numel()} do not fit {module}")

    @staticmethod
    def forward(site, module, args, output):
        x = args[0]  # [b, pos, d_in]
        if "stack" not in site.cache:
            site.cache["stack"] = (torch.stack([e.tensors["delta"] for e in site.entries]),
                                   torch.cat([e.tensors["threshold"].reshape(1) for e in site.entries]))
        deltas, thresholds = site.cache["stack"]
        best_r, best_o = route(x, deltas.to(x.dtype), thresholds.to(x.dtype))
        hit = best_r > 1
        if not bool(hit.any()):
            return None  # untouched: the main memory's own output
        return torch.where(hit.unsqueeze(-1), output + best_o, output)


def route(x: torch.Tensor, deltas: torch.Tensor, thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every position: the best memory's act/eps ratio (running max over positions) and its output gap.

    x [b, pos, d_in], deltas [m, d_out, d_in], thresholds [m] -> ([b, pos], [b, pos, d_out]).
    """
    b, pos, _ = x.shape
    d_out = deltas.shape[1]
    best_r = torch.full((b, pos), -1.0, dtype=x.dtype, device=x.device)
    best_o = torch.zeros(b, pos, d_out, dtype=x.dtype, device=x.device)
    for start in range(0, deltas.shape[0], MEMORY_CHUNK):
        d = deltas[start : start + MEMORY_CHUNK]  # [c, d_out, d_in]
        o = torch.einsum("bpi,coi->cbpo", x, d)  # [c, b, pos, d_out]
        r = torch.cummax(o.norm(dim=-1), dim=2).values / thresholds[start : start + MEMORY_CHUNK].view(-1, 1, 1)
        r_max, which = r.max(0)  # [b, pos]
        better = r_max > best_r
        o_sel = o.gather(0, which[None, ..., None].expand(1, b, pos, d_out))[0]
        best_o = torch.where(better.unsqueeze(-1), o_sel, best_o)
        best_r = torch.where(better, r_max, best_r)
    return best_r, best_o


@dataclass(frozen=True)
class WiseParams:
    layer: int | list[int] | str = "auto"  # the side memory's layer, or "auto" (the last layer)
    forms: str = "cloze"  # edit prompts: "cloze" (trained templates) or "cloze+qa"
    n_shards: int = 1  # knowledge shards (at most one per request; reference 2 = merge_freq / save_freq)
    mask_ratio: float = 1.0  # rho: share of W's entries each shard may change (reference 0.2)
    density: float = 0.53  # Ties-merging: share of each shard's entries kept (reference densities)
    steps: int = 70  # Adam steps per shard (reference n_iter)
    lr_factor: float = 5.0  # Adam lr = lr_factor * std(W)
    alpha: float = 0.2  # irrelevant inputs: act below alpha x mean ||W a|| (the reference's 5 : 20 : 10 ratios)
    beta: float = 0.8  # edit prompts: act above beta x mean ||W a||
    gamma: float = 0.4  # and above every irrelevant act by gamma x mean ||W a||
    margin_weight: float = 1.0  # weight of the three margin losses against the edit NLL (reference: 1)
    act_ratio: float = 0.88  # eps = act_ratio x min act over the edit prompts (reference 0.88)
    n_irrelevant: int = 512  # irrelevant sentences (their activations are computed once: W' does not change them)
    stop_loss: float = 0.05  # stop a shard when every answer token's NLL is below this and the margins hold
    seed: int = 0
    # editing as unlearning: the refusal token, or the model's own answer ("self", "self_instruction",
    # "self_heldout": self-improvement, mechedit.edit.self_targets)
    forget_target: str = field(default="refusal", metadata=OMIT_DEFAULT)

    def validate(self) -> None:
        check_forget_target("wise", self.forget_target)
        if self.forms not in FORMS:
            raise SpecError(f"wise: forms must be one of {', '.join(FORMS)}, got {self.forms!r}")
        if self.n_shards < 1 or not 0 < self.mask_ratio <= 1 or not 0 < self.density <= 1:
            raise SpecError("wise: n_shards >= 1, 0 < mask_ratio <= 1, 0 < density <= 1")
        if self.steps < 1 or self.lr_factor <= 0 or self.n_irrelevant < 1:
            raise SpecError("wise: steps >= 1, lr_factor > 0, n_irrelevant >= 1")
        if min(self.alpha, self.beta, self.gamma) < 0 or not 0 < self.act_ratio <= 1:
            raise SpecError("wise: alpha, beta, gamma >= 0 and 0 < act_ratio <= 1")


@contextlib.contextmanager
def side_memory(model, layer: int, delta: torch.Tensor, store: dict):
    """Training mode: every position of every row reads the side memory W + delta; records act [b, pos]."""
    mod = model.gpt_neox.layers[layer].mlp.dense_4h_to_h

    def hook(module, args, output):
        o = args[0] @ delta.T.to(args[0].dtype)  # [b, pos, d_out]
        store["act"] = o.norm(dim=-1)
        return output + o

    h = mod.register_forward_hook(hook)
    try:
        yield store
    finally:
        h.remove()


def irrelevant_sentences(world, requests: list[EditRequest]) -> list[str]:
    """Corpus sentences that name none of the edited subjects (the margin losses' x_irr)."""
    names = {world.subjects[world.fact(r.subject, r.relation).subject].name for r in requests}
    return [s for s in world.corpus() if not any(f" {n} " in f" {s} " for n in names)]


def ties_merge(deltas: list[torch.Tensor], density: float) -> torch.Tensor:
    """Ties-merging of task vectors: trim to the top `density` by magnitude, elect signs, disjoint mean."""
    if len(deltas) == 1:
        return deltas[0]
    trimmed = []
    for d in deltas:
        flat = d.abs().reshape(-1)
        k = max(1, int(round(density * int((flat > 0).sum()))))
        thr = flat.topk(k).values[-1] if int((flat > 0).sum()) else flat.new_tensor(float("inf"))
        trimmed.append(torch.where(d.abs() >= thr, d, torch.zeros_like(d)))
    t = torch.stack(trimmed)  # [k, ...]
    sign = torch.sign(t.sum(0))
    agree = (torch.sign(t) == sign) & (t != 0)
    return (t * agree).sum(0) / agree.sum(0).clamp(min=1)


# Editing as unlearning: cloze and QA prompts (tuned with
# `benchmarks/forget_defaults.py runs/unlearning`: two single-subject forget sets of subjects named in the
# training instructions of analyses/worlds/unlearning.toml, never the ones the unlearning table forgets;
# forget recall after (cloze / paraphrase / QA), retain and same-relation neighbour change)):
# one shard, rho 1: 0.00 / 0.00 / 0.00 with 0.0 / 0.0 points; two shards, rho 0.5: the same (a tie; the
# rule keeps the first).
FORGET_DEFAULTS = {"forms": "cloze+qa"}


@register_method("wise", params=WiseParams, forget_defaults=FORGET_DEFAULTS)
def wise(bundle, requests: list[EditRequest], p: WiseParams) -> EditResult:
    model = bundle.model
    layer = adapted_layer(bundle, p.layer)
    W = model.gpt_neox.layers[layer].mlp.dense_4h_to_h.weight.detach()
    batch = build_batch(bundle, requests, [""], forms=p.forms)
    pool = irrelevant_sentences(bundle.world, requests)
    if not pool:
        raise MecheditError("wise: no corpus sentence is free of the edited subjects (the margins need some)")
    tok = bundle.tokenizer
    pool_ids = [tok(s)["input_ids"] for s in pool]
    gen = torch.Generator("cpu").manual_seed(p.seed)
    irr_ids, irr_mask = _sample(pool_ids, p.n_irrelevant, tok.pad_token_id, gen, model.device)
    irr_a, scale = _activations(model, layer, irr_ids, irr_mask)  # [n, pos, d_mlp], mean ||W a||
    alpha, beta, gamma = p.alpha * scale, p.beta * scale, p.gamma * scale
    n_shards = min(p.n_shards, len(requests))
    shard_of = np.array_split(np.arange(len(requests)), n_shards)
    shards, infos = [], []
    for i, reqs in enumerate(shard_of):
        rows = torch.isin(batch.owner, torch.as_tensor(reqs, device=batch.owner.device))
        mask = (torch.rand(W.shape, generator=gen, device="cpu") < p.mask_ratio).to(W.device, W.dtype)  # seeded on the CPU: same masks on every device
        d, info = _train_shard(model, layer, batch, rows, mask, (irr_a, irr_mask), p,
                               lr=p.lr_factor * float(W.std()), margins=(alpha, beta, gamma))
        shards.append(d)
        infos.append(info)
    delta = ties_merge(shards, p.density)
    act_edit = _row_act(model, layer, delta, batch.ids, batch.mask)  # [rows]
    threshold = p.act_ratio * float(act_edit.min())
    held_ids, held_mask = _sample(pool_ids, 512, tok.pad_token_id, torch.Generator("cpu").manual_seed(p.seed + 1),
                                 model.device)
    held = _row_act(model, layer, delta, held_ids, held_mask)  # a second seeded sample (may overlap the first)
    adaptor = Adaptor("wise", wise_module(layer), {"delta": delta.to(W.dtype).contiguous(),
                                                   "threshold": torch.tensor([threshold], dtype=torch.float32, device=W.device)},
                      {"layer": layer})
    info = {"layer": layer, "n_shards": n_shards, "shards": infos, "threshold": threshold,
            "act_edit_min": float(act_edit.min()), "act_edit_mean": float(act_edit.mean()),
            "act_irrelevant_mean": float(held.mean()), "irrelevant_routed": float((held > threshold).float().mean()),
            "output_scale": scale, "margins": [alpha, beta, gamma],
            "delta_nonzero": float((delta != 0).float().mean())}
    return EditResult("wise", {**to_dict(p), "layer": layer}, list(requests), {}, info=info, adaptors=[adaptor])


def _sample(pool_ids, n: int, pad_id: int, gen: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randperm(len(pool_ids), generator=gen, device="cpu")[:n]
    return pad([pool_ids[int(i)] for i in idx], pad_id, device)


@torch.no_grad()
def _activations(model, layer: int, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The down projection's inputs a_t [n, pos, d_mlp] and its mean output norm ||W a|| over real tokens."""
    from mechedit.edit.stats import capture_keys

    out = {}
    h = model.gpt_neox.layers[layer].mlp.dense_4h_to_h.register_forward_hook(lambda m, i, o: out.setdefault("o", o))
    try:
        with capture_keys(model, [layer]) as store:
            model(input_ids=ids, attention_mask=mask)
    finally:
        h.remove()
    return store[layer][0], float(out["o"][mask.bool()].norm(dim=-1).mean())


def _max_act(a: torch.Tensor, mask: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per row, the max over its real positions of ||delta a_t||: a [n, pos, d_in], mask [n, pos] -> [n]."""
    return (a @ delta.T).norm(dim=-1).masked_fill(mask == 0, 0).max(1).values


@torch.no_grad()
def _row_act(model, layer: int, delta: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """act of each row: the max over its real positions of ||delta a_t||. [rows]"""
    store: dict = {}
    with side_memory(model, layer, delta, store):
        model(input_ids=ids, attention_mask=mask)
    return store["act"].masked_fill(mask == 0, 0).max(1).values


def _train_shard(model, layer, batch, rows, mask, irrelevant, p: WiseParams, *, lr: float,
                 margins: tuple[float, float, float]) -> tuple[torch.Tensor, dict]:
    alpha, beta, gamma = margins
    theta = torch.zeros_like(mask, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=lr)
    ids, am = batch.ids[rows], batch.mask[rows]
    width = int(am.sum(1).max())
    ids, am = ids[:, :width], am[:, :width]
    # every answer token of the shard's rows (a new object of several tokens: each at its position)
    a_row, a_pos, a_tgt = batch.answers()
    mine = rows[a_row]
    sub = torch.cumsum(rows.long(), 0) - 1  # batch row -> row of this shard
    a_row, a_pos, a_tgt = sub[a_row[mine]], a_pos[mine], a_tgt[mine]
    n_rows = int(rows.sum())
    store: dict = {}
    hist = []
    model.eval()
    with frozen_weights(model):
        for _ in range(p.steps):
            delta = theta * mask
            with side_memory(model, layer, delta, store):
                logits = model(input_ids=ids, attention_mask=am).logits
            act_e = store["act"].masked_fill(am == 0, 0).max(1).values  # [rows]
            act_i = _max_act(*irrelevant, delta)  # [n_irrelevant]
            nll_tok, nll = answer_token_nll(logits, a_row, a_pos, a_tgt, n_rows)  # [answer tokens], [rows]
            l_irr = torch.relu(act_i - alpha).mean()
            l_edit = torch.relu(beta - act_e).mean()
            l_gap = torch.relu(gamma - (act_e[:, None] - act_i[None, :])).mean()
            loss = nll.mean() + p.margin_weight * (l_irr + l_edit + l_gap)
            hist.append(float(nll.detach().mean()))
            if float(nll_tok.detach().max()) < p.stop_loss and float((l_irr + l_edit + l_gap).detach()) == 0:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
    return (theta * mask).detach(), {"steps": len(hist), "nll_first": hist[0], "nll_last": hist[-1],
                                     "margin_loss_last": float((l_irr + l_edit + l_gap).detach())}
