"""`build_report`: a self-contained HTML report of a run folder (figures embedded as data URIs).

Sections: the spec; the world and model with the training curve; causal-trace heatmaps (average,
per relation when there are several, per fact) with the early and late site of each site kind; per method family a sortable table of scorecard
columns; scores against the edited layer next to the trace's indirect effect; unlearning sections
(forget table, probe curves, ROC curves, adversarial recall) when the run has them; a per-case
drill-down with prompts and top predictions before and after; "Does localization inform editing?"
(Hase et al. 2023, `hase_section`) when a method was edited at every layer on traced facts. Figures are also written as PNG files
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
from mechedit.report.hase_section import hase_section
from mechedit.report.shattering import shattering_section
from mechedit.report import studies as S

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
    ("edit.name_word_siblings.change", "Δ name-word siblings"),
    ("edit.last_word_siblings.change", "Δ last-word siblings"),
    ("edit.last_word_siblings_new.after", "last-word siblings → new"),
    ("edit.retain_perplexity.change", "Δ retain ppl"),
)
FORGET_COLUMNS = (  # each figure beside the model retrained without the forget facts (the target)
    ("forget.forget.cloze.after", "forget cloze"),
    ("forget.forget.cloze.retrained", "forget cloze, retrained"),
    ("forget.forget.paraphrase.after", "forget paraphrase"),
    ("forget.forget.qa.after", "forget QA"),
    ("leftover.adversarial.recall.after", "adversarial recall"),
    ("leftover.adversarial.recall.retrained", "adversarial, retrained"),
    ("forget.neighbours_relation.cloze.after", "neighbours (relation)"),
    ("forget.neighbours_subject.cloze.after", "neighbours (subject)"),
    ("forget.retain.cloze.after", "retain"),
    ("leftover.mia.answer.auc_vs_nonmembers.min_k_pp.after", "MIA AUC answer (Min-K%++)"),
    ("leftover.mia.answer.auc_vs_nonmembers.min_k_pp.retrained", "MIA answer, retrained"),
    ("leftover.mia.sentence.auc_vs_nonmembers.min_k_pp.after", "MIA AUC sentence (Min-K%++)"),
    ("leftover.mia.sentence.auc_vs_nonmembers.min_k_pp.retrained", "MIA sentence, retrained"),
    ("leftover.probes.accuracy.after", "probe acc"),
    ("leftover.probes.accuracy.retrained", "probe acc, retrained"),
    ("leftover.probes.chance", "probe chance"),
    ("relearn.recovery", "relearning recovery"),
    ("relearn.recovery_retrained", "relearning, retrained"),
    ("forget_quality.ks_pvalue", "forget quality (KS p)"),
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


def _text(v) -> str:
    """A value as report text, never a Python repr: numbers formatted, a list as "a, b", a mapping
    as "k v, k v", text as is."""
    if isinstance(v, dict):
        return ", ".join(f"{k} {_text(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return ", ".join(_text(x) for x in v)
    if isinstance(v, bool) or v is None:
        return {True: "yes", False: "no", None: "–"}[v]
    return _fmt(v)


def _case_note(c: dict) -> str:
    """The method's own note on what its figures mean (e.g. an edit that cannot work at that layer)."""
    notes = {e.get("info", {}).get("note") for e in c.get("per_edit", [])} - {None}
    return "; ".join(sorted(notes))


def _params_label(params: dict | str) -> str:
    """Parameters as "k=v, ..." ("default parameters" when none), never a Python/JSON repr."""
    if isinstance(params, str):
        params = json.loads(params)
    return ", ".join(f"{k}={_param_value(v)}" for k, v in sorted(params.items())) or "default parameters"


def _param_value(v) -> str:
    """A parameter as it is typed after -p: 0.1, 40, [0, 1], text (never a repr)."""
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_param_value(x) for x in v) + "]"
    if isinstance(v, (dict, bool)) or v is None:
        return _text(v)
    return str(v)


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
            params = _params_label(c["params"])
            cells = [c["id"], _layer_label(c), params, f"{c['requests']} ({c['mode']}, {c['n_requests']})"]
            nums = [c["summary"].get(k) for k, _ in cols]
            edit_s = c.get("timings", {}).get("edit_s")
            rows.append({"cells": cells, "nums": [(_fmt(v), v if v is not None else "") for v in nums],
                         "time": _fmt(edit_s / max(1, len(c["per_edit"]))) if edit_s is not None else "–",
                         "note": _case_note(c)})
        out.append({"method": method, "columns": [t for _, t in cols], "rows": rows,
                    "has_notes": any(r["note"] for r in rows)})
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
        notes = {l: "cannot work here (last block)" for l in layers if _case_note(by_layer[l])}
        F.scores_vs_layer(layers, series, ie, figdir / name, f"{method} on '{req}': scores by edited layer", notes)
        corr = None
        keep = [i for i, l in enumerate(layers) if l not in notes]  # r over the layers where an edit can work
        if ie is not None and "efficacy" in series and len(keep) > 2:
            x = np.array([ie[layers[i]] for i in keep], dtype=float)
            y = np.array([series["efficacy"][i] for i in keep], dtype=float)
            if np.std(x) > 0 and np.std(y) > 0:
                corr = float(np.corrcoef(x, y)[0, 1])
        reachable = [l for l in layers if l not in notes]
        out.append({"title": f"{method} — {req} — {_params_label(params)}", "img": _img(figdir / name),
                    "corr": _fmt(corr), "notes": sorted({_case_note(by_layer[l]) for l in notes}),
                    "corr_layers": ", ".join(map(str, reachable))})
    return out


def _drilldowns(cases: list[dict]) -> list[dict]:
    out = []
    for c in cases:
        rows = []
        for e in c["per_edit"]:
            for d in e.get("drilldown", []):
                rows.append({**d, "before_s": ", ".join(f"{w} {p:.2f}" for w, p in d.get("before", [])),
                             "after_s": ", ".join(f"{w} {p:.2f}" for w, p in d.get("after", []))})
        metrics = [(k, _fmt(int(v)) if k.rsplit(".", 1)[-1] in ("n", "n_requests") else _fmt(v))
                   for k, v in sorted(c["summary"].items())]
        out.append({"id": c["id"], "method": c["method"], "layer": _layer_label(c), "params": _params_label(c["params"]),
                    "requests": c["requests"], "rows": rows, "metrics": metrics,
                    "info": json.dumps(c["per_edit"][0].get("info", {}) if c["per_edit"] else {}, indent=1)[:3000]})
    return out


BASELINES = {"before": "original model", "retrained": "retrained without the facts"}
BASELINE_STYLES = {"original model": {"color": "black", "ls": "--"},
                   "retrained without the facts": {"color": "tab:green", "ls": "-.", "lw": 2}}


def _ordered(series: dict) -> dict:
    """The original model first, the methods, the retrained model last."""
    rank = lambda k: 0 if k.startswith(BASELINES["before"]) else 2 if k.startswith(BASELINES["retrained"]) else 1  # noqa: E731
    return {k: series[k] for k in sorted(series, key=rank)}


def _styles(names, bars: bool = False) -> dict[str, dict]:
    """Baseline series (by name prefix) drawn in their fixed styles; bars take the colour only."""
    out = {}
    for n in names:
        for b, st in BASELINE_STYLES.items():
            if n.startswith(b):
                out[n] = {"color": st["color"], "alpha": 0.6} if bars else st
    return out


def _unlearning(cases: list[dict], figdir: Path) -> dict | None:
    """Figures from the leftover suite of forget cases, each beside the original model and the model
    retrained without the forget facts: probe accuracy by layer, ROC curves (both spans), adversarial
    recall by family. Baselines come from the first case of each forget set (they do not depend on
    the method)."""
    fc = [c for c in cases if c["request_kind"] == "forget"]
    if not fc:
        return None
    probe_series, roc, adv, chance, notes = {}, {"sentence": {}, "answer": {}}, {}, None, []
    for c in fc:
        card = (c["per_edit"][0].get("scorecard") or {}) if c["per_edit"] else {}
        lo = card.get("leftover") or {}
        several = len({x["requests"] for x in fc}) > 1
        label = f"{c['method']} ({c['requests']})" if several else c["method"]
        baselines = {tag: f"{name} ({c['requests']})" if several else name for tag, name in BASELINES.items()}
        probes = lo.get("probes") or {}
        for tag, name in (("after", label), *baselines.items()):
            p = probes.get(tag)
            if not isinstance(p, dict) or not p.get("selected"):
                continue
            pos = p["selected"]["position"]
            curve = (p.get("cells") or {}).get(pos, {}).get("forget")
            if isinstance(curve, list):
                key = f"{name}: {pos.replace('_', ' ')} token"
                probe_series.setdefault(key, [v if v is not None else float("nan") for v in curve])
            chance = probes.get("chance", chance)
        mia = lo.get("mia") or {}
        for span in roc:
            pts = (mia.get("roc") or {}).get(span) or {}
            for tag, name in (("after", label), *baselines.items()):
                if isinstance(pts.get(tag), dict) and pts[tag].get("fpr"):
                    roc[span].setdefault(name, (pts[tag]["fpr"], pts[tag]["tpr"]))
        fam = (lo.get("adversarial") or {}).get("by_family") or {}
        for tag, name in (("after", label), *baselines.items()):
            vals = {k: v.get(tag) for k, v in fam.items() if isinstance(v, dict) and v.get(tag) is not None}
            if vals:
                adv.setdefault(name, vals)
        if lo and "retrained" not in (lo.get("adversarial") or {}).get("recall", {}):
            notes.append(f"{c['id']}: no retrained reference in its scorecard (suite option retrained = false)")
    out = {"figures": [], "notes": notes}
    probe_series, adv = _ordered(probe_series), _ordered(adv)
    roc = {span: _ordered(v) for span, v in roc.items()}
    if probe_series:
        n = max(len(v) for v in probe_series.values())
        F.line_plot(list(range(n)), {k: v for k, v in probe_series.items() if len(v) == n}, figdir / "probes.png",
                    xlabel="layer", ylabel="accuracy on the forget facts", title="Linear probes by layer",
                    hline=(chance, "chance") if chance is not None else None, styles=_styles(probe_series),
                    integer_x=True)
        out["figures"].append(("Linear probes (one per relation, fit on each model's own retained facts): accuracy "
                               "on the forgotten facts by layer, at the position each model chose on validation "
                               "subjects. Target: the retrained model's curve.", _img(figdir / "probes.png")))
    if any(roc.values()):
        F.roc_panels({f"{span} span (Min-K%++)": series for span, series in roc.items() if series},
                     figdir / "roc.png", styles=_styles({n for v in roc.values() for n in v}),
                     title="Membership inference: forget facts vs non-members")
        out["figures"].append(("Membership inference ROC, forget facts vs vocabulary-matched non-members, on the whole "
                               "sentence and on the answer only. Target: the retrained model's curve, not the diagonal.",
                               _img(figdir / "roc.png")))
    if adv:
        fams = sorted({f for v in adv.values() for f in v})
        F.bar_plot(fams, {m: [float(v.get(f, float("nan"))) for f in fams] for m, v in adv.items()},
                   figdir / "adversarial.png", ylabel="recall of the forgotten object",
                   title="Adversarial probes by family", styles=_styles(adv, bars=True))
        out["figures"].append(("Adversarial recall by family beside the original and the retrained model (a bar at "
                               "0 is a measured 0).", _img(figdir / "adversarial.png")))
    return out


def _trace_figures(tdir: Path, summary: dict, figdir: Path) -> list[tuple[str, str | None]]:
    """The trace run's figures with captions: the average (per relation only when there are several:
    with one relation its average is the overall one), then the single facts."""
    rels = sorted(summary.get("by_relation") or {})
    out = []
    for p in sorted((tdir / "figures").glob("*.png"), key=lambda p: (not p.stem.startswith("average"), p.stem)):
        if p.stem.startswith("average_") and len(rels) < 2:
            continue  # a run written before trace_run stopped drawing the duplicate
        shutil.copy(p, figdir / f"trace_{p.name}")
        if p.stem == "average":
            caption = ("Mean indirect effect by token category and layer" + (f" ('{rels[0]}' facts)" if len(rels) == 1
                                                                             else " (all traced facts)"))
        elif p.stem.startswith("average_"):
            caption = f"Mean indirect effect by token category and layer, '{p.stem[len('average_'):]}' facts"
        else:
            caption = f"Fact {p.stem.removeprefix('fact_')}: restored probability of the answer, by token and layer"
        out.append((caption, _img(p)))
    return out


def _site_rows(overall: dict) -> list[dict]:
    """Per traced kind: the early site (last subject token) and the late site (last token), each the
    best layer with its mean IE and 95% interval, or "none" when the interval includes 0."""
    from mechedit.trace.result import SITE_TOKENS, sites_from_summary

    rows = []
    found = sites_from_summary(overall)
    order = ("resid", "mlp", "attn")  # the panels' order, then severed paths
    for kind, by in sorted(found.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else 3, kv[0])):
        cells = []
        for where in SITE_TOKENS:
            loc = by.get(where)
            if loc is None:
                cells.append({"layer": "–", "ie": "no such token", "none": True})
            else:
                cells.append({"layer": str(loc.layer) if loc.above_noise else "none",
                              "ie": f"{loc.score:.3f} ± {loc.ci95:.3f} (n {loc.n})" + (
                                  "" if loc.above_noise else f" at best layer {loc.layer}"),
                              "none": not loc.above_noise})
        rows.append({"kind": kind.replace("_", " "), "cells": cells})
    return rows


def precision_text(record) -> str:
    """The report header's inference precision: "float32" when every path ran in it (runs made before
    the option have no record: fp32), else each path's ("scoring bfloat16, diagnostics bfloat16, ...")."""
    if not isinstance(record, dict):
        return "float32"
    paths = {k: v for k, v in record.items() if k != "asked"}
    if len(set(paths.values())) == 1:
        return next(iter(paths.values()))
    return ", ".join(f"{k} {v}" for k, v in paths.items())


def build_report(run_dir: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """Write `out/index.html` (+ figures/) for run folder `run_dir`; returns the index path."""
    import mechedit

    run_dir = Path(run_dir)
    check_output_dir(out, force)
    from mechedit import progress

    spec, cases = load_run(run_dir)
    with output_dir(out, force) as tmp, progress.step(f"report of {len(cases)} cases"):
        _write_report(tmp, run_dir, spec, cases)
    return Path(out) / "index.html"


def _write_report(tmp: Path, run_dir: Path, spec: dict, cases: list[dict]) -> None:
    """Render the report of `run_dir` into the temporary folder `tmp`."""
    import mechedit

    figdir = tmp / "figures"
    figdir.mkdir()
    ckpt = Path(spec["checkpoint"])
    meta = read_json(ckpt / "mechedit.json", "mechedit.json") if (ckpt / "mechedit.json").is_file() else {}
    world, world_obj = None, None
    if (ckpt / "world.json").is_file():
        from mechedit.world.world import World

        world_obj = World.load(ckpt)
        world = {k.replace("_", " "): _text(v) for k, v in world_obj.summary().items()}
    model = {k.replace("_", " "): _text(v) for k, v in (meta.get("model_spec") or {}).items()} or None
    curve_img = _img(F.training_curve(meta.get("curve", []), figdir / "training_curve.png"))
    # trace
    trace = None
    ie = None
    tdir = run_dir / "trace"
    if (tdir / "summary.json").is_file():
        summary = read_json(tdir / "summary.json", "trace summary")
        figs = _trace_figures(tdir, summary, figdir)
        overall = summary.get("overall", {})
        mlp_last = (overall.get("mlp") or {}).get("last_subject", {}).get("mean")
        ie = [v if v is not None else 0.0 for v in mlp_last] if mlp_last else None
        te = overall.get("total_effect", {})
        trace = {"averages": [f for f in figs if not f[0].startswith("Fact ")],
                 "facts": [f for f in figs if f[0].startswith("Fact ")], "sites": _site_rows(overall), "n_facts": summary.get("n_facts"),
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
        version=spec.get("mechedit_version"), git=spec.get("git"), device=spec.get("device"),
        precision=precision_text(spec.get("precision")), report_version=mechedit.__version__,
        spec_json=json.dumps(spec.get("spec"), indent=2), world=world, model=model,
        train={"seconds": meta.get("train_seconds"), "epochs": meta.get("epochs")}, recall_rows=recall_rows,
        curve_img=curve_img, trace=trace, traced_layer=spec.get("traced_layer"), families=_family_tables(cases),
        sweeps=_layer_sweeps(cases, ie, figdir), unlearning=_unlearning(cases, figdir),
        hase=hase_section(run_dir, cases, figdir, _img),
        shattering=shattering_section(cases, figdir, _img),
        drilldowns=_drilldowns(cases), findings=S.findings_table(spec, cases, world_obj),
        exposure=S.exposure_tables(cases, world_obj), trace_exposure=S.trace_by_exposure(run_dir, world_obj),
        n_cases=len(cases), n_total=len(spec.get("cases", [])),
        request_sets={k: len(v["requests"]) for k, v in spec.get("request_sets", {}).items()})
    write_text_atomic(tmp / "index.html", html)
    if (spec.get("spec") or {}).get("findings"):  # the same table as Markdown, for a README or a note
        write_text_atomic(tmp / "findings.md", S.findings_markdown(spec, cases, world_obj))
