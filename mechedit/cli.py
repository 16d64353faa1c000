"""The `mechedit` command line: thin typer commands over library functions.

Every command turns a `MecheditError` into one line on stderr and exit code 2.
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Optional

import typer

from mechedit.errors import MecheditError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="mechedit: locate, edit, unlearn and diagnose facts in small GPT-NeoX models "
                       "trained on synthetic worlds.")


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def command(*args, **kwargs):
    """`app.command` whose body turns MecheditError (and Ctrl-C) into one line and exit 2."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*a, **k):
            try:
                return fn(*a, **k)
            except MecheditError as exc:
                fail(str(exc))
            except KeyboardInterrupt:
                typer.echo("interrupted; nothing partial was left in the output", err=True)
                raise typer.Exit(130)
        return app.command(*args, **kwargs)(inner)
    return wrap


@command()
def world(
    spec: Optional[Path] = typer.Argument(None, help="World spec (TOML or JSON); default: the embedded default."),
    out: Path = typer.Option(Path("runs/world"), "-o", "--out", help="Output directory."),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty output directory."),
):
    """Generate a synthetic world (world.json + tokenizer).

    Example: mechedit world analyses/worlds/default.toml -o runs/world
    """
    from mechedit.model.pipeline import resolve_world, write_world

    w = resolve_world(spec)
    path = write_world(w, out, force)
    typer.echo(json.dumps(w.summary()))
    typer.echo(f"world written to {path}/world.json")


@command()
def train(
    world_source: Optional[Path] = typer.Argument(None, metavar="[WORLD]",
                                                  help="World directory or spec file; default: the embedded default."),
    model: str = typer.Option("default", "--model", "-m", help="Model preset (default, pythia-31m-like, tiny) or spec file."),
    out: Path = typer.Option(Path("runs/model"), "-o", "--out", help="Checkpoint directory."),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty output directory."),
    seed: Optional[int] = typer.Option(None, help="Training seed (overrides the spec)."),
    max_epochs: Optional[int] = typer.Option(None, help="Epoch limit (overrides the spec)."),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--fp32", help="bf16 autocast (overrides the spec)."),
):
    """Train a GPT-NeoX model on a world until it recalls its facts.

    Example: mechedit train -o runs/model            (embedded default world and model)
    """
    from rich.console import Console

    from mechedit.model.pipeline import resolve_world, train_checkpoint
    from mechedit.model.spec import model_spec, with_overrides

    w = resolve_world(world_source)
    mspec, tspec = model_spec(model)
    tspec = with_overrides(tspec, seed=seed, max_epochs=max_epochs, bf16=bf16)
    console = Console(stderr=True)
    with console.status("training...") as status:
        def progress(row: dict) -> None:
            status.update(f"epoch {row['epoch']}: loss {row['loss']:.3f}, cloze recall {row['cloze']:.3f}, "
                          f"paraphrase {row['paraphrase']:.3f} ({row['seconds']:.0f}s)")
        bundle = train_checkpoint(w, mspec, tspec, out, force=force, progress=progress)
    rec = bundle.meta["final_recall"]["trained"]["by_kind"]
    typer.echo(f"trained {bundle.meta['epochs']} epochs in {bundle.meta['train_seconds']:.1f}s; recall: "
               + ", ".join(f"{k} {v:.3f}" for k, v in rec.items()))
    typer.echo(f"checkpoint written to {out}")


@command()
def info(checkpoint: Path = typer.Argument(..., help="Checkpoint directory.")):
    """Summarise a checkpoint: model, world, training and recall per probe set.

    Example: mechedit info runs/model
    """
    from mechedit.model.pipeline import info as info_fn

    typer.echo(json.dumps(info_fn(checkpoint), indent=2))


@command()
def edit(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory."),
    method: str = typer.Option("rome", "--method", help="Editing method (rome, memit, alphaedit, finetune, lora)."),
    fact: Optional[str] = typer.Option(None, "--fact", help='The fact to change, "SUBJECT|RELATION".'),
    new: Optional[str] = typer.Option(None, "--new", help="The new object."),
    requests_file: Optional[Path] = typer.Option(None, "--requests", help="JSON lines of {subject, relation, new_object}."),
    layer: Optional[str] = typer.Option(None, "--layer", help="Layer: an integer, a comma list, 'traced' or 'all'."),
    param: list[str] = typer.Option([], "--param", help="Method parameter key=value (repeatable)."),
    out: Path = typer.Option(Path("runs/edit"), "-o", "--out", help="Output directory (edited checkpoint)."),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty output directory."),
):
    """Edit facts in a checkpoint; write the edited checkpoint, the deltas (OUT/edit) and OUT/scorecard.json.

    Example: mechedit edit runs/model --method rome --fact "SUBJECT|capital" --new OBJECT --layer traced -o runs/edit
    """
    from mechedit.edit.api import EditRequest, parse_param_value
    from mechedit.edit.run import edit_checkpoint, read_requests

    if requests_file is not None:
        reqs = read_requests(requests_file)
    elif fact and new:
        subject, _, relation = fact.partition("|")
        reqs = [EditRequest(subject.strip(), relation.strip(), new.strip())]
        if not relation.strip() or not subject.strip():
            raise MecheditError(f"a fact is written 'SUBJECT|RELATION', got {fact!r}")
    else:
        raise MecheditError("give --fact SUBJECT|RELATION with --new OBJECT, or --requests FILE.jsonl")
    params = {}
    for kv in param:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            raise MecheditError(f"--param takes key=value, got {kv!r}")
        params[key.strip()] = parse_param_value(value)
    if layer is not None:
        params["layer"] = (layer if layer in ("traced", "all") else
                           [parse_param_value(x) for x in layer.split(",")] if "," in layer else parse_param_value(layer))
    card = edit_checkpoint(checkpoint, reqs, method, params, out, force=force)
    typer.echo(json.dumps({k: round(v, 4) for k, v in card["headline"].items()}))
    typer.echo(f"edited checkpoint written to {out} (deltas in {out}/edit, scores in {out}/scorecard.json)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
