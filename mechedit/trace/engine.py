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
`batch_size` rows (prompts of different lengths right-padded), with hooks that index the batch
dimension, and runs each row only from its first affected block and token (see its docstring).
`run_reference` is the plain one-cell-at-a-time loop (one forward of `samples` rows per fact, kind,
layer and token) that the tests compare against.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from mechedit.errors import MecheditError

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
    g = torch.Generator().manual_seed(state)
    return torch.randn(samples, n_subject, d_model, generator=g) * scale


def _pad_ids(facts: list[PreparedFact], pad_id: int) -> torch.Tensor:
    n = max(f.n_tokens for f in facts)
    ids = torch.full((len(facts), n), pad_id, dtype=torch.long)
    for i, f in enumerate(facts):
        ids[i, : f.n_tokens] = torch.tensor(f.ids)
    return ids  # [F, T]


def _answer_probs(logits: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """p(answer) of each row from its logits at the answer position: logits [B, V], answer [B] -> [B]."""
    return torch.softmax(logits.float(), dim=-1)[torch.arange(logits.shape[0]), answer]


@dataclass
class EngineOutput:
    p_clean: np.ndarray  # [F]
    clean_top1: np.ndarray  # [F] token ids
    p_corrupt: np.ndarray  # [F, S]
    p_restored: dict[str, np.ndarray]  # kind -> [F, L, T, S] (NaN beyond a fact's tokens)


@torch.inference_mode()
def clean_run(bridge, facts: list[PreparedFact], pad_id: int, sites: tuple[str, ...], n_layers: int):
    """Clean probabilities, top-1 ids and caches {site: [F, L, T, d]} for all facts in one batch."""
    ids = _pad_ids(facts, pad_id)
    cache: dict[str, list[torch.Tensor | None]] = {s: [None] * n_layers for s in sites}

    def store(site, layer):
        def fn(x, hook):
            cache[site][layer] = x.detach().float().clone()
            return x
        return fn

    hooks = [(hook_name(s, l), store(s, l)) for s in sites for l in range(n_layers)]
    with bridge.hooks(fwd_hooks=hooks):
        logits = bridge(ids)  # [F, T, V]
    last = torch.tensor([f.n_tokens - 1 for f in facts])
    ans = torch.tensor([f.answer_id for f in facts])
    at_last = logits[torch.arange(len(facts)), last]  # [F, V]
    p = _answer_probs(at_last, ans)
    top1 = at_last.argmax(-1)
    stacked = {s: torch.stack(cache[s], dim=1) for s in sites}  # [F, L, T, d]
    return p.numpy().astype(np.float64), top1.numpy(), stacked


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


def _block_kwargs(bridge, n_tokens: int, memo: dict) -> dict:
    """The keyword arguments the bridge passes to its blocks for a sequence of `n_tokens` (rotary
    position embeddings, position ids, mask), captured once per length from a one-row forward; any
    KV cache is dropped (each block call below is a plain, cache-free forward)."""
    if n_tokens not in memo:
        cap: dict = {}

        def pre(module, args, kwargs):
            cap.update(kwargs)
            raise _Captured

        handle = bridge.blocks[0].register_forward_pre_hook(pre, with_kwargs=True)
        try:
            bridge(torch.zeros(1, n_tokens, dtype=torch.long))
        except _Captured:
            pass
        finally:
            handle.remove()
        if cap.get("attention_mask") is not None:
            raise MecheditError("causal tracing expects the bridge to pass no attention mask to its blocks")
        kw = {k: v for k, v in cap.items() if k not in ("layer_past", "past_key_values", "past_key_value", "cache_position")}
        if "use_cache" in kw:
            kw["use_cache"] = False
        memo[n_tokens] = kw
    return memo[n_tokens]


class _Captured(Exception):
    pass


# rows restoring different tokens share a forward over the tokens from the smallest of them on
# (tokens between it and a row's own token just recompute corrupted values) once a chunk has this many
SUFFIX_MIN_ROWS = 512


class _KV:
    """A stand-in for HF's KV cache that the bridge's attention calls as `update(k, v, layer)`:
    recording (keep each layer's post-rotary keys and values) or replaying (prepend the kept ones,
    so queries of a suffix of the tokens attend to the corrupted run's earlier tokens)."""

    def __init__(self, past: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.past = past
        self.kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, k, v, layer_idx, *args, **kwargs):  # k, v [B, heads, T, d_head]
        if self.past is None:
            self.kept[layer_idx] = (k, v)
            return k, v
        pk, pv = self.past[layer_idx]
        return torch.cat([pk.to(k.dtype), k], dim=-2), torch.cat([pv.to(v.dtype), v], dim=-2)


def _suffix_kw(kw: dict, t: int, cache: _KV) -> dict:
    """Block kwargs for the tokens t.. of a sequence (positions and rotary tables sliced) with `cache`."""
    out = dict(kw, layer_past=cache)
    if kw.get("position_ids") is not None:
        out["position_ids"] = kw["position_ids"][:, t:]
    if kw.get("position_embeddings") is not None:
        out["position_embeddings"] = tuple(e[:, t:] for e in kw["position_embeddings"])
    return out


def _forward_from(bridge, x: torch.Tensor, start: int, n_layers: int, kw: dict, last: torch.Tensor) -> torch.Tensor:
    """Run blocks start..L-1 of the bridge on the residual stream `x` [B, T, d] entering block
    `start` (their hook points fire as in a full forward), then the final norm and unembedding at
    each row's position `last` [B] only: logits [B, V]."""
    for j in range(start, n_layers):
        x = bridge.blocks[j](x, **kw)
        if isinstance(x, tuple):
            x = x[0]
    return _unembed_at(bridge, x, last)


def _unembed_at(bridge, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Final norm and unembedding of row i of `x` [B, T, d] at position pos[i] only: logits [B, V]."""
    return bridge.unembed(bridge.ln_final(x[torch.arange(x.shape[0]), pos][:, None]))[:, 0]


@torch.inference_mode()
def run_batched(bridge, facts: list[PreparedFact], *, kinds: tuple[str, ...], noise_scale: float, samples: int,
                window: int, seed: int, n_layers: int, d_model: int, pad_id: int, batch_size: int = 4096,
                progress: Callable[[int, int], None] | None = None, clean: tuple | None = None) -> EngineOutput:
    """All restorations of all `facts` in batches of `batch_size` rows (see the module docstring).

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
    corrupted run's cached keys and values of tokens < t0 (passed as the blocks' KV cache).

    `clean`: the output of `clean_run` on these facts with the restored sites, when the caller
    already has it. Rows are grouped by start block; prompts of different lengths share a batch
    (the shorter ones right-padded, which no earlier token can see), and only each row's answer
    position is unembedded.
    """
    F, S, L = len(facts), samples, n_layers
    restore_sites = tuple(dict.fromkeys(kind_site(k)[0] for k in kinds))
    sever_sites = tuple(dict.fromkeys(s for k in kinds if (s := kind_site(k)[1])))
    # parallel residual (GPT-NeoX / Pythia): block output = mlp_out + attn_out + block input, so the
    # first block of an mlp / attn window is composed from cached states instead of being run
    parallel = bool(getattr(bridge.cfg, "parallel_attn_mlp", False))
    compose = parallel and any(s != "resid" for s in restore_sites)
    kept_sites = tuple(dict.fromkeys(sever_sites + (SEVERABLE if compose else ())))
    if clean is None or not set(restore_sites) <= set(clean[2]):  # `clean`: clean_run's output for `facts`
        clean = clean_run(bridge, facts, pad_id, restore_sites, L)
    p_clean, top1, clean = clean
    T = max(f.n_tokens for f in facts)
    ids_all = _pad_ids(facts, pad_id)  # [F, T]
    noise = torch.zeros(F, S, T, d_model)  # [F, S, T, d], zero outside the subject
    for fi, f in enumerate(facts):
        a, b = f.subject
        noise[fi, :, a:b] = fact_noise(f.index, seed, S, b - a, d_model, noise_scale)
    last_all = torch.tensor([f.n_tokens - 1 for f in facts])
    ans_all = torch.tensor([f.answer_id for f in facts])

    # corrupted run (rows = facts x samples), caching the residual stream entering each block
    # (index L: the last block's output) and the mlp / attn outputs (severed paths, composed blocks)
    fr = torch.arange(F).repeat_interleave(S)
    sr = torch.arange(S).repeat(F)
    corrupt: dict[str, list[torch.Tensor | None]] = {s: [None] * L for s in kept_sites}
    pre: list[torch.Tensor | None] = [None] * (L + 1)

    def add_noise(x, hook):  # x [F*S, T, d]
        return x + noise[fr, sr, : x.shape[1]].to(x.dtype)

    def store(site, layer):
        def fn(x, hook):
            corrupt[site][layer] = x.detach().clone()
            return x
        return fn

    # one pass over the blocks: the stream entering each block, the mlp / attn outputs and the
    # corrupted run's keys and values at every block ({j: [F, S, heads, T, d_head] x 2})
    kw_memo: dict = {}
    kw_T = _block_kwargs(bridge, T, kw_memo)
    rec = _KV()
    hooks = [(EMBED_HOOK, add_noise)] + [(hook_name(s, l), store(s, l)) for s in kept_sites for l in range(L)]
    with bridge.hooks(fwd_hooks=hooks):
        x = bridge.embed(ids_all[fr])
        for j in range(L):
            pre[j] = x
            x = bridge.blocks[j](x, **dict(kw_T, layer_past=rec))
            if isinstance(x, tuple):
                x = x[0]
        pre[L] = x
        logits = _unembed_at(bridge, x, last_all[fr])  # [F*S, V]
    p_corrupt = _answer_probs(logits, ans_all[fr]).reshape(F, S).numpy().astype(np.float64)
    corrupt_c = {s: torch.stack(corrupt[s], dim=1).reshape(F, S, L, T, d_model) for s in kept_sites}
    resid_in = torch.stack(pre, dim=1).reshape(F, S, L + 1, T, d_model)  # [F, S, L+1, T, d]
    past_kv = {j: tuple(z.reshape(F, S, *z.shape[1:]) for z in rec.kept[j]) for j in range(L)}

    out = {k: np.full((F, L, T, S), np.nan) for k in kinds}
    plan, same = _row_plan(facts, kinds, L, S, window)
    for ki, k in enumerate(kinds):
        m = same[:, 1] == ki
        out[k][same[m, 0], same[m, 2], same[m, 3], same[m, 4]] = p_corrupt[same[m, 0], same[m, 4]]
    kind_restore = np.array([restore_sites.index(kind_site(k)[0]) for k in kinds])
    kind_sever = np.array([sever_sites.index(kind_site(k)[1]) if kind_site(k)[1] else -1 for k in kinds])
    kind_is_resid = np.array([kind_site(k)[0] == "resid" for k in kinds])
    # per row: the block it starts from, and [lo, hi) of the restored hook layers (resid: none)
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
        kw = _block_kwargs(bridge, Tc, kw_memo)
        chunk = plan[c0:c1]
        f_, k_, l_, t_, s_ = (torch.from_numpy(chunk[:, i]) for i in range(5))
        lo = torch.from_numpy(lo_all[c0:c1])
        hi = torch.from_numpy(hi_all[c0:c1])
        x = resid_in[f_, s_, start_block, t0:Tc].clone()  # [B, Tc - t0, d]: tokens t0..
        zero = t_ - t0  # token t of a row is position t - t0 of the suffix
        last = torch.from_numpy(n_tok[c0:c1]) - 1 - t0  # each row's answer position (shorter prompts: padded)
        res = torch.from_numpy(is_resid[c0:c1])
        if bool(res.any()):  # resid at l = the input of block l+1, set at token t
            rows = torch.nonzero(res).flatten()
            x[rows, zero[rows]] = clean["resid"][f_[rows], l_[rows], t_[rows]].to(x.dtype)
        if compose and not bool(res.all()):  # output of block lo with its mlp or attn restored at t
            rows = torch.nonzero(~res).flatten()
            fr_, sr_, tr_, j = f_[rows], s_[rows], t_[rows], start_block - 1
            site_r = [restore_sites[i] for i in kind_restore[chunk[rows.numpy(), 1]]]
            is_mlp = torch.tensor([x_ == "mlp" for x_ in site_r])[:, None]
            mlp = torch.where(is_mlp, clean["mlp"][fr_, j, tr_].to(x.dtype) if "mlp" in clean else 0,
                              corrupt_c["mlp"][fr_, sr_, j, tr_])
            attn = torch.where(is_mlp, corrupt_c["attn"][fr_, sr_, j, tr_],
                               clean["attn"][fr_, j, tr_].to(x.dtype) if "attn" in clean else 0)
            x[rows, zero[rows]] = mlp + attn + resid_in[fr_, sr_, j, tr_]  # HF's order: mlp + attn + input
        rsite = torch.from_numpy(kind_restore[chunk[:, 1]])
        ssite = torch.from_numpy(kind_sever[chunk[:, 1]])
        # the last block's MLP runs at the last position only (LN and MLP act per position and
        # nothing after that block reads another position); its hook_mlp_out is then [B, 1, d]
        last_only = start_block < L
        hooks = [(f"blocks.{L - 1}.ln2.hook_in", _at_positions(last))] if last_only else []

        def where(site, j, sel):  # rows and positions of a setter at block j's `site` output
            if last_only and site == "mlp" and j == L - 1:  # other tokens cannot reach the answer
                sel = sel & (zero == last)
                rows = torch.nonzero(sel).flatten()
                return rows, torch.zeros_like(rows)
            rows = torch.nonzero(sel).flatten()
            return rows, zero[rows]

        for si, site in enumerate(restore_sites):
            if site == "resid":
                continue
            for j in range(start_block, L):
                rows, pos = where(site, j, (rsite == si) & (lo <= j) & (j < hi))
                if len(rows):
                    src = clean[site][f_[rows], j, t_[rows]]  # [r, d]
                    hooks.append((hook_name(site, j), _setter(rows, pos, src)))
        for si, site in enumerate(sever_sites):
            for j in range(start_block, L):
                rows, pos = where(site, j, (ssite == si) & (l_ < j))
                if len(rows):
                    src = corrupt_c[site][f_[rows], s_[rows], j, t_[rows]]  # [r, d]
                    hooks.append((hook_name(site, j), _setter(rows, pos, src)))
        with bridge.hooks(fwd_hooks=hooks):
            past = {j: (k[f_, s_, :, :t0], v[f_, s_, :, :t0]) for j, (k, v) in past_kv.items() if j >= start_block}
            logits = _forward_from(bridge, x, start_block, L, _suffix_kw(kw, t0, _KV(past)), last)  # [B, V]
        p = _answer_probs(logits, ans_all[f_]).numpy()
        for ki, k in enumerate(kinds):
            m = chunk[:, 1] == ki
            out[k][chunk[m, 0], chunk[m, 2], chunk[m, 3], chunk[m, 4]] = p[m]
        done += len(chunk)
        if progress:
            progress(done, len(plan))
    return EngineOutput(p_clean, top1, p_corrupt, out)


def _at_positions(pos: torch.Tensor):
    """A hook keeping only position pos[i] of row i of the last block's MLP input ([B, 1, d]); the
    block's residual sum then broadcasts, so its output is exact at each row's answer position (the
    only one unembedded) and meaningless elsewhere."""
    rows = torch.arange(len(pos))

    def fn(x, hook):
        return x[rows, pos][:, None]
    return fn


def _setter(rows: torch.Tensor, pos: torch.Tensor, src: torch.Tensor):
    """A hook that sets x[rows[i], pos[i]] = src[i] (several hooks on one name compose in order)."""
    def fn(x, hook):  # x [B, T, d]; in place: the activation is this forward's own tensor
        x[rows, pos] = src.to(x.dtype)
        return x
    return fn


@torch.inference_mode()
def run_reference(bridge, facts: list[PreparedFact], *, kinds: tuple[str, ...], noise_scale: float, samples: int,
                  window: int, seed: int, n_layers: int, d_model: int, pad_id: int, **_) -> EngineOutput:
    """The plain loop: one forward of `samples` rows per (fact, kind, layer, token), as ROME's code does."""
    F, S, L = len(facts), samples, n_layers
    T = max(f.n_tokens for f in facts)
    out = {k: np.full((F, L, T, S), np.nan) for k in kinds}
    p_clean, top1, p_corrupt = np.zeros(F), np.zeros(F, dtype=np.int64), np.zeros((F, S))
    for fi, f in enumerate(facts):
        ids = torch.tensor([f.ids])  # [1, T]
        a, b = f.subject
        eps = fact_noise(f.index, seed, S, b - a, d_model, noise_scale)  # [S, n_subj, d]

        def corrupt_embed(x, hook):
            x = x.clone()
            x[:, a:b] += eps.to(x.dtype)
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
        p_corrupt[fi] = torch.softmax(logits[:, -1].float(), -1)[:, f.answer_id].numpy()
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
                    out[kind][fi, layer, t] = torch.softmax(logits[:, -1].float(), -1)[:, f.answer_id].numpy()
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
