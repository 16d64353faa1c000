"""The editing API shared by every editor and unlearning method.

`EditRequest` asks for one fact to change; a method (registered by name with a typed, frozen
parameter class) turns requests into an `EditResult`: weight deltas keyed by HF parameter name,
and/or adaptors (modules added through hooks: GRACE, WISE, RepE, ICU; `mechedit.edit.adaptors`).
Computing an edit never leaves the model changed; `apply()` adds the deltas in place and attaches
the adaptors, `restore()` detaches them and puts back bit-identical original weights.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from mechedit.edit.adaptors import Adaptor, adaptors_from_json, attach, detach
from mechedit.errors import MecheditError
from mechedit.fileio import dumps_json, read_json, write_text_atomic
from mechedit.specio import from_dict, to_dict


@dataclass(frozen=True)
class EditRequest:
    """Change fact (subject, relation) to `new_object` (a world object, or the refusal token)."""

    subject: str
    relation: str
    new_object: str

    @classmethod
    def from_dict(cls, d: dict) -> "EditRequest":
        try:
            return cls(str(d["subject"]), str(d["relation"]), str(d.get("new_object", d.get("new"))))
        except KeyError as exc:
            raise MecheditError(f"edit request is missing {exc} (needs subject, relation, new_object)") from None


@dataclass
class EditResult:
    method: str
    params: dict
    requests: list[EditRequest]
    deltas: dict[str, torch.Tensor]  # HF parameter name -> delta, same shape as the parameter
    timings: dict[str, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # method-specific facts (layers used, clamp, losses)
    adaptors: list[Adaptor] = field(default_factory=list)  # modules attached by apply() (GRACE, WISE, ...)
    _originals: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def applied(self) -> bool:
        return self._originals is not None

    @torch.no_grad()
    def apply(self, model) -> "EditResult":
        """Add the deltas to `model`'s parameters in place and attach the adaptors; `restore` undoes both."""
        if self._originals is not None:
            raise MecheditError("edit is already applied")
        params = dict(model.named_parameters())
        missing = [n for n in self.deltas if n not in params]
        if missing:
            raise MecheditError(f"edit names parameters the model does not have: {missing[:3]}")
        originals = {n: params[n].detach().clone() for n in self.deltas}
        for n, d in self.deltas.items():
            params[n].add_(d.to(params[n].device, params[n].dtype))
        done: list[Adaptor] = []
        try:
            for a in self.adaptors:
                attach(model, a)
                done.append(a)
        except BaseException:
            for a in reversed(done):
                detach(model, a)
            for n, orig in originals.items():
                params[n].copy_(orig)
            raise
        self._originals = originals
        return self

    @torch.no_grad()
    def restore(self, model) -> None:
        """Detach the adaptors and put back the exact original weights."""
        if self._originals is None:
            raise MecheditError("edit is not applied")
        for a in reversed(self.adaptors):
            detach(model, a)
        params = dict(model.named_parameters())
        for n, orig in self._originals.items():
            params[n].copy_(orig)
        self._originals = None

    def to_json(self) -> dict:
        return {"method": self.method, "params": self.params, "requests": [dataclasses.asdict(r) for r in self.requests],
                "timings": self.timings, "info": self.info,
                "deltas": {n: list(d.shape) for n, d in self.deltas.items()},
                "adaptors": [a.to_json() for a in self.adaptors]}

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({n: d.detach().cpu().contiguous() for n, d in self.deltas.items()}, str(directory / "deltas.safetensors"))
        if self.adaptors:
            save_file({f"{i}.{n}": t.detach().cpu().contiguous() for i, a in enumerate(self.adaptors)
                       for n, t in a.tensors.items()}, str(directory / "edit_adaptors.safetensors"))
        write_text_atomic(directory / "edit.json", dumps_json(self.to_json()))

    @classmethod
    def load(cls, directory: str | Path) -> "EditResult":
        """From a folder holding edit.json + deltas.safetensors, or from an edited / unlearned
        checkpoint (its `edit/` folder; older unlearned checkpoints kept them at the top)."""
        directory = find_edit_dir(directory) or Path(directory)
        meta = read_json(directory / "edit.json", "edit.json")
        try:
            deltas = load_file(str(directory / "deltas.safetensors"))
            items = meta.get("adaptors", [])
            tensors = load_file(str(directory / "edit_adaptors.safetensors")) if items else {}
        except Exception as exc:
            raise MecheditError(f"corrupt deltas or adaptors in {directory}: {exc}") from None
        return cls(meta["method"], meta["params"], [EditRequest(**r) for r in meta["requests"]], deltas,
                   meta.get("timings", {}), meta.get("info", {}), adaptors_from_json(items, tensors, directory))


# Output layout of `mechedit edit` and `mechedit unlearn` (one for both): OUT/ is the changed checkpoint,
# OUT/EDIT_DIR/ holds the change (edit.json, deltas.safetensors), OUT/scorecard.json its scores.
EDIT_DIR = "edit"


def find_edit_dir(checkpoint: str | Path) -> Path | None:
    """Where a changed checkpoint keeps its edit.json: OUT/edit/ (the layout), else OUT/ itself (what
    `mechedit unlearn` wrote before the layout was one), else None."""
    checkpoint = Path(checkpoint)
    for d in (checkpoint / EDIT_DIR, checkpoint):
        if (d / "edit.json").is_file():
            return d
    return None


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., EditResult]
    params: type
    kind: str  # "edit" or "unlearn"
    forget_defaults: dict = field(default_factory=dict)  # editors: defaults when every target is the refusal


METHODS: dict[str, Method] = {}


def register_method(name: str, params: type, kind: str = "edit", forget_defaults: dict | None = None):
    """Register an editor `fn(bundle, requests, p) -> EditResult` under `name`; duplicates are refused.

    `forget_defaults` (editors used for unlearning, Li et al. 2025): parameter values that replace the
    counterfactual defaults when every request's new object is the refusal token (explicit values win).
    """
    def deco(fn):
        if name in METHODS:
            raise ValueError(f"method {name!r} is already registered")
        unknown = set(forget_defaults or {}) - {f.name for f in dataclasses.fields(params)}
        if unknown:
            raise ValueError(f"method {name!r}: forget_defaults names unknown parameters {sorted(unknown)}")
        METHODS[name] = Method(name, fn, params, kind, dict(forget_defaults or {}))
        return fn
    return deco


def get_method(name: str) -> Method:
    _load_builtin_methods()
    if name not in METHODS:
        raise MecheditError(f"unknown method {name!r} (known: {', '.join(sorted(METHODS))})")
    return METHODS[name]


def _load_builtin_methods() -> None:
    """Import the modules that register the built-in methods (each registers on import)."""
    import importlib
    import pkgutil

    import mechedit.edit as edit_pkg

    packages = [edit_pkg]
    try:
        import mechedit.unlearn as unlearn_pkg
        packages.append(unlearn_pkg)
    except ImportError:
        pass
    for pkg in packages:
        for mod in pkgutil.iter_modules(pkg.__path__):
            if mod.name.startswith("m_"):
                importlib.import_module(f"{pkg.__name__}.{mod.name}")


def parse_param_value(text: str, where: str = "value") -> Any:
    """`--param key=value` values: JSON when it parses (numbers, lists, true/false), else a string.

    Non-finite numbers (`1e400` parses as inf, `NaN`, `Infinity`) are refused.
    """
    from mechedit.specio import check_finite

    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    except RecursionError:
        raise MecheditError(f"{where}: value nested too deeply") from None
    return check_finite(value, where)


def parse_params(items: list[str], flag: str = "--param") -> dict:
    """`key=value` strings (repeatable CLI options) into a dict of parsed values."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MecheditError(f"{flag} must be key=value, got {item!r}")
        out[key.strip()] = parse_param_value(value.strip(), f"{flag} {key.strip()}")
    return out


def make_params(method: Method, values: dict[str, Any]):
    """Build the method's parameter dataclass, naming any key it does not take."""
    fields = {f.name for f in dataclasses.fields(method.params)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise MecheditError(f"method {method.name!r} has no parameter {unknown[0]!r} (parameters: {', '.join(sorted(fields))})")
    base = to_dict(method.params())
    return from_dict(method.params, {**base, **values}, f"{method.name} params")


def is_forget(requests: list[EditRequest]) -> bool:
    """Editing as unlearning: every request asks for the refusal token."""
    from mechedit.world.language import REFUSAL

    return bool(requests) and all(r.new_object == REFUSAL for r in requests)


def run_method(bundle, requests: list[EditRequest], method: str, **params) -> EditResult:
    """`edit(model, requests, method=..., **hparams)`: validate, dispatch, time the call.

    When every target is the refusal token, the method's `forget_defaults` replace its counterfactual
    defaults (explicit `params` still win); the result's params and `info["defaults"]` say which.
    An editor's `forget_target` other than "refusal" (self-improvement, `mechedit.edit.self_targets`)
    replaces each refusal by the model's own answer before the edit: the result keeps the requests as
    asked (the refusal) and records the objects written in `info["self_targets"]`.
    """
    m = get_method(method)
    forget = is_forget(requests) and bool(m.forget_defaults)
    p = make_params(m, {**m.forget_defaults, **params} if forget else params)
    validate_requests(bundle, requests)
    t0 = time.perf_counter()
    edit_requests, chosen = requests, None
    forget_target = getattr(p, "forget_target", "refusal")
    if forget_target != "refusal":
        if not is_forget(requests):
            raise MecheditError(f"{method}: forget_target={forget_target!r} (self-improvement) is for editing as "
                                "unlearning: every request's new object must be <refuse>")
        from mechedit.edit.self_targets import self_targets

        edit_requests, chosen = self_targets(bundle, requests, forget_target)
        validate_requests(bundle, edit_requests)
    t1 = time.perf_counter()
    result = m.fn(bundle, edit_requests, p)
    result.timings.setdefault("total_s", time.perf_counter() - t0)
    if chosen is not None:
        result.requests = list(requests)
        result.info["self_targets"] = chosen
        result.timings["self_targets_s"] = t1 - t0
    if m.forget_defaults:
        result.info.setdefault("defaults", "forget" if forget else "counterfactual")
    return result


def validate_requests(bundle, requests: list[EditRequest]) -> None:
    if not requests:
        raise MecheditError("no edit requests given")
    tok = bundle.tokenizer
    for r in requests:
        bundle.world.fact(r.subject, r.relation)
        ids = tok(r.new_object, add_special_tokens=False)["input_ids"] if r.new_object.strip() else []
        if not ids or tok.unk_token_id in ids:  # word level: an unknown word; BPE: a character it lacks
            raise MecheditError(f"new object {r.new_object!r} is not in the vocabulary")
