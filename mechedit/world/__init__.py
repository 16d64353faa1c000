"""Synthetic fact worlds: specs, generation, language, probe sets and tokenizer."""
from mechedit.world.generate import generate_world
from mechedit.world.spec import (CorrelatedSpec, CyclicSpec, NestedSpec, RelationSpec, WorldSpec,
                                 default_world_spec, tiny_world_spec)
from mechedit.world.world import PROBE_KINDS, Fact, Probe, Relation, Subject, World

__all__ = ["generate_world", "WorldSpec", "RelationSpec", "CorrelatedSpec", "NestedSpec", "CyclicSpec",
           "default_world_spec", "tiny_world_spec", "World", "Fact", "Probe", "Relation", "Subject",
           "PROBE_KINDS"]
