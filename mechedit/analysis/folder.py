"""Reading a run folder back: `spec.json` and the case files, each checked against its schema.

A run folder is written by `run_analysis` (see `mechedit.analysis.runner`); anything that reads one
(the report, a resumed run) goes through here, so a corrupt or foreign file is a one-line
`MecheditError` naming the file rather than a KeyError deep inside a figure.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mechedit.errors import MecheditError
from mechedit.fileio import read_json
from mechedit.specio import check_value

# spec.json of a run far enough to report (the fields the report and a resumed run read)
RUN_SCHEMA: dict[str, Any] = {
    "name": str, "spec": dict, "spec_hash": str, "mechedit_version": str, "cases": list[dict],
    "suites": list[str], "forget_suites": list[str], "checkpoint": str, "located": dict | None,
    "traced_layer": int | None, "request_sets": dict[str, dict],
}
# what the report reads of a case record
CASE_SCHEMA: dict[str, Any] = {
    "id": str, "spec_hash": str, "method": str, "params": dict, "requests": str, "request_kind": str,
    "mode": str, "n_requests": int, "suites": list[str], "summary": dict[str, float], "per_edit": list[dict],
}


def _check(data: Any, schema: dict[str, Any], path: Path, optional: tuple[str, ...] = ()) -> dict:
    if not isinstance(data, dict):
        raise MecheditError(f"corrupt {path}: expected a JSON object, got {type(data).__name__}")
    for key, tp in schema.items():
        if key not in data:
            if key in optional:
                continue
            raise MecheditError(f"corrupt {path}: missing {key!r}")
        try:
            check_value(tp, data[key], key)
        except MecheditError as exc:
            raise MecheditError(f"corrupt {path}: {exc}") from None
    return data


def read_run_spec(run_dir: str | Path, started: bool = False) -> dict:
    """The run's spec.json; `started` accepts a run that has not reached its model yet."""
    path = Path(run_dir) / "spec.json"
    if not path.is_file():
        raise MecheditError(f"not a run folder (no spec.json): {run_dir}")
    data = read_json(path, "spec.json")
    late = ("checkpoint", "located", "traced_layer", "request_sets")
    spec = _check(data, RUN_SCHEMA, path, optional=late)
    if not started and any(k not in spec for k in late):
        raise MecheditError(f"run folder {run_dir} has not reached its model yet: rerun mechedit run to finish it")
    for i, c in enumerate(spec["cases"]):
        if not isinstance(c.get("id"), str) or not c["id"]:
            raise MecheditError(f"corrupt {path}: cases[{i}] has no id")
    return spec


def read_case(run_dir: str | Path, case_id: str, spec_hash: str | None = None) -> dict | None:
    """A finished case record, or None when its file is missing. With `spec_hash`, a file that does not
    parse, misses fields or belongs to another spec or case is also None (a resumed run redoes it);
    without, it is an error."""
    path = Path(run_dir) / f"case_{case_id}.json"
    if not path.is_file():
        return None
    try:
        rec = _check(read_json(path, path.name), CASE_SCHEMA, path)
        if rec["id"] != case_id:
            raise MecheditError(f"corrupt {path}: it holds case {rec['id']!r}")
        if spec_hash is not None and rec["spec_hash"] != spec_hash:
            raise MecheditError(f"{path} belongs to another spec")
    except MecheditError:
        if spec_hash is not None:
            return None
        raise
    return rec


def read_timing(run_dir: str | Path, case_id: str) -> dict:
    """A case's timing sidecar; {} when it is missing or unreadable (timings are never the results)."""
    path = Path(run_dir) / f"case_{case_id}.timing.json"
    try:
        data = read_json(path, path.name) if path.is_file() else {}
    except MecheditError:
        return {}
    return data if isinstance(data, dict) else {}


def read_run(run_dir: str | Path) -> tuple[dict, list[dict]]:
    """spec.json and every finished case (with its timings under "timings"), checked."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MecheditError(f"run folder not found: {run_dir}" if not run_dir.exists()
                            else f"not a run folder (not a directory): {run_dir}")
    spec = read_run_spec(run_dir)
    cases = []
    for c in spec["cases"]:
        rec = read_case(run_dir, c["id"])
        if rec is not None:
            rec["timings"] = read_timing(run_dir, c["id"])
            cases.append(rec)
    return spec, cases
