"""GRACE: a discrete key-value codebook at one layer (Hartvigsen et al. 2023, "Aging with GRACE:
Lifelong Model Editing with Discrete Key-Value Adaptors").

The adapted module is the MLP down projection of one layer (`dense_4h_to_h`, as the reference's
GPT models adapt `mlp.c_proj`). Codebook entries (k_i, v_i, eps_i, y_i): k_i the module's input at
an edit token (d_mlp), v_i the output that replaces the module's (d_model), eps_i a deferral radius,
y_i the label (the token the output must predict). At inference, for an input x at a position:
    i* = argmin_i ||x - k_i||;   output = v_i*  if ||x - k_i*|| <= eps_i*,  else the module's own output
so every input outside every ball is computed bit-identically to the unedited model.
Editing a query (x, y) (reference `GRACEAdapter.forward`, eps_expand "coverage"):
    no key within eps_n + eps_init        -> add (x, v, eps_init, y)
    nearest key n has another label      -> add (x, v, d/2, y) and split: eps_n <- d/2
    nearest key n has the same label     -> expand: eps_n <- d if d > eps_n (coverage)
and v is trained by gradient steps so the model outputs y ("warm" init: the module's own output).

Where we deliberately differ, and why:
- a new object of several tokens (BPE worlds) is several queries per edit prompt: the edit tokens
  are the prompt's last token and each teacher-forced token of the new object but its last, and the
  query at answer token j is the module's input there with label = the object's token j. The
  reference keys only the last prompt token (one token per label); keying that position alone would
  teach the object's first token and leave the model to continue it as it did before (the old
  object, when both start with the same piece). The keys at a layer do not depend on that layer's
  codebook (its output is not an input of the same layer's MLP at any position), so the teacher-
  forced keys are the ones greedy generation of the new object meets. One token per object gives
  exactly the reference's one query per prompt;
- every position is a query (the reference decides once per input at the last prompt token, a
  `key_id` that it then keeps for later inputs, and writes the value there): a position's output is
  replaced only if its own input lies in a ball, which is the same rule applied causally to every
  position of a teacher-forced text, so membership-inference and probe inputs see the edit too;
- the edit prompts of one call are the trained cloze templates of each request (`forms` adds the
  QA form); the keys and radii of the whole call are placed first (in request order, with the rules
  above), then every new value is trained jointly on every prompt of the call (Adam; lr relative to
  the residual norm at that layer). The reference trains each value right after placing its key;
  joint training keeps the earlier prompts of an expanded entry in the loss;
- entries of EARLIER calls (adaptors already attached at this module) are never changed, so
  sequential edits never overwrite earlier ones: where the reference would expand or halve an
  earlier entry, we add a new entry (same label) or halve only the new one (other label); the
  nearest key still decides between overlapping balls;
- eps_init = `eps_factor` x the median over the call's last-prompt-token queries of the distance
  to the nearest query of another fact (last-token keys of the world's trained cloze prompts), unless `eps_init`
  is given: the reference's absolute radius (1.0 for GPT-2 XL) has no meaning at another scale;
- the default layer is the last one ("auto"): the last prompt token's input there already holds
  the subject and relation (attention has moved them), which is what a codebook key must tell apart;
- `max_eps_factor` caps how far expansions may grow a radius (a new entry instead). With the
  refusal as every query's label (editing as unlearning) coverage expansions chain: 24 forget
  prompts of one subject became 2 entries of radius 1.3 and 3.6 x eps_init, which refused 18-37% of
  the retained facts; the forget defaults cap expansion at eps_init (`FORGET_DEFAULTS`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from mechedit.edit.adaptors import Adaptor, attach, detach, register_adaptor_kind, site_entries
from mechedit.edit.api import EditRequest, EditResult, register_method
from mechedit.edit.common import FORMS, answer_token_nll, build_batch, frozen_weights
from mechedit.edit.self_targets import check_forget_target
from mechedit.edit.stats import capture_keys
from mechedit.errors import MecheditError, SpecError
from mechedit.model.evaluate import pad
from mechedit.specio import OMIT_DEFAULT, to_dict


def grace_module(layer: int) -> str:
    return f"gpt_neox.layers.{layer}.mlp.dense_4h_to_h"


@register_adaptor_kind("grace")
class GraceCodebook:
    """Adaptor kind: tensors keys [n, d_in], values [n, d_out], eps [n], labels [n] (token ids)."""

    hook = "forward"

    @staticmethod
    def check(a: Adaptor, module) -> None:
        k, v, e, y = (a.tensors.get(n) for n in ("keys", "values", "eps", "labels"))
        if k is None or v is None or e is None or y is None:
            raise MecheditError("grace adaptor needs keys, values, eps and labels")
        if not (k.shape[0] == v.shape[0] == e.shape[0] == y.shape[0]):
            raise MecheditError("grace adaptor: keys, values, eps and labels differ in length")
        if k.shape[1] != module.in_features or v.shape[1] != module.out_features:
            raise MecheditError(f"grace adaptor shapes {tuple(k.shape)}/{tuple(v.shape)} do not fit {module}")

    @staticmethod
    def codebook(site) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values and radii of every attached entry, in attach order (cached unless values train)."""
        training = any(e.tensors["values"].requires_grad for e in site.entries)
        if training or "codebook" not in site.cache:
            cb = tuple(torch.cat([e.tensors[n] for e in site.entries]) for n in ("keys", "values", "eps"))
            if training:
                return cb
            site.cache["codebook"] = cb
        return site.cache["codebook"]

    @staticmethod
    def forward(site, module, args, output):
        keys, values, eps = GraceCodebook.codebook(site)
        hit, idx = lookup(args[0], keys, eps)
        if not bool(hit.any()):
            return None  # untouched: the module's own output object
        flat = output.reshape(-1, output.shape[-1])
        v = values.to(output.dtype)[idx.reshape(-1)]  # [b*pos, d_out]
        return torch.where(hit.reshape(-1, 1), v, flat).reshape(output.shape)


MARGIN = 1e-3  # relative: batched (matmul) distances carry float error; a radius must not sit on its query


def lookup(x: torch.Tensor, keys: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest key of every position of x [..., d] and whether it lies inside that key's ball: ([...], [...])."""
    flat = x.detach().reshape(-1, x.shape[-1]).float()
    d = torch.cdist(flat, keys.float())  # [positions, n]
    dmin, idx = d.min(1)
    hit = dmin <= eps.float()[idx]
    return hit.reshape(x.shape[:-1]), idx.reshape(x.shape[:-1])


@dataclass(frozen=True)
class GraceParams:
    layer: int | list[int] | str = "auto"  # the adapted layer, or "auto" (the last layer)
    forms: str = "cloze"  # edit prompts: "cloze" (trained templates) or "cloze+qa"
    eps_init: float = 0.0  # initial radius; 0 = eps_factor x median distance to another fact's nearest query
    eps_factor: float = 0.5
    max_eps_factor: float = 0.0  # an expansion may grow a radius to at most this x eps_init (0 = no cap, the reference)
    n_reference: int = 2000  # trained cloze prompts whose last-token keys set the automatic radius
    steps: int = 100  # Adam steps for the values (stops when every answer token's NLL < stop_loss)
    lr_factor: float = 0.5  # Adam lr = lr_factor * ||h_l|| / sqrt(d_model) (0.1: 5 edits had not converged in 200 steps)
    stop_loss: float = 0.05
    seed: int = 0
    # editing as unlearning: the refusal token, or the model's own answer ("self", "self_instruction",
    # "self_heldout": self-improvement, mechedit.edit.self_targets)
    forget_target: str = field(default="refusal", metadata=OMIT_DEFAULT)

    def validate(self) -> None:
        check_forget_target("grace", self.forget_target)
        if self.forms not in FORMS:
            raise SpecError(f"grace: forms must be one of {', '.join(FORMS)}, got {self.forms!r}")
        if self.eps_init < 0 or self.eps_factor <= 0 or self.n_reference < 1:
            raise SpecError("grace: eps_init >= 0, eps_factor > 0, n_reference >= 1")
        if self.max_eps_factor != 0 and self.max_eps_factor < 1:
            raise SpecError("grace: max_eps_factor must be 0 (no cap) or >= 1")
        if self.steps < 1 or self.lr_factor <= 0 or self.stop_loss < 0:
            raise SpecError("grace: steps >= 1, lr_factor > 0, stop_loss >= 0")


def adapted_layer(bundle, layer) -> int:
    """"auto" = the last layer; else one integer layer inside the model."""
    if layer == "auto":
        return bundle.n_layers - 1
    if isinstance(layer, (list, tuple)):
        if len(layer) != 1:
            raise MecheditError("this method adapts one layer; give an integer layer")
        layer = layer[0]
    if isinstance(layer, str):
        raise MecheditError(f"layer must be an integer or 'auto', got {layer!r}")
    if not 0 <= int(layer) < bundle.n_layers:
        raise MecheditError(f"layer {layer} is out of range (the model has layers 0..{bundle.n_layers - 1})")
    return int(layer)


def last_token_io(model, layer: int, ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor):
    """Input and output of layer `layer`'s down projection at each row's `last` position: ([b, d_mlp], [b, d_model])."""
    return token_io(model, layer, ids, mask, torch.arange(len(last), device=last.device), last)


@torch.no_grad()
def token_io(model, layer: int, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor):
    """Input and output of layer `layer`'s down projection at (rows[i], pos[i]): ([n, d_mlp], [n, d_model])."""
    out = {}
    mod = model.gpt_neox.layers[layer].mlp.dense_4h_to_h
    h = mod.register_forward_hook(lambda m, i, o: out.setdefault("o", o))
    try:
        with capture_keys(model, [layer]) as store:
            model(input_ids=ids, attention_mask=mask)
    finally:
        h.remove()
    return store[layer][0][rows, pos].float(), out["o"][rows, pos].float()


def reference_keys(bundle, layer: int, exclude_facts: set[int], n: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Last-token keys of (a seeded sample of) the world's trained cloze prompts of other facts."""
    probes = [p for p in bundle.world.probes(bundle.world.train_facts, kinds=("cloze",)) if p.fact not in exclude_facts]
    if len(probes) > n:
        idx = np.sort(np.random.default_rng([seed, 3]).choice(len(probes), n, replace=False))
        probes = [probes[int(i)] for i in idx]
    keys, facts = [], []
    for start in range(0, len(probes), 512):
        chunk = probes[start : start + 512]
        seqs = [bundle.tokenizer(p.prompt)["input_ids"] for p in chunk]
        dev = bundle.model.device
        ids, mask = pad(seqs, bundle.tokenizer.pad_token_id, dev)
        k, _ = last_token_io(bundle.model, layer, ids, mask, torch.tensor([len(s) - 1 for s in seqs], device=dev))
        keys.append(k)
        facts += [p.fact for p in chunk]
    return torch.cat(keys), np.array(facts)


def prior_codebook(model, module: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[Adaptor]]:
    """Keys, radii, labels of the GRACE entries already attached at `module` (earlier calls), and those adaptors."""
    entries = site_entries(model, module, "grace")
    if not entries:
        dev = model.device
        return (torch.zeros(0, 0, device=dev), torch.zeros(0, device=dev), torch.zeros(0, dtype=torch.long, device=dev), [])
    return (torch.cat([e.tensors["keys"] for e in entries]).float(), torch.cat([e.tensors["eps"] for e in entries]).float(),
            torch.cat([e.tensors["labels"] for e in entries]), entries)


def place_entries(queries: torch.Tensor, labels: list[int], prior_k: torch.Tensor, prior_e: torch.Tensor,
                  prior_y: torch.Tensor, eps_init: float, max_eps: float = math.inf
                  ) -> tuple[list[int], list[float], list[int], dict]:
    """GRACE's add / expand / split rules over the call's queries, earlier entries kept as they are.

    An expansion beyond `max_eps` adds an entry instead. Returns (query index that each new entry
    was keyed on, its radius, its label, counts).
    """
    keys: list[int] = []
    eps: list[float] = []
    ys: list[int] = []
    counts = {"add": 0, "expand": 0, "split": 0, "covered": 0, "uncovered": 0}

    def add(qi: int, radius: float, y: int, how: str = "add") -> None:
        keys.append(qi)
        eps.append(radius)
        ys.append(y)
        counts[how] += 1

    n_prior = prior_k.shape[0]
    dev = queries.device
    for qi, (q, y) in enumerate(zip(queries, labels)):
        if n_prior + len(keys) == 0:
            add(qi, eps_init, y)
            continue
        cand_k = torch.cat([prior_k, queries[keys]]) if n_prior else queries[keys]
        cand_e = torch.cat([prior_e, torch.tensor(eps, device=dev)]) if n_prior else torch.tensor(eps, device=dev)
        cand_y = torch.cat([prior_y, torch.tensor(ys, dtype=torch.long, device=dev)]) if n_prior else torch.tensor(ys, device=dev)
        d = torch.linalg.vector_norm(cand_k - q, dim=1)
        dn, n = float(d.min()), int(d.argmin())
        if dn > float(cand_e[n]) + eps_init:
            add(qi, eps_init, y)
        elif int(cand_y[n]) != y:
            add(qi, dn / 2 * (1 - MARGIN), y, "split")
            if n >= n_prior:  # the reference halves the nearest entry too (strictly, so the balls do not touch)
                eps[n - n_prior] = dn / 2 * (1 - MARGIN)
        elif dn > float(cand_e[n]):
            if n >= n_prior and dn * (1 + MARGIN) > max_eps:  # the cap: a new entry instead of a larger ball
                add(qi, eps_init, y)
            elif n >= n_prior:  # coverage, with a margin over the float error of batched distances
                eps[n - n_prior] = dn * (1 + MARGIN)
                counts["expand"] += 1
            else:  # an earlier call's entry is never changed: a new entry of the same label instead
                add(qi, eps_init, y)
        else:
            counts["covered"] += 1
    # a later split can leave an earlier query outside every ball of its label: give it its own entry
    for qi, (q, y) in enumerate(zip(queries, labels)):
        all_k = torch.cat([prior_k, queries[keys]]) if n_prior else queries[keys]
        all_e = torch.cat([prior_e, torch.tensor(eps, device=dev)]) if n_prior else torch.tensor(eps, device=dev)
        all_y = torch.cat([prior_y, torch.tensor(ys, dtype=torch.long, device=dev)]) if n_prior else torch.tensor(ys, device=dev)
        hit, idx = lookup(q[None], all_k, all_e)
        if bool(hit[0]) and int(all_y[idx[0]]) == y:
            continue
        other = all_y != y
        d_other = float(torch.linalg.vector_norm(all_k[other] - q, dim=1).min()) if bool(other.any()) else math.inf
        add(qi, min(eps_init, d_other / 2 * (1 - MARGIN)), y, "uncovered")
    return keys, eps, ys, counts


# Forget defaults (every label the refusal; `benchmarks/forget_defaults.py runs/unlearning`: two single-subject
# forget sets of subjects named in the training instructions of analyses/worlds/unlearning.toml, never the
# ones the unlearning table forgets; forget recall after (cloze / paraphrase / QA), retain and same-relation
# neighbour change): uncapped, eps_factor 0.5 / 1 / 2: 0.00 / 0.00 / 0.00 but -37 / -18 / -29 points of
# retain; capped at eps_init (max_eps_factor 1): eps_factor 0.5 0.00 / 0.17 / 0.00 with 0.0 / 0.0 points,
# eps_factor 1 0.00 / 0.00 / 0.00 with -2.5 / -2.6 points (over the 2-point retain bound).
FORGET_DEFAULTS = {"forms": "cloze+qa", "eps_factor": 0.5, "max_eps_factor": 1.0}


@register_method("grace", params=GraceParams, forget_defaults=FORGET_DEFAULTS)
def grace(bundle, requests: list[EditRequest], p: GraceParams) -> EditResult:
    model = bundle.model
    layer = adapted_layer(bundle, p.layer)
    module = grace_module(layer)
    batch = build_batch(bundle, requests, [""], forms=p.forms)
    a_row, a_pos, a_tgt = batch.answers()  # every answer token of every edit prompt: one query each
    queries, v_init = token_io(model, layer, batch.ids, batch.mask, a_row, a_pos)  # [answers, d_mlp], [answers, d_model]
    labels = a_tgt.tolist()
    edited = {bundle.world.fact(r.subject, r.relation).index for r in requests}
    eps_init = p.eps_init
    if eps_init == 0:
        ref_k, _ = reference_keys(bundle, layer, edited, p.n_reference, p.seed)
        if ref_k.shape[0] == 0:
            raise MecheditError("grace: no other trained facts to scale the radius by; give eps_init")
        at_prompt = queries[a_pos == batch.last[a_row]]  # the last prompt tokens: what the reference keys are
        eps_init = p.eps_factor * float(torch.cdist(at_prompt, ref_k).min(1).values.median())
    prior_k, prior_e, prior_y, prior = prior_codebook(model, module)
    if prior_k.shape[0] and prior_k.shape[1] != queries.shape[1]:
        raise MecheditError("grace: the attached codebook does not fit this layer")
    max_eps = p.max_eps_factor * eps_init if p.max_eps_factor else math.inf
    kidx, eps, ys, counts = place_entries(queries, labels, prior_k, prior_e, prior_y, eps_init, max_eps)
    if not kidx:  # every query already inside an earlier entry of its label
        return EditResult("grace", {**to_dict(p), "layer": layer}, list(requests), {},
                          info={"layer": layer, "eps_init": eps_init, "n_entries": 0, **counts})
    dev = queries.device
    keys = queries[kidx].clone()
    values = v_init[kidx].clone()
    h_norm = float(residual_at_last(model, batch, layer))
    values, info = train_values(bundle, batch, module, keys, values, torch.tensor(eps, device=dev), torch.tensor(ys, device=dev),
                                lr=p.lr_factor * h_norm / math.sqrt(model.config.hidden_size), steps=p.steps,
                                stop_loss=p.stop_loss)
    adaptor = Adaptor("grace", module, {"keys": keys, "values": values, "eps": torch.tensor(eps, dtype=torch.float32, device=dev),
                                        "labels": torch.tensor(ys, dtype=torch.long, device=dev)}, {"layer": layer})
    info.update(layer=layer, eps_init=eps_init, n_entries=len(kidx), n_prior_entries=int(prior_k.shape[0]),
                n_queries=len(labels), h_norm=h_norm, eps=[round(e, 6) for e in eps], **counts)
    return EditResult("grace", {**to_dict(p), "layer": layer}, list(requests), {}, info=info, adaptors=[adaptor])


@torch.no_grad()
def residual_at_last(model, batch, layer: int) -> float:
    hs = model(input_ids=batch.ids, attention_mask=batch.mask, output_hidden_states=True).hidden_states
    return float(hs[layer + 1][torch.arange(len(batch.last), device=batch.last.device), batch.last].norm(dim=-1).mean())


def train_values(bundle, batch, module: str, keys, values, eps, labels, *, lr: float, steps: int,
                 stop_loss: float) -> tuple[torch.Tensor, dict]:
    """Train the new entries' values with the whole codebook attached (earlier entries + these), on
    the NLL of every answer token at its position (teacher-forced)."""
    model = bundle.model
    values = values.detach().clone().requires_grad_(True)
    trial = Adaptor("grace", module, {"keys": keys, "values": values, "eps": eps.float(), "labels": labels})
    opt = torch.optim.Adam([values], lr=lr)
    rows, pos, tgt = batch.answers()
    losses = []
    model.eval()
    attach(model, trial)
    try:
        with frozen_weights(model):
            for _ in range(steps):
                logits = model(input_ids=batch.ids, attention_mask=batch.mask).logits
                nll, _ = answer_token_nll(logits, rows, pos, tgt, len(batch.last))  # [answer tokens]
                losses.append(float(nll.detach().mean()))
                if float(nll.detach().max()) < stop_loss:
                    break
                opt.zero_grad()
                nll.mean().backward()
                opt.step()
    finally:
        detach(model, trial)
    return values.detach().clone(), {"steps": len(losses), "nll_first": losses[0], "nll_last": losses[-1]}
