"""`run_analysis`: train or reuse the model, trace, then run every case of the grid into a run folder.

Run folder (DESIGN.md): `spec.json` (the analysis, mechedit version, git hash, resolved checkpoint,
traced location, request sets, the case list), `trace/` (a trace run folder with figures), one
`case_<id>.json` per finished case written atomically (deterministic: timings go to
`case_<id>.timing.json`). A rerun skips finished cases, so killing the run at any moment and rerunning
it gives the same final case files with nothing lost or duplicated.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

from mechedit.analysis.executors import executor
from mechedit.analysis.requests import build_request_set
from mechedit.analysis.spec import AnalysisSpec, load_analysis
from mechedit.errors import MecheditError
from mechedit.fileio import read_json, write_json_atomic
from mechedit.provenance import git_hash


def default_cache_dir() -> Path:
    return Path(os.environ.get("MECHEDIT_CACHE", "runs/.cache"))


def resolve_checkpoint(spec: AnalysisSpec, cache_dir: Path, progress: Callable[[str], None] | None = None) -> Path:
    """The checkpoint of the analysis: given, or trained once and cached by a hash of the specs."""
    from mechedit.model.pipeline import resolve_world, train_checkpoint
    from mechedit.model.spec import model_spec

    if "checkpoint" in spec.model:
        return (spec.base / spec.model["checkpoint"]).resolve()
    w = spec.world
    world = resolve_world(None if w.get("spec") == "default" else spec.base / w.get("spec", w.get("dir")))
    m = spec.model.get("preset") or str(spec.base / spec.model["spec"])
    mspec, tspec = model_spec(m)
    key = json.dumps({"world": world.to_dict()["spec"], "model": mspec.__dict__, "train": tspec.__dict__},
                     sort_keys=True)
    path = (cache_dir / "models" / hashlib.sha256(key.encode()).hexdigest()[:16]).resolve()
    if not (path / "mechedit.json").is_file():
        if progress:
            progress(f"training the model (cached afterwards in {path})")
        train_checkpoint(world, mspec, tspec, path, force=True)
    ft = spec.model.get("finetune_facts")
    if not ft:
        return path
    from mechedit.model.finetune import finetune_checkpoint

    params = ft if isinstance(ft, dict) else {}
    ft_path = path.with_name(f"{path.name}-ft-{hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]}")
    if not (ft_path / "mechedit.json").is_file():
        if progress:
            progress(f"second stage: finetune-facts (cached afterwards in {ft_path})")
        finetune_checkpoint(path, ft_path, params, force=True)
    return ft_path


def run_trace(spec: AnalysisSpec, checkpoint: Path, run_dir: Path) -> dict | None:
    """Trace the spec's facts into run_dir/trace (once); returns the located layer per site."""
    from mechedit.trace.api import TraceConfig
    from mechedit.trace.run import trace_run

    if spec.trace is None:
        return None
    out = run_dir / "trace"
    if not (out / "locations.json").is_file():
        t = spec.trace
        cfg_keys = {k: t[k] for k in ("sites", "samples", "noise", "window", "seed") if k in t}
        if "sites" in cfg_keys:
            cfg_keys["sites"] = tuple(cfg_keys["sites"])
        trace_run(checkpoint, out, facts=t.get("facts"), relation=t.get("relation"), n=t.get("n"),
                  all_facts=not t.get("facts") and not t.get("relation"), config=TraceConfig(**cfg_keys), force=True)
    located = read_json(out / "locations.json", "trace locations")
    return {site: ranked[0] for site, ranked in located.items() if ranked}


def run_analysis(spec_path: str | Path, run_dir: str | Path, *, executor_name: str = "local",
                 workers: int | None = None, address: str | None = None, force: bool = False,
                 cache_dir: str | Path | None = None, progress: Callable[[str], None] | None = None,
                 limit: int | None = None) -> dict:
    """Run (or resume) an analysis; returns {"run_dir", "done", "ran", "skipped", "total"}.

    `limit` stops after that many new cases (used to test interruption).
    """
    import mechedit

    spec = load_analysis(spec_path)
    run_dir = Path(run_dir)
    run = executor(executor_name)  # unknown executor: fail before any work
    spec_file = run_dir / "spec.json"
    if spec_file.is_file():
        old = read_json(spec_file, "spec.json")
        if old.get("spec_hash") != spec.hash():
            if not force:
                raise MecheditError(f"{run_dir} holds a run of a different spec (use --force to start it over)")
            shutil.rmtree(run_dir)
    elif run_dir.is_dir() and any(run_dir.iterdir()) and not force:
        raise MecheditError(f"output directory {run_dir} exists and is not a run folder (use --force to overwrite)")
    run_dir.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda msg: None)
    checkpoint = resolve_checkpoint(spec, Path(cache_dir) if cache_dir else default_cache_dir(), say)
    bundle = mechedit.load(checkpoint)
    if spec.trace is not None and not (run_dir / "trace" / "locations.json").is_file():
        say("tracing")
    located = run_trace(spec, checkpoint, run_dir)
    traced_layer = int(located["mlp"]["layer"]) if located and "mlp" in located else None
    if any(c.layer == "traced" for c in spec.cases) and traced_layer is None:
        raise MecheditError("a case asks for the traced layer but the trace located no MLP layer (add 'mlp' to trace.sites)")
    if spec_file.is_file():
        saved = read_json(spec_file, "spec.json")
        request_sets = saved["request_sets"]
    else:
        from mechedit.model.evaluate import score_answers

        probes = bundle.world.probes(bundle.world.train_facts, ("cloze",))
        ok = score_answers(bundle.model, bundle.tokenizer, [p.prompt for p in probes], [p.answer for p in probes]).correct
        wrong = {p.fact for p, c in zip(probes, ok) if not c}
        known = {f.index for f in bundle.world.train_facts} - wrong
        request_sets = {
            name: {"kind": r.kind, "mode": r.mode,
                   "requests": [q.__dict__ for q in build_request_set(bundle.world, r, known)]}
            for name, r in spec.request_sets.items()}
    cases = [{"id": c.id, **c.key} for c in spec.cases]
    write_json_atomic(spec_file, {
        "name": spec.name, "spec": spec.raw, "spec_hash": spec.hash(), "spec_path": str(Path(spec_path).resolve()),
        "mechedit_version": mechedit.__version__, "git": git_hash(), "checkpoint": str(checkpoint),
        "located": located, "traced_layer": traced_layer, "request_sets": request_sets, "cases": cases,
        "suites": list(spec.suites), "forget_suites": list(spec.forget_suites)})
    ctx = {"spec_hash": spec.hash(), "checkpoint": str(checkpoint), "traced_layer": traced_layer, "request_sets": request_sets,
           "suites": list(spec.suites), "forget_suites": list(spec.forget_suites), "suite_options": spec.suite_options}
    todo = [c for c in cases if not (run_dir / f"case_{c['id']}.json").is_file()]
    skipped = len(cases) - len(todo)
    if limit is not None:
        todo = todo[:limit]
    say(f"{len(cases)} cases: {skipped} already done, {len(todo)} to run ({executor_name} executor)")
    kwargs = {"address": address} if executor_name == "ray" else {}
    ran = 0
    for case, outcome in run(todo, ctx, workers, **kwargs):
        write_json_atomic(run_dir / f"case_{case['id']}.timing.json", outcome["timings"])
        write_json_atomic(run_dir / f"case_{case['id']}.json", outcome["record"])
        ran += 1
        say(f"case {case['id']} done ({ran}/{len(todo)})")
    done = sum((run_dir / f"case_{c['id']}.json").is_file() for c in cases)
    return {"run_dir": run_dir, "done": done, "ran": ran, "skipped": skipped, "total": len(cases)}
