"""RepE: steer the residual stream away from the target's reading vector (Zou et al. 2023,
"Representation Engineering"; used as an unlearning baseline by RWKU, Jin et al. 2024).

Reading vector at layer l (hook_resid_post, the residual after block l), per forget subject s:
    v_{s,l} = mean h_l(prompts about s) - mean h_l(the same prompts about contrast subjects)
over the positions from the subject's first token on (the positions whose context holds the
subject), with the prompts = the trained cloze templates and the QA form of the subject's forget
facts, and the contrast subjects = `n_contrast` seeded retained subjects asked the same relations.
Control at inference (every input, every position, no weight change), with v-hat the unit vector:
    subtract: h_l <- h_l - alpha * ||hbar_l|| * v-hat   (v-hat = the unit mean of the subjects' vectors)
    project:  h_l <- h_l - alpha * V V^T h_l             (V an orthonormal basis of the subjects' vectors)
`alpha` is the strength; ||hbar_l|| is the norm of the mean state at l on the forget prompts, so the
strength is relative to the layer's scale (RepE's coefficients are absolute for a 7B model).

Where we deliberately differ: RWKU builds the contrast from prompts with and without the target
in a real corpus and takes RepE's PCA reading; a synthetic world gives exact contrast pairs (same
templates and relations, another subject), so the difference of means is the reading (the first
principal component of paired differences is not implemented). Several forget subjects get one
vector each: subtract steers along their mean direction, project removes their whole span.

Defaults (`benchmarks/forget_defaults.py runs/unlearning`, two single-subject forget sets the
unlearning table never uses; forget recall cloze / paraphrase / QA after, retain change):
project, alpha 1, every layer but the last: 0.33 / 0.33 / 0.33, -0.9 points; subtract alpha 0.05 and
0.1: 1.00 / 1.00 / 1.00, 0.0 points (on the default model subtract alpha 0.5 already took retain
recall to 0.27: a steering vector added to every input moves every input).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from mechedit.edit.adaptors import Adaptor, register_adaptor_kind
from mechedit.edit.api import EditRequest, EditResult, register_method
from mechedit.errors import MecheditError, SpecError
from mechedit.model.evaluate import pad
from mechedit.specio import to_dict
from mechedit.unlearn.loop import capture_layer
from mechedit.unlearn.targets import ForgetTarget
from mechedit.world.tokenizer import token_span
from mechedit.world.world import Fact

MODES = ("subtract", "project")


def block_module(layer: int) -> str:
    return f"gpt_neox.layers.{layer}"


@register_adaptor_kind("steer")
class Steering:
    """Adaptor kind: tensor `vectors` [k, d_model] (orthonormal for project, one unit vector for
    subtract); config mode, alpha, scale. Applied to the block's output (the residual after it)."""

    hook = "forward"

    @staticmethod
    def check(a: Adaptor, module) -> None:
        v = a.tensors.get("vectors")
        if v is None or v.ndim != 2 or a.config.get("mode") not in MODES:
            raise MecheditError("steer adaptor needs vectors [k, d_model] and a mode (subtract or project)")
        if not hasattr(module, "mlp") or v.shape[1] != module.mlp.dense_4h_to_h.out_features:
            raise MecheditError(f"steer adaptor of width {v.shape[1]} does not fit {type(module).__name__}")

    @staticmethod
    def forward(site, module, args, output):
        h = output[0] if isinstance(output, tuple) else output  # [b, pos, d_model]
        for e in site.entries:
            h = steer(h, e.tensors["vectors"].to(h.dtype), e.config["mode"], e.config["alpha"], e.config["scale"])
        return (h, *output[1:]) if isinstance(output, tuple) else h


def steer(h: torch.Tensor, V: torch.Tensor, mode: str, alpha: float, scale: float) -> torch.Tensor:
    """RepE control of residual states h [..., d] with vectors V [k, d]."""
    if mode == "subtract":
        return h - alpha * scale * V[0]
    return h - alpha * (h @ V.T) @ V


@dataclass(frozen=True)
class RepEParams:
    layer: int | list[int] | str = "auto"  # layer(s) steered (the residual after each); "auto" = all but the last
    mode: str = "project"  # "project" (remove the span) or "subtract" (alpha x ||hbar|| along v-hat)
    alpha: float = 1.0  # strength (project: 1 removes the component, > 1 reverses it)
    n_contrast: int = 20  # contrast subjects (retained, seeded)
    seed: int = 0

    def validate(self) -> None:
        if self.mode not in MODES:
            raise SpecError(f"repe: mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.alpha < 0 or self.n_contrast < 1:
            raise SpecError("repe: alpha >= 0 and n_contrast >= 1")


def _prompts(world, facts: list[Fact], name: str | None = None) -> list[tuple[str, int]]:
    """(prompt, index of the subject's first word) for every trained cloze template and the QA form."""
    out = []
    for f in facts:
        forms = [t for t in range(world.n_templates) if t != f.heldout_template] + [-1]
        for t in forms:
            p = world.prompt(f, t, name=name)
            out.append((p, world.subject_span(p.split(), f, name=name)[0]))
    return out


@torch.no_grad()
def mean_states(model, tokenizer, prompts: list[tuple[str, int]], layers: list[int]) -> dict[int, torch.Tensor]:
    """Per layer: the mean residual state over the positions from each prompt's subject on. {layer: [d]}"""
    # token position of the subject's first word (a word may be several BPE pieces; <bos> counted)
    spans = [token_span(tokenizer, p, (s, s + 1)) for p, s in prompts]
    dev = model.device
    ids, mask = pad([seq for seq, _ in spans], tokenizer.pad_token_id, dev)
    start = torch.tensor([a for _, (a, _) in spans], device=dev)
    sel = (torch.arange(ids.shape[1], device=dev)[None] >= start[:, None]) & mask.bool()
    with contextlib.ExitStack() as stack:
        caps = {l: stack.enter_context(capture_layer(model, l)) for l in layers}
        model(input_ids=ids, attention_mask=mask)
    return {l: c["h"][sel].double().mean(0) for l, c in caps.items()}


def reading_vectors(bundle, target: ForgetTarget, layers: list[int], n_contrast: int, seed: int):
    """Per layer: the forget subjects' reading vectors [k, d] (target mean - contrast mean), and ||h|| on the targets."""
    world, model, tok = bundle.world, bundle.model, bundle.tokenizer
    by_subject: dict[int, list[Fact]] = {}
    for f in target.forget:
        by_subject.setdefault(f.subject, []).append(f)
    forgotten = set(by_subject)
    pool = sorted({f.subject for f in target.retain if world.subjects[f.subject].kind == "subject"} - forgotten)
    if not pool:
        raise MecheditError("repe: no retained subject to contrast the forget subjects with")
    rng = np.random.default_rng([seed, 17])
    contrast = [pool[int(i)] for i in rng.choice(len(pool), size=min(n_contrast, len(pool)), replace=False)]
    vecs: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    norms: dict[int, list[float]] = {l: [] for l in layers}
    for sid, facts in by_subject.items():
        about = _prompts(world, facts)
        other = []
        for c in contrast:  # the same relations asked about a contrast subject (its own facts, when trained)
            rel = {f.relation for f in facts}
            other += _prompts(world, [g for g in world.facts_of(c) if g.relation in rel and world.is_trained(g)])
        if not other:
            raise MecheditError("repe: the contrast subjects share no relation with the forget subject")
        m_about = mean_states(model, tok, about, layers)
        m_other = mean_states(model, tok, other, layers)
        for l in layers:
            vecs[l].append(m_about[l] - m_other[l])
            norms[l].append(float(m_about[l].norm()))
    return {l: torch.stack(v) for l, v in vecs.items()}, {l: float(np.mean(n)) for l, n in norms.items()}


@register_method("repe", params=RepEParams, kind="unlearn")
def repe(bundle, requests: list[EditRequest], p: RepEParams) -> EditResult:
    n = bundle.n_layers
    if p.layer == "auto":
        layers = list(range(max(1, n - 1)))
    elif isinstance(p.layer, str):
        raise MecheditError(f"repe: layer must be an integer, a list of integers or 'auto', got {p.layer!r}")
    else:
        layers = sorted({int(x) for x in (p.layer if isinstance(p.layer, list) else [p.layer])})
    bad = [l for l in layers if not 0 <= l < n]
    if bad:
        raise MecheditError(f"repe: layer {bad[0]} is out of range (the model has layers 0..{n - 1})")
    target = ForgetTarget.from_requests(bundle.world, requests)
    raw, norms = reading_vectors(bundle, target, layers, p.n_contrast, p.seed)
    adaptors, info = [], {"layers": layers, "mode": p.mode, "alpha": p.alpha, "by_layer": {}}
    for l in layers:
        R = raw[l]  # [k, d]
        if p.mode == "subtract":
            V = (R / R.norm(dim=1, keepdim=True)).mean(0, keepdim=True)
            V = V / V.norm()
        else:
            V = torch.linalg.qr(R.T).Q.T  # orthonormal basis of the span, [k, d]
        adaptors.append(Adaptor("steer", block_module(l), {"vectors": V.float().contiguous()},
                                {"mode": p.mode, "alpha": p.alpha, "scale": norms[l], "layer": l}))
        info["by_layer"][l] = {"reading_norm": float(R.norm(dim=1).mean()), "state_norm": norms[l],
                               "n_vectors": int(V.shape[0])}
    info["n_subjects"] = int(raw[layers[0]].shape[0])
    return EditResult("repe", to_dict(p), list(requests), {}, info=info, adaptors=adaptors)
