"""Frozen, validated config dataclasses that round-trip to JSON and TOML: the one place that checks values.

`from_dict(cls, data)` builds a (possibly nested) dataclass from plain data, rejects unknown keys
with a message naming the key and checks every value against its annotated type; `check_fields(obj)`
applies the same checks to a dataclass built in code; `validate_spec(obj)` runs both that and the
class's own `validate()`. `to_dict` is the inverse; `load_spec_file` reads TOML or JSON (UTF-8).

Rules every spec field gets for free (so new fields are checked without code of their own):
- a `float` must be finite (`1e400` parses as inf, `nan` is a valid TOML float: both are refused);
- an `int` must lie in [-MAX_COUNT, MAX_COUNT] (one million): a count, a step number, a size beyond
  that would exhaust the machine or run for days, so it is refused with the limit in the message;
- an `int` field named `seed` or `*_seed` is a seed: 0 <= seed <= 2**63 - 1 (what numpy and torch take);
- `Annotated[int | float, Range(lo, hi)]` states another range (`Seed` is one);
- `bool` is never accepted for a number, nor a number for a `bool`; a string is never a number.
"""
from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

from mechedit.errors import SpecError

T = TypeVar("T")

MAX_COUNT = 1_000_000
SEED_MAX = 2**63 - 1


@dataclass(frozen=True)
class Range:
    """An inclusive range for an annotated number field: `Annotated[int, Range(0, 10)]`."""

    lo: float | None = None
    hi: float | None = None


Seed = Annotated[int, Range(0, SEED_MAX)]
_DEFAULT_INT = Range(-MAX_COUNT, MAX_COUNT)
_SEED = Range(0, SEED_MAX)


class _Mismatch(SpecError):
    """The value has the wrong type (as opposed to a value out of range)."""


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _fmt_limit(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:g}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_number(value: Any, where: str, rng: Range | None = None, integer: bool = False) -> Any:
    """`value` if it is a finite number (an int when `integer`) inside `rng`; else a one-line SpecError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Mismatch(f"{where}: expected {'an integer' if integer else 'a number'}, got {_short(value)}")
    if integer and not isinstance(value, int):
        raise _Mismatch(f"{where}: expected an integer, got {_short(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise SpecError(f"{where}: {value!r} is not a finite number")
    if isinstance(value, int) and not integer and abs(value) > 1e300:
        raise SpecError(f"{where}: {_short(value)} is too large for a float")
    if integer and rng is None:
        rng = _DEFAULT_INT
    if rng is not None:
        if rng.lo is not None and value < rng.lo:
            raise SpecError(f"{where}: {_short(value)} is below the limit of {_fmt_limit(rng.lo)}")
        if rng.hi is not None and value > rng.hi:
            raise SpecError(f"{where}: {_short(value)} is beyond the limit of {_fmt_limit(rng.hi)}")
    return value


def check_finite(value: Any, where: str) -> Any:
    """Refuse non-finite floats (and integers beyond 64 bits) anywhere inside untyped plain data."""
    if isinstance(value, float) and not math.isfinite(value):
        raise SpecError(f"{where}: {value!r} is not a finite number")
    if isinstance(value, int) and not isinstance(value, bool):  # untyped: only what a 64-bit integer holds
        check_number(value, where, Range(-SEED_MAX - 1, SEED_MAX), integer=True)
    if isinstance(value, dict):
        for k, v in value.items():
            check_finite(v, f"{where}.{k}")
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_finite(v, f"{where}[{i}]")
    return value


def _field_range(name: str) -> Range | None:
    return _SEED if name == "seed" or name.endswith("_seed") else None


def _convert(tp: Any, value: Any, where: str, rng: Range | None = None) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Annotated:
        ranges = [m for m in getattr(tp, "__metadata__", ()) if isinstance(m, Range)]
        return _convert(args[0], value, where, ranges[0] if ranges else rng)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            check_fields(value, where)
            return value
        return from_dict(tp, value, where)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        errors: list[SpecError] = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, where, rng)
            except SpecError as exc:
                errors.append(exc)
        relevant = [e for e in errors if not isinstance(e, _Mismatch)]
        if relevant:
            raise relevant[0]
        names = " or ".join(getattr(a, "__name__", str(a)) for a in args if a is not type(None))
        raise _Mismatch(f"{where}: expected {names}, got {_short(value)}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(f"{where}: expected a list, got {_short(value)}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]", rng) for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise SpecError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(a, v, f"{where}[{i}]", rng) for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        return [_convert(item, v, f"{where}[{i}]", rng) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch(f"{where}: expected a table, got {_short(value)}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _convert(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is dict and not isinstance(value, dict):
        raise _Mismatch(f"{where}: expected a table, got {_short(value)}")
    if tp is list and not isinstance(value, list):
        raise _Mismatch(f"{where}: expected a list, got {_short(value)}")
    if tp is Any or tp is dict or tp is list:
        return check_finite(value, where)
    if tp is float:
        return float(check_number(value, where, rng))
    if tp is int:
        return check_number(value, where, rng, integer=True)
    if tp is bool:
        if not isinstance(value, bool):
            raise _Mismatch(f"{where}: expected true/false, got {_short(value)}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise _Mismatch(f"{where}: expected a string, got {_short(value)}")
        return value
    return value


def check_value(tp: Any, value: Any, where: str) -> Any:
    """`value` checked (and converted, e.g. lists to tuples) against type annotation `tp` by the rules above."""
    return _convert(tp, value, where, _field_range(where.replace(" ", ".").rsplit(".", 1)[-1]))


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls, include_extras=True)
    except Exception:  # an unresolvable annotation: fall back to no type checks for that class
        return {}


def check_fields(obj: Any, where: str = "spec") -> None:
    """Check every field of dataclass `obj` (built in code rather than by `from_dict`) by the rules above."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.name in hints:
            _convert(hints[f.name], getattr(obj, f.name), f"{where}.{f.name}", _field_range(f.name))


def validate_spec(obj: T, where: str = "spec") -> T:
    """`check_fields` then the class's own `validate()`; returns `obj`."""
    check_fields(obj, where)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def from_dict(cls: type[T], data: Any, where: str = "spec") -> T:
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types; runs `validate()`."""
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a table, got {type(data).__name__}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        raise SpecError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(fields))})")
    kwargs = {k: _convert(hints.get(k, Any), v, f"{where}.{k}", _field_range(k)) for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as exc:
        raise SpecError(f"{where}: {exc}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def load_spec_file(path: str | Path) -> dict:
    """Read a TOML or JSON spec file (UTF-8) into a dict; one-line errors for missing or malformed files."""
    from mechedit.errors import MecheditError
    from mechedit.fileio import read_text

    path = Path(path)
    try:
        text = read_text(path, "spec file")
    except SpecError:
        raise
    except MecheditError as exc:
        raise SpecError(str(exc)) from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, RecursionError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SpecError(f"malformed spec {path}: {first}") from None
    if not isinstance(data, dict):
        raise SpecError(f"malformed spec {path}: the top level must be a table, got {type(data).__name__}")
    return data
