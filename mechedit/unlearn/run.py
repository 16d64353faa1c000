"""Library entry points behind `mechedit unlearn` and `mechedit diagnose`."""
from __future__ import annotations

from pathlib import Path

from mechedit.edit.api import EditRequest, get_method, make_params, parse_params, run_method
from mechedit.errors import MecheditError
from mechedit.fileio import check_output_dir, output_dir, read_json, write_json_atomic
from mechedit.provenance import stamp
from mechedit.model.checkpoint import load_checkpoint
from mechedit.unlearn.targets import parse_forget


def unlearn_checkpoint(checkpoint: str | Path, method: str, forget: list[str], params: dict, out: str | Path,
                       force: bool = False) -> dict:
    """Unlearn `forget` from a checkpoint; write the unlearned checkpoint, deltas, edit.json, scorecard.json."""
    from mechedit.diagnose import diagnose

    check_output_dir(out, force)
    make_params(get_method(method), params)  # editors work too: "editing as unlearning" with the refusal as new object
    before = load_checkpoint(checkpoint)
    target = parse_forget(before.world, forget)
    with output_dir(out, force) as tmp:
        result = run_method(before, target.requests(), method, **params)
        after = load_checkpoint(checkpoint)
        result.apply(after.model)
        after.save(tmp, {"unlearned": {"method": method, "forget": list(forget), "source": str(checkpoint)}})
        result.save(tmp)
        card = diagnose(before, after, target.requests(), ("forget",), retrained=False)  # cheap: no retraining
        card["_meta"] = stamp(command="unlearn", checkpoint=str(checkpoint), method=method, forget=list(forget))
        write_json_atomic(tmp / "scorecard.json", card)
    return card


def read_requests(after_dir: str | Path) -> list[EditRequest] | None:
    p = Path(after_dir) / "edit.json"
    if not p.is_file():
        return None
    try:
        return [EditRequest.from_dict(r) for r in read_json(p, "edit.json")["requests"]]
    except (KeyError, TypeError, AttributeError) as exc:
        raise MecheditError(f"cannot read requests from {p}: {exc}") from None


def diagnose_checkpoints(before_dir: str | Path, after_dir: str | Path, suites: list[str], out: str | Path,
                         forget: list[str] | None = None, options: dict | None = None, force: bool = False) -> dict:
    """Run diagnostic suites on BEFORE vs AFTER and write `scorecard.json` into `out`."""
    from mechedit.diagnose import diagnose, get_suite

    from mechedit.diagnose import check_options, suite_names

    suites = suites or ["forget", "leftover"]
    if suites != ["all"]:
        for s in suites:
            get_suite(s)
    options = check_options(suite_names() if suites == ["all"] else suites, options or {}, "--option")
    check_output_dir(out, force)
    before, after = load_checkpoint(before_dir), load_checkpoint(after_dir)
    requests = read_requests(after_dir)
    if forget:
        requests = parse_forget(before.world, forget).requests()
    if not requests:
        raise MecheditError(f"no requests: {after_dir} has no edit.json; pass --forget")
    with output_dir(out, force) as tmp:
        card = diagnose(before, after, requests, suites, **options)
        card["_meta"] = stamp(command="diagnose", before=str(before_dir), after=str(after_dir), suites=list(suites),
                              requests=[r.__dict__ for r in requests])
        write_json_atomic(tmp / "scorecard.json", card)
    return card
