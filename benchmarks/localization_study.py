"""Where do models recall facts? The levers of subject-level recall, one world size, one table.

For each setting (a world spec and a model spec; every setting has the default world's 200 subjects (one: 300),
relations and structures, so rows compare):
  - training: seconds and epochs until cloze and held-out-paraphrase recall reach the targets;
  - names: share of subjects whose last word / last token alone identifies them, and the plug-in
    mutual information of a single (first / last) name word with each relation's object, as a
    share of the object's entropy (`mechedit.world.identifiability`);
  - causal tracing of `--n-trace` known facts of main subjects (resid, MLP and attention windows,
    10 noise samples): mean indirect effect by token category and layer, the located MLP layer
    (argmax of the MLP IE at the last subject token) and the attention site (argmax over layers
    of the attention IE at the last token);
  - ROME at the located layer, `--n-rome` single edits of known facts of distinct subjects:
    efficacy, P(new) > P(old), paraphrase (the "edit" scorecard), and the flip rate of the facts
    of subjects that share a name word with the edited one ("siblings"): per edit, over sibling
    facts of the edited relation that the model recalled before, the share of their trained
    cloze prompts no longer recalled after (and the share now answered with the new object),
    beside the same rate for other subjects of that relation (the reference);
  - optionally MEMIT, `--n-memit` edits in one call at its default layers.

Checkpoints and one result.json per setting go to --out (a rerun resumes: a trained model or a
finished setting is reused). Run one setting at a time on a shared machine:

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/localization_study.py --settings baseline,first_last
    python benchmarks/localization_study.py --table        # the README table from the results
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent

# every setting: the embedded default world's size, relations and structures (200 subjects; first_last_300
# has 300, the size where a 15 x 20 grid of first and last names is balanced at ~15 subjects per word)
BASE_WORLD = {"n_subjects": 200}
FIRST_LAST = {"name_scheme": "first_last", "word_reuse": 14.0}
BPE = {"tokenizer": "bpe", "bpe_vocab_size": 180}
# many relations per subject (real subjects have many attributes): the default six plus 18 more
EXTRA_RELATIONS = ("instrument", "language", "pet", "food", "drink", "flower", "tree", "river", "mountain",
                   "planet", "metal", "gem", "fabric", "car", "bird", "fish", "dance", "tool")
MANY_RELATIONS = {"relations": [{"name": r, "n_objects": n} for r, n in (
    ("capital", 24), ("country", 6), ("birthplace", 16), ("workplace", 16), ("sport", 12), ("color", 8))]
    + [{"name": r, "n_objects": 12} for r in EXTRA_RELATIONS]}
SETTINGS: dict[str, dict] = {
    "baseline": {"lever": "none: the embedded default world and model", "world": {}, "model": "default"},
    "first_last": {"lever": "names: balanced first x last names (~14 subjects per word)",
                   "world": FIRST_LAST, "model": "default"},
    "bpe": {"lever": "tokenizer: BPE, 180 tokens (names in pieces)", "world": BPE, "model": "default"},
    "bpe_6l": {"lever": "tokenizer + depth: BPE, 180 tokens, 6 layers (the default world's names)", "world": BPE,
               "model": {"preset": "default", "model": {"n_layers": 6}}},
    "first_last_6l": {"lever": "names + depth: 6 layers", "world": FIRST_LAST,
                      "model": {"preset": "default", "model": {"n_layers": 6}}},
    "first_last_12l": {"lever": "names + depth: 12 layers", "world": FIRST_LAST,
                       "model": {"preset": "default", "model": {"n_layers": 12}}},
    "bpe_12l": {"lever": "tokenizer + depth: BPE, 180 tokens, 12 layers (the default world's names)", "world": BPE,
                "model": {"preset": "default", "model": {"n_layers": 12}}},
    "first_last_seq": {"lever": "names + residual: sequential (GPT-2)", "world": FIRST_LAST,
                       "model": {"preset": "default", "model": {"parallel_residual": False}}},
    "first_last_bpe_6l": {"lever": "names + BPE + 6 layers (parallel)", "world": {**FIRST_LAST, **BPE},
                          "model": {"preset": "default", "model": {"n_layers": 6}}},
    "first_last_300": {"lever": "names: balanced first x last names, 300 subjects (~15 per word)",
                       "world": {**FIRST_LAST, "n_subjects": 300, "word_reuse": 15.0}, "model": "default"},
    "first_last_bpe_prof_6l": {"lever": "names + BPE + 6 layers + 2 profile sentences per subject",
                               "world": {**FIRST_LAST, **BPE, "profiles": 2},
                               "model": {"preset": "default", "model": {"n_layers": 6}}},
    "first_last_bpe_6l_seq": {"lever": "names + BPE + 6 layers, sequential", "world": {**FIRST_LAST, **BPE},
                              "model": {"preset": "default", "model": {"n_layers": 6, "parallel_residual": False}}},
    "first_last_prof6": {"lever": "names + 6 profile sentences per subject (attributes right after the name)",
                         "world": {**FIRST_LAST, "profiles": 6}, "model": "default"},
    "first_last_prof6_6l": {"lever": "names + 6 profile sentences + 6 layers",
                            "world": {**FIRST_LAST, "profiles": 6},
                            "model": {"preset": "default", "model": {"n_layers": 6}}},
    "first_last_bio6": {"lever": "names + 6 biographies per subject (the name once, then every fact, permuted)",
                        "world": {**FIRST_LAST, "biographies": 6}, "model": "default"},
    "first_last_100_24rel": {"lever": "names (100 subjects, 10 x 10) + 24 relations per subject",
                             "world": {**FIRST_LAST, **MANY_RELATIONS, "n_subjects": 100, "word_reuse": 10.0},
                             "model": "default"},
    "first_last_prof6_q50": {"lever": "names + 6 profiles per subject; half the subjects never queried "
                                      "(their facts only in profiles: recall needs extraction)",
                             "world": {**FIRST_LAST, "profiles": 6, "query_subject_fraction": 0.5},
                             "model": "default"},
    "first_last_p12l1_q50": {"lever": "names + 12 one-object profiles per subject (attributes only right after "
                                      "the name); half the subjects never queried",
                             "world": {**FIRST_LAST, "profiles": 12, "profile_length": 1,
                                       "query_subject_fraction": 0.5}, "model": "default"},
    "first_last_relfirst": {"lever": "names + relation-first templates (the relation known where the name ends)",
                            "world": {**FIRST_LAST, "templates": "relation_first"}, "model": "default"},
    # scale: the Pythia-31m-sized model (6 layers, d_model 256, bf16 autocast) on 1,000 subjects with the
    # large world's relations (5x the subjects of every other row, twice the width)
    "first_last_1000_31m": {"lever": "names + scale: 1,000 subjects (large world's relations), 6 layers, d_model 256",
                            "world_file": "analyses/worlds/large.toml",
                            "world": {**FIRST_LAST, "n_subjects": 1000},
                            "model_file": "analyses/models/pythia-31m-bf16.toml"},
    "subject_level": {"lever": "the shipped preset (analyses/worlds/subject_level.toml + "
                               "analyses/models/subject_level.toml)",
                      "world_file": "analyses/worlds/subject_level.toml",
                      "model_file": "analyses/models/subject_level.toml"},
}


def world_for(setting: dict):
    from mechedit.world import WorldSpec, default_world_spec, generate_world

    # a spec file or the default world at BASE_WORLD's size, with the setting's "world" keys over it
    base = (WorldSpec.from_file(ROOT / setting["world_file"]).to_dict() if "world_file" in setting
            else {**default_world_spec().to_dict(), **BASE_WORLD})
    return generate_world(WorldSpec.from_dict({**base, **setting.get("world", {})}))


def model_for(setting: dict, tmp: Path):
    from mechedit.model.spec import model_spec

    if "model_file" in setting:
        return model_spec(str(ROOT / setting["model_file"]))
    m = setting["model"]
    if isinstance(m, str):
        return model_spec(m)
    import tomllib  # noqa: F401  (the spec is written as JSON, which model_spec reads too)

    path = tmp / "model_spec.json"
    path.write_text(json.dumps(m))
    return model_spec(str(path))


def time_to_targets(meta: dict) -> dict:
    """Seconds and epochs at the first evaluation where both recall targets were met (None if never)."""
    t = meta.get("train_spec", {})
    for row in meta.get("curve", []):
        if row["cloze"] >= t.get("target_recall", 1) and row["paraphrase"] >= t.get("target_paraphrase", 0):
            return {"seconds": row["seconds"], "epochs": row["epoch"], "reached": True}
    last = meta.get("curve", [{}])[-1]
    return {"seconds": last.get("seconds"), "epochs": last.get("epoch"), "reached": False,
            "cloze": last.get("cloze"), "paraphrase": last.get("paraphrase")}


def known_facts(bundle) -> set[int]:
    from mechedit.model.evaluate import score_answers

    probes = bundle.world.probes(bundle.world.train_facts, ("cloze",))
    ok = score_answers(bundle.model, bundle.tokenizer, [p.prompt for p in probes], [p.answer for p in probes]).correct
    wrong = {p.fact for p, c in zip(probes, ok) if not c}
    return {f.index for f in bundle.world.train_facts} - wrong


def trace_profile(bundle, n: int, seed: int, out: Path | None = None) -> dict:
    """Mean IE by token category and layer for resid / mlp / attn over `n` known main-subject facts
    (with `out`: the trace result and its averaged heatmaps, ROME's Fig. 2, saved there)."""
    from mechedit.trace import trace
    from mechedit.trace.result import CATEGORIES, mean_ci, rank_locations

    w = bundle.world
    known = known_facts(bundle)
    pool = [f for f in w.train_facts if w.subjects[f.subject].kind == "subject" and f.index in known]
    rng = np.random.default_rng([seed, 3])
    facts = [pool[int(i)] for i in sorted(rng.choice(len(pool), size=min(n, len(pool)), replace=False))]
    t0 = time.perf_counter()
    res = trace(bundle, facts, sites=("resid", "mlp", "attn"), samples=10, seed=seed)
    if out is not None:
        from mechedit.trace.plot import plot_average

        res.save(out)
        plot_average(res, out / "average.png")
    out = {"n_facts": res.n_facts, "seconds": round(time.perf_counter() - t0, 1),
           "total_effect": float(np.mean(res.total_effect)), "p_clean": float(np.mean(res.p_clean)),
           "p_corrupt": float(np.mean(res.p_corrupt)), "profile": {}}
    for k in res.kinds:
        ce = res.category_effects(k)  # [F, C, L]
        out["profile"][k] = {}
        for c, name in enumerate(CATEGORIES):
            m, ci, cnt = mean_ci(ce[:, c])
            out["profile"][k][name] = {"mean": [round(float(x), 4) for x in m],
                                       "ci95": [round(float(x), 4) for x in ci], "n": cnt.tolist()}
    loc = rank_locations(res, "mlp")[0]
    att = rank_locations(res, "attn", token_category="last")[0]
    out["mlp_layer"], out["mlp_ie"] = loc.layer, loc.score
    out["attn_last_layer"], out["attn_last_ie"] = att.layer, att.score
    return out


def sibling_flips(before, after, request, known: set[int], n_reference: int, seed: int) -> dict:
    """Flip rates of the edited relation's facts: subjects sharing a name word vs other subjects."""
    from mechedit.model.evaluate import score_answers
    from mechedit.world.identifiability import siblings

    w = before.world
    f = w.fact(request.subject, request.relation)
    sib = set(siblings(w, f.subject))
    others = [s.id for s in w.subjects if s.kind == "subject" and s.id != f.subject and s.id not in sib]
    rng = np.random.default_rng([seed, f.index])
    ref = [others[int(i)] for i in rng.choice(len(others), size=min(n_reference, len(others)), replace=False)]
    out = {}
    for name, group in (("siblings", sorted(sib)), ("others", ref)):
        rows = []  # (fact, prompt, old object)
        for s in group:
            g = next((g for g in w.facts_of(s) if g.relation == f.relation), None)
            if g is None or g.index not in known:
                continue
            rows += [(g.index, w.prompt(g, t), g.object) for t in range(w.n_templates) if t != g.heldout_template]
        if not rows:
            out[name] = {"n_facts": 0, "flipped": None, "to_new": None}
            continue
        prompts = [r[1] for r in rows]
        ok = score_answers(after.model, after.tokenizer, prompts, [r[2] for r in rows]).correct
        new = score_answers(after.model, after.tokenizer, prompts, [request.new_object] * len(rows)).correct
        facts = sorted({r[0] for r in rows})
        per = {g: [k for k, r in enumerate(rows) if r[0] == g] for g in facts}
        out[name] = {"n_facts": len(facts),
                     "flipped": float(np.mean([1.0 - ok[idx].mean() for idx in per.values()])),
                     "to_new": float(np.mean([new[idx].mean() for idx in per.values()]))}
    return out


def mean_ci95(values: list[float]) -> dict:
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if not len(v):
        return {"mean": None, "ci95": None, "n": 0}
    ci = 1.96 * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else 0.0
    return {"mean": round(float(v.mean()), 4), "ci95": round(float(ci), 4), "n": int(len(v))}


def rome_at(bundle, layer: int, n: int, seed: int, known: set[int]) -> dict:
    from mechedit.analysis.requests import counterfactual_requests
    from mechedit.diagnose import get_suite
    from mechedit.edit import run_method
    from mechedit.edit.run import edited_bundle

    reqs = counterfactual_requests(bundle.world, n, None, seed, known)
    suite = get_suite("edit")
    rows, t0 = [], time.perf_counter()
    for i, r in enumerate(reqs):
        if i % 5 == 0:
            print(f"  ROME edit {i + 1}/{len(reqs)} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
        after = edited_bundle(bundle, run_method(bundle, [r], "rome", layer=layer))
        card = suite.fn(bundle, after, [r], n_unrelated=50, n_retain=50)
        flips = sibling_flips(bundle, after, r, known, 20, seed)
        rows.append({"efficacy": card["efficacy"]["after"]["agg_value"],
                     "prob_new_gt_old": card["prob_new_gt_old"]["after"]["agg_value"],
                     "paraphrase": card["paraphrase"]["after"]["agg_value"],
                     "same_relation_change": card.get("same_relation", {}).get("change"),
                     "sibling_flipped": flips["siblings"]["flipped"], "sibling_to_new": flips["siblings"]["to_new"],
                     "n_sibling_facts": flips["siblings"]["n_facts"], "other_flipped": flips["others"]["flipped"],
                     "other_to_new": flips["others"]["to_new"]})
    keys = [k for k in rows[0] if k != "n_sibling_facts"]
    return {"layer": layer, "n": len(rows), "s_per_edit": round((time.perf_counter() - t0) / len(rows), 2),
            **{k: mean_ci95([r[k] for r in rows]) for k in keys},
            "mean_sibling_facts": float(np.mean([r["n_sibling_facts"] for r in rows]))}


def memit_batch(bundle, n: int, seed: int, known: set[int]) -> dict:
    from mechedit.analysis.requests import counterfactual_requests
    from mechedit.diagnose import get_suite
    from mechedit.edit import run_method
    from mechedit.edit.run import edited_bundle

    reqs = counterfactual_requests(bundle.world, n, None, seed + 1, known)
    t0 = time.perf_counter()
    res = run_method(bundle, reqs, "memit")
    card = get_suite("edit").fn(bundle, edited_bundle(bundle, res), reqs, n_unrelated=200, n_retain=100)
    return {"n": len(reqs), "layers": res.info.get("layers"), "seconds": round(time.perf_counter() - t0, 1),
            "efficacy": card["efficacy"]["after"]["agg_value"],
            "prob_new_gt_old": card["prob_new_gt_old"]["after"]["agg_value"],
            "paraphrase": card["paraphrase"]["after"]["agg_value"],
            "same_relation_change": card.get("same_relation", {}).get("change")}


def run_setting(name: str, out: Path, args) -> dict:
    import mechedit
    from mechedit.fileio import write_json_atomic
    from mechedit.model.pipeline import train_checkpoint
    from mechedit.world.identifiability import name_statistics
    from mechedit.world.tokenizer import build_tokenizer

    setting = SETTINGS[name]
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    result_path = d / f"result_t{args.n_trace}_r{args.n_rome}_m{args.n_memit}.json"
    if result_path.is_file() and not args.force:
        return json.loads(result_path.read_text())
    world = world_for(setting)
    ckpt = d / "model"
    if not (ckpt / "mechedit.json").is_file():
        mspec, tspec = model_for(setting, d)
        print(f"[{name}] training {mspec} ...", file=sys.stderr, flush=True)
        train_checkpoint(world, mspec, tspec, ckpt, force=True,
                         progress=lambda row: print(f"[{name}] epoch {row['epoch']} cloze {row['cloze']:.3f} "
                                                    f"paraphrase {row['paraphrase']:.3f} {row['seconds']:.0f}s",
                                                    file=sys.stderr, flush=True))
    bundle = mechedit.load(ckpt)
    meta = bundle.meta
    stats = name_statistics(bundle.world, bundle.tokenizer if bundle.world.spec.tokenizer != "word" else None)
    for unit in stats.values():
        unit.pop("mi_by_relation", None)
    rec = meta["final_recall"]["trained"]["by_kind"]
    res = {"setting": name, "lever": setting["lever"], "world_spec": bundle.world.spec.to_dict(),
           "model_spec": meta["model_spec"], "train": {**time_to_targets(meta), "total_seconds": meta["train_seconds"],
                                                       "total_epochs": meta["epochs"], "final_recall": rec},
           "names": stats, "mechedit_version": mechedit.__version__, "threads": torch.get_num_threads()}
    print(f"[{name}] tracing {args.n_trace} facts", file=sys.stderr, flush=True)
    res["trace"] = trace_profile(bundle, args.n_trace, args.seed, d / f"trace_t{args.n_trace}")
    known = known_facts(bundle)
    print(f"[{name}] ROME at layer {res['trace']['mlp_layer']}, {args.n_rome} single edits", file=sys.stderr, flush=True)
    res["rome"] = rome_at(bundle, res["trace"]["mlp_layer"], args.n_rome, args.seed, known)
    if args.n_memit:
        print(f"[{name}] MEMIT, {args.n_memit} edits in one call", file=sys.stderr, flush=True)
        res["memit"] = memit_batch(bundle, args.n_memit, args.seed, known)
    write_json_atomic(result_path, res)
    return res


def _fmt(x, nd=2):
    return "–" if x is None else f"{x:.{nd}f}"


def table(results: list[dict]) -> str:
    """Markdown table: one row per setting."""
    head = ("| setting | train s (epochs) to targets | last word / token unique | MI(first; obj) / MI(last; obj) in H (objects shuffled) | "
            "MLP IE at last subj tok by layer | MLP IE at last tok by layer | attn IE at last tok by layer | "
            "located MLP | ROME eff / para | sibling flipped (others) |")
    lines = [head, "|" + "---|" * 10]
    for r in results:
        tr, nm = r["train"], r["names"]
        unit = nm.get("tokens", nm["words"])
        mi = nm["words"]["mi_mean"]
        h = mi["entropy_object"]
        mi_s = (f"{mi['mi_first'] / h:.2f} / {mi['mi_last'] / h:.2f} "
                f"({mi['mi_first_shuffled'] / h:.2f} / {mi['mi_last_shuffled'] / h:.2f})")
        prof = r["trace"]["profile"]
        mlp = " ".join(_fmt(x) for x in prof["mlp"]["last_subject"]["mean"])
        att = " ".join(_fmt(x) for x in prof["attn"]["last"]["mean"])
        mlp_last = " ".join(_fmt(x) for x in prof["mlp"]["last"]["mean"])
        train = f"{tr['seconds']:.0f} ({tr['epochs']})" + ("" if tr["reached"] else " not reached")
        uniq = f"{nm['words']['last_unique']:.2f}" + (f" / {nm['tokens']['last_unique']:.2f}" if "tokens" in nm else "")
        rome = r["rome"]
        lines.append(
            f"| {r['setting']} | {train} | {uniq} | {mi_s} | {mlp} | {mlp_last} | {att} | {r['trace']['mlp_layer']} | "
            f"{_fmt(rome['efficacy']['mean'])} / {_fmt(rome['paraphrase']['mean'])} | "
            f"{_fmt(rome['sibling_flipped']['mean'])} ({_fmt(rome['other_flipped']['mean'])}) |")
        del unit
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"comma list of {', '.join(SETTINGS)}")
    ap.add_argument("--out", default=str(ROOT / "runs" / "localization_study"))
    ap.add_argument("--n-trace", type=int, default=100)
    ap.add_argument("--n-rome", type=int, default=50)
    ap.add_argument("--n-memit", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="recompute results (trained models are kept)")
    ap.add_argument("--table", action="store_true", help="only print the table of the finished results")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    names = [s for s in args.settings.split(",") if s]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
        ap.error(f"unknown setting {unknown[0]!r} (known: {', '.join(SETTINGS)})")
    results = []
    for name in names:
        if args.table:
            found = sorted((out / name).glob("result_*.json"))
            if found:
                results.append(json.loads(found[-1].read_text()))
            continue
        res = run_setting(name, out, args)
        print(json.dumps({k: res[k] for k in ("setting", "train")} | {
            "mlp_layer": res["trace"]["mlp_layer"], "attn_last_layer": res["trace"]["attn_last_layer"],
            "rome": {k: res["rome"][k] for k in ("efficacy", "paraphrase", "sibling_flipped", "other_flipped")},
            **({"memit": res["memit"]} if "memit" in res else {})}), flush=True)
        results.append(res)
    if results:
        print(table(results))


if __name__ == "__main__":
    main()
