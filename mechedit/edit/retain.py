"""Edit training data for the gradient-based editors: the new facts plus Behemoth's retain mix."""
from __future__ import annotations

import numpy as np

from mechedit.edit.api import EditRequest
from mechedit.edit.common import edit_prompts


def edit_pairs(world, requests: list[EditRequest]) -> list[tuple[str, str]]:
    """(prompt, new object) for every trained cloze template of every request."""
    return [(p, r.new_object) for r in requests for p in edit_prompts(world, r)]


RETAIN_KINDS = ("same_relation", "same_new_value", "unrelated", "same_subject")


def retain_pairs(world, requests: list[EditRequest], n: int, seed: int,
                 kinds: tuple[str, ...] = RETAIN_KINDS) -> list[tuple[str, str]]:
    """Up to `n` (prompt, original object) pairs drawn evenly from Behemoth's retain categories.

    same_relation: other subjects with an edited relation; same_new_value: subjects that already have
    a requested new object; unrelated: facts of other subjects and relations; same_subject: the
    edited subjects' other facts (the analogue of ROME's KL "essence" term), leaving out relations
    derived from an edited one (nested / correlated), whose answers the edit may rightly change.
    """
    if n <= 0:
        return []
    edited = [world.fact(r.subject, r.relation) for r in requests]
    subjects = {f.subject for f in edited}
    rels = {r.relation for r in requests}
    new = {(r.relation, r.new_object) for r in requests}
    pools = {"same_relation": [], "same_new_value": [], "unrelated": [], "same_subject": []}
    edited_keys = {(f.subject, f.relation) for f in edited}
    derived = {(f.subject, g.relation) for f in edited for g in world.facts_of(f.subject)
               if world.relation(g.relation).source == f.relation}
    for f in world.train_facts:
        if f.subject in subjects:
            if (f.subject, f.relation) not in edited_keys | derived:
                pools["same_subject"].append(f)
            continue
        if f.relation in rels:
            pools["same_relation"].append(f)
        else:
            pools["unrelated"].append(f)
        if (f.relation, f.object) in new:
            pools["same_new_value"].append(f)
    rng = np.random.default_rng([seed, 11])
    chosen = [k for k in kinds if pools.get(k)]
    out = []
    for k in chosen:
        pool = pools[k]
        for j in rng.choice(len(pool), size=min(len(pool), max(1, n // len(chosen))), replace=False):
            f = pool[int(j)]
            t = int(rng.choice([x for x in range(world.n_templates) if x != f.heldout_template]))
            out.append((world.prompt(f, t), f.object))
    return out
