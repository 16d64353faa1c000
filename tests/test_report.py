"""The HTML report's unlearning and editing sections: baselines beside every figure, honest labels."""
from __future__ import annotations

import json

import pytest

from mechedit.analysis import run_analysis
from mechedit.report import build as B

SPEC = """
name = "report"
[world]
spec = "default"
[model]
checkpoint = "{checkpoint}"
[trace]
relation = "capital"
n = 4
samples = 2
sites = ["mlp", "attn"]
[requests.single]
relation = "capital"
n = 1
mode = "each"
[requests.forget1]
forget = "subject:{subject}"
[[grid]]
method = "rome"
layers = [0, 1]
requests = ["single"]
params = {{ steps = 10 }}
[[grid]]
method = "npo"
requests = ["forget1"]
params = {{ steps = 10 }}
[diagnostics]
suites = ["edit"]
forget_suites = ["forget", "leftover"]
options = {{ n_unrelated = 10, n_retain = 10, n_boot = 100 }}
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_checkpoint, tiny_forget, tiny_retrained):
    tmp = tmp_path_factory.mktemp("report")
    subject = tiny_forget.world.subjects[tiny_forget.forget[0].subject].name
    spec = tmp / "a.toml"
    assert tiny_retrained.path.parent == tiny_checkpoint.parent  # the runner's suites find the cached reference
    spec.write_text(SPEC.format(checkpoint=tiny_checkpoint, subject=subject))
    res = run_analysis(spec, tmp / "run", workers=1)
    assert res["done"] == res["total"] == 3
    return tmp / "run"


def test_unlearning_figures_show_original_and_retrained(run_dir, tmp_path, monkeypatch):
    _, cases = B.load_run(run_dir)
    drawn = {}
    for name in ("line_plot", "roc_panels", "bar_plot"):
        real = getattr(B.F, name)
        monkeypatch.setattr(B.F, name, lambda *a, _real=real, _name=name, **kw: drawn.setdefault(_name, (a, kw))
                            and _real(*a, **kw))
    out = B._unlearning(cases, tmp_path)
    assert len(out["figures"]) == 3 and not out["notes"]
    (x, series, _), kw = drawn["line_plot"]
    names = list(series)
    assert names[0].startswith("original model") and names[-1].startswith("retrained without the facts")
    assert any(n.startswith("npo") for n in names) and kw["integer_x"] and kw["hline"][1] == "chance"
    assert x == [0, 1]
    (panels, _), _ = drawn["roc_panels"]
    for span in panels.values():
        assert list(span) == ["original model", "npo", "retrained without the facts"]
    (fams, bars, _), _ = drawn["bar_plot"]
    assert list(bars) == ["original model", "npo", "retrained without the facts"]
    assert all(len(v) == len(fams) for v in bars.values())


def test_report_labels(run_dir, tmp_path):
    index = B.build_report(run_dir, tmp_path / "r")
    html = index.read_text()
    assert "MIA answer, retrained" in html and "probe acc, retrained" in html and "probe chance" in html
    assert "{}" not in html.split('id="layers"')[1].split("</figure>")[0]  # no dict repr in the sweep caption
    assert "steps=10" in html
    assert "† layer 1 is the last block" in html  # the last layer's 0 is explained, not an ordinary 0
    spec = json.loads((run_dir / "spec.json").read_text())
    assert {"mlp", "attn"} <= set(spec["located"])


def test_located_says_none_below_the_noise_floor():
    rows = B._located({"mlp": {"site": "mlp", "layer": 0, "score": 0.5, "token_category": "last_subject", "ci95": 0.1},
                       "attn": {"site": "attn", "layer": 2, "score": 0.002, "token_category": "last_subject",
                                "ci95": 0.004}}, {})
    assert [r["layer"] for r in rows] == [0, "none"] and "noise floor" in rows[1]["note"]
    # an older locations.json without ci95: the interval comes from the summary
    summary = {"overall": {"attn": {"last_subject": {"mean": [0.0, 0.0, 0.002], "ci95": [0.0, 0.0, 0.001]}}}}
    rows = B._located({"attn": {"site": "attn", "layer": 2, "score": 0.002, "token_category": "last_subject"}}, summary)
    assert rows[0]["layer"] == 2


def test_params_label():
    assert B._params_label({}) == "default parameters"
    assert B._params_label('{"steps": 10, "lr": 0.1}') == "lr=0.1, steps=10"
