"""The `mechedit` command line: thin typer commands over library functions.

Every bad input ends in one line on stderr and exit code 2: a `MecheditError` from the library, a
usage error of the command line itself (unknown option, a value of the wrong type), and, as a last
resort, running out of memory or an operating-system error while writing outputs.
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from mechedit.errors import MecheditError


def one_line(text: str) -> str:
    return " ".join(str(text).split())


class OneLineErrors(TyperGroup):
    """Usage errors as one line on stderr (click's default is a usage block, or a rich panel)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as exc:  # click's usage errors (typer vendors click)
            if not (sys.argv[1:] if args is None else args):  # `mechedit` alone: the help, as click shows it
                exc.show()
            else:
                ctx = getattr(exc, "ctx", None)
                hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
                typer.echo(f"error: {one_line(exc.format_message())}{hint}", err=True)
            sys.exit(getattr(exc, "exit_code", 2))
        except typer.Abort:
            typer.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(cls=OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="mechedit: locate, edit, unlearn and diagnose facts in small GPT-NeoX models "
                       "trained on synthetic worlds.")


def device_option():
    return typer.Option(None, "--device", help="auto (CUDA when present; the default), cpu, cuda or cuda:N.")


def use(device: str | None) -> None:
    """Make `--device` the device of this command (a one-line error if it is not available)."""
    from mechedit.device import use_device

    use_device(device or "auto")


def fail(message: str) -> None:
    typer.echo(f"error: {one_line(message)}", err=True)
    raise typer.Exit(2)


def command(*args, **kwargs):
    """`app.command` whose body turns MecheditError (and Ctrl-C, and what the machine refuses:
    memory, disk, permissions) into one line and an exit code (2; 130 for Ctrl-C)."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*a, **k):
            try:
                return fn(*a, **k)
            except MecheditError as exc:
                fail(str(exc))
            except MemoryError:
                fail("out of memory: the requested world, model or run is too large for this machine")
            except OSError as exc:  # a disk full or a permission change while writing outputs
                where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
                fail(f"{exc.strerror or type(exc).__name__}{where}")
            except KeyboardInterrupt:
                typer.echo("interrupted; nothing partial was left in the output (a killed training resumes "
                           "from its last saved state when rerun)", err=True)
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
    from mechedit.fileio import check_output_dir
    from mechedit.model.pipeline import resolve_world, write_world

    check_output_dir(out, force)
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
    device: Optional[str] = device_option(),
):
    """Train a GPT-NeoX model on a world until it recalls its facts.

    Example: mechedit train -o runs/model            (embedded default world and model)
    """
    use(device)
    from rich.console import Console

    from mechedit.fileio import check_output_dir
    from mechedit.model.pipeline import resolve_world, train_checkpoint
    from mechedit.model.spec import model_spec, with_overrides

    check_output_dir(out, force)
    mspec, tspec = model_spec(model)
    tspec = with_overrides(tspec, seed=seed, max_epochs=max_epochs, bf16=bf16)
    w = resolve_world(world_source)
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


@command("finetune-facts")
def finetune_facts(
    checkpoint: Path = typer.Argument(..., help="First-stage checkpoint of a world with stage2_subject_fraction > 0."),
    out: Path = typer.Option(..., "-o", "--out", help="Second-stage checkpoint directory."),
    param: list[str] = typer.Option([], "--param", "-p", help="Fine-tuning parameter key=value (epochs, lr, replay, ...)."),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty output directory."),
):
    """Second training stage: teach a trained model its world's stage-2 facts (fine-tuned knowledge).

    Example: mechedit finetune-facts runs/unlearning -o runs/unlearning-ft -p epochs=20
    """
    from mechedit.model.finetune import finetune_checkpoint
    from mechedit.unlearn.run import parse_params

    b = finetune_checkpoint(checkpoint, out, parse_params(param), force=force)
    final = b.meta["final_recall"]
    typer.echo(f"fine-tuned {b.meta['finetune_facts']['epochs']} epochs; stage-2 facts: "
               + ", ".join(f"{k} {v:.3f}" for k, v in final["stage2"]["by_kind"].items())
               + "; first-stage cloze " + f"{final['first_stage']['by_kind'].get('cloze', 0.0):.3f}")
    typer.echo(f"checkpoint written to {out}")


@command()
def info(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory."),
    device: Optional[str] = device_option(),
):
    """Summarise a checkpoint: model, world, training and recall per probe set.

    Example: mechedit info runs/model
    """
    use(device)
    from mechedit.model.pipeline import info as info_fn

    typer.echo(json.dumps(info_fn(checkpoint), indent=2))


@command()
def edit(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory."),
    method: str = typer.Option("rome", "--method", help="Editing method (rome, memit, alphaedit, grace, wise, finetune, lora)."),
    fact: Optional[str] = typer.Option(None, "--fact", help='The fact to change, "SUBJECT|RELATION".'),
    new: Optional[str] = typer.Option(None, "--new", help="The new object."),
    requests_file: Optional[Path] = typer.Option(None, "--requests", help="JSON lines of {subject, relation, new_object}."),
    layer: Optional[str] = typer.Option(None, "--layer", help="Layer: an integer, a comma list, 'traced' or 'all'."),
    param: list[str] = typer.Option([], "--param", help="Method parameter key=value (repeatable)."),
    out: Path = typer.Option(Path("runs/edit"), "-o", "--out", help="Output directory (edited checkpoint)."),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty output directory."),
    device: Optional[str] = device_option(),
):
    """Edit facts in a checkpoint; write the edited checkpoint, the deltas (OUT/edit) and OUT/scorecard.json.

    Example: mechedit edit runs/model --method rome --fact "SUBJECT|capital" --new OBJECT --layer traced -o runs/edit
    """
    use(device)
    from mechedit.edit.api import EditRequest, parse_param_value, parse_params
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
    params = parse_params(param)
    if layer is not None:
        params["layer"] = (layer if layer in ("traced", "all") else
                           [parse_param_value(x, "--layer") for x in layer.split(",")] if "," in layer
                           else parse_param_value(layer, "--layer"))
    card = edit_checkpoint(checkpoint, reqs, method, params, out, force=force)
    typer.echo(json.dumps({k: round(v, 4) for k, v in card["headline"].items()}))
    typer.echo(f"edited checkpoint written to {out} (deltas in {out}/edit, scores in {out}/scorecard.json)")


@command()
def trace(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory."),
    fact: Optional[list[str]] = typer.Option(None, "--fact", help="A fact 'SUBJECT|RELATION' (repeatable)."),
    relation: Optional[str] = typer.Option(None, "--relation", help="Trace facts of this relation."),
    n: Optional[int] = typer.Option(None, "--n", help="Trace a seeded sample of N facts."),
    all_facts: bool = typer.Option(False, "--all", help="Trace every trained fact."),
    sites: str = typer.Option("resid,mlp,attn", "--sites", help="Comma-separated sites: resid, mlp, attn."),
    severed: str = typer.Option("", "--severed", help="Severed-path traces to add: mlp, attn (comma-separated)."),
    noise: float = typer.Option(3.0, "--noise", help="Noise std as a multiple of the subject-embedding std."),
    noise_scale: Optional[float] = typer.Option(None, "--noise-scale", help="A fixed noise std (overrides --noise)."),
    samples: int = typer.Option(10, "--samples", help="Noise samples per fact."),
    window: Optional[int] = typer.Option(None, "--window", help="MLP/attention window (default: scaled to depth)."),
    template: Optional[int] = typer.Option(None, "--template", help="Prompt template index (default: per fact)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the noise draws and of fact sampling."),
    include_heldout: bool = typer.Option(False, "--include-heldout", help="Also trace held-out subjects' facts."),
    out: Path = typer.Option(Path("runs/trace"), "-o", "--out", help="Run directory."),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty run directory."),
    device: Optional[str] = device_option(),
):
    """Causal tracing (ROME): which layer, site and token carry a fact.

    Example: mechedit trace runs/model --relation capital --n 50 --severed mlp -o runs/trace_capital
    """
    use(device)
    from mechedit.trace.api import TraceConfig
    from mechedit.trace.run import trace_run

    split = lambda s: tuple(x.strip() for x in s.split(",") if x.strip())  # noqa: E731
    cfg = TraceConfig(sites=split(sites), severed=split(severed), noise=noise, noise_scale=noise_scale,
                      samples=samples, window=window, seed=seed, template=template)
    r = trace_run(checkpoint, out, facts=fact, relation=relation, n=n, all_facts=all_facts,
                  include_heldout=include_heldout, config=cfg, force=force)
    for note in r["notes"]:
        typer.echo(note, err=True)
    res = r["result"]
    if res.skipped:
        typer.echo(f"skipped {len(res.skipped)} fact(s) the model does not know (clean prediction wrong)")
    if res.n_facts == 0:
        typer.echo(f"no fact was traced; details in {r['out']}/trace.json")
        raise typer.Exit(1)
    te = r["summary"]["overall"]["total_effect"]
    typer.echo(f"traced {res.n_facts} facts (noise std {res.noise_scale:.3g}); mean total effect "
               f"{te['mean']:.3f} +- {te['ci95']:.3f}")
    for k, loc in r["located"].items():
        where = f"layer {loc['layer']}" if loc["score"] - loc.get("ci95", 0.0) > 0 else "none (below the noise floor)"
        typer.echo(f"located {k}: {where} (best: layer {loc['layer']}, mean indirect effect {loc['score']:.3f} "
                   f"+- {loc.get('ci95', 0.0):.3f} at the {loc['token_category'].replace('_', ' ')} token)")
    typer.echo(f"run written to {r['out']}; figures in {r['out']}/figures")


@command()
def unlearn(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory to unlearn from."),
    forget: list[str] = typer.Option(..., "--forget", "-f",
                                     help="subject:NAME, fact:SUBJECT|RELATION or relation:R (comma or repeat for lists)."),
    method: str = typer.Option("npo", "--method", "-m", help="ga, gd, npo, dpo, rt, rmu, repe, icu (or an editor: rome, grace, wise, ...)."),
    param: list[str] = typer.Option([], "--param", "-p", help="Method parameter key=value (repeatable)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output directory (unlearned checkpoint + deltas + scorecard)."),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty output directory."),
    device: Optional[str] = device_option(),
):
    """Unlearn facts: write the unlearned checkpoint, its deltas (edit.json) and a forget scorecard.

    Example: mechedit unlearn runs/model --method npo --forget subject:kavo -p steps=80 -o runs/unlearn
    """
    use(device)
    from mechedit.edit.api import parse_params
    from mechedit.unlearn.run import unlearn_checkpoint

    card = unlearn_checkpoint(checkpoint, method, forget, parse_params(param), out, force)
    after = card["forget"]["after"]
    typer.echo("recall after (cloze): " + ", ".join(f"{k} {v['cloze']['agg_value']:.3f}" for k, v in after.items()))
    typer.echo(f"unlearned checkpoint written to {out}")


@command()
def diagnose(
    before: Path = typer.Argument(..., help="Checkpoint before the edit / unlearning."),
    after: Path = typer.Argument(..., help="Checkpoint after it (its edit.json gives the requests)."),
    suite: list[str] = typer.Option([], "--suite", "-s", help="Suite name (repeatable; 'all' for every suite). "
                                    "Default: forget + leftover."),
    forget: list[str] = typer.Option([], "--forget", "-f", help="Forget target(s), overriding AFTER's edit.json."),
    option: list[str] = typer.Option([], "--option", help="Suite option key=value, e.g. k=0.1 (repeatable)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output directory for scorecard.json."),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty output directory."),
    device: Optional[str] = device_option(),
):
    """Score AFTER against BEFORE with diagnostic suites (forget, leftover, relearn, forget_quality, edit...).

    Example: mechedit diagnose runs/model runs/unlearn --suite leftover -o runs/diag
    """
    use(device)
    from mechedit.edit.api import parse_params
    from mechedit.unlearn.run import diagnose_checkpoints

    diagnose_checkpoints(before, after, list(suite), out, list(forget), parse_params(option, "--option"), force)
    typer.echo(f"scorecard written to {out}/scorecard.json")


@command()
def run(
    spec: Path = typer.Argument(..., help="Analysis spec (TOML), e.g. analyses/quickstart.toml."),
    out: Path = typer.Option(..., "-o", "--out", help="Run folder (a rerun resumes it)."),
    executor: str = typer.Option("local", "--executor", help="local (process pool) or ray."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Parallel cases (default: the number of cores)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: start a local Ray)."),
    force: bool = typer.Option(False, "--force", help="Start over if the folder holds a run of another spec."),
    device: Optional[str] = device_option(),
):
    """Run an analysis: train or reuse the model, trace, run every case of the grid.

    Example: mechedit run analyses/quickstart.toml -o runs/quickstart
    """
    from mechedit.analysis import run_analysis

    res = run_analysis(spec, out, executor_name=executor, workers=workers, address=address, force=force,
                       progress=lambda msg: typer.echo(msg, err=True), device=device)
    typer.echo(f"{res['done']}/{res['total']} cases done ({res['ran']} run now, {res['skipped']} resumed) in {res['run_dir']}")


@command()
def report(
    run_dir: Path = typer.Argument(..., help="Run folder written by `mechedit run`."),
    out: Path = typer.Option(..., "-o", "--out", help="Report folder, e.g. reports/quickstart."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing report."),
):
    """Write a self-contained HTML report of a run folder.

    Example: mechedit report runs/quickstart -o reports/quickstart
    """
    from mechedit.report import build_report

    index = build_report(run_dir, out, force=force)
    typer.echo(f"report written to {index}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
