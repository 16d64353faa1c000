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
    ("leftover.probes.accuracy.after", "probe accuracy (old object decodable)"),
    ("leftover.probes.accuracy.retrained", "probe accuracy, retrained"),
    ("leftover.adversarial.recall.after", "adversarial recall (per fact, mean over its families)"),
    ("leftover.adversarial.recall.retrained", "adversarial recall, retrained"),
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
    out = {"holds": 0, "fails": 0, "inconclusive": 0, "not run": 0}
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


def trace_by_exposure(run_dir, world) -> dict | None:
    """Where facts of each exposure level are recalled: mean indirect effect per layer at the last
    subject token (MLP and attention; 95% interval, n facts) and the layer where it peaks."""
    from pathlib import Path

    import numpy as np

    from mechedit.trace.result import CATEGORIES, TraceResult

    tdir = Path(run_dir) / "trace"
    if world is None or len(world.exposure_levels()) < 2 or not (tdir / "trace.json").is_file():
        return None
    res = TraceResult.load(tdir)
    expo = np.array([world.facts[d["index"]].exposure for d in res.facts])
    cat = CATEGORIES.index("last_subject")
    rows = []
    for kind in res.kinds:
        if kind not in ("mlp", "attn"):
            continue
        ce = res.category_effects(kind)[:, cat, :]  # [facts, layers]
        for lvl in sorted(set(expo.tolist())):
            x = ce[expo == lvl]
            n = len(x)
            m = np.nanmean(x, 0)
            ci = 1.96 * np.nanstd(x, 0, ddof=1) / np.sqrt(n) if n > 1 else np.zeros_like(m)
            rows.append({"site": kind, "exposure": lvl, "n": n, "peak": int(np.nanargmax(m)),
                         "cells": [f"{a:.3f} ± {b:.3f}" for a, b in zip(m, ci)]})
    return {"layers": list(range(res.n_layers)), "rows": rows}


def findings_markdown(spec: dict, cases: list[dict], world) -> str:
    """The findings table of a loaded run as Markdown (`mechedit report` writes it as findings.md)."""
    lines = [f"{spec.get('name')}: {len(cases)} of {len(spec.get('cases', []))} cases finished", "",
             "| id | claim | measured | difference | verdict |", "|---|---|---|---|---|"]
    for r in findings_table(spec, cases, world):
        cell = lambda t: t.replace("|", "/")  # noqa: E731
        lines.append(f"| {r['id']} | {cell(r['claim'])} | {cell('; '.join(r['measured_text']))} | "
                     f"{cell(r['difference_text'])} | **{r['verdict']}**{' (' + r['note'] + ')' if r['note'] else ''} |")
    return "\n".join(lines) + "\n"
