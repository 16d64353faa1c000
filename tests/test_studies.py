"""The source studies: the exposure world option, findings and their verdicts, tiny study specs end to end."""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from mechedit.analysis import load_analysis, run_analysis
from mechedit.analysis.findings import Finding, evaluate, parse_findings
from mechedit.errors import SpecError
from mechedit.world import generate_world, tiny_world_spec
from mechedit.world.world import World

HERE = Path(__file__).parent
STUDIES = HERE / "studies"
ROOT = HERE.parent


def cli(*args):
    return subprocess.run([sys.executable, "-m", "mechedit.cli", *map(str, args)], capture_output=True, text=True)


# ---- exposure ------------------------------------------------------------------------------
def test_uniform_exposure_keeps_the_world_and_its_bytes(tmp_path):
    spec = tiny_world_spec()
    plain = generate_world(spec)
    assert all(f.exposure == 1 for f in plain.facts)
    assert "exposure" not in plain.to_dict()["spec"] and "exposure" not in plain.to_dict()["facts"][0]
    two = generate_world(dataclasses.replace(spec, exposure="two_level", exposure_popular_fraction=0.25,
                                             exposure_popular_count=7, exposure_rare_count=2))
    same = lambda f: (f.subject, f.relation, f.object, f.heldout_template)  # noqa: E731
    assert [same(f) for f in plain.facts] == [same(f) for f in two.facts]  # only the counts differ
    assert sorted(two.exposure_levels()) == [2, 7]
    # one count per main subject, the smallest for other entities
    for s in two.subjects:
        counts = {f.exposure for f in two.facts_of(s.id)}
        assert len(counts) == 1
        if s.kind != "subject":
            assert counts == {2}
    popular = {s.id for s in two.subjects if s.kind == "subject" and two.facts_of(s.id)[0].exposure == 7}
    assert len(popular) == round(0.25 * spec.n_subjects)
    # recorded per fact in world.json and read back
    two.save(tmp_path)
    back = World.load(tmp_path)
    assert [f.exposure for f in back.facts] == [f.exposure for f in two.facts]


def test_corpus_repeats_each_fact_exposure_times():
    spec = dataclasses.replace(tiny_world_spec(), exposure="two_level", exposure_popular_fraction=0.3,
                               exposure_popular_count=5, alias_share=0.0, crosslingual_share=0.0)
    w = generate_world(spec)
    counts = Counter(w.corpus())
    checked = set()
    for f in w.train_facts:
        for t in range(w.n_templates):
            if t != f.heldout_template:
                assert counts[f"{w.prompt(f, t)} {f.object}"] == f.exposure
        assert counts[f"{w.prompt(f, f.heldout_template)} {f.object}"] == 0  # held-out template never trained
        checked.add(f.exposure)
    assert checked == {1, 5}
    # excluding a popular fact removes all its repetitions and nothing else
    f = next(f for f in w.train_facts if f.exposure == 5)
    rest = Counter(w.corpus(exclude_facts={f.index}))
    assert sum(counts.values()) - sum(rest.values()) == 5 * (w.n_templates - 1 + 1)


def test_zipf_exposure_levels():
    for s_, top in ((1.0, [8, 4, 3, 2, 2]), (2.0, [8, 2, 1, 1, 1])):  # round(8 / r ** s) for ranks 1..5
        w = generate_world(dataclasses.replace(tiny_world_spec(), exposure="zipf", exposure_max=8, exposure_zipf_s=s_))
        by_subject = sorted((w.facts_of(s.id)[0].exposure for s in w.subjects if s.kind == "subject"), reverse=True)
        assert by_subject[:5] == top and by_subject[-1] == 1


@pytest.mark.parametrize("change, key", [
    ({"exposure": "popular"}, "exposure"),
    ({"exposure": "two_level", "exposure_popular_fraction": 1.5}, "exposure_popular_fraction"),
    ({"exposure": "two_level", "exposure_popular_count": 0}, "exposure counts"),
    ({"exposure": "zipf", "exposure_zipf_s": 0.0}, "exposure_zipf_s"),
])
def test_bad_exposure_options_name_the_key(change, key):
    with pytest.raises(SpecError, match=key):
        dataclasses.replace(tiny_world_spec(), **change).validate()


def test_request_sets_by_exposure():
    from mechedit.analysis.requests import counterfactual_requests, forget_requests
    from mechedit.analysis.spec import RequestSet

    w = generate_world(dataclasses.replace(tiny_world_spec(), exposure="two_level", exposure_popular_fraction=0.3,
                                           exposure_popular_count=4))
    expo = lambda r: w.fact(r.subject, r.relation).exposure  # noqa: E731
    reqs = counterfactual_requests(w, 6, exposure="balanced")
    assert Counter(expo(r) for r in reqs) == {1: 3, 4: 3}
    assert {expo(r) for r in counterfactual_requests(w, 3, exposure=4)} == {4}
    forget = forget_requests(w, RequestSet("f", "forget", "batch", subjects=4, exposure="balanced"))
    assert Counter(expo(r) for r in forget) == {1: 2 * 4, 4: 2 * 4}  # 2 subjects x 4 facts per level
    # the draw without an exposure constraint is the one it always was
    plain = generate_world(tiny_world_spec())
    assert counterfactual_requests(plain, 4) == counterfactual_requests(w, 4)


# ---- findings on synthetic case records ------------------------------------------------------
def _case(method, values, requests="single", params=None, layer=None, exposure_subjects=None):
    """A case record of an "each" request set: one per-edit summary per request."""
    per = [{"summary": {"m": v}, "requests": [{"subject": s, "relation": "capital", "new_object": "x"}]}
           for v, s in zip(values, exposure_subjects or [f"s{i}" for i in range(len(values))])]
    return {"id": f"{method}-{layer}", "method": method, "params": params or {}, "layer": layer,
            "layer_used": layer, "requests": requests, "per_edit": per,
            "summary": {"m": sum(values) / len(values)}}


def _finding(test, value, where=None, direction="greater", margin=0.0):
    return Finding("F", "claim", "src", "m", where or {"method": "a"}, test, value, direction, margin)


def test_threshold_verdicts():
    hi = _case("a", [1.0] * 20)
    lo = _case("a", [0.0] * 20)
    mixed = _case("a", [1.0, 0.0] * 10)
    assert evaluate(_finding("at_least", 0.9), [hi])["verdict"] == "holds"
    assert evaluate(_finding("at_least", 0.9), [lo])["verdict"] == "fails"
    assert evaluate(_finding("at_least", 0.5), [mixed])["verdict"] == "inconclusive"
    assert evaluate(_finding("at_most", 0.1), [lo])["verdict"] == "holds"
    row = evaluate(_finding("at_least", 0.9), [mixed])
    assert row["measured"][0]["n"] == 20 and row["measured"][0]["mean"] == pytest.approx(0.5)
    lo_, hi_ = row["measured"][0]["ci95"]
    assert lo_ < 0.5 < hi_ and hi_ - lo_ < 0.6


def test_than_is_paired_on_shared_requests_and_follows_the_direction():
    # a beats b on every request by 0.1, but requests vary a lot: only a paired comparison sees it
    base = [0.1 * (i % 8) for i in range(16)]
    a = _case("a", [v + 0.1 for v in base])
    b = _case("b", base)
    f = _finding("than", {"method": "b"})
    row = evaluate(f, [a, b])
    assert row["difference"]["paired"] and row["difference"]["mean"] == pytest.approx(0.1)
    assert row["verdict"] == "holds"
    assert evaluate(dataclasses.replace(f, direction="less"), [a, b])["verdict"] == "fails"
    # different request sets: unpaired, and the spread hides the 0.1
    b2 = dict(b, requests="other")
    row = evaluate(dataclasses.replace(f, value={"method": "b", "requests": "other"}), [a, b2])
    assert not row["difference"]["paired"] and row["verdict"] == "inconclusive"


def test_pooled_request_sets_count_every_unit_once_and_pair_set_by_set():
    # three independent draws: each alone is too small to decide, together they hold
    sets = ("s0", "s1", "s2")
    a = [_case("a", [1.0, 1.0, 0.0, 1.0], requests=r) for r in sets]
    b = [_case("b", [0.0, 1.0, 0.0, 0.0], requests=r) for r in sets]
    f = _finding("at_least", 0.5, {"method": "a", "requests": list(sets)})
    row = evaluate(f, a + b)
    assert row["measured"][0]["n"] == 12 and row["measured"][0]["mean"] == pytest.approx(0.75)
    assert row["measured"][0]["label"].endswith("on s0 + s1 + s2")
    assert evaluate(dataclasses.replace(f, where={"method": "a", "requests": "s0"}), a)["measured"][0]["n"] == 4
    # the same request sets on both sides: per-unit differences within each set
    g = _finding("than", {"method": "b", "requests": list(sets)}, {"method": "a", "requests": list(sets)})
    row = evaluate(g, a + b)
    assert row["difference"]["paired"] and row["difference"]["n"] == 12
    assert row["difference"]["mean"] == pytest.approx(0.5) and row["verdict"] == "holds"
    # a set not finished yet: not run, and says how many are in
    row = evaluate(f, a[:2])
    assert row["verdict"] == "not run" and "2 of its 3" in row["note"]
    # the spec check: a pooled selector names one case per set
    spec_cases = [{"method": c["method"], "params": {}, "layer": None, "requests": c["requests"]} for c in a + b]
    parse_findings([{"claim": "c", "metric": "m", "where": {"method": "a", "requests": list(sets)}, "at_least": 0.5}],
                   spec_cases)
    with pytest.raises(SpecError, match=re.escape("findings[0].where.requests")):
        parse_findings([{"claim": "c", "metric": "m", "where": {"method": "a", "requests": ["s0", "s9"]},
                         "at_least": 0.5}], spec_cases)
    with pytest.raises(SpecError, match=re.escape("findings[0].where")):
        parse_findings([{"claim": "c", "metric": "m", "where": {"requests": list(sets)}, "at_least": 0.5}], spec_cases)


def test_across_layers_chooses_on_half_and_measures_on_the_other():
    # layer 1 wins on the even units (the choice), layer 0 on the odd ones (the measurement)
    l0 = _case("a", [0.0, 1.0] * 8, layer=0)
    l1 = _case("a", [1.0, 0.0] * 8, layer=1)
    row = evaluate(_finding("across", "layer", {"method": "a", "layer": [0, 1]}), [l0, l1])
    assert "layer 1 minus layer 0" in row["difference"]["label"]
    assert row["difference"]["mean"] == pytest.approx(-1.0) and row["verdict"] == "fails"
    # a real layer effect holds on the held-out half
    l0, l1 = _case("a", [0.0, 0.5] * 8, layer=0), _case("a", [1.0] * 16, layer=1)
    assert evaluate(_finding("across", "layer", {"method": "a", "layer": [0, 1]}), [l0, l1])["verdict"] == "holds"


def test_by_exposure_splits_units_by_the_facts_exposure():
    w = generate_world(dataclasses.replace(tiny_world_spec(), exposure="two_level", exposure_popular_fraction=0.3,
                                           exposure_popular_count=4))
    main = [s for s in w.subjects if s.kind == "subject" and not s.heldout]
    pop = [s.name for s in main if w.facts_of(s.id)[0].exposure == 4][:5]
    rare = [s.name for s in main if w.facts_of(s.id)[0].exposure == 1][:5]
    case = _case("a", [0.0] * 5 + [1.0] * 5, exposure_subjects=pop + rare)
    row = evaluate(_finding("by_exposure", True, direction="less"), [case], w)
    assert row["measured"][0]["label"].endswith("seen 4x") and row["measured"][0]["mean"] == 0.0
    assert row["measured"][1]["mean"] == 1.0 and row["verdict"] == "holds"


# ---- spec errors ----------------------------------------------------------------------------
@pytest.mark.parametrize("edit, key", [
    (lambda t: t.replace('at_least = 0.9', ''), "findings[0]"),  # no test
    (lambda t: t.replace('at_least = 0.9', 'at_least = 0.9\nat_most = 0.1'), "findings[0]"),
    (lambda t: t.replace('where = { method = "lora", requests = "single", layer = "all", params = { rank = 4 } }',
                         'where = { method = "lora", requests = "single" }'), "findings[0].where"),  # several cases
    (lambda t: t.replace('params = { rank = 1 } }\n[[findings]]', 'params = { rank = 3 } }\n[[findings]]'),
     "findings[1].than"),
    (lambda t: t.replace('claim = "Layer choice matters"', 'claim = "Layer choice matters"\nverdict = "holds"'),
     "findings[2]: unknown key 'verdict'"),
    (lambda t: t.replace('direction = "less"', 'direction = "lower"', 1), "findings[3].direction"),
    (lambda t: t.replace('layer = [0, 1], params', 'layer = [0], params'), "findings[2].where"),
    (lambda t: t.replace('exposure = "balanced"', 'exposure = "most"', 1), "requests.single.exposure"),
    (lambda t: t.replace('[requests.forget_subject]\nsubjects = 1', '[requests.forget_subject]\nsubjects = 1\n'
                         'knowledge = "recent"'), "requests.forget_subject.knowledge"),
    (lambda t: t.replace('preset = "tiny"', 'preset = "tiny"\nfinetune_facts = 3'), "model.finetune_facts"),
])
def test_bad_study_specs_exit_2_naming_the_key(tmp_path, edit, key):
    text = edit((STUDIES / "behemoth_tiny.toml").read_text())
    (tmp_path / "world_tiny.toml").write_text((STUDIES / "world_tiny.toml").read_text())
    spec = tmp_path / "s.toml"
    spec.write_text(text)
    with pytest.raises(SpecError, match=re.escape(key)):
        load_analysis(spec)
    if key == "findings[0].where":  # the CLI path (one line, exit 2) once; the others share it
        r = cli("run", spec, "-o", tmp_path / "run")
        assert r.returncode == 2 and key in r.stderr and "Traceback" not in r.stderr


def test_icu_beyond_the_instructions_is_refused_before_the_run(tmp_path):
    """The full RWKU spec once stopped hours in at its ICU case (10 subjects, instructions of at most 3):
    the world check finds it before the run folder is written, naming the key that lifts the limit."""
    from mechedit.analysis.runner import check_world_fit, resolve_model

    for sub in ("worlds", "models"):
        (tmp_path / sub).mkdir()
    for f in ("worlds/rwku.toml", "models/unlearning.toml", "worlds/exposure.toml"):
        (tmp_path / f).write_text((ROOT / "analyses" / f).read_text())
    text = (ROOT / "analyses" / "rwku.toml").read_text()
    spec = tmp_path / "rwku.toml"
    spec.write_text(text)
    good = load_analysis(spec)
    check_world_fit(good, resolve_model(good)[1])  # the shipped spec lifts the limit
    spec.write_text(text.replace("params = { max_subjects = 10 }", ""))
    bad = load_analysis(spec)
    with pytest.raises(SpecError, match=re.escape("params.max_subjects")):
        check_world_fit(bad, resolve_model(bad)[1])
    spec.write_text(text.replace("worlds/rwku.toml", "worlds/exposure.toml"))
    no_instructions = load_analysis(spec)
    with pytest.raises(SpecError, match="forget instructions"):
        check_world_fit(no_instructions, resolve_model(no_instructions)[1])
    r = cli("run", spec, "-o", tmp_path / "run")
    assert r.returncode == 2 and "forget instructions" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["behemoth_quick", "rwku_quick", "editing_as_unlearning_quick",
                                  "behemoth", "rwku", "editing_as_unlearning"])
def test_study_specs_of_the_repository_parse(name):
    spec = load_analysis(ROOT / "analyses" / f"{name}.toml")
    assert spec.findings and all(f.claim for f in spec.findings)


# ---- tiny studies end to end ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_studies(tmp_path_factory):
    """The three tiny study specs run into run folders (one tiny model trained for all, cached)."""
    tmp = tmp_path_factory.mktemp("studies")
    out = {}
    for name in ("behemoth", "rwku", "editing_as_unlearning"):
        res = run_analysis(STUDIES / f"{name}_tiny.toml", tmp / name, workers=1, cache_dir=tmp / "cache")
        assert res["done"] == res["total"]
        out[name] = tmp / name
    return out


@pytest.mark.parametrize("name, ids", [("behemoth", ["RQ5a", "RQ5b", "RQ3a", "RQ4", "EXP"]),
                                       ("rwku", ["R1", "R2", "R6", "EXP1"]),
                                       ("editing_as_unlearning", ["E6", "E1"])])
def test_tiny_study_reports_render_findings_and_exposure(tiny_studies, tmp_path, name, ids):
    import json

    from mechedit.report import studies as S
    from mechedit.report.build import load_run

    r = cli("report", tiny_studies[name], "-o", tmp_path / "report")
    assert r.returncode == 0, r.stderr
    html = (tmp_path / "report" / "index.html").read_text()
    assert "Findings" in html and "By exposure" in html
    spec, cases = load_run(tiny_studies[name])
    world = World.load(spec["checkpoint"])
    rows = S.findings_table(spec, cases, world)
    assert [r["id"] for r in rows] == ids
    md = (tmp_path / "report" / "findings.md").read_text()  # the same table as Markdown
    assert [line.split(" | ")[0] for line in md.splitlines()[4:]] == [f"| {i}" for i in ids]
    for row in rows:
        assert f"<td>{row['id']}</td>" in html and row["verdict"] in ("holds", "fails", "inconclusive")
        m = row["measured"][0]
        assert m["n"] and m["mean"] is not None and m["ci95"] is not None
        if row["id"] == "R1":  # adversarial recall has one unit per forget fact: paired with cloze per fact
            case = next(c for c in cases if c["method"] == "npo")
            assert m["n"] == row["measured"][1]["n"] == case["n_requests"] and row["difference"]["paired"]
        if row["id"] == "E1":  # pooled: every fact of both forget sets, each once
            per_set = [c for c in cases if c["method"] == "ga" and c["requests"].startswith("pretrained")]
            assert m["label"].endswith("on pretrained + pretrained_seed1") and len(per_set) == 2
            assert m["n"] == sum(c["n_requests"] for c in per_set)
        # the verdict follows from the interval it prints
        if row["test"] in ("at_least", "at_most"):
            lo, hi = m["ci95"]
            above = row["test"] == "at_least"
            expect = ("holds" if (lo >= row["threshold"] if above else hi <= row["threshold"]) else
                      "fails" if (hi < row["threshold"] if above else lo > row["threshold"]) else "inconclusive")
        else:
            lo, hi = row["difference"]["ci95"]
            if row["direction"] == "less":
                lo, hi = -hi, -lo
            expect = "holds" if lo > 0 else "fails" if hi < 0 else "inconclusive"
        assert row["verdict"] == expect, row
    if name == "behemoth":  # where each exposure level is recalled, from the run's trace
        tr = S.trace_by_exposure(tiny_studies[name], world)
        assert {r["exposure"] for r in tr["rows"]} == {1, 4} and "peak layer" in html
        assert sum(r["n"] for r in tr["rows"] if r["site"] == "mlp") == len(json.loads(
            (tiny_studies[name] / "trace" / "trace.json").read_text())["facts"])
    if name == "editing_as_unlearning":  # the second stage was trained and each pool drawn from its stage
        saved = json.loads((tiny_studies[name] / "spec.json").read_text())["request_sets"]
        stage2 = set(world.stage2_subjects)
        for pool, inside in (("finetuned", True), ("pretrained", False)):
            subjects = {world.subject(r["subject"]).id for r in saved[pool]["requests"]}
            assert subjects and all((s in stage2) == inside for s in subjects)
