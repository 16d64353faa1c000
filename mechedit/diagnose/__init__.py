"""Diagnostics: suites registered by name that compare a model before and after an edit.

A suite is `fn(before: Bundle, after: Bundle, requests: list[EditRequest], **options) -> dict`, a
JSON-serialisable scorecard. Every metric in it follows one schema (open-unlearning's):
`{"value_by_index": {item_id: value, ...}, "agg_value": float}`. Suites register on import of
their module (modules named `s_*.py` in this package), so analysis specs and reports find new
suites without changes to the runner.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
import typing
from dataclasses import dataclass
from typing import Any, Callable

from mechedit.errors import MecheditError


@dataclass(frozen=True)
class Suite:
    name: str
    fn: Callable[..., dict]
    doc: str


SUITES: dict[str, Suite] = {}


def register_suite(name: str):
    """Register a diagnostic suite under `name`; duplicates are refused."""
    def deco(fn):
        if name in SUITES:
            raise ValueError(f"suite {name!r} is already registered")
        SUITES[name] = Suite(name, fn, (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "")
        return fn
    return deco


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


def suite_options(suite: Suite) -> tuple[dict[str, Any], bool]:
    """The options a suite takes (keyword parameters after before, after, requests) with their types,
    and whether it also takes any other keyword (**options)."""
    params = list(inspect.signature(suite.fn).parameters.values())[3:]
    try:
        hints = typing.get_type_hints(suite.fn)
    except Exception:
        hints = {}
    named = {p.name: hints.get(p.name, Any) for p in params
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and not p.name.startswith("_")}
    return named, any(p.kind is p.VAR_KEYWORD for p in params)


def check_options(suites, options: dict, where: str = "options") -> dict:
    """Refuse options that none of `suites` takes (naming the key) and values of the wrong type or
    non-finite; returns the checked options."""
    from mechedit.errors import SpecError
    from mechedit.specio import check_value

    taken: dict[str, Any] = {}
    for name in suites:
        taken.update({k: t for k, t in suite_options(get_suite(name))[0].items() if k not in taken})
    out = {}
    for key, value in options.items():
        if key not in taken:
            raise SpecError(f"{where}: unknown option {key!r} for suite(s) {', '.join(suites)} "
                            f"(options: {', '.join(sorted(taken)) or 'none'})")
        out[key] = check_value(taken[key], value, f"{where} {key}")
    return out


def diagnose(before, after, requests, suites: tuple[str, ...] | list[str] = ("edit",), **options) -> dict:
    """Run each named suite; `"all"` runs every registered suite. Each suite gets the options it takes."""
    names = suite_names() if list(suites) == ["all"] else list(suites)
    chosen = [get_suite(n) for n in names]
    out = {}
    for s in chosen:
        named, rest = suite_options(s)
        out[s.name] = s.fn(before, after, requests, **{k: v for k, v in options.items() if rest or k in named})
    return out


def metric(values: dict, agg: float | None = None) -> dict:
    """One metric in the shared schema; `agg` defaults to the mean of the values."""
    import numpy as np

    vals = {str(k): (float(v) if v is not None else None) for k, v in values.items()}
    if agg is None:
        nums = [v for v in vals.values() if v is not None]
        agg = float(np.mean(nums)) if nums else float("nan")
    return {"value_by_index": vals, "agg_value": float(agg)}
