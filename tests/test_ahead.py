"""Retrained references trained beside the model (mechedit/analysis/ahead.py): a run that trains its
model and the reference of its unlearning case side by side ends with the same bytes -- model,
reference, case files -- as a run that trains the reference in the case, and its case trains nothing."""
from __future__ import annotations

import json
import os

import pytest

import mechedit.model.pipeline as pipeline
from mechedit.analysis import run_analysis
from test_resume import analysis_spec, case_files


def _spec(root):
    """The kill test's analysis, its model stopping at its recall target before max_epochs (so the
    reference must stop where the model did, not at its own recall or the last epoch)."""
    spec = analysis_spec(root)
    (root / "model.json").write_text(json.dumps(
        {"preset": "tiny", "train": {"max_epochs": 30, "eval_every": 5, "target_recall": 0.4}}))
    return spec


def _run(tmp_path, name: str, cores: int, monkeypatch) -> list[bool]:
    """Run the kill test's analysis (a model to train, a GA case on one subject) with `cores` cores
    seen; returns, per training made in this process, whether it left facts out (a reference)."""
    calls: list[bool] = []
    real = pipeline.train_checkpoint

    def counting(*a, **kw):
        calls.append(bool(kw.get("exclude_facts")))
        return real(*a, **kw)

    monkeypatch.setattr(pipeline, "train_checkpoint", counting)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    res = run_analysis(_spec(tmp_path), tmp_path / name, workers=1, cache_dir=tmp_path / f"cache_{name}")
    assert res["done"] == res["total"] == 2
    monkeypatch.undo()
    return calls


def test_reference_ahead_is_the_reference_the_case_would_train(tmp_path, monkeypatch):
    assert _run(tmp_path, "ahead", 2, monkeypatch) == [False]  # the model here; its reference in a child
    assert _run(tmp_path, "alone", 1, monkeypatch) == [False, True]  # one core: the case trains it

    assert case_files(tmp_path / "ahead") == case_files(tmp_path / "alone")
    weights = {name: {p.parent.name: p.read_bytes()
                      for p in sorted((tmp_path / f"cache_{name}" / "models").glob("*/model.safetensors"))}
               for name in ("ahead", "alone")}
    assert len(weights["ahead"]) == 2 and any(".retrain-" in k for k in weights["ahead"])
    assert weights["ahead"] == weights["alone"]  # the model as if alone; the reference as a case trains it
    from mechedit.fileio import read_json

    metas = [read_json(next((tmp_path / f"cache_{n}" / "models").glob("[!.]*.retrain-*")) / "mechedit.json", "meta")
             for n in ("ahead", "alone")]
    assert 5 < metas[0]["epochs"] < 30 and metas[0]["stopped_early"]
    for key in ("retrain", "epochs", "stopped_early", "excluded_facts", "final_recall"):
        assert metas[0][key] == metas[1][key], key
    untimed = [[{k: v for k, v in row.items() if k != "seconds"} for row in m["curve"]] for m in metas]
    assert untimed[0] == untimed[1] and untimed[0]


def test_a_failed_model_training_leaves_no_reference(tmp_path, monkeypatch):
    """The model's training fails half-way: the reference ahead stops and writes nothing."""
    real = pipeline.train_checkpoint

    def failing(*a, on_epoch=None, **kw):
        def boom(epoch, stopping):
            on_epoch(epoch, stopping)
            if epoch == 3:
                raise RuntimeError("disk full")
        return real(*a, on_epoch=boom, **kw)

    monkeypatch.setattr(pipeline, "train_checkpoint", failing)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    with pytest.raises(RuntimeError, match="disk full"):
        run_analysis(_spec(tmp_path), tmp_path / "run", workers=1, cache_dir=tmp_path / "cache")
    models = tmp_path / "cache" / "models"
    assert not list(models.glob("*/mechedit.json"))


def test_a_reference_another_process_trains_is_left_to_it(tmp_path, monkeypatch, tiny_world, tiny_forget):
    """While another process holds a reference's cache lock (a second `mechedit run` training it), the
    child ahead does not wait for that lock -- the model's `Ahead.saved` would wait with it -- but
    counts itself started and leaves the reference to that process; with the lock free it trains."""
    import multiprocessing as mp
    import threading

    import threadpoolctl
    import torch

    import mechedit.analysis.executors as executors
    from mechedit.analysis.ahead import _train_reference
    from mechedit.diagnose.reference import _lock, retrained_path
    from mechedit.model.spec import model_spec

    trained = []
    monkeypatch.setattr(executors, "die_with_parent", lambda parent: None)  # the child's process-wide settings
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr(threadpoolctl, "threadpool_limits", lambda **kw: None)
    monkeypatch.setattr(pipeline, "train_checkpoint", lambda *a, **kw: trained.append(a[3]))
    ckpt = tmp_path / "model"
    out = retrained_path(ckpt, tiny_forget)
    mspec, tspec = model_spec("tiny")

    def child() -> int:  # in a thread: a child that waits for the lock would wait for the test
        started = mp.Value("i", 0)
        t = threading.Thread(target=_train_reference, daemon=True, args=(
            os.getpid(), tiny_world, mspec, tspec, str(ckpt), sorted(tiny_forget.forget_ids),
            mp.Value("i", 0), mp.Value("i", 0), mp.Value("i", 0), started))
        t.start()
        t.join(20)
        assert not t.is_alive(), "the child waits for the lock another process holds"
        return started.value

    with _lock(out.parent / f".{out.name}.lock") as held:
        assert held
        assert child() == 1 and trained == []  # returned at once, training nothing
    assert child() == 1 and trained == [out]
