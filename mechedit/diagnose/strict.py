"""Strict JSON for scorecards: NaN / inf never reach a scorecard (they become None, i.e. "no value")."""
from __future__ import annotations

import math

import numpy as np


def finite(v) -> float | None:
    """`v` as a float, or None when it is missing, NaN or infinite."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def strict_json(obj):
    """A copy of `obj` with every non-finite float replaced by None and numpy scalars made plain."""
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return finite(obj)
    return obj
