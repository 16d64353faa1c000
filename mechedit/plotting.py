"""Figure output shared by tracing heatmaps and report figures (matplotlib, Agg backend).

`save_figure` also moves every legend out of the plotting area: the legends of all axes become one
legend below the figure (each label once), so a legend never hides a point, a bar or a line.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mechedit.faults import crash_point  # noqa: E402


def _legend_below(fig) -> float:
    """Replace the axes' legends by one figure legend below the axes; returns the share of the
    (enlarged) figure height the legend takes (0 when there was no legend)."""
    handles, labels, size = [], [], 8.0
    for ax in fig.axes:
        leg = ax.get_legend()
        if leg is None:
            continue
        texts = leg.get_texts()
        size = texts[0].get_fontsize() if texts else size
        for h, t in zip(leg.legend_handles, texts):
            if t.get_text() not in labels:
                handles.append(h)
                labels.append(t.get_text())
        leg.remove()
    if not labels:
        return 0.0
    w, h = fig.get_size_inches()
    longest = max(len(x) for x in labels) * size * 0.55 / 72 + 0.5  # inches per entry (marker + text)
    ncol = max(1, min(len(labels), int(w // longest)))
    rows = math.ceil(len(labels) / ncol)
    extra = rows * size * 1.5 / 72 + 0.2
    fig.set_size_inches(w, h + extra)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=size, frameon=False)
    return extra / (h + extra)


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Lay out (legends below the axes, long titles wrapped), write as PNG and close `fig`."""
    path = Path(path)
    for ax in fig.axes:  # a title longer than its panel wraps instead of being cut off
        ax.title.set_wrap(True)
    bottom = _legend_below(fig)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    crash_point("figure")
    return path
