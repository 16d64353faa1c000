"""Causal tracing (ROME): where in the model a fact is recalled; `trace`, `locate`, `TraceResult`."""
from mechedit.trace.api import TraceConfig, locate_for, prepare_fact, select_facts, trace
from mechedit.trace.engine import SITES, default_window, hook_name
from mechedit.trace.result import CATEGORIES, Location, TraceResult, locate, rank_locations

__all__ = ["trace", "locate", "locate_for", "rank_locations", "TraceResult", "TraceConfig", "Location",
           "select_facts", "prepare_fact", "CATEGORIES", "SITES", "default_window", "hook_name"]
