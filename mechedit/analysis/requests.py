"""Request sets of an analysis: seeded counterfactual edits, or forget targets for unlearning."""
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
    if rset.kind == "forget":
        return forget_requests(world, rset)
    return counterfactual_requests(world, rset.n, rset.relation, rset.seed, known, rset.exposure)
