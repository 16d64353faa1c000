"""The report's representation-shattering section: tables and figures from `mechedit.analysis.shattering`.

Figures: R against the edit's cyclic distance per method (means with 95% bootstrap intervals, the
null floor as a band); the entities in 2-D (PCA and Isomap) before and after a representative edit at
each distance (the edit with the median R among the representative method's edits at that distance);
each accuracy drop against R; the displacement of each entity by its cyclic distance from the edited
one; ring-ness and R at every layer. The section also writes
`shattering.json` (every number of the tables) beside index.html.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mechedit.analysis.shattering import GROUP_TITLES, GROUPS, _fmt, edit_rows, summarise  # noqa: E402
from mechedit.fileio import write_json_atomic  # noqa: E402
from mechedit.plotting import save_figure  # noqa: E402


def _r_vs_d(s: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7.0, 5.2))
    for i, m in enumerate(s["by_method"]):
        t = m["table"]
        d = np.array([r["d"] for r in t], float) + (i - len(s["by_method"]) / 2) * 0.03
        mean = np.array([r["R"] for r in t])
        err = np.array([[r["R"] - r["R_lo"] for r in t], [r["R_hi"] - r["R"] for r in t]])
        ax.errorbar(d, mean, yerr=err, marker="o", ms=4, capsize=2, label=m["method"])
    nf = s.get("null_floor")
    if nf:
        ax.axhspan(nf["R_lo"], nf["R_hi"], color="grey", alpha=0.2, label="null floor (d = 0, all methods, 95% CI)")
        ax.axhline(nf["R"], color="grey", ls="--", lw=1)
    ax.set_xlabel("cyclic distance d of the new object from the true one")
    ax.set_ylabel("R(D*) = ||D* - D0|| / ||D0||")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Representation shattering by edit distance (layer {s.get('layer')})")
    ax.legend(fontsize=6.5, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    return save_figure(fig, path)


def _ring_panel(ax, xy, positions, edited: int | None, title: str) -> None:
    xy = np.asarray(xy)
    n = len(positions)
    order = np.argsort(positions)
    loop = np.append(order, order[0])
    ax.plot(xy[loop, 0], xy[loop, 1], color="grey", lw=0.7, zorder=1)
    ax.scatter(xy[:, 0], xy[:, 1], c=np.asarray(positions) / n, cmap="hsv", vmin=0, vmax=1, s=22, zorder=2)
    if edited is not None:
        ax.scatter([xy[edited, 0]], [xy[edited, 1]], marker="*", s=140, facecolor="none", edgecolor="k", zorder=3)
    ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])


def _rings(rows: list[dict], method: str, path: Path) -> Path | None:
    """Rows of panels, one per distance: PCA before / after, Isomap before / after, of the median-R edit."""
    mr = [r for r in rows if r["method"] == method and r["kind"] == "edit" and r["kept"] and r["d"] is not None]
    ds = sorted({r["d"] for r in mr})
    if not ds:
        return None
    fig, axes = plt.subplots(len(ds), 4, figsize=(8.4, 2.05 * len(ds)), squeeze=False)
    for row, d in zip(axes, ds):
        cand = sorted((r for r in mr if r["d"] == d), key=lambda r: r["R"])
        k = cand[(len(cand) - 1) // 2]["kept"]
        e = k["edited"][0]
        ring = e["ring"] if e["ring"] in k["positions"] else sorted(k["positions"])[0]
        pos = k["positions"][ring]
        R = cand[(len(cand) - 1) // 2]["R"]
        for ax, key, title in zip(row, ("pca_before", "pca_after", "isomap_before", "isomap_after"),
                                  ("PCA before", "PCA after", "Isomap before", "Isomap after")):
            if key in k:
                _ring_panel(ax, k[key], pos, e["entity"], f"d = {d:g} · {title}" + (f" · R = {R:.3g}" if "after" in key else ""))
            else:
                ax.axis("off")
    fig.suptitle(f"{method}: entities at layer {k['layer_labels'][k['layer_index']]}, coloured by position on "
                 f"{ring} (star: edited subject)", fontsize=8)
    return save_figure(fig, path)


def _drop_vs_r(rows: list[dict], s: dict, path: Path) -> Path | None:
    groups = [g for g in GROUPS if g in s["costs"]]
    if not groups:
        return None
    fig, axes = plt.subplots(1, len(groups), figsize=(3.1 * len(groups), 3.1), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in rows if r["kind"] == "edit"))
    colours = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    for ax, g in zip(axes[0], groups):
        for m in methods:
            pts = [(r["R"], r["drop"][g]) for r in rows if r["kind"] == "edit" and r["method"] == m and g in r["drop"]]
            if pts:
                x, y = zip(*pts)
                ax.scatter(x, y, s=9, color=colours[m], label=m, alpha=0.8)
        c = s["costs"][g]
        ax.set_xscale("symlog", linthresh=1e-3)
        ax.set_title(f"{GROUP_TITLES[g]}\nr² = {_fmt(c['r2'])} [{_fmt(c['r2_lo'])}, {_fmt(c['r2_hi'])}], n = {c['n']}",
                     fontsize=7.5)
        ax.set_xlabel("R")
        ax.set_ylabel("accuracy drop (before − after)")
    axes[0][0].legend(fontsize=5.5)
    return save_figure(fig, path)


def _displacement(s: dict, path: Path) -> Path | None:
    series = {m["method"]: m["displacement"] for m in s["by_method"] if m.get("displacement")}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for name, disp in series.items():
        ks = sorted(int(k) for k in disp)
        ax.plot(ks, [disp[str(k)] for k in ks], marker=".", label=name)
    ax.set_xlabel("cyclic distance of the entity from the edited entity")
    ax.set_ylabel("||h* − h0|| / mean(D0)")
    ax.set_title("Which entities move? (single edits, d ≥ 1)", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=5.5)
    return save_figure(fig, path)


def _layers(rows: list[dict], path: Path) -> Path | None:
    kept = [r for r in rows if r["kept"]]
    if not kept:
        return None
    k0 = kept[0]["kept"]
    labels = k0["layer_labels"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8.4, 3.2))
    rb = k0["ringness_before_by_layer"]
    a1.plot(labels, rb["joint"], marker="o", color="k", label="joint (all orders)")
    for ring, v in rb["by_order"].items():
        a1.plot(labels, v, marker=".", ls=":", label=ring)
    if k0.get("ringness_selection_by_layer"):
        a1.plot(labels, k0["ringness_selection_by_layer"], marker="s", ls="--", color="tab:red",
                label="joint, selection prompts")
    a1.axvline(k0["layer_index"], color="grey", lw=0.8)
    a1.set_xlabel("layer (embed = token embedding; l = output of block l)")
    a1.set_ylabel("Spearman ring-ness before editing")
    a1.set_title("Is the ring there? (original model)", fontsize=8)
    a1.legend(fontsize=6)
    for m in dict.fromkeys(r["method"] for r in kept):
        v = np.array([r["kept"]["R_by_layer"] for r in kept
                      if r["method"] == m and (r["kind"] == "unlearn" or (r["d"] or 0) >= 1)])
        if len(v):
            a2.plot(labels, v.mean(0), marker=".", label=m)
    a2.set_ylim(bottom=0)
    a2.set_xlabel("layer")
    a2.set_ylabel("mean R (d >= 1; unlearning: all)")
    a2.set_title("R at every layer", fontsize=8)
    a2.legend(fontsize=5.5, loc="upper left")
    return save_figure(fig, path)


def shattering_section(cases: list[dict], figdir: Path, img) -> dict | None:
    """Everything the template's shattering block shows (None when no case ran the shattering suite).

    `img(path)` turns a figure file into what the template embeds (a data URI).
    """
    s = summarise(cases)
    if s is None:
        return None
    rows = edit_rows(cases)
    write_json_atomic(figdir.parent / "shattering.json", s)
    figures = []
    if s["by_method"]:
        figures.append(("R against the cyclic distance of the edit (95% bootstrap intervals); grey: null floor",
                        img(_r_vs_d(s, figdir / "shattering_r_vs_d.png"))))
    edit_methods = [m["method"] for m in s["by_method"]]
    rep = next((m for m in edit_methods if m.startswith("rome")), edit_methods[0] if edit_methods else None)
    if rep is not None:
        p = _rings(rows, rep, figdir / "shattering_rings.png")
        if p:
            figures.append((f"The entities in 2-D before and after the median-R {rep} edit at each distance", img(p)))
    p = _drop_vs_r(rows, s, figdir / "shattering_drop_vs_r.png")
    if p:
        figures.append(("Accuracy drop against R, one point per edit call", img(p)))
    p = _displacement(s, figdir / "shattering_displacement.png")
    if p:
        figures.append(("Displacement of each entity by its cyclic distance from the edited one (0: the edited "
                        "entity itself)", img(p)))
    p = _layers(rows, figdir / "shattering_layers.png")
    if p:
        figures.append(("Ring-ness before editing and R after it, at every layer (vertical line: the layer used)", img(p)))
    table = []
    for m in s["by_method"]:
        for t in m["table"]:
            table.append({"method": m["method"], "d": f"{t['d']:g}", "n": t["n"],
                          "R": f"{_fmt(t['R'])} [{_fmt(t['R_lo'])}, {_fmt(t['R_hi'])}]",
                          "R_others": f"{_fmt(t['R_others'])} [{_fmt(t['R_others_lo'])}, {_fmt(t['R_others_hi'])}]",
                          "efficacy": _fmt(t["efficacy"]),
                          "drops": [_fmt(t["drop"].get(g)) for g in GROUPS]})
    trends = [{"method": m["method"], "rho": _fmt(m["trend"]["rho"]), "p": _fmt(m["trend"]["p"], 2),
               "n": m["trend"]["n"], "rho_others": _fmt(m["trend_others"]["rho"]),
               "p_others": _fmt(m["trend_others"]["p"], 2),
               "by_requests": "; ".join(f"{q}: {_fmt(v['rho'])} (p {_fmt(v['p'], 2)}, n {v['n']})"
                                        for q, v in m.get("trend_by_requests", {}).items()),
               "r2": (f"{_fmt(m['cost_ring_direct']['r2'])} [{_fmt(m['cost_ring_direct']['r2_lo'])}, "
                      f"{_fmt(m['cost_ring_direct']['r2_hi'])}]"), "n_cost": m["cost_ring_direct"]["n"]}
              for m in s["by_method"]]
    costs = [{"group": GROUP_TITLES[g], "r": f"{_fmt(c['r'])} [{_fmt(c['r_lo'])}, {_fmt(c['r_hi'])}]",
              "r2": f"{_fmt(c['r2'])} [{_fmt(c['r2_lo'])}, {_fmt(c['r2_hi'])}]", "p": _fmt(c["p"], 2), "n": c["n"]}
             for g, c in s["costs"].items()]
    unlearn = [{"method": u["method"], "n": u["n"], "R": f"{_fmt(u['R'])} [{_fmt(u['R_lo'])}, {_fmt(u['R_hi'])}]",
                "forgotten": _fmt(u["forgotten_recall"]), "drops": [_fmt(u["drop"].get(g)) for g in GROUPS]}
               for u in s["unlearning"]]
    nf = s["null_floor"]
    return {"layer": s["layer"], "ringness_before": _fmt(s["ringness_before"]), "n_rows": s["n_rows"],
            "accuracy_before": [(GROUP_TITLES[g], _fmt(s["accuracy_before"].get(g))) for g in GROUPS
                                if g in s["accuracy_before"]],
            "null_floor": f"{_fmt(nf['R'])} [{_fmt(nf['R_lo'])}, {_fmt(nf['R_hi'])}] (n = {s['n_null']})" if nf else "–",
            "group_titles": [GROUP_TITLES[g] for g in GROUPS], "table": table, "trends": trends,
            "trend_pooled": {k: _fmt(v, 3) if isinstance(v, float) else v for k, v in s["trend_pooled"].items()},
            "trend_others_pooled": {k: _fmt(v, 3) if isinstance(v, float) else v
                                    for k, v in s["trend_others_pooled"].items()},
            "costs": costs, "unlearning": unlearn, "claims": s["claims"], "figures": figures}
