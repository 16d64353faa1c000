"""Analysis specs: a TOML file naming the world, the model, what to trace, the grid and the diagnostics.

```toml
name = "quickstart"
device = "auto"               # optional: auto (CUDA when present) | cpu | cuda | cuda:N (--device overrides)
precision = "float32"         # optional: inference (trace, scoring, diagnostics): float32 | bfloat16 | auto
[world]                       # spec = "default" | a spec file; or dir = a world directory
spec = "default"
[model]                       # preset = "default" | spec = a model spec file | checkpoint = a directory
preset = "default"
[trace]                       # optional: traced facts; "traced" layers resolve to its MLP location
relation = "capital"          # (or requests = "single": the facts of that request set, e.g. for
n = 30                        #  relating each fact's trace to its edits, analyses/hase.toml)
[requests.single]             # request sets: counterfactual edits ...
relation = "capital"
n = 8
mode = "each"                 # each request edited alone (restored between) | "batch": one call
[requests.forget1]            # ... or forget targets (unlearning): forget = "subject:NAME" or subjects = N
subjects = 1
[requests.ring]               # ... or edits of cyclic relations whose new object lies at cyclic distance d
kind = "ring"                 # from the true one (0 = re-assert the true object: the null control); the same
distances = [0, 1, 2, 3]      # n facts at every distance (default distances: 0 .. n_entities // 2);
n = 4                         # mode "batch" edits each distance's n facts in one call
[requests.ring_forget]        # ... or n cyclic facts to unlearn (new object = the refusal)
kind = "ring_forget"
n = 4
[[grid]]                      # methods x params x layers x request sets
method = "rome"
layers = ["traced", 0, 1, 2, 3]
requests = ["single"]
params = { steps = [20, 40] } # a list sweeps the values
[diagnostics]
suites = ["edit"]
[[findings]]                  # optional: a claim tested on the cases (mechedit.analysis.findings)
claim = "ROME at the traced layer takes single edits"
metric = "edit.efficacy.after"
where = { method = "rome", layer = "traced" }
at_least = 0.9
```
Paths are relative to the spec file. Every key is checked; an error names the key.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mechedit.errors import SpecError
from mechedit.specio import check_finite, from_dict, load_spec_file


@dataclass(frozen=True)
class RequestSet:
    name: str
    kind: str  # "counterfactual" | "forget" | "ring" | "ring_forget" (REQUEST_KINDS)
    mode: str  # "each" | "batch"
    n: int = 5
    relation: str | None = None
    forget: str | None = None  # "subject:NAME", "fact:S|R", "relation:R"
    subjects: int | None = None  # forget all facts of N random trained subjects
    seed: int = 0
    distances: tuple[int, ...] | None = None  # kind "ring": cyclic distances of the new objects (None: 0 .. n/2)
    exposure: int | str | None = None  # only facts / subjects seen that many times, or "balanced"
    knowledge: str = "all"  # forget subjects: "all", "pretrained" (first stage) or "finetuned" (second stage)

    @property
    def unlearning(self) -> bool:
        """Run with the forget suites (the new object is the refusal)."""
        return self.kind in ("forget", "ring_forget")

    def validate(self) -> None:
        where = f"requests.{self.name}"
        if self.kind not in REQUEST_KINDS:
            raise SpecError(f"{where}.kind: must be one of {', '.join(REQUEST_KINDS)}, got {self.kind!r}")
        if self.mode not in ("each", "batch"):
            raise SpecError(f"{where}.mode: must be 'each' or 'batch', got {self.mode!r}")
        if self.n < 1:
            raise SpecError(f"{where}.n: must be >= 1, got {self.n}")
        if self.subjects is not None and self.subjects < 1:
            raise SpecError(f"{where}.subjects: must be >= 1, got {self.subjects}")
        for key in ("forget", "subjects"):
            if getattr(self, key) is not None and self.kind != "forget":
                raise SpecError(f"{where}.{key}: only for forget request sets (kind = \"forget\")")
        if self.distances is not None:
            if self.kind != "ring":
                raise SpecError(f"{where}.distances: only for kind = \"ring\"")
            if not self.distances or min(self.distances) < 0 or len(set(self.distances)) != len(self.distances):
                raise SpecError(f"{where}.distances: expected a list of distinct integers >= 0, got {list(self.distances)}")
        e = self.exposure
        if e is not None and e != "balanced" and (isinstance(e, bool) or not isinstance(e, int) or e < 1):
            raise SpecError(f"{where}.exposure: a count >= 1 or 'balanced', got {e!r}")
        if e is not None and (self.forget is not None or self.kind in ("ring", "ring_forget")):
            raise SpecError(f"{where}.exposure: only with n (counterfactual) or subjects (forget)")
        if self.knowledge not in KNOWLEDGE or (self.knowledge != "all" and self.subjects is None):
            raise SpecError(f"{where}.knowledge: one of {', '.join(KNOWLEDGE)}, with subjects = N")


REQUEST_KINDS = ("counterfactual", "forget", "ring", "ring_forget")


@dataclass(frozen=True)
class Case:
    """One cell of the grid."""

    method: str
    params: dict
    layer: Any  # int, list of ints, "traced" or None (method default / not layered)
    requests: str  # request-set name

    @property
    def key(self) -> dict:
        return {"method": self.method, "params": self.params, "layer": self.layer, "requests": self.requests}

    @property
    def id(self) -> str:
        text = json.dumps(self.key, sort_keys=True)
        return f"{self.method}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


@dataclass(frozen=True)
class AnalysisSpec:
    name: str
    base: Path  # directory of the spec file (paths are relative to it)
    world: dict
    model: dict
    trace: dict | None
    request_sets: dict[str, RequestSet]
    cases: tuple[Case, ...]
    suites: tuple[str, ...]  # run on counterfactual request sets
    forget_suites: tuple[str, ...]  # run on forget request sets (unlearning)
    suite_options: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict)
    device: str = "auto"  # where the model, training and every case run (`--device` overrides it)
    findings: tuple = ()  # mechedit.analysis.findings.Finding
    precision: str = "float32"  # arithmetic of tracing, scoring and diagnostics (`--precision` overrides it)

    def hash(self) -> str:
        """What the cases compute: the spec less its findings and description (those only read the
        cases, so a run resumes, and its report re-evaluates, after either is changed)."""
        return computation_hash(self.raw)


KNOWLEDGE = ("all", "pretrained", "finetuned")
_TOP = {"name", "world", "model", "trace", "requests", "grid", "diagnostics", "description", "device",
        "precision", "findings"}
_WORLD = {"spec", "dir"}
_MODEL = {"preset", "spec", "checkpoint", "finetune_facts"}
_TRACE = {"relation", "n", "facts", "requests", "sites", "samples", "noise", "window", "seed"}
_REQ = {"kind", "relation", "n", "mode", "forget", "subjects", "seed", "distances", "exposure", "knowledge"}
_GRID = {"method", "params", "layers", "requests"}
_DIAG = {"suites", "forget_suites", "options"}


EVALUATION_ONLY = ("findings", "description")


def computation_hash(raw: dict, legacy: bool = False) -> str:
    """Hash of what a spec computes (`legacy`: of the whole spec, as runs were stamped before findings
    and the description were left out)."""
    kept = raw if legacy else {k: v for k, v in raw.items() if k not in EVALUATION_ONLY}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def _check_keys(table: Any, allowed: set[str], where: str) -> dict:
    if not isinstance(table, dict):
        raise SpecError(f"{where}: expected a table")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise SpecError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(allowed))})")
    return table


def _sweep(params: dict, where: str) -> list[dict]:
    """{a: [1, 2], b: 3} -> [{a: 1, b: 3}, {a: 2, b: 3}] (a list value is a sweep)."""
    if not isinstance(params, dict):
        raise SpecError(f"{where}: expected a table of parameters")
    keys = sorted(params)
    values = [v if isinstance(v, list) else [v] for v in (params[k] for k in keys)]
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def parse_analysis(data: dict, base: Path) -> AnalysisSpec:
    from mechedit.edit.api import get_method, make_params
    from mechedit.errors import MecheditError

    _check_keys(data, _TOP, "analysis")
    check_finite(data, "analysis")  # TOML allows inf and nan: no spec value may be one
    name = data.get("name", "analysis")
    if not isinstance(name, str) or not name.strip():
        raise SpecError(f"name: expected a non-empty string, got {name!r}")
    world = _check_keys(data.get("world", {"spec": "default"}), _WORLD, "world")
    if len(world) != 1:
        raise SpecError("world: give exactly one of spec or dir")
    for key, value in world.items():
        if not isinstance(value, str):
            raise SpecError(f"world.{key}: expected a path string, got {value!r}")
    if "dir" in world and not (base / world["dir"]).is_dir():
        raise SpecError(f"world.dir: world directory not found: {base / world['dir']}")
    if "spec" in world and world["spec"] != "default" and not (base / world["spec"]).is_file():
        raise SpecError(f"world.spec: spec file not found: {base / world['spec']}")
    model = _check_keys(data.get("model", {"preset": "default"}), _MODEL, "model")
    if len(set(model) - {"finetune_facts"}) != 1:
        raise SpecError("model: give exactly one of preset, spec or checkpoint")
    ft = model.get("finetune_facts")
    if ft is not None and (not isinstance(ft, (bool, dict)) or "checkpoint" in model):
        raise SpecError("model.finetune_facts: true or a table of finetune-facts parameters, with preset or spec "
                        "(the second stage is trained after the first and cached)")
    for key, value in model.items():
        if key == "finetune_facts":
            continue
        if not isinstance(value, str):
            raise SpecError(f"model.{key}: expected a string, got {value!r}")
    if "checkpoint" in model and not (base / model["checkpoint"]).is_dir():
        raise SpecError(f"model.checkpoint: checkpoint not found: {base / model['checkpoint']}")
    trace = data.get("trace")
    if trace is not None:
        _check_trace(_check_keys(trace, _TRACE, "trace"))
    sets: dict[str, RequestSet] = {}
    requests = data.get("requests", {})
    for sname, t in _check_keys(requests, set(requests) if isinstance(requests, dict) else set(), "requests").items():
        _check_keys(t, _REQ, f"requests.{sname}")
        kind = t.get("kind", "forget" if ("forget" in t or "subjects" in t) else "counterfactual")
        mode = t.get("mode", "batch" if kind == "forget" else "each")
        sets[sname] = from_dict(RequestSet, {**t, "name": sname, "kind": kind, "mode": mode}, f"requests.{sname}")
    if trace is not None and "requests" in trace:  # trace exactly the facts a request set edits
        tr = trace["requests"]
        if tr not in sets or sets[tr].kind != "counterfactual":
            raise SpecError(f"trace.requests: {tr!r} is not a counterfactual request set "
                            f"(defined: {', '.join(n for n, r in sets.items() if r.kind == 'counterfactual') or 'none'})")
        if any(k in trace for k in ("relation", "n", "facts")):
            raise SpecError("trace: give either requests or relation / n / facts")
    grid = data.get("grid", [])
    if not isinstance(grid, list) or not grid:
        raise SpecError("grid: the grid is empty (add at least one [[grid]] entry)")
    cases: list[Case] = []
    for i, g in enumerate(grid):
        where = f"grid[{i}]"
        _check_keys(g, _GRID, where)
        if "method" not in g:
            raise SpecError(f"{where}.method: missing")
        try:
            method = get_method(str(g["method"]))
        except MecheditError as exc:
            raise SpecError(f"{where}.method: {exc}") from None
        req_names = g.get("requests", list(sets)[:1])
        if isinstance(req_names, str):
            req_names = [req_names]
        if not isinstance(req_names, list) or not all(isinstance(r, str) for r in req_names):
            raise SpecError(f"{where}.requests: expected a list of request-set names, got {req_names!r}")
        if not req_names:
            raise SpecError(f"{where}.requests: no request set (define one under [requests.NAME])")
        for r in req_names:
            if r not in sets:
                raise SpecError(f"{where}.requests: unknown request set {r!r} (defined: {', '.join(sets) or 'none'})")
        layers = g.get("layers", [None])
        if not isinstance(layers, list) or not layers:
            raise SpecError(f"{where}.layers: expected a non-empty list")
        for params in _sweep(g.get("params", {}), f"{where}.params"):
            if "layer" in params:
                raise SpecError(f"{where}.params: give layers with the 'layers' key, not params.layer")
            for layer in layers:
                if layer == "traced" and trace is None:
                    raise SpecError(f"{where}.layers: 'traced' needs a [trace] section")
                try:  # the case's parameters as the method will get them ("traced" resolves to an int)
                    make_params(method, params if layer is None else {**params, "layer": 0 if layer == "traced" else layer})
                except MecheditError as exc:
                    raise SpecError(f"{where}.{'params' if layer is None else 'layers'}: {exc}") from None
                for r in req_names:
                    if params.get("forget_target", "refusal") != "refusal" and not sets[r].unlearning:
                        raise SpecError(f"{where}.params.forget_target: self-improvement targets replace the "
                                        f"refusal of a forget request set; {r!r} is {sets[r].kind}")
                    cases.append(Case(method.name, params, layer, r))
    ids = [c.id for c in cases]
    if len(set(ids)) != len(ids):
        raise SpecError("grid: the same case appears twice")
    diag = _check_keys(data.get("diagnostics", {}), _DIAG, "diagnostics")
    for key in ("suites", "forget_suites"):
        if key in diag and (not isinstance(diag[key], list) or not all(isinstance(x, str) for x in diag[key])):
            raise SpecError(f"diagnostics.{key}: expected a list of suite names, got {diag[key]!r}")
    suites = tuple(diag.get("suites", ["edit"]))
    forget_suites = tuple(diag.get("forget_suites", ["forget"]))
    from mechedit.diagnose import check_options, get_suite

    for s in suites + forget_suites:
        try:
            get_suite(s)
        except MecheditError as exc:
            raise SpecError(f"diagnostics.suites: {exc}") from None
    options = diag.get("options", {})
    if not isinstance(options, dict):
        raise SpecError(f"diagnostics.options: expected a table, got {options!r}")
    options = check_options(tuple(dict.fromkeys(suites + forget_suites)), options, "diagnostics.options")
    device = data.get("device", "auto")
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device.strip().lower()):
        from mechedit.device import DEVICE_HELP

        raise SpecError(f"device: expected {DEVICE_HELP}, got {device!r}")
    from mechedit.device import check_precision

    try:
        precision = check_precision(data.get("precision", "float32"))
    except MecheditError as exc:
        raise SpecError(str(exc)) from None
    from mechedit.analysis.findings import parse_findings

    findings = parse_findings(data.get("findings"), [c.key for c in cases])
    return AnalysisSpec(name, base, world, model, trace, sets, tuple(cases), suites, forget_suites, options, data,
                        device.strip().lower(), findings, precision)


def trace_config(trace: dict):
    """The `TraceConfig` of a [trace] table (its sites, samples, noise, window and seed)."""
    from mechedit.trace.api import TraceConfig

    keys = {k: trace[k] for k in ("sites", "samples", "noise", "window", "seed") if k in trace}
    if "sites" in keys:
        if not isinstance(keys["sites"], list):
            raise SpecError(f"trace.sites: expected a list, got {keys['sites']!r}")
        keys["sites"] = tuple(keys["sites"])
    return TraceConfig(**keys)


def _check_trace(trace: dict) -> None:
    from mechedit.errors import MecheditError
    from mechedit.specio import check_value

    check_value(int | None, trace.get("n"), "trace.n")
    if trace.get("n") is not None and trace["n"] < 1:
        raise SpecError(f"trace.n: must be >= 1, got {trace['n']}")
    check_value(str | None, trace.get("relation"), "trace.relation")
    check_value(list[str] | None, trace.get("facts"), "trace.facts")
    check_value(str | None, trace.get("requests"), "trace.requests")
    try:
        trace_config(trace)
    except SpecError:
        raise
    except MecheditError as exc:
        raise SpecError(f"trace: {exc}") from None


def load_analysis(path: str | Path) -> AnalysisSpec:
    path = Path(path)
    return parse_analysis(load_spec_file(path), path.resolve().parent)
