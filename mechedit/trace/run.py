"""A trace run folder: spec.json, trace.json + trace.npz, summary.json, locations.json, sites.json, figures/.

`locations.json`: per traced kind, the layers ranked by mean IE at the last subject token (what
`--layer traced` edits). `sites.json`: per kind, ROME's early site (last subject token) and late
site (last token), each the best layer with its mean IE, 95% interval, n and whether it is above
the noise floor (`located`).
"""
from __future__ import annotations

from pathlib import Path

from mechedit import progress as P
from mechedit.errors import MecheditError
from mechedit.faults import crash_point
from mechedit.provenance import git_hash
from mechedit.fileio import check_output_dir, output_dir, write_json_atomic
from mechedit.specio import to_dict
from mechedit.trace.api import TraceConfig, check_config, select_facts, trace
from mechedit.trace.result import TraceResult, locate_sites, rank_locations


def trace_run(checkpoint: str | Path, out: str | Path, *, facts: list[str] | None = None,
              relation: str | None = None, n: int | None = None, all_facts: bool = False,
              include_heldout: bool = False, config: TraceConfig = TraceConfig(), force: bool = False,
              max_fact_figures: int = 6, progress=None) -> dict:
    """Trace the chosen facts of a checkpoint into run folder `out`; returns what the CLI prints
    (`notes`: what was adjusted, e.g. an `n` larger than the facts available)."""
    import mechedit

    if not facts and relation is None and not all_facts and n is None:
        raise MecheditError("choose facts with --fact SUBJECT|RELATION, --relation NAME [--n K] or --all")
    if facts and (relation is not None or all_facts):
        raise MecheditError("--fact cannot be combined with --relation or --all")
    check_output_dir(out, force)
    bundle = mechedit.load(checkpoint)
    chosen = select_facts(bundle.world, facts or None, relation=relation, n=n, seed=config.seed,
                          include_heldout=include_heldout)
    if not chosen:
        raise MecheditError("no facts selected")
    notes = []
    if n is not None and n > len(chosen):
        notes.append(f"--n {n} is more than the {len(chosen)} facts that match: tracing all {len(chosen)}")

    def step(done: int, total: int) -> None:
        crash_point("trace.batch")
        if progress:
            progress(done, total)

    check_config(bundle.world, bundle.model.config.num_hidden_layers, config)  # bad options: an error, no progress lines
    with output_dir(out, force) as tmp, P.step(f"tracing {len(chosen)} facts ({', '.join(config.kinds)})"):
        written = _write_run(tmp, bundle, chosen, checkpoint, facts, relation, n, all_facts, include_heldout,
                             config, max_fact_figures, step)
    return {**written, "out": Path(out), "notes": notes,
            "figures": [Path(out) / "figures" / p.name for p in written["figures"]]}


def _write_run(tmp: Path, bundle, chosen, checkpoint, facts, relation, n, all_facts, include_heldout, config,
               max_fact_figures, progress) -> dict:
    """Trace and write the run's files into the temporary folder `tmp`."""
    import mechedit
    from mechedit.trace.plot import plot_average, plot_fact

    result = trace(bundle, chosen, config, include_heldout=include_heldout, progress=progress)
    result.save(tmp)
    summary = result.summary()
    write_json_atomic(tmp / "summary.json", summary)
    located, sites = {}, {}
    if result.n_facts:
        for k in result.kinds:
            ranked = rank_locations(result, k)
            located[k] = [to_dict(loc) for loc in ranked]
        sites = {k: {where: {**to_dict(loc), "located": loc.above_noise} for where, loc in by.items()}
                 for k, by in locate_sites(result).items()}
    write_json_atomic(tmp / "locations.json", located)
    write_json_atomic(tmp / "sites.json", sites)
    figs = tmp / "figures"
    figs.mkdir()
    written = []
    if result.n_facts:
        P.status("figures")
        rels = sorted({d["relation"] for d in result.facts})
        written.append(plot_average(result, figs / "average.png", title=f"'{rels[0]}'" if len(rels) == 1 else ""))
        if len(rels) > 1:  # with one relation its average is the average above
            for rel in rels:
                written.append(plot_average(result, figs / f"average_{rel}.png", result.rows(relation=rel), f"'{rel}'"))
        for i in range(min(max_fact_figures, result.n_facts)):
            d = result.facts[i]
            written.append(plot_fact(result, i, figs / f"fact_{d['index']}.png"))
    write_json_atomic(tmp / "spec.json", {
        "command": "trace", "checkpoint": str(Path(checkpoint).resolve()), "config": to_dict(config),
        "facts": facts, "relation": relation, "n": n, "all": all_facts, "include_heldout": include_heldout,
        "mechedit_version": mechedit.__version__, "git": git_hash(), "device": str(bundle.model.device),
        "precision": result.config["precision"]})
    return {"result": result, "summary": summary, "located": {k: v[0] for k, v in located.items()},
            "sites": locate_sites(result) if result.n_facts else {}, "figures": written}


def load_run(directory: str | Path) -> TraceResult:
    return TraceResult.load(directory)
