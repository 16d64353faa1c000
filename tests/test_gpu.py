"""CUDA: the trace engine and one ROME edit agree with the CPU within bf16/fp32 tolerance (marked `gpu`;
skipped without a CUDA GPU, run on a GPU machine with `pytest -m gpu`)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_trace_cpu_equals_cuda(tiny_bundle):
    from mechedit.model.checkpoint import Bundle
    from mechedit.trace import trace

    facts = tiny_bundle.world.train_facts[:4]
    cpu = trace(tiny_bundle, facts, samples=3, sites=("resid", "mlp", "attn"))
    gpu_bundle = Bundle(copy.deepcopy(tiny_bundle.model).cuda(), tiny_bundle.tokenizer, tiny_bundle.world,
                        tiny_bundle.meta, tiny_bundle.path)
    gpu = trace(gpu_bundle, facts, samples=3, sites=("resid", "mlp", "attn"))
    np.testing.assert_allclose(cpu.p_clean, gpu.p_clean, atol=1e-4)
    for k in cpu.kinds:
        np.testing.assert_allclose(cpu.p_restored[k], gpu.p_restored[k], atol=1e-3, equal_nan=True)


def test_rome_cpu_equals_cuda(tiny_bundle):
    from mechedit.edit import EditRequest, run_method
    from mechedit.model.checkpoint import Bundle

    f = tiny_bundle.world.train_facts[0]
    new = next(o for o in tiny_bundle.world.relation(f.relation).objects if o != f.object)
    req = EditRequest(tiny_bundle.world.subjects[f.subject].name, f.relation, new)
    cpu = run_method(tiny_bundle, [req], "rome", layer=0, steps=20, restarts=0)
    gpu_bundle = Bundle(copy.deepcopy(tiny_bundle.model).cuda(), tiny_bundle.tokenizer, tiny_bundle.world,
                        tiny_bundle.meta, tiny_bundle.path)
    gpu = run_method(gpu_bundle, [req], "rome", layer=0, steps=20, restarts=0)
    for name, d in cpu.deltas.items():
        torch.testing.assert_close(gpu.deltas[name].cpu(), d, atol=1e-3 * float(d.abs().max()), rtol=1e-2)


def _on_cuda(bundle):
    from mechedit.model.checkpoint import Bundle

    return Bundle(copy.deepcopy(bundle.model).cuda(), bundle.tokenizer, bundle.world, bundle.meta, bundle.path)


@pytest.mark.parametrize("method,params", [
    ("memit", dict(layer=[0, 1], steps=10)), ("alphaedit", dict(layer=[1], steps=10)),
    ("finetune", dict(layer=0, steps=5)), ("lora", dict(layer=0, steps=5)),
    ("npo", dict(steps=5)), ("rmu", dict(steps=5)), ("gd", dict(steps=5, lora_rank=4)),
])
def test_methods_run_on_cuda(tiny_bundle, method, params):
    """Every editor and unlearner runs on a CUDA model and returns deltas on its device."""
    from mechedit.edit import EditRequest, run_method

    f = tiny_bundle.world.train_facts[0]
    new = next(o for o in tiny_bundle.world.relation(f.relation).objects if o != f.object)
    req = EditRequest(tiny_bundle.world.subjects[f.subject].name, f.relation, new)
    gpu = _on_cuda(tiny_bundle)
    res = run_method(gpu, [req], method, **params)
    assert res.deltas and all(d.is_cuda for d in res.deltas.values())
    res.apply(gpu.model)
    res.restore(gpu.model)


def test_training_and_scorecards_on_cuda(tiny_world, tiny_bundle, tmp_path):
    from mechedit.diagnose import diagnose
    from mechedit.edit import EditRequest, run_method
    from mechedit.edit.run import edited_bundle
    from mechedit.model.spec import PRESETS, TRAIN_PRESETS, with_overrides
    from mechedit.model.train import train_model
    from mechedit.world.tokenizer import build_tokenizer

    res = train_model(tiny_world, build_tokenizer(tiny_world), PRESETS["tiny"],
                      with_overrides(TRAIN_PRESETS["tiny"], max_epochs=3), device="cuda")
    assert next(res.model.parameters()).is_cuda and res.curve
    gpu = _on_cuda(tiny_bundle)
    f = tiny_bundle.world.train_facts[0]
    new = next(o for o in tiny_bundle.world.relation(f.relation).objects if o != f.object)
    req = EditRequest(tiny_bundle.world.subjects[f.subject].name, f.relation, new)
    after = edited_bundle(gpu, run_method(gpu, [req], "npo", steps=5))
    cards = diagnose(gpu, after, [req], ("forget", "leftover"))
    assert cards


def test_cli_device_cuda(tiny_checkpoint, tmp_path):
    from tests.clitools import invoke

    r = invoke("trace", tiny_checkpoint, "--n", "2", "--samples", "2", "--device", "cuda", "-o", tmp_path / "t")
    assert r.returncode == 0, r.stderr
    import json

    assert json.loads((tmp_path / "t" / "spec.json").read_text())["device"] == "cuda:0"
