"""Does localization inform editing? (Hase et al. 2023): edit success per layer against the tracing effect.

Hase, Bansal, Kim & Ghandeharioun (NeurIPS 2023) edit every fact at every layer and ask whether the
causal-tracing effect of that layer for that fact predicts the edit's success there. Per (fact f,
layer l) we have the tracing effect TE[f, l] (the indirect effect at the last subject token: of the
hidden state h_l, or of the MLP / attention window around l) and the success S[f, l] of the edit
made at layer l. Their analysis, which we follow:

  R^2 of S explained by the layer alone: OLS on a one-hot layer code (the per-layer means);
  R^2 of S explained by TE alone: OLS on [1, TE];
  R^2 of S explained by layer + TE: OLS on [one-hot layer, TE] (one slope shared by the layers);
  corr(TE, S) across facts within each layer (Pearson, 95% Fisher-z interval).

Localization informs editing to the extent that TE adds explained variance beyond the layer. We add:
the gain R^2(layer + TE) - R^2(layer) with a 95% bootstrap interval over facts (facts resampled with
all their layers, so a fact counts once), R^2 with a per-layer TE slope (layer x TE), and how often a
fact's best layer to edit is its traced layer (argmax_l TE) against chance 1/L.
"""
from __future__ import annotations

import numpy as np


def _r2(y: np.ndarray, X: np.ndarray) -> float:
    """R^2 of the least-squares fit of y on the columns of X (X must hold an intercept or a one-hot code)."""
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    res = y - X @ beta
    tot = y - y.mean()
    ss_tot = float(tot @ tot)
    return float(1.0 - (res @ res) / ss_tot) if ss_tot > 0 else float("nan")


def _design(layers: np.ndarray, te: np.ndarray, n_layers: int) -> dict[str, np.ndarray]:
    onehot = np.eye(n_layers)[layers]  # [rows, L]
    ones = np.ones((len(te), 1))
    return {"layer": onehot, "te": np.hstack([ones, te[:, None]]),
            "layer_te": np.hstack([onehot, te[:, None]]),
            "layer_x_te": np.hstack([onehot, onehot * te[:, None]])}


def r_squared(te: np.ndarray, success: np.ndarray) -> dict[str, float]:
    """R^2 of the four models over every defined (fact, layer) cell of te / success [F, L]."""
    te, success = np.asarray(te, float), np.asarray(success, float)
    f, l = np.nonzero(~np.isnan(te) & ~np.isnan(success))
    y = success[f, l]
    return {k: _r2(y, X) for k, X in _design(l, te[f, l], te.shape[1]).items()}


def pearson_ci(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, int]:
    """Pearson r with its 95% Fisher-z interval and n (NaN where undefined)."""
    ok = ~np.isnan(x) & ~np.isnan(y)
    x, y, n = x[ok], y[ok], int(ok.sum())
    if n < 3 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan"), float("nan"), float("nan"), n
    r = float(np.corrcoef(x, y)[0, 1])
    if n < 4 or abs(r) >= 1:
        return r, float("nan"), float("nan"), n
    z, se = np.arctanh(r), 1.0 / np.sqrt(n - 3)
    return r, float(np.tanh(z - 1.96 * se)), float(np.tanh(z + 1.96 * se)), n


def hase_table(te: np.ndarray, success: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """The analysis of the module docstring for tracing effects and successes [F, L] (NaN = missing).

    Returns {"n_facts", "n_layers", "r2": {layer, te, layer_te, layer_x_te}, "gain" (R^2(layer+TE) -
    R^2(layer)) with "gain_ci95" [lo, hi], "by_layer": [{layer, n, mean_te, mean_success, r, r_ci95}],
    "best_is_traced" (share of facts whose best edit layer is their traced layer) and "chance" (1/L)}.
    """
    te, success = np.asarray(te, float), np.asarray(success, float)
    F, L = te.shape
    r2 = r_squared(te, success)
    rng = np.random.default_rng(seed)
    gains = []
    for _ in range(n_boot):
        idx = rng.integers(0, F, size=F)
        b = r_squared(te[idx], success[idx])
        gains.append(b["layer_te"] - b["layer"])
    gains = np.array([g for g in gains if np.isfinite(g)])
    by_layer = []
    for l in range(L):
        r, lo, hi, n = pearson_ci(te[:, l], success[:, l])
        by_layer.append({"layer": l, "n": n, "mean_te": _nanmean(te[:, l]), "mean_success": _nanmean(success[:, l]),
                         "r": r, "r_ci95": [lo, hi]})
    full = ~np.isnan(te).any(1) & ~np.isnan(success).any(1)
    best_is_traced = (float(np.mean(np.argmax(te[full], 1) == np.argmax(success[full], 1)))
                      if full.any() else float("nan"))
    return {"n_facts": int((~np.isnan(success)).any(1).sum()), "n_layers": L, "r2": r2,
            "gain": r2["layer_te"] - r2["layer"],
            "gain_ci95": [float(np.percentile(gains, 2.5)), float(np.percentile(gains, 97.5))] if len(gains) else
            [float("nan"), float("nan")],
            "by_layer": by_layer, "best_is_traced": best_is_traced, "n_best": int(full.sum()), "chance": 1.0 / L}


def _nanmean(x: np.ndarray) -> float:
    return float(np.nanmean(x)) if np.any(~np.isnan(x)) else float("nan")
