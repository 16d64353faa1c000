"""The "shattering" suite: how far an intervention moves the geometry of cyclic entities, and what it costs.

Nishi et al., "Representation Shattering in Transformers: A Synthetic Study with Knowledge Editing"
(ICML 2025): after a counterfactual edit of a fact on a cyclic order, the ring formed by the entity
representations breaks, more so the farther (in cyclic distance) the new object lies from the true
one, and the breakage tracks the loss of recall and inference. Formulas and the representation are in
`mechedit.diagnose.geometry`. Per call (one edit, one batch, or one unlearning run) the suite reports:

- `R` = ||D* - D0||_F / ||D0||_F at the chosen layer (`R_by_layer` for every layer, in `keep`);
  `R_others` the same over the entities that are not the subject of a request (the edited entity's own
  move left out);
- `ringness_before` / `ringness_after`: the joint ring-ness (Spearman of representation distance with
  the distance on the product of the orders' circles; equal to Spearman(cyclic distance,
  representation distance) for one order) at the chosen layer; `ringness_by_order_before` / `_after`
  the Spearman per order (every layer of both in `keep`);
- `edit_distance`: the cyclic distance between the true and the new object in the edited relation's
  order (mean over the requests that have one; absent for refusals);
- `displacement`: for a single edited entity, mean ||h*_i - h0_i|| / mean(D0) of the entities at each
  cyclic distance from it (in the edited relation's order);
- `accuracy`: recall before / after / change per group, one value per fact (mean over its prompts):
  `edited_new` and `edited_old` (the new and the true object on the edited facts' trained templates),
  `ring_direct` (every other trained fact of the ring's relations), `logical` and `compositional`
  (the held-out inference facts, every template), `non_ring` (a seeded sample of the trained facts of
  the other relations);
- `keep`: 2-D pictures of the entities at the chosen layer before and after (PCA fitted on the
  representations before and applied to both; Isomap fitted on each, the after picture rotated onto
  the before one by orthogonal Procrustes), kept by the analysis runner for the report's figures.

Layer (option `shattering_layer`): "auto" (default) picks the layer whose ring-ness, measured on the
ORIGINAL model with the "selection" prompts (the template held out for each fact, never part of the
representations the figures use), is highest; or "embed", or a block index 0..n_layers-1 (the output
of that block). Where we differ from the paper: it reads one prompt format at one fixed layer; we
average over the trained cloze prompts and choose the layer on held-out prompts.
"""
from __future__ import annotations

import numpy as np

from mechedit.diagnose import metric, register_suite
from mechedit.diagnose.cache import memo
from mechedit.diagnose.geometry import (RingSet, displacement_by_distance, entity_representations, joint_ringness,
                                        layer_labels, pairwise_distances, ring_of_relation, ring_sets, ringness,
                                        shattering_r)
from mechedit.diagnose.strict import strict_json
from mechedit.errors import MecheditError
from mechedit.model.evaluate import score_answers
from mechedit.world.world import World

GROUPS = ("edited_new", "edited_old", "ring_direct", "logical", "compositional", "non_ring")


def check_shattering_options(options: dict, before=None) -> None:
    """The suite's options before any work: types (no model needed), and the layer's range on `before`."""
    layer = options.get("shattering_layer", "auto")
    if layer not in ("auto", "embed") and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 0):
        raise MecheditError(f"shattering_layer must be 'auto', 'embed' or a block index >= 0, got {layer!r}")
    n = options.get("shattering_n_nonring", 300)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise MecheditError(f"shattering_n_nonring must be an integer >= 0, got {n!r}")
    if before is not None:
        resolve_layer(layer, before.model.config.num_hidden_layers)


def resolve_layer(value, n_layers: int) -> int | str:
    """The option as a hidden-state index (0 = embeddings, l + 1 = block l), or "auto"."""
    if value == "auto":
        return "auto"
    if value == "embed":
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n_layers:
        raise MecheditError(f"shattering_layer must be 'auto', 'embed' or a block index 0..{n_layers - 1}, "
                            f"got {value!r}")
    return value + 1


def choose_ring_set(world: World, requests) -> RingSet:
    sets = ring_sets(world)
    if not sets:
        raise MecheditError("the shattering suite needs a world with cyclic entities (a [[cyclic]] block)")
    for r in requests:
        s = world.subject(r.subject).id
        for rs in sets:
            if s in rs.entities:
                return rs
    return sets[0]


def edit_distance(world: World, req) -> int | None:
    """Cyclic distance between the true and the new object in the order the edited relation walks."""
    ring = ring_of_relation(world, req.relation)
    if ring is None or req.new_object not in world.subject_by_name:
        return None
    order = world.rings[ring]
    new = world.subject_by_name[req.new_object].id
    if new not in order:
        return None
    old = world.subject_by_name[world.fact(req.subject, req.relation).object].id
    diff = abs(order.index(new) - order.index(old))
    return int(min(diff, len(order) - diff))


def _accuracy_rows(world: World, rs: RingSet, requests, n_nonring: int, seed: int) -> list[tuple[str, str, str, str]]:
    """(group, item id, prompt, answer) rows; item = request index or fact index."""
    rows = []
    edited = [world.fact(r.subject, r.relation) for r in requests]
    edited_ids = {f.index for f in edited}

    def trained_tpls(f):
        return [t for t in range(world.n_templates) if t != f.heldout_template]

    for i, (r, f) in enumerate(zip(requests, edited)):
        for t in trained_tpls(f):
            rows.append(("edited_new", str(i), world.prompt(f, t), r.new_object))
            rows.append(("edited_old", str(i), world.prompt(f, t), f.object))
    ents = set(rs.entities)
    ring_rels = {f.relation for f in world.facts if f.subject in ents and world.relation_by_name[f.relation].kind == "cyclic"}
    nonring = []
    for f in world.facts:
        if f.index in edited_ids:
            continue
        kind = world.inference.get(f.index)
        if f.relation in ring_rels and f.subject in ents:
            if kind is not None:
                rows += [(kind, str(f.index), world.prompt(f, t), f.object) for t in range(world.n_templates)]
            elif world.is_trained(f):
                rows += [("ring_direct", str(f.index), world.prompt(f, t), f.object) for t in trained_tpls(f)]
        elif world.is_trained(f) and world.relation_by_name[f.relation].kind != "cyclic":
            nonring.append(f)
    rng = np.random.default_rng([seed, 23])
    for j in sorted(rng.choice(len(nonring), size=min(n_nonring, len(nonring)), replace=False)) if nonring else []:
        f = nonring[int(j)]
        rows += [("non_ring", str(f.index), world.prompt(f, t), f.object) for t in trained_tpls(f)]
    return rows


def _per_item(rows, correct, group: str) -> dict[str, float]:
    acc: dict[str, list[float]] = {}
    for r, ok in zip(rows, correct):
        if r[0] == group:
            acc.setdefault(r[1], []).append(float(ok))
    return {k: float(np.mean(v)) for k, v in acc.items()}


def _recall(bundle, rows) -> np.ndarray:
    return score_answers(bundle.model, bundle.tokenizer, [r[2] for r in rows], [r[3] for r in rows]).correct


def _xy(a: np.ndarray) -> list[list[float]]:
    return [[round(float(x), 4), round(float(y), 4)] for x, y in a]


def pictures(h0: np.ndarray, h1: np.ndarray) -> dict:
    """2-D coordinates before / after: PCA (fit on before) and Isomap (each fit, after Procrustes-aligned)."""
    import warnings

    from scipy.linalg import orthogonal_procrustes
    from sklearn.decomposition import PCA
    from sklearn.manifold import Isomap

    pca = PCA(n_components=2, random_state=0).fit(h0)
    out = {"pca_before": _xy(pca.transform(h0)), "pca_after": _xy(pca.transform(h1)),
           "pca_explained": [round(float(v), 4) for v in pca.explained_variance_ratio_]}
    k = min(6, len(h0) - 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            b = Isomap(n_neighbors=k, n_components=2).fit_transform(h0)
            a = Isomap(n_neighbors=k, n_components=2).fit_transform(h1)
        b, a = b - b.mean(0), a - a.mean(0)
        rot, _ = orthogonal_procrustes(a, b)
        if np.all(np.isfinite(b)) and np.all(np.isfinite(a)):
            out.update(isomap_before=_xy(b), isomap_after=_xy(a @ rot))
    except ValueError:  # a disconnected neighbour graph: no Isomap picture for this edit
        pass
    return out


@register_suite("shattering", check=check_shattering_options)
def shattering_suite(before, after, requests, shattering_layer: int | str = "auto", shattering_n_nonring: int = 300,
                     seed: int = 0) -> dict:
    """Representation shattering (Nishi et al. 2025): R(D*), ring-ness, displacement, recall and inference costs."""
    world = before.world
    n_layers = before.model.config.num_hidden_layers
    check_shattering_options({"shattering_layer": shattering_layer, "shattering_n_nonring": shattering_n_nonring})
    layer = resolve_layer(shattering_layer, n_layers)
    rs = choose_ring_set(world, requests)
    rings = sorted(rs.positions)
    cyc = {r: rs.cyclic_distances(r) for r in rings}
    key = (rs.entities,)

    def reps(b, split):
        return memo(f"shattering_reps_{split}", b.model, key,
                    lambda: entity_representations(b.model, b.tokenizer, world, rs, split))

    h0, h1 = reps(before, "trained"), reps(after, "trained")  # [layers + 1, n, d]
    d0, d1 = pairwise_distances(h0), pairwise_distances(h1)
    # ring-ness of the original model on the selection prompts: chooses the layer ("auto"); always recorded
    sel = memo("shattering_selection", before.model, key,
               lambda: [joint_ringness(d, rs) for d in pairwise_distances(reps(before, "selection"))])
    chosen_by = "option"
    if layer == "auto":
        layer, chosen_by = int(np.argmax(sel)), "selection prompts"
    labels = layer_labels(n_layers)
    r_by_layer = [shattering_r(d0[l], d1[l]) for l in range(n_layers + 1)]
    ring_b = {r: [ringness(d0[l], cyc[r])[0] for l in range(n_layers + 1)] for r in rings}
    ring_a = {r: [ringness(d1[l], cyc[r])[0] for l in range(n_layers + 1)] for r in rings}
    joint_b = [joint_ringness(d0[l], rs) for l in range(n_layers + 1)]
    joint_a = [joint_ringness(d1[l], rs) for l in range(n_layers + 1)]

    dists = [edit_distance(world, q) for q in requests]
    known = [d for d in dists if d is not None]
    edited_info = []
    for q, d in zip(requests, dists):
        s = world.subject(q.subject).id
        edited_info.append({"subject": q.subject, "relation": q.relation, "new_object": q.new_object,
                            "ring": ring_of_relation(world, q.relation), "distance": d,
                            "entity": rs.index(s) if s in rs.entities else None})
    # R of the entities the requests do not name as subject: how far the geometry of the OTHER entities moves
    others = [i for i in range(rs.n) if i not in {e["entity"] for e in edited_info}]
    r_others = (shattering_r(d0[layer][np.ix_(others, others)], d1[layer][np.ix_(others, others)])
                if len(others) >= 2 else None)
    displacement = None
    first = edited_info[0]
    if len(requests) == 1 and first["entity"] is not None and first["ring"] in cyc:
        scale = float(d0[layer][np.triu_indices(rs.n, 1)].mean())
        disp = displacement_by_distance(h0[layer], h1[layer], cyc[first["ring"]][first["entity"]])
        displacement = {str(k): v / scale for k, v in disp.items()}

    rows = _accuracy_rows(world, rs, requests, shattering_n_nonring, seed)
    ok_b = memo("shattering_recall", before.model, (tuple(rows),), lambda: _recall(before, rows))
    ok_a = _recall(after, rows)
    accuracy = {}
    for g in GROUPS:
        if not any(r[0] == g for r in rows):
            continue
        b, a = metric(_per_item(rows, ok_b, g)), metric(_per_item(rows, ok_a, g))
        accuracy[g] = {"before": b["agg_value"], "after": a["agg_value"], "change": a["agg_value"] - b["agg_value"],
                       "n": len(a["value_by_index"])}

    out = {
        "layer": labels[layer], "layer_index": layer, "layer_chosen_by": chosen_by,
        "n_entities": rs.n, "rings": rings,
        "R": r_by_layer[layer],
        "R_others": r_others,
        "ringness_before": joint_b[layer], "ringness_after": joint_a[layer],
        "ringness_by_order_before": {r: ring_b[r][layer] for r in rings},
        "ringness_by_order_after": {r: ring_a[r][layer] for r in rings},
        "accuracy": accuracy,
        "edited": edited_info,
    }
    if known:
        out["edit_distance"] = float(np.mean(known))
    if displacement is not None:
        out["displacement"] = displacement
    out["keep"] = {
        "layer_labels": labels, "layer_index": layer, "R_by_layer": [round(v, 6) for v in r_by_layer],
        "ringness_selection_by_layer": [round(v, 4) for v in sel],
        "ringness_before_by_layer": {"joint": [round(v, 4) for v in joint_b],
                                     "by_order": {r: [round(v, 4) for v in ring_b[r]] for r in rings}},
        "ringness_after_by_layer": {"joint": [round(v, 4) for v in joint_a],
                                    "by_order": {r: [round(v, 4) for v in ring_a[r]] for r in rings}},
        "entities": [world.subjects[s].name for s in rs.entities],
        "positions": {r: rs.positions[r].tolist() for r in rings},
        "edited": edited_info,
        **pictures(h0[layer], h1[layer]),
    }
    return strict_json(out)
