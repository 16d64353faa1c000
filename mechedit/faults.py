"""Fault injection for the kill -9 tests: die by SIGKILL at a named point of the code.

`crash_point(name)` does nothing unless the environment asks for it:
- `MECHEDIT_CRASH_AT="NAME#K"` sends SIGKILL, at the K-th time this process passes NAME, to the
  process named by `MECHEDIT_CRASH_PID` (default: this one; pool workers point it at the command's
  main process, so a kill "during a case" kills the command while its workers are busy);
- `MECHEDIT_CRASH_LOG=FILE` appends every NAME passed (one per line), so a test can list the points
  an uninterrupted run goes through and choose among them.
Nothing else reads these variables; a SIGKILL runs no cleanup, exactly like `kill -9`.
"""
from __future__ import annotations

import os
import signal

_COUNTS: dict[str, int] = {}


def crash_point(name: str) -> None:
    at = os.environ.get("MECHEDIT_CRASH_AT")
    log = os.environ.get("MECHEDIT_CRASH_LOG")
    if not at and not log:
        return
    _COUNTS[name] = _COUNTS.get(name, 0) + 1
    if log:
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(f"{name}\n")
    if at == f"{name}#{_COUNTS[name]}":
        # a worker goes on after killing its main process: its own death must follow from that
        os.kill(int(os.environ.get("MECHEDIT_CRASH_PID") or os.getpid()), signal.SIGKILL)
