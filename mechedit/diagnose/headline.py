"""Headline numbers of a scorecard, in words: what every command prints last, and the report's case list.

A scorecard's numbers are flattened to {"suite.metric.field": value} (`mechedit.analysis.cases.flatten`).
Each headline figure names the keys it reads, several where the scorecard schema has had more than
one name for it; beside the value after the edit it shows its references where the scorecard has
them: the model retrained without the forget facts ("retrained", the target of unlearning) and the
original model ("before").
"""
from __future__ import annotations

import math
from typing import Any

# (label, {"after" | "retrained" | "before": candidate keys, first present wins})
EDIT_FIGURES = (
    ("efficacy", {"after": ("edit.efficacy.after",), "before": ("edit.efficacy.before",)}),
    ("paraphrase", {"after": ("edit.paraphrase.after",)}),
    ("Δ same relation", {"after": ("edit.same_relation.change",)}),
    ("Δ same subject", {"after": ("edit.same_subject.change",)}),
    ("Δ unrelated", {"after": ("edit.unrelated.change",)}),
)
FORGET_FIGURES = (
    ("forget recall (cloze)", {"after": ("forget.forget.cloze.after",), "retrained": ("forget.forget.cloze.retrained",),
                               "before": ("forget.forget.cloze.before",)}),
    ("retain recall", {"after": ("forget.retain.cloze.after",), "before": ("forget.retain.cloze.before",)}),
    ("adversarial recall", {"after": ("leftover.adversarial.recall.after", "leftover.adversarial.recall_after"),
                            "retrained": ("leftover.adversarial.recall.retrained",)}),
    ("MIA AUC (Min-K%++)", {"after": ("leftover.mia.answer.auc_vs_nonmembers.min_k_pp.after",
                                      "leftover.mia.auc_vs_nonmembers.min_k_pp.after"),
                            "retrained": ("leftover.mia.answer.auc_vs_nonmembers.min_k_pp.retrained",),
                            "before": ("leftover.mia.answer.auc_vs_nonmembers.min_k_pp.before",
                                       "leftover.mia.auc_vs_nonmembers.min_k_pp.before")}),
    ("probe accuracy", {"after": ("leftover.probes.accuracy.after", "leftover.probes.best_accuracy_after"),
                        "retrained": ("leftover.probes.accuracy.retrained",),
                        "before": ("leftover.probes.accuracy.before", "leftover.probes.best_accuracy_before")}),
    ("relearning recovery", {"after": ("relearn.recovery",), "retrained": ("relearn.recovery_retrained",)}),
    ("forget quality (KS p)", {"after": ("forget_quality.ks_pvalue",)}),
)

SHATTERING_FIGURES = (
    ("R(D*)", {"after": ("shattering.R",)}),
    ("R of the other entities", {"after": ("shattering.R_others",)}),
    ("ring-ness", {"after": ("shattering.ringness_after",), "before": ("shattering.ringness_before",)}),
    ("other ring facts recall", {"after": ("shattering.accuracy.ring_direct.after",),
                                 "before": ("shattering.accuracy.ring_direct.before",)}),
)


def _first(summary: dict[str, Any], keys: tuple[str, ...]) -> float | None:
    for k in keys:
        v = summary.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    return None


def headline(summary: dict[str, Any]) -> list[dict]:
    """[{label, after, retrained, before}] for the headline figures present in a flattened summary."""
    out = []
    for label, keys in EDIT_FIGURES + FORGET_FIGURES + SHATTERING_FIGURES:
        row = {ref: _first(summary, ks) for ref, ks in keys.items()}
        if row.get("after") is not None:
            out.append({"label": label, **row})
    return out


def headline_text(summary: dict[str, Any]) -> str:
    """"efficacy 0.967 (before 0.000), paraphrase 0.880, ..." ("no headline figures" when none)."""
    parts = []
    for row in headline(summary):
        refs = [f"{ref} {row[ref]:.3f}" for ref in ("retrained", "before") if row.get(ref) is not None]
        parts.append(f"{row['label']} {row['after']:.3f}" + (f" ({', '.join(refs)})" if refs else ""))
    return ", ".join(parts) or "no headline figures"


def card_headline(card: dict) -> str:
    """`headline_text` of a scorecard (nested dict)."""
    from mechedit.analysis.cases import flatten

    return headline_text(flatten({k: v for k, v in card.items() if not k.startswith("_")}))


def case_title(record: dict) -> str:
    """A case of a run in words: "rome at layer traced (0) on 'single', steps=10"."""
    layer, used = record.get("layer"), record.get("layer_used")
    where = ("" if layer is None else f" at layer {layer}" + (f" ({used})" if used is not None and used != layer else ""))
    params = ", ".join(f"{k}={v}" for k, v in sorted((record.get("params") or {}).items()))
    return f"{record['method']}{where} on '{record['requests']}'" + (f", {params}" if params else "")
