"""Analysis runner and reports: bad specs, kill-and-resume, local vs Ray, the HTML report in Chromium."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from clitools import invoke as cli  # in-process; the kill test needs a real process
from conftest import render_in_chromium

from mechedit.analysis import load_analysis, run_analysis
from mechedit.errors import MecheditError, SpecError

HERE = Path(__file__).parent


def write_spec(tmp_path: Path, checkpoint: Path, text: str | None = None) -> Path:
    text = text if text is not None else (HERE / "analysis_tiny.toml").read_text()
    p = tmp_path / "analysis.toml"
    p.write_text(text.replace("CHECKPOINT", str(checkpoint)))
    return p


def case_files(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.glob("case_*.json")) if not p.name.endswith(".timing.json")}




@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_checkpoint):
    """An uninterrupted run of the tiny grid (one worker)."""
    tmp = tmp_path_factory.mktemp("ref")
    spec = write_spec(tmp, tiny_checkpoint)
    res = run_analysis(spec, tmp / "run", workers=1)
    assert res["done"] == res["total"] == 3
    return tmp / "run"


def test_run_folder_layout(reference_run):
    spec = json.loads((reference_run / "spec.json").read_text())
    assert spec["mechedit_version"] and "git" in spec and spec["traced_layer"] is not None
    assert (reference_run / "trace" / "locations.json").is_file()
    for name, data in case_files(reference_run).items():
        rec = json.loads(data)
        per = [e["summary"]["edit.efficacy.after"] for e in rec["per_edit"]]
        assert rec["summary"]["edit.efficacy.after"] == pytest.approx(sum(per) / len(per))  # mean over edits
        assert rec["per_edit"] and rec["per_edit"][0]["drilldown"]
    traced = [json.loads(d) for d in case_files(reference_run).values() if json.loads(d)["layer"] == "traced"]
    assert traced[0]["layer_used"] == spec["traced_layer"]


def test_rerun_skips_finished_cases(reference_run, tiny_checkpoint):
    before = case_files(reference_run)
    spec = Path(json.loads((reference_run / "spec.json").read_text())["spec_path"])
    res = run_analysis(spec, reference_run, workers=1)
    assert res["ran"] == 0 and res["skipped"] == 3
    assert case_files(reference_run) == before


def test_changed_findings_resume_the_run_and_reach_its_report(tmp_path, reference_run):
    """Findings and the description only read the cases: a run resumes after either changes (also a
    run stamped before they were left out of the hash), and its spec.json then holds the new findings.
    A change of what the cases compute is another spec."""
    from mechedit.analysis.spec import computation_hash

    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    before = case_files(run_dir)
    old = json.loads((run_dir / "spec.json").read_text())
    text = Path(old["spec_path"]).read_text()
    finding = ('\n[[findings]]\nclaim = "MEMIT takes a batch"\nmetric = "edit.efficacy.after"\n'
               'where = { method = "memit" }\nat_least = 0.5\n')
    spec = tmp_path / "analysis.toml"
    spec.write_text(text.replace('name = "tiny"', 'name = "tiny"\ndescription = "now described"') + finding)
    res = run_analysis(spec, run_dir, workers=1)
    assert res["ran"] == 0 and res["skipped"] == 3 and case_files(run_dir) == before
    saved = json.loads((run_dir / "spec.json").read_text())
    assert saved["spec"]["findings"][0]["claim"] == "MEMIT takes a batch" and saved["spec_hash"] == old["spec_hash"]
    # a run stamped with the whole spec's hash (findings included), as runs were before
    legacy = computation_hash(saved["spec"], legacy=True)
    (run_dir / "spec.json").write_text(json.dumps({**saved, "spec_hash": legacy}))
    for name, data in case_files(run_dir).items():
        (run_dir / name).write_text(json.dumps({**json.loads(data), "spec_hash": legacy}))
    spec.write_text(text + finding.replace("0.5", "0.9"))
    res = run_analysis(spec, run_dir, workers=1)
    assert res["ran"] == 0 and res["skipped"] == 3
    assert json.loads((run_dir / "spec.json").read_text())["spec"]["findings"][0]["at_least"] == 0.9
    spec.write_text(text.replace("n_unrelated = 20", "n_unrelated = 21"))
    with pytest.raises(MecheditError, match="different spec"):
        run_analysis(spec, run_dir, workers=1)


def test_killed_run_resumes_to_identical_case_files(tmp_path, tiny_checkpoint, reference_run):
    """kill -9 right after the first case file (a fault-injection point, so no timing is involved)."""
    spec = write_spec(tmp_path, tiny_checkpoint)
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "mechedit.cli", "run", str(spec), "-o", str(run_dir),
                           "--workers", "1"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MECHEDIT_CRASH_AT": "case.written#1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    partial = case_files(run_dir)
    assert len(partial) == 1  # the first case file, and not its timing sidecar (written after it)
    assert not list(run_dir.glob("*.timing.json"))
    for data in partial.values():
        json.loads(data)
    res = run_analysis(spec, run_dir, workers=1)
    assert res["skipped"] == 1 and res["done"] == 3
    assert case_files(run_dir) == case_files(reference_run)


def test_traced_twin_is_the_case_it_would_have_been(reference_run):
    """ROME at "traced" and at the traced layer are one computation: the run makes it once and writes
    the "traced" case from its twin. The file must be what running that case gives."""
    from mechedit.analysis.cases import run_case

    spec = json.loads((reference_run / "spec.json").read_text())
    traced = next(c for c in spec["cases"] if c["layer"] == "traced")
    timing = json.loads((reference_run / f"case_{traced['id']}.timing.json").read_text())
    twin = next(c for c in spec["cases"] if c["id"] == timing["twin_of"])
    assert twin["layer"] == spec["traced_layer"] and twin["method"] == traced["method"]
    ctx = {"checkpoint": spec["checkpoint"], "traced_layer": spec["traced_layer"], "request_sets": spec["request_sets"],
           "suites": spec["suites"], "forget_suites": spec["forget_suites"], "spec_hash": spec["spec_hash"],
           "suite_options": load_analysis(spec["spec_path"]).suite_options}
    ran = run_case(traced, ctx)["record"]
    assert json.loads((reference_run / f"case_{traced['id']}.json").read_text()) == json.loads(json.dumps(ran))


def test_rerun_redoes_a_corrupt_case_file(tmp_path, reference_run):
    """A half-written (or foreign) case file is not counted as done: the rerun redoes that case."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    spec = Path(json.loads((run_dir / "spec.json").read_text())["spec_path"])
    names = sorted(case_files(run_dir))
    data = (run_dir / names[0]).read_bytes()
    (run_dir / names[0]).write_bytes(data[: len(data) // 2])
    res = run_analysis(spec, run_dir, workers=1)
    assert res["ran"] == 1 and res["skipped"] == 2
    assert case_files(run_dir) == case_files(reference_run)


def _worker_progress(stderr: str, run_dir: Path) -> dict[str, list[str]]:
    """The progress lines each case's worker sent back (`[time elapsed] case ID > ...`), by case id."""
    ids = [c["id"] for c in json.loads((run_dir / "spec.json").read_text())["cases"]]
    return {i: [line for line in stderr.splitlines() if f"] case {i} > " in line] for i in ids}


def test_local_pool_and_ray_give_the_same_results(tmp_path, tiny_checkpoint, reference_run):
    """Same case files from one worker, a pool and Ray; through the command line, whose progress
    comes back from the pool's and Ray's workers tagged with the case id (and stays out of the files)."""
    from conftest import need

    ray = need("ray")  # fails in CI (which installs the ray extra) instead of skipping
    spec = write_spec(tmp_path, tiny_checkpoint)
    r = cli("run", spec, "-o", tmp_path / "pool", "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert case_files(tmp_path / "pool") == case_files(reference_run)
    seen = _worker_progress(r.stderr, tmp_path / "pool")
    twins = [i for i in seen if "twin_of" in json.loads((tmp_path / "pool" / f"case_{i}.timing.json").read_text())]
    assert len(twins) == 1 and f"(the same computation as case " in r.stderr
    assert all(v for i, v in seen.items() if i not in twins), seen  # every case that ran reported from its worker
    assert all(f"case {i} done" in r.stderr for i in seen)
    ray = pytest.importorskip("ray")
    r = cli("run", spec, "-o", tmp_path / "ray", "--executor", "ray", "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert case_files(tmp_path / "ray") == case_files(reference_run)
    assert all(v for i, v in _worker_progress(r.stderr, tmp_path / "ray").items() if i not in twins)
    assert not ray.is_initialized()


@pytest.mark.parametrize("edit, key", [
    (lambda t: t.replace('method = "memit"', 'method = "bogus"'), "grid[1].method"),
    (lambda t: t.replace('checkpoint = "CHECKPOINT"', 'checkpoint = "/no/such/dir"'), "model.checkpoint"),
    (lambda t: t.split("[[grid]]")[0] + "[diagnostics]\nsuites = [\"edit\"]\n", "grid"),
    (lambda t: t.replace("params = { steps = 10, n_prefixes = 2 }", "params = { nonsense = 1 }", 1), "nonsense"),
    (lambda t: t.replace('[world]\nspec = "default"', '[world]\nspec = "missing.toml"'), "world.spec"),
    (lambda t: t.replace('suites = ["edit"]', 'suites = ["nope"]'), "diagnostics.suites"),
    (lambda t: t.replace('name = "tiny"', 'name = "tiny"\ncolour = 1'), "colour"),
])
def test_bad_analysis_specs_exit_2_naming_the_key(tmp_path, tiny_checkpoint, edit, key):
    text = edit((HERE / "analysis_tiny.toml").read_text())
    spec = write_spec(tmp_path, tiny_checkpoint, text)
    with pytest.raises(SpecError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_analysis(spec)
    r = cli("run", spec, "-o", tmp_path / "run")
    assert r.returncode == 2 and key in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_report_renders_in_headless_chromium(tmp_path, reference_run):
    r = cli("report", reference_run, "-o", tmp_path / "report")
    assert r.returncode == 0, r.stderr
    index = tmp_path / "report" / "index.html"
    html = index.read_text()
    assert "src=\"http" not in html and "href=\"http" not in html  # self-contained, opens offline
    for section in ("Analysis spec", "World and model", "Causal tracing", "Methods", "Cases", "rome", "memit"):
        assert section in html
    assert cli("report", reference_run, "-o", tmp_path / "report").returncode == 2  # no overwrite without --force
    result = render_in_chromium(index, tmp_path)
    if result is None:
        pytest.skip("chromium not installed")
    assert result["errors"] == []
    assert result["images"] >= 3 and result["broken"] == 0
    # every figure is shown at its own size in a 1400 px window (100% zoom): none is scaled down
    assert result["shrunk"] == []


def _visible_text(html: str) -> str:
    """The report's text as a reader sees it: tags, scripts, styles and the JSON blocks (<pre>: the
    spec and method info, shown as JSON on purpose) removed, entities decoded."""
    import html as html_lib
    import re

    html = re.sub(r"<(script|style|pre)\b.*?</\1>", " ", html, flags=re.S)
    html = re.sub(r'src="data:[^"]*"', "", html)
    text = re.sub(r"<[^>]+>", " ", html)
    alts = " ".join(re.findall(r'alt="([^"]*)"', html))
    return html_lib.unescape(text + " " + alts)


def test_report_is_legible_text(tmp_path, reference_run):
    """No Python reprs anywhere a reader looks, one average trace figure for one relation, and the
    early and late site of every traced kind with its interval."""
    import re

    r = cli("report", reference_run, "-o", tmp_path / "report")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1].endswith("index.html") and "efficacy" in r.stdout  # headline, then the path
    html = (tmp_path / "report" / "index.html").read_text()
    text = _visible_text(html)
    for pattern in (r"\{'", r"\['", r"': ", r"\bNone\b", r"\bTrue\b", r"\bFalse\b", r"\{\"", r"array\(", r"<class"):
        m = re.search(pattern, text)
        assert m is None, f"{pattern!r}: ...{text[max(0, m.start() - 80) : m.end() + 80]}..."
    assert html.count('alt="Mean indirect effect by token category and layer') == 1  # one relation: one average
    assert "early site: last subject token" in text and "late site: last token" in text
    sites = re.findall(r"<tr><td>(resid|mlp|attn)</td>(.*?)</tr>", html)
    assert [k for k, _ in sites] == ["mlp"]  # the tiny grid traces mlp only
    cells = re.findall(r'<td class="num">([^<]*)</td>', sites[0][1])
    assert len(cells) == 4 and all("±" in c for c in cells[1::2]), cells


def test_twins_only_where_the_computation_is_the_same():
    from mechedit.analysis.runner import twins_of

    def case(i, layer, params=None, method="rome", requests="single"):
        return {"id": i, "method": method, "layer": layer, "params": params or {}, "requests": requests}

    traced, at0 = case("t", "traced"), case("a", 0)
    others = [case("p", 0, {"steps": 5}), case("l", [0]), case("m", 0, method="memit"), case("r", 0, requests="b"),
              case("one", 1)]
    assert twins_of([traced, at0], [traced, at0], 0, lambda c: False) == {"t": at0}
    assert twins_of([traced], [traced, at0], 0, lambda c: True) == {"t": at0}  # done already (a resumed run)
    assert twins_of([traced], [traced, at0], 0, lambda c: False) == {}  # neither run now nor done: run it
    assert twins_of([traced, *others], [traced, *others], 0, lambda c: False) == {}
    assert twins_of([traced, at0], [traced, at0], 1, lambda c: False) == {}
    assert twins_of([traced, at0], [traced, at0], None, lambda c: False) == {}


def test_resumed_run_writes_the_traced_case_from_its_finished_twin(tmp_path, reference_run):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    spec = json.loads((run_dir / "spec.json").read_text())
    traced = next(c for c in spec["cases"] if c["layer"] == "traced")
    for suffix in (".json", ".timing.json"):
        (run_dir / f"case_{traced['id']}{suffix}").unlink()
    res = run_analysis(Path(spec["spec_path"]), run_dir, workers=1)
    assert res["ran"] == 1 and res["skipped"] == 2 and res["done"] == 3
    assert case_files(run_dir) == case_files(reference_run)
