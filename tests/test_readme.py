"""The README says what happens: its CLI tour runs, its examples name real things, its blocks parse.

- The tour ("A tour of the CLI") is read from README.md itself (so the two cannot drift) and run
  command by command on the tiny world and model preset: `analyses/worlds/default.toml` becomes
  `analyses/worlds/tiny.toml`, `--model default` becomes `--model tiny`, the quickstart analysis a
  tiny grid on the tour's own checkpoint (one worker), and the default world's names in it the
  tiny world's names of the same kind (a trained subject with that relation, another object of it).
  Before that, every name in the tour is checked against the default world.
- Every command's `--help` example parses (its options exist) and names a fact, subject, relation
  and object of the default world; what it reads is a file of the repository or what another
  example writes. A slow test runs them on a default-world checkpoint.
- The README's TOML blocks are the shipped specs; its Python snippet runs on a checkpoint.
"""
from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
import typer
from clitools import invoke

from mechedit.world import World, default_world_spec, generate_world, tiny_world_spec

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def section(title: str) -> str:
    """The README's text under `## title` up to the next `## ` heading."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def tour_commands() -> list[list[str]]:
    """The `mechedit ...` lines of the tour's code block, without their trailing comments."""
    out = []
    for line in section("A tour of the CLI").splitlines():
        if line.startswith("    mechedit "):
            out.append(shlex.split(line.strip(), comments=True))
    return out


def example_commands() -> dict[str, list[str]]:
    """Each command's `--help` example ("Example: mechedit ..."), split like a shell would."""
    group = typer.main.get_command(__import__("mechedit.cli", fromlist=["app"]).app)
    out = {}
    for name, cmd in group.commands.items():
        m = re.search(r"Example:\s*(mechedit .*)", cmd.help or "")
        assert m, f"`mechedit {name} --help` has no example"
        text = re.split(r"\s{2,}\(", m.group(1))[0]  # drop a trailing "   (comment)"
        out[name] = shlex.split(text)
    return out


@pytest.fixture(scope="module")
def default_world() -> World:
    return generate_world(default_world_spec())


def option_values(args: list[str], *flags: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a in flags]


def check_names(args: list[str], world: World) -> list[tuple[str, str]]:
    """Every fact, subject, relation and new object an example names exists in `world` (a new object is
    another object of the fact's relation); returns the (subject, relation) pairs it names."""
    from mechedit.unlearn.targets import parse_forget

    pairs = []
    for fact in option_values(args, "--fact"):
        f = world.parse_fact(fact)
        assert world.is_trained(f), f"{fact}: a held-out subject's fact (never trained)"
        pairs.append((world.subject_of(f).name, f.relation))
        for new in option_values(args, "--new"):
            assert new in world.relation(f.relation).objects and new != f.object, f"--new {new} for {fact}"
    forget = option_values(args, "--forget", "-f")
    if forget:
        target = parse_forget(world, forget)
        pairs += [(world.subject_of(f).name, f.relation) for f in target.forget]
    for rel in option_values(args, "--relation"):
        world.relation(rel)
    return pairs


def test_tour_and_examples_name_real_things_of_the_default_world(default_world):
    named = 0
    for args in tour_commands() + list(example_commands().values()):
        named += len(check_names(args, default_world))
    assert named >= 4  # the tour's edit and unlearn, the examples' edit and unlearn


def test_help_examples_parse_and_read_what_another_example_writes():
    import click

    group = typer.main.get_command(__import__("mechedit.cli", fromlist=["app"]).app)
    examples = example_commands()
    assert set(examples) >= {"world", "train", "info", "trace", "edit", "unlearn", "diagnose", "run", "report"}
    written, read = set(), []
    for name, args in examples.items():
        assert args[:2] == ["mechedit", name], args
        cmd = group.commands[name]
        ctx = cmd.make_context(name, list(args[2:]))  # unknown options, bad values: click raises here
        written.add(str(ctx.params.get("out")))
        for p in cmd.params:
            if isinstance(p, click.Argument) and ctx.params.get(p.name) is not None:
                read.append(str(ctx.params[p.name]))
    for path in read:
        assert path in written or (ROOT / path).exists(), f"an example reads {path}, which no example writes"


def _tiny_names(args: list[str], default: World, tiny: World) -> dict[str, str]:
    """Replacements of the default world's names in `args` by names of the same kind in the tiny world."""
    from mechedit.unlearn.targets import parse_forget

    repl: dict[str, str] = {}

    def tiny_subject(name: str, relation: str) -> str:
        if name not in repl:
            s = next(tiny.subject_of(f).name for f in tiny.train_facts if f.relation == relation
                     and tiny.subject_of(f).kind == "subject")
            repl[name] = s
        return repl[name]

    for fact in option_values(args, "--fact"):
        f = default.parse_fact(fact)
        s = tiny_subject(default.subject_of(f).name, f.relation)
        g = tiny.fact(s, f.relation)
        for new in option_values(args, "--new"):
            repl[new] = next(o for o in tiny.relation(f.relation).objects if o != g.object)
    forget = option_values(args, "--forget", "-f")
    if forget:
        for f in parse_forget(default, forget).forget:
            tiny_subject(default.subject_of(f).name, f.relation)
    return repl


def to_tiny(args: list[str], default: World, tiny: World, tmp: Path) -> list[str]:
    repl = _tiny_names(args, default, tiny)
    out = []
    for i, a in enumerate(args):
        if a == "analyses/worlds/default.toml":
            a = str(ROOT / "analyses" / "worlds" / "tiny.toml")
        elif a == "analyses/quickstart.toml":
            spec = tmp / "tour_analysis.toml"
            spec.write_text((ROOT / "tests" / "analysis_tiny.toml").read_text().replace("CHECKPOINT", str(tmp / "runs" / "model")))
            a = str(spec)
        elif i > 0 and args[i - 1] == "--model" and a == "default":
            a = "tiny"
        for old, new in repl.items():
            a = a.replace(old, new)
        out.append(a)
    if out[1] == "run":
        out.append("--workers=1")  # the pool is tested in test_analysis.py; here it would only cost time
    return out


def test_readme_tour_runs_on_the_tiny_preset(tmp_path, monkeypatch, default_world):
    tiny = generate_world(tiny_world_spec())
    commands = tour_commands()
    assert [c[1] for c in commands] == ["world", "train", "info", "trace", "edit", "unlearn", "diagnose", "run", "report"]
    monkeypatch.chdir(tmp_path)
    outputs = {}
    for args in commands:
        tiny_args = to_tiny(args, default_world, tiny, tmp_path)
        r = invoke(*tiny_args[1:])
        assert r.returncode == 0, f"{shlex.join(tiny_args)}\n{r.stdout}\n{r.stderr}"
        assert "Traceback" not in r.stderr
        outputs[args[1]] = r
        out = option_values(tiny_args, "-o", "--out")
        if out:
            assert Path(out[0]).is_dir() and out[0] in r.stdout.splitlines()[-1], r.stdout  # it says where it wrote
    # what the README says they print
    assert "world:" in outputs["world"].stdout and "subjects" in outputs["world"].stdout
    assert "recall on trained facts" in outputs["train"].stdout
    import json

    names = json.loads(outputs["info"].stdout)["names"]
    assert names["subjects"] and names["facts"] and "capital" in names["relations"]
    assert "early site (last subject token)" in outputs["trace"].stdout
    assert "efficacy" in outputs["edit"].stdout and "forget recall" in outputs["unlearn"].stdout
    assert "MIA AUC" in outputs["diagnose"].stdout and "probe accuracy" in outputs["diagnose"].stdout
    assert (tmp_path / "runs" / "edit" / "edit" / "edit.json").is_file()
    assert (tmp_path / "runs" / "unlearn" / "edit" / "edit.json").is_file()
    assert (tmp_path / "reports" / "quickstart" / "index.html").is_file()
    # the README's Python snippet, on the tour's checkpoint
    snippet = re.search(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S).group(1)
    assert "runs/model" in snippet
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert scope["b"].world.spec == tiny_world_spec() and scope["hf"].config.num_hidden_layers == 2


def test_readme_spec_blocks_are_the_shipped_specs(tmp_path):
    from mechedit.model.spec import model_spec
    from mechedit.world import WorldSpec

    blocks = re.findall(r"```toml\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    world_blocks = [b for b in blocks if "[[relations]]" in b]
    assert world_blocks, "the README shows no world spec"
    (tmp_path / "w.toml").write_text(world_blocks[0])
    assert WorldSpec.from_file(tmp_path / "w.toml") == WorldSpec.from_file(ROOT / "analyses" / "worlds" / "default.toml")
    for i, b in enumerate(b for b in blocks if b.lstrip().startswith("preset")):
        (tmp_path / f"m{i}.toml").write_text(b)
        model_spec(str(tmp_path / f"m{i}.toml"))


def test_readme_points_only_inside_the_repository():
    text = README.read_text(encoding="utf-8")
    assert "../" not in text and "/work/" not in text
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), f"README links to {target}, which the repository does not have"


@pytest.mark.slow
def test_help_examples_run_on_the_default_world(tmp_path, monkeypatch):
    """Each `--help` example as written, on the default world: `runs/model` is the checkpoint in
    $MECHEDIT_DEFAULT_CHECKPOINT (else the `train` example trains it). `run` and `report` are what
    `make demo` runs (the quickstart), left to it."""
    monkeypatch.chdir(tmp_path)
    given = os.environ.get("MECHEDIT_DEFAULT_CHECKPOINT")
    if given:
        (tmp_path / "runs").mkdir()
        (tmp_path / "runs" / "model").symlink_to(Path(given).resolve())
    order = ["world", "train", "info", "trace", "edit", "unlearn", "diagnose"]
    examples = example_commands()
    for name in order:
        if name == "train" and given:
            continue
        r = invoke(*examples[name][1:])
        assert r.returncode == 0, f"{shlex.join(examples[name])}\n{r.stdout}\n{r.stderr}"


def test_readme_inline_commands_parse():
    """Every `mechedit COMMAND ARGS` the README's prose quotes is a command whose options exist."""
    group = typer.main.get_command(__import__("mechedit.cli", fromlist=["app"]).app)
    quoted = [shlex.split(" ".join(m.split())) for m in re.findall(r"`(mechedit [^`]+)`", README.read_text(encoding="utf-8"))]
    assert quoted
    for args in quoted:
        assert args[1] in group.commands, args
        if len(args) > 2:
            group.commands[args[1]].make_context(args[1], args[2:])  # an unknown option raises here
