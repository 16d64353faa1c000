"""A functional GPT-NeoX forward over an HF model's own weights: the fast path of editing and tracing.

`FastNeoX(model)` computes exactly what `GPTNeoXForCausalLM` computes (same weights, same rotary
tables, same order of additions; fp32 results agree to ~1e-6, tests/test_fast.py), but as plain
tensor code, so the callers that run the model hundreds of times on a handful of short prompts --
the editors' target search, the tracing engine -- do not pay the HF module stack's Python overhead
(~1 ms a call at these sizes, more than the arithmetic), and can:

- start at any block from a given residual stream (`run(x, start=j)`: everything below block j of
  an edit or a restoration is the same as in a run already made);
- run only positions t0.. of a sequence, attending to cached keys / values of positions < t0
  (`past`), and record a block's keys / values (`keep_kv`);
- change a block's MLP output with access to its keys (`mlp_edit(j, k, out, pos) -> out`: a rank-one
  or batched weight edit applied as `out + f(k)`), or overwrite attention / MLP outputs at given
  (row, position) pairs (`Setter`);
- compute the MLP of the last block, and the unembedding, at one position per row only.

Positions: rows are right-padded; with causal attention no real token attends to padding, so no
attention mask is needed (padding rows' own outputs are meaningless and never read). The residual
stream names follow TransformerLens: the input of block j is `blocks.{j}.hook_resid_pre`, the MLP
and attention outputs `hook_mlp_out` / `hook_attn_out`, the output `hook_resid_post`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

MlpEdit = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# (block, keys [B,T,d_mlp], out [B,T,d], positions [B or 1, T]) -> out; positions are absolute token indices


@dataclass
class Setter:
    """Overwrite x[rows[i], pos[i]] = values[i] of one block's attention or MLP output."""

    rows: torch.Tensor  # [r] long
    pos: torch.Tensor  # [r] long, positions within the block call's tokens
    values: torch.Tensor  # [r, d_model]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
    """Scaled dot-product attention; on the CPU under bf16 autocast it runs in fp32 (and returns bf16):
    the CPU's bf16 kernel is ~2x slower than fp32 on these short rows (measured: 860 rows of 9
    tokens, 4 heads, forward + backward 60 vs 31 ms) and less exact. A GPU keeps its bf16 kernel."""
    if q.dtype == torch.float32 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, **kw)
    with torch.autocast("cpu", enabled=False):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kw).to(q.dtype)


class FastNeoX:
    """A functional view of a `GPTNeoXForCausalLM` (no copy: weight changes show through at once)."""

    def __init__(self, model):
        cfg = model.config
        self.model = model
        self.n_layers = cfg.num_hidden_layers
        self.d_model = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.d_head = cfg.hidden_size // cfg.num_attention_heads
        self.parallel = bool(cfg.use_parallel_residual)
        self.eps = cfg.layer_norm_eps
        self.layers = model.gpt_neox.layers
        self.scale = self.d_head ** -0.5
        self._rope: dict = {}

    @property
    def device(self) -> torch.device:
        return self.model.gpt_neox.embed_in.weight.device

    # ---- pieces --------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, T, d] (`hook_embed`)."""
        return F.embedding(ids, self.model.gpt_neox.embed_in.weight)

    def rope(self, n: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [n, rotary dims] for positions 0..n-1, from the model's own rotary module."""
        key = (n, dtype, str(device))
        if key not in self._rope:
            x = torch.zeros(1, 1, dtype=dtype, device=device)
            pos = torch.arange(n, device=device)[None]
            cos, sin = self.model.gpt_neox.rotary_emb(x, pos)
            self._rope[key] = (cos[0], sin[0])
        return self._rope[key]

    @staticmethod
    def _ln(x: torch.Tensor, ln) -> torch.Tensor:
        return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)

    def _rotate(self, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """GPT-NeoX partial rotary on [B, H, T, d_head] (HF's apply_rotary_pos_emb, one tensor)."""
        r = cos.shape[-1]
        q_rot, q_pass = q[..., :r], q[..., r:]
        half = r // 2
        rotated = torch.cat((-q_rot[..., half:], q_rot[..., :half]), dim=-1)
        return torch.cat([q_rot * cos + rotated * sin, q_pass], dim=-1)

    def attention(self, j: int, h: torch.Tensor, start: int, past: tuple | None, keep: dict | None,
                  only: torch.Tensor | None = None) -> torch.Tensor:
        """Attention output [B, T, d] of block j on normed input h [B, T, d] at positions start..;
        `only` [B]: compute the output at that position of each row only ([B, 1, d])."""
        att = self.layers[j].attention
        B, T, _ = h.shape
        qkv = F.linear(h, att.query_key_value.weight, att.query_key_value.bias)
        qkv = qkv.view(B, T, self.n_heads, 3 * self.d_head).transpose(1, 2)  # [B, H, T, 3 d_head]
        q, k, v = qkv.chunk(3, dim=-1)
        cos, sin = self.rope(start + T, q.dtype, q.device)
        cos, sin = cos[start:], sin[start:]
        k = self._rotate(k, cos, sin)
        if keep is not None:
            keep[j] = (k, v)
        if past is not None:
            k = torch.cat([past[0].to(k.dtype), k], dim=2)
            v = torch.cat([past[1].to(v.dtype), v], dim=2)
        if only is not None:  # one query per row: position only[b] attends to keys 0..start+only[b]
            rows = torch.arange(B, device=h.device)
            q = self._rotate(q[rows, :, only].unsqueeze(2), cos[only][:, None, None], sin[only][:, None, None])
            n_keys = k.shape[2]
            mask = torch.arange(n_keys, device=h.device)[None, :] <= (start + only)[:, None]  # [B, keys]
            a = _sdpa(q, k, v, attn_mask=mask[:, None, None, :], scale=self.scale)
            a = a.transpose(1, 2).reshape(B, 1, self.d_model)
        else:
            q = self._rotate(q, cos, sin)
            if past is None:
                a = _sdpa(q, k, v, is_causal=True, scale=self.scale)
            else:
                n_keys = k.shape[2]
                mask = torch.arange(n_keys, device=h.device)[None, :] <= (start + torch.arange(T, device=h.device))[:, None]
                a = _sdpa(q, k, v, attn_mask=mask, scale=self.scale)
            a = a.transpose(1, 2).reshape(B, T, self.d_model)
        return F.linear(a, att.dense.weight, att.dense.bias)

    def mlp(self, j: int, h: torch.Tensor, edit: MlpEdit | None = None, pos: torch.Tensor | None = None) -> torch.Tensor:
        """MLP output of block j on normed input h; `edit(j, keys, out, pos)` may change it (pos: the
        absolute positions of h's tokens, [B or 1, T])."""
        m = self.layers[j].mlp
        k = m.act(F.linear(h, m.dense_h_to_4h.weight, m.dense_h_to_4h.bias))  # the keys [.., d_mlp]
        out = F.linear(k, m.dense_4h_to_h.weight, m.dense_4h_to_h.bias)
        return edit(j, k, out, pos) if edit is not None else out

    def block(self, j: int, x: torch.Tensor, *, start: int = 0, past: tuple | None = None, keep: dict | None = None,
              mlp_edit: MlpEdit | None = None, set_attn: Setter | None = None, set_mlp: Setter | None = None,
              only: torch.Tensor | None = None, record: dict | None = None) -> torch.Tensor:
        """Block j on the residual stream x [B, T, d] of positions start..start+T-1.

        `past`: keys and values [B, heads, start, d_head] of the earlier positions; `keep[j]` receives
        this call's; `record` receives the attention and MLP outputs ("attn", "mlp": `hook_attn_out`,
        `hook_mlp_out`). `only` [B] (a position of each row, within this call's tokens): the block's
        output at that position alone, [B, 1, d] (for the last block: nothing after it reads
        another position); setters then address position 0."""
        lyr = self.layers[j]
        a = self.attention(j, self._ln(x, lyr.input_layernorm), start, past, keep, only)
        if only is not None:
            x = x[torch.arange(x.shape[0], device=x.device), only].unsqueeze(1)
            pos = (start + only).unsqueeze(1)  # [B, 1]
        else:
            pos = start + torch.arange(x.shape[1], device=x.device).unsqueeze(0)  # [1, T]
        if set_attn is not None:
            a = a.clone()
            a[set_attn.rows, set_attn.pos] = set_attn.values.to(a.dtype)
        if record is not None:
            record["attn"] = a
        if self.parallel:
            m = self.mlp(j, self._ln(x, lyr.post_attention_layernorm), mlp_edit, pos)
        else:
            a = a + x
            m = self.mlp(j, self._ln(a, lyr.post_attention_layernorm), mlp_edit, pos)
        if set_mlp is not None:
            m = m.clone()
            m[set_mlp.rows, set_mlp.pos] = set_mlp.values.to(m.dtype)
        if record is not None:
            record["mlp"] = m
        return m + a + x if self.parallel else m + a

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        """Final layer norm and unembedding of x [..., d] -> logits [..., vocab]."""
        h = self._ln(x, self.model.gpt_neox.final_layer_norm)
        return F.linear(h, self.model.lm_head.weight, self.model.lm_head.bias)

    # ---- whole runs ----------------------------------------------------------------------
    def run(self, x: torch.Tensor, *, start_block: int = 0, stop_block: int | None = None,
            mlp_edit: MlpEdit | None = None) -> torch.Tensor:
        """Blocks start_block..stop_block-1 on the residual stream x entering start_block (all positions)."""
        for j in range(start_block, self.n_layers if stop_block is None else stop_block):
            x = self.block(j, x, mlp_edit=mlp_edit)
        return x

    def logits_at(self, ids: torch.Tensor, pos: torch.Tensor, *, mlp_edit: MlpEdit | None = None,
                  x: torch.Tensor | None = None, start_block: int = 0) -> torch.Tensor:
        """Logits [B, vocab] at position pos[b] of each row (the last block's MLP and the unembedding
        at that position only). `x`: the residual stream entering `start_block`, if already known."""
        x = self.embed(ids) if x is None else x
        L = self.n_layers
        for j in range(start_block, L - 1):
            x = self.block(j, x, mlp_edit=mlp_edit)
        if start_block < L:
            x = self.block(L - 1, x, mlp_edit=mlp_edit, only=pos)[:, 0]
        else:
            x = x[torch.arange(x.shape[0], device=x.device), pos]
        return self.unembed(x)

    def resid_at(self, ids: torch.Tensor, block: int) -> torch.Tensor:
        """The residual stream entering `block` (`blocks.{block}.hook_resid_pre`) [B, T, d]."""
        return self.run(self.embed(ids), stop_block=block)
