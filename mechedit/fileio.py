"""Atomic file writes and output-directory guards shared by every command."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mechedit.errors import MecheditError


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def dumps_json(obj: Any) -> str:
    """Canonical JSON (sorted keys, 2-space indent, trailing newline): byte-stable for a given object."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, dumps_json(obj))


def read_json(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise MecheditError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MecheditError(f"{what} is not valid JSON: {path} ({exc})") from None


def prepare_output_dir(path: str | Path, force: bool) -> Path:
    """Refuse to overwrite a non-empty output directory unless `force`.

    Returns a fresh temporary sibling directory; call `commit_output_dir` to move it into place,
    so an interrupted command never leaves a half-written output where a good one was.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MecheditError(f"output path exists and is not a directory: {path}")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise MecheditError(f"output directory {path} already exists and is not empty (use --force to overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.partial."))


def commit_output_dir(tmp: Path, path: str | Path) -> Path:
    """Move a finished temporary directory into place, replacing what was there only now."""
    path = Path(path)
    if path.exists():
        old = path.parent / f".{path.name}.old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    return path
