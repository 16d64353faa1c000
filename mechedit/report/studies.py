"""Report sections of a study: the findings table (claim, numbers, verdict) and scores split by exposure."""
from __future__ import annotations

from mechedit.analysis.findings import Units, evaluate_all, summarize, units

# (summary key, title): split by fact exposure when the case has per-fact values
EXPOSURE_METRICS = (
    ("edit.efficacy.after", "efficacy"),
    ("edit.paraphrase.after", "paraphrase"),
    ("edit.qa.after", "QA"),
    ("forget.forget.cloze.after", "forget cloze"),
    ("forget.forget.paraphrase.after", "forget paraphrase"),
    ("forget.forget.qa.after", "forget QA"),
    ("forget.forget.cloze.retrained", "forget cloze, retrained"),
)


def _interval(s: dict) -> str:
    if s.get("mean") is None:
        return "–"
    ci = s.get("ci95")
    text = f"{s['mean']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else " (no interval)")
    n = s.get("n")
    return text + (f", n={n}" if not isinstance(n, list) else f", n={n[0]}/{n[1]}")


def findings_table(spec: dict, cases: list[dict], world) -> list[dict]:
    """Rows for the report: claim, source, the measured numbers as text, the difference, the verdict."""
    rows = []
    spec_cases = spec.get("cases", [])
    for r in evaluate_all((spec.get("spec") or {}).get("findings"), spec_cases, cases, world):
        measured = [f"{m['label']}: {_interval(m)}" for m in r["measured"]]
        if "threshold" in r:
            measured.append(f"threshold {'≥' if r['test'] == 'at_least' else '≤'} {r['threshold']}")
        diff = r.get("difference")
        rows.append({**r, "measured_text": measured,
                     "difference_text": (diff.get("label", "difference") + ": " + _interval(diff)
                                         + (" (paired)" if diff.get("paired") else "")) if diff else ""})
    return rows


def verdict_counts(rows: list[dict]) -> dict[str, int]:
    out = {"holds": 0, "fails": 0, "inconclusive": 0}
    for r in rows:
        out[r["verdict"]] += 1
    return out


def exposure_tables(cases: list[dict], world) -> dict | None:
    """Per case, its per-fact metrics by exposure level (mean [95% CI], n); None for a uniform world."""
    if world is None or len(world.exposure_levels()) < 2:
        return None
    levels = sorted(world.exposure_levels())
    rows = []
    for c in cases:
        for key, title in EXPOSURE_METRICS:
            if key not in c["summary"]:
                continue
            u = units(c, key, world)
            if not u.exposure:
                continue
            cells = []
            for lvl in levels:
                sub = Units({k: v for k, v in u.values.items() if u.exposure.get(k) == lvl}, {})
                cells.append(_interval(summarize(sub)) if sub.values else "–")
            rows.append({"case": c["id"], "method": c["method"], "requests": c["requests"], "metric": title,
                         "cells": cells})
    return {"levels": levels, "rows": rows, "counts": world.exposure_levels()}
