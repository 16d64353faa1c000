"""Pieces shared by the locate-then-edit methods: layers, edit prompts, context prefixes, keys and targets.

Positions: every edit prompt is `<bos> [prefix words] prompt words`; the subject's last token is
where ROME/MEMIT read the key and write the value. The "target" is a vector added to the output of
one MLP at that token (with Pythia's parallel residual, adding to the MLP output of block L is the
same as adding to the residual stream h_L after that block).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from mechedit import progress as P
from mechedit.edit.api import EditRequest
from mechedit.edit.stats import capture_keys
from mechedit.errors import MecheditError
from mechedit.model.evaluate import pad
from mechedit.model.fast import MlpEdit
from mechedit.world.tokenizer import subject_token_span


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


def unreachable_note(bundle, layer: int) -> str | None:
    """A note when a value written at the subject's last token sits in the LAST block: no attention
    follows it, so it cannot reach the prediction at the last prompt token (in every template the
    subject is followed by other words) - efficacy 0 there is by construction, not a finding."""
    if layer != bundle.n_layers - 1:
        return None
    return (f"layer {layer} is the last block: a value written at the subject's last token cannot reach the "
            "prediction at the last prompt token (no attention follows it), so the edit cannot work by construction")


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
    """Tokenised (prefix + prompt [+ new object]) texts with the subject's last token and the answer tokens.

    A row of an edit batch is teacher-forced: the new object's tokens but its last follow the prompt,
    and answer token j of row r sits at `ans_pos` = last[r] + j (it predicts `ans_tgt`). With one
    token per object (the word tokenizer) that is one answer token per row, at `last`.
    """

    ids: torch.Tensor  # [b, pos]
    mask: torch.Tensor  # [b, pos]
    subj: torch.Tensor  # [b] position of the subject's last token
    last: torch.Tensor  # [b] position of the prompt's last token (predicts the object's first token)
    target: torch.Tensor  # [b] first token id of the new object
    owner: torch.Tensor  # [b] index of the request each row belongs to
    ans_row: torch.Tensor | None = None  # [n_ans] row of each answer token (None: one per row, at `last`)
    ans_pos: torch.Tensor | None = None  # [n_ans] position predicting it
    ans_tgt: torch.Tensor | None = None  # [n_ans] its token id

    def answers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row, position, token) of every answer token."""
        if self.ans_row is None:
            return torch.arange(len(self.last)), self.last, self.target
        return self.ans_row, self.ans_pos, self.ans_tgt


def answer_token_nll(logits: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, tgt: torch.Tensor,
               n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced NLL of every answer token (`Batch.answers`) and its mean per row.

    logits [b, pos, vocab]; rows, pos, tgt [n_ans] -> (per token [n_ans], per row [n_rows]). With one
    answer token per row, the per-row values are exactly -log p(target) at `last` (x / 1 and 0 + x
    are exact), so one-token worlds compute what a first-token loss computes.
    """
    tok = -torch.log_softmax(logits[rows, pos].float(), -1).gather(1, tgt[:, None])[:, 0]
    count = torch.bincount(rows, minlength=n_rows).to(tok.dtype)
    return tok, torch.zeros(n_rows, dtype=tok.dtype, device=tok.device).index_add(0, rows, tok) / count


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

    Positions come from the tokenizer's word ids (`subject_token_span`), so a name or an object of
    several tokens is handled: `subj` is the last token of the subject's name, and the new object's
    tokens are teacher-forced after the prompt (`Batch.answers`). Essence rows carry no answer.
    `owners[i]` is the target (row owner) of request i; default i. Query merging gives every request
    of one subject the same owner (`subject_groups`), so their rows share one key and one value.
    """
    tok, world = bundle.tokenizer, bundle.world
    seqs, subj, last, target, owner = [], [], [], [], []
    ans_row, ans_pos, ans_tgt = [], [], []
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
        new_ids = tok(r.new_object, add_special_tokens=False)["input_ids"]
        for pre in ([""] if essence else prefixes):
            for p in prompts:
                text = f"{pre} {p}".strip()
                # the subject's occurrence inside the prompt (not the prefix)
                ids, (_, end) = subject_token_span(tok, world, text, f, name=name, after_word=len(pre.split()))
                row = len(seqs)
                subj.append(end - 1)
                last.append(len(ids) - 1)
                target.append(new_ids[0])
                owner.append(o)
                if not essence:
                    ans_row += [row] * len(new_ids)
                    ans_pos += [len(ids) - 1 + j for j in range(len(new_ids))]
                    ans_tgt += new_ids
                    ids = ids + new_ids[:-1]
                seqs.append(ids)
    dev = bundle.model.device
    ids, mask = pad(seqs, tok.pad_token_id, dev)
    t = lambda v: torch.tensor(v, dtype=torch.long, device=dev)  # noqa: E731
    return Batch(ids, mask, t(subj), t(last), t(target), t(owner), t(ans_row), t(ans_pos), t(ans_tgt))


@torch.no_grad()
def mean_keys(model, batch: Batch, layer: int, n_requests: int) -> torch.Tensor:
    """k* per request: the key at the subject's last token averaged over its rows. [n_requests, d_mlp]"""
    with capture_keys(model, [layer]) as store:
        model(input_ids=batch.ids, attention_mask=batch.mask)
    k = store[layer][0][torch.arange(len(batch.subj), device=batch.subj.device), batch.subj].double()  # [rows, d_mlp]
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
    rows = torch.arange(len(batch.subj), device=batch.subj.device)
    return _mean_by_owner(out["o"][rows, batch.subj].double(), batch.owner, n_requests)


@torch.no_grad()
def residual_norm(model, batch: Batch, layer: int) -> float:
    """Mean ||h_layer|| (residual after block `layer`) at the subject's last token."""
    hs = model(input_ids=batch.ids, attention_mask=batch.mask, output_hidden_states=True).hidden_states
    rows = torch.arange(len(batch.subj), device=batch.subj.device)
    return float(hs[layer + 1][rows, batch.subj].norm(dim=-1).mean())


def _mean_by_owner(x: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.zeros(n, x.shape[1], dtype=x.dtype, device=x.device)
    out.index_add_(0, owner, x)
    return out / torch.bincount(owner, minlength=n).unsqueeze(1).to(x.dtype)


def at_subject_edit(layer: int, delta: torch.Tensor, subj: torch.Tensor, owner: torch.Tensor) -> MlpEdit:
    """A `FastNeoX` MLP edit: add delta[owner[row]] to `layer`'s MLP output at each row's subject token."""
    def fn(j, k, out, pos):
        if j != layer:
            return out
        at = (pos == subj.unsqueeze(1)).unsqueeze(-1)  # [b, pos, 1]: the subject token, where computed
        return out + at * delta[owner].unsqueeze(1).to(out.dtype)
    return fn


def rank_one_edit(layer: int, delta: torch.Tensor, u: torch.Tensor, owner: torch.Tensor) -> MlpEdit:
    """The rank-one edit W += delta[i] u[i]^T of `layer`'s down projection for row owner i.

    Every position p of a row gets delta * (u . k_p) added to the MLP output -- exactly what the
    weight edit does -- so optimising delta through it optimises the final edit itself.
    u [n_requests, d_mlp] is C^-1 k* / (k*^T C^-1 k*) (so u . k* = 1 and W' k* = W k* + delta).
    """
    uo = u[owner]  # [b, d_mlp]

    def fn(j, k, out, pos):
        if j != layer:
            return out
        coef = torch.einsum("bpd,bd->bp", k, uo.to(k.dtype))  # [b, pos], in the arithmetic of the forward
        return out + (coef.unsqueeze(-1) * delta[owner].unsqueeze(1).to(coef.dtype)).to(out.dtype)
    return fn


def linear_edit(layer: int, delta: torch.Tensor, U: torch.Tensor, owner: torch.Tensor | None = None) -> MlpEdit:
    """The joint edit Delta W = delta^T U of `layer`'s down projection (every row, every position).

    delta [n_requests, d_model], U [n_requests, d_mlp]: a key k gets sum_i delta_i (U_i . k) added,
    so every request's delta reaches every prompt, as in the solved MEMIT/AlphaEdit weight edit
    (which is linear in the targets: Delta = R M = delta^T (G^T M), G the row -> request one-hot).
    With several starts (`owner` given, delta [starts * n_requests, d]), row b uses the deltas of
    its own start: owner[b] // n_requests.
    """
    n = U.shape[0]

    def fn(j, k, out, pos):
        if j != layer:
            return out
        if owner is None:  # k (delta^T U)^T: the weight change first (tiny), then one matmul
            return out + (k @ (U.T @ delta).to(k.dtype)).to(out.dtype)
        coef = torch.einsum("bpd,nd->bpn", k, U.to(k.dtype))  # [b, pos, n_requests]
        d = delta.view(-1, n, delta.shape[-1])[owner // n]  # [b, n, d_model]
        return out + torch.einsum("bpn,bnd->bpd", coef, d.to(coef.dtype)).to(out.dtype)
    return fn


def optimize_targets(model, batch: Batch, essence: Batch | None, layer: int, n_requests: int, *,
                     clamp: torch.Tensor, lr: float, steps: int, kl_weight: float, weight_decay: float,
                     ref_norm: torch.Tensor, stop_loss: float = 0.05,
                     rank_one_u: torch.Tensor | None = None,
                     joint_u: torch.Tensor | None = None,
                     init: torch.Tensor | None = None, engine: str = "fast",
                     precision: str = "float32", first_wins: bool = False) -> tuple[torch.Tensor, dict]:
    """delta [n_requests, d_model] added at the subject token of `layer` so the new objects are predicted.

    Loss (ROME/MEMIT compute_v): mean NLL(new object) over prefixes (per row the mean over the new
    object's tokens, teacher-forced, as ROME's compute_v) + kl_weight * KL(p_orig || p_edit)
    on the essence prompts + weight_decay * ||delta||^2 / ||ref||^2; ||delta|| is clamped to `clamp`
    (per request) after each Adam step; the search stops once every request's NLL is below
    `stop_loss`. With `rank_one_u` ([n_requests, d_mlp], see `rank_one_edit`) delta is applied the
    way the rank-one weight edit will apply it (scaled by u . k at every position) instead of only at
    the subject token: the keys of the individual prompts differ from their mean k*, and this makes
    the optimised loss the loss of the edited model. `joint_u` does the same for a batch solve
    (MEMIT/AlphaEdit, one layer), cross-talk between edits included.

    `init` [n_requests, d] starts the search there; [starts, n_requests, d] runs several independent
    searches at once (ROME's random restarts) and returns deltas [starts, n_requests, d] and one
    info per start. Each start's trajectory is the one it would have alone (its loss terms are
    separate, Adam is per coordinate, and a start that reaches `stop_loss` is frozen there);
    `first_wins` ends the whole search as soon as one start reaches `stop_loss` (the others'
    infos then say how far they got).

    Runs on `FastNeoX` (no module hooks): block `layer` runs once per search, unedited (every edit
    here is linear in delta and leaves that MLP's keys alone, so a step adds coef(keys) . delta to
    its output, `_edit_term`), and every step runs blocks layer+1.. with the MLP output and the
    unembedding at the answer position only, edit and essence prompts in one batch (with a joint
    edit of one start, each distinct essence prompt once, its KL counted by multiplicity). `engine="hf"` makes the same calls
    through the HF model with a forward hook (the reference of tests and benchmarks); a model with
    adaptors attached is always searched that way (their hooks are part of what it computes).
    `precision="bfloat16"` runs the forward and backward passes of the search under bf16 autocast
    (AMX / AVX-512 bf16 on the CPU, tensor cores on a GPU); delta, Adam and the loss stay in fp32 /
    fp64; "auto" is bf16 where it is native (`mechedit.device.fast_bf16`), else fp32. The info of
    each start records the precision used.
    """
    from mechedit.device import resolve_precision

    precision = resolve_precision(precision, model.device)
    if engine not in ("fast", "hf"):
        raise MecheditError(f"unknown engine {engine!r} (fast, hf)")
    from mechedit.edit.adaptors import attached

    if attached(model):  # adaptor edits (GRACE, WISE, RepE, ICU) are hooks, which FastNeoX would skip
        engine = "hf"
    many = init is not None and init.dim() == 3
    starts = init.shape[0] if many else 1
    model.eval()
    with frozen_weights(model):
        deltas, infos = _optimise_delta(
            model, batch, essence, layer, n_requests, starts, kl_weight=kl_weight, steps=steps, lr=lr,
            clamp=clamp, weight_decay=weight_decay, ref_norm=ref_norm, stop_loss=stop_loss,
            rank_one_u=rank_one_u, joint_u=joint_u,
            init=None if init is None else init.reshape(starts, n_requests, -1), engine=engine,
            precision=precision, first_wins=first_wins)
    return (deltas, infos) if many else (deltas[0], infos[0])


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


def _joint_rows(batch: Batch, essence: Batch | None, starts: int, n_requests: int, pad_id: int):
    """Edit rows (one per answer token: a new object of k tokens gives k copies of a row, each
    predicting its token, so a request's mean NLL over rows is ROME's mean over prompts of the mean
    over the object's tokens), then essence rows, repeated for each start: ids [R, T], answer /
    subject positions, owners (start * n_requests + request) and the counts of edit and essence rows."""
    a_row, a_pos, _ = batch.answers()  # an edit row per answer token of the new object (one for one-token objects)
    parts = [(batch.ids[a_row], a_pos, batch.subj[a_row], batch.owner[a_row])]
    if essence is not None:
        parts.append((essence.ids, essence.last, essence.subj, essence.owner))
    T = max(p[0].shape[1] for p in parts)
    ids, pos, subj, owner = [], [], [], []
    for s in range(starts):
        for p_ids, p_pos, p_subj, p_owner in parts:
            x = torch.full((p_ids.shape[0], T), pad_id, dtype=torch.long, device=p_ids.device)
            x[:, : p_ids.shape[1]] = p_ids
            ids.append(x)
            pos.append(p_pos)
            subj.append(p_subj)
            owner.append(p_owner + s * n_requests)
    nb, ne = len(a_row), (len(essence.last) if essence is not None else 0)
    return torch.cat(ids), torch.cat(pos), torch.cat(subj), torch.cat(owner), nb, ne


class _HFPath:
    """The same calls as `FastNeoX` made through the HF model and a forward hook on the down
    projection: the reference the fast path is tested and benchmarked against (`engine="hf"`)."""

    def __init__(self, model):
        self.model = model

    def resid_at(self, ids, layer):
        return ids  # the HF model always starts from the tokens

    @contextlib.contextmanager
    def _hooked(self, layer, mlp_edit):
        if mlp_edit is None:
            yield
            return
        mod = self.model.gpt_neox.layers[layer].mlp.dense_4h_to_h
        pos = torch.arange(1024, device=self.model.device).unsqueeze(0)
        h = mod.register_forward_hook(lambda m, inputs, out: mlp_edit(layer, inputs[0], out, pos[:, : out.shape[1]]))
        try:
            yield
        finally:
            h.remove()

    def logits_at(self, ids, pos, *, x=None, start_block=0, mlp_edit=None):
        mask = torch.ones_like(ids)
        with self._hooked(start_block, mlp_edit):
            logits = self.model(input_ids=ids, attention_mask=mask).logits
        return logits[torch.arange(len(pos), device=pos.device), pos]


def _unique_essence(ids, pos, subj, owner, nb: int):
    """Each distinct essence row once (after the nb edit rows), with how often it occurs [n_unique].

    Only for an edit that is the same for every row (the joint edit of one start, `linear_edit`
    without owners): identical token rows then have identical logits and KL, so the search's loss is
    the same with each counted by its multiplicity. (Requests of one subject share its other facts.)"""
    ess = ids[nb:]
    uniq, inv, counts = torch.unique(ess, dim=0, return_inverse=True, return_counts=True)
    first = torch.full((len(uniq),), len(ess), dtype=torch.long, device=ids.device)
    first = first.scatter_reduce(0, inv, torch.arange(len(ess), device=ids.device), "amin")
    order = torch.argsort(first)
    keep = torch.cat([torch.arange(nb, device=ids.device), nb + first[order]])
    return ids[keep], pos[keep], subj[keep], owner[keep], counts[order].float()


def _block_and_keys(fx, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block `layer` of FastNeoX on the stream x entering it, unedited: (its output [B, T, d], the
    MLP keys [B, T, d_mlp]). The target search's edits only add to that MLP's output and never change
    its keys, so one run serves every step."""
    store = {}

    def grab(j, k, out, pos):
        store["k"] = k
        return out

    return fx.block(layer, x, mlp_edit=grab), store["k"]


def _edit_term(keys: torch.Tensor, subj: torch.Tensor, owner: torch.Tensor, n: int, starts: int, *,
               rank_one_u: torch.Tensor | None, joint_u: torch.Tensor | None) -> Callable:
    """delta -> what the search's edit adds to block `layer`'s output [B, T, d], from the keys of the
    unedited block: `at_subject_edit`, `rank_one_edit` or `linear_edit` (the same three cases, in the
    same roles) with the key-dependent coefficients computed once, in fp32.

    Every one of those edits is linear in delta, out + coef(k) . delta[row's owners], and the keys do
    not depend on delta, so block `layer` itself need not be rerun at every step."""
    k = keys.float()
    if joint_u is not None:
        coef = k @ joint_u.T.to(k.dtype)  # [B, T, n]: u_i . k of every request i at every position
        if starts == 1:
            return lambda d: coef @ d.to(coef.dtype)
        return lambda d: torch.einsum("btn,bnd->btd", coef, d.view(-1, n, d.shape[-1])[owner // n].to(coef.dtype))
    if rank_one_u is not None:
        coef = torch.einsum("btd,bd->bt", k, rank_one_u.repeat(starts, 1)[owner].to(k.dtype))  # [B, T]
    else:
        coef = (torch.arange(k.shape[1], device=k.device).unsqueeze(0) == subj.unsqueeze(1)).to(k.dtype)
    coef = coef.unsqueeze(-1)
    return lambda d: coef * d[owner].unsqueeze(1).to(coef.dtype)


def _optimise_delta(model, batch, essence, layer, n_requests, starts, *, kl_weight, steps, lr, clamp,
                    weight_decay, ref_norm, stop_loss, rank_one_u, joint_u, init, engine="fast", precision="float32",
                    first_wins=False):
    from mechedit.model.fast import FastNeoX

    fx = FastNeoX(model) if engine == "fast" else _HFPath(model)
    autocast = (torch.autocast(model.device.type, dtype=torch.bfloat16) if precision == "bfloat16"
                else contextlib.nullcontext())
    exact = rank_one_u is not None or joint_u is not None
    dtype = torch.float64 if exact else torch.float32
    d_model = model.config.hidden_size
    R, n = starts, n_requests
    use_kl = essence is not None and kl_weight > 0
    ids, pos, subj, owner, nb, ne = _joint_rows(batch, essence if use_kl else None, R, n, model.config.pad_token_id or 0)
    cached = engine == "fast"  # block `layer` once, then its output moved by the edit's term (`_edit_term`)
    ess_count = None
    if cached and joint_u is not None and R == 1 and ne:
        ids, pos, subj, owner, ess_count = _unique_essence(ids, pos, subj, owner, nb)
    per = len(ids) // R  # rows of one start
    dev = model.device
    is_edit = (torch.arange(len(ids), device=dev) % per) < nb
    start_of = torch.arange(len(ids), device=dev) // per
    target = batch.answers()[2].repeat(R)  # the token each edit row predicts
    with torch.no_grad():
        x_in = fx.resid_at(ids, layer)  # the stream entering `layer`: no edit reaches it
        if cached:
            with autocast:
                x_out, keys = _block_and_keys(fx, layer, x_in)
            x_in, start = x_out.float(), layer + 1
        else:
            start = layer
        p_orig = None
        if use_kl:
            with autocast:  # the same arithmetic as the search, so the KL starts at 0
                lo = fx.logits_at(ids, pos, x=x_in, start_block=start)
            p_orig = torch.log_softmax(lo[~is_edit].float(), -1)
    delta = (torch.zeros(R * n, d_model, dtype=dtype, device=dev) if init is None
             else init.reshape(R * n, -1).to(dev, dtype).clone())
    delta.requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=lr)
    clamp, ref_norm = clamp.to(dev), ref_norm.to(dev)
    clamp_r = clamp.float().reshape(-1).expand(n).repeat(R) if clamp.numel() in (1, n) else clamp.float()
    ref_r = ref_norm.float().reshape(-1).expand(n).repeat(R)
    if joint_u is not None:
        make = lambda d: linear_edit(layer, d, joint_u, owner if R > 1 else None)  # noqa: E731
    elif rank_one_u is not None:
        u_r = rank_one_u.repeat(R, 1)
        make = lambda d: rank_one_edit(layer, d, u_r, owner)  # noqa: E731
    else:
        make = lambda d: at_subject_edit(layer, d, subj, owner)  # noqa: E731
    if cached:
        term = _edit_term(keys, subj, owner, n, R, rank_one_u=rank_one_u, joint_u=joint_u)
    edit_rows = torch.nonzero(is_edit).flatten()
    edit_owner = owner[is_edit]
    ess_start = start_of[~is_edit]
    done = torch.zeros(R, dtype=torch.bool, device=dev)
    frozen = torch.zeros(R * n, d_model, dtype=dtype, device=dev)
    history: list[list[float]] = [[] for _ in range(R)]
    for step in range(steps):
        with autocast:
            if cached:
                logits = fx.logits_at(ids, pos, x=x_in + term(delta), start_block=start)  # [rows, vocab]
            else:
                logits = fx.logits_at(ids, pos, x=x_in, start_block=layer, mlp_edit=make(delta))
        logp = torch.log_softmax(logits.float(), -1)
        nll_rows = -logp[edit_rows, target]
        nll = _mean_by_owner(nll_rows.unsqueeze(1), edit_owner, R * n).squeeze(1).view(R, n)  # [starts, n]
        loss = nll.mean(1)  # [starts]
        if use_kl:
            kl_rows = torch.nn.functional.kl_div(logp[~is_edit], p_orig, log_target=True, reduction="none").sum(-1)
            if ess_count is not None:
                kl_rows = kl_rows * ess_count
            loss = loss + kl_weight * torch.zeros(R, device=dev).index_add_(0, ess_start, kl_rows) / ne
        wd = (delta.norm(dim=1) ** 2 / ref_r ** 2).view(R, n).mean(1)
        loss = loss + weight_decay * wd
        nll_d = nll.detach()
        if P.active():
            P.status(f"target search (layer {layer}) step {step + 1}/{steps}: NLL of the new object "
                     f"{float(nll_d.min(0).values.mean()):.3f} (stops below {stop_loss:g})")
        for s in range(R):
            if not done[s]:
                history[s].append(float(nll_d[s].mean()))
        newly = (~done) & (nll_d.max(1).values < stop_loss)
        if bool(newly.any()):
            for s in torch.nonzero(newly).flatten().tolist():
                frozen[s * n : (s + 1) * n] = delta.detach()[s * n : (s + 1) * n]
            done |= newly
        if bool(done.all()) or (first_wins and bool(done.any())):
            break
        opt.zero_grad()
        loss[~done].sum().backward()
        opt.step()
        with torch.no_grad():
            norms = delta.norm(dim=1, keepdim=True)
            delta.mul_(torch.clamp(clamp_r.unsqueeze(1) / norms.clamp_min(1e-12), max=1.0))
            if bool(done.any()):
                keep = done.repeat_interleave(n)
                delta[keep] = frozen[keep]
    out = delta.detach().double().view(R, n, d_model)
    infos = [{"steps": len(h), "nll_first": h[0], "nll_last": h[-1], "reached": bool(done[s]), "precision": precision}
             for s, h in enumerate(history)]
    return out, infos
