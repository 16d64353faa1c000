"""The `mechedit` command line: thin typer commands over library functions.

One grammar (README, "The command line"): the first argument is what the command reads (a spec, a
checkpoint, a run folder); `-o/--out` is the one folder it writes (each command has a default) and
`--force` lets it replace a non-empty one; `-m/--method` names an editing or unlearning method and
`-p/--param KEY=VALUE` sets one of its parameters; `-f/--forget` names what to forget; `-s/--suite`
and `--option KEY=VALUE` choose diagnostic suites and set their options; `--fact "SUBJECT|RELATION"`
names a fact. Progress goes to stderr, results to stdout, the headline numbers last.

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


def precision_option():
    return typer.Option(None, "--precision", help="Inference arithmetic of tracing, scoring and diagnostics: "
                        "float32 (the default), bfloat16 (autocast) or auto (README \"Devices and precision\").")


def use(device: str | None, precision: str | None = None) -> None:
    """Make `--device` the device of this command and `--precision` its inference precision (a
    one-line error if either is not available or not known)."""
    from mechedit.device import check_precision, use_device, use_precision

    use_device(device or "auto")
    use_precision(check_precision(precision, "--precision"))


def fail(message: str) -> None:
    typer.echo(f"error: {one_line(message)}", err=True)
    raise typer.Exit(2)


def command(*args, **kwargs):
    """`app.command` whose body turns MecheditError (and Ctrl-C, and what the machine refuses:
    memory, disk, permissions) into one line and an exit code (2; 130 for Ctrl-C), and shows the
    progress of its long steps on stderr (`mechedit.progress`: plain timestamped lines in a log, a
    spinner on a terminal). Results go to stdout, ending with the command's headline numbers."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*a, **k):
            from mechedit import progress

            try:
                with progress.Reporter() as reporter, progress.activate(reporter):
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


# ---- one grammar: the same flag means the same thing in every command (README "The command line") ----
OUT_HELP = "Output directory (default: {}); refused if not empty unless --force."
FORCE_HELP = "Overwrite a non-empty output directory."
METHOD_HELP = ("Method: an editor (rome, memit, alphaedit, grace, wise, finetune, lora) or an unlearning method "
               "(ga, gd, npo, dpo, rt, rmu, repe, icu).")
PARAM_HELP = "A method parameter KEY=VALUE (repeatable), e.g. -p steps=40."
FORGET_HELP = "What to forget: subject:NAME, fact:SUBJECT|RELATION or relation:NAME (repeatable)."


def out_option(default: str | None):
    if default is None:
        return typer.Option(..., "-o", "--out", help="Output directory (required); refused if not empty unless --force.")
    return typer.Option(Path(default), "-o", "--out", help=OUT_HELP.format(default))


def force_option():
    return typer.Option(False, "--force", help=FORCE_HELP)


def param_option():
    return typer.Option([], "--param", "-p", help=PARAM_HELP)


def fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


@command()
def world(
    spec: Optional[Path] = typer.Argument(None, help="World spec (TOML or JSON); default: the embedded default."),
    out: Path = out_option("runs/world"),
    force: bool = force_option(),
):
    """Generate a synthetic world (world.json + tokenizer).

    Example: mechedit world analyses/worlds/default.toml -o runs/world
    """
    from mechedit.fileio import check_output_dir
    from mechedit.model.pipeline import resolve_world, write_world

    check_output_dir(out, force)
    w = resolve_world(spec)
    path = write_world(w, out, force)
    sm = w.summary()
    typer.echo(f"world: {sm['subjects']} subjects ({sm['heldout_subjects']} held out), {sm['relations']} relations, "
               f"{sm['facts']} facts ({sm['train_facts']} trained), {sm['corpus_sentences']} training sentences, "
               f"vocabulary {sm['vocabulary']}")
    typer.echo(f"world written to {path}/world.json (names: mechedit info {path} --names)")


@command()
def train(
    world_source: Optional[Path] = typer.Argument(None, metavar="[WORLD]",
                                                  help="World directory or spec file; default: the embedded default."),
    model: Optional[str] = typer.Option(None, "--model", help="Model preset (default, pythia-31m-like, tiny) or spec file."),
    model_short: Optional[str] = typer.Option(None, "-m", hidden=True,
                                              help="Old spelling of --model (-m is --method everywhere else)."),
    out: Path = out_option("runs/model"),
    force: bool = force_option(),
    seed: Optional[int] = typer.Option(None, "--seed", help="Training seed (overrides the spec)."),
    max_epochs: Optional[int] = typer.Option(None, "--max-epochs", help="Epoch limit (overrides the spec)."),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--fp32", help="bf16 autocast (overrides the spec)."),
    device: Optional[str] = device_option(),
):
    """Train a GPT-NeoX model on a world until it recalls its facts.

    Example: mechedit train --model default -o runs/model            (embedded default world and model)
    """
    use(device)
    from mechedit.fileio import check_output_dir
    from mechedit.model.pipeline import resolve_world, train_checkpoint
    from mechedit.model.spec import model_spec, with_overrides

    if model is not None and model_short is not None and model != model_short:
        raise MecheditError("give the model once, with --model")
    if model_short is not None:
        typer.echo("note: `train -m` is the old spelling of `--model` (-m means --method in edit and unlearn)", err=True)
    check_output_dir(out, force)
    mspec, tspec = model_spec(model or model_short or "default")
    tspec = with_overrides(tspec, seed=seed, max_epochs=max_epochs, bf16=bf16)
    w = resolve_world(world_source)
    bundle = train_checkpoint(w, mspec, tspec, out, force=force)
    rec = bundle.meta["final_recall"]["trained"]["by_kind"]
    held = bundle.meta["final_recall"]["heldout_subjects"]["by_kind"]
    typer.echo(f"trained {bundle.meta['epochs']} epochs in {bundle.meta['train_seconds']:.0f} s; recall on trained "
               "facts: " + ", ".join(f"{k} {v:.3f}" for k, v in rec.items())
               + f"; held-out subjects (chance): cloze {held.get('cloze', float('nan')):.3f}")
    inference = bundle.meta["final_recall"].get("inference")
    if inference:
        typer.echo("held-out inference facts (never trained): " + ", ".join(
            f"{k} {v['cloze']:.3f} cloze / {v['qa']:.3f} QA (n={v['n_facts']})" for k, v in inference.items()))
    typer.echo(f"checkpoint written to {out}")


@command("finetune-facts")
def finetune_facts(
    checkpoint: Path = typer.Argument(..., help="First-stage checkpoint of a world with stage2_subject_fraction > 0."),
    out: Path = typer.Option(..., "-o", "--out", help="Second-stage checkpoint directory."),
    param: list[str] = param_option(),
    force: bool = force_option(),
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
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory (or a world directory: its world and names)."),
    names: bool = typer.Option(False, "--names", help="List every subject, relation, object and fact."),
    device: Optional[str] = device_option(),
):
    """Summarise a checkpoint (JSON): model, world, training, recall per probe set, and the world's
    names (a sample; --names lists them all). A world directory gives its world and names.

    Example: mechedit info runs/model --names
    """
    use(device)
    from mechedit.model.pipeline import info as info_fn

    typer.echo(json.dumps(info_fn(checkpoint, all_names=names), indent=2, ensure_ascii=False))


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
    out: Path = out_option("runs/trace"),
    force: bool = force_option(),
    device: Optional[str] = device_option(),
    precision: Optional[str] = precision_option(),
):
    """Causal tracing (ROME): which layer, site and token carry a fact.

    Prints, per site kind, the early site (last subject token) and the late site (last token): the
    layer with the largest mean indirect effect there, with its 95% interval, or "none" when that
    interval includes 0.

    Example: mechedit trace runs/model --relation capital --n 50 --severed mlp -o runs/trace_capital
    """
    use(device, precision)
    from mechedit.trace.api import TraceConfig
    from mechedit.trace.result import CATEGORY_LABELS, SITE_TOKENS, describe_location
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
               f"{te['mean']:.3f} ± {te['ci95']:.3f}")
    heads = {where: f"{where} site ({CATEGORY_LABELS[cat]})" for where, cat in SITE_TOKENS.items()}
    width = max(len(describe_location(loc)) for by in r["sites"].values() for loc in by.values())
    width = max(width, *(len(h) for h in heads.values()))
    kw = max(len(k) for k in r["sites"])
    typer.echo(f"{'':{kw}}  " + "  ".join(f"{h:{width}}" for h in heads.values()).rstrip())
    for k, by in r["sites"].items():
        typer.echo(f"{k:{kw}}  " + "  ".join(f"{describe_location(by.get(w)):{width}}" for w in heads).rstrip())
    if "mlp" in r["located"]:
        typer.echo(f"--layer traced edits MLP layer {r['located']['mlp']['layer']} (the early site)")
    typer.echo(f"run written to {r['out']}; figures in {r['out']}/figures")


def _layer_value(layer: str):
    from mechedit.edit.api import parse_param_value

    if layer in ("traced", "all"):
        return layer
    if "," in layer:
        return [parse_param_value(x, "--layer") for x in layer.split(",")]
    return parse_param_value(layer, "--layer")


@command()
def edit(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory."),
    method: str = typer.Option("rome", "--method", "-m", help=METHOD_HELP),
    fact: Optional[str] = typer.Option(None, "--fact", help='The fact to change, "SUBJECT|RELATION".'),
    new: Optional[str] = typer.Option(None, "--new", help="The new object."),
    requests_file: Optional[Path] = typer.Option(None, "--requests", help="JSON lines of {subject, relation, new_object}."),
    layer: Optional[str] = typer.Option(None, "--layer", help="Layer: an integer, a comma list, 'traced' or 'all'."),
    param: list[str] = param_option(),
    out: Path = out_option("runs/edit"),
    force: bool = force_option(),
    device: Optional[str] = device_option(),
):
    """Edit facts in a checkpoint: OUT/ is the edited checkpoint, OUT/edit/ the edit (edit.json,
    deltas.safetensors), OUT/scorecard.json its scores.

    Example: mechedit edit runs/model -m rome --fact "kafepe zipele|capital" --new livi --layer traced -o runs/edit
    """
    use(device)
    from mechedit.diagnose.headline import card_headline
    from mechedit.edit.api import EditRequest, parse_params
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
        params["layer"] = _layer_value(layer)
    card = edit_checkpoint(checkpoint, reqs, method, params, out, force=force)
    typer.echo(f"{method} on {len(reqs)} request(s): {card_headline({'edit': card})}")
    typer.echo(f"edited checkpoint written to {out} (the edit in {out}/edit, scores in {out}/scorecard.json)")


@command()
def unlearn(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory to unlearn from."),
    forget: list[str] = typer.Option(..., "--forget", "-f", help=FORGET_HELP),
    method: str = typer.Option("npo", "--method", "-m", help=METHOD_HELP + " Default: npo."),
    param: list[str] = param_option(),
    out: Path = out_option("runs/unlearn"),
    force: bool = force_option(),
    device: Optional[str] = device_option(),
):
    """Unlearn facts: OUT/ is the unlearned checkpoint, OUT/edit/ the change (edit.json,
    deltas.safetensors), OUT/scorecard.json the forget scores.

    Example: mechedit unlearn runs/model -m npo --forget "subject:kafepe zipele" -p steps=80 -o runs/unlearn
    """
    use(device)
    from mechedit.diagnose.headline import card_headline
    from mechedit.edit.api import parse_params
    from mechedit.unlearn.run import unlearn_checkpoint

    card = unlearn_checkpoint(checkpoint, method, forget, parse_params(param), out, force)
    typer.echo(f"{method}: {card_headline(card)}")
    typer.echo(f"unlearned checkpoint written to {out} (the change in {out}/edit, scores in {out}/scorecard.json)")


@command()
def diagnose(
    before: Path = typer.Argument(..., help="Checkpoint before the edit / unlearning."),
    after: Path = typer.Argument(..., help="Checkpoint after it (its edit/edit.json gives the requests)."),
    suite: list[str] = typer.Option([], "--suite", "-s", help="Suite name (repeatable; 'all' for every suite). "
                                    "Default: forget + leftover."),
    forget: list[str] = typer.Option([], "--forget", "-f", help=FORGET_HELP + " Overrides AFTER's requests."),
    option: list[str] = typer.Option([], "--option", help="A suite option KEY=VALUE (repeatable), e.g. --option k=0.1."),
    out: Path = out_option("runs/diagnose"),
    force: bool = force_option(),
    device: Optional[str] = device_option(),
    precision: Optional[str] = precision_option(),
):
    """Score AFTER against BEFORE with diagnostic suites (forget, leftover, relearn, forget_quality, edit...).

    Example: mechedit diagnose runs/model runs/unlearn --suite leftover -o runs/diagnose
    """
    use(device, precision)
    from mechedit.diagnose.headline import card_headline
    from mechedit.edit.api import parse_params
    from mechedit.unlearn.run import diagnose_checkpoints

    card = diagnose_checkpoints(before, after, list(suite), out, list(forget), parse_params(option, "--option"), force)
    typer.echo(card_headline(card))
    typer.echo(f"scorecard written to {out}/scorecard.json")


def _case_lines(run_dir: Path) -> list[str]:
    """One line per finished case of a run folder: its id and headline numbers."""
    from mechedit.analysis.folder import read_run
    from mechedit.diagnose.headline import case_title, headline_text

    _, cases = read_run(run_dir)
    return [f"  {c['id']} ({case_title(c)}): {headline_text(c['summary'])}" for c in cases]


@command()
def run(
    spec: Path = typer.Argument(..., help="Analysis spec (TOML), e.g. analyses/quickstart.toml."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Run folder (default: runs/<spec name>); a rerun resumes it."),
    executor: str = typer.Option("local", "--executor", help="local (process pool) or ray."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Parallel cases (default: the number of cores)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: start a local Ray)."),
    force: bool = typer.Option(False, "--force", help="Start over if the folder holds a run of another spec."),
    device: Optional[str] = device_option(),
    precision: Optional[str] = precision_option(),
):
    """Run an analysis: train or reuse the model, trace, run every case of the grid.

    Example: mechedit run analyses/quickstart.toml -o runs/quickstart
    """
    from mechedit.analysis import run_analysis
    from mechedit.analysis.spec import load_analysis
    from mechedit.device import check_precision

    if precision is not None:
        precision = check_precision(precision, "--precision")  # before the spec is read
    if out is None:
        out = Path("runs") / load_analysis(spec).name
    res = run_analysis(spec, out, executor_name=executor, workers=workers, address=address, force=force, device=device,
                       precision=precision)
    typer.echo(f"{res['done']}/{res['total']} cases done ({res['ran']} run now, {res['skipped']} resumed) in {res['run_dir']}:")
    for line in _case_lines(res["run_dir"]):
        typer.echo(line)
    typer.echo(f"next: mechedit report {res['run_dir']} -o reports/{Path(res['run_dir']).name}")


@command()
def report(
    run_dir: Path = typer.Argument(..., help="Run folder written by `mechedit run`."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Report folder (default: reports/<run folder name>)."),
    force: bool = force_option(),
):
    """Write a self-contained HTML report of a run folder.

    Example: mechedit report runs/quickstart -o reports/quickstart
    """
    from mechedit.report import build_report

    if out is None:
        out = Path("reports") / Path(run_dir).resolve().name
    index = build_report(run_dir, out, force=force)
    typer.echo(f"cases of {run_dir}:")
    for line in _case_lines(run_dir):
        typer.echo(line)
    typer.echo(f"report written to {index}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
