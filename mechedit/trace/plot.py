"""Causal-trace heatmaps in ROME's three panels (state, MLP, attention): tokens x layers.

Per fact: rows are the prompt's tokens (subject tokens starred), columns layers, colour the
restored p(o*) as in ROME's Fig. 1. Averaged: rows are the six token categories, colour the mean
indirect effect (ROME's Fig. 2). Written with matplotlib's Agg backend (no display needed).
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

PANEL = {"resid": ("single restored layer (state)", "Purples"), "mlp": ("restored MLP window", "Greens"),
         "attn": ("restored attention window", "Reds"), "resid_sever_mlp": ("state, later MLPs severed", "Purples"),
         "resid_sever_attn": ("state, later attention severed", "Purples")}


def _panels(result: TraceResult) -> list[str]:
    return [k for k in ("resid", "mlp", "attn", "resid_sever_mlp", "resid_sever_attn") if k in result.kinds]


def plot_fact(result: TraceResult, row: int, path: str | Path) -> Path:
    """Heatmaps of p_restored(o*) for fact row `row` of `result`, one panel per traced kind."""
    d = result.facts[row]
    n_tok = len(d["tokens"])
    a, b = d["subject_span"]
    labels = [f"{t}*" if a <= i < b else t for i, t in enumerate(d["tokens"])]
    kinds = _panels(result)
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.2 * len(kinds) + 1, 0.35 * n_tok + 1.6), squeeze=False)
    for ax, k in zip(axes[0], kinds):
        title, cmap = PANEL[k]
        sns.heatmap(result.p_restored[k][row, :, :n_tok].T, ax=ax, cmap=cmap, vmin=float(result.p_corrupt[row]),
                    vmax=max(float(result.p_clean[row]), float(result.p_corrupt[row]) + 1e-6),
                    xticklabels=list(range(result.n_layers)), yticklabels=labels, cbar_kws={"label": f"p({d['object']})"})
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("layer")
        ax.tick_params(axis="y", rotation=0)
    fig.suptitle(f"{d['prompt']} -> {d['object']}  (p clean {result.p_clean[row]:.3f}, corrupted "
                 f"{result.p_corrupt[row]:.3f})", fontsize=9)
    return save_figure(fig, path)


def plot_average(result: TraceResult, path: str | Path, rows: np.ndarray | None = None, title: str = "") -> Path:
    """Mean indirect effect by token category and layer over `rows` (default: all facts)."""
    rows = np.arange(result.n_facts) if rows is None else rows
    kinds = _panels(result)
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.6 * len(kinds) + 1, 3.4), squeeze=False)
    for ax, k in zip(axes[0], kinds):
        ce = result.category_effects(k)[rows]  # [n, C, L]
        mean, _, _ = mean_ci(ce)
        name, cmap = PANEL[k]
        sns.heatmap(mean, ax=ax, cmap=cmap, xticklabels=list(range(result.n_layers)),
                    yticklabels=[CATEGORY_LABELS[c] for c in CATEGORIES], cbar_kws={"label": "mean IE"})
        ax.set_title(f"{name}", fontsize=9)
        ax.set_xlabel("layer")
        ax.tick_params(axis="y", rotation=0)
    te = result.total_effect[rows]
    fig.suptitle(f"{title or 'average'} over {len(rows)} facts: mean TE {np.mean(te):.3f}, noise nu "
                 f"{result.noise_scale:.3g}", fontsize=9)
    return save_figure(fig, path)
