"""`build_report`: a self-contained HTML report of a run folder (figures embedded as data URIs).

Sections: the spec; the world and model with the training curve; causal-trace heatmaps (average,
per relation, per fact) with the located layers; per method family a sortable table of scorecard
columns; scores against the edited layer next to the trace's indirect effect; unlearning sections
(forget table, probe curves, ROC curves, adversarial recall) when the run has them; a per-case
drill-down with prompts and top predictions before and after. Figures are also written as PNG files
beside index.html.
"""
from __future__ import annotations

import base64
import json
import math
import shutil
from pathlib import Path

import numpy as np
from jinja2 import Environment, PackageLoader, select_autoescape

from mechedit.errors import MecheditError
from mechedit.fileio import check_output_dir, output_dir, read_json, write_text_atomic
from mechedit.report import figures as F
from mechedit.report.shattering import shattering_section

# (summary key, column title): shown when present, in this order
EDIT_COLUMNS = (
    ("edit.efficacy.after", "efficacy"),
    ("edit.prob_new_gt_old.after", "P(new)>P(old)"),
    ("edit.paraphrase.after", "paraphrase"),
    ("edit.qa.after", "QA"),
    ("edit.same_relation.change", "Δ same relation"),
    ("edit.same_new_value.change", "Δ had new value"),
    ("edit.same_subject.change", "Δ same subject"),
    ("edit.unrelated.change", "Δ unrelated"),
    ("edit.implied_follows.after", "implied follows"),
    ("edit.implied_kept.change", "Δ implied kept"),
    ("edit.retain_perplexity.change", "Δ retain ppl"),
)
FORGET_COLUMNS = (
    ("forget.forget.cloze.after", "forget cloze"),
    ("forget.forget.paraphrase.after", "forget paraphrase"),
    ("forget.forget.qa.after", "forget QA"),
    ("leftover.adversarial.recall_after", "adversarial recall"),
    ("forget.neighbours_relation.cloze.after", "neighbours (relation)"),
    ("forget.neighbours_subject.cloze.after", "neighbours (subject)"),
    ("forget.retain.cloze.after", "retain"),
    ("leftover.mia.auc_vs_nonmembers.loss.after", "MIA AUC (LOSS)"),
    ("leftover.mia.auc_vs_nonmembers.min_k_pp.after", "MIA AUC (Min-K%++)"),
    ("leftover.probes.best_accuracy_after", "probe acc (best layer)"),
    ("relearn.recovery", "relearning recovery"),
    ("forget_quality.ks_pvalue", "forget quality"),
)


def _img(path: Path | None) -> str | None:
    if path is None or not Path(path).is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def load_run(run_dir: Path) -> tuple[dict, list[dict]]:
    from mechedit.analysis.folder import read_run

    return read_run(run_dir)


def _columns(cases: list[dict]) -> list[tuple[str, str]]:
    keys = {k for c in cases for k in c["summary"]}
    cols = [(k, t) for k, t in EDIT_COLUMNS + FORGET_COLUMNS if k in keys]
    if not cols:  # a suite we do not know: its first numbers
        cols = [(k, k) for k in sorted(keys)[:10]]
    return cols


def _layer_label(c: dict) -> str:
    if c["layer"] == "traced":
        return f"traced ({c.get('layer_used')})"
    return "default" if c["layer"] is None else str(c["layer"])


def _family_tables(cases: list[dict]) -> list[dict]:
    fams: dict[str, list[dict]] = {}
    for c in cases:
        fams.setdefault(c["method"], []).append(c)
    out = []
    for method, cs in fams.items():
        cols = _columns(cs)
        rows = []
        for c in sorted(cs, key=lambda c: (c["requests"], json.dumps(c["params"], sort_keys=True), str(c.get("layer_used")))):
            params = ", ".join(f"{k}={v}" for k, v in sorted(c["params"].items())) or "defaults"
            cells = [c["id"], _layer_label(c), params, f"{c['requests']} ({c['mode']}, {c['n_requests']})"]
            nums = [c["summary"].get(k) for k, _ in cols]
            edit_s = c.get("timings", {}).get("edit_s")
            rows.append({"cells": cells, "nums": [(_fmt(v), v if v is not None else "") for v in nums],
                         "time": _fmt(edit_s / max(1, len(c["per_edit"]))) if edit_s is not None else "–"})
        out.append({"method": method, "columns": [t for _, t in cols], "rows": rows})
    return out


def _layer_sweeps(cases: list[dict], ie: list[float] | None, figdir: Path) -> list[dict]:
    """Methods edited at several integer layers with the same params and requests: scores vs layer."""
    groups: dict[tuple, list[dict]] = {}
    for c in cases:
        if isinstance(c.get("layer_used"), int) and c["request_kind"] == "counterfactual":
            key = (c["method"], json.dumps(c["params"], sort_keys=True), c["requests"])
            groups.setdefault(key, []).append(c)
    out = []
    for (method, params, req), cs in groups.items():
        by_layer = {}
        for c in cs:
            by_layer.setdefault(c["layer_used"], c)
        if len(by_layer) < 2:
            continue
        layers = sorted(by_layer)
        series = {}
        for key, name in (("edit.efficacy.after", "efficacy"), ("edit.paraphrase.after", "paraphrase"),
                          ("edit.same_relation.after", "same-relation accuracy")):
            if all(key in by_layer[l]["summary"] for l in layers):
                series[name] = [by_layer[l]["summary"][key] for l in layers]
        if not series:
            continue
        name = f"layers_{method}_{req}_{len(out)}.png"
        F.scores_vs_layer(layers, series, ie, figdir / name, f"{method} on '{req}': scores by edited layer")
        corr = None
        if ie is not None and "efficacy" in series and len(layers) > 2:
            x = np.array([ie[l] for l in layers], dtype=float)
            y = np.array(series["efficacy"], dtype=float)
            if np.std(x) > 0 and np.std(y) > 0:
                corr = float(np.corrcoef(x, y)[0, 1])
        out.append({"title": f"{method} — {req} — {params}", "img": _img(figdir / name), "corr": _fmt(corr)})
    return out


def _drilldowns(cases: list[dict]) -> list[dict]:
    out = []
    for c in cases:
        rows = []
        for e in c["per_edit"]:
            for d in e.get("drilldown", []):
                rows.append({**d, "before_s": ", ".join(f"{w} {p:.2f}" for w, p in d.get("before", [])),
                             "after_s": ", ".join(f"{w} {p:.2f}" for w, p in d.get("after", []))})
        metrics = [(k, _fmt(v)) for k, v in sorted(c["summary"].items())]
        out.append({"id": c["id"], "method": c["method"], "layer": _layer_label(c), "params": c["params"],
                    "requests": c["requests"], "rows": rows, "metrics": metrics,
                    "info": json.dumps(c["per_edit"][0].get("info", {}) if c["per_edit"] else {}, indent=1)[:3000]})
    return out


def _unlearning(cases: list[dict], figdir: Path) -> dict | None:
    """Figures from the leftover suite of forget cases: probe curves, ROC curves, adversarial recall."""
    fc = [c for c in cases if c["request_kind"] == "forget"]
    if not fc:
        return None
    probe_series, roc_series, adv = {}, {}, {}
    for c in fc:
        card = (c["per_edit"][0].get("scorecard") or {}) if c["per_edit"] else {}
        lo = card.get("leftover") or {}
        probes = lo.get("probes") or {}
        for pos in ("last_subject", "last"):
            pa = probes.get(f"{pos}_accuracy_by_layer_after") or probes.get("accuracy_by_layer_after")
            if isinstance(pa, list):
                probe_series[f"{c['method']} ({pos})"] = pa
        pb = probes.get("accuracy_by_layer_before")
        if isinstance(pb, list):
            probe_series.setdefault("original model", pb)
        roc = (lo.get("mia") or {}).get("roc_after") or {}
        if isinstance(roc, dict) and "fpr" in roc and "tpr" in roc:
            roc_series[c["method"]] = (roc["fpr"], roc["tpr"])
        fam = (lo.get("adversarial") or {}).get("by_family") or {}
        if isinstance(fam, dict) and fam:
            adv[c["method"]] = {k: (v.get("after") if isinstance(v, dict) else v) for k, v in fam.items()}
    out = {"table": None, "figures": []}
    if probe_series:
        n = max(len(v) for v in probe_series.values())
        F.line_plot(list(range(n)), {k: v for k, v in probe_series.items() if len(v) == n}, figdir / "probes.png",
                    xlabel="layer", ylabel="probe accuracy on forgotten facts", title="Linear probes by layer")
        out["figures"].append(("Linear probes: is the old object still decodable?", _img(figdir / "probes.png")))
    if roc_series:
        F.line_plot([], roc_series, figdir / "roc.png", xlabel="false positive rate", ylabel="true positive rate",
                    title="Membership inference ROC (forget members vs non-members)", diagonal=True)
        out["figures"].append(("Membership inference ROC", _img(figdir / "roc.png")))
    if adv:
        fams = sorted({f for v in adv.values() for f in v})
        F.bar_plot(fams, {m: [float(v.get(f) or 0.0) for f in fams] for m, v in adv.items()}, figdir / "adversarial.png",
                   ylabel="recall of the forgotten object", title="Adversarial probes by family")
        out["figures"].append(("Adversarial recall by family", _img(figdir / "adversarial.png")))
    return out


def build_report(run_dir: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """Write `out/index.html` (+ figures/) for run folder `run_dir`; returns the index path."""
    import mechedit

    run_dir = Path(run_dir)
    check_output_dir(out, force)
    spec, cases = load_run(run_dir)
    with output_dir(out, force) as tmp:
        _write_report(tmp, run_dir, spec, cases)
    return Path(out) / "index.html"


def _write_report(tmp: Path, run_dir: Path, spec: dict, cases: list[dict]) -> None:
    """Render the report of `run_dir` into the temporary folder `tmp`."""
    import mechedit

    figdir = tmp / "figures"
    figdir.mkdir()
    ckpt = Path(spec["checkpoint"])
    meta = read_json(ckpt / "mechedit.json", "mechedit.json") if (ckpt / "mechedit.json").is_file() else {}
    world = None
    if (ckpt / "world.json").is_file():
        from mechedit.world.world import World

        world = World.load(ckpt).summary()
    curve_img = _img(F.training_curve(meta.get("curve", []), figdir / "training_curve.png"))
    # trace
    trace = None
    ie = None
    tdir = run_dir / "trace"
    if (tdir / "summary.json").is_file():
        summary = read_json(tdir / "summary.json", "trace summary")
        figs = []
        for p in sorted((tdir / "figures").glob("*.png")):
            shutil.copy(p, figdir / f"trace_{p.name}")
            figs.append((p.stem.replace("_", " "), _img(p)))
        overall = summary.get("overall", {})
        mlp_last = (overall.get("mlp") or {}).get("last_subject", {}).get("mean")
        ie = [v if v is not None else 0.0 for v in mlp_last] if mlp_last else None
        te = overall.get("total_effect", {})
        trace = {"figures": figs, "located": spec.get("located") or {}, "n_facts": summary.get("n_facts"),
                 "n_skipped": summary.get("n_skipped"), "noise_scale": _fmt(summary.get("noise_scale")),
                 "total_effect": _fmt(te.get("mean")), "te_ci": _fmt(te.get("ci95")),
                 "p_clean": _fmt(overall.get("p_clean")), "p_corrupt": _fmt(overall.get("p_corrupt"))}
    final = (meta.get("final_recall") or {})
    recall_rows = []
    for split in ("trained", "heldout_subjects"):
        for k, v in ((final.get(split) or {}).get("by_kind") or {}).items():
            recall_rows.append((split, k, _fmt(v)))
    env = Environment(loader=PackageLoader("mechedit.report", "templates"), autoescape=select_autoescape(["html"]))
    html = env.get_template("report.html").render(
        name=spec.get("name", run_dir.name), description=(spec.get("spec") or {}).get("description", ""),
        version=spec.get("mechedit_version"), git=spec.get("git"), report_version=mechedit.__version__,
        spec_json=json.dumps(spec.get("spec"), indent=2), world=world, model=meta.get("model_spec"),
        train={"seconds": meta.get("train_seconds"), "epochs": meta.get("epochs")}, recall_rows=recall_rows,
        curve_img=curve_img, trace=trace, families=_family_tables(cases),
        sweeps=_layer_sweeps(cases, ie, figdir), unlearning=_unlearning(cases, figdir),
        shattering=shattering_section(cases, figdir, _img),
        drilldowns=_drilldowns(cases), n_cases=len(cases), n_total=len(spec.get("cases", [])),
        request_sets={k: len(v["requests"]) for k, v in spec.get("request_sets", {}).items()})
    write_text_atomic(tmp / "index.html", html)
