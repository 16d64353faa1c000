"""File I/O every command shares: atomic writes, output-directory guards, UTF-8 reads.

- `output_dir(path, force)`: a context manager that checks the output path, yields a fresh hidden
  sibling `.NAME.partial.PID.XXXX` to write into, moves it into place when the block finishes and
  removes it when the block raises. Partials left by a killed writer (its PID is dead) are removed
  by the next command writing the same output (or adopted, for a resumable training).
- `write_text_atomic` / `atomic_path`: readers see the old file or the whole new one.
- `read_text` / `read_json`: UTF-8 only, one-line errors for missing, unreadable or malformed files.
- Files and folders get the user's umask (`tempfile` alone would create 0600 files, 0700 folders).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from mechedit.errors import MecheditError
from mechedit.faults import crash_point

# hidden debris of an interrupted writer: .NAME.partial.PID.XXXX (folders), .NAME.tmp.PID.XXXX (files)
_DEBRIS = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|tmp)\.(?P<pid>\d+)\.[A-Za-z0-9_]+$")


# ---- modes ------------------------------------------------------------------------------------
def umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _default_mode(directory: bool) -> int:
    return (0o777 if directory else 0o666) & ~umask()


# ---- reading ----------------------------------------------------------------------------------
def read_text(path: str | Path, what: str = "file") -> str:
    """A UTF-8 text file's content, or a one-line `MecheditError` saying why it cannot be read."""
    path = Path(path)
    if not path.exists():
        raise MecheditError(f"{what} not found: {path}")
    if not path.is_file():
        raise MecheditError(f"{what} is not a file: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MecheditError(f"{what} is not UTF-8 text: {path} (byte 0x{exc.object[exc.start]:02x} at offset "
                            f"{exc.start})") from None
    except OSError as exc:
        raise MecheditError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _no_constant(token: str):
    raise ValueError(f"{token} is not a JSON number")


def read_json(path: str | Path, what: str = "file") -> Any:
    """Strict JSON (no NaN / Infinity) from a UTF-8 file, with one-line errors."""
    text = read_text(path, what)
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (json.JSONDecodeError, ValueError, RecursionError) as exc:
        raise MecheditError(f"{what} is not valid JSON: {path} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                            ) from None


# ---- atomic writes ----------------------------------------------------------------------------
def _mkstemp(path: Path) -> tuple[int, str]:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp.{os.getpid()}.", suffix="")
    os.fchmod(fd, _default_mode(False))
    return fd, tmp


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block finishes it replaces `path` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _mkstemp(path)
    os.close(fd)
    try:
        yield Path(tmp)
        crash_point("write")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _mkstemp(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        crash_point("write")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def dumps_json(obj: Any) -> str:
    """Canonical strict JSON (sorted keys, 2-space indent, trailing newline): byte-stable for an object.

    NaN and infinities are not JSON: they are written as null ("no value"), never as `NaN`.
    """
    from mechedit.diagnose.strict import strict_json

    return json.dumps(strict_json(obj), indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, dumps_json(obj))


# ---- output directories -----------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # somebody else's live process
        return True
    return True


def stale_debris(directory: str | Path, name: str | None = None, kind: str | None = None) -> list[Path]:
    """Hidden partial folders / temp files in `directory` whose writer process is dead
    (of output `name` and kind "partial" or "tmp" when given), newest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    out = []
    for p in directory.iterdir():
        m = _DEBRIS.match(p.name)
        if m and (name is None or m["name"] == name) and (kind is None or m["kind"] == kind) \
                and not _pid_alive(int(m["pid"])):
            out.append(p)
    return sorted(out, key=lambda p: (p.lstat().st_mtime, p.name), reverse=True)


def remove_stale_debris(directory: str | Path, name: str | None = None) -> int:
    """Remove what killed writers left in `directory` (only theirs: live writers' files stay)."""
    gone = 0
    for p in stale_debris(directory, name):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        gone += 1
    return gone


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_dir(path: str | Path, force: bool = False) -> Path:
    """Refuse an output path before any work starts: one line saying what is wrong with it.

    The path must be a directory or not exist; without `force` an existing one must be empty; its
    nearest existing ancestor must be a writable directory (so the folders can be created).
    """
    path = Path(path)
    if str(path).strip() == "":
        raise MecheditError("the output path is empty")
    if path.exists() and not path.is_dir():
        raise MecheditError(f"output path exists and is not a directory: {path}")
    if path.is_dir():
        try:
            nonempty = any(path.iterdir())
        except OSError as exc:
            raise MecheditError(f"cannot read output directory {path}: {exc.strerror or exc}") from None
        if nonempty and not force:
            raise MecheditError(f"output directory {path} already exists and is not empty (use --force to overwrite)")
    parent = path.absolute().parent
    anc = _nearest_existing(parent)
    if not anc.is_dir():
        raise MecheditError(f"cannot create output directory {path}: {anc} is not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise MecheditError(f"cannot create output directory {path}: {anc} is not writable")
    try:  # access() says yes to root everywhere (/proc too): create and remove a probe to be sure
        os.rmdir(tempfile.mkdtemp(dir=anc, prefix=".mechedit-probe."))
    except OSError as exc:
        raise MecheditError(f"cannot create output directory {path}: {anc} is not writable "
                            f"({exc.strerror or exc})") from None
    return path


def _restore_interrupted_commit(path: Path) -> None:
    """A commit killed between its two renames leaves the previous output at .NAME.old: put it back."""
    old = path.parent / f".{path.name}.old"
    if old.is_dir() and not path.exists():
        os.replace(old, path)
    elif old.exists():
        shutil.rmtree(old, ignore_errors=True)


def prepare_output_dir(path: str | Path, force: bool = False,
                       adopt: Callable[[Path], bool] | None = None) -> Path:
    """Check `path` (see `check_output_dir`) and return a fresh hidden temporary sibling to write into.

    Partials of `path` left by dead writers are removed, except that with `adopt` the newest one
    for which `adopt(partial)` is true is renamed to this process and returned (resumable work).
    Use `output_dir` (which also cleans up on errors) rather than this and `commit_output_dir`.
    """
    path = Path(path)
    if path.parent.is_dir():
        _restore_interrupted_commit(path)
    check_output_dir(path, force)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        stale = stale_debris(path.parent, path.name, "partial")
        chosen = next((p for p in stale if adopt is not None and p.is_dir() and adopt(p)), None)
        for p in stale:
            if p != chosen:
                shutil.rmtree(p, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.partial.{os.getpid()}."))
        os.chmod(tmp, _default_mode(True))
        if chosen is not None:
            os.rmdir(tmp)
            os.replace(chosen, tmp)
    except OSError as exc:
        raise MecheditError(f"cannot create output directory {path}: {exc.strerror or exc}") from None
    return tmp


def commit_output_dir(tmp: Path, path: str | Path) -> Path:
    """Move a finished temporary directory into place, replacing what was there only now."""
    path = Path(path)
    crash_point("commit")
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


@contextlib.contextmanager
def output_dir(path: str | Path, force: bool = False, *, adopt: Callable[[Path], bool] | None = None,
               keep_on: tuple[type[BaseException], ...] = ()) -> Iterator[Path]:
    """Write an output directory atomically: yields the temporary folder; on success it replaces
    `path`, on an exception it is removed (unless the exception is one of `keep_on`, e.g. Ctrl-C
    during a resumable training, whose partial a rerun adopts)."""
    tmp = prepare_output_dir(path, force, adopt=adopt)
    try:
        yield tmp
    except BaseException as exc:
        if not isinstance(exc, keep_on):
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        commit_output_dir(tmp, path)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MecheditError(f"cannot move the finished output into place at {path}: {exc.strerror or exc}") from None
