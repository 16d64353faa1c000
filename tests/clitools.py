"""Run the `mechedit` command line in-process (typer's CliRunner): what a user sees, without paying
for a Python start per call. Tests that need what only a real process shows use subprocess."""
from __future__ import annotations

import traceback
from dataclasses import dataclass


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def invoke(*args, env: dict | None = None) -> CliResult:
    """`mechedit ARGS...` in this process; an exception that escapes the app is shown as the traceback
    a user would have seen (so "Traceback" checks work as they do on a real process)."""
    from typer.testing import CliRunner

    from mechedit.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args], env=env)
    stderr = r.stderr
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        stderr += "Traceback (most recent call last):\n" + "".join(traceback.format_exception(r.exception))
    return CliResult(r.exit_code, r.stdout, stderr)
