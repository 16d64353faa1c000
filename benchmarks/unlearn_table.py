"""Unlearning table: every method beside the model retrained without the forget facts, with intervals.

Usage: OMP_NUM_THREADS=1 python benchmarks/unlearn_table.py [CHECKPOINT] [--methods ga,npo,...]
       [--sizes 1,10,50] [--seeds 0,1,2] [--max-seeds-from 50] [--knowledge all|pretrained|finetuned]
       [--json out.json] [--reference retrained|none]
       python benchmarks/unlearn_table.py --condense out.json [...]   (compact table of earlier runs)

Pretrained vs fine-tuned knowledge (Li et al. 2025), on analyses/worlds/unlearning.toml:
    benchmarks/unlearn_table.py runs/unlearning --knowledge pretrained      (first-stage, never-named subjects)
    benchmarks/unlearn_table.py runs/unlearning-ft --knowledge finetuned    (subjects of `mechedit finetune-facts`)
A method that cannot run on a set (ICU beyond the instruction lengths it learnt) prints "n/a: why".

Forget sets: for each size N and seed, N trained subjects drawn at random (seeded) and every trained
fact of each; several seeds per size (a quality figure over independent forget sets, never one
set), one seed from `--max-seeds-from` subjects on (the largest sets are costly). For each set:
the original model, the retrained reference (the same training minus the forget facts, same
schedule, stopped at the original's epoch: `mechedit/diagnose/reference.py`; trained once and
cached beside the checkpoint as `<checkpoint>.retrain-<hash>`), and every method with its defaults.
`--reference none` leaves the retrained model out (no retrained row, gaps, relearning or KS columns;
the set's file and table say so): for when its training cannot be afforded - a table without it
compares methods with each other and with chance / non-members only.

Columns (one value per fact; [lo, hi] = seeded 95% bootstrap interval over facts, or over members
and non-members for an AUC; (Δ) = the method's value minus the retrained model's):
forget recall (cloze, paraphrase, QA), mean adversarial recall, neighbour (same relation) and retain
recall, membership-inference AUC (Min-K%++) of forget facts vs vocabulary-matched non-members on the
answer span and on the whole sentence, probe accuracy on the forget facts at the (layer, position)
chosen on validation subjects (chance printed), relearning recovery (recall of the held-out half
after 10 steps on the other half), and the KS forget-quality p-value (n = forget facts).
After the per-set tables: per size, the mean over seeds of each method's gap to the retrained model
(± sd over seeds). Methods: the loss-based unlearners and editing as unlearning (the refusal as
the new object) with their registered defaults, except where METHODS says otherwise (ROME: restarts off);
a method can be skipped on sets of more than `max_requests` requests; add a method by adding it to METHODS.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import mechedit
from mechedit.diagnose import diagnose
from mechedit.diagnose.reference import retrained_reference
from mechedit.edit.api import run_method
from mechedit.errors import MecheditError
from mechedit.model.checkpoint import load_checkpoint
from mechedit.unlearn import parse_forget

# row name -> {"params": overrides of the registered defaults, "max_requests": skip larger forget
# sets (None: never), "method": the registered method when the row name is not one (a variant row),
# "extra": left out of the default --methods list}.
# Extend here (a new registered method needs only its name).
METHODS: dict[str, dict] = {
    "ga": {}, "gd": {}, "npo": {}, "dpo": {}, "rt": {}, "rmu": {},  # loss-based unlearning
    # editing as unlearning ("<refuse>" as the new object). ROME edits one request after another,
    # with restarts off: on the default model the refusal stays at NLL ~9-10 after the first v*
    # search and after every restart (2 requests: 9.94 / 9.32 with 4 restarts, 9.94 / 9.47 without,
    # measured), and restarts make each request ~4x slower.
    "rome": {"params": {"restarts": 0}},
    "memit": {}, "alphaedit": {},
    "grace": {}, "wise": {},  # adaptor editors as unlearners (their forget defaults)
    "repe": {}, "icu": {},  # no weight change: steering, and the forget instruction (instruction worlds only)
    # ICU with an instruction naming more subjects than any training instruction did (not in the default
    # list: outside what the model learnt; e.g. --methods icu_long --sizes 10 on analyses/worlds/unlearning.toml)
    "icu_long": {"method": "icu", "params": {"max_subjects": 64}, "extra": True},
}
DEFAULT_METHODS = [m for m, spec in METHODS.items() if not spec.get("extra")]
SUITES = ("forget", "leftover", "relearn", "forget_quality")


def _get(card: dict, path: str):
    cur = card
    for k in path.split("."):
        if not isinstance(cur, dict) or k not in cur:
            return None
        cur = cur[k]
    return cur


# column -> path of a {"after", "retrained", "gap_to_retrained", "ci95": {"after", "retrained"}} block
COLS = {
    "fgt_cloze": "forget.forget.cloze",
    "fgt_para": "forget.forget.paraphrase",
    "fgt_qa": "forget.forget.qa",
    "adv": "leftover.adversarial.recall",
    "nbr_rel": "forget.neighbours_relation.cloze",
    "retain": "forget.retain.cloze",
    "mia_answer": "leftover.mia.answer.auc_vs_nonmembers.min_k_pp",
    "mia_sentence": "leftover.mia.sentence.auc_vs_nonmembers.min_k_pp",
    "probe": "leftover.probes.accuracy",
}


def row_values(card: dict) -> dict:
    """{column: {"value", "ci95", "retrained", "gap"}} for one method's scorecard."""
    out = {}
    for col, path in COLS.items():
        b = _get(card, path) or {}
        ci = (b.get("ci95") or {}).get("after")
        out[col] = {"value": b.get("after"), "ci95": ci, "retrained": b.get("retrained"),
                    "gap": b.get("gap_to_retrained")}
    rl = card.get("relearn") or {}
    out["relearn"] = {"value": rl.get("recovery"), "ci95": (rl.get("unlearned") or {}).get("ci95"),
                      "retrained": rl.get("recovery_retrained"), "gap": rl.get("gap_to_retrained")}
    fq = card.get("forget_quality") or {}
    out["ks_p"] = {"value": fq.get("ks_pvalue"), "ci95": None, "retrained": None, "gap": None}
    return out


def fmt(cell: dict, gap: bool = True) -> str:
    v = cell["value"]
    if v is None:
        return "-"
    s = f"{v:.3f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"
    if cell.get("ci95"):
        s += f" [{cell['ci95'][0]:.2f},{cell['ci95'][1]:.2f}]"
    if gap and cell.get("gap") is not None:
        s += f" (Δ{cell['gap']:+.2f})"
    return s


KNOWLEDGE = ("all", "pretrained", "finetuned")


def subject_pool(world, knowledge: str = "all") -> list:
    """Forget-set candidates (`mechedit.analysis.requests.knowledge_pool`): "all" trained main subjects,
    "pretrained" the first-stage ones, "finetuned" the second-stage ones."""
    from mechedit.analysis.requests import knowledge_pool

    try:
        return knowledge_pool(world, knowledge)
    except MecheditError as exc:
        raise SystemExit(f"--knowledge {knowledge}: {exc}") from None


def forget_subjects(world, n: int, seed: int, knowledge: str = "all") -> list[str]:
    """`n` subjects of the pool (`subject_pool`) drawn at random with `seed`."""
    subjects = subject_pool(world, knowledge)
    idx = np.random.default_rng([seed, 23]).choice(len(subjects), size=n, replace=False)
    return [subjects[int(i)].name for i in sorted(idx)]


def run_set(checkpoint: str, before, n: int, seed: int, methods: list[str], knowledge: str = "all",
            with_reference: bool = True, diag: dict | None = None, stored: dict | None = None,
            save=None) -> dict:
    """One forget set: every row (original, retrained, each method). `stored`: rows (and the set's
    checks) of an earlier, killed run of the same set, reused as they are; `save(partial)` is called
    after every row, so a killed run resumes at its first unfinished method."""
    w = before.world
    names = forget_subjects(w, n, seed, knowledge)
    target = parse_forget(w, [f"subject:{s}" for s in names])
    reqs = target.requests()
    t0 = time.perf_counter()
    ref = retrained_reference(before, target) if with_reference else None
    ref_s = time.perf_counter() - t0
    about = (f"retrained reference ready in {ref_s:.0f}s, stopped at epoch {ref.meta.get('epochs')}" if ref is not None
             else "NO retrained reference (--reference none)")
    print(f"\n## forget {n} subject(s), seed {seed}: {len(target.forget)} facts ({about})\n", flush=True)
    print_header()
    rows, cards = dict((stored or {}).get("rows", {})), {}
    suites, options = (SUITES, {"reference": ref}) if ref is not None else (("forget", "leftover"), {"retrained": False})
    options.update(diag or {})
    for method in ["original", *(["retrained"] if ref is not None else []), *methods]:
        if method in rows and (method != "original" or (stored or {}).get("sanity")):
            print_row(method, rows[method])
            continue
        t1 = time.perf_counter()
        steps = "-"
        if method == "original":
            after = before
        elif method == "retrained":
            after = ref
        else:
            spec = METHODS.get(method, {})
            if spec.get("max_requests") is not None and len(reqs) > spec["max_requests"]:
                print(f"| {method} | skipped: {len(reqs)} requests > max_requests {spec['max_requests']} |", flush=True)
                continue
            after = load_checkpoint(checkpoint)
            try:
                res = run_method(before, reqs, spec.get("method", method), **spec.get("params", {}))
            except MecheditError as exc:  # e.g. ICU on more subjects than the model learnt to name at once
                print(f"| {method} | n/a: {exc} |", flush=True)
                continue
            res.apply(after.model)
            steps = res.info.get("steps_run", "-")
        card = diagnose(before, after, reqs, suites, **options)
        vals = row_values(card)
        rows[method] = {"values": vals, "steps": steps, "sec": round(time.perf_counter() - t1, 1)}
        cards[method] = card
        print_row(method, rows[method])
        if method == "original":
            stored = {**(stored or {}), "sanity": set_checks(card, target, names, ref, ref_s)}
        if save is not None:
            save({"size": n, "seed": seed, "rows": rows, "sanity": stored["sanity"]})
    result = {"size": n, "seed": seed, "rows": rows, "sanity": stored["sanity"]}
    print_checks(result)
    return result


def set_checks(original_card: dict, target, names: list[str], ref, ref_s: float) -> dict:
    """The design checks of a set, from the original model's card (MIA design, model-free AUCs, probe
    split and choice, relearning and KS sizes, the reference's training)."""
    cards = {"original": original_card}
    lo = cards["original"]["leftover"]
    mia = lo["mia"]
    sanity = {
        "n_forget_facts": len(target.forget), "forget_subjects": names,
        "mia_design": mia["design"], "mia_n": mia["n"],
        "model_free_auc": {span: {score: {c: d["auc"] for c, d in comps.items()} for score, comps in v.items()}
                           for span, v in mia["model_free"].items()},
        "mia_retain_vs_nonmembers_original": {sp: mia[sp]["auc_retain_vs_nonmembers"]["min_k_pp"]["before"]
                                              for sp in ("sentence", "answer")},
        "probe_chance": lo["probes"].get("chance"),
        "probe_split": {k: lo["probes"].get(k) for k in ("n_train_subjects", "n_validation_subjects")},
        "probe_selected": {tag: (lo["probes"].get(tag) or {}).get("selected") for tag in ("before", "retrained")},
        "probe_validation_accuracy": {tag: (lo["probes"].get(tag) or {}).get("validation_accuracy")
                                      for tag in ("before", "retrained")},
        "relearn_n_scored": (cards["original"].get("relearn") or {}).get("n_scored_facts"),
        "ks_n_facts": (cards["original"].get("forget_quality") or {}).get("n_facts"),
        "reference": "retrained" if ref is not None else "none",
        "reference_epochs": ref.meta.get("epochs") if ref is not None else None,
        "reference_seconds": round(ref_s, 1),
        "reference_recall": {k: (ref.meta.get("final_recall", {}).get(k) or {}).get("by_kind")
                             for k in ("trained", "excluded")} if ref is not None else None,
    }
    return sanity


def print_header() -> None:
    print("| method | " + " | ".join(list(COLS) + ["relearn", "ks_p"]) + " | steps | sec |")
    print("|---" * (len(COLS) + 5) + "|")


def print_row(method: str, row: dict) -> None:
    gap = method not in ("original", "retrained")
    print(f"| {method} | " + " | ".join(fmt(v, gap) for v in row["values"].values()) +
          f" | {row['steps']} | {row['sec']:.0f} |", flush=True)


def print_checks(result: dict) -> None:
    sanity = result["sanity"]
    mia = {"design": sanity["mia_design"]}
    mf = sanity["model_free_auc"]
    print(f"\nchecks: non-members {mia['design']['n_texts']} texts of {mia['design']['n_subjects']} subjects "
          f"({mia['design']['heldout_subjects_all_words_trained']} held-out, {mia['design']['synthetic_subjects']} "
          f"synthetic); model-free AUC retained vs non-members: unseen words "
          f"{mf['sentence']['unseen_words']['auc_retain_vs_nonmembers']:.3f}, unigram frequency "
          f"{mf['sentence']['unigram_logfreq']['auc_retain_vs_nonmembers']:.3f} (sentence), "
          f"{mf['answer']['unigram_logfreq']['auc_retain_vs_nonmembers']:.3f} (answer); Min-K%++ AUC of the "
          f"original, retained vs non-members: sentence {sanity['mia_retain_vs_nonmembers_original']['sentence']:.3f}, "
          f"answer {sanity['mia_retain_vs_nonmembers_original']['answer']:.3f}; probe chance "
          f"{sanity['probe_chance']:.3f}, split {sanity['probe_split']}, chosen {sanity['probe_selected']}; "
          f"relearn scored on {sanity['relearn_n_scored']} facts; KS n = {sanity['ks_n_facts']} facts per model; "
          f"reference: {sanity.get('reference', 'retrained')}",
          flush=True)


def cached_set(resume_dir: str, checkpoint: str, before, n: int, seed: int, methods: list[str],
               knowledge: str = "all", with_reference: bool = True, diag: dict | None = None) -> dict:
    """`run_set`, or its stored result from `resume_dir` (same size, seed and methods): a killed table
    resumes at the first unfinished forget set."""
    import os

    name = f"set_{n}_{seed}.json" if knowledge == "all" else f"set_{knowledge}_{n}_{seed}.json"
    if not with_reference:
        name = name.replace(".json", "_noref.json")
    path = os.path.join(resume_dir, name) if resume_dir else None
    stored = None
    if path and os.path.isfile(path):
        with open(path) as fh:
            stored = json.load(fh)
        if stored.get("diagnose_options", {}) != (diag or {}):
            stored = None  # other diagnose options: every row again
        elif stored.get("complete") and stored.get("methods") == methods:
            print(f"\n## forget {n} subject(s), seed {seed}: {stored['sanity']['n_forget_facts']} facts (stored in {path})\n")
            print_header()
            for m, row in stored["rows"].items():
                print_row(m, row)
            print_checks(stored)
            return stored
        else:  # a killed run, or other methods: keep the rows of methods still asked for
            keep = {"original", "retrained", *methods}
            stored = {**stored, "rows": {m: r for m, r in stored.get("rows", {}).items() if m in keep}}

    def save(partial: dict, complete: bool = False) -> None:
        if not path:
            return
        os.makedirs(resume_dir, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({**partial, "methods": methods, "diagnose_options": diag or {}, "complete": complete},
                      fh, indent=1, default=str)
        os.replace(tmp, path)

    res = run_set(checkpoint, before, n, seed, methods, knowledge, with_reference, diag, stored, save)
    save(res, complete=True)
    return {**res, "methods": methods, "diagnose_options": diag or {}, "complete": True}


def summarize(sets: list[dict], methods: list[str]) -> dict:
    """Per size: each method's mean value and mean gap to the retrained model over seeds (± sd)."""
    out: dict = {}
    for n in sorted({s["size"] for s in sets}):
        group = [s for s in sets if s["size"] == n]
        out[n] = {"n_sets": len(group), "methods": {}}
        print(f"\n## size {n}: mean over {len(group)} forget set(s) (seeds {[s['seed'] for s in group]}); "
              "value, and gap to the retrained model ± sd over seeds\n")
        cols = list(group[0]["rows"]["original"]["values"])
        print("| method | " + " | ".join(cols) + " |")
        print("|---" * (len(cols) + 1) + "|")
        for m in ["original", "retrained", *methods]:
            cells, store = [], {}
            runs = [s for s in group if m in s["rows"]]
            if not runs:
                continue
            for c in cols:
                vals = [s["rows"][m]["values"][c]["value"] for s in runs]
                vals = [v for v in vals if v is not None]
                gaps = [s["rows"][m]["values"][c]["value"] - s["rows"]["retrained"]["values"][c]["value"]
                        for s in runs if "retrained" in s["rows"] and s["rows"][m]["values"][c]["value"] is not None
                        and s["rows"]["retrained"]["values"][c]["value"] is not None]
                if not vals:
                    cells.append("-")
                    continue
                mean = float(np.mean(vals))
                store[c] = {"mean": mean, "gap_mean": float(np.mean(gaps)) if gaps else None,
                            "gap_sd": float(np.std(gaps, ddof=1)) if len(gaps) > 1 else None, "n_sets": len(vals)}
                txt = f"{mean:.3f}"
                if gaps and m != "retrained" and c != "ks_p":
                    txt += f" (Δ{store[c]['gap_mean']:+.2f}" + (f"±{store[c]['gap_sd']:.2f}" if store[c]["gap_sd"] is not None else "") + ")"
                cells.append(txt)
            out[n]["methods"][m] = store
            print(f"| {m} | " + " | ".join(cells) + " |", flush=True)
    return out


CONDENSED = ("fgt_cloze", "adv", "nbr_rel", "mia_answer", "probe", "relearn")


def condense(paths: list[str], cols: tuple[str, ...] = CONDENSED) -> None:
    """One markdown table per `--json` file of this script: a row per method, a cell per forget size
    holding the mean over that size's sets of each column in `cols` (the retrained row's own values;
    ICU's "n/a" where it could not run), with the number of sets per size in the header."""
    for path in paths:
        try:
            with open(path) as fh:
                data = json.load(fh)
            data["summary"], data["methods"], data["checkpoint"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SystemExit(f"--condense {path}: not a table written by --json ({type(exc).__name__}: {exc})") from None
        summary = {int(k): v for k, v in data["summary"].items()}
        sizes = sorted(summary)
        methods = ["original", "retrained", *data["methods"]]
        print(f"\n{path}: {data['checkpoint']}; cells: {' / '.join(cols)}\n")
        print("| method | " + " | ".join(f"{n} subject(s), {summary[n]['n_sets']} set(s)" for n in sizes) + " |")
        print("|---" * (len(sizes) + 1) + "|")
        for m in methods:
            cells = []
            for n in sizes:
                store = summary[n]["methods"].get(m)
                cells.append("n/a" if not store else
                             " / ".join(f"{store[c]['mean']:.2f}" if c in store else "-" for c in cols))
            print(f"| {m} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?", default="runs/model")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    ap.add_argument("--sizes", default="1,10")
    ap.add_argument("--seeds", default="0,1,2", help="forget-set seeds for every size below --max-seeds-from")
    ap.add_argument("--max-seeds-from", type=int, default=50, help="sizes from here on use the first seed only")
    ap.add_argument("--json", default="", help="also write every row, the sanity checks and the summary here")
    ap.add_argument("--knowledge", default="all", choices=KNOWLEDGE,
                    help="forget-set pool: all trained subjects, pretrained (first stage) or finetuned (second stage)")
    ap.add_argument("--resume-dir", default="", help="store each finished forget set here and reuse it on a rerun")
    ap.add_argument("--reference", default="retrained", choices=("retrained", "none"),
                    help="none: no retrained model (no retrained row, gaps, relearning, KS) - see the module doc")
    ap.add_argument("--probe-max-train", type=int, default=None, help="probe training prompts per relation "
                    "(the leftover suite's default 3000 when not given)")
    ap.add_argument("--n-boot", type=int, default=None, help="bootstrap resamples (default 1000)")
    ap.add_argument("--condense", nargs="+", metavar="JSON", help="print the compact table of earlier --json "
                    "files (README) and exit")
    args = ap.parse_args()
    if args.condense:
        condense(args.condense)
        return
    diag = {k: v for k, v in (("probe_max_train", args.probe_max_train), ("n_boot", args.n_boot)) if v is not None}
    torch.set_num_threads(1)
    methods = [m for m in args.methods.split(",") if m]
    before = mechedit.load(args.checkpoint)
    seeds = [int(x) for x in args.seeds.split(",")]
    t0 = time.perf_counter()
    sets = []
    for n in [int(x) for x in args.sizes.split(",")]:
        for seed in (seeds if n < args.max_seeds_from else seeds[:1]):
            sets.append(cached_set(args.resume_dir, args.checkpoint, before, n, seed, methods, args.knowledge,
                                   args.reference == "retrained", diag))
    summary = summarize(sets, methods)
    total = time.perf_counter() - t0
    print(f"\ntotal {total:.0f}s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"checkpoint": args.checkpoint, "methods": {m: METHODS.get(m, {}) for m in methods},
                       "diagnose_options": diag,
                       "sets": sets, "summary": summary, "seconds": round(total, 1)}, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
