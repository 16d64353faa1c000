"""Running edits end to end: an edited copy of a bundle, sequential edits with a scorecard after each,
and the `mechedit edit` pipeline (checkpoint in, edited checkpoint + deltas + scorecard out)."""
from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

from mechedit.edit.api import EditRequest, EditResult, get_method, make_params, run_method, validate_requests
from mechedit.errors import MecheditError


def edited_bundle(bundle, result: EditResult):
    """A new Bundle whose model is a deep copy of `bundle.model` with `result` applied (the original untouched)."""
    from mechedit.model.checkpoint import Bundle

    model = copy.deepcopy(bundle.model)
    result.apply(model)
    result._originals = None  # the copy is owned by the new bundle; `result` stays applicable elsewhere
    return Bundle(model, bundle.tokenizer, bundle.world, dict(bundle.meta), bundle.path)


def frozen_copy(bundle):
    from mechedit.model.checkpoint import Bundle

    return Bundle(copy.deepcopy(bundle.model), bundle.tokenizer, bundle.world, dict(bundle.meta), bundle.path)


def sequential_edits(bundle, batches: list[list[EditRequest]], method: str, *, score: bool = True,
                     restore: bool = True, scorecard_options: dict | None = None, **params) -> list[dict]:
    """K edit calls in a row on `bundle.model`, each computed on the model edited by the earlier ones.

    After each call the "edit" scorecard compares the original model with the current one on every
    request so far (so efficacy also shows whether earlier edits survive). AlphaEdit calls share one
    K_p directory so later batches respect the keys of earlier ones. With `restore` the model is put
    back exactly at the end. Returns one {"step", "result", "scorecard"} per call.
    """
    from mechedit.diagnose import get_suite

    before = frozen_copy(bundle) if score else None
    suite = get_suite("edit") if score else None
    steps: list[dict] = []
    applied: list[EditResult] = []
    tmp = tempfile.TemporaryDirectory(prefix="mechedit-kp-") if method == "alphaedit" else None
    if tmp is not None and "kp_cache" not in params:
        params = {**params, "kp_cache": tmp.name}
    try:
        done: list[EditRequest] = []
        for k, batch in enumerate(batches):
            result = run_method(bundle, batch, method, **params)
            applied.append(result.apply(bundle.model))
            done += batch
            card = suite.fn(before, bundle, done, **(scorecard_options or {})) if score else None
            steps.append({"step": k, "result": result, "scorecard": card})
    finally:
        if restore:
            for r in reversed(applied):
                r.restore(bundle.model)
        if tmp is not None:
            tmp.cleanup()
    return steps


def read_requests(path: str | Path) -> list[EditRequest]:
    """JSON lines of {"subject", "relation", "new_object"} (or "new")."""
    from mechedit.fileio import read_text

    out = []
    for i, line in enumerate(read_text(path, "requests file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise MecheditError(f"{path}:{i}: not a JSON object") from None
        if not isinstance(d, dict):
            raise MecheditError(f"{path}:{i}: not a JSON object")
        out.append(EditRequest.from_dict(d))
    if not out:
        raise MecheditError(f"requests file {path} holds no requests")
    return out


def edit_checkpoint(checkpoint: str | Path, requests: list[EditRequest], method: str, params: dict,
                    out: str | Path, *, force: bool = False) -> dict:
    """Edit a checkpoint and write OUT/ (edited checkpoint), OUT/edit/ (deltas) and OUT/scorecard.json."""
    from mechedit.diagnose import get_suite
    from mechedit.fileio import check_output_dir, output_dir, write_json_atomic
    from mechedit.model.checkpoint import load_checkpoint
    from mechedit.provenance import stamp

    check_output_dir(out, force)
    make_params(get_method(method), params)  # unknown method / parameter: fail before any work
    bundle = load_checkpoint(checkpoint)
    validate_requests(bundle, requests)
    before = frozen_copy(bundle)
    with output_dir(out, force) as tmp:
        result = run_method(bundle, requests, method, **params)
        result.apply(bundle.model)
        card = get_suite("edit").fn(before, bundle, requests)
        bundle.save(tmp, {"edit": result.to_json()})
        result.save(Path(tmp) / "edit")
        card["_meta"] = stamp(command="edit", checkpoint=str(checkpoint), method=method, params=params,
                              requests=[r.__dict__ for r in requests])
        write_json_atomic(Path(tmp) / "scorecard.json", card)
    return card
