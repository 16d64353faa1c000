"""Memoise diagnostics of unchanged models: the same weights and inputs give the same figures.

A table of unlearning methods scores the same original (and retrained) model once per method; keyed
by a fingerprint of the weights and of the attached adaptors (an adaptor edit changes the function
without changing a weight), those results are computed once per process. Callers must not mutate
what they get back.
"""
from __future__ import annotations

from typing import Callable

import torch

_MEMO: dict = {}
MAX_ENTRIES = 256


@torch.no_grad()
def weights_fingerprint(model) -> tuple:
    """A cheap fingerprint of a model's weights (sum and abs-sum of every parameter, in float64)."""
    return tuple(round(float(f(q.double()).item()), 8) for q in model.parameters()
                 for f in (torch.sum, lambda t: t.abs().sum()))


def memo(tag: str, model, key: tuple, fn: Callable):
    """`fn()`, computed once per (tag, weights and adaptors of `model`, inference precision, key)."""
    from mechedit.device import precision_record
    from mechedit.edit.adaptors import adaptor_fingerprint

    precision = tuple(precision_record(model.device).items())
    k = (tag, weights_fingerprint(model), adaptor_fingerprint(model), precision, key)
    if k not in _MEMO:
        if len(_MEMO) >= MAX_ENTRIES:
            _MEMO.clear()
        _MEMO[k] = fn()
    return _MEMO[k]
