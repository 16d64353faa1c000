"""Provenance recorded in every result: the mechedit version and the git commit of the source tree."""
from __future__ import annotations

import subprocess
from pathlib import Path


def git_hash() -> str | None:
    """The commit of the checkout mechedit runs from, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def stamp(**extra) -> dict:
    """The `_meta` block of a result file: mechedit version, git commit, device, inference precision
    (asked for, and what scoring, diagnostics and tracing ran in) and what produced it."""
    from mechedit import __version__
    from mechedit.device import current_device, precision_record

    return {"mechedit_version": __version__, "git": git_hash(), "device": str(current_device()),
            "precision": precision_record(), **extra}
