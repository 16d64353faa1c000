"""Generate a `World` from a `WorldSpec`: names, object pools, facts of every relation structure."""
from __future__ import annotations

import math

import numpy as np

from mechedit.errors import SpecError
from mechedit.world import language as L
from mechedit.world.names import WordGenerator
from mechedit.world.spec import WorldSpec
from mechedit.world.world import Fact, Relation, Subject, World


def _reserved_words() -> set[str]:
    return set(L.FUNCTION_WORDS) | set(L.SPECIAL_TOKENS) | set(L.INSTRUCTION_WORDS)


def word_names(spec: WorldSpec, rng: np.random.Generator, gen: WordGenerator) -> list[str]:
    """Names of 1-3 words (shares `name_words`) drawn from one pool of name words, each word used by
    ~`word_reuse` subjects on average; distinct names."""
    shares = np.asarray(spec.name_words, dtype=float)
    n_words = rng.choice([1, 2, 3], size=spec.n_subjects, p=shares / shares.sum())
    pool_size = max(int(n_words.max()), math.ceil(int(n_words.sum()) / spec.word_reuse))
    pool = gen.words(pool_size)
    names: list[str] = []
    seen: set[tuple[str, ...]] = set()
    for k in n_words:
        for _ in range(200):
            combo = tuple(pool[int(i)] for i in rng.choice(pool_size, size=int(k), replace=False))
            if combo not in seen:
                break
        else:
            raise SpecError("could not make enough distinct subject names; lower word_reuse or n_subjects")
        seen.add(combo)
        names.append(" ".join(combo))
    return names


def first_last_names(spec: WorldSpec, rng: np.random.Generator, gen: WordGenerator) -> list[str]:
    """"first last" names from two pools of n = ceil(n_subjects / word_reuse) words each, balanced.

    Subject k takes the cell (r, c) = (k mod n, (k mod n + k div n) mod n) of the n x n grid of
    combinations: distinct cells, every first name used by floor or ceil of n_subjects / n subjects
    and every last name by at most one more than that. The names of each pool are shuffled, and so
    is the order of the subjects, so neither the ids nor the words carry the design.
    """
    n = math.ceil(spec.n_subjects / spec.word_reuse)
    first, last = gen.words(n), gen.words(n)
    fo, lo = rng.permutation(n), rng.permutation(n)
    cells = [(k % n, (k % n + k // n) % n) for k in range(spec.n_subjects)]
    names = [f"{first[int(fo[r])]} {last[int(lo[c])]}" for r, c in cells]
    return [names[int(i)] for i in rng.permutation(len(names))]


def generate_world(spec: WorldSpec) -> World:
    """Build the world for `spec`; the same spec gives the same world (and byte-identical JSON)."""
    spec.validate()
    rng = np.random.default_rng(spec.seed)
    gen = WordGenerator(np.random.default_rng([spec.seed, 2]), spec.syllables,
                        reserved=_reserved_words() | {r.name for r in spec.relations})

    # --- main subjects' names -------------------------------------------------------------
    names = first_last_names(spec, rng, gen) if spec.name_scheme == "first_last" else word_names(spec, rng, gen)
    n_alias = round(spec.alias_fraction * spec.n_subjects)
    alias_of = set(rng.choice(spec.n_subjects, size=n_alias, replace=False).tolist()) if n_alias else set()
    n_held = round(spec.heldout_subject_fraction * spec.n_subjects)
    heldout = set(rng.choice(spec.n_subjects, size=n_held, replace=False).tolist()) if n_held else set()
    stage2 = _stage2_subjects(spec, heldout)
    subjects: list[Subject] = []
    for i, name in enumerate(names):
        alias = " ".join(gen.words(int(rng.integers(1, 3)))) if i in alias_of else None
        subjects.append(Subject(i, name, "subject", alias, i in heldout or i in stage2))

    # --- relations and their object pools --------------------------------------------------
    function_words_b = {w: gen.word() for w in L.FUNCTION_WORDS}
    rel_specs = {r.name: r for r in spec.relations}
    correlated = {c.target: c for c in spec.correlated}
    nested = {n.child: n for n in spec.nested}
    pools: dict[str, tuple[str, ...]] = {}
    for r in spec.relations:
        if r.name in correlated:
            continue
        pools[r.name] = tuple(" ".join(gen.words(spec.object_words)) for _ in range(r.n_objects))
    for c in spec.correlated:
        pools[c.target] = pools[c.source] if c.source in pools else None  # resolved below
    # correlated targets share their source's pool (a chain resolves in order)
    for _ in range(len(spec.correlated) + 1):
        for c in spec.correlated:
            if pools.get(c.target) is None and pools.get(c.source) is not None:
                pools[c.target] = pools[c.source]
    if any(v is None for v in pools.values()):
        raise SpecError("correlated relations form a cycle")

    # --- main subjects' facts, relation by relation in dependency order ---------------------
    main_ids = [s.id for s in subjects]
    values: dict[str, dict[int, str]] = {}
    nested_maps: dict[str, dict[str, str]] = {}
    pending = [r.name for r in spec.relations]
    while pending:
        progressed = False
        for name in list(pending):
            src = correlated[name].source if name in correlated else nested[name].parent if name in nested else None
            if src is not None and src not in values:
                continue
            pool = pools[name]
            if name in correlated:
                c = correlated[name]
                vals = {}
                for s in main_ids:
                    copied = values[c.source][s]
                    if rng.random() < c.p:
                        vals[s] = copied
                    else:
                        others = [o for o in pool if o != copied]
                        vals[s] = others[int(rng.integers(len(others)))]
                values[name] = vals
            elif name in nested:
                parent_pool = pools[nested[name].parent]
                order = rng.permutation(len(parent_pool))
                mapping = {parent_pool[int(j)]: pool[k % len(pool)] for k, j in enumerate(order)}
                nested_maps[name] = dict(sorted(mapping.items()))
                values[name] = {s: mapping[values[nested[name].parent][s]] for s in main_ids}
            else:
                draws = rng.integers(0, len(pool), size=len(main_ids))
                values[name] = {s: pool[int(d)] for s, d in zip(main_ids, draws)}
            pending.remove(name)
            progressed = True
        if not progressed:
            raise SpecError(f"relation structure has a dependency cycle among {pending}")

    relations: list[Relation] = []
    for r in spec.relations:
        kind, source, p = "independent", None, None
        if r.name in correlated:
            kind, source, p = "correlated", correlated[r.name].source, correlated[r.name].p
        elif r.name in nested:
            kind, source = "nested", nested[r.name].parent
        relations.append(Relation(r.name, gen.word(), kind, pools[r.name], source, p))

    triples: list[tuple[int, str, str]] = [(s, r.name, values[r.name][s]) for s in main_ids for r in spec.relations]

    # --- nested parent objects are subjects of the child relation -----------------------------
    for n in spec.nested:
        for obj, child in nested_maps[n.child].items():
            sid = len(subjects)
            subjects.append(Subject(sid, obj, "object"))
            triples.append((sid, n.child, child))

    # --- cyclic orders ---------------------------------------------------------------------
    rings: dict[str, tuple[int, ...]] = {}
    inference: dict[int, str] = {}
    for b, c in enumerate(spec.cyclic):
        ents = gen.words(c.n_entities)
        ids = []
        for w in ents:
            ids.append(len(subjects))
            subjects.append(Subject(len(subjects), w, "ring"))
        orders = _cyclic_orders(rng, c.n_entities, c.orders)
        slot: dict[tuple[str, int, str, int], int] = {}  # (ring, position, direction, hop) -> triple index
        for ring, perm in zip(c.ring_names, orders):
            order = [ids[int(i)] for i in perm]
            rings[ring] = tuple(order)
            for h in c.hops:
                for direction, sign in (("cw", 1), ("ccw", -1)):
                    name = f"{ring}_{direction}{h}"
                    relations.append(Relation(name, gen.word(), "cyclic", tuple(ents)))
                    for i, sid in enumerate(order):
                        target = order[(i + sign * h) % c.n_entities]
                        slot[(ring, i, direction, h)] = len(triples)
                        triples.append((sid, name, subjects[target].name))
        inference.update(_heldout_inference(np.random.default_rng([spec.seed, 13, b]), c, slot))

    held_tpl = rng.integers(0, spec.n_templates, size=len(triples))
    count = subject_exposure(spec)
    base = min(count.values(), default=1)
    facts = tuple(Fact(i, s, r, o, int(t), count.get(s, base))
                  for i, ((s, r, o), t) in enumerate(zip(triples, held_tpl)))
    return World(spec, tuple(subjects), tuple(relations), facts, function_words_b, nested_maps, rings,
                 tuple(sorted(stage2)), dict(sorted(inference.items())))


def _stage2_subjects(spec: WorldSpec, heldout: set[int]) -> set[int]:
    """Second-stage subjects: a seeded share of the other main subjects (own random stream, so a world
    without them is generated exactly as before)."""
    n = round(spec.stage2_subject_fraction * spec.n_subjects)
    if n == 0:
        return set()
    pool = [i for i in range(spec.n_subjects) if i not in heldout]
    return set(np.random.default_rng([spec.seed, 19]).choice(pool, size=n, replace=False).tolist())


def _canonical_cycle(perm: list[int]) -> tuple[int, ...]:
    """A cyclic order up to rotation and reflection: start at item 0, go towards its smaller neighbour."""
    n = len(perm)
    i = perm.index(0)
    fwd = tuple(perm[(i + k) % n] for k in range(n))
    bwd = tuple(perm[(i - k) % n] for k in range(n))
    return min(fwd, bwd)


def _cyclic_orders(rng: np.random.Generator, n: int, count: int) -> list[list[int]]:
    """`count` seeded permutations of range(n), pairwise distinct as cyclic orders.

    The first is the one draw the single-order generator has always made (same worlds as before).
    """
    out = [[int(i) for i in rng.permutation(n)]]
    seen = {_canonical_cycle(out[0])}
    while len(out) < count:  # validate() bounds count by the number of distinct cyclic orders
        perm = [int(i) for i in rng.permutation(n)]
        key = _canonical_cycle(perm)
        if key not in seen:
            seen.add(key)
            out.append(perm)
    return out


def _heldout_inference(rng: np.random.Generator, c, slot: dict) -> dict[int, str]:
    """Triple index -> "compositional" | "logical" for the facts of cyclic block `c` held out of training.

    Compositional first: (ring, i, k >= 2) pairs, both facts held out; their 1-hop chains are protected.
    Logical: unprotected 1-hop pairs (ring, i), one of the two facts held out. See `CyclicSpec`.
    """
    n, out = c.n_entities, {}
    khops = [h for h in c.hops if h >= 2]
    comp_pairs = [(ring, i, k) for ring in c.ring_names for k in khops for i in range(n)]
    n_comp = round(c.compositional_heldout * len(comp_pairs))
    protected: set[tuple[str, int]] = set()
    for j in (rng.permutation(len(comp_pairs))[:n_comp] if n_comp else []):
        ring, i, k = comp_pairs[int(j)]
        out[slot[(ring, i, "cw", k)]] = "compositional"
        out[slot[(ring, (i + k) % n, "ccw", k)]] = "compositional"
        protected |= {(ring, (i + s) % n) for s in range(k)}
    pairs = [(ring, i) for ring in c.ring_names for i in range(n)] if 1 in c.hops else []
    n_log = round(c.logical_heldout * len(pairs))
    eligible = [p for p in pairs if p not in protected]
    if n_log > len(eligible):
        raise SpecError(f"cyclic {c.name!r}: logical_heldout = {c.logical_heldout} asks for {n_log} 1-hop pairs but only "
                        f"{len(eligible)} are off the chains of held-out compositional facts; lower logical_heldout "
                        "or compositional_heldout")
    for j in (rng.permutation(len(eligible))[:n_log] if n_log else []):
        ring, i = eligible[int(j)]
        if rng.random() < 0.5:
            out[slot[(ring, i, "cw", 1)]] = "logical"
        else:
            out[slot[(ring, (i + 1) % n, "ccw", 1)]] = "logical"
    return out


def subject_exposure(spec: WorldSpec) -> dict[int, int]:
    """Corpus repetitions per main subject id for the spec's `exposure` option (own random stream, so a
    uniform world is generated exactly as before): see `WorldSpec.exposure`."""
    n = spec.n_subjects
    if spec.exposure == "uniform":
        return {i: 1 for i in range(n)}
    rng = np.random.default_rng([spec.seed, 23])
    if spec.exposure == "two_level":
        k = max(1, round(spec.exposure_popular_fraction * n))
        popular = set(rng.choice(n, size=k, replace=False).tolist())
        return {i: spec.exposure_popular_count if i in popular else spec.exposure_rare_count for i in range(n)}
    rank = rng.permutation(n) + 1  # subject i has rank rank[i]
    return {i: max(1, round(spec.exposure_max / float(rank[i]) ** spec.exposure_zipf_s)) for i in range(n)}
