"""Report figures (matplotlib, Agg backend): training curve, scores against layer, probe curves."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from mechedit.plotting import save_figure  # noqa: E402


def training_curve(curve: list[dict], path: Path) -> Path | None:
    if not curve:
        return None
    ep = [r["epoch"] for r in curve]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(ep, [r["cloze"] for r in curve], marker="o", label="cloze recall (trained templates)")
    ax.plot(ep, [r["paraphrase"] for r in curve], marker="s", label="held-out paraphrase recall")
    ax.set_xlabel("epoch")
    ax.set_ylabel("recall")
    ax.set_ylim(0, 1.02)
    ax2 = ax.twinx()
    ax2.plot(ep, [r["loss"] for r in curve], color="grey", ls="--", label="training loss")
    ax2.set_ylabel("loss")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="center right", fontsize=8)
    ax.set_title("Training curve")
    return save_figure(fig, path)


def scores_vs_layer(layers: list[int], series: dict[str, list[float]], ie: list[float] | None, path: Path,
                    title: str, notes: dict[int, str] | None = None) -> Path:
    """Edit scores at each edited layer (left axis) next to the trace's indirect effect (right axis);
    `notes` marks layers whose scores mean something else (an edit that cannot work there)."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for name, vals in series.items():
        ax.plot(layers, vals, marker="o", label=name)
    ax.set_xlabel("edited layer")
    ax.set_ylabel("score")
    ax.set_xticks(layers)
    for layer, text in (notes or {}).items():
        ax.annotate(text, (layer, 0.0), xytext=(0, 12), textcoords="offset points", ha="center", fontsize=7,
                    color="tab:red", arrowprops={"arrowstyle": "->", "color": "tab:red", "lw": 0.8})
    if ie is not None:
        ax2 = ax.twinx()
        ax2.bar(np.arange(len(ie)), ie, alpha=0.2, color="tab:purple", label="trace IE (MLP, last subject token)")
        ax2.set_ylabel("indirect effect")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="best")
    else:
        ax.legend(fontsize=7)
    ax.set_title(title)
    return save_figure(fig, path)


def line_plot(x: list, series: dict[str, list[float]], path: Path, *, xlabel: str, ylabel: str, title: str,
              diagonal: bool = False, hline: tuple[float, str] | None = None, styles: dict[str, dict] | None = None,
              integer_x: bool = False) -> Path:
    """Lines (a value list over `x`, or an (x, y) tuple per series); `hline` = (y, label) draws a
    reference level (chance); `styles` per series name (colour, line style, marker)."""
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for name, ys in series.items():
        style = {"marker": "." if not diagonal else None, **((styles or {}).get(name, {}))}
        ax.plot(x if not isinstance(ys, tuple) else ys[0], ys if not isinstance(ys, tuple) else ys[1], label=name, **style)
    if diagonal:
        ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    if hline is not None:
        ax.axhline(hline[0], color="grey", ls="--", lw=1, label=hline[1])
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def roc_panels(panels: dict[str, dict[str, tuple[list, list]]], path: Path, *, styles: dict[str, dict] | None = None,
               title: str = "") -> Path:
    """One ROC panel per span ({span: {series: (fpr, tpr)}}), the chance diagonal in each."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 4.0), squeeze=False)
    for ax, (span, series) in zip(axes[0], panels.items()):
        for name, (fpr, tpr) in series.items():
            ax.plot(fpr, tpr, label=name, **((styles or {}).get(name, {})))
        ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(span, fontsize=9)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def bar_plot(labels: list[str], series: dict[str, list[float]], path: Path, *, ylabel: str, title: str,
             styles: dict[str, dict] | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(7.0, 3.6))
    n = max(1, len(series))
    width = 0.8 / n
    x = np.arange(len(labels))
    for i, (name, vals) in enumerate(series.items()):
        ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=name, **((styles or {}).get(name, {})))
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("adversarial family")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return save_figure(fig, path)
