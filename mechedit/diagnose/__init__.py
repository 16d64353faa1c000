"""Diagnostics: suites registered by name that compare a model before and after an edit.

A suite is `fn(before: Bundle, after: Bundle, requests: list[EditRequest], **options) -> dict`, a
JSON-serialisable scorecard. Every metric in it follows one schema (open-unlearning's):
`{"value_by_index": {item_id: value, ...}, "agg_value": float}`. Suites register on import of
their module (modules named `s_*.py` in this package), so analysis specs and reports find new
suites without changes to the runner. A suite may declare the option keys it reads
(`register_suite(name, options=(...))`); `check_options` then refuses a key that no chosen suite
reads. A scorecard may hold a "keep" entry: small per-edit data (figure coordinates) that the analysis
runner stores for every edit, also when a case has many.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

from mechedit.errors import MecheditError


@dataclass(frozen=True)
class Suite:
    name: str
    fn: Callable[..., dict]
    doc: str
    options: tuple[str, ...] | None = None  # option keys the suite reads (None: not declared)
    check: Callable[[dict], None] | None = None  # validates option values before any model is loaded


SUITES: dict[str, Suite] = {}


def register_suite(name: str, options: tuple[str, ...] | None = None, check: Callable[[dict], None] | None = None):
    """Register a diagnostic suite under `name` (with the option keys it reads and a validator of their
    values, if declared); duplicates are refused."""
    def deco(fn):
        if name in SUITES:
            raise ValueError(f"suite {name!r} is already registered")
        SUITES[name] = Suite(name, fn, (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "",
                             tuple(options) if options is not None else None, check)
        return fn
    return deco


def check_options(names, options: dict) -> None:
    """Refuse an option key that none of the suites `names` reads (only when all of them declare their keys),
    and option values a suite's validator refuses."""
    names = suite_names() if list(names) == ["all"] else list(names)
    chosen = [get_suite(n) for n in names]
    for s in chosen:
        if s.check is not None:
            s.check(options)
    if not chosen or any(s.options is None for s in chosen):
        return
    known = sorted({k for s in chosen for k in s.options})
    for key in options:
        if key not in known:
            raise MecheditError(f"unknown suite option {key!r} (options of {', '.join(names)}: {', '.join(known)})")


def _load_builtin_suites() -> None:
    import mechedit.diagnose as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name.startswith("s_"):
            importlib.import_module(f"{pkg.__name__}.{mod.name}")


def get_suite(name: str) -> Suite:
    _load_builtin_suites()
    if name not in SUITES:
        raise MecheditError(f"unknown suite {name!r} (known: {', '.join(sorted(SUITES)) or 'none'})")
    return SUITES[name]


def suite_names() -> list[str]:
    _load_builtin_suites()
    return sorted(SUITES)


def diagnose(before, after, requests, suites: tuple[str, ...] | list[str] = ("edit",), **options) -> dict:
    """Run each named suite; `"all"` runs every registered suite."""
    names = suite_names() if list(suites) == ["all"] else list(suites)
    chosen = [get_suite(n) for n in names]
    return {s.name: s.fn(before, after, requests, **options) for s in chosen}


def metric(values: dict, agg: float | None = None) -> dict:
    """One metric in the shared schema; `agg` defaults to the mean of the values."""
    import numpy as np

    vals = {str(k): (float(v) if v is not None else None) for k, v in values.items()}
    if agg is None:
        nums = [v for v in vals.values() if v is not None]
        agg = float(np.mean(nums)) if nums else float("nan")
    return {"value_by_index": vals, "agg_value": float(agg)}
