"""Causal-trace heatmaps in ROME's three panels (state, MLP, attention): tokens x layers.

Per fact: rows are the prompt's tokens (subject tokens starred), columns layers, colour the
restored p(o*) as in ROME's Fig. 1. Averaged: rows are the six token categories, colour the mean
indirect effect (ROME's Fig. 2). Written with matplotlib's Agg backend (no display needed).

Sized to be read at 100% zoom: at most `MAX_WIDTH_IN` inches wide (1,100 px at the 110 dpi of
`save_figure`, the width of the report's column), panels side by side sharing the row labels (written
once, on the first panel), every text at least `FONT` points (about 14 px).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402

from mechedit.plotting import save_figure  # noqa: E402
from mechedit.trace.result import CATEGORIES, CATEGORY_LABELS, TraceResult, mean_ci  # noqa: E402

MAX_WIDTH_IN = 10.0
FONT = 10

PANEL = {"resid": ("single restored layer (state)", "Purples"), "mlp": ("restored MLP window", "Greens"),
         "attn": ("restored attention window", "Reds"), "resid_sever_mlp": ("state, later MLPs severed", "Purples"),
         "resid_sever_attn": ("state, later attention severed", "Purples")}


def _panels(result: TraceResult) -> list[str]:
    return [k for k in ("resid", "mlp", "attn", "resid_sever_mlp", "resid_sever_attn") if k in result.kinds]


def _layout(n_panels: int, n_rows: int, label_width: float) -> tuple[float, float, list[float]]:
    """Figure width and height (inches) and panel width ratios: panels as wide as fit in
    MAX_WIDTH_IN after the row labels, rows 0.3 in each."""
    width = min(MAX_WIDTH_IN, label_width + 2.9 * n_panels)
    return width, 0.3 * n_rows + 1.5, [1.0] * n_panels


def _heatmap(ax, data, *, cmap, vmin=None, vmax=None, xticks, yticks, cbar_label: str, title: str) -> None:
    sns.heatmap(data, ax=ax, cmap=cmap, vmin=vmin, vmax=vmax, xticklabels=xticks, yticklabels=yticks,
                cbar_kws={"label": cbar_label, "shrink": 0.9})
    ax.set_title(title, fontsize=FONT)
    ax.set_xlabel("layer", fontsize=FONT)
    ax.tick_params(axis="both", labelsize=FONT)
    ax.tick_params(axis="y", rotation=0)
    cbar = ax.collections[0].colorbar
    cbar.ax.tick_params(labelsize=FONT - 1)
    cbar.set_label(cbar_label, fontsize=FONT - 1)


def _label_width(labels: list[str]) -> float:
    return max(len(x) for x in labels) * FONT * 0.6 / 72 + 0.3


def plot_fact(result: TraceResult, row: int, path: str | Path) -> Path:
    """Heatmaps of p_restored(o*) for fact row `row` of `result`, one panel per traced kind."""
    d = result.facts[row]
    n_tok = len(d["tokens"])
    a, b = d["subject_span"]
    labels = [f"{t}*" if a <= i < b else t for i, t in enumerate(d["tokens"])]
    kinds = _panels(result)
    w, h, ratios = _layout(len(kinds), n_tok, _label_width(labels))
    fig, axes = plt.subplots(1, len(kinds), figsize=(w, h), squeeze=False, gridspec_kw={"width_ratios": ratios})
    for i, (ax, k) in enumerate(zip(axes[0], kinds)):
        title, cmap = PANEL[k]
        _heatmap(ax, result.p_restored[k][row, :, :n_tok].T, cmap=cmap, vmin=float(result.p_corrupt[row]),
                 vmax=max(float(result.p_clean[row]), float(result.p_corrupt[row]) + 1e-6),
                 xticks=list(range(result.n_layers)), yticks=labels if i == 0 else False,
                 cbar_label=f"p({d['object']})", title=title)
    fig.suptitle(f"{d['prompt']} → {d['object']}   (p clean {result.p_clean[row]:.3f}, corrupted "
                 f"{result.p_corrupt[row]:.3f}; * = subject token)", fontsize=FONT)
    return save_figure(fig, path)


def plot_average(result: TraceResult, path: str | Path, rows: np.ndarray | None = None, title: str = "") -> Path:
    """Mean indirect effect by token category and layer over `rows` (default: all facts); `title`
    names the facts ("'capital'")."""
    rows = np.arange(result.n_facts) if rows is None else rows
    kinds = _panels(result)
    labels = [CATEGORY_LABELS[c] for c in CATEGORIES]
    w, h, ratios = _layout(len(kinds), len(CATEGORIES), _label_width(labels))
    fig, axes = plt.subplots(1, len(kinds), figsize=(w, h), squeeze=False, gridspec_kw={"width_ratios": ratios})
    for i, (ax, k) in enumerate(zip(axes[0], kinds)):
        ce = result.category_effects(k)[rows]  # [n, C, L]
        mean, _, _ = mean_ci(ce)
        name, cmap = PANEL[k]
        _heatmap(ax, mean, cmap=cmap, xticks=list(range(result.n_layers)), yticks=labels if i == 0 else False,
                 cbar_label="mean IE", title=name)
    te = result.total_effect[rows]
    what = f"{title} facts" if title else "facts"
    fig.suptitle(f"Mean indirect effect over {len(rows)} {what} (mean total effect {np.mean(te):.3f}, "
                 f"noise ν {result.noise_scale:.3g})", fontsize=FONT)
    return save_figure(fig, path)
