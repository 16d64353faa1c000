"""Pieces shared by the locate-then-edit methods: layers, edit prompts, context prefixes, keys and targets.

Positions: every edit prompt is `<bos> [prefix words] prompt words`; the subject's last token is
where ROME/MEMIT read the key and write the value. The "target" is a vector added to the output of
one MLP at that token (with Pythia's parallel residual, adding to the MLP output of block L is the
same as adding to the residual stream h_L after that block).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from mechedit.edit.api import EditRequest
from mechedit.edit.stats import capture_keys
from mechedit.errors import MecheditError
from mechedit.model.evaluate import pad


def resolve_layers(bundle, layer, requests: list[EditRequest], *, allow_list: bool) -> list[int]:
    """`layer` as an int, a list of ints (MEMIT/AlphaEdit) or "traced" (mechedit.trace.locate_for)."""
    n = bundle.n_layers
    if isinstance(layer, str):
        if layer != "traced":
            raise MecheditError(f"layer must be an integer, a list of integers or 'traced', got {layer!r}")
        from mechedit.trace import locate_for  # lazy: tracing is only needed for this path

        facts = [bundle.world.fact(r.subject, r.relation) for r in requests]
        layers = [int(locate_for(bundle, facts=facts).layer)]
    elif isinstance(layer, (list, tuple)):
        if not allow_list and len(layer) != 1:
            raise MecheditError("this method edits one layer; give an integer layer")
        layers = [int(x) for x in layer]
    else:
        layers = [int(layer)]
    if not layers:
        raise MecheditError("no layers given")
    for l in layers:
        if not 0 <= l < n:
            raise MecheditError(f"layer {l} is out of range (the model has layers 0..{n - 1})")
    return sorted(set(layers))


FORMS = ("cloze", "cloze+qa")


def edit_prompts(world, req: EditRequest, forms: str = "cloze") -> list[str]:
    """The trained cloze templates of the fact (the held-out paraphrase and QA stay for evaluation);
    `forms="cloze+qa"` adds the QA form (the forget data the unlearning methods train on)."""
    if forms not in FORMS:
        raise MecheditError(f"forms must be one of {', '.join(FORMS)}, got {forms!r}")
    f = world.fact(req.subject, req.relation)
    out = [world.prompt(f, t) for t in range(world.n_templates) if t != f.heldout_template]
    return out + [world.prompt(f, -1)] if forms == "cloze+qa" else out


def subject_groups(world, requests: list[EditRequest]) -> list[int]:
    """Query merging (Li et al. 2025): the group of each request = its subject (first-seen order), so
    that every forget query of one target shares one key and one value."""
    ids: dict[int, int] = {}
    return [ids.setdefault(world.fact(r.subject, r.relation).subject, len(ids)) for r in requests]


def context_prefixes(world, n: int, max_words: int, seed: int) -> list[str]:
    """"" plus `n` short prefixes: the first 1..max_words words of seeded random corpus sentences."""
    if n <= 0:
        return [""]
    corpus = world.corpus()
    rng = np.random.default_rng([seed, 7])
    out = [""]
    for i in rng.choice(len(corpus), size=n, replace=len(corpus) < n):
        words = corpus[int(i)].split()
        k = int(rng.integers(1, max(2, min(max_words, len(words)) + 1)))
        out.append(" ".join(words[:k]))
    return out


@dataclass
class Batch:
    """Tokenised (prefix + prompt) texts with the subject's last token and the answer position."""

    ids: torch.Tensor  # [b, pos]
    mask: torch.Tensor  # [b, pos]
    subj: torch.Tensor  # [b] position of the subject's last token
    last: torch.Tensor  # [b] position of the prompt's last token (predicts the object)
    target: torch.Tensor  # [b] first token id of the new object
    owner: torch.Tensor  # [b] index of the request each row belongs to


def essence_prompts(world, req: EditRequest, kind: str) -> list[str]:
    """Prompts about the subject whose predictions the edit should keep (ROME's KL "essence" term).

    "possessive": "{subject} 's" (the nearest this world has to ROME's "{subject} is a");
    "relations": one trained cloze prompt (the first trained template) of each of the subject's
    OTHER facts, plus "{subject} 's" -- with a distributed subject representation this is what
    keeps the subject's other relations (the KL is to the unedited model's own predictions).
    """
    f = world.fact(req.subject, req.relation)
    name = world.subjects[f.subject].name
    out = [f"{name} 's"]
    if kind == "relations":
        for g in world.facts_of(f.subject):
            if g.relation != f.relation and world.is_trained(g):
                t = next(x for x in range(world.n_templates) if x != g.heldout_template)
                out.append(world.prompt(g, t))
    return out


def build_batch(bundle, requests: list[EditRequest], prefixes: list[str], *, essence: bool = False,
                essence_kind: str = "possessive", forms: str = "cloze", owners: list[int] | None = None) -> Batch:
    """Rows for every (request, prefix, prompt); `essence=True` uses the essence prompts (ROME's KL term).

    `owners[i]` is the target (row owner) of request i; default i. Query merging gives every request
    of one subject the same owner (`subject_groups`), so their rows share one key and one value.
    """
    tok, world = bundle.tokenizer, bundle.world
    seqs, subj, last, target, owner = [], [], [], [], []
    # an essence prompt that is itself being edited in this call cannot also be kept (KL) unchanged
    seen: set[tuple[int, str]] = set()
    edited = {q for r in requests for q in edit_prompts(world, r, "cloze+qa")} if essence else set()
    for i, r in enumerate(requests):
        f = world.fact(r.subject, r.relation)
        name = world.subjects[f.subject].name
        o = i if owners is None else owners[i]
        prompts = essence_prompts(world, r, essence_kind) if essence else edit_prompts(world, r, forms)
        if essence:  # one essence prompt once per owner (merged requests share the subject's prompts)
            prompts = [q for q in prompts if (o, q) not in seen and q not in edited]
            seen.update((o, q) for q in prompts)
        new_id = tok(r.new_object, add_special_tokens=False)["input_ids"][0]
        for pre in ([""] if essence else prefixes):
            for p in prompts:
                text = f"{pre} {p}".strip()
                ids = tok(text)["input_ids"]
                words = text.split()
                offset = len(ids) - len(words)  # <bos>
                # the subject's occurrence inside the prompt (not the prefix)
                start, end = world.subject_span(p.split(), f, name=name)
                pre_len = len(pre.split()) if pre else 0
                seqs.append(ids)
                subj.append(offset + pre_len + end - 1)
                last.append(len(ids) - 1)
                target.append(new_id)
                owner.append(o)
    ids, mask = pad(seqs, tok.pad_token_id)
    t = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return Batch(ids, mask, t(subj), t(last), t(target), t(owner))


@torch.no_grad()
def mean_keys(model, batch: Batch, layer: int, n_requests: int) -> torch.Tensor:
    """k* per request: the key at the subject's last token averaged over its rows. [n_requests, d_mlp]"""
    with capture_keys(model, [layer]) as store:
        model(input_ids=batch.ids, attention_mask=batch.mask)
    k = store[layer][0][torch.arange(len(batch.subj)), batch.subj].double()  # [rows, d_mlp]
    return _mean_by_owner(k, batch.owner, n_requests)


@torch.no_grad()
def mean_mlp_out(model, batch: Batch, layer: int, n_requests: int) -> torch.Tensor:
    """MLP output of `layer` at the subject's last token, averaged per request. [n_requests, d_model]"""
    out = {}
    h = model.gpt_neox.layers[layer].mlp.register_forward_hook(lambda m, i, o: out.setdefault("o", o))
    try:
        model(input_ids=batch.ids, attention_mask=batch.mask)
    finally:
        h.remove()
    return _mean_by_owner(out["o"][torch.arange(len(batch.subj)), batch.subj].double(), batch.owner, n_requests)


@torch.no_grad()
def residual_norm(model, batch: Batch, layer: int) -> float:
    """Mean ||h_layer|| (residual after block `layer`) at the subject's last token."""
    hs = model(input_ids=batch.ids, attention_mask=batch.mask, output_hidden_states=True).hidden_states
    return float(hs[layer + 1][torch.arange(len(batch.subj)), batch.subj].norm(dim=-1).mean())


def _mean_by_owner(x: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.zeros(n, x.shape[1], dtype=x.dtype)
    out.index_add_(0, owner, x)
    return out / torch.bincount(owner, minlength=n).unsqueeze(1).to(x.dtype)


@contextlib.contextmanager
def add_at_subject(model, layer: int, delta: torch.Tensor, batch: Batch):
    """Add delta[owner[row]] to the MLP output of `layer` at each row's subject token (hook removed on exit)."""
    rows = torch.arange(len(batch.subj))

    def hook(module, inputs, output):
        output = output.clone()
        output[rows, batch.subj] = output[rows, batch.subj] + delta[batch.owner].to(output.dtype)
        return output

    h = model.gpt_neox.layers[layer].mlp.register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


@contextlib.contextmanager
def add_rank_one(model, layer: int, delta: torch.Tensor, u: torch.Tensor, batch: Batch):
    """The rank-one edit W += delta[i] u[i]^T of `layer`'s down projection for row owner i, as a hook.

    Every position p of a row gets delta * (u . k_p) added to the MLP output -- exactly what the
    weight edit does -- so optimising delta through this hook optimises the final edit itself.
    u [n_requests, d_mlp] is C^-1 k* / (k*^T C^-1 k*) (so u . k* = 1 and W' k* = W k* + delta).
    """
    mod = model.gpt_neox.layers[layer].mlp.dense_4h_to_h
    uo = u[batch.owner]  # [b, d_mlp]

    def hook(module, inputs, output):
        coef = torch.einsum("bpd,bd->bp", inputs[0].double(), uo)  # [b, pos]
        return output + (coef.unsqueeze(-1) * delta[batch.owner].unsqueeze(1)).to(output.dtype)

    h = mod.register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


@contextlib.contextmanager
def add_linear_edit(model, layer: int, delta: torch.Tensor, U: torch.Tensor):
    """The joint edit Delta W = delta^T U of `layer`'s down projection, as a hook (every row, every position).

    delta [n_requests, d_model], U [n_requests, d_mlp]: a key k gets sum_i delta_i (U_i . k) added,
    so every request's delta reaches every prompt, as in the solved MEMIT/AlphaEdit weight edit
    (which is linear in the targets: Delta = R M = delta^T (G^T M), G the row -> request one-hot).
    """
    mod = model.gpt_neox.layers[layer].mlp.dense_4h_to_h

    def hook(module, inputs, output):
        coef = torch.einsum("bpd,nd->bpn", inputs[0].double(), U)  # [b, pos, n_requests]
        return output + (coef @ delta).to(output.dtype)

    h = mod.register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


def optimize_targets(model, batch: Batch, essence: Batch | None, layer: int, n_requests: int, *,
                     clamp: torch.Tensor, lr: float, steps: int, kl_weight: float, weight_decay: float,
                     ref_norm: torch.Tensor, stop_loss: float = 0.05,
                     rank_one_u: torch.Tensor | None = None,
                     joint_u: torch.Tensor | None = None,
                     init: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """delta [n_requests, d_model] added at the subject token of `layer` so the new objects are predicted.

    Loss (ROME/MEMIT compute_v): mean NLL(new object) over prefixes + kl_weight * KL(p_orig || p_edit)
    on the essence prompts + weight_decay * ||delta||^2 / ||ref||^2; ||delta|| is clamped to `clamp`
    (per request) after each Adam step. With `rank_one_u` ([n_requests, d_mlp], see `add_rank_one`)
    delta is applied the way the rank-one weight edit will apply it (scaled by u . k at every
    position) instead of only at the subject token: the keys of the individual prompts differ from
    their mean k*, and this makes the optimised loss the loss of the edited model. `joint_u`
    does the same for a batch solve (MEMIT/AlphaEdit, one layer), cross-talk between edits included.
    """
    if joint_u is not None:  # [n_requests, d_mlp], see add_linear_edit
        add = lambda d, b: add_linear_edit(model, layer, d, joint_u)  # noqa: E731
    elif rank_one_u is not None:
        add = lambda d, b: add_rank_one(model, layer, d, rank_one_u, b)  # noqa: E731
    else:
        add = lambda d, b: add_at_subject(model, layer, d, b)  # noqa: E731
    model.eval()
    with frozen_weights(model):
        return _optimise_delta(model, batch, n_requests, layer, add, essence, kl_weight, steps, lr, clamp,
                               weight_decay, ref_norm, stop_loss, rank_one_u is not None or joint_u is not None,
                               init)


@contextlib.contextmanager
def frozen_weights(model):
    """Turn off requires_grad on every weight for the block, then restore each flag as it was."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _optimise_delta(model, batch, n_requests, layer, add, essence, kl_weight, steps, lr, clamp, weight_decay,
                    ref_norm, stop_loss, exact, init=None):
    d_model = model.config.hidden_size
    dtype = torch.float64 if exact else torch.float32
    delta = torch.zeros(n_requests, d_model, dtype=dtype) if init is None else init.detach().to(dtype).clone()
    delta.requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=lr)
    rows = torch.arange(len(batch.last))
    p_orig = None
    if essence is not None and kl_weight > 0:
        with torch.no_grad():
            lo = model(input_ids=essence.ids, attention_mask=essence.mask).logits
            p_orig = torch.log_softmax(lo[torch.arange(len(essence.last)), essence.last], -1)
    losses = []
    for step in range(steps):
        with add(delta, batch):
            logits = model(input_ids=batch.ids, attention_mask=batch.mask).logits  # [b, pos, vocab]
        logp = torch.log_softmax(logits[rows, batch.last].float(), -1)
        nll_rows = -logp[rows, batch.target]
        nll = _mean_by_owner(nll_rows.unsqueeze(1), batch.owner, n_requests).squeeze(1)  # [n_requests]
        loss = nll.mean()
        if p_orig is not None:
            with add(delta, essence):
                le = model(input_ids=essence.ids, attention_mask=essence.mask).logits
            lpe = torch.log_softmax(le[torch.arange(len(essence.last)), essence.last], -1)
            loss = loss + kl_weight * torch.nn.functional.kl_div(lpe, p_orig, log_target=True, reduction="batchmean")
        loss = loss + weight_decay * (delta.norm(dim=1) ** 2 / ref_norm.float() ** 2).mean()
        losses.append(float(nll.detach().mean()))
        if float(nll.detach().max()) < stop_loss:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            norms = delta.norm(dim=1, keepdim=True)
            scale = torch.clamp(clamp.float().unsqueeze(1) / norms.clamp_min(1e-12), max=1.0)
            delta.mul_(scale)
    return delta.detach().double(), {"steps": len(losses), "nll_first": losses[0], "nll_last": losses[-1]}
