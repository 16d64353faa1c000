"""`run_analysis`: train or reuse the model, trace, then run every case of the grid into a run folder.

Run folder (DESIGN.md): `spec.json` (the analysis, mechedit version, git hash, resolved checkpoint,
traced location, request sets, the case list), `trace/` (a trace run folder with figures), one
`case_<id>.json` per finished case written atomically (deterministic: timings go to
`case_<id>.timing.json`, written after the case file: the case file is the commit point). A rerun
skips finished cases (a case file that does not parse or belongs to another spec is run again), so
killing the run at any moment and rerunning it gives the same final case files with nothing lost or
duplicated.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from mechedit import progress as P
from mechedit.analysis.ahead import references_ahead, start_ahead
from mechedit.analysis.executors import executor
from mechedit.analysis.folder import read_case, read_timing
from mechedit.analysis.requests import request_set_record
from mechedit.analysis.spec import AnalysisSpec, computation_hash, load_analysis, trace_config
from mechedit.diagnose.headline import headline_text
from mechedit.errors import MecheditError, SpecError
from mechedit.faults import crash_point
from mechedit.fileio import check_output_dir, read_json, remove_stale_debris, write_json_atomic
from mechedit.provenance import git_hash


def default_cache_dir() -> Path:
    return Path(os.environ.get("MECHEDIT_CACHE", "runs/.cache"))


def resolve_model(spec: AnalysisSpec):
    """What the analysis runs on, checked before any work: a checkpoint path, or (world, model spec,
    train spec) to train. Returns (checkpoint | None, world | None, mspec | None, tspec | None, n_layers)."""
    from mechedit.model.pipeline import resolve_world
    from mechedit.model.spec import model_spec

    if "checkpoint" in spec.model:
        path = (spec.base / spec.model["checkpoint"]).resolve()
        config = read_json(path / "config.json", "checkpoint config.json")
        n_layers = config.get("num_hidden_layers") if isinstance(config, dict) else None
        if not isinstance(n_layers, int):
            raise MecheditError(f"corrupt checkpoint {path}: config.json has no num_hidden_layers")
        return path, None, None, None, n_layers
    m = spec.model.get("preset") or str(spec.base / spec.model["spec"])
    mspec, tspec = model_spec(m)  # first: a bad model spec is found without generating the world
    w = spec.world
    world = resolve_world(None if w.get("spec") == "default" else spec.base / w.get("spec", w.get("dir")))
    return None, world, mspec, tspec, mspec.n_layers


def cached_checkpoint_path(world, mspec, tspec, cache_dir: Path) -> Path:
    from mechedit.specio import to_dict

    # to_dict leaves out fields at their OMIT_DEFAULT defaults: existing specs keep their cache keys
    key = json.dumps({"world": world.to_dict()["spec"], "model": to_dict(mspec), "train": to_dict(tspec)},
                     sort_keys=True)
    return (cache_dir / "models" / hashlib.sha256(key.encode()).hexdigest()[:16]).resolve()


def same_world(checkpoint: Path, world) -> bool:
    """Whether `checkpoint` was trained on exactly `world` (its world.json holds the same content)."""
    try:
        cached = read_json(checkpoint / "world.json", "world.json")
    except MecheditError:
        return False
    ours = world.to_dict()
    return isinstance(cached, dict) and all(cached.get(k) == v for k, v in ours.items() if k != "mechedit_version")


def resolve_checkpoint(spec: AnalysisSpec, cache_dir: Path, progress: Callable[[str], None] | None = None,
                       resolved: tuple | None = None, aheads: list | None = None) -> Path:
    """The checkpoint of the analysis: given, or trained once and cached by a hash of the specs
    (a training killed half-way resumes from its last state, kept in the cache's partial folder).
    `resolved` is `resolve_model(spec)` when the caller has it already. With `aheads` (a list), the
    retrained references of the unlearning cases train beside the model (`mechedit.analysis.ahead`);
    their `Ahead` is appended for the caller to `close()` once the cases are done."""
    from mechedit.model.pipeline import train_checkpoint

    checkpoint, world, mspec, tspec, _ = resolved or resolve_model(spec)
    if checkpoint is not None:
        return checkpoint
    path = cached_checkpoint_path(world, mspec, tspec, cache_dir)
    if (path / "mechedit.json").is_file():
        if same_world(path, world):
            return second_stage(spec, path, progress)
        if progress:  # the key is the spec: another mechedit version may generate another world from it
            progress(f"the cached model in {path} was trained on another world for this spec; training again")
    elif progress:
        progress(f"training the model (cached afterwards in {path})")
    ahead = start_ahead(spec, world, mspec, tspec, path, progress) if aheads is not None else None
    try:
        trained = train_checkpoint(world, mspec, tspec, path, force=True, on_epoch=ahead and ahead.on_epoch)
    except BaseException:
        if ahead:
            ahead.close(ok=False)
        raise
    if ahead:
        ahead.saved(trained.meta["epochs"])
        aheads.append(ahead)
    return second_stage(spec, path, progress)


def second_stage(spec: AnalysisSpec, path: Path, progress: Callable[[str], None] | None = None) -> Path:
    """With `model.finetune_facts`, the first-stage checkpoint `path` after `mechedit finetune-facts`
    (trained once, cached beside it, keyed on the fine-tuning parameters); else `path` itself."""
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


def run_trace(spec: AnalysisSpec, checkpoint: Path, run_dir: Path, request_sets: dict | None = None) -> dict | None:
    """Trace the spec's facts (or the facts of its request set `trace.requests`) into run_dir/trace
    (once; a trace killed half-way is redone); returns the located layer per site."""
    from mechedit.trace.run import trace_run

    if spec.trace is None:
        return None
    out = run_dir / "trace"
    if not (out / "locations.json").is_file():
        t = spec.trace
        facts = t.get("facts")
        if "requests" in t:
            facts = [f"{r['subject']}|{r['relation']}" for r in (request_sets or {})[t["requests"]]["requests"]]
        trace_run(checkpoint, out, facts=facts, relation=t.get("relation"), n=t.get("n"),
                  all_facts=not facts and not t.get("relation"), config=trace_config(t), force=True)
    located = read_json(out / "locations.json", "trace locations")
    return {site: ranked[0] for site, ranked in located.items() if ranked}


def twins_of(todo: list[dict], cases: list[dict], traced_layer: int | None, done: Callable[[dict], bool]) -> dict:
    """{id of a "traced" case in `todo`: the case that computes exactly the same} -- the same method,
    params and requests at the layer the trace located (int layers only), either done already or to
    run now. Its record is that case's with its own id and layer (`twin_outcome`), not a second run:
    run_case is deterministic, and the quickstart asks for ROME at "traced" and at every layer."""
    if traced_layer is None:
        return {}
    ids = {c["id"] for c in todo}
    out = {}
    for c in todo:
        if c["layer"] != "traced":
            continue
        for t in cases:
            if (type(t["layer"]) is int and t["layer"] == traced_layer and t["method"] == c["method"]
                    and t["requests"] == c["requests"] and t["params"] == c["params"]
                    and (t["id"] in ids or done(t))):
                out[c["id"]] = t
                break
    return out


def twin_outcome(case: dict, outcome: dict) -> dict:
    """The outcome of `case` from its twin's: the same record under its own id and layer key; the
    timings name the twin (the computation was made once)."""
    return {"record": {**outcome["record"], "id": case["id"], "layer": case["layer"]},
            "timings": {**outcome["timings"], "twin_of": outcome["record"]["id"]}}


LAYER_WORDS = ("traced", "all", "auto")  # the layer names methods take (each method says which of them it takes)


def check_layers(spec: AnalysisSpec, n_layers: int) -> None:
    """Every layer a grid names must exist in the model (checked before the run folder is written)."""
    for c in spec.cases:
        layers = c.layer if isinstance(c.layer, list) else [c.layer]
        for layer in layers:
            if isinstance(layer, str) and layer not in LAYER_WORDS:
                raise SpecError(f"grid: layer {layer!r} of case {c.method} is not a layer number nor one of "
                                f"{', '.join(LAYER_WORDS)}")
            if isinstance(layer, int) and not isinstance(layer, bool) and not 0 <= layer < n_layers:
                raise SpecError(f"grid: layer {layer} of case {c.method} is out of range "
                                f"(the model has layers 0..{n_layers - 1})")


def check_world_fit(spec: AnalysisSpec, world) -> None:
    """What the world must offer a case, checked before the run folder is written: in-context
    unlearning (icu) needs a world with forget instructions, and a forget set of no more subjects than
    an instruction names (`instruction_max_subjects`, or the case's `max_subjects`). Without this
    check a study stops at that case, possibly hours in."""
    from mechedit.unlearn.m_icu import fit_error

    for c in spec.cases:
        if c.method != "icu":
            continue
        n = spec.request_sets[c.requests].subjects  # None: a forget set named fact by fact, counted at run time
        error = fit_error(world, n or 0, c.params.get("max_subjects", 0))
        if error:
            raise SpecError(f"grid: icu on request set {c.requests!r}" + (f" ({n} subjects)" if n else "")
                            + f": {error} ({'params.max_subjects' if world.spec.instructions else 'world.spec'})")


def case_done(run_dir: Path, case: dict, spec_hash: str) -> bool:
    """A case is done when its file parses, has its fields and belongs to this spec and case (else it
    is run again: a half-written or foreign file is never counted)."""
    return read_case(run_dir, case["id"], spec_hash) is not None


def _stamp(old: Any, spec: AnalysisSpec) -> str | None:
    """The hash a run folder's cases carry when `spec` computes what they computed, else None. Runs
    stamped before findings were left out of the hash carry the whole spec's hash: they match when
    their stored spec computes the same (only findings or description differ)."""
    if not isinstance(old, dict) or not isinstance(old.get("spec_hash"), str):
        return None
    if old["spec_hash"] == spec.hash():
        return spec.hash()
    saved = old.get("spec")
    if isinstance(saved, dict) and old["spec_hash"] == computation_hash(saved, legacy=True) \
            and computation_hash(saved) == spec.hash():
        return old["spec_hash"]
    return None


def _open_run_dir(spec: AnalysisSpec, run_dir: Path, force: bool,
                  precision: dict | None = None) -> tuple[bool, str]:
    """Decide, before any work, whether `run_dir` is resumed, started or refused (also when its cases
    were scored in another inference `precision`: a run never mixes two). Returns (resumed, the hash
    its case files carry)."""
    spec_file = run_dir / "spec.json"
    if spec_file.is_file():
        try:
            old = read_json(spec_file, "spec.json")
        except MecheditError:
            old = None
        stamp = _stamp(old, spec)
        if stamp is not None:
            from mechedit.device import precision_record

            was = old.get("precision") or precision_record(None, "float32")  # runs before the option
            if precision is None or was == precision:
                return True, stamp
            if not force:
                raise MecheditError(f"{run_dir} holds a run in precision {was.get('asked')!r}, not "
                                    f"{precision.get('asked')!r} (give --precision {was.get('asked')}, or --force "
                                    "to start it over)")
            return False, spec.hash()
        if not force:
            raise MecheditError(f"{run_dir} holds a run of a different spec (use --force to start it over)")
        return False, spec.hash()
    if run_dir.is_dir() and any(p for p in run_dir.iterdir() if not p.name.startswith(".")) and not force:
        raise MecheditError(f"output directory {run_dir} exists and is not a run folder (use --force to overwrite)")
    check_output_dir(run_dir, force=True)
    return False, spec.hash()


def run_analysis(spec_path: str | Path, run_dir: str | Path, *, executor_name: str = "local",
                 workers: int | None = None, address: str | None = None, force: bool = False,
                 cache_dir: str | Path | None = None, progress: Callable[[str], None] | None = None,
                 limit: int | None = None, device: str | None = None, precision: str | None = None) -> dict:
    """Run (or resume) an analysis; returns {"run_dir", "done", "ran", "skipped", "total"}.

    Everything that can be checked is checked before the run folder is touched. The folder is
    marked as a run (spec.json) before the first long step, so a rerun after a kill at any moment
    resumes it. `limit` stops after that many new cases (used to test interruption).
    """
    import mechedit

    spec = load_analysis(spec_path)
    run_dir = Path(run_dir)
    run = executor(executor_name)  # unknown executor: fail before any work
    if workers is not None and workers < 1:
        raise MecheditError(f"--workers must be >= 1, got {workers}")
    from mechedit.device import precision_record, use_device, use_precision

    asked = (device or spec.device).strip().lower()
    dev = use_device(asked)  # a CUDA spec on a machine without one: one line, before any work
    prec = precision_record(dev, use_precision(precision or spec.precision))
    resume, stamp = _open_run_dir(spec, run_dir, force, prec)
    resolved = resolve_model(spec)
    check_layers(spec, resolved[-1])
    if resolved[1] is not None:
        check_world_fit(spec, resolved[1])
    spec_file = run_dir / "spec.json"
    cases = [{"id": c.id, **c.key} for c in spec.cases]
    record = {"name": spec.name, "spec": spec.raw, "spec_hash": stamp,
              "spec_path": str(Path(spec_path).resolve()), "mechedit_version": mechedit.__version__, "git": git_hash(),
              "cases": cases, "suites": list(spec.suites), "forget_suites": list(spec.forget_suites),
              "device": str(dev), "precision": prec}
    if not resume:
        if run_dir.is_dir():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(spec_file, record)
    remove_stale_debris(run_dir)

    def say(msg: str) -> None:
        P.note(msg)
        if progress:
            progress(msg)

    with references_ahead() as aheads:  # joined when the cases are done (stopped on an error)
        say(f"run folder {run_dir}: " + ("resuming it" if resume else "new"))
        checkpoint = resolve_checkpoint(spec, Path(cache_dir) if cache_dir else default_cache_dir(), say, resolved,
                                        aheads=aheads)
        say(f"model: {checkpoint}")
        bundle = mechedit.load(checkpoint)
        saved = read_json(spec_file, "spec.json")
        if isinstance(saved, dict) and "request_sets" in saved:
            request_sets = saved["request_sets"]
        else:
            from mechedit.model.evaluate import score_answers

            probes = bundle.world.probes(bundle.world.train_facts, ("cloze",))
            ok = score_answers(bundle.model, bundle.tokenizer, [p.prompt for p in probes], [p.answer for p in probes],
                               precision="float32").correct  # which requests are drawn never depends on --precision
            wrong = {p.fact for p, c in zip(probes, ok) if not c}
            known = {f.index for f in bundle.world.train_facts} - wrong
            request_sets = {name: request_set_record(bundle.world, r, known) for name, r in spec.request_sets.items()}
        located = run_trace(spec, checkpoint, run_dir, request_sets)
        traced_layer = int(located["mlp"]["layer"]) if located and "mlp" in located else None
        if any(c.layer == "traced" for c in spec.cases) and traced_layer is None:
            raise MecheditError("a case asks for the traced layer but the trace located no MLP layer (add 'mlp' to trace.sites)")
        write_json_atomic(spec_file, {**record, "checkpoint": str(checkpoint), "located": located,
                                      "traced_layer": traced_layer, "request_sets": request_sets})
        ctx = {"device": str(dev), "device_asked": asked, "precision": prec["asked"], "spec_hash": stamp, "checkpoint": str(checkpoint), "traced_layer": traced_layer, "request_sets": request_sets,
               "suites": list(spec.suites), "forget_suites": list(spec.forget_suites), "suite_options": spec.suite_options}
        todo = [c for c in cases if not case_done(run_dir, c, stamp)]
        # unlearning cases first (stable otherwise): they are the long ones (an unlearning loop, and the
        # retrained reference the first time a forget set is seen), so the other workers' cases run beside them
        todo.sort(key=lambda c: request_sets[c["requests"]]["kind"] != "forget")
        skipped = len(cases) - len(todo)
        if limit is not None:
            todo = todo[:limit]
        say(f"{len(cases)} cases: {skipped} already done, {len(todo)} to run ({executor_name} executor)")
        kwargs = {"address": address} if executor_name == "ray" else {}
        ran = 0
        twins = twins_of(todo, cases, traced_layer, lambda c: case_done(run_dir, c, stamp))
        run_now = [c for c in todo if c["id"] not in twins]

        def commit(case: dict, outcome: dict) -> None:
            nonlocal ran
            # the case file is the commit point: the timing sidecar follows it (a missing sidecar = no timing)
            write_json_atomic(run_dir / f"case_{case['id']}.json", outcome["record"])
            crash_point("case.written")
            write_json_atomic(run_dir / f"case_{case['id']}.timing.json", outcome["timings"])
            ran += 1
            took, twin = outcome["timings"].get("case_s"), outcome["timings"].get("twin_of")
            say(f"case {case['id']} done" + (f" (the same computation as case {twin})" if twin else
                                             f" in {took:.0f} s" if took is not None else "")
                + f" ({ran}/{len(todo)}): {headline_text(outcome['record']['summary'])}")
            for c in todo:  # "traced" cases that compute exactly this one
                if c["id"] in twins and twins[c["id"]]["id"] == case["id"]:
                    commit(c, twin_outcome(c, outcome))

        for c in todo:  # twins already on disk (a resumed run)
            if c["id"] in twins and twins[c["id"]] not in run_now:
                tid = twins[c["id"]]["id"]
                commit(c, twin_outcome(c, {"record": read_case(run_dir, tid, stamp), "timings": read_timing(run_dir, tid)}))
        with P.step("cases", quiet=True):  # the heartbeat goes on while workers start and the pool shuts down
            for case, outcome in run(run_now, ctx, workers, **kwargs):
                commit(case, outcome)
        done = sum(case_done(run_dir, c, stamp) for c in cases)
        return {"run_dir": run_dir, "done": done, "ran": ran, "skipped": skipped, "total": len(cases)}
