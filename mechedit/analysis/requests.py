"""Request sets of an analysis: seeded counterfactual edits, forget targets for unlearning, and edits or
forget sets of cyclic relations (ring edits at a chosen cyclic distance: representation shattering)."""
from __future__ import annotations

import numpy as np

from mechedit.analysis.spec import RequestSet
from mechedit.edit.api import EditRequest
from mechedit.errors import MecheditError
from mechedit.world.world import World


def _exposure_quota(world: World, n: int, exposure: int | str | None) -> dict[int, int] | None:
    """How many items to draw per exposure level: None (no constraint), one level, or "balanced"
    (n split evenly over the world's levels, the remainder to the most exposed)."""
    if exposure is None:
        return None
    levels = sorted(world.exposure_levels())
    if exposure == "balanced":
        if len(levels) < 2:
            raise MecheditError("exposure = 'balanced' needs a world with several exposure levels (world option exposure)")
        quota = {lvl: n // len(levels) for lvl in levels}
        for lvl in levels[::-1][: n % len(levels)]:
            quota[lvl] += 1
        return quota
    if exposure not in levels:
        raise MecheditError(f"no trained facts seen {exposure} times (levels of this world: {levels})")
    return {int(exposure): n}


def counterfactual_requests(world: World, n: int, relation: str | None = None, seed: int = 0,
                            known: set[int] | None = None, exposure: int | str | None = None) -> list[EditRequest]:
    """`n` trained facts of main subjects (of `relation`, if given), each with another object of the pool.

    `known` restricts the draw to facts the model recalls (an edit of an unknown fact measures nothing).
    `exposure`: only facts seen that many times, or "balanced" (equal numbers from each level).
    Distinct subjects, drawn with a seeded generator.
    """
    rng = np.random.default_rng([seed, 7])
    quota = _exposure_quota(world, n, exposure)
    facts = [f for f in world.train_facts if world.subjects[f.subject].kind == "subject"
             and (relation is None or f.relation == relation) and (known is None or f.index in known)
             and (quota is None or f.exposure in quota)]
    if relation is not None:
        world.relation(relation)
    if not facts:
        raise MecheditError(f"no trained facts{' of relation ' + relation if relation else ''} to edit")
    out: list[EditRequest] = []
    used: set[int] = set()
    for i in rng.permutation(len(facts)):
        f = facts[int(i)]
        if f.subject in used or (quota is not None and quota[f.exposure] == 0):
            continue
        pool = [o for o in world.relation(f.relation).objects if o != f.object]
        new = pool[int(rng.integers(len(pool)))]
        out.append(EditRequest(world.subjects[f.subject].name, f.relation, new))
        used.add(f.subject)
        if quota is not None:
            quota[f.exposure] -= 1
        if len(out) == n:
            break
    if quota is not None and any(quota.values()):
        raise MecheditError(f"not enough distinct subjects to draw {n} requests at exposure {exposure!r}")
    return out


def forget_requests(world: World, rset: RequestSet) -> list[EditRequest]:
    """Forget requests (new object = the refusal token) for a target string or N random subjects."""
    from mechedit.unlearn.targets import ForgetTarget, parse_forget

    if rset.forget:
        return parse_forget(world, rset.forget).requests()
    rng = np.random.default_rng([rset.seed, 11])
    main = knowledge_pool(world, rset.knowledge)
    if rset.subjects is None or not 1 <= rset.subjects <= len(main):
        raise MecheditError(f"requests.{rset.name}.subjects must be between 1 and {len(main)}")
    if rset.exposure is None:
        chosen = sorted(int(i) for i in rng.choice(len(main), size=rset.subjects, replace=False))
    else:  # subjects of one exposure level, or balanced over the levels
        expo = {s.id: world.facts_of(s.id)[0].exposure for s in main}
        chosen = []
        for lvl, k in _exposure_quota(world, rset.subjects, rset.exposure).items():
            pool = [i for i, s in enumerate(main) if expo[s.id] == lvl]
            if k > len(pool):
                raise MecheditError(f"requests.{rset.name}: only {len(pool)} subjects are seen {lvl} times")
            chosen += [pool[int(j)] for j in rng.choice(len(pool), size=k, replace=False)]
        chosen = sorted(chosen)
    ids = {f.index for i in chosen for f in world.facts_of(main[i].id)}
    return ForgetTarget._make(world, ids).requests()


def _ring_facts(world: World, rset: RequestSet, known: set[int] | None) -> list:
    """`rset.n` distinct trained facts of cyclic relations (of `rset.relation` if given), seeded."""
    where = f"requests.{rset.name}"
    if rset.relation is not None:
        if rset.relation not in world.relation_by_name or world.relation(rset.relation).kind != "cyclic":
            raise MecheditError(f"{where}.relation: {rset.relation!r} is not a cyclic relation of this world")
    facts = [f for f in world.train_facts if world.relation_by_name[f.relation].kind == "cyclic"
             and f.relation.rsplit("_", 1)[0] in world.rings
             and (rset.relation is None or f.relation == rset.relation) and (known is None or f.index in known)]
    if len(facts) < rset.n:
        raise MecheditError(f"{where}.n: asks for {rset.n} cyclic facts but the world has {len(facts)} trained ones "
                            "the model recalls")
    rng = np.random.default_rng([rset.seed, 17])
    return [facts[int(i)] for i in sorted(rng.choice(len(facts), size=rset.n, replace=False))]


def ring_requests(world: World, rset: RequestSet, known: set[int] | None = None) -> tuple[list[EditRequest], list[int]]:
    """Edits of cyclic facts whose new object lies at cyclic distance d from the true one, for each d.

    The same `n` facts are edited at every distance in `rset.distances` (default 0 .. n_entities // 2),
    so distances are compared on the same facts. The new object is the entity d steps clockwise or
    anticlockwise (a seeded coin per fact and distance) from the true object in the order the
    relation walks; d = 0 re-asserts the true object (the null control: how much R moves when the
    edit asks for nothing new). Returns (requests, distance of each request).
    """
    facts = _ring_facts(world, rset, known)
    rings = {f.relation.rsplit("_", 1)[0] for f in facts}
    n_ent = min(len(world.rings[r]) for r in rings)
    distances = rset.distances if rset.distances is not None else tuple(range(n_ent // 2 + 1))
    bad = [d for d in distances if d > n_ent // 2]
    if bad:
        raise MecheditError(f"requests.{rset.name}.distances: {bad[0]} exceeds the largest cyclic distance "
                            f"{n_ent // 2} of a ring of {n_ent} entities")
    rng = np.random.default_rng([rset.seed, 19])
    out, dist = [], []
    for d in distances:
        for f in facts:
            order = world.rings[f.relation.rsplit("_", 1)[0]]
            p = order.index(world.subject_by_name[f.object].id)
            sign = 1 if rng.random() < 0.5 else -1
            new = world.subjects[order[(p + sign * d) % len(order)]].name
            out.append(EditRequest(world.subjects[f.subject].name, f.relation, new))
            dist.append(int(d))
    return out, dist


def ring_forget_requests(world: World, rset: RequestSet, known: set[int] | None = None) -> list[EditRequest]:
    """`n` cyclic facts to unlearn (new object = the refusal token)."""
    from mechedit.world.language import REFUSAL

    return [EditRequest(world.subjects[f.subject].name, f.relation, REFUSAL) for f in _ring_facts(world, rset, known)]


def knowledge_pool(world: World, knowledge: str = "all") -> list:
    """Trained main subjects to forget: "all"; "pretrained" the first-stage ones (on a world with forget
    instructions, those never named in a training instruction, so in-context unlearning is measured as
    instruction following); "finetuned" the second-stage ones (a `mechedit finetune-facts` checkpoint)."""
    subjects = [s for s in world.subjects if s.kind == "subject" and not s.heldout]
    if knowledge == "all":
        return subjects
    stage2 = set(world.stage2_subjects)
    if knowledge == "finetuned":
        if not world.stage2_trained:
            raise MecheditError("knowledge = 'finetuned' needs a second-stage checkpoint (model.finetune_facts = true)")
        return [s for s in subjects if s.id in stage2]
    if world.spec.instructions:
        from mechedit.world.instructions import instruction_split

        never = set(instruction_split(world)[1])
        return [s for s in subjects if s.id in never]
    return [s for s in subjects if s.id not in stage2]


def build_request_set(world: World, rset: RequestSet, known: set[int] | None = None) -> list[EditRequest]:
    return request_set_record(world, rset, known)["requests"]


def request_set_record(world: World, rset: RequestSet, known: set[int] | None = None) -> dict:
    """The request set as stored in a run's spec.json: {"kind", "mode", "requests": [dict], "groups"?}.

    `kind` is "forget" for unlearning sets (the runner gives them the forget suites). `groups`, when
    present, labels each request; in "batch" mode the requests of one label are edited in one call
    (ring sets: one batch per distance).
    """
    groups = None
    if rset.kind == "forget":
        reqs = forget_requests(world, rset)
    elif rset.kind == "ring":
        reqs, groups = ring_requests(world, rset, known)
    elif rset.kind == "ring_forget":
        reqs = ring_forget_requests(world, rset, known)
    else:
        reqs = counterfactual_requests(world, rset.n, rset.relation, rset.seed, known, rset.exposure)
    rec = {"kind": "forget" if rset.unlearning else "counterfactual", "mode": rset.mode,
           "requests": [q.__dict__ for q in reqs]}
    if groups is not None:
        rec["groups"] = groups
    return rec


def request_groups(rset: dict, requests: list) -> list[list]:
    """The edit calls of a stored request set: each request alone ("each"), or one call per group label."""
    if rset["mode"] == "each":
        return [[r] for r in requests]
    labels = rset.get("groups") or [0] * len(requests)
    calls: dict = {}
    for label, r in zip(labels, requests):
        calls.setdefault(label, []).append(r)
    return list(calls.values())
