"""Devices and arithmetic: resolve `--device auto|cpu|cuda[:N]`, and whether bf16 matmuls pay here.

`resolve_device("auto")` is CUDA when torch sees a GPU, else the CPU; asking for CUDA without one is
a `MecheditError` (one line, exit 2). `fast_bf16(device)` says whether bf16 arithmetic is native on
`device`: a CUDA GPU, or a CPU with AMX / AVX-512 bf16 instructions (on this project's CPUs bf16
matmuls run ~3-7x faster than fp32); elsewhere bf16 is emulated and slower than fp32, so "auto"
precision falls back to fp32.

The device of a process: every command takes `--device` (an analysis spec a `device` key) and sets it
with `use_device` before it loads a model; `current_device()` is what loaders, training and the
analysis workers use when no device is given explicitly ("auto" until set, or the `MECHEDIT_DEVICE`
environment variable, which the local executor sets per worker so that each runs on its own GPU).

The precision of inference: `--precision float32|bfloat16|auto` on `trace`, `diagnose` and `run` (an
analysis spec a `precision` key) sets it with `use_precision`; scoring (`score_answers`), the
diagnostics' forward passes (MIA token statistics, probe and logit-lens residuals, drill-down top-5)
and the trace engine run under `inference_autocast(device, path)`: bf16 autocast where the resolved
precision of that path is "bfloat16", nothing (bit-identical fp32) otherwise. Weights stay fp32, and
everything after the forward (log-softmax, MIA scores, probes) is computed in fp32 / fp64. Editing and
unlearning keep their own `precision` parameters; training keeps `bf16`. "auto" picks bf16 only on the
paths in `AUTO_BF16` (those whose agreement with fp32 was measured, README "Devices and precision"),
and only where bf16 is native (`fast_bf16`).
"""
from __future__ import annotations

import contextlib
import functools
import os
import re

import torch

from mechedit.errors import MecheditError

DEVICE_HELP = "auto (CUDA when present), cpu, cuda or cuda:N"
ENV_VAR = "MECHEDIT_DEVICE"
_current: torch.device | None = None
PRECISIONS = ("float32", "bfloat16", "auto")
PRECISION_HELP = "float32 (the default), bfloat16 or auto (bf16 where measured to agree and native)"
INFERENCE_PATHS = ("scoring", "diagnostics", "trace")
# the paths where "auto" may choose bf16: agreement with fp32 measured by benchmarks/bf16_agreement.py
AUTO_BF16 = frozenset({"scoring", "diagnostics"})
_precision: str | None = None


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch device for `spec` ("auto", "cpu", "cuda", "cuda:N"); one-line error if unavailable."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if not m:
        raise MecheditError(f"unknown device {spec!r} ({DEVICE_HELP})")
    if not torch.cuda.is_available():
        raise MecheditError(f"device {spec!r} was asked for but torch sees no CUDA GPU on this machine")
    index = int(m.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise MecheditError(f"device {spec!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return torch.device("cuda", index)


def use_device(spec: str | torch.device | None = "auto") -> torch.device:
    """Make `spec` the device of this process (what `current_device` returns) and return it."""
    global _current
    _current = resolve_device(spec)
    return _current


def current_device() -> torch.device:
    """The device set by `use_device`, else `$MECHEDIT_DEVICE`, else "auto"."""
    return _current if _current is not None else resolve_device(os.environ.get(ENV_VAR) or "auto")


def visible_gpus() -> int:
    """How many CUDA GPUs torch sees (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@functools.lru_cache(maxsize=None)
def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "")
    except OSError:
        return False
    return any(f in flags.split() for f in ("amx_bf16", "avx512_bf16"))


def fast_bf16(device: torch.device | str) -> bool:
    """Whether bf16 matmuls are native (and faster than fp32) on `device`."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and _cpu_has_bf16()


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """"auto" -> "bfloat16" where `fast_bf16(device)`, else "float32"; other values pass through."""
    if precision == "auto":
        return "bfloat16" if fast_bf16(device) else "float32"
    if precision not in ("float32", "bfloat16"):
        raise MecheditError(f"unknown precision {precision!r} (auto, float32, bfloat16)")
    return precision


def check_precision(spec: str | None, where: str = "precision") -> str:
    """`spec` lower-cased if it is one of PRECISIONS (None: "float32"), else a one-line error."""
    value = "float32" if spec is None else spec
    if not isinstance(value, str) or value.strip().lower() not in PRECISIONS:
        raise MecheditError(f"{where}: expected {PRECISION_HELP}, got {spec!r}")
    return value.strip().lower()


def use_precision(spec: str | None = "float32") -> str:
    """Make `spec` the inference precision of this process (what `current_precision` returns)."""
    global _precision
    _precision = check_precision(spec)
    return _precision


def current_precision() -> str:
    """The inference precision set by `use_precision`, else "float32"."""
    return _precision or "float32"


def inference_precision(device: torch.device | str, path: str, precision: str | None = None) -> str:
    """The arithmetic of inference path `path` (one of INFERENCE_PATHS) on `device`: `precision`
    (default: `current_precision()`), with "auto" resolved to bf16 only on the paths in AUTO_BF16."""
    if path not in INFERENCE_PATHS:
        raise ValueError(f"unknown inference path {path!r} ({', '.join(INFERENCE_PATHS)})")
    precision = check_precision(precision if precision is not None else current_precision())
    if precision == "auto" and path not in AUTO_BF16:
        return "float32"
    return resolve_precision(precision, device)


def precision_record(device: torch.device | str | None = None, precision: str | None = None) -> dict:
    """What provenance records: the precision asked for and what each inference path ran in."""
    device = current_device() if device is None else device
    asked = check_precision(precision if precision is not None else current_precision())
    return {"asked": asked, **{p: inference_precision(device, p, asked) for p in INFERENCE_PATHS}}


def inference_autocast(device: torch.device | str, path: str, precision: str | None = None):
    """bf16 autocast on `device` where `path` runs in bf16 (`inference_precision`), else a no-op."""
    device = torch.device(device)
    if inference_precision(device, path, precision) == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
