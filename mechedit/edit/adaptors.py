"""Adaptors: edits that add a module to the model (a hook) instead of changing its weights.

GRACE's codebook, WISE's side memory, RepE's steering and ICU's instruction prefix change what a
model computes without touching one weight. Each is an `Adaptor`: plain data (a registered kind, the
HF module it attaches to, state tensors and a JSON config) carried by an `EditResult` beside its
weight deltas. `EditResult.apply(model)` attaches it, `restore(model)` detaches exactly it, so the
model computes bit-identically what it computed before (no hook, no attribute is left behind).

Attaching: every (module, kind) pair gets one `Site`, stored on the module (`module._mechedit_sites`)
with one hook registered on it (`forward` kinds: a forward hook that may replace the module's output;
`pre` kinds: a forward pre-hook with keyword arguments). The site holds the attached adaptors of that
kind in attach order and asks the kind to combine them (GRACE: one codebook over every entry; WISE:
the router picks among the side memories). Because the site lives on the module and the hook is a
bound method of the site, `copy.deepcopy(model)` copies both consistently: an edited copy (a frozen
bundle, the unlearning loop's working copy) keeps computing the edited function.

Saving: `save_adaptors` writes `adaptors.safetensors` + `adaptors.json`; a checkpoint saved while
adaptors are attached carries them (`model/checkpoint.py` reattaches them on load), so `mechedit
diagnose BEFORE AFTER` sees the edited behaviour. A plain `AutoModelForCausalLM.from_pretrained` of
such a checkpoint loads only the weights.

A kind is a class registered with `register_adaptor_kind(name)`:
    hook = "forward" | "pre"
    check(adaptor, module) -> None                       raise MecheditError on a misfit
    forward(site, module, args, output) -> output|None   ("forward" kinds)
    pre(site, module, args, kwargs) -> (args, kwargs)|None ("pre" kinds)
    prepare(site, module) -> None                        optional: after every attach / detach
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mechedit.errors import MecheditError
from mechedit.fileio import dumps_json, read_json, write_text_atomic

SITES_ATTR = "_mechedit_sites"
ADAPTORS_FILE = "adaptors.safetensors"
ADAPTORS_JSON = "adaptors.json"


@dataclass(eq=False)
class Adaptor:
    """One attachable module: `kind` (registered), `module` (HF module path, "" = the model itself),
    state tensors and a JSON-serialisable config. Treated as immutable once built."""

    kind: str
    module: str
    tensors: dict[str, torch.Tensor]
    config: dict = field(default_factory=dict)

    @cached_property
    def digest(self) -> str:
        """A content hash of kind, module, config and tensors (identifies the adaptor in caches)."""
        h = hashlib.sha1(json.dumps([self.kind, self.module, self.config], sort_keys=True, default=str).encode())
        for name in sorted(self.tensors):
            t = self.tensors[name].detach().cpu().contiguous()
            h.update(name.encode())
            h.update(str((tuple(t.shape), str(t.dtype))).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    def to_json(self) -> dict:
        return {"kind": self.kind, "module": self.module, "config": self.config,
                "tensors": {n: list(t.shape) for n, t in self.tensors.items()}}


ADAPTOR_KINDS: dict[str, type] = {}


def register_adaptor_kind(name: str):
    """Register an adaptor kind class under `name`; duplicates are refused."""
    def deco(cls):
        if name in ADAPTOR_KINDS:
            raise ValueError(f"adaptor kind {name!r} is already registered")
        if getattr(cls, "hook", None) not in ("forward", "pre"):
            raise ValueError(f"adaptor kind {name!r}: hook must be 'forward' or 'pre'")
        ADAPTOR_KINDS[name] = cls
        return cls
    return deco


def get_adaptor_kind(name: str):
    if name not in ADAPTOR_KINDS:
        from mechedit.edit.api import _load_builtin_methods  # the kinds live beside their methods

        _load_builtin_methods()
    if name not in ADAPTOR_KINDS:
        raise MecheditError(f"unknown adaptor kind {name!r} (known: {', '.join(sorted(ADAPTOR_KINDS))})")
    return ADAPTOR_KINDS[name]


class Site:
    """The adaptors of one kind attached to one module, and the hook that runs them."""

    def __init__(self, kind: str):
        self.kind = kind
        self.entries: list[Adaptor] = []
        self.cache: dict[str, Any] = {}  # per-site derived state (concatenated codebooks, prefix caches)

    def forward_hook(self, module, args, output):
        return ADAPTOR_KINDS[self.kind].forward(self, module, args, output)

    def pre_hook(self, module, args, kwargs):
        return ADAPTOR_KINDS[self.kind].pre(self, module, args, kwargs)


def resolve_module(model, path: str) -> torch.nn.Module:
    if not path:
        return model
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise MecheditError(f"adaptor names a module the model does not have: {path!r}") from None


def _install(module, site: Site, kind) -> None:
    if kind.hook == "forward":
        module.register_forward_hook(site.forward_hook)
    else:
        module.register_forward_pre_hook(site.pre_hook, with_kwargs=True)


def _uninstall(module, site: Site) -> None:
    """Remove the site's hook from `module` (found by identity, so deep copies stay independent)."""
    for hooks, extra in ((module._forward_hooks, ("_forward_hooks_with_kwargs", "_forward_hooks_always_called")),
                         (module._forward_pre_hooks, ("_forward_pre_hooks_with_kwargs",))):
        for hid, fn in list(hooks.items()):
            if getattr(fn, "__self__", None) is site:
                del hooks[hid]
                for name in extra:
                    getattr(module, name, {}).pop(hid, None)


def attach(model, adaptor: Adaptor) -> None:
    """Attach `adaptor` to `model` (after the adaptors already attached at its site)."""
    kind = get_adaptor_kind(adaptor.kind)
    module = resolve_module(model, adaptor.module)
    kind.check(adaptor, module)
    param = next(module.parameters(), None)
    if param is not None:  # adaptors read from disk (or built on another device) live beside their module
        for n, t in adaptor.tensors.items():
            if t.device != param.device and not t.requires_grad:
                adaptor.tensors[n] = t.to(param.device)
    sites = module.__dict__.setdefault(SITES_ATTR, {})
    site = sites.get(adaptor.kind)
    if site is None:
        site = sites[adaptor.kind] = Site(adaptor.kind)
        _install(module, site, kind)
    site.entries.append(adaptor)
    site.cache.clear()
    if hasattr(kind, "prepare"):
        kind.prepare(site, module)


def detach(model, adaptor: Adaptor) -> None:
    """Remove exactly `adaptor` (by identity); the last one of a site takes the hook and the site away."""
    module = resolve_module(model, adaptor.module)
    sites = module.__dict__.get(SITES_ATTR, {})
    site = sites.get(adaptor.kind)
    idx = [i for i, e in enumerate(site.entries) if e is adaptor] if site is not None else []
    if not idx:
        raise MecheditError(f"adaptor {adaptor.kind} at {adaptor.module or 'the model'} is not attached")
    del site.entries[idx[-1]]
    site.cache.clear()
    if not site.entries:
        _uninstall(module, site)
        del sites[adaptor.kind]
        if not sites:
            del module.__dict__[SITES_ATTR]
    elif hasattr(ADAPTOR_KINDS[adaptor.kind], "prepare"):
        ADAPTOR_KINDS[adaptor.kind].prepare(site, module)


def site_entries(model, module: str, kind: str) -> list[Adaptor]:
    """The adaptors of `kind` attached at `module` (attach order); empty when none."""
    site = resolve_module(model, module).__dict__.get(SITES_ATTR, {}).get(kind)
    return list(site.entries) if site is not None else []


def attached(model) -> list[Adaptor]:
    """Every adaptor attached to `model`, module by module, in attach order within a site."""
    out = []
    for _, module in model.named_modules():
        for site in module.__dict__.get(SITES_ATTR, {}).values():
            out += site.entries
    return out


def adaptor_fingerprint(model) -> tuple:
    """What the attached adaptors add to a model's function: (module, kind, content hashes) per site.

    Empty for a model without adaptors; caches keyed on weights alone must add this.
    """
    out = []
    for name, module in model.named_modules():
        for kind, site in sorted(module.__dict__.get(SITES_ATTR, {}).items()):
            out.append((name, kind, tuple(e.digest for e in site.entries)))
    return tuple(out)


def save_adaptors(adaptors: list[Adaptor], directory: str | Path) -> None:
    """`adaptors.safetensors` (tensor `"{i}.{name}"`) and `adaptors.json` (kinds, modules, configs)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"{i}.{n}": t.detach().cpu().contiguous() for i, a in enumerate(adaptors) for n, t in a.tensors.items()}
    save_file(tensors, str(directory / ADAPTORS_FILE))
    write_text_atomic(directory / ADAPTORS_JSON, dumps_json({"adaptors": [a.to_json() for a in adaptors]}))


def load_adaptors(directory: str | Path) -> list[Adaptor]:
    directory = Path(directory)
    meta = read_json(directory / ADAPTORS_JSON, "adaptors.json")
    try:
        tensors = load_file(str(directory / ADAPTORS_FILE))
    except Exception as exc:
        raise MecheditError(f"corrupt adaptors in {directory}: {exc}") from None
    return adaptors_from_json(meta.get("adaptors", []), tensors, directory)


def adaptors_from_json(items: list[dict], tensors: dict[str, torch.Tensor], where) -> list[Adaptor]:
    out = []
    for i, a in enumerate(items):
        try:
            names = list(a["tensors"])
            out.append(Adaptor(a["kind"], a["module"], {n: tensors[f"{i}.{n}"] for n in names}, dict(a["config"])))
        except (KeyError, TypeError) as exc:
            raise MecheditError(f"corrupt adaptors in {where}: missing {exc}") from None
    return out
