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
"""
from __future__ import annotations

import functools
import os
import re

import torch

from mechedit.errors import MecheditError

DEVICE_HELP = "auto (CUDA when present), cpu, cuda or cuda:N"
ENV_VAR = "MECHEDIT_DEVICE"
_current: torch.device | None = None


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
