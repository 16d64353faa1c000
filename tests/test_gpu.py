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
