"""Causal tracing engine (ROME, Meng et al. 2022): clean, corrupted and restored runs, batched.

Method (ROME section 2.1, and METHODS.md "Causal tracing"):
  clean run      p_clean(o*)   with o* the clean top-1 answer token (facts the model gets wrong
                 are skipped and counted, never traced);
  corrupted run  e ~ N(0, nu^2 I) added to the embeddings (`hook_embed`) of the subject tokens
                 only, nu = noise x std(embedding entries of the world's subject tokens), `samples`
                 draws from a generator seeded by (seed, fact index), so every restoration of a
                 fact sees the same draws whatever the batching;
  restored run   the corrupted run with one state set back to its clean value: `resid` restores
                 h_l = blocks.{l}.hook_resid_post at token t; `mlp` / `attn` restore
                 blocks.{j}.hook_mlp_out / hook_attn_out at token t for every j in the window
                 [l - w//2, l + ceil(w/2)) clipped to the model (ROME's window arithmetic);
  severed path   (ROME's "MLP frozen" experiment, Fig. 3) the resid restoration of h_l at t while
                 the MLP (or attention) outputs of layers j > l at t are held at their corrupted
                 values (same sample).
  IE = p_restored - p_corrupt, TE = p_clean - p_corrupt, probabilities averaged over samples.

Where we differ: the window defaults to round(10/48 x n_layers) (>= 1) rather than 10, because
ROME's window of 10 of GPT-2 XL's 48 layers would cover a whole small model.

`run_batched` puts every (kind, layer, token, sample) row of many facts into batches of at most
`batch_size` rows (prompts of different lengths right-padded) and runs each row only from its
first affected block and token (see its docstring), on `mechedit.model.fast.FastNeoX`: the
functional forward of the HF weights, whose `Setter`s set a block's attention / MLP output at
(row, position) pairs -- what hooks on `blocks.{j}.hook_attn_out` / `hook_mlp_out` set.
`run_reference` is the plain one-cell-at-a-time loop through the TransformerLens bridge's hooks
(one forward of `samples` rows per fact, kind, layer and token) that the tests compare against.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from mechedit.errors import MecheditError
from mechedit.model.fast import Setter

SITES = ("resid", "mlp", "attn")
SEVERABLE = ("mlp", "attn")
EMBED_HOOK = "hook_embed"
_HOOKS = {"resid": "blocks.{l}.hook_resid_post", "mlp": "blocks.{l}.hook_mlp_out", "attn": "blocks.{l}.hook_attn_out"}


def hook_name(site: str, layer: int) -> str:
    """The bridge's canonical hook name of `site` ("resid" | "mlp" | "attn") at `layer`."""
    return _HOOKS[site].format(l=layer)


def severed_kind(site: str) -> str:
    """Result key of the resid restoration with `site` ("mlp" | "attn") of later layers severed."""
    return f"resid_sever_{site}"


def kind_site(kind: str) -> tuple[str, str | None]:
    """(restored site, severed site or None) of a result kind."""
    if kind.startswith("resid_sever_"):
        return "resid", kind[len("resid_sever_"):]
    return kind, None


def default_window(n_layers: int) -> int:
    """ROME's window of 10 out of 48 layers, scaled to the model's depth (at least 1)."""
    return max(1, round(10 * n_layers / 48))


def auto_batch_size(hf_config, n_tokens: int, memory_mb: int) -> int:
    """Rows per forward so that the widest activations ([rows, tokens, max(d_mlp, vocab)] in fp32,
    with ~8 alive at once) fit in `memory_mb`."""
    width = max(hf_config.intermediate_size, hf_config.vocab_size, 4 * hf_config.hidden_size)
    return int(min(65536, max(64, memory_mb * 2**20 // (n_tokens * width * 4 * 8))))


def window_bounds(layer: int, window: int, n_layers: int) -> tuple[int, int]:
    """[lo, hi) of the layers restored around `layer` (ROME: layer - w//2 .. layer + ceil(w/2))."""
    return max(0, layer - window // 2), min(n_layers, layer + math.ceil(window / 2))


@dataclass(frozen=True)
class PreparedFact:
    """One fact's prompt as tokens, with its subject span and answer token."""

    index: int  # Fact.index
    template: int
    prompt: str
    ids: tuple[int, ...]  # token ids, <bos> first
    tokens: tuple[str, ...]
    subject: tuple[int, int]  # token positions [start, end)
    answer_id: int

    @property
    def n_tokens(self) -> int:
        return len(self.ids)


def fact_noise(fact_index: int, seed: int, samples: int, n_subject: int, d_model: int,
               scale: float) -> torch.Tensor:
    """The noise draws of one fact: [samples, n_subject, d_model] from a (seed, fact)-seeded generator."""
    state = int(np.random.SeedSequence([seed, fact_index]).generate_state(1, dtype=np.uint64)[0] >> 1)
    g = torch.Generator(device="cpu").manual_seed(state)  # the same draws whatever the model's device
    return torch.randn(samples, n_subject, d_model, generator=g, device="cpu") * scale


def _pad_ids(facts: list[PreparedFact], pad_id: int) -> torch.Tensor:
    n = max(f.n_tokens for f in facts)
    ids = torch.full((len(facts), n), pad_id, dtype=torch.long, device="cpu")
    for i, f in enumerate(facts):
        ids[i, : f.n_tokens] = torch.tensor(f.ids, device="cpu")
    return ids  # [F, T]


def _answer_probs(logits: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """p(answer) of each row from its logits at the answer position: logits [B, V], answer [B] -> [B]."""
    return torch.softmax(logits.float(), dim=-1)[torch.arange(logits.shape[0], device=logits.device), answer]


@dataclass
class EngineOutput:
    p_clean: np.ndarray  # [F]
    clean_top1: np.ndarray  # [F] token ids
    p_corrupt: np.ndarray  # [F, S]
    p_restored: dict[str, np.ndarray]  # kind -> [F, L, T, S] (NaN beyond a fact's tokens)


@torch.inference_mode()
def clean_run(fx, facts: list[PreparedFact], pad_id: int, sites: tuple[str, ...], n_layers: int):
    """Clean probabilities, top-1 ids and caches {site: [F, L, T, d]} for all facts in one batch.

    `fx` is a `mechedit.model.fast.FastNeoX` over the model (see `run_batched`)."""
    dev = fx.device
    ids = _pad_ids(facts, pad_id).to(dev)
    cache: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    x = fx.embed(ids)
    for j in range(n_layers):
        rec: dict = {}
        x = fx.block(j, x, record=rec)
        for s in sites:
            cache[s].append((x if s == "resid" else rec[s]).float())
    last = torch.tensor([f.n_tokens - 1 for f in facts], device=dev)
    ans = torch.tensor([f.answer_id for f in facts], device=dev)
    at_last = fx.unembed(x[torch.arange(len(facts), device=dev), last])  # [F, V]
    p = _answer_probs(at_last, ans)
    top1 = at_last.argmax(-1)
    stacked = {s: torch.stack(cache[s], dim=1) for s in sites}  # [F, L, T, d]
    return p.cpu().numpy().astype(np.float64), top1.cpu().numpy(), stacked


def _row_plan(facts: list[PreparedFact], kinds: tuple[str, ...], n_layers: int, samples: int,
              window: int) -> tuple[np.ndarray, np.ndarray]:
    """Restoration rows as (fact, kind, layer, token, sample): ([R, 5] to run, [R', 5] known to equal
    the corrupted run). A restoration changes nothing when the token precedes the subject (clean and
    corrupted states agree there) or when every restored layer is the last one and the token is not
    the last (no later layer reads it)."""
    run, same = [], []
    for fi, f in enumerate(facts):
        k, l, t, s = np.meshgrid(np.arange(len(kinds)), np.arange(n_layers), np.arange(f.n_tokens),
                                 np.arange(samples), indexing="ij")
        rows = np.stack([np.full(k.size, fi), k.ravel(), l.ravel(), t.ravel(), s.ravel()], axis=1)
        resid = np.array([kind_site(k)[0] == "resid" for k in kinds])[rows[:, 1]]
        lo = np.where(resid, rows[:, 2], np.maximum(0, rows[:, 2] - window // 2))  # = window_bounds(...)[0]
        trivial = (rows[:, 3] < f.subject[0]) | ((lo == n_layers - 1) & (rows[:, 3] < f.n_tokens - 1))
        run.append(rows[~trivial])
        same.append(rows[trivial])
    empty = np.zeros((0, 5), dtype=np.int64)
    return (np.concatenate(run) if run else empty), (np.concatenate(same) if same else empty)


# rows restoring different tokens share a forward over the tokens from the smallest of them on
# (tokens between it and a row's own token just recompute corrupted values) once a chunk has this many
SUFFIX_MIN_ROWS = 512


def _merge(setters: list[Setter]) -> Setter | None:
    """One Setter from several (their rows are distinct: a row has one kind)."""
    if not setters:
        return None
    if len(setters) == 1:
        return setters[0]
    return Setter(torch.cat([s.rows for s in setters]), torch.cat([s.pos for s in setters]),
                  torch.cat([s.values for s in setters]))


@torch.inference_mode()
def run_batched(fx, facts: list[PreparedFact], *, kinds: tuple[str, ...], noise_scale: float, samples: int,
                window: int, seed: int, n_layers: int, d_model: int, pad_id: int, batch_size: int = 4096,
                progress: Callable[[int, int], None] | None = None, clean: tuple | None = None,
                precision: str = "float32") -> EngineOutput:
    """All restorations of all `facts` in batches of `batch_size` rows (see the module docstring).

    Runs on `fx`, a `mechedit.model.fast.FastNeoX` over the model: the functional forward of
    GPT-NeoX blocks whose attention / MLP outputs are set through `Setter`s at given (row,
    position) pairs -- what hooks on `blocks.{j}.hook_attn_out` / `hook_mlp_out` would set -- and
    which can start at any block and token. `run_reference` goes through the TransformerLens bridge's
    hooks; the tests hold the two equal.

    Prefix sharing: every block below the first one a restoration touches computes exactly what the
    corrupted run computes, so the corrupted run (one row per fact and sample) caches the residual
    stream entering each block, and each restoration row runs only from its first affected block:
    block `lo` of its window for `mlp` / `attn`, block l+1 for `resid` at layer l (whose state is
    the input of block l+1, set at token t to its clean value). With a parallel residual (block
    output = mlp_out + attn_out + input, as in GPT-NeoX) the output of the window's first block is
    composed from the cached clean and corrupted states at token t (other tokens are unchanged),
    so those rows start at block lo+1.

    Suffix sharing: tokens before the restored token t keep their corrupted states at every block,
    so a chunk of rows runs only tokens t0.. (t0 its smallest restored token), attending to the
    corrupted run's cached keys and values of tokens < t0.

    The last block runs at each row's answer position only (attention query and MLP: nothing after
    it reads another position), and only that position is unembedded. `clean`: the output of
    `clean_run` on these facts with the restored sites, when the caller already has it. Rows are
    grouped by start block; prompts of different lengths share a batch (right-padded: no earlier
    token can see the padding). `precision="bfloat16"` runs the blocks under bf16 autocast (an
    option: fp32 is what the tests hold equal to the reference).
    """
    F, S, L = len(facts), samples, n_layers
    restore_sites = tuple(dict.fromkeys(kind_site(k)[0] for k in kinds))
    sever_sites = tuple(dict.fromkeys(s for k in kinds if (s := kind_site(k)[1])))
    # parallel residual (GPT-NeoX / Pythia): block output = mlp_out + attn_out + block input, so the
    # first block of an mlp / attn window is composed from cached states instead of being run
    compose = fx.parallel and any(s != "resid" for s in restore_sites)
    kept_sites = tuple(dict.fromkeys(sever_sites + (SEVERABLE if compose else ())))
    if clean is None or not set(restore_sites) <= set(clean[2]):  # `clean`: clean_run's output for `facts`
        clean = clean_run(fx, facts, pad_id, restore_sites, L)
    p_clean, top1, clean = clean
    autocast = (torch.autocast(fx.device.type, dtype=torch.bfloat16) if precision == "bfloat16"
                else contextlib.nullcontext())
    dev = fx.device
    T = max(f.n_tokens for f in facts)
    ids_all = _pad_ids(facts, pad_id).to(dev)  # [F, T]
    noise = torch.zeros(F, S, T, d_model, device="cpu")  # [F, S, T, d], zero outside the subject
    for fi, f in enumerate(facts):
        a, b = f.subject
        noise[fi, :, a:b] = fact_noise(f.index, seed, S, b - a, d_model, noise_scale)
    noise = noise.to(dev)
    last_all = torch.tensor([f.n_tokens - 1 for f in facts], device=dev)
    ans_all = torch.tensor([f.answer_id for f in facts], device=dev)
    clean = {s: c.to(dev) for s, c in clean.items()}

    # corrupted run (rows = facts x samples), caching the residual stream entering each block
    # (index L: the last block's output), the mlp / attn outputs (severed paths, composed blocks)
    # and every block's keys and values (suffix runs attend to them)
    fr = torch.arange(F, device=dev).repeat_interleave(S)
    sr = torch.arange(S, device=dev).repeat(F)
    corrupt: dict[str, list[torch.Tensor]] = {s: [] for s in kept_sites}
    pre: list[torch.Tensor] = []
    keep: dict = {}
    with autocast:
        x = fx.embed(ids_all[fr]) + noise[fr, sr]
        for j in range(L):
            pre.append(x)
            rec: dict = {}
            x = fx.block(j, x, keep=keep, record=rec)
            for s_ in kept_sites:
                corrupt[s_].append(rec[s_])
        pre.append(x)
        logits = fx.unembed(x[torch.arange(F * S, device=dev), last_all[fr]])  # [F*S, V]
    p_corrupt = _answer_probs(logits, ans_all[fr]).reshape(F, S).cpu().numpy().astype(np.float64)
    corrupt_c = {s_: torch.stack(v, dim=1).reshape(F, S, L, T, d_model) for s_, v in corrupt.items()}
    resid_in = torch.stack(pre, dim=1).reshape(F, S, L + 1, T, d_model)  # [F, S, L+1, T, d]
    past_kv = {j: tuple(z.reshape(F, S, *z.shape[1:]) for z in keep[j]) for j in range(L)}

    out = {k: np.full((F, L, T, S), np.nan) for k in kinds}
    plan, same = _row_plan(facts, kinds, L, S, window)
    for ki, k in enumerate(kinds):
        m = same[:, 1] == ki
        out[k][same[m, 0], same[m, 2], same[m, 3], same[m, 4]] = p_corrupt[same[m, 0], same[m, 4]]
    kind_restore = np.array([restore_sites.index(kind_site(k)[0]) for k in kinds])
    kind_sever = np.array([sever_sites.index(kind_site(k)[1]) if kind_site(k)[1] else -1 for k in kinds])
    kind_is_resid = np.array([kind_site(k)[0] == "resid" for k in kinds])
    # per row: the block it starts from, and [lo, hi) of the restored layers (resid: none)
    is_resid = kind_is_resid[plan[:, 1]]
    lo_w = np.maximum(0, plan[:, 2] - window // 2)
    hi_w = np.minimum(L, plan[:, 2] + (window + 1) // 2)
    lo_all = np.where(is_resid, plan[:, 2] + 1, lo_w + 1 if compose else lo_w)
    hi_all = np.where(is_resid, plan[:, 2] + 1, hi_w)
    n_tok = np.array([f.n_tokens for f in facts])[plan[:, 0]]
    order = np.lexsort((np.arange(len(plan)), plan[:, 3], lo_all))
    plan, is_resid, lo_all, hi_all, n_tok = plan[order], is_resid[order], lo_all[order], hi_all[order], n_tok[order]
    groups = np.flatnonzero(np.diff(lo_all)) + 1
    bounds = [0, *groups.tolist(), len(plan)]
    chunks = []  # (group start, chunk start, chunk end): within a group, rows sorted by token
    for g0, g1 in zip(bounds[:-1], bounds[1:]):
        c0 = g0
        for b in [*(np.flatnonzero(np.diff(plan[g0:g1, 3])) + 1 + g0).tolist(), g1]:
            if b - c0 >= SUFFIX_MIN_ROWS or b == g1:
                while b - c0 > batch_size:
                    chunks.append((g0, c0, c0 + batch_size))
                    c0 += batch_size
                if b > c0:
                    chunks.append((g0, c0, b))
                    c0 = b
    done = 0
    for g0, c0, c1 in chunks:
        start_block, Tc, t0 = int(lo_all[g0]), int(n_tok[c0:c1].max()), int(plan[c0, 3])
        chunk = plan[c0:c1]
        f_, k_, l_, t_, s_ = (torch.from_numpy(chunk[:, i]).to(dev) for i in range(5))
        lo = torch.from_numpy(lo_all[c0:c1]).to(dev)
        hi = torch.from_numpy(hi_all[c0:c1]).to(dev)
        x = resid_in[f_, s_, start_block, t0:Tc].clone()  # [B, Tc - t0, d]: tokens t0..
        zero = t_ - t0  # token t of a row is position t - t0 of the suffix
        last = torch.from_numpy(n_tok[c0:c1]).to(dev) - 1 - t0  # each row's answer position (shorter prompts: padded)
        res = torch.from_numpy(is_resid[c0:c1]).to(dev)
        if bool(res.any()):  # resid at l = the input of block l+1, set at token t
            rows = torch.nonzero(res).flatten()
            x[rows, zero[rows]] = clean["resid"][f_[rows], l_[rows], t_[rows]].to(x.dtype)
        if compose and not bool(res.all()):  # output of block lo with its mlp or attn restored at t
            rows = torch.nonzero(~res).flatten()
            fr_, sr_, tr_, j = f_[rows], s_[rows], t_[rows], start_block - 1
            site_r = [restore_sites[i] for i in kind_restore[chunk[rows.cpu().numpy(), 1]]]
            is_mlp = torch.tensor([x_ == "mlp" for x_ in site_r], device=dev)[:, None]
            mlp = torch.where(is_mlp, clean["mlp"][fr_, j, tr_].to(x.dtype) if "mlp" in clean else 0,
                              corrupt_c["mlp"][fr_, sr_, j, tr_].to(x.dtype))
            attn = torch.where(is_mlp, corrupt_c["attn"][fr_, sr_, j, tr_].to(x.dtype),
                               clean["attn"][fr_, j, tr_].to(x.dtype) if "attn" in clean else 0)
            x[rows, zero[rows]] = mlp + attn + resid_in[fr_, sr_, j, tr_].to(x.dtype)  # HF's order: mlp + attn + input
        rsite = torch.from_numpy(kind_restore[chunk[:, 1]]).to(dev)
        ssite = torch.from_numpy(kind_sever[chunk[:, 1]]).to(dev)

        def setter(site, j, sel, source):  # a Setter of block j's `site` output for the rows in `sel`
            if j == L - 1:  # the last block runs at the answer position only: other tokens cannot matter
                sel = sel & (zero == last)
            rows = torch.nonzero(sel).flatten()
            if not len(rows):
                return []
            pos = torch.zeros_like(rows) if j == L - 1 else zero[rows]
            return [Setter(rows, pos, source(rows))]

        with autocast:
            for j in range(start_block, L):
                sets = {"attn": [], "mlp": []}
                for si, site in enumerate(restore_sites):
                    if site != "resid":
                        sets[site] += setter(site, j, (rsite == si) & (lo <= j) & (j < hi),
                                             lambda r, site=site: clean[site][f_[r], j, t_[r]])
                for si, site in enumerate(sever_sites):
                    sets[site] += setter(site, j, (ssite == si) & (l_ < j),
                                         lambda r, site=site: corrupt_c[site][f_[r], s_[r], j, t_[r]])
                past = tuple(z[f_, s_, :, :t0] for z in past_kv[j]) if t0 > 0 else None
                x = fx.block(j, x, start=t0, past=past, set_attn=_merge(sets["attn"]), set_mlp=_merge(sets["mlp"]),
                             only=last if j == L - 1 else None)
            if start_block < L:
                x = x[:, 0]
            else:  # restored the last block's output: nothing left to run
                x = x[torch.arange(len(chunk), device=dev), last]
            logits = fx.unembed(x)  # [B, V]
        p = _answer_probs(logits, ans_all[f_]).cpu().numpy()
        for ki, k in enumerate(kinds):
            m = chunk[:, 1] == ki
            out[k][chunk[m, 0], chunk[m, 2], chunk[m, 3], chunk[m, 4]] = p[m]
        done += len(chunk)
        if progress:
            progress(done, len(plan))
    return EngineOutput(p_clean, top1, p_corrupt, out)


@torch.inference_mode()
def run_reference(bridge, facts: list[PreparedFact], *, kinds: tuple[str, ...], noise_scale: float, samples: int,
                  window: int, seed: int, n_layers: int, d_model: int, pad_id: int, **_) -> EngineOutput:
    """The plain loop: one forward of `samples` rows per (fact, kind, layer, token), as ROME's code does."""
    F, S, L = len(facts), samples, n_layers
    T = max(f.n_tokens for f in facts)
    out = {k: np.full((F, L, T, S), np.nan) for k in kinds}
    p_clean, top1, p_corrupt = np.zeros(F), np.zeros(F, dtype=np.int64), np.zeros((F, S))
    dev = next(bridge.parameters()).device
    for fi, f in enumerate(facts):
        ids = torch.tensor([f.ids], device=dev)  # [1, T]
        a, b = f.subject
        eps = fact_noise(f.index, seed, S, b - a, d_model, noise_scale)  # [S, n_subj, d]

        def corrupt_embed(x, hook):
            x = x.clone()
            x[:, a:b] += eps.to(x.device, x.dtype)
            return x

        clean: dict[str, torch.Tensor] = {}
        _, cache = bridge.run_with_cache(ids, names_filter=lambda n: n.endswith(("hook_resid_post", "hook_mlp_out",
                                                                                 "hook_attn_out")))
        logits = bridge(ids)
        p_clean[fi] = torch.softmax(logits[0, -1].float(), -1)[f.answer_id].item()
        top1[fi] = int(logits[0, -1].argmax())
        for site in SITES:
            clean[site] = torch.stack([cache[hook_name(site, l)][0] for l in range(L)])  # [L, T, d]
        x = ids.repeat(S, 1)
        corrupted: dict[str, list[torch.Tensor]] = {s: [None] * L for s in SEVERABLE}

        def keep(site, layer):
            def fn(h, hook):
                corrupted[site][layer] = h.clone()
                return h
            return fn

        with bridge.hooks(fwd_hooks=[(EMBED_HOOK, corrupt_embed)]
                          + [(hook_name(s, l), keep(s, l)) for s in SEVERABLE for l in range(L)]):
            logits = bridge(x)
        p_corrupt[fi] = torch.softmax(logits[:, -1].float(), -1)[:, f.answer_id].cpu().numpy()
        for ki, kind in enumerate(kinds):
            site, sever = kind_site(kind)
            for layer in range(L):
                lo, hi = (layer, layer + 1) if site == "resid" else window_bounds(layer, window, L)
                for t in range(f.n_tokens):
                    hooks = [(EMBED_HOOK, corrupt_embed)]
                    for j in range(lo, hi):
                        hooks.append((hook_name(site, j), _restore_token(t, clean[site][j, t])))
                    if sever:
                        for j in range(layer + 1, L):
                            hooks.append((hook_name(sever, j), _restore_token(t, corrupted[sever][j][:, t])))
                    with bridge.hooks(fwd_hooks=hooks):
                        logits = bridge(x)
                    out[kind][fi, layer, t] = torch.softmax(logits[:, -1].float(), -1)[:, f.answer_id].cpu().numpy()
    return EngineOutput(p_clean, top1, p_corrupt, out)


def _restore_token(t: int, value: torch.Tensor):
    def fn(x, hook):
        x = x.clone()
        x[:, t] = value.to(x.dtype)
        return x
    return fn


def check_sites(sites, allowed=SITES) -> tuple[str, ...]:
    sites = tuple(sites)
    bad = [s for s in sites if s not in allowed]
    if bad or not sites:
        raise MecheditError(f"unknown site {bad[0] if bad else '(none)'!r} (known: {', '.join(allowed)})")
    return tuple(dict.fromkeys(sites))
