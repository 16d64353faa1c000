"""AlphaEdit: MEMIT's update projected on the null space of the preserved keys (Fang et al. 2025,
"AlphaEdit: Null-Space Constrained Knowledge Editing for Language Models").

    P = U0 U0^T,  U0 = eigenvectors of C = E[k k^T] with eigenvalue < threshold * max eigenvalue
    Delta_l = R K^T P (K_p K_p^T P + K K^T P + alpha I)^-1          (float64)

with R, K and the layer loop as in MEMIT (`m_memit.spread_update`). K_p accumulates the keys of
earlier batches for sequential editing: give the same `kp_cache` directory to consecutive calls
(`sequential_edits` does this).

Where we deliberately differ: the null-space threshold is relative to the largest eigenvalue
(the reference's absolute 2e-2 puts most of a small model's spectrum in the "null space").
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mechedit.edit.api import EditRequest, EditResult, register_method
from mechedit.edit.m_memit import memit_layers, spread_update
from mechedit.edit.stats import second_moment
from mechedit.errors import SpecError
from mechedit.specio import to_dict


@dataclass(frozen=True)
class AlphaEditParams:
    layer: int | list[int] | str = "auto"  # as MEMIT: list, int, "traced", "all" or "auto" (window ending at the traced layer)
    null_threshold: float = 1e-2  # eigenvalues below null_threshold * max eigenvalue span the null space
    alpha: float = 10.0  # the L2 term of the solve, as the reference
    kp_cache: str = ""  # directory accumulating the keys of earlier batches ("" = no sequential memory)
    n_prefixes: int = 0  # corpus prefixes (out of distribution for a model trained on single sentences)
    prefix_words: int = 5
    kl_weight: float = 1.0  # KL(p_orig || p_edit) on the subjects' other facts (see common.essence_prompts)
    essence: str = "relations"  # "possessive" or "relations"
    per_prompt_keys: bool = True  # one key per (request, prompt) row in the solve instead of the mean key
    steps: int = 100
    lr_factor: float = 0.1
    clamp_factor: float = 1.0  # ||delta_i|| <= clamp_factor * ||h_L||
    weight_decay: float = 0.05
    stop_loss: float = 0.05
    n_stats: int | None = None
    seed: int = 0

    def validate(self) -> None:
        if not 0 < self.null_threshold < 1 or self.alpha <= 0:
            raise SpecError("alphaedit: 0 < null_threshold < 1 and alpha > 0")
        if self.steps < 1 or self.lr_factor <= 0 or self.clamp_factor <= 0:
            raise SpecError("alphaedit: steps >= 1, lr_factor > 0, clamp_factor > 0")


def null_space_projector(C: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = U0 U0^T over eigenvectors of C with eigenvalue < threshold * max eigenvalue. [d_mlp, d_mlp]"""
    evals, evecs = torch.linalg.eigh(C.double())
    U0 = evecs[:, evals < threshold * evals.max()]
    return U0 @ U0.T


@register_method("alphaedit", params=AlphaEditParams)
def alphaedit(bundle, requests: list[EditRequest], p: AlphaEditParams) -> EditResult:
    layers = memit_layers(bundle, p.layer, requests)
    kp_file = Path(p.kp_cache) / "kp.safetensors" if p.kp_cache else None
    kp = load_file(str(kp_file)) if kp_file is not None and kp_file.is_file() else {}
    new_keys: dict[str, torch.Tensor] = {}
    null_dims = {}

    def solve(l, R, K):
        P = null_space_projector(second_moment(bundle, l, p.n_stats), p.null_threshold)
        null_dims[l] = int(round(float(P.trace())))
        Kp = kp.get(f"layer{l}", torch.zeros(K.shape[0], 0, dtype=torch.float64))
        new_keys[f"layer{l}"] = torch.cat([Kp, K], dim=1)
        A = (Kp @ Kp.T + K @ K.T) @ P + p.alpha * torch.eye(K.shape[0], dtype=torch.float64)
        return torch.linalg.solve(A.T, (R @ K.T @ P).T).T  # R K^T P A^-1

    deltas, info = spread_update(bundle, requests, layers, p, solve)
    if kp_file is not None:
        kp_file.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in new_keys.items()}, str(kp_file))
    info.update(null_dims=null_dims, preserved_keys={l: int(kp[f"layer{l}"].shape[1]) if f"layer{l}" in kp else 0
                                                       for l in layers})
    return EditResult("alphaedit", {**to_dict(p), "layer": layers}, list(requests), deltas, info=info)
