"""The report's "Does localization inform editing?" section (Hase et al. 2023; `mechedit.analysis.hase`).

Needs a run whose trace covers the edited facts (`[trace] requests = "SET"`) and one method edited,
one request at a time, at two or more integer layers on that set (analyses/hase.toml). Tracing
effect TE[f, l]: the indirect effect at the fact's last subject token of the hidden state h_l
("resid", Hase et al.'s main measure), of the MLP window and of the attention window around l.
Success S[f, l]: the rewrite score of the edit made at layer l (suite "rewrite"), also P(new) -
P(old) and efficacy (suite "edit") when present.
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mechedit.analysis.hase import hase_table  # noqa: E402
from mechedit.plotting import save_figure  # noqa: E402
from mechedit.trace.result import CATEGORIES, TraceResult  # noqa: E402

SUCCESS = (("rewrite.rewrite_score", "rewrite score"), ("rewrite.prob_margin", "P(new) − P(old)"),
           ("edit.efficacy.after", "efficacy"))
TE_KINDS = (("resid", "hidden state h_l"), ("mlp", "MLP window"), ("attn", "attention window"))


def hase_groups(cases: list[dict]) -> dict[tuple, dict[int, dict]]:
    """(method, params, request set) -> {layer: case} for single-request counterfactual cases at int layers."""
    groups: dict[tuple, dict[int, dict]] = {}
    for c in cases:
        if c.get("request_kind") == "counterfactual" and c.get("mode") == "each" and isinstance(c.get("layer_used"), int):
            key = (c["method"], json.dumps(c["params"], sort_keys=True), c["requests"])
            groups.setdefault(key, {}).setdefault(c["layer_used"], c)
    return {k: v for k, v in groups.items() if len(v) >= 2}


def hase_arrays(result: TraceResult, by_layer: dict[int, dict], metric: str, kind: str):
    """(te, success) [F, L] over the traced facts that were edited; NaN where a cell is missing."""
    rows = {(d["subject"], d["relation"]): i for i, d in enumerate(result.facts)}
    te_all = result.category_effects(kind)[:, CATEGORIES.index("last_subject"), :]  # [F_trace, L]
    facts = sorted({(r["subject"], r["relation"]) for c in by_layer.values() for e in c["per_edit"]
                    for r in e["requests"]} & set(rows))
    L = result.n_layers
    te = np.full((len(facts), L), np.nan)
    s = np.full((len(facts), L), np.nan)
    pos = {f: i for i, f in enumerate(facts)}
    for layer, c in by_layer.items():
        for e in c["per_edit"]:
            if len(e["requests"]) != 1:
                continue
            key = (e["requests"][0]["subject"], e["requests"][0]["relation"])
            v = e["summary"].get(metric)
            if key in pos and v is not None:
                s[pos[key], layer] = v
                te[pos[key], layer] = te_all[rows[key], layer]
    return te, s


def hase_section(run_dir: Path, cases: list[dict], figdir: Path, img) -> list[dict] | None:
    """One block per (method, params, request set) group; None when the run has no such group."""
    tdir = Path(run_dir) / "trace"
    groups = hase_groups(cases)
    if not groups or not (tdir / "trace.json").is_file():
        return None
    result = TraceResult.load(tdir)
    if result.n_facts == 0:
        return None
    out = []
    for gi, ((method, params, req), by_layer) in enumerate(groups.items()):
        rows, main = [], None
        for metric, mname in SUCCESS:
            for kind, kname in TE_KINDS:
                if kind not in result.kinds:
                    continue
                te, s = hase_arrays(result, by_layer, metric, kind)
                if not np.any(~np.isnan(s)):
                    continue
                t = hase_table(te, s)
                rows.append({"success": mname, "te": kname, **_fmt_table(t)})
                if main is None:
                    main = (mname, kname, t, te, s)
        if main is None:
            continue
        mname, kname, t, te, s = main
        fig_path = _scatter(te, s, figdir / f"hase_{gi}.png", f"{method} on '{req}': {mname} vs tracing effect ({kname})",
                            mname, kname)
        out.append({"title": f"{method} — {req} — {params}", "n_facts": t["n_facts"], "layers": sorted(by_layer),
                    "rows": rows, "main": {"success": mname, "te": kname},
                    "by_layer": [{"layer": b["layer"], "n": b["n"], "mean_te": _f(b["mean_te"]),
                                  "mean_success": _f(b["mean_success"]), "r": _f(b["r"]),
                                  "ci": f"[{_f(b['r_ci95'][0])}, {_f(b['r_ci95'][1])}]"} for b in t["by_layer"]],
                    "best": f"{_f(t['best_is_traced'])} of {t['n_best']} facts (chance {_f(t['chance'])})",
                    "img": img(fig_path)})
    return out or None


def _f(x) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:.3f}"


def _fmt_table(t: dict) -> dict:
    r2 = t["r2"]
    return {"layer": _f(r2["layer"]), "te_only": _f(r2["te"]), "layer_te": _f(r2["layer_te"]),
            "layer_x_te": _f(r2["layer_x_te"]), "gain": _f(t["gain"]),
            "gain_ci": f"[{_f(t['gain_ci95'][0])}, {_f(t['gain_ci95'][1])}]", "n": t["n_facts"]}


def _scatter(te: np.ndarray, s: np.ndarray, path: Path, title: str, ylabel: str, xlabel: str) -> Path:
    fig, ax = plt.subplots(figsize=(6.2, 3.8))
    for l in range(te.shape[1]):
        ok = ~np.isnan(te[:, l]) & ~np.isnan(s[:, l])
        if ok.any():
            ax.scatter(te[ok, l], s[ok, l], s=12, alpha=0.6, label=f"layer {l}")
    ax.set_xlabel(f"tracing effect at the last subject token ({xlabel})")
    ax.set_ylabel(f"edit success ({ylabel})")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)
