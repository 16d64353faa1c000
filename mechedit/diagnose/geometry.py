"""Entity geometry on cyclic orders: representations, distance matrices, R(D*) and ring-ness.

After Nishi et al., "Representation Shattering in Transformers: A Synthetic Study with Knowledge
Editing" (ICML 2025). Entities lie on cyclic orders; a model that holds the orders places its entity
representations so that representation distance grows with cyclic distance. An edit "shatters"
that geometry when the pairwise distances move:

    D_ij = ||h_i - h_j||_2                       (entity representations h_i at one layer)
    R(D*) = ||D* - D0||_F / ||D0||_F              (D0 before, D* after the intervention)
    ring-ness(order o) = Spearman(c_o(i, j), D_ij) over the entity pairs i < j,
                         c_o(i, j) = min(|p_i - p_j|, n - |p_i - p_j|) the cyclic distance in order o
    joint ring-ness     = Spearman(sqrt(sum_o chord_o(i, j)^2), D_ij),  chord_o = 2 sin(pi c_o / n)

The joint statistic is the one to read when the entities lie on several orders: a representation
that holds all O orders perfectly (one circle per order, in orthogonal planes) has joint ring-ness 1,
but its per-order Spearman is bounded well below 1 because the other orders add distance that order o
does not predict (mean over random orders, 16-24 entities: 0.99 / 0.70 / 0.56 for O = 1 / 2 / 3).
With one order the two statistics are equal (the chord is monotone in the cyclic distance).

Entity representation (our choice, where the paper reads one fixed prompt format): the residual
stream at the entity's last token, averaged over the trained cloze prompts in which the entity is
the subject (every trained fact of a cyclic relation, every template trained for that fact; the
answer is not part of the prompt). Layers are indexed like the hidden-state tuple: index 0 is the
token embedding (`blocks.0.hook_resid_pre`), index l + 1 the output of block l
(`blocks.{l}.hook_resid_post`); `layer_labels` names them "embed", "0", "1", ... .
The "selection" prompt split is the template held out for each trained fact: prompts disjoint from
the trained ones, used to choose the layer without looking at the data the figures are computed on.
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import torch

from mechedit.errors import MecheditError
from mechedit.model.evaluate import pad
from mechedit.unlearn.loop import capture_layer
from mechedit.world.tokenizer import token_span
from mechedit.world.world import World

SPLITS = ("trained", "selection")


@dataclass(frozen=True)
class RingSet:
    """The entities of one cyclic block and their positions on each of its orders."""

    entities: tuple[int, ...]  # subject ids, ascending
    positions: dict[str, np.ndarray]  # ring name -> [n_entities] position of each entity in that order

    @property
    def n(self) -> int:
        return len(self.entities)

    def cyclic_distances(self, ring: str) -> np.ndarray:
        """[n, n] cyclic distance between entities in order `ring`."""
        p = self.positions[ring]
        diff = np.abs(p[:, None] - p[None, :])
        return np.minimum(diff, self.n - diff)

    def index(self, subject_id: int) -> int:
        return self.entities.index(subject_id)


def ring_sets(world: World) -> list[RingSet]:
    """One RingSet per entity pool (the orders of one `[[cyclic]]` block share their entities)."""
    pools: dict[tuple[int, ...], dict[str, tuple[int, ...]]] = {}
    for ring, order in world.rings.items():
        pools.setdefault(tuple(sorted(order)), {})[ring] = order
    out = []
    for ents, rings in pools.items():
        where = {s: i for i, s in enumerate(ents)}
        positions = {}
        for ring, order in rings.items():
            p = np.empty(len(ents), dtype=int)
            for k, s in enumerate(order):
                p[where[s]] = k
            positions[ring] = p
        out.append(RingSet(ents, positions))
    return out


def ring_of_relation(world: World, relation: str) -> str | None:
    """The ring (cyclic order) a cyclic relation walks on: `ring1_cw2` -> `ring1`."""
    if world.relation(relation).kind != "cyclic":
        return None
    ring = relation.rsplit("_", 1)[0]
    return ring if ring in world.rings else None


def hop_and_sign(relation: str) -> tuple[int, int]:
    """`ring1_cw2` -> (2, +1); `ring1_ccw3` -> (3, -1)."""
    tail = relation.rsplit("_", 1)[1]
    if tail.startswith("ccw"):
        return int(tail[3:]), -1
    if tail.startswith("cw"):
        return int(tail[2:]), 1
    raise MecheditError(f"{relation!r} is not a cyclic relation name")


def entity_prompts(world: World, rs: RingSet, split: str = "trained") -> tuple[list[str], list[int], np.ndarray, list]:
    """Prompts with the entity as subject: (prompts, entity row, word position of its last token, context key).

    "trained": every trained template of every trained fact of the entity; "selection": the
    template held out for each of those facts. The context key (relation, template) names what
    the prompt says besides the entity.
    """
    if split not in SPLITS:
        raise MecheditError(f"unknown prompt split {split!r} (known: {', '.join(SPLITS)})")
    row = {s: i for i, s in enumerate(rs.entities)}
    prompts, owner, pos, ctx = [], [], [], []
    for f in world.facts:
        if f.subject not in row or not world.is_trained(f) or world.relation_by_name[f.relation].kind != "cyclic":
            continue
        tpls = ([t for t in range(world.n_templates) if t != f.heldout_template] if split == "trained"
                else [f.heldout_template])
        for t in tpls:
            p = world.prompt(f, t)
            _, end = world.subject_span(p.split(), f)
            prompts.append(p)
            owner.append(row[f.subject])
            pos.append(end - 1)
            ctx.append((f.relation, t))
    missing = set(range(rs.n)) - set(owner)
    if missing:
        raise MecheditError(f"entity {world.subjects[rs.entities[min(missing)]].name!r} has no trained prompt")
    return prompts, owner, np.array(pos), ctx


@torch.no_grad()
def prompt_states(model, tokenizer, prompts: list[str], word_pos: np.ndarray, batch_size: int = 512) -> torch.Tensor:
    """[n_prompts, n_layers + 1, d_model] float64: the residual stream at word `word_pos[i]` of prompt i
    (the forward in the process's inference precision, `mechedit.device`)."""
    from mechedit.device import inference_autocast

    n_layers = model.config.num_hidden_layers
    out = []
    was_training = model.training
    model.eval()
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        # token position of the entity's word (its last token: a word may be several BPE pieces)
        spans = [token_span(tokenizer, p, (int(w), int(w) + 1)) for p, w in zip(prompts[chunk], word_pos[chunk])]
        seqs = [ids for ids, _ in spans]
        dev = model.device
        tok = torch.tensor([end - 1 for _, (_, end) in spans], device=dev)  # [b]
        ids, mask = pad(seqs, tokenizer.pad_token_id, dev)
        with ExitStack() as stack:
            caps = [stack.enter_context(capture_layer(model, l)) for l in range(n_layers)]
            stack.enter_context(inference_autocast(dev, "diagnostics"))
            res = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        rows = torch.arange(len(seqs), device=dev)
        hs = [res.hidden_states[0]] + [c["h"] for c in caps]  # each [b, pos, d_model]
        out.append(torch.stack([h[rows, tok].double() for h in hs], dim=1).cpu())
    if was_training:
        model.train()
    return torch.cat(out)


def entity_representations(model, tokenizer, world: World, rs: RingSet, split: str = "trained",
                           center: bool = True) -> np.ndarray:
    """[n_layers + 1, n_entities, d_model] float64: mean residual at the entity's last token (module doc).

    `center`: first subtract from each prompt's state the mean state of its context (the same
    relation and template, over the entities), so that what the prompt says besides the entity
    (which differs between entities: each fact holds out a random template) does not enter the
    distances; then average per entity.
    """
    prompts, owner, wpos, ctx = entity_prompts(world, rs, split)
    states = prompt_states(model, tokenizer, prompts, wpos)  # [n_prompts, layers + 1, d]
    if center:
        keys = {k: i for i, k in enumerate(dict.fromkeys(ctx))}
        kid = torch.tensor([keys[k] for k in ctx], device=states.device)
        sums = torch.zeros(len(keys), *states.shape[1:], dtype=torch.float64, device=states.device).index_add_(0, kid, states)
        cnt = torch.zeros(len(keys), dtype=torch.float64, device=states.device).index_add_(
            0, kid, torch.ones(len(ctx), dtype=torch.float64, device=states.device))
        states = states - (sums / cnt[:, None, None])[kid]
    own = torch.tensor(owner, device=states.device)
    sums = torch.zeros(rs.n, *states.shape[1:], dtype=torch.float64, device=states.device).index_add_(0, own, states)
    counts = torch.zeros(rs.n, dtype=torch.float64, device=states.device).index_add_(
        0, own, torch.ones(len(owner), dtype=torch.float64, device=states.device))
    return (sums / counts[:, None, None]).transpose(0, 1).numpy()


def layer_labels(n_layers: int) -> list[str]:
    return ["embed"] + [str(l) for l in range(n_layers)]


def pairwise_distances(h: np.ndarray) -> np.ndarray:
    """[..., n, d] -> [..., n, n] Euclidean distances (exact zeros on the diagonal)."""
    h = np.asarray(h, dtype=np.float64)
    diff = h[..., :, None, :] - h[..., None, :, :]
    return np.sqrt((diff ** 2).sum(-1))


def shattering_r(d0: np.ndarray, d1: np.ndarray) -> float:
    """R(D*) = ||D* - D0||_F / ||D0||_F (Nishi et al. 2025, eq. for representation shattering)."""
    den = float(np.linalg.norm(d0))
    if den == 0.0:
        raise MecheditError("all entity representations coincide (||D0|| = 0): R is undefined")
    return float(np.linalg.norm(d1 - d0) / den)


def ringness(d: np.ndarray, cyc: np.ndarray) -> tuple[float, float]:
    """Spearman correlation (rho, two-sided p) of cyclic distance and representation distance over pairs i < j."""
    from scipy.stats import spearmanr

    iu = np.triu_indices(d.shape[0], k=1)
    res = spearmanr(cyc[iu], d[iu])
    return float(res.statistic), float(res.pvalue)


def joint_ringness(d: np.ndarray, rs: RingSet) -> float:
    """Spearman of representation distance with the distance on the product of the orders' circles."""
    chord2 = sum((2 * np.sin(np.pi * rs.cyclic_distances(r) / rs.n)) ** 2 for r in rs.positions)
    # rounding: equal chords must tie exactly (a float sum of sines may differ in the last bit)
    return ringness(d, np.round(np.sqrt(chord2), 9))[0]


def displacement_by_distance(h0: np.ndarray, h1: np.ndarray, dist: np.ndarray) -> dict[int, float]:
    """Mean ||h1_i - h0_i|| over the entities i at each cyclic distance `dist[i]` from the edited entity."""
    disp = np.linalg.norm(np.asarray(h1, float) - np.asarray(h0, float), axis=-1)
    return {int(k): float(disp[dist == k].mean()) for k in np.unique(dist)}
