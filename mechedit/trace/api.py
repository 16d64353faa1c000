"""`trace()`: choose facts, measure the noise level, run the tracing engine, return a `TraceResult`.

See `mechedit.trace.engine` for the method (ROME's causal tracing) and where we differ.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from mechedit import progress as P
from mechedit.device import inference_precision
from mechedit.errors import MecheditError
from mechedit.model.fast import FastNeoX
from mechedit.specio import check_fields, to_dict
from mechedit.trace import engine as E
from mechedit.trace.result import Location, TraceResult, locate
from mechedit.world.tokenizer import subject_token_span
from mechedit.world.world import Fact, World

# Template preference: the subject first, with tokens after it (ROME's prompts look like this).
TEMPLATE_PREFERENCE = (1, 3, 2, 4, 0)
MAX_SAMPLES = 1000  # noise samples per fact (ROME: 10); each one is a full sweep over layers and tokens


@dataclass(frozen=True)
class TraceConfig:
    """Causal-tracing settings (defaults: ROME's, with the window scaled to depth)."""

    sites: tuple[str, ...] = ("resid", "mlp", "attn")
    severed: tuple[str, ...] = ()  # severed-path kinds to add: "mlp" and/or "attn"
    noise: float = 3.0  # nu as a multiple of the std of subject-token embeddings
    noise_scale: float | None = None  # a fixed nu (overrides `noise`)
    samples: int = 10
    window: int | None = None  # None: round(10/48 x n_layers), at least 1
    seed: int = 0
    template: int | None = None  # None: per fact, the first trained template in TEMPLATE_PREFERENCE
    batch_size: int | None = None  # rows per forward of the batched engine; None: from a memory budget
    memory_mb: int = 2048  # activation budget that sets the automatic batch size
    engine: str = "batched"  # "batched" (FastNeoX) | "reference" (the one-cell loop through the bridge's hooks)
    # batched engine's arithmetic: "float32", "bfloat16" (autocast) or "auto" (fp32 for tracing: README
    # "Devices and precision"); None: the process's inference precision (`--precision`, mechedit.device)
    precision: str | None = None

    def __post_init__(self):
        check_fields(self, "trace")
        object.__setattr__(self, "sites", E.check_sites(self.sites))
        object.__setattr__(self, "severed", tuple(dict.fromkeys(self.severed)))
        if self.severed:
            E.check_sites(self.severed, E.SEVERABLE)
        if self.noise < 0 or (self.noise_scale is not None and self.noise_scale < 0):
            raise MecheditError("noise must be >= 0")
        if not 1 <= self.samples <= MAX_SAMPLES:
            raise MecheditError(f"samples must be in [1, {MAX_SAMPLES}], got {self.samples}")
        if self.memory_mb < 1:
            raise MecheditError("memory_mb must be >= 1")
        if self.window is not None and self.window < 1:
            raise MecheditError("window must be >= 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise MecheditError("batch_size must be >= 1")
        if self.engine not in ("batched", "reference"):
            raise MecheditError(f"unknown engine {self.engine!r} (batched, reference)")
        if self.precision is not None:
            from mechedit.device import check_precision

            object.__setattr__(self, "precision", check_precision(self.precision, "trace precision"))

    @property
    def kinds(self) -> tuple[str, ...]:
        return self.sites + tuple(E.severed_kind(s) for s in self.severed)


def select_facts(world: World, facts: Iterable[str | int | Fact] | None = None, *, relation: str | None = None,
                 n: int | None = None, seed: int = 0, include_heldout: bool = False) -> list[Fact]:
    """Facts named ("SUBJECT|RELATION", Fact.index or Fact), else those of `relation`, else all;
    trained subjects only unless `include_heldout`; then a seeded sample of `n` (None: all)."""
    if facts is not None:
        out = []
        for f in facts:
            if isinstance(f, Fact):
                out.append(f)
            elif isinstance(f, (int, np.integer)):
                if not 0 <= int(f) < len(world.facts):
                    raise MecheditError(f"fact index {f} out of range (0..{len(world.facts) - 1})")
                out.append(world.facts[int(f)])
            else:
                out.append(world.parse_fact(str(f)))
        if relation is not None:
            world.relation(relation)
            out = [f for f in out if f.relation == relation]
    else:
        out = list(world.facts)
        if relation is not None:
            world.relation(relation)
            out = [f for f in out if f.relation == relation]
        if not include_heldout:
            out = [f for f in out if world.is_trained(f)]
    if facts is not None and not include_heldout:
        held = [f for f in out if not world.is_trained(f)]
        if held:
            s = world.subject_of(held[0]).name
            raise MecheditError(f"{len(held)} fact(s) of held-out subjects (e.g. {s!r}) were never trained; "
                                "pass include_heldout (--include-heldout) to trace them anyway")
    out = list(dict.fromkeys(out))
    if n is not None and n < 1:
        raise MecheditError(f"n must be >= 1 (the number of facts to sample), got {n}")
    if n is not None and n < len(out):
        rng = np.random.default_rng(seed)
        out = [out[i] for i in sorted(rng.choice(len(out), size=n, replace=False))]
    return out


def prepare_fact(world: World, tokenizer, fact: Fact, template: int | None = None) -> E.PreparedFact:
    """Tokenize the fact's cloze prompt and find its subject tokens and answer token (the first token
    of the object, as ROME traces the first token of multi-token objects)."""
    if template is None:
        trained = [t for t in TEMPLATE_PREFERENCE if t < world.n_templates and t != fact.heldout_template]
        template = trained[0] if trained else 0
    elif not 0 <= template < world.n_templates:
        raise MecheditError(f"template {template} out of range (0..{world.n_templates - 1})")
    prompt = world.prompt(fact, template)
    ids, (a, b) = subject_token_span(tokenizer, world, prompt, fact)  # a name may be several tokens
    tokens = tokenizer.convert_ids_to_tokens(ids)
    ans = tokenizer(fact.object, add_special_tokens=False)["input_ids"]  # traced: the object's first token
    return E.PreparedFact(fact.index, template, prompt, tuple(ids), tuple(tokens), (a, b), int(ans[0]))


def subject_embedding_std(model, tokenizer, world: World) -> float:
    """Std of all embedding entries of the subject tokens of the world's subjects (ROME's nu / 3)."""
    ids = [i for s in world.subjects for i in tokenizer(s.name, add_special_tokens=False)["input_ids"]]
    emb = model.get_input_embeddings().weight.detach().float()
    return float(emb[torch.tensor(ids, device=emb.device)].std())


def check_config(world: World, n_layers: int, config: TraceConfig) -> None:
    """What can be checked against the world and model before any work (a one-line error)."""
    if config.template is not None and not 0 <= config.template < world.n_templates:
        raise MecheditError(f"template {config.template} out of range (0..{world.n_templates - 1})")
    if config.window is not None and config.window > 2 * n_layers:
        raise MecheditError(f"window {config.window} is beyond the model: a window of 2 x n_layers = {2 * n_layers} "
                            f"already covers every layer from any centre")


def trace(bundle, facts: Iterable[str | int | Fact] | None = None, config: TraceConfig | None = None, *,
          bridge=None, include_heldout: bool = False, progress: Callable[[int, int], None] | None = None,
          **overrides) -> TraceResult:
    """Causally trace `facts` (default: every trained fact) in `bundle` (a loaded checkpoint).

    `overrides` are TraceConfig fields (sites=("mlp",), noise=5, ...). Facts whose clean top-1
    answer is wrong are skipped and listed in `result.skipped`, never traced. Facts of held-out
    (never trained) subjects are refused unless `include_heldout`.
    """
    config = dataclasses.replace(config or TraceConfig(), **overrides)
    world, tok, model = bundle.world, bundle.tokenizer, bundle.model
    chosen = select_facts(world, facts, include_heldout=include_heldout)
    if not chosen:
        raise MecheditError("no facts to trace")
    n_layers, d_model = model.config.num_hidden_layers, model.config.hidden_size
    check_config(world, n_layers, config)
    prepared = [prepare_fact(world, tok, f, config.template) for f in chosen]
    window = config.window or E.default_window(n_layers)
    std = subject_embedding_std(model, tok, world)
    nu = config.noise_scale if config.noise_scale is not None else config.noise * std
    fx = FastNeoX(model)
    # the reference engine (the one-cell loop through the bridge) is fp32 only
    precision = inference_precision(model.device, "trace", config.precision) if config.engine == "batched" else "float32"

    # keep facts the model knows (clean top-1 = the object's first token)
    restored = tuple(dict.fromkeys(E.kind_site(k)[0] for k in config.kinds))
    p_clean, top1, cache = E.clean_run(fx, prepared, tok.pad_token_id, restored, n_layers)
    known = [i for i, p in enumerate(prepared) if int(top1[i]) == p.answer_id]
    skipped = [{"index": chosen[i].index, "subject": world.subject_of(chosen[i]).name,
                "relation": chosen[i].relation, "object": chosen[i].object,
                "reason": f"clean prediction wrong ({tok.convert_ids_to_tokens(int(top1[i]))!r})"}
               for i in range(len(prepared)) if i not in set(known)]
    cfg = {**to_dict(config), "window": window, "subject_embedding_std": std, "precision": precision}
    if not known:
        return TraceResult(cfg, nu, n_layers, [], np.zeros(0), np.zeros(0), np.zeros((0, config.samples)),
                           {k: np.zeros((0, n_layers, 0)) for k in config.kinds}, skipped)
    prepared = [prepared[i] for i in known]
    batch = config.batch_size or E.auto_batch_size(model.config, max(p.n_tokens for p in prepared), config.memory_mb)
    unit = "restored runs" if config.engine == "batched" else "facts"

    def tick(done: int, total: int) -> None:
        P.status(f"causal trace of {len(prepared)} facts: {done}/{total} {unit}")
        if progress:
            progress(done, total)

    P.status(f"causal trace of {len(prepared)} facts: clean and corrupted runs")
    kw = dict(kinds=config.kinds, noise_scale=nu, samples=config.samples, window=window, seed=config.seed,
              n_layers=n_layers, d_model=d_model, pad_id=tok.pad_token_id, batch_size=batch, progress=tick)
    if config.engine == "batched":  # the clean run above serves the engine too (padding does not reach earlier tokens)
        clean = (p_clean[known], top1[known], {s: c[known] for s, c in cache.items()})
        out = E.run_batched(fx, prepared, clean=clean, precision=precision, **kw)
    else:
        out = E.run_reference(bridge if bridge is not None else bundle.bridge(), prepared, **kw)
    labels = []
    for p in prepared:
        f = world.facts[p.index]
        labels.append({"index": f.index, "subject": world.subject_of(f).name, "relation": f.relation,
                       "object": f.object, "template": p.template, "prompt": p.prompt, "tokens": list(p.tokens),
                       "subject_span": list(p.subject)})
    return TraceResult(cfg, float(nu), n_layers, labels, out.p_clean, out.p_corrupt.mean(axis=1),
                       out.p_corrupt, {k: v.mean(axis=-1) for k, v in out.p_restored.items()}, skipped)


def locate_for(bundle, facts: Iterable[str | int | Fact] | None = None, relation: str | None = None, n: int = 50,
               seed: int = 0, **overrides) -> Location:
    """Trace a seeded sample of `n` trained facts (of `relation`, or `facts`) and locate the MLP layer
    with the largest mean IE at the last subject token (what `--layer traced` uses)."""
    chosen = select_facts(bundle.world, facts, relation=relation, n=n, seed=seed)
    if not chosen:
        raise MecheditError("no trained facts to trace for locating a layer")
    result = trace(bundle, chosen, **{"sites": ("mlp",), "seed": seed, **overrides})
    if result.n_facts == 0:
        raise MecheditError(f"the model knows none of the {len(chosen)} sampled facts; cannot locate a layer")
    return locate(result, site="mlp")
