"""Intervals for diagnostics: seeded percentile bootstraps of a mean and of a ROC AUC.

Every interval here is a 95% percentile bootstrap (Efron & Tibshirani 1993) over the items a figure
averages: facts for recall, probe accuracy and relearning (one value per fact), and for a ROC AUC
members and non-members resampled separately (stratified, so both classes keep their sizes). The
resampled statistic is always the reported one (`bootstrap_mean_of_means`: a mean over groups of
per-group means, as the adversarial recall averages families). Seeded: the same values give the
same interval.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import rankdata

N_BOOT = 1000


def auc_from_scores(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney U / n1 n0, ties counted half) of members (label 1) vs non-members."""
    members, nonmembers = np.asarray(members, float), np.asarray(nonmembers, float)
    n1, n0 = len(members), len(nonmembers)
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(np.r_[members, nonmembers])
    return float((r[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def bootstrap_auc(members: np.ndarray, nonmembers: np.ndarray, n_boot: int = N_BOOT,
                  seed: int = 0) -> tuple[float, float] | None:
    """95% interval of the AUC, resampling members and non-members separately; None if a side is empty."""
    members, nonmembers = np.asarray(members, float), np.asarray(nonmembers, float)
    n1, n0 = len(members), len(nonmembers)
    if n1 == 0 or n0 == 0:
        return None
    rng = np.random.default_rng(seed)
    i1 = rng.integers(0, n1, size=(n_boot, n1))
    i0 = rng.integers(0, n0, size=(n_boot, n0))
    both = np.concatenate([members[i1], nonmembers[i0]], axis=1)  # [boot, n1 + n0]
    ranks = rankdata(both, axis=1)
    aucs = (ranks[:, :n1].sum(1) - n1 * (n1 + 1) / 2) / (n1 * n0)
    lo, hi = np.percentile(aucs, [2.5, 97.5])
    return float(lo), float(hi)


def bootstrap_mean(values, n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float] | None:
    """95% interval of the mean of per-item values (NaN/None dropped); None when there are none."""
    v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return None
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def mean_of_means(table: np.ndarray) -> float:
    """Mean over columns of each column's mean over rows, ignoring NaN ([items, groups])."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(np.nanmean(table, axis=0)))


def bootstrap_mean_of_means(table: np.ndarray, n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float] | None:
    """95% interval of `mean_of_means(table)` resampling the rows (items); NaN = an item without a
    value in that group. None when the table is empty."""
    table = np.asarray(table, float)
    if table.size == 0 or np.all(np.isnan(table)):
        return None
    rng = np.random.default_rng(seed)
    sample = table[rng.integers(0, len(table), size=(n_boot, len(table)))]  # [boot, items, groups]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        stats = np.nanmean(np.nanmean(sample, axis=1), axis=1)
    lo, hi = np.nanpercentile(stats, [2.5, 97.5])
    return float(lo), float(hi)
