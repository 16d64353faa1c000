"""Running one case of an analysis grid: edit (each request alone, or one batch), diagnose, drill down.

`run_case` is a plain top-level function of picklable arguments so any executor (a process pool, Ray)
can run it. It always runs with one torch thread, so a case gives the same numbers whichever executor
ran it and however many ran beside it.
"""
from __future__ import annotations

import json
import math
import time
from typing import Any

import numpy as np
import torch

from mechedit import progress
from mechedit.diagnose.strict import strict_json
from mechedit.faults import crash_point

_BUNDLES: dict[str, Any] = {}  # per-process cache: checkpoint path -> Bundle


def _bundle(path: str):
    import mechedit

    if path not in _BUNDLES:
        _BUNDLES[path] = mechedit.load(path)
    return _BUNDLES[path]


def jsonable(obj: Any) -> Any:
    """Plain strict JSON data from method info: small tensors and arrays become lists, larger ones a
    shape string, NaN becomes None (`strict_json`), anything else its str()."""
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist()) if obj.size <= 64 else f"array{list(obj.shape)}"
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str, np.generic)):
        return strict_json(obj)
    return str(obj)


def flatten(card: Any, prefix: str = "") -> dict[str, float]:
    """Numbers of a scorecard as {"suite.metric.field": value}; a metric contributes its agg_value."""
    out: dict[str, float] = {}
    if isinstance(card, dict):
        if "agg_value" in card and "value_by_index" in card:
            v = card["agg_value"]
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[prefix.rstrip(".")] = float(v)
            return out
        for k, v in card.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(card, (int, float)) and not isinstance(card, bool):
        out[prefix.rstrip(".")] = float(card)
    return out


@torch.no_grad()
def top_predictions(model, tokenizer, prompts: list[str], k: int = 5) -> list[list[tuple[str, float]]]:
    from mechedit.device import inference_autocast
    from mechedit.model.evaluate import pad

    ids = [tokenizer(p)["input_ids"] for p in prompts]
    x, m = pad(ids, tokenizer.pad_token_id, model.device)
    with inference_autocast(model.device, "diagnostics"):
        logits = model(input_ids=x, attention_mask=m).logits  # [b, pos, vocab]
    last = torch.tensor([len(i) - 1 for i in ids], device=model.device)
    probs = torch.softmax(logits[torch.arange(len(ids), device=model.device), last].float(), -1)
    top = probs.topk(k, dim=-1)
    return [[(tokenizer.convert_ids_to_tokens(int(i)), round(float(p), 4)) for p, i in zip(ps, ix)]
            for ps, ix in zip(top.values, top.indices)]


def drilldown(before, after, requests, max_requests: int = 5) -> list[dict]:
    """For a few requests: the prompts (trained template, held-out paraphrase, QA) and top-5 before/after."""
    world = before.world
    rows = []
    for r in requests[:max_requests]:
        f = world.fact(r.subject, r.relation)
        trained = next(t for t in range(world.n_templates) if t != f.heldout_template)
        for kind, t in (("cloze", trained), ("paraphrase", f.heldout_template), ("qa", -1)):
            rows.append({"subject": r.subject, "relation": r.relation, "old": f.object, "new": r.new_object,
                         "kind": kind, "prompt": world.prompt(f, t)})
    if not rows:
        return rows
    prompts = [r["prompt"] for r in rows]
    for name, b in (("before", before), ("after", after)):
        for row, top in zip(rows, top_predictions(b.model, b.tokenizer, prompts)):
            row[name] = top
    return rows


def mean_summary(summaries: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for s in summaries for k in s})
    out = {}
    for k in keys:
        vals = [s[k] for s in summaries if k in s and s[k] is not None and math.isfinite(s[k])]
        if vals:
            out[k] = float(np.mean(vals))
    return out


def run_case(case: dict, ctx: dict) -> dict:
    """Run one grid cell; returns the case record (deterministic) and its timings (separately)."""
    from mechedit.analysis.requests import request_groups
    from mechedit.diagnose import diagnose
    from mechedit.edit.api import EditRequest, run_method
    from mechedit.edit.run import edited_bundle

    from threadpoolctl import threadpool_limits

    t_case = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    limits = threadpool_limits(limits=1)  # BLAS/OpenMP pools of numpy, scipy and scikit-learn too
    try:
        bundle = _bundle(ctx["checkpoint"])
        rset = ctx["request_sets"][case["requests"]]
        reqs = [EditRequest(**d) for d in rset["requests"]]
        layer = ctx.get("traced_layer") if case["layer"] == "traced" else case["layer"]
        params = dict(case["params"])
        if layer is not None:
            params["layer"] = layer
        suites = ctx["forget_suites"] if rset["kind"] == "forget" else ctx["suites"]
        groups = request_groups(rset, reqs)
        from mechedit.device import current_device, precision_record, use_precision

        use_precision(ctx.get("precision", "float32"))  # a worker process scores in the run's precision
        per_edit, timings = [], {"edit_s": 0.0, "diagnose_s": 0.0, "device": str(current_device()),
                                 "precision": precision_record()}
        for i, g in enumerate(groups):
            crash_point("case.edit")
            torch.manual_seed(0)
            what = f"request {i + 1}/{len(groups)}" if len(groups) > 1 else f"{len(g)} request(s) in one call"
            with progress.step(what, quiet=True):
                progress.status(f"{case['method']} edit")
                t0 = time.perf_counter()
                result = run_method(bundle, g, case["method"], **params)
                t1 = time.perf_counter()
                after = edited_bundle(bundle, result)
                progress.status(f"diagnose ({', '.join(suites)})")
                cards = diagnose(bundle, after, g, suites, **ctx.get("suite_options", {}))
                t2 = time.perf_counter()
            timings["edit_s"] += t1 - t0
            timings["diagnose_s"] += t2 - t1
            # a suite's "keep": small per-edit data (figure coordinates) stored in every mode
            kept = {name: card.pop("keep") for name, card in cards.items() if isinstance(card, dict) and "keep" in card}
            per_edit.append({
                "requests": [r.__dict__ for r in g],
                "summary": jsonable(flatten(cards)),
                "scorecard": jsonable(cards) if len(groups) == 1 else None,
                "drilldown": drilldown(bundle, after, g),
                "info": jsonable(result.info),
                **({"kept": jsonable(kept)} if kept else {}),
            })
        import mechedit

        record = {
            "mechedit_version": mechedit.__version__, "spec_hash": ctx.get("spec_hash"),
            "id": case["id"], "method": case["method"], "params": case["params"], "layer": case["layer"],
            "layer_used": layer, "requests": case["requests"], "request_kind": rset["kind"], "mode": rset["mode"],
            "n_requests": len(reqs), "suites": list(suites),
            "summary": mean_summary([e["summary"] for e in per_edit]),
            "per_edit": per_edit,
        }
        json.dumps(record, allow_nan=False)  # fail here, not half-way through writing, if something is not JSON
        timings["case_s"] = time.perf_counter() - t_case
        return {"record": record, "timings": timings}
    finally:
        limits.restore_original_limits()
        torch.set_num_threads(threads)
