"""kill -9 anywhere: training, tracing, a case, the report. The rerun loses only the work in flight, ends
with case files byte-identical to an uninterrupted run (and bit-identical weights: training resumes
from its last state), leaves no partial folder or temp file, and no worker outlives the killed command.

Kill points are fault-injection points (mechedit/faults.py: the process SIGKILLs itself, or a pool
worker its command, at the K-th pass of a named point), chosen at random with a fixed seed among
the points an uninterrupted run passes, so the test depends on no timing.
"""
from __future__ import annotations

import collections
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from mechedit.analysis import run_analysis
from mechedit.model.spec import PRESETS, TRAIN_PRESETS, with_overrides
from mechedit.model.train import train_model
from mechedit.world import tiny_world_spec
from mechedit.world.tokenizer import build_tokenizer

SEED = int(os.environ.get("MECHEDIT_KILL_SEED", 16))  # chooses the kill points (set it to explore others)


def analysis_spec(root: Path) -> Path:
    (root / "tinyworld.json").write_text(json.dumps(tiny_world_spec().to_dict()))
    (root / "model.json").write_text(json.dumps({"preset": "tiny", "train": {"max_epochs": 20, "eval_every": 5}}))
    spec = root / "analysis.json"
    spec.write_text(json.dumps({
        "name": "kill", "world": {"spec": "tinyworld.json"}, "model": {"spec": "model.json"},
        "trace": {"relation": "capital", "n": 4, "samples": 2, "sites": ["mlp"]},
        "requests": {"single": {"relation": "capital", "n": 2}, "forget1": {"subjects": 1}},
        "grid": [{"method": "rome", "layers": ["traced"], "requests": ["single"], "params": {"steps": 5}},
                 {"method": "ga", "requests": ["forget1"], "params": {"steps": 3}}],
        "diagnostics": {"suites": ["edit"], "forget_suites": ["forget"], "options": {"n_unrelated": 10, "n_retain": 10}}}))
    return spec


def case_files(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.glob("case_*.json")) if not p.name.endswith(".timing.json")}


def debris(*roots: Path) -> list[Path]:
    """Hidden partial folders and temp files anywhere below `roots`."""
    return [p for r in roots for p in r.rglob(".*") if ".partial." in p.name or ".tmp." in p.name or p.name.endswith(".old")]


def tagged_processes(tag: str) -> list[int]:
    """Live processes whose environment carries `tag` (a killed command's workers would)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if f"MECHEDIT_TEST_TAG={tag}".encode() in (d / "environ").read_bytes().split(b"\0"):
                    state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
                    if state != "Z":
                        pids.append(int(d.name))
            except OSError:
                pass
    return pids


def killed(argv: list, crash_at: str, env: dict, logs: Path) -> None:
    """Run `mechedit ARGV` until the fault point kills it; then no process of it may remain.

    Output goes to files, not pipes: an orphaned worker would hold a pipe open and hide itself
    behind a hanging read instead of being found below."""
    tag = uuid.uuid4().hex
    out = logs / f"{tag}.log"
    with open(out, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "mechedit.cli", *map(str, argv)], stdout=fh, stderr=fh,
                                env={**os.environ, **env, "MECHEDIT_CRASH_AT": crash_at, "MECHEDIT_TEST_TAG": tag})
        rc = proc.wait(timeout=600)
    assert rc == -signal.SIGKILL, f"{crash_at} was not reached: {out.read_text()[-2000:]}"
    deadline = time.monotonic() + 60  # a state to wait for, not a timing: workers die within a second
    while tagged_processes(tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = tagged_processes(tag)
    for pid in survivors:  # do not leave them running; the assertion below reports them
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"{len(survivors)} process(es) outlived the command killed at {crash_at}"


def pick(log: list[str], names: tuple[str, ...], rng: random.Random) -> str:
    """A random point NAME#K among the passes of `names` in an uninterrupted run's log."""
    counts = collections.Counter(n for n in log if n in names)
    choices = [f"{n}#{k}" for n, c in sorted(counts.items()) for k in range(1, c + 1)]
    assert choices, f"the run passed none of {names}"
    return rng.choice(choices)


def test_kill_anywhere_loses_nothing(tmp_path, monkeypatch):
    rng = random.Random(SEED)
    spec = analysis_spec(tmp_path)
    log = tmp_path / "points.log"
    monkeypatch.setenv("MECHEDIT_CRASH_LOG", str(log))
    ref = run_analysis(spec, tmp_path / "ref", workers=1, cache_dir=tmp_path / "cache_ref")
    assert ref["done"] == ref["total"] == 2
    points = log.read_text().split()
    monkeypatch.delenv("MECHEDIT_CRASH_LOG")

    env = {"MECHEDIT_CACHE": str(tmp_path / "cache")}
    logs = tmp_path / "logs"
    logs.mkdir()
    run = ["run", spec, "-o", tmp_path / "run", "--workers", "1"]
    # the training pick is the model's own training (before tracing), not a retrained reference's in a case
    chosen = [pick(points[:points.index("trace.batch")], ("train.epoch", "train.state"), rng),
              pick(points, ("trace.batch", "figure"), rng),
              pick([p for p in points if p == "case.written"][:-1] + ["case.edit"], ("case.edit", "case.written"), rng)]
    killed(run, chosen[0], env, logs)  # during training
    assert debris(tmp_path / "cache"), "a killed training leaves its resumable state"
    killed(run, chosen[1], env, logs)  # during tracing (the training resumed and finished first)
    killed([*run[:-1], "2"], chosen[2], env, logs)  # during a case, two workers busy
    assert len(case_files(tmp_path / "run")) < 2
    res = run_analysis(spec, tmp_path / "run", workers=1, cache_dir=tmp_path / "cache")
    assert res["done"] == 2
    assert case_files(tmp_path / "run") == case_files(tmp_path / "ref")
    # the model and the forget case's retrained reference: the resumed trainings end with the same weights
    models_ref, models = (sorted((tmp_path / c / "models").glob("*/model.safetensors")) for c in ("cache_ref", "cache"))
    assert [p.parent.name for p in models] == [p.parent.name for p in models_ref] and models
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(models, models_ref))
    assert not debris(tmp_path / "run", tmp_path / "cache")

    # the report: killed at a random figure / write / commit, then rerun
    from clitools import invoke

    monkeypatch.setenv("MECHEDIT_CRASH_LOG", str(log))
    log.write_text("")
    assert invoke("report", tmp_path / "ref", "-o", tmp_path / "reports" / "ref").returncode == 0
    monkeypatch.delenv("MECHEDIT_CRASH_LOG")
    point = pick(log.read_text().split(), ("figure", "write", "commit"), rng)
    killed(["report", tmp_path / "run", "-o", tmp_path / "reports" / "run"], point, env, logs)
    assert not (tmp_path / "reports" / "run").exists()
    assert invoke("report", tmp_path / "run", "-o", tmp_path / "reports" / "run").returncode == 0
    assert (tmp_path / "reports" / "run" / "index.html").is_file()
    assert not debris(tmp_path / "reports")
    print("kill points:", chosen, point)


def test_training_resumes_to_identical_weights(tmp_path, tiny_world):
    """Interrupted after its state at epoch 5, a training resumed from that state ends bit-identical."""
    tok = build_tokenizer(tiny_world)
    tspec = with_overrides(TRAIN_PRESETS["tiny"], max_epochs=7, eval_every=3, target_recall=1.0)
    full = train_model(tiny_world, tok, PRESETS["tiny"], tspec)

    class Stop(Exception):
        pass

    def stop_at_6(row):
        if row["epoch"] == 6:
            raise Stop

    state = tmp_path / "state"
    with pytest.raises(Stop):
        train_model(tiny_world, tok, PRESETS["tiny"], tspec, state_dir=state, progress=stop_at_6)
    assert (state / "state.pt").is_file()
    resumed = train_model(tiny_world, tok, PRESETS["tiny"], tspec, state_dir=state)
    for (n, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), n
    assert [r["epoch"] for r in resumed.curve] == [r["epoch"] for r in full.curve] == [3, 6, 7]
    assert [r["loss"] for r in resumed.curve] == [r["loss"] for r in full.curve]
    assert resumed.tokens == full.tokens and resumed.epochs == full.epochs == 7
    # a state of another training is ignored, not resumed
    other = with_overrides(tspec, seed=1)
    again = train_model(tiny_world, tok, PRESETS["tiny"], other, state_dir=state)
    ref = train_model(tiny_world, tok, PRESETS["tiny"], other)
    assert all(torch.equal(p, q) for p, q in zip(again.model.parameters(), ref.model.parameters()))
