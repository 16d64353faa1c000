"""`World`: the plain data of a generated fact world, its probe sets and its training corpus.

A `World` is never mutated after generation. `world.json` holds everything (spec, entities,
relations, facts, the second language); probe sets and the corpus are derived from it
deterministically.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from mechedit.errors import CheckpointError, MecheditError
from mechedit.fileio import dumps_json, read_json, write_text_atomic
from mechedit.world import language as L
from mechedit.world.spec import WorldSpec

WORLD_FORMAT = 1
PROBE_KINDS = ("cloze", "paraphrase", "qa", "alias", "crossling")


@dataclass(frozen=True)
class Subject:
    id: int
    name: str
    kind: str  # "subject" (main) | "object" (a nested parent object) | "ring" (cyclic entity)
    alias: str | None = None
    heldout: bool = False  # facts never trained on: true non-members


@dataclass(frozen=True)
class Relation:
    name: str
    word_b: str  # the relation word in language "b"
    kind: str  # independent | correlated | nested | cyclic
    objects: tuple[str, ...]
    source: str | None = None  # correlated: the copied relation; nested: the parent relation
    p: float | None = None  # correlated: copy probability


@dataclass(frozen=True)
class Fact:
    index: int
    subject: int  # Subject.id
    relation: str
    object: str
    heldout_template: int  # the template never trained with this subject and relation
    exposure: int = 1  # times its training sentences appear in the corpus (world option `exposure`)


@dataclass(frozen=True)
class Probe:
    fact: int  # Fact.index
    kind: str  # one of PROBE_KINDS
    template: int  # template index; -1 for QA
    lang: str  # "a" or "b"
    prompt: str
    answer: str


@dataclass(frozen=True)
class World:
    spec: WorldSpec
    subjects: tuple[Subject, ...]
    relations: tuple[Relation, ...]
    facts: tuple[Fact, ...]
    function_words_b: dict[str, str]
    nested_maps: dict[str, dict[str, str]] = field(default_factory=dict)  # child -> {parent obj: child obj}
    rings: dict[str, tuple[int, ...]] = field(default_factory=dict)  # ring name -> subject ids in cyclic order
    # second-stage subjects (fine-tuned knowledge): held out until `mechedit finetune-facts` trains them
    stage2_subjects: tuple[int, ...] = ()
    # held-out inference facts of cyclic blocks (fact index -> "logical" | "compositional"): in the world,
    # never in the corpus nor in `train_facts`; evaluated as their own probe groups
    inference: dict[int, str] = field(default_factory=dict)

    # ---- lookups -------------------------------------------------------------------------
    @cached_property
    def relation_by_name(self) -> dict[str, Relation]:
        return {r.name: r for r in self.relations}

    @cached_property
    def subject_by_name(self) -> dict[str, Subject]:
        out = {s.name: s for s in self.subjects}
        for s in self.subjects:
            if s.alias:
                out.setdefault(s.alias, s)
        return out

    @cached_property
    def _fact_index(self) -> dict[tuple[int, str], Fact]:
        return {(f.subject, f.relation): f for f in self.facts}

    def subject(self, name: str) -> Subject:
        try:
            return self.subject_by_name[name]
        except KeyError:
            raise MecheditError(f"unknown subject {name!r} (not in this world)") from None

    def relation(self, name: str) -> Relation:
        try:
            return self.relation_by_name[name]
        except KeyError:
            raise MecheditError(f"unknown relation {name!r} (known: {', '.join(self.relation_by_name)})") from None

    def fact(self, subject: str, relation: str) -> Fact:
        """The fact (subject, relation); one-line error if either is unknown or the pair is not a fact."""
        s = self.subject(subject)
        self.relation(relation)
        f = self._fact_index.get((s.id, relation))
        if f is None:
            raise MecheditError(f"no fact for subject {subject!r} and relation {relation!r} in this world")
        return f

    def parse_fact(self, text: str) -> Fact:
        """Parse "SUBJECT|RELATION" into a fact."""
        parts = text.split("|")
        if len(parts) != 2 or not all(p.strip() for p in parts):
            raise MecheditError(f"a fact is written 'SUBJECT|RELATION', got {text!r}")
        return self.fact(parts[0].strip(), parts[1].strip())

    def subject_of(self, fact: Fact) -> Subject:
        return self.subjects[fact.subject]

    def facts_of(self, subject_id: int) -> list[Fact]:
        return [f for f in self.facts if f.subject == subject_id]

    @cached_property
    def described_only(self) -> frozenset[int]:
        """Trained main subjects whose facts appear only in profiles / biographies, never as queries
        (`spec.query_subject_fraction`; a seeded draw, empty by default)."""
        frac = self.spec.query_subject_fraction
        if frac >= 1.0:
            return frozenset()
        main = [s.id for s in self.subjects if s.kind == "subject" and not s.heldout]
        rng = np.random.default_rng([self.spec.seed, 7])
        k = len(main) - max(1, round(frac * len(main)))
        return frozenset(int(main[i]) for i in rng.choice(len(main), size=k, replace=False))

    def is_trained(self, fact: Fact) -> bool:
        return not self.subjects[fact.subject].heldout and fact.index not in self.inference

    @property
    def train_facts(self) -> list[Fact]:
        return [f for f in self.facts if self.is_trained(f)]

    @property
    def heldout_facts(self) -> list[Fact]:
        """Facts of held-out subjects (never seen in training: the true non-members)."""
        return [f for f in self.facts if self.subjects[f.subject].heldout]

    def inference_facts(self, kind: str | None = None) -> list[Fact]:
        """Held-out inference facts of cyclic blocks ("logical", "compositional" or both)."""
        return [self.facts[i] for i, k in self.inference.items() if kind is None or k == kind]

    @property
    def n_templates(self) -> int:
        return self.spec.n_templates

    @property
    def templates(self) -> tuple[str, ...]:
        return L.TEMPLATE_SETS[self.spec.templates][: self.spec.n_templates]

    @property
    def objects(self) -> list[str]:
        seen: dict[str, None] = {}
        for r in self.relations:
            for o in r.objects:
                seen.setdefault(o, None)
        return list(seen)

    # ---- language ------------------------------------------------------------------------
    def prompt(self, fact: Fact, template: int = 0, *, lang: str = "a", name: str | None = None) -> str:
        """The cloze prompt for `fact` in `template` (-1 = QA), in language `lang`, with an optional name."""
        rel = self.relation_by_name[fact.relation]
        subject = name or self.subjects[fact.subject].name
        tpl = L.QA_TEMPLATE if template < 0 else self.templates[template]
        if lang == "b":
            return L.render(tpl, subject, rel.word_b, self.function_words_b)
        return L.render(tpl, subject, rel.name)

    def subject_span(self, prompt_words: list[str], fact: Fact, name: str | None = None) -> tuple[int, int]:
        """Word positions [start, end) of the subject's name inside a prompt's words."""
        sw = (name or self.subjects[fact.subject].name).split()
        for i in range(len(prompt_words) - len(sw) + 1):
            if prompt_words[i : i + len(sw)] == sw:
                return i, i + len(sw)
        raise MecheditError(f"subject {' '.join(sw)!r} not found in prompt {' '.join(prompt_words)!r}")

    def probes(self, facts: list[Fact] | None = None, kinds: tuple[str, ...] = PROBE_KINDS) -> list[Probe]:
        """Probe prompts with answers for `facts` (default: all facts).

        cloze: every trained template; paraphrase: the template held out for that subject;
        qa: the question form; alias: the first trained template with the subject's alias;
        crossling: the first trained template in language "b".
        """
        out: list[Probe] = []
        for f in self.facts if facts is None else facts:
            s = self.subjects[f.subject]
            trained = [t for t in range(self.n_templates) if t != f.heldout_template]
            if "cloze" in kinds:
                out += [Probe(f.index, "cloze", t, "a", self.prompt(f, t), f.object) for t in trained]
            if "paraphrase" in kinds:
                out.append(Probe(f.index, "paraphrase", f.heldout_template, "a",
                                 self.prompt(f, f.heldout_template), f.object))
            if "qa" in kinds:
                out.append(Probe(f.index, "qa", -1, "a", self.prompt(f, -1), f.object))
            if "alias" in kinds and s.alias:
                out.append(Probe(f.index, "alias", trained[0], "a", self.prompt(f, trained[0], name=s.alias),
                                 f.object))
            if "crossling" in kinds:
                out.append(Probe(f.index, "crossling", trained[0], "b", self.prompt(f, trained[0], lang="b"),
                                 f.object))
        return out

    def corpus(self, exclude_facts: set[int] = frozenset()) -> list[str]:
        """Training sentences (prompt + object), deterministic for the spec.

        Every trained fact appears in each of its trained templates and the QA form; each of those
        is repeated with the subject's alias with probability `alias_share` and in language "b"
        with probability `crosslingual_share`; the fact's sentences appear `fact.exposure` times
        (1 unless the world sets `exposure`). The held-out template never appears with the subject;
        held-out inference facts never appear. `exclude_facts` drops facts (for retraining without a
        forget set). Profile sentences (`spec.profiles`, `profile_sentences`) follow the single-fact sentences.
        """
        rng = np.random.default_rng([self.spec.seed, 1])
        out: list[str] = []
        for f in self.facts:
            s = self.subjects[f.subject]
            # draw for every fact so that excluding some leaves the rest of the corpus unchanged
            forms = [t for t in range(self.n_templates) if t != f.heldout_template] + [-1]
            draws = rng.random((len(forms), 2))
            if s.heldout or f.index in exclude_facts or f.index in self.inference or s.id in self.described_only:
                continue
            block = []
            for t, (d_alias, d_lang) in zip(forms, draws):
                block.append(f"{self.prompt(f, t)} {f.object}")
                if s.alias and d_alias < self.spec.alias_share:
                    block.append(f"{self.prompt(f, t, name=s.alias)} {f.object}")
                if d_lang < self.spec.crosslingual_share:
                    block.append(f"{self.prompt(f, t, lang='b')} {f.object}")
            out += block * f.exposure
        out += self.profile_sentences(exclude_facts)
        out += self.biography_sentences(exclude_facts)
        if self.spec.instructions:
            from mechedit.world.instructions import instruction_sentences

            out += instruction_sentences(self, exclude_facts)
        return out

    def profile_sentences(self, exclude_facts: set[int] = frozenset()) -> list[str]:
        """`spec.profiles` sentences per trained main subject: its name, then the objects of its facts in
        a random order (seeded per subject and sentence; excluded facts' objects left out)."""
        if not self.spec.profiles:
            return []
        rng = np.random.default_rng([self.spec.seed, 5])
        out = []
        for s in self.subjects:
            if s.kind != "subject":
                continue
            facts = self.facts_of(s.id)
            k = self.spec.profile_length
            if k:  # one random order per subject, walked k objects per sentence
                walk = rng.permutation(len(facts))
                orders = [[walk[(i * k + j) % len(facts)] for j in range(k)] for i in range(self.spec.profiles)]
            else:
                orders = [rng.permutation(len(facts)) for _ in range(self.spec.profiles)]
            if s.heldout:
                continue
            for order in orders:
                objs = [facts[int(i)].object for i in order if facts[int(i)].index not in exclude_facts]
                if objs:
                    out.append(" ".join([s.name, *objs]))
        return out

    def biography_sentences(self, exclude_facts: set[int] = frozenset()) -> list[str]:
        """`spec.biographies` biographies per trained main subject: "{name} : the {r} is {o} , the {r} is
        {o} , ..." over its facts in a random order (seeded per subject and biography; excluded facts
        left out). Built from the templates' words only, so the vocabulary does not change."""
        if not self.spec.biographies:
            return []
        rng = np.random.default_rng([self.spec.seed, 6])
        skip = set(exclude_facts) | set(self.inference)  # held-out inference facts never appear
        out = []
        for s in self.subjects:
            if s.kind != "subject":
                continue
            facts = self.facts_of(s.id)
            orders = [rng.permutation(len(facts)) for _ in range(self.spec.biographies)]
            if s.heldout:
                continue
            for order in orders:
                parts = [f"the {facts[int(i)].relation} is {facts[int(i)].object}"
                         for i in order if facts[int(i)].index not in skip]
                if parts:
                    out.append(f"{s.name} : " + " , ".join(parts))
        return out

    def vocabulary(self) -> list[str]:
        """Every word of the world in a fixed order (special tokens first)."""
        seen: dict[str, None] = {w: None for w in L.SPECIAL_TOKENS}

        def add(text: str) -> None:
            for w in text.split():
                seen.setdefault(w, None)

        for w in L.FUNCTION_WORDS:
            add(w)
        # in FUNCTION_WORDS order, never the dict's: a world loaded from world.json (sorted keys)
        # must give the same ids as the freshly generated one
        for w in L.FUNCTION_WORDS:
            add(self.function_words_b[w])
        if self.spec.instructions:
            for w in L.INSTRUCTION_WORDS:
                add(w)
        for r in self.relations:
            add(r.name)
            add(r.word_b)
            for o in r.objects:
                add(o)
        for s in self.subjects:
            add(s.name)
            if s.alias:
                add(s.alias)
        return list(seen)

    # ---- I/O -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        from mechedit import __version__

        return {
            "format": WORLD_FORMAT,
            "mechedit_version": __version__,
            "spec": self.spec.to_dict(),
            "function_words_b": self.function_words_b,
            "relations": [
                {"name": r.name, "word_b": r.word_b, "kind": r.kind, "objects": list(r.objects),
                 "source": r.source, "p": r.p} for r in self.relations
            ],
            "subjects": [
                {"id": s.id, "name": s.name, "kind": s.kind, "alias": s.alias, "heldout": s.heldout}
                for s in self.subjects
            ],
            "facts": [
                {"index": f.index, "subject": f.subject, "relation": f.relation, "object": f.object,
                 "heldout_template": f.heldout_template,
                 **({"exposure": f.exposure} if self.spec.exposure != "uniform" else {})} for f in self.facts
            ],
            "nested_maps": self.nested_maps,
            "rings": {k: list(v) for k, v in self.rings.items()},
            **({"stage2_subjects": list(self.stage2_subjects)} if self.stage2_subjects else {}),
            # only when present: worlds without held-out inference facts keep their bytes
            **({"inference": {kind: sorted(i for i, k in self.inference.items() if k == kind)
                              for kind in sorted(set(self.inference.values()))}} if self.inference else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "World":
        try:
            if d.get("format") != WORLD_FORMAT:
                raise CheckpointError(f"unsupported world format {d.get('format')!r}")
            return cls(
                spec=WorldSpec.from_dict(d["spec"]),
                subjects=tuple(Subject(**s) for s in d["subjects"]),
                relations=tuple(Relation(**{**r, "objects": tuple(r["objects"])}) for r in d["relations"]),
                facts=tuple(Fact(**f) for f in d["facts"]),
                function_words_b=dict(d["function_words_b"]),
                nested_maps={k: dict(v) for k, v in d.get("nested_maps", {}).items()},
                rings={k: tuple(v) for k, v in d.get("rings", {}).items()},
                stage2_subjects=tuple(d.get("stage2_subjects", ())),
                inference=dict(sorted((int(i), kind) for kind, ids in d.get("inference", {}).items() for i in ids)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"corrupt world.json (missing or bad field {exc})") from None

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / "world.json"
        write_text_atomic(path, dumps_json(self.to_dict()))
        return path

    @classmethod
    def load(cls, directory_or_file: str | Path) -> "World":
        p = Path(directory_or_file)
        if p.is_dir():
            p = p / "world.json"
        return cls.from_dict(read_json(p, "world.json"))

    def with_stage2_trained(self) -> "World":
        """The same world after the second training stage: its stage-2 subjects are no longer held out."""
        from dataclasses import replace

        if not self.stage2_subjects:
            raise MecheditError("this world has no second-stage subjects (world option stage2_subject_fraction)")
        ids = set(self.stage2_subjects)
        return replace(self, subjects=tuple(replace(s, heldout=False) if s.id in ids else s for s in self.subjects))

    @property
    def stage2_trained(self) -> bool:
        """True for the world of a second-stage checkpoint (its stage-2 subjects are trained)."""
        return bool(self.stage2_subjects) and not self.subjects[self.stage2_subjects[0]].heldout

    def exposure_levels(self) -> dict[int, int]:
        """Exposure count -> number of trained facts seen that many times (one entry for a uniform world)."""
        out: dict[int, int] = {}
        for f in self.train_facts:
            out[f.exposure] = out.get(f.exposure, 0) + 1
        return dict(sorted(out.items()))

    def summary(self) -> dict:
        kinds: dict[str, int] = {}
        for r in self.relations:
            kinds[r.kind] = kinds.get(r.kind, 0) + 1
        main = [s for s in self.subjects if s.kind == "subject"]
        return {
            "subjects": len(main),
            "heldout_subjects": sum(s.heldout for s in main),
            "aliases": sum(s.alias is not None for s in main),
            "entities": len(self.subjects),
            "relations": len(self.relations),
            "relation_kinds": kinds,
            "facts": len(self.facts),
            "train_facts": len(self.train_facts),
            **({"inference_facts": {k: len(self.inference_facts(k)) for k in sorted(set(self.inference.values()))}}
               if self.inference else {}),
            "vocabulary": len(self.vocabulary()),
            "corpus_sentences": len(self.corpus()),
            **({"exposure": {str(k): v for k, v in self.exposure_levels().items()}}
               if self.spec.exposure != "uniform" else {}),
        }
