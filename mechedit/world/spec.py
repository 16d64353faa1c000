"""`WorldSpec`: everything that determines a synthetic fact world, validated on construction.

A world has main subjects (names of 1-3 word tokens) and relations with object pools. Relation
structures may coexist:
- independent: every subject gets a uniformly random object from the relation's pool;
- correlated (`CorrelatedSpec`): relation `target` copies relation `source`'s object with
  probability `p`, else takes another object of the (shared) pool;
- nested (`NestedSpec`): the objects of relation `parent` fall into `n_groups` groups, each group
  maps to one object of relation `child`; a subject inherits child = group(parent(subject)), and
  facts "object -> nested object" (the parent object as subject of `child`) are written too;
- cyclic (`CyclicSpec`): `n_entities` entities on a random cyclic order; for each hop k in `hops`
  relations `{name}_cw{k}` / `{name}_ccw{k}` map an entity to the one k steps clockwise /
  anticlockwise (Nishi et al. 2025). With `orders = O > 1` the same entity pool lies on O cyclic
  orders (seeded permutations, pairwise distinct up to rotation and reflection), named `{name}1`
  .. `{name}O`, with relations `{name}{o}_cw{k}` / `{name}{o}_ccw{k}`. Inference facts may be held
  out of training (`logical_heldout`, `compositional_heldout`; see `CyclicSpec`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from mechedit.errors import SpecError
from mechedit.world.language import TEMPLATE_SETS
from mechedit.specio import OMIT_DEFAULT, check_fields, from_dict, load_spec_file, to_dict

# A world is held in memory whole (facts, probe sets, the tokenized corpus: ~5-10 sentences per fact),
# so its size is bounded before anything is allocated.
MAX_FACTS = 1_000_000

_WORD = re.compile(r"^[a-z][a-z_]*$")
NAME_SCHEMES = ("words", "first_last")
TOKENIZERS = ("word", "bpe")


@dataclass(frozen=True)
class RelationSpec:
    name: str
    n_objects: int = 10

    def validate(self) -> None:
        if not _WORD.match(self.name):
            raise SpecError(f"relation name {self.name!r} must be one lower-case word (letters and _)")
        if self.n_objects < 2:
            raise SpecError(f"relation {self.name!r}: n_objects must be >= 2, got {self.n_objects}")


@dataclass(frozen=True)
class CorrelatedSpec:
    source: str
    target: str
    p: float = 0.7

    def validate(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise SpecError(f"correlated {self.source}->{self.target}: p must be in [0, 1], got {self.p}")
        if self.source == self.target:
            raise SpecError(f"correlated: source and target are the same relation {self.source!r}")


@dataclass(frozen=True)
class NestedSpec:
    parent: str
    child: str

    def validate(self) -> None:
        if self.parent == self.child:
            raise SpecError(f"nested: parent and child are the same relation {self.parent!r}")


@dataclass(frozen=True)
class CyclicSpec:
    """Entities on `orders` cyclic orders with k-hop clockwise / anticlockwise relations.

    Held-out inference facts (evaluated, never trained; Nishi et al. 2025):
    - `compositional_heldout`: share of the (entity, order, hop k >= 2) pairs x -> z = cw_k(x) whose
      two facts `x cw_k z` and `z ccw_k x` are both held out (so neither is the inverse of a
      trained fact), while every 1-hop fact on the chain x -> ... -> z stays trained in both
      directions: the model can only get them by composing 1-hop steps.
    - `logical_heldout`: share of the 1-hop pairs x -> y = cw_1(x) (per order) with one of their two
      facts (`x cw_1 y` or `y ccw_1 x`, a seeded coin) held out while the other is trained: the model
      can only get it by inverting a trained fact. Pairs on a compositional chain are not eligible.
    Shares round to whole pairs; asking for more logical pairs than are eligible is an error.
    """

    name: str = "ring"
    n_entities: int = 12
    hops: tuple[int, ...] = (1, 2)
    # the new keys are left out of world.json while they hold their defaults (worlds stay byte-identical)
    orders: int = field(default=1, metadata=OMIT_DEFAULT)
    logical_heldout: float = field(default=0.0, metadata=OMIT_DEFAULT)
    compositional_heldout: float = field(default=0.0, metadata=OMIT_DEFAULT)

    def validate(self) -> None:
        if not _WORD.match(self.name):
            raise SpecError(f"cyclic name {self.name!r} must be one lower-case word")
        if self.n_entities < 3:
            raise SpecError(f"cyclic {self.name!r}: n_entities must be >= 3")
        if not self.hops or any(h < 1 or h >= self.n_entities for h in self.hops):
            raise SpecError(f"cyclic {self.name!r}: hops must be in [1, n_entities)")
        if len(set(self.hops)) != len(self.hops):
            raise SpecError(f"cyclic {self.name!r}: hops has a repeated value {list(self.hops)}")
        if self.orders < 1:
            raise SpecError(f"cyclic {self.name!r}: orders must be >= 1, got {self.orders}")
        if self.orders > distinct_cyclic_orders(self.n_entities):
            raise SpecError(f"cyclic {self.name!r}: orders = {self.orders} but {self.n_entities} entities have only "
                            f"{distinct_cyclic_orders(self.n_entities)} distinct cyclic orders")
        for key in ("logical_heldout", "compositional_heldout"):
            v = getattr(self, key)
            if not 0.0 <= v < 1.0:
                raise SpecError(f"cyclic {self.name!r}: {key} must be in [0, 1), got {v}")
        if self.logical_heldout > 0 and 1 not in self.hops:
            raise SpecError(f"cyclic {self.name!r}: logical_heldout needs hop 1 in hops (it holds out 1-hop facts)")
        if self.compositional_heldout > 0 and (1 not in self.hops or max(self.hops) < 2):
            raise SpecError(f"cyclic {self.name!r}: compositional_heldout needs hop 1 and a hop >= 2 in hops")

    @property
    def ring_names(self) -> list[str]:
        """One name per cyclic order: `name` for a single order, else `name1` .. `nameO`."""
        return [self.name] if self.orders == 1 else [f"{self.name}{o}" for o in range(1, self.orders + 1)]

    @property
    def relation_names(self) -> list[str]:
        return [f"{ring}_{d}{h}" for ring in self.ring_names for h in self.hops for d in ("cw", "ccw")]


def distinct_cyclic_orders(n: int) -> int:
    """Cyclic orders of n items up to rotation and reflection: (n - 1)! / 2 (1 for n = 3)."""
    import math

    return max(1, math.factorial(n - 1) // 2) if n < 12 else 10**9


@dataclass(frozen=True)
class WorldSpec:
    """A synthetic world. Same spec -> byte-identical world.json."""

    seed: int = 0
    n_subjects: int = 200
    relations: tuple[RelationSpec, ...] = ()
    correlated: tuple[CorrelatedSpec, ...] = ()
    nested: tuple[NestedSpec, ...] = ()
    cyclic: tuple[CyclicSpec, ...] = ()
    # share of subjects whose names have 1, 2, 3 word tokens
    name_words: tuple[float, float, float] = (0.3, 0.4, 0.3)
    # syllables per generated word (min, max): bounds the name generator's capacity
    syllables: tuple[int, int] = (2, 3)
    # average number of subjects sharing one name word (>= 1; 1 = every word unique)
    word_reuse: float = 1.3
    # how subject names are made (NAME_SCHEMES): "words" = 1-3 words (shares `name_words`) drawn from one
    # shared pool; "first_last" = a first name from one pool and a last name from another, in a
    # balanced design where every first and every last name is shared by ~`word_reuse` subjects, so no
    # single name word identifies a subject or predicts its objects (recall must be subject-level)
    name_scheme: str = "words"
    # the tokenizer (TOKENIZERS): "word" = one token per word; "bpe" = byte-pair encoding trained on
    # the world's corpus with `bpe_vocab_size` tokens, so names split into several pieces
    tokenizer: str = "word"
    bpe_vocab_size: int = 400
    # profile sentences per trained main subject: "{name} {o_1} {o_2} ..." lists the objects of all its
    # relations, in a random order per sentence, right after the name (as an infobox or an apposition
    # does: "Paris, France"). The token after the name then depends on all of the subject's attributes,
    # so the last name token is where they are assembled. 0 = none (single-fact sentences only)
    profiles: int = 0
    # objects per profile sentence: 0 = all of the subject's facts (a random order per sentence); k >= 1 =
    # "{name} {o} ..." with k objects, the sentences of a subject walking one random order of its facts
    # (profiles x k >= the number of facts covers each fact), so only the positions right after the name
    # predict attributes: the attributes are needed where the name ends and nowhere else
    profile_length: int = 0
    # biographies per trained main subject: "{name} : the {r_1} is {o_1} , the {r_2} is {o_2} , ..." -
    # the name once, then every fact of the subject in a random relation order per biography (Allen-Zhu &
    # Li's "multi + permute" augmentation). Each fact after the first is read far from the name, with the
    # name words several tokens back, so attributes are best kept where the name ends. 0 = none
    biographies: int = 0
    # share of trained main subjects whose facts also appear as queries (the cloze templates, QA, aliases,
    # language "b"); the others are described only (profiles / biographies), so answering a query about
    # them needs the attributes assembled at the name and read out by the relation (Allen-Zhu & Li's
    # knowledge extraction). 1 = every subject is queried (needs profiles or biographies when < 1)
    query_subject_fraction: float = 1.0
    object_words: int = 1
    alias_fraction: float = 0.3
    alias_share: float = 0.5
    crosslingual_share: float = 0.3
    heldout_subject_fraction: float = 0.1
    n_templates: int = 4
    # the cloze template set (language.TEMPLATE_SETS): "mixed" (default; the subject first in some, the
    # relation first in others) or "relation_first" (the relation always before the subject)
    templates: str = "mixed"
    # in-context unlearning (off by default): the vocabulary gets the instruction words and the corpus
    # `instruction_sentences` sentences "forget S1 , S2 . <bos> QUERY ANSWER" (ANSWER = <refuse> when
    # the query is about a named subject); `instruction_heldout_fraction` of the first-stage subjects
    # are never named in them (the test of generalisation); see `mechedit.world.instructions`
    instructions: bool = False
    instruction_sentences: int = 4000
    instruction_max_subjects: int = 3
    instruction_heldout_fraction: float = 0.3
    # fine-tuned knowledge (off by default): this share of the subjects is held out of training and
    # trained into a trained model by `mechedit finetune-facts` (a second stage)
    stage2_subject_fraction: float = 0.0
    # exposure (off by default): how many times each fact's training sentences appear in the corpus,
    # drawn per main subject (a popular entity is popular in all its facts) and recorded per fact
    # (`Fact.exposure`): "uniform" = once; "two_level" = `exposure_popular_fraction` of the subjects
    # `exposure_popular_count` times, the rest `exposure_rare_count` times; "zipf" = the subject of
    # random rank r (1-based) max(1, round(exposure_max / r ** exposure_zipf_s)) times. Facts of
    # non-main entities (nested parent objects, ring entities) get the smallest count.
    exposure: str = "uniform"
    exposure_popular_fraction: float = 0.2
    exposure_popular_count: int = 10
    exposure_rare_count: int = 1
    exposure_max: int = 10
    exposure_zipf_s: float = 1.0

    def validate(self) -> None:
        check_fields(self, "world")
        if self.n_subjects < 2:
            raise SpecError(f"n_subjects must be >= 2, got {self.n_subjects}")
        if not self.relations and not self.cyclic:
            raise SpecError("a world needs at least one relation (relations = [...] or cyclic = [...])")
        names = [r.name for r in self.relations]
        for c in self.cyclic:
            names += c.relation_names
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise SpecError(f"duplicate relation name {sorted(dup)[0]!r}")
        known = {r.name: r for r in self.relations}
        targets = set()
        for c in self.correlated:
            for r in (c.source, c.target):
                if r not in known:
                    raise SpecError(f"correlated refers to unknown relation {r!r}")
            if c.target in targets:
                raise SpecError(f"relation {c.target!r} is the target of two correlations")
            targets.add(c.target)
            if known[c.source].n_objects != known[c.target].n_objects:
                raise SpecError(f"correlated {c.source}->{c.target}: the two relations share one object pool, "
                                f"so n_objects must be equal")
        for n in self.nested:
            for r in (n.parent, n.child):
                if r not in known:
                    raise SpecError(f"nested refers to unknown relation {r!r}")
            if n.child in targets:
                raise SpecError(f"relation {n.child!r} is derived twice")
            targets.add(n.child)
            if known[n.child].n_objects > known[n.parent].n_objects:
                raise SpecError(f"nested {n.parent}->{n.child}: child pool ({known[n.child].n_objects}) "
                                f"cannot be larger than the parent pool ({known[n.parent].n_objects})")
        if len(self.name_words) != 3 or any(w < 0 for w in self.name_words) or sum(self.name_words) <= 0:
            raise SpecError("name_words must be three non-negative shares for 1-, 2- and 3-word names")
        if abs(sum(self.name_words) - 1.0) > 1e-6:
            raise SpecError(f"name_words are the shares of 1-, 2- and 3-word names and must sum to 1, "
                            f"got {list(self.name_words)} (sum {sum(self.name_words):g})")
        if self.n_facts > MAX_FACTS:
            raise SpecError(f"the world would have {self.n_facts:,} facts, beyond the limit of {MAX_FACTS:,} "
                            f"(lower n_subjects or the number of relations)")
        lo, hi = self.syllables
        if not 1 <= lo <= hi <= 4:
            raise SpecError(f"syllables must satisfy 1 <= min <= max <= 4, got {self.syllables}")
        if self.word_reuse < 1.0:
            raise SpecError(f"word_reuse must be >= 1, got {self.word_reuse}")
        if self.name_scheme not in NAME_SCHEMES:
            raise SpecError(f"name_scheme must be one of {', '.join(NAME_SCHEMES)}, got {self.name_scheme!r}")
        if self.name_scheme == "first_last" and self.word_reuse ** 2 > self.n_subjects:
            raise SpecError(f"name_scheme 'first_last': word_reuse ({self.word_reuse}) must be at most "
                            f"sqrt(n_subjects) = {self.n_subjects ** 0.5:.1f} (the two name pools need "
                            f"pool_first x pool_last >= n_subjects combinations)")
        if not 0 <= self.profiles <= 20:
            raise SpecError(f"profiles must be in [0, 20], got {self.profiles}")
        if not 0 <= self.profile_length <= 20:
            raise SpecError(f"profile_length must be in [0, 20], got {self.profile_length}")
        if not 0 <= self.biographies <= 20:
            raise SpecError(f"biographies must be in [0, 20], got {self.biographies}")
        if not 0.0 < self.query_subject_fraction <= 1.0:
            raise SpecError(f"query_subject_fraction must be in (0, 1], got {self.query_subject_fraction}")
        if self.query_subject_fraction < 1.0 and not (self.profiles or self.biographies):
            raise SpecError("query_subject_fraction < 1 needs profiles or biographies (the other subjects' "
                            "facts would appear nowhere)")
        if self.tokenizer not in TOKENIZERS:
            raise SpecError(f"tokenizer must be one of {', '.join(TOKENIZERS)}, got {self.tokenizer!r}")
        if self.tokenizer == "bpe" and not 64 <= self.bpe_vocab_size <= 100_000:
            raise SpecError(f"bpe_vocab_size must be in [64, 100000], got {self.bpe_vocab_size}")
        if self.object_words not in (1, 2):
            raise SpecError(f"object_words must be 1 or 2, got {self.object_words}")
        for key in ("alias_fraction", "alias_share", "crosslingual_share", "heldout_subject_fraction"):
            v = getattr(self, key)
            if not 0.0 <= v <= 1.0:
                raise SpecError(f"{key} must be in [0, 1], got {v}")
        if self.heldout_subject_fraction >= 1.0:
            raise SpecError("heldout_subject_fraction must be < 1 (some subjects must be trained)")
        if self.templates not in TEMPLATE_SETS:
            raise SpecError(f"templates must be one of {', '.join(TEMPLATE_SETS)}, got {self.templates!r}")
        if not 2 <= self.n_templates <= 5:
            raise SpecError(f"n_templates must be in [2, 5] (one is held out per subject), got {self.n_templates}")
        if not 0.0 <= self.stage2_subject_fraction < 1.0 or \
                self.stage2_subject_fraction + self.heldout_subject_fraction >= 1.0:
            raise SpecError("stage2_subject_fraction must be in [0, 1) and leave first-stage subjects "
                            "(stage2_subject_fraction + heldout_subject_fraction < 1)")
        if self.instruction_sentences < 1 or not 1 <= self.instruction_max_subjects <= 10:
            raise SpecError("instruction_sentences must be >= 1 and instruction_max_subjects in [1, 10]")
        if not 0.0 <= self.instruction_heldout_fraction < 1.0:
            raise SpecError(f"instruction_heldout_fraction must be in [0, 1), got {self.instruction_heldout_fraction}")
        if self.exposure not in EXPOSURES:
            raise SpecError(f"exposure must be one of {', '.join(EXPOSURES)}, got {self.exposure!r}")
        if not 0.0 < self.exposure_popular_fraction < 1.0:
            raise SpecError(f"exposure_popular_fraction must be in (0, 1), got {self.exposure_popular_fraction}")
        if not 1 <= self.exposure_rare_count <= self.exposure_popular_count <= 1000:
            raise SpecError("exposure counts must satisfy 1 <= exposure_rare_count <= exposure_popular_count <= 1000, "
                            f"got {self.exposure_rare_count} and {self.exposure_popular_count}")
        if not 1 <= self.exposure_max <= 1000 or self.exposure_zipf_s <= 0:
            raise SpecError(f"exposure_max must be in [1, 1000] and exposure_zipf_s > 0, got {self.exposure_max} "
                            f"and {self.exposure_zipf_s}")

    @property
    def n_facts(self) -> int:
        """Facts the spec implies: subjects x relations, nested parent objects, ring entities x hops x 2 x orders."""
        nested = sum(r.n_objects for n in self.nested for r in self.relations if r.name == n.parent)
        rings = sum(c.n_entities * 2 * len(c.hops) * c.orders for c in self.cyclic)
        return self.n_subjects * len(self.relations) + nested + rings

    @property
    def relation_names(self) -> list[str]:
        names = [r.name for r in self.relations]
        for c in self.cyclic:
            names += c.relation_names
        return names

    def to_dict(self) -> dict:
        """The spec as plain data; the optional worlds' keys only when set, so a world without them
        keeps the world.json bytes it had before those options existed."""
        d = to_dict(self)
        for key, default in _OPTIONAL_DEFAULTS.items():
            if d.get(key) == default:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "WorldSpec":
        return from_dict(cls, data, "world")

    @classmethod
    def from_file(cls, path: str | Path) -> "WorldSpec":
        data = load_spec_file(path)
        if "world" in data and isinstance(data["world"], dict) and "seed" not in data:
            data = data["world"]
        return cls.from_dict(data)


EXPOSURES = ("uniform", "two_level", "zipf")
_OPTIONAL_DEFAULTS = {"instructions": False, "instruction_sentences": 4000, "instruction_max_subjects": 3,
                      "instruction_heldout_fraction": 0.3, "stage2_subject_fraction": 0.0,
                      "name_scheme": "words", "tokenizer": "word", "bpe_vocab_size": 400, "profiles": 0,
                      "profile_length": 0, "biographies": 0, "query_subject_fraction": 1.0,
                      "templates": "mixed",
                      "exposure": "uniform", "exposure_popular_fraction": 0.2, "exposure_popular_count": 10,
                      "exposure_rare_count": 1, "exposure_max": 10, "exposure_zipf_s": 1.0}


def default_world_spec() -> WorldSpec:
    """The embedded default world: all four structures, small enough to train in about a minute."""
    return WorldSpec(
        seed=0,
        n_subjects=200,
        relations=(
            RelationSpec("capital", 24),
            RelationSpec("country", 6),
            RelationSpec("birthplace", 16),
            RelationSpec("workplace", 16),
            RelationSpec("sport", 12),
            RelationSpec("color", 8),
        ),
        correlated=(CorrelatedSpec("birthplace", "workplace", 0.7),),
        nested=(NestedSpec("capital", "country"),),
        cyclic=(CyclicSpec("ring", 12, (1, 2)),),
    )


def tiny_world_spec(seed: int = 0) -> WorldSpec:
    """A tiny world for tests."""
    return WorldSpec(
        seed=seed,
        n_subjects=24,
        relations=(RelationSpec("capital", 6), RelationSpec("country", 3), RelationSpec("sport", 5),
                   RelationSpec("color", 5)),
        correlated=(CorrelatedSpec("sport", "color", 0.8),),
        nested=(NestedSpec("capital", "country"),),
        cyclic=(CyclicSpec("ring", 6, (1,)),),
        heldout_subject_fraction=0.17,
    )
