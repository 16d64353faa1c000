"""bf16 inference against fp32: agreement and speed of scoring, causal tracing and a diagnose run.

Everything runs in this one process on one checkpoint, fp32 and bf16 (autocast, `--precision
bfloat16`) side by side, each timed --repeats times, interleaved (the best run counts, as in timeit):

- scoring: every trained fact's cloze, paraphrase and QA prompts through `score_answers`; answer
  disagreements (recalled in one precision, not in the other), top-1 disagreements, max and mean
  |delta log p(answer)|, and the speed ratio;
- tracing: --trace-facts seeded facts, all sites, ROME's 10 noise samples; max |delta| of the
  restored probabilities (and of the clean / corrupted ones), whether the located layer of every
  kind and site agrees, the share of facts whose own best MLP layer agrees, and the speed ratio;
- a diagnose run: one ROME edit scored by the `edit` suite, and one NPO unlearning of a subject
  scored by the `forget`, `leftover` (adversarial, MIA, probes, logit lens), `relearn` and
  `forget_quality` suites; each headline figure in fp32 and bf16, and the largest |delta| over
  every number of the scorecards. The edit and the unlearning themselves run once, in fp32; only
  their scoring changes. `relearn` and `forget_quality` need the model retrained without the
  forgotten subject: the cached one beside the checkpoint (`CHECKPOINT.retrain-HASH`) when it
  exists, else those two suites are left out (this script never trains).

    python benchmarks/bf16_agreement.py /work/main/runs/model
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

import mechedit
from mechedit.device import fast_bf16, use_precision

PRECISIONS = ("float32", "bfloat16")


def best_of(repeats: int, fn) -> tuple[dict, dict]:
    """({precision: result}, {precision: best seconds}): `fn(precision)` run `repeats` times per
    precision, the two interleaved so that a change of the machine's load hits both alike."""
    res, best = {}, {p: float("inf") for p in PRECISIONS}
    for _ in range(repeats):
        for prec in PRECISIONS:
            t = time.perf_counter()
            res[prec] = fn(prec)
            best[prec] = min(best[prec], time.perf_counter() - t)
    return res, best


def scoring(bundle, repeats: int) -> None:
    from mechedit.model.evaluate import score_answers

    probes = bundle.world.probes(bundle.world.train_facts, ("cloze", "paraphrase", "qa"))
    prompts, answers = [p.prompt for p in probes], [p.answer for p in probes]
    score_answers(bundle.model, bundle.tokenizer, prompts[:64], answers[:64], precision="bfloat16")  # warm-up
    res, secs = best_of(repeats, lambda prec: score_answers(bundle.model, bundle.tokenizer, prompts, answers,
                                                            precision=prec))
    a, b = res["float32"], res["bfloat16"]
    d = np.abs(a.logprob - b.logprob)
    kinds = sorted({p.kind for p in probes})
    print(f"scoring: {len(probes)} prompts ({', '.join(f'{k} {sum(p.kind == k for p in probes)}' for k in kinds)}) "
          f"of {len(bundle.world.train_facts)} trained facts")
    print(f"  answer disagreements {int((a.correct != b.correct).sum())}/{len(probes)}, top-1 disagreements "
          f"{sum(x != y for x, y in zip(a.top1, b.top1))}/{len(probes)}; recall fp32 {a.correct.mean():.4f}, "
          f"bf16 {b.correct.mean():.4f}")
    print(f"  |delta log p(answer)|: max {d.max():.4f}, mean {d.mean():.4f}; |delta p(first token)| max "
          f"{np.abs(a.prob_first - b.prob_first).max():.4f}")
    print(f"  speed: fp32 {secs['float32']:.2f} s, bf16 {secs['bfloat16']:.2f} s, "
          f"ratio fp32/bf16 {secs['float32'] / secs['bfloat16']:.2f}x")


def tracing(bundle, n_facts: int, repeats: int, seed: int) -> None:
    from mechedit.trace import select_facts, trace
    from mechedit.trace.result import locate_sites, rank_locations

    facts = select_facts(bundle.world, n=n_facts, seed=seed)
    trace(bundle, facts[:2], precision="bfloat16")  # warm-up
    res, secs = best_of(repeats, lambda prec: trace(bundle, facts, precision=prec, seed=seed))
    a, b = res["float32"], res["bfloat16"]
    print(f"tracing: {a.n_facts} facts ({len(a.skipped)} skipped), kinds {', '.join(a.kinds)}, "
          f"{a.config['samples']} noise samples")
    for k in a.kinds:
        d = np.abs(a.p_restored[k] - b.p_restored[k])
        print(f"  {k:10s} restored p: max |delta| {np.nanmax(d):.4f}, mean {np.nanmean(d):.5f}")
    print(f"  clean p max |delta| {np.abs(a.p_clean - b.p_clean).max():.2e}; corrupted p max |delta| "
          f"{np.abs(a.p_corrupt - b.p_corrupt).max():.4f}")
    sa, sb = locate_sites(a), locate_sites(b)
    agree, total = 0, 0
    for k in a.kinds:
        for where in sa[k]:
            la, lb = sa[k][where], sb[k][where]
            same = (la.layer, la.above_noise) == (lb.layer, lb.above_noise)
            agree, total = agree + same, total + 1
            if not same:
                print(f"  located {k} at {where}: fp32 layer {la.layer} ({'located' if la.above_noise else 'none'}), "
                      f"bf16 layer {lb.layer} ({'located' if lb.above_noise else 'none'})")
    print(f"  located layers (kind x site) agree: {agree}/{total}")
    per = [rank_locations(a, "mlp", fact=d["index"])[0].layer == rank_locations(b, "mlp", fact=d["index"])[0].layer
           for d in a.facts] if "mlp" in a.kinds else []
    if per:
        print(f"  each fact's best MLP layer (last subject token) agrees on {sum(per)}/{len(per)} facts")
    print(f"  speed: fp32 {secs['float32']:.2f} s, bf16 {secs['bfloat16']:.2f} s, "
          f"ratio fp32/bf16 {secs['float32'] / secs['bfloat16']:.2f}x")


def _compare(cards: dict, secs: dict, what: str) -> None:
    from mechedit.analysis.cases import flatten
    from mechedit.diagnose.headline import headline

    flat = {p: flatten(c) for p, c in cards.items()}
    heads = {p: {r["label"]: r for r in headline(f)} for p, f in flat.items()}
    print(f"  {what}:")
    for label, ra in heads["float32"].items():
        rb = heads["bfloat16"].get(label, {})
        refs = "".join(f"; {ref} {ra[ref]:.4f} / {rb.get(ref, float('nan')):.4f}"
                       for ref in ("retrained", "before") if ra.get(ref) is not None)
        print(f"    {label:24s} fp32 {ra['after']:.4f}  bf16 {rb.get('after', float('nan')):.4f}{refs}")
    keys = [k for k in flat["float32"] if k in flat["bfloat16"]]
    pairs = {k: (flat["float32"][k], flat["bfloat16"][k]) for k in keys
             if math.isfinite(flat["float32"][k]) and math.isfinite(flat["bfloat16"][k])}
    d = {k: abs(a - b) / max(1.0, abs(a), abs(b)) for k, (a, b) in pairs.items()}  # relative where |x| > 1
    worst = max(d, key=d.get) if d else None
    print(f"    every number of the scorecard ({len(d)}): {sum(v > 0 for v in d.values())} differ at all; largest "
          f"|delta| / max(1, |x|) {d[worst] if worst else 0:.4f}" + (f" ({worst}: fp32 {pairs[worst][0]:.4g}, "
                                                                      f"bf16 {pairs[worst][1]:.4g})" if worst else ""))
    print(f"    scoring time (bf16 run first): fp32 {secs['float32']:.1f} s, bf16 {secs['bfloat16']:.1f} s, "
          f"ratio {secs['float32'] / secs['bfloat16']:.2f}x")


def scored(before, after, requests, suites, rounds: int = 1, **options):
    """{precision: scorecard}, {precision: best seconds of `rounds`}: the same suites in fp32 and bf16.
    bf16 goes first, so a first call's one-time costs slow bf16, not fp32 (the ratio errs low)."""
    from mechedit.diagnose import cache, diagnose

    cards, secs = {}, {p: float("inf") for p in PRECISIONS}
    for _ in range(rounds):
        for prec in reversed(PRECISIONS):
            use_precision(prec)
            cache._MEMO.clear()  # time each precision from scratch (the memo is keyed by precision anyway)
            t = time.perf_counter()
            cards[prec] = diagnose(before, after, requests, suites, **options)
            secs[prec] = min(secs[prec], time.perf_counter() - t)
    use_precision("float32")
    return cards, secs


def diagnostics(bundle, subject_fact: int, npo_steps: int) -> None:
    from mechedit.edit.api import EditRequest, run_method
    from mechedit.edit.run import edited_bundle
    from mechedit.model.checkpoint import load_checkpoint
    from mechedit.trace import select_facts
    from mechedit.unlearn.targets import parse_forget

    w = bundle.world
    print("diagnose run (the edit / unlearning once in fp32; its scoring in fp32 and in bf16):")
    f = select_facts(w, n=1, seed=1)[0]
    new = next(o for o in w.relation_by_name[f.relation].objects if o != f.object)
    req = [EditRequest(w.subject_of(f).name, f.relation, new)]
    torch.manual_seed(0)
    after = edited_bundle(bundle, run_method(bundle, req, "rome", layer=1))
    cards, secs = scored(bundle, after, req, ("edit",), rounds=2)
    _compare(cards, secs, f"ROME edit of {req[0].subject}|{req[0].relation} -> {new} (layer 1), suite edit")

    subject = w.subject_of(w.facts[subject_fact]).name
    target = parse_forget(w, [f"subject:{subject}"])
    torch.manual_seed(0)
    forgot = edited_bundle(bundle, run_method(bundle, target.requests(), "npo", steps=npo_steps))
    suites, options = ("forget", "leftover"), {"retrained": False}
    ref_dir = Path(str(bundle.path) + f".retrain-{target.hash()}")
    if ref_dir.is_dir():
        ref = load_checkpoint(ref_dir)
        excluded = set(ref.meta.get("excluded_facts", []))
        if excluded == {g.index for g in target.forget}:
            suites, options = ("forget", "leftover", "relearn", "forget_quality"), {"reference": ref}
    if "relearn" not in suites:
        print(f"  (no cached retrained reference at {ref_dir}: relearn and forget_quality left out)")
    cards, secs = scored(bundle, forgot, target.requests(), suites, **options)
    _compare(cards, secs, f"NPO ({npo_steps} steps) forgetting subject {subject!r} ({len(target.forget)} facts), "
                          f"suites {', '.join(suites)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?", default="runs/model")
    ap.add_argument("--trace-facts", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of scoring and tracing; the best counts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--forget-fact", type=int, default=24, help="NPO forgets the subject of this fact")
    ap.add_argument("--npo-steps", type=int, default=80)
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out: scoring, tracing, diagnose")
    args = ap.parse_args()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    bundle = mechedit.load(args.checkpoint)
    print(f"checkpoint {args.checkpoint}: {bundle.n_layers} layers, d_model {bundle.model.config.hidden_size}; "
          f"device {bundle.model.device}, native bf16: {fast_bf16(bundle.model.device)}, "
          f"torch threads {torch.get_num_threads()}")
    if "scoring" not in skip:
        scoring(bundle, args.repeats)
    if "tracing" not in skip:
        tracing(bundle, args.trace_facts, args.repeats, args.seed)
    if "diagnose" not in skip:
        diagnostics(bundle, args.forget_fact, args.npo_steps)


if __name__ == "__main__":
    main()
