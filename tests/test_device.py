"""Devices without a GPU: `--device` and the spec's `device` key fail in one line when CUDA is absent,
and every compute path keeps its tensors on the model's device.

The second part is how the CUDA path is checked on a CPU-only machine: torch's default device is set to
"meta" while a path runs on a CPU model. A tensor created without naming its device then lands on
"meta" and either fails (mixed devices) or changes the result; on a GPU the same tensor would have
landed on the CPU beside a CUDA model. So "same result as without the meta default" means "no stray
CPU tensor" on the paths checked here; `tests/test_gpu.py` runs them on a real GPU.
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from mechedit.errors import MecheditError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")


@contextlib.contextmanager
def strays_on_meta():
    """Tensors created without a device go to "meta" while this is active."""
    with torch.device("meta"):
        yield


def request(bundle, i=0):
    from mechedit.edit import EditRequest

    f = bundle.world.train_facts[i]
    new = next(o for o in bundle.world.relation(f.relation).objects if o != f.object)
    return EditRequest(bundle.world.subjects[f.subject].name, f.relation, new)


def test_resolve_device():
    from mechedit.device import current_device, resolve_device, use_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(MecheditError, match="unknown device"):
        resolve_device("tpu")
    try:
        assert use_device("cpu") == current_device() == torch.device("cpu")
    finally:
        use_device("auto")


@no_cuda
def test_cuda_without_gpu_is_one_line(tiny_checkpoint, tmp_path):
    from tests.clitools import invoke

    for args in (["trace", str(tiny_checkpoint), "--n", "1", "-o", str(tmp_path / "t")],
                 ["info", str(tiny_checkpoint)]):
        r = invoke(*args, "--device", "cuda")
        assert r.returncode == 2, r.stderr
        assert "no CUDA GPU" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        r = invoke(*args, "--device", "gpu0")
        assert r.returncode == 2 and "unknown device" in r.stderr
    assert not (tmp_path / "t").exists()


def test_spec_device_key(tmp_path):
    from mechedit.analysis.spec import load_analysis
    from mechedit.errors import SpecError

    base = 'name = "d"\n[world]\nspec = "default"\n[model]\npreset = "tiny"\n'
    grid = '[requests.r]\nrelation = "capital"\nn = 1\n[[grid]]\nmethod = "rome"\nrequests = ["r"]\n'
    (tmp_path / "ok.toml").write_text(f'device = "cpu"\n{base}{grid}')
    assert load_analysis(tmp_path / "ok.toml").device == "cpu"
    (tmp_path / "bad.toml").write_text(f'device = "gpu"\n{base}{grid}')
    with pytest.raises(SpecError, match="^device:"):
        load_analysis(tmp_path / "bad.toml")


def test_worker_devices(monkeypatch):
    import mechedit.device as D
    from mechedit.analysis.executors import worker_devices

    assert worker_devices("cpu") is None
    monkeypatch.setattr(D, "visible_gpus", lambda: 3)
    assert worker_devices("cuda:0", "cuda") == ["cuda:0", "cuda:1", "cuda:2"]  # one case per GPU
    assert worker_devices("cuda:0", "auto") == ["cuda:0", "cuda:1", "cuda:2"]
    assert worker_devices("cuda:2", "cuda:2") == ["cuda:2"]


def test_scoring_and_trace_keep_the_models_device(tiny_bundle):
    from mechedit.model.evaluate import score_answers
    from mechedit.trace import trace

    probes = tiny_bundle.world.probes(tiny_bundle.world.train_facts[:6], ("cloze", "qa"))
    args = (tiny_bundle.model, tiny_bundle.tokenizer, [p.prompt for p in probes], [p.answer for p in probes])
    ref = score_answers(*args)
    facts = tiny_bundle.world.train_facts[:3]
    tr = trace(tiny_bundle, facts, samples=2, sites=("resid", "mlp", "attn"), severed=("mlp",))
    with strays_on_meta():
        got = score_answers(*args)
        tr2 = trace(tiny_bundle, facts, samples=2, sites=("resid", "mlp", "attn"), severed=("mlp",))
    np.testing.assert_array_equal(got.logprob, ref.logprob)
    for k in tr.kinds:
        np.testing.assert_array_equal(tr.p_restored[k], tr2.p_restored[k])


@pytest.mark.parametrize("method,params", [
    ("rome", dict(layer=0, steps=8, restarts=2, restart_nll=99.0)),
    ("memit", dict(layer=[0, 1], steps=5)),
    ("alphaedit", dict(layer=[1], steps=5)),
    ("finetune", dict(layer=0, steps=3, n_retain=2)),
])  # lora is not checked here: peft builds its adapters on the default device (under "meta", empty
# ones) and then moves them to the base layer's device; tests/test_gpu.py runs it on a GPU
def test_editors_keep_the_models_device(tiny_bundle, method, params):
    from mechedit.edit import run_method

    reqs = [request(tiny_bundle, 0), request(tiny_bundle, 3)] if method != "rome" else [request(tiny_bundle)]
    torch.manual_seed(0)
    ref = run_method(tiny_bundle, reqs, method, **params)
    torch.manual_seed(0)
    with strays_on_meta():
        got = run_method(tiny_bundle, reqs, method, **params)
    assert set(got.deltas) == set(ref.deltas)
    for name, d in ref.deltas.items():
        assert got.deltas[name].device == d.device
        torch.testing.assert_close(got.deltas[name], d)


@pytest.mark.parametrize("method", ["npo", "rmu"])
def test_unlearning_keeps_the_models_device(tiny_bundle, method):
    from mechedit.edit import run_method

    reqs = [request(tiny_bundle)]
    ref = run_method(tiny_bundle, reqs, method, steps=3)
    with strays_on_meta():
        got = run_method(tiny_bundle, reqs, method, steps=3)
    for name, d in ref.deltas.items():
        torch.testing.assert_close(got.deltas[name], d)


def test_training_keeps_its_device(tiny_world):
    from mechedit.model.spec import PRESETS, TRAIN_PRESETS, with_overrides
    from mechedit.model.train import train_model
    from mechedit.world.tokenizer import build_tokenizer

    tok = build_tokenizer(tiny_world)
    tspec = with_overrides(TRAIN_PRESETS["tiny"], max_epochs=2)
    ref = train_model(tiny_world, tok, PRESETS["tiny"], tspec, device="cpu")
    with strays_on_meta():
        got = train_model(tiny_world, tok, PRESETS["tiny"], tspec, device="cpu")
    drop = lambda curve: [{k: v for k, v in row.items() if k != "seconds"} for row in curve]  # noqa: E731
    assert drop(got.curve) == drop(ref.curve)
    for (n, a), (_, b) in zip(ref.model.state_dict().items(), got.model.state_dict().items()):
        assert torch.equal(a, b), n
