"""Request sets of an analysis: seeded counterfactual edits, or forget targets for unlearning."""
from __future__ import annotations

import numpy as np

from mechedit.analysis.spec import RequestSet
from mechedit.edit.api import EditRequest
from mechedit.errors import MecheditError
from mechedit.world.world import World


def counterfactual_requests(world: World, n: int, relation: str | None = None, seed: int = 0,
                            known: set[int] | None = None) -> list[EditRequest]:
    """`n` trained facts of main subjects (of `relation`, if given), each with another object of the pool.

    `known` restricts the draw to facts the model recalls (an edit of an unknown fact measures nothing).
    Distinct subjects, drawn with a seeded generator.
    """
    rng = np.random.default_rng([seed, 7])
    facts = [f for f in world.train_facts if world.subjects[f.subject].kind == "subject"
             and (relation is None or f.relation == relation) and (known is None or f.index in known)]
    if relation is not None:
        world.relation(relation)
    if not facts:
        raise MecheditError(f"no trained facts{' of relation ' + relation if relation else ''} to edit")
    out: list[EditRequest] = []
    used: set[int] = set()
    for i in rng.permutation(len(facts)):
        f = facts[int(i)]
        if f.subject in used:
            continue
        pool = [o for o in world.relation(f.relation).objects if o != f.object]
        new = pool[int(rng.integers(len(pool)))]
        out.append(EditRequest(world.subjects[f.subject].name, f.relation, new))
        used.add(f.subject)
        if len(out) == n:
            break
    return out


def forget_requests(world: World, rset: RequestSet) -> list[EditRequest]:
    """Forget requests (new object = the refusal token) for a target string or N random subjects."""
    from mechedit.unlearn.targets import ForgetTarget, parse_forget

    if rset.forget:
        return parse_forget(world, rset.forget).requests()
    rng = np.random.default_rng([rset.seed, 11])
    main = [s for s in world.subjects if s.kind == "subject" and not s.heldout]
    if rset.subjects is None or not 1 <= rset.subjects <= len(main):
        raise MecheditError(f"requests.{rset.name}.subjects must be between 1 and {len(main)}")
    chosen = sorted(int(i) for i in rng.choice(len(main), size=rset.subjects, replace=False))
    ids = {f.index for i in chosen for f in world.facts_of(main[i].id)}
    return ForgetTarget._make(world, ids).requests()


def build_request_set(world: World, rset: RequestSet, known: set[int] | None = None) -> list[EditRequest]:
    if rset.kind == "forget":
        return forget_requests(world, rset)
    return counterfactual_requests(world, rset.n, rset.relation, rset.seed, known)
