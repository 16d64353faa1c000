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

from mechedit.analysis import load_analysis, run_analysis
from mechedit.errors import SpecError

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


def test_local_pool_and_ray_give_the_same_results(tmp_path, tiny_checkpoint, reference_run):
    from conftest import need

    ray = need("ray")  # fails in CI (which installs the ray extra) instead of skipping
    spec = write_spec(tmp_path, tiny_checkpoint)
    run_analysis(spec, tmp_path / "pool", workers=2)
    assert case_files(tmp_path / "pool") == case_files(reference_run)
    run_analysis(spec, tmp_path / "ray", executor_name="ray", workers=2)
    assert case_files(tmp_path / "ray") == case_files(reference_run)
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


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def test_report_renders_in_headless_chromium(tmp_path, reference_run):
    r = cli("report", reference_run, "-o", tmp_path / "report")
    assert r.returncode == 0, r.stderr
    index = tmp_path / "report" / "index.html"
    html = index.read_text()
    assert "src=\"http" not in html and "href=\"http" not in html  # self-contained, opens offline
    for section in ("Analysis spec", "World and model", "Causal tracing", "Methods", "Cases", "rome", "memit"):
        assert section in html
    assert cli("report", reference_run, "-o", tmp_path / "report").returncode == 2  # no overwrite without --force
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: the test command installs it (make test)")
        pytest.skip("chromium not installed")
    probe = """<script>
window.__errors = [];
window.addEventListener('error', function (e) { window.__errors.push(String(e.message || e.target && e.target.src)); }, true);
var _ce = console.error; console.error = function () { window.__errors.push(Array.from(arguments).join(' ')); _ce.apply(console, arguments); };
window.addEventListener('load', function () {
  var imgs = Array.from(document.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).length;
  document.title = 'RESULT ' + JSON.stringify({errors: window.__errors, images: imgs.length, broken: bad});
});
</script>"""
    test_page = tmp_path / "report" / "probe.html"
    test_page.write_text(html.replace("<head>", "<head>" + probe, 1))
    out = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--dump-dom", test_page.as_uri()], capture_output=True, text=True, timeout=120)
    start = out.stdout.find("<title>RESULT ")
    assert start >= 0, out.stderr[-2000:]
    result = json.loads(out.stdout[start + 14 : out.stdout.find("</title>", start)].replace("&quot;", '"'))
    assert result["errors"] == []
    assert result["images"] >= 3 and result["broken"] == 0
