"""Findings of a study: a published claim, the numbers a run measured for it, and a verdict.

An analysis spec may list `[[findings]]`; each names a metric (a summary key of the case records,
e.g. `edit.efficacy.after`), the case(s) it is read from (`where`: method, requests, layer or a list
of layers, params: the given ones must match, an empty table selects default parameters; `requests`
may list several request sets, independent draws of the same kind, whose cases are pooled: every
unit of every set counts once) and exactly one test:

    at_least = 0.9 / at_most = 0.1     the mean over units is above / below a threshold
    than = { ... }                     the `where` case against another case (`direction`)
    than_metric = "KEY"                against another metric of the same case (e.g. the retrained model)
    by_exposure = true                 the most-exposed facts against the least-exposed ones, in one case
    across = "layer"                   the `where` cases differ by layer: best minus worst layer

A unit is one fact (or one edit request): per-edit values of an "each" case, else the per-item
values of the scorecard grouped by item (one value per fact or per request), so every figure has its
n. Intervals are seeded 95% percentile bootstraps over units; two cases on the same request set are
compared pairwise (per-unit differences), others by resampling each side. A figure with no per-unit
values uses the interval its scorecard stored (AUCs), and differences of two such figures a normal
approximation from those intervals. `across = "layer"` picks the best and the worst layer on the
even-numbered units and measures their difference on the odd-numbered ones (never on the data the
choice was made on).

Verdict: "holds" when the 95% interval lies wholly on the claimed side (of the threshold; of
`margin`, default 0, for a difference taken in the claimed direction), "fails" when it lies wholly
on the other side (the effect is smaller than the claim needs, or reversed), else "inconclusive"
(at this n); "not run" while a case it needs is not in the run folder yet.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mechedit.errors import SpecError

TESTS = ("at_least", "at_most", "than", "than_metric", "by_exposure", "across")
_KEYS = {"id", "claim", "source", "metric", "where", "direction", "margin", *TESTS}
_WHERE = {"method", "requests", "layer", "params"}
N_BOOT = 2000
# edit-suite categories whose items are edit requests (request index before ':'); other edit
# categories are keyed by fact index
REQUEST_ITEMS = {"efficacy", "efficacy_old", "paraphrase", "qa", "prob_new_gt_old"}
TAGS = ("before", "after", "retrained")


@dataclass(frozen=True)
class Finding:
    """One claim of a study and how to test it on a run's cases."""

    id: str
    claim: str
    source: str
    metric: str
    where: dict
    test: str  # one of TESTS
    value: Any  # threshold, the other case's selector, the other metric, True or "layer"
    direction: str = "greater"  # than / than_metric / by_exposure: "greater" or "less"
    margin: float = 0.0
    extra: dict = field(default_factory=dict)


def _matches(case: dict, where: dict) -> bool:
    if "method" in where and case["method"] != where["method"]:
        return False
    if "requests" in where and case["requests"] not in _sets(where):
        return False
    if "layer" in where:  # one layer, or a list of them (for across = "layer")
        layers = where["layer"] if isinstance(where["layer"], list) else [where["layer"]]
        if case["layer"] not in layers:
            return False
    if where.get("params") == {}:  # an empty table selects the case run with default parameters
        return not case["params"]
    return all(case["params"].get(k) == v for k, v in where.get("params", {}).items())


def _sets(where: dict) -> list[str]:
    """The request sets a selector names: one, or a list whose cases are pooled (independent draws)."""
    r = where.get("requests")
    return list(r) if isinstance(r, list) else [r]


def select(cases: list[dict], where: dict) -> list[dict]:
    return [c for c in cases if _matches(c, where)]


def _check_where(where: Any, spec_cases: list[dict], key: str, exactly_one: bool) -> dict:
    if not isinstance(where, dict) or not where:
        raise SpecError(f"{key}: expected a table (method, requests, layer, params)")
    unknown = sorted(set(where) - _WHERE)
    if unknown:
        raise SpecError(f"{key}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_WHERE))})")
    if not isinstance(where.get("params", {}), dict):
        raise SpecError(f"{key}.params: expected a table")
    reqs = where.get("requests")
    if isinstance(reqs, list) and (not reqs or not all(isinstance(r, str) for r in reqs) or len(set(reqs)) < len(reqs)):
        raise SpecError(f"{key}.requests: expected a request-set name or a list of distinct names, got {reqs!r}")
    matched = select(spec_cases, where)
    if not matched:
        raise SpecError(f"{key}: matches no case of the grid")
    for r in _sets(where) if "requests" in where else []:
        if not any(c["requests"] == r for c in matched):
            raise SpecError(f"{key}.requests: no case of the grid on request set {r!r}")
    per_set = len(matched) / (len(_sets(where)) if isinstance(reqs, list) else 1)
    if exactly_one and (per_set != 1 or len({c["requests"] for c in matched}) != len(matched)):
        raise SpecError(f"{key}: matches {len(matched)} cases of the grid; name one"
                        + (" per request set" if isinstance(reqs, list) else "") + " (add requests, layer or params)")
    return where


def parse_findings(items: Any, spec_cases: list[dict]) -> tuple[Finding, ...]:
    """`[[findings]]` of an analysis spec, checked against its grid (`spec_cases`: Case.key dicts)."""
    if items is None:
        return ()
    if not isinstance(items, list):
        raise SpecError("findings: expected a list of tables ([[findings]])")
    out, ids = [], set()
    for i, t in enumerate(items):
        key = f"findings[{i}]"
        if not isinstance(t, dict):
            raise SpecError(f"{key}: expected a table")
        unknown = sorted(set(t) - _KEYS)
        if unknown:
            raise SpecError(f"{key}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_KEYS))})")
        for req in ("claim", "metric", "where"):
            if req not in t:
                raise SpecError(f"{key}.{req}: missing")
        if not isinstance(t["metric"], str) or not t["metric"]:
            raise SpecError(f"{key}.metric: expected a summary key such as 'edit.efficacy.after'")
        tests = [x for x in TESTS if x in t]
        if len(tests) != 1:
            raise SpecError(f"{key}: give exactly one test of {', '.join(TESTS)} (got {', '.join(tests) or 'none'})")
        test = tests[0]
        value = t[test]
        where = _check_where(t["where"], spec_cases, f"{key}.where", exactly_one=test != "across")
        if test in ("at_least", "at_most") and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise SpecError(f"{key}.{test}: expected a number")
        if test == "than":
            value = _check_where(value, spec_cases, f"{key}.than", exactly_one=True)
        if test == "than_metric" and not isinstance(value, str):
            raise SpecError(f"{key}.than_metric: expected a summary key")
        if test == "by_exposure" and value is not True:
            raise SpecError(f"{key}.by_exposure: expected true")
        if test == "across":
            if value != "layer":
                raise SpecError(f"{key}.across: only 'layer' is supported, got {value!r}")
            if len({json.dumps(c["layer"]) for c in select(spec_cases, where)}) < 2:
                raise SpecError(f"{key}.where: across = 'layer' needs cases at two or more layers")
        direction = t.get("direction", "greater")
        if direction not in ("greater", "less"):
            raise SpecError(f"{key}.direction: must be 'greater' or 'less', got {direction!r}")
        margin = t.get("margin", 0.0)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin < 0:
            raise SpecError(f"{key}.margin: expected a number >= 0")
        fid = str(t.get("id", f"F{i + 1}"))
        if fid in ids:
            raise SpecError(f"{key}.id: duplicate finding id {fid!r}")
        ids.add(fid)
        out.append(Finding(fid, str(t["claim"]), str(t.get("source", "")), t["metric"], where, test, value,
                           direction, float(margin)))
    return tuple(out)


# ---- per-unit values of a case ---------------------------------------------------------------
def _walk(node: Any, parts: list[str]) -> Any:
    for p in parts:
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return node


def _is_metric(node: Any) -> bool:
    return isinstance(node, dict) and "value_by_index" in node


def _per_item(card: dict, metric: str) -> tuple[dict[str, float] | None, list | None]:
    """(per-item values, stored interval) of a summary key inside one scorecard."""
    parts = metric.split(".")
    node = _walk(card, parts)
    if _is_metric(node):
        return node["value_by_index"], None
    if len(parts) >= 3 and parts[-1] in TAGS:  # forget-style rows: the per-item table lives under the tag
        swapped = _walk(card, [parts[0], parts[-1], *parts[1:-1]])
        if _is_metric(swapped):
            return swapped["value_by_index"], None
        by_fact = _walk(card, [*parts[:-2], parts[-1], "by_fact"])  # probes: one value per forget fact
        if _is_metric(by_fact):
            return by_fact["value_by_index"], None
        row = _walk(card, parts[:-1])
        if isinstance(row, dict) and isinstance(row.get("ci95"), dict):
            return None, row["ci95"].get(parts[-1])
    return None, None


def adversarial_per_fact(card: dict, tag: str) -> dict[str, float] | None:
    """Adversarial recall per forget fact: the mean over the trained families it has a probe in. The
    scorecard's headline is the mean over families of per-family means (a synonym probe exists only
    for facts with an alias); this per-fact view makes one unit per fact, as every other figure."""
    from mechedit.diagnose.s_leftover import UNTRAINED_FAMILIES

    fams = ((card.get("leftover") or {}).get("adversarial") or {}).get("families")
    if not fams:
        return None
    acc: dict[str, list[float]] = {}
    for fam, d in fams.items():
        if fam in UNTRAINED_FAMILIES or tag not in d:
            continue
        for k, v in d[tag]["recall"]["value_by_index"].items():
            if v is not None:
                acc.setdefault(str(k), []).append(float(v))
    return {k: sum(v) / len(v) for k, v in acc.items()} or None


def _grouped(values: dict[str, float | None]) -> dict[str, float]:
    """Item ids "unit:template" -> one value per unit (mean over its templates)."""
    acc: dict[str, list[float]] = {}
    for k, v in values.items():
        if v is not None and np.isfinite(v):
            acc.setdefault(str(k).split(":")[0], []).append(float(v))
    return {k: float(np.mean(v)) for k, v in acc.items()}


@dataclass
class Units:
    """Per-unit values of one metric in one case, with each unit's fact exposure when known."""

    values: dict[str, float]
    exposure: dict[str, int]
    stored_ci: list | None = None
    scalar: float | None = None
    n: int | None = None  # units behind a stored interval


def units(case: dict, metric: str, world=None) -> Units:
    per = case.get("per_edit") or []
    if len(per) > 1:  # "each": one edit per request; the unit is the request
        vals, expo = {}, {}
        for i, e in enumerate(per):
            v = e["summary"].get(metric)
            if v is not None and np.isfinite(v):
                vals[str(i)] = float(v)
                if world is not None and e["requests"]:
                    r = e["requests"][0]
                    expo[str(i)] = world.fact(r["subject"], r["relation"]).exposure
        return Units(vals, expo)
    card = (per[0].get("scorecard") or {}) if per else {}
    items, ci = _per_item(card, metric)
    if items is None and metric.startswith("leftover.adversarial.recall.") and len(per) == 1:
        items = adversarial_per_fact(card, metric.rsplit(".", 1)[1])
    scalar = case["summary"].get(metric)
    if items is None:  # a figure over the whole set (an AUC, a mean of family means): n = its requests (facts)
        return Units({}, {}, ci, scalar, case.get("n_requests"))
    vals = _grouped(items)
    expo: dict[str, int] = {}
    if world is not None:
        parts = metric.split(".")
        by_request = parts[0] == "edit" and len(parts) > 1 and parts[1] in REQUEST_ITEMS
        reqs = per[0]["requests"]
        for u in vals:
            if by_request:
                r = reqs[int(u)]
                expo[u] = world.fact(r["subject"], r["relation"]).exposure
            elif u.isdigit() and int(u) < len(world.facts):
                expo[u] = world.facts[int(u)].exposure
    return Units(vals, expo, None, scalar)


def pooled(chosen: list[dict], metric: str, world=None) -> Units:
    """Units of one metric over the cases of one selector: one case as is, several (the same method on
    independent request sets) pooled, each unit keyed by its request set. A figure without per-unit
    values pools the sets' figures weighted by their n, its interval from the stored ones (normal
    approximation)."""
    if len(chosen) == 1:
        return units(chosen[0], metric, world)
    parts = [(c["requests"], units(c, metric, world)) for c in chosen]
    if all(u.values for _, u in parts):
        return Units({f"{r}/{k}": v for r, u in parts for k, v in u.values.items()},
                     {f"{r}/{k}": e for r, u in parts for k, e in u.exposure.items()})
    known = [u for _, u in parts if u.scalar is not None]
    if len(known) < len(parts):
        return Units({}, {})
    n = np.array([u.n or 1 for u in known], float)
    w = n / n.sum()
    mean = float(np.dot(w, [u.scalar for u in known]))
    ci = None
    if all(u.stored_ci for u in known):
        se = float(np.sqrt(np.sum((w * [(u.stored_ci[1] - u.stored_ci[0]) / 3.92 for u in known]) ** 2)))
        ci = [mean - 1.96 * se, mean + 1.96 * se]
    return Units({}, {}, ci, mean, int(n.sum()))


def _missing(chosen: list[dict], where: dict) -> str | None:
    """Why a selector's cases are not all in the run yet (None when they are)."""
    if not chosen:
        return "the case is not in the run yet"
    if isinstance(where.get("requests"), list) and len({c["requests"] for c in chosen}) < len(where["requests"]):
        return f"{len({c['requests'] for c in chosen})} of its {len(where['requests'])} request sets are in the run yet"
    return None


# ---- intervals -------------------------------------------------------------------------------
def _boot_mean(v: np.ndarray, seed: int = 0) -> tuple[float, float] | None:
    if len(v) == 0:
        return None
    rng = np.random.default_rng(seed)
    m = v[rng.integers(0, len(v), size=(N_BOOT, len(v)))].mean(1)
    return float(np.percentile(m, 2.5)), float(np.percentile(m, 97.5))


def _boot_diff(a: np.ndarray, b: np.ndarray, seed: int = 0) -> tuple[float, float] | None:
    if len(a) == 0 or len(b) == 0:
        return None
    rng = np.random.default_rng(seed)
    ma = a[rng.integers(0, len(a), size=(N_BOOT, len(a)))].mean(1)
    mb = b[rng.integers(0, len(b), size=(N_BOOT, len(b)))].mean(1)
    d = ma - mb
    return float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))


def summarize(u: Units) -> dict:
    """{"mean", "ci95", "n"} of a metric's units (or its scalar and stored interval)."""
    if u.values:
        v = np.array(list(u.values.values()))
        return {"mean": float(v.mean()), "ci95": _boot_mean(v), "n": len(v)}
    if u.scalar is None:
        return {"mean": None, "ci95": None, "n": 0}
    return {"mean": u.scalar, "ci95": list(u.stored_ci) if u.stored_ci else None, "n": u.n or 1}


def _diff(ua: Units, ub: Units, paired: bool) -> dict:
    """Mean of a minus b with its interval and n (paired per unit when both sides share units)."""
    common = sorted(set(ua.values) & set(ub.values))
    if paired and common:
        d = np.array([ua.values[k] - ub.values[k] for k in common])
        return {"mean": float(d.mean()), "ci95": _boot_mean(d), "n": len(d), "paired": True}
    if ua.values and ub.values:
        a, b = np.array(list(ua.values.values())), np.array(list(ub.values.values()))
        return {"mean": float(a.mean() - b.mean()), "ci95": _boot_diff(a, b), "n": [len(a), len(b)], "paired": False}
    sa, sb = summarize(ua), summarize(ub)
    if sa["mean"] is None or sb["mean"] is None:
        return {"mean": None, "ci95": None, "n": 0}
    mean = sa["mean"] - sb["mean"]
    if sa["ci95"] and sb["ci95"]:  # normal approximation from the two stored 95% intervals
        se = np.hypot((sa["ci95"][1] - sa["ci95"][0]) / 3.92, (sb["ci95"][1] - sb["ci95"][0]) / 3.92)
        return {"mean": mean, "ci95": (mean - 1.96 * se, mean + 1.96 * se), "n": [sa["n"], sb["n"]], "paired": False}
    return {"mean": mean, "ci95": None, "n": [sa["n"], sb["n"]]}


def _verdict_threshold(s: dict, thr: float, above: bool) -> str:
    ci = s["ci95"]
    if ci is None:
        return "inconclusive"
    lo, hi = ci
    if above:
        return "holds" if lo >= thr else "fails" if hi < thr else "inconclusive"
    return "holds" if hi <= thr else "fails" if lo > thr else "inconclusive"


def _verdict_diff(d: dict, direction: str, margin: float) -> str:
    ci = d.get("ci95")
    if ci is None:
        return "inconclusive"
    lo, hi = ci if direction == "greater" else (-ci[1], -ci[0])
    return "holds" if lo > margin else "fails" if hi < margin else "inconclusive"


def _label(case: dict | list[dict]) -> str:
    """"method @ layer (params) on SET", the sets joined by + when several are pooled."""
    group = case if isinstance(case, list) else [case]
    case = group[0]
    params = ", ".join(f"{k}={v}" for k, v in sorted(case["params"].items()))
    layer = "" if case.get("layer") is None else f" @ layer {case.get('layer_used', case['layer'])}"
    return f"{case['method']}{layer} ({params or 'defaults'}) on {' + '.join(c['requests'] for c in group)}"


def evaluate(f: Finding, cases: list[dict], world=None) -> dict:
    """The finding's measured numbers (mean, ci95, n per side and of the difference) and its verdict."""
    row: dict = {"id": f.id, "claim": f.claim, "source": f.source, "metric": f.metric, "test": f.test,
                 "direction": f.direction, "verdict": "inconclusive", "measured": [], "note": ""}
    chosen = select(cases, f.where)
    why = _missing(chosen, f.where)
    if why:
        row["verdict"], row["note"] = "not run", why
        return row
    if f.test in ("at_least", "at_most"):
        s = summarize(pooled(chosen, f.metric, world))
        row["measured"].append({"label": _label(chosen), **s})
        row["threshold"] = f.value
        row["verdict"] = _verdict_threshold(s, float(f.value), f.test == "at_least")
        if s["n"] == 0:
            row["note"] = f"metric {f.metric} is not in the case"
        return row
    if f.test == "across":
        return _across(f, chosen, row, world)
    a = chosen
    ua = pooled(a, f.metric, world)
    if f.test == "than":
        b = select(cases, f.value)
        why = _missing(b, f.value)
        if why:
            row["verdict"], row["note"] = "not run", f"compared with: {why}"
            return row
        ub = pooled(b, f.metric, world)
        labels = (_label(a), _label(b))
        shape = lambda g: sorted((c["requests"], len(c["per_edit"])) for c in g)  # noqa: E731
        d = _diff(ua, ub, paired=shape(a) == shape(b))  # the same requests on both sides: per-unit differences
    elif f.test == "than_metric":
        ub = pooled(a, f.value, world)
        labels = (f"{_label(a)}: {f.metric}", f"{f.value}")
        d = _diff(ua, ub, paired=True)
    else:  # by_exposure
        levels = sorted(set(ua.exposure.values()))
        if len(levels) < 2:
            row["note"] = "one exposure level among the measured facts (world option exposure)"
            return row
        hi_, lo_ = levels[-1], levels[0]
        ua, ub = (Units({k: v for k, v in ua.values.items() if ua.exposure.get(k) == lvl}, {}) for lvl in (hi_, lo_))
        labels = (f"{_label(a)}: facts seen {hi_}x", f"facts seen {lo_}x")
        d = _diff(ua, ub, paired=False)
    row["measured"] += [{"label": labels[0], **summarize(ua)}, {"label": labels[1], **summarize(ub)}]
    row["difference"] = d
    row["verdict"] = _verdict_diff(d, f.direction, f.margin)
    return row


def _across(f: Finding, chosen: list[dict], row: dict, world) -> dict:
    """Best minus worst layer: chosen on the even units, measured (paired) on the odd ones."""
    groups: dict[str, list[dict]] = {}
    for c in chosen:
        groups.setdefault(json.dumps(c.get("layer_used", c["layer"])), []).append(c)
    per_layer = {lay: pooled(g, f.metric, world) for lay, g in groups.items()}
    common = sorted(set.intersection(*(set(u.values) for u in per_layer.values())), key=lambda k: (len(k), k))
    select_on, measure_on = common[0::2], common[1::2]
    if len(per_layer) < 2 or not measure_on:
        row["note"] = "too few shared units to choose and measure layers on separate halves"
        return row
    means = {lay: np.mean([u.values[k] for k in select_on]) for lay, u in per_layer.items()}
    best = max(means, key=means.get)
    worst = min((lay for lay in means if lay != best), key=means.get)
    ub, uw = per_layer[best], per_layer[worst]
    held = lambda u: Units({k: u.values[k] for k in measure_on}, {})  # noqa: E731
    for lay, u in per_layer.items():
        row["measured"].append({"label": f"layer {lay} (all units)", **summarize(u)})
    row["difference"] = {**_diff(held(ub), held(uw), paired=True),
                         "label": f"layer {best} minus layer {worst} (chosen on {len(select_on)} units, "
                                  f"measured on the other {len(measure_on)})"}
    row["verdict"] = _verdict_diff(row["difference"], "greater", f.margin)
    return row


def evaluate_all(findings: list[dict] | None, spec_cases: list[dict], cases: list[dict], world=None) -> list[dict]:
    """Evaluate findings given as spec tables (as stored in the run's spec.json) on the run's finished
    cases; `spec_cases` is the run's whole case list (a finding on an unfinished case is inconclusive)."""
    parsed = parse_findings(list(findings), spec_cases) if findings else ()
    return [evaluate(f, cases, world) for f in parsed]
