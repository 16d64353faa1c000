"""Forget targets: which facts to unlearn, parsed from "subject:NAME", "fact:S|R", "relation:R".

A `ForgetTarget` holds the forget facts (trained facts only); the retain side is every other trained
fact, with two neighbour sets scored separately: same relation / other subjects, and same subject /
other relations. Requests for the editing API are the forget facts with the refusal as new object.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from mechedit.edit.api import EditRequest
from mechedit.errors import MecheditError
from mechedit.world.language import REFUSAL
from mechedit.world.world import Fact, World


@dataclass(frozen=True)
class ForgetTarget:
    world: World
    forget: tuple[Fact, ...]

    @property
    def forget_ids(self) -> set[int]:
        return {f.index for f in self.forget}

    @property
    def retain(self) -> list[Fact]:
        ids = self.forget_ids
        return [f for f in self.world.train_facts if f.index not in ids]

    @property
    def neighbours_relation(self) -> list[Fact]:
        """Retained facts with a forgotten relation (other subjects)."""
        rels = {f.relation for f in self.forget}
        return [f for f in self.retain if f.relation in rels]

    @property
    def neighbours_subject(self) -> list[Fact]:
        """Retained facts of a forgotten subject (its other relations)."""
        subs = {f.subject for f in self.forget}
        return [f for f in self.retain if f.subject in subs]

    def requests(self) -> list[EditRequest]:
        return [EditRequest(self.world.subjects[f.subject].name, f.relation, REFUSAL) for f in self.forget]

    def hash(self) -> str:
        """A short stable hash of the forget set (cache key of the retrained reference)."""
        text = ",".join(str(i) for i in sorted(self.forget_ids))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @classmethod
    def from_requests(cls, world: World, requests) -> "ForgetTarget":
        facts = {world.fact(r.subject, r.relation).index for r in requests}
        return cls._make(world, facts)

    @classmethod
    def _make(cls, world: World, ids: set[int]) -> "ForgetTarget":
        facts = tuple(world.facts[i] for i in sorted(ids))
        untrained = [f for f in facts if not world.is_trained(f)]
        if untrained:
            f = untrained[0]
            raise MecheditError(f"fact {world.subjects[f.subject].name}|{f.relation} belongs to a held-out subject "
                                "the model never trained on; there is nothing to forget")
        if not facts:
            raise MecheditError("the forget target selects no facts")
        return cls(world, facts)


def parse_forget(world: World, specs: str | list[str]) -> ForgetTarget:
    """Parse forget specs: "subject:NAME", "fact:S|R", "relation:R"; lists by comma or repetition.

    A subject name may have several words ("subject:ka lo"). Every fact of a subject or relation
    that the model was trained on is forgotten.
    """
    items: list[str] = []
    for s in [specs] if isinstance(specs, str) else list(specs):
        items += [p.strip() for p in s.split(",") if p.strip()]
    if not items:
        raise MecheditError("no forget target given (use subject:NAME, fact:SUBJECT|RELATION or relation:R)")
    ids: set[int] = set()
    for item in items:
        kind, sep, value = item.partition(":")
        value = value.strip()
        if not sep or not value:
            raise MecheditError(f"forget target {item!r} must be subject:NAME, fact:SUBJECT|RELATION or relation:R")
        if kind == "subject":
            s = world.subject(value)
            ids |= {f.index for f in world.facts_of(s.id) if world.is_trained(f)}
            if s.heldout:
                raise MecheditError(f"subject {value!r} is held out: the model never trained on its facts")
        elif kind == "fact":
            ids.add(world.parse_fact(value).index)
        elif kind == "relation":
            world.relation(value)
            ids |= {f.index for f in world.train_facts if f.relation == value}
        else:
            raise MecheditError(f"unknown forget target kind {kind!r} in {item!r} (use subject, fact or relation)")
    return ForgetTarget._make(world, ids)


def resolve_target(world: World, requests=None, forget: str | list[str] | None = None) -> ForgetTarget:
    """The forget target of a diagnosis: `forget` specs when given, else the requests' facts."""
    if forget:
        return parse_forget(world, forget)
    if not requests:
        raise MecheditError("no forget target: give --forget or requests (an AFTER directory with edit.json)")
    return ForgetTarget.from_requests(world, requests)
