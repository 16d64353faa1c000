"""How much a single name word (or token) tells about a subject and its objects.

A model can recall a fact per word (a lookup keyed on one word of the name, as an MLP of the first
block does when it sees only its own token) only where single words carry the information. This
module measures that in a world, over its main subjects:

- `last_unique`: share of subjects whose last word (token) occurs in no other subject's name, so
  that it alone identifies the subject; `any_unique`: share with at least one such word;
- `subjects_per_word`: mean number of subjects whose name holds a given word;
- per relation, the mutual information I(W; O) in bits between the first (last) word W of the name
  and the object O, with the plug-in estimator over subjects, beside the same estimator with the
  objects shuffled among subjects (the finite-sample bias: what I(W; O) is when the word carries no
  information), and H(O). A per-word lookup can only use I(W; O) - I_shuffled.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from mechedit.world.world import World


def name_units(world: World, tokenizer=None) -> dict[int, list]:
    """Main subject id -> its name's words, or its name's token ids when a tokenizer is given."""
    out = {}
    for s in world.subjects:
        if s.kind == "subject":
            out[s.id] = (tokenizer(s.name, add_special_tokens=False)["input_ids"] if tokenizer is not None
                         else s.name.split())
    return out


def siblings(world: World, subject_id: int) -> list[int]:
    """Main subjects (other than `subject_id`) whose name shares at least one word with its name."""
    units = name_units(world)
    mine = set(units[subject_id])
    return [s for s, u in units.items() if s != subject_id and mine & set(u)]


def mutual_information(x: list, y: list) -> float:
    """Plug-in I(X; Y) in bits of paired samples."""
    n = len(x)
    if n == 0:
        return 0.0
    pxy = Counter(zip(x, y))
    px, py = Counter(x), Counter(y)
    return float(sum(c / n * np.log2(c * n / (px[a] * py[b])) for (a, b), c in pxy.items()))


def entropy(y: list) -> float:
    n = len(y)
    return float(-sum(c / n * np.log2(c / n) for c in Counter(y).values())) if n else 0.0


def name_statistics(world: World, tokenizer=None, n_shuffles: int = 20, seed: int = 0) -> dict:
    """The statistics of the module docstring, by words (and by tokens when `tokenizer` is given)."""
    out = {"words": _stats(world, name_units(world), n_shuffles, seed)}
    if tokenizer is not None:
        out["tokens"] = _stats(world, name_units(world, tokenizer), n_shuffles, seed)
    return out


def _stats(world: World, units: dict[int, list], n_shuffles: int, seed: int) -> dict:
    holders: dict = {}
    for s, u in units.items():
        for w in set(u):
            holders.setdefault(w, set()).add(s)
    ids = sorted(units)
    last_unique = [len(holders[units[s][-1]]) == 1 for s in ids]
    any_unique = [any(len(holders[w]) == 1 for w in units[s]) for s in ids]
    value = {(f.subject, f.relation): f.object for f in world.facts}
    rng = np.random.default_rng([seed, 13])
    mi: dict[str, dict] = {}
    for r in world.relations:
        subs = [s for s in ids if (s, r.name) in value]
        if len(subs) < 2:
            continue
        objs = [value[(s, r.name)] for s in subs]
        row = {"n": len(subs), "entropy_object": entropy(objs)}
        for pos, idx in (("first", 0), ("last", -1)):
            words = [units[s][idx] for s in subs]
            null = [mutual_information(words, list(rng.permutation(objs))) for _ in range(n_shuffles)]
            row[f"mi_{pos}"] = mutual_information(words, objs)
            row[f"mi_{pos}_shuffled"] = float(np.mean(null))
        mi[r.name] = row
    mean = {k: float(np.mean([v[k] for v in mi.values()])) for k in
            ("mi_first", "mi_first_shuffled", "mi_last", "mi_last_shuffled", "entropy_object")} if mi else {}
    return {"subjects": len(ids), "last_unique": float(np.mean(last_unique)) if ids else 0.0,
            "any_unique": float(np.mean(any_unique)) if ids else 0.0,
            "subjects_per_word": float(np.mean([len(h) for h in holders.values()])) if holders else 0.0,
            "mi_mean": mean, "mi_by_relation": mi}
