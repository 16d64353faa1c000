"""Fuzz the command line: every command gets >= 100 bad inputs and must answer each with exit code 2,
exactly one line on stderr, no traceback, and an untouched output directory (no hidden partial either).

The bad inputs are generated: every field of every spec class (world, model, train, method parameters,
trace settings, suite options) gets values of the wrong type, non-finite numbers and sizes beyond the
limits, plus hand-written range violations, corrupt checkpoints (flipped weight bytes, partial
mechedit.json, broken world.json...), corrupt run folders and bad output paths. The commands run
in-process (tests/clitools.py); `test_real_processes_print_one_line` checks what only a real process
shows (library warnings on stderr, the entry point, non-UTF-8 files read from disk).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from clitools import invoke

from mechedit.model.spec import ModelSpec, TrainSpec
from mechedit.world import CorrelatedSpec, CyclicSpec, NestedSpec, RelationSpec, WorldSpec

HUGE = 2**64  # beyond every integer limit (counts: 10**6; seeds: 2**63 - 1)
BAD_INT = ["abc", 1.5, True, [1], {"k": 1}, HUGE, -HUGE]
BAD_FLOAT = ["abc", True, [1], math.inf, -math.inf, math.nan]
BAD_STR = [5, [1], True, {"k": 1}]
BAD_BOOL = ["yes", 1, 0.5]
BAD_PRECISION = ["bogus", "", "bf16", "fp16", "float16", "half", "1", "float32,bfloat16"]  # --precision


def bad_values(tp) -> list:
    """Values that no field of type `tp` may take (empty for types we cannot vouch for)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return bad_values(args[0])
    if origin is typing.Union or str(origin) == "types.UnionType":
        members = [a for a in args if a is not type(None)]
        if str in members or any(typing.get_origin(a) in (list, tuple) for a in members):
            return []  # e.g. a layer given as int, list or string: types alone cannot be wrong
        return [v for v in bad_values(members[0]) if all(v in bad_values(m) for m in members)] if members else []
    if origin is tuple:
        out = ["x", 5, True, [["nested"]]]
        if args and args[-1] is Ellipsis and args[0] in (int, float):
            out += [[v] for v in (BAD_INT if args[0] is int else BAD_FLOAT)[:3]]
        elif args and all(a in (int, float) for a in args):
            out += [[v] * len(args) for v in (BAD_INT if args[0] is int else BAD_FLOAT)[:3]] + [[1] * (len(args) + 1)]
        return out
    return {int: BAD_INT, float: BAD_FLOAT, str: BAD_STR, bool: BAD_BOOL}.get(tp, [])


def field_mutations(cls, base: dict, prefix: str = "") -> list[tuple[str, dict]]:
    """`base` with one field of dataclass `cls` set to each bad value of its type; nested spec lists
    (relations, correlated, ...) also get their first element's fields mutated."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        for v in bad_values(tp):
            out.append((f"{prefix}{f.name}={v!r}", {**base, f.name: v}))
        args = typing.get_args(tp)
        if typing.get_origin(tp) is tuple and args and dataclasses.is_dataclass(args[0]) and base.get(f.name):
            first = base[f.name][0]
            for name, mutated in field_mutations(args[0], first, f"{prefix}{f.name}[0]."):
                out.append((name, {**base, f.name: [mutated, *base[f.name][1:]]}))
    return out


# ---- worlds ---------------------------------------------------------------------------------
WORLD = {"seed": 1, "n_subjects": 10, "relations": [{"name": "capital", "n_objects": 4},
                                                    {"name": "country", "n_objects": 2}],
         "correlated": [], "nested": [{"parent": "capital", "child": "country"}],
         "cyclic": [{"name": "ring", "n_entities": 5, "hops": [1]}]}
WORLD_RANGES = [
    ("n_subjects=1", {"n_subjects": 1}), ("n_subjects=0", {"n_subjects": 0}), ("n_subjects=-5", {"n_subjects": -5}),
    ("n_subjects=10**18", {"n_subjects": 10**18}), ("facts beyond the limit", {"n_subjects": 600_000}),
    ("name_words sum 2.7", {"name_words": [0.9, 0.9, 0.9]}), ("name_words negative", {"name_words": [-0.5, 1, 0.5]}),
    ("name_words zero", {"name_words": [0, 0, 0]}), ("name_words two", {"name_words": [0.5, 0.5]}),
    ("syllables 0", {"syllables": [0, 2]}), ("syllables reversed", {"syllables": [3, 1]}),
    ("syllables 9", {"syllables": [1, 9]}), ("word_reuse 0.5", {"word_reuse": 0.5}), ("object_words 3", {"object_words": 3}),
    ("object_words 0", {"object_words": 0}), ("alias_fraction 1.5", {"alias_fraction": 1.5}),
    ("alias_share -0.1", {"alias_share": -0.1}), ("crosslingual 2", {"crosslingual_share": 2.0}),
    ("heldout 1", {"heldout_subject_fraction": 1.0}), ("n_templates 1", {"n_templates": 1}),
    ("n_templates 6", {"n_templates": 6}), ("seed -1", {"seed": -1}), ("no relations", {"relations": [], "cyclic": []}),
    ("relation name", {"relations": [{"name": "Capital City"}]}), ("relation n_objects 1", {"relations": [{"name": "a", "n_objects": 1}]}),
    ("relation no name", {"relations": [{"n_objects": 3}]}), ("relation unknown key", {"relations": [{"name": "a", "colour": 1}]}),
    ("duplicate relation", {"relations": [{"name": "a"}, {"name": "a"}]}),
    ("correlated unknown", {"correlated": [{"source": "capital", "target": "nope"}]}),
    ("correlated self", {"correlated": [{"source": "capital", "target": "capital"}]}),
    ("correlated p 2", {"correlated": [{"source": "capital", "target": "country", "p": 2.0}]}),
    ("nested unknown", {"nested": [{"parent": "nope", "child": "country"}]}),
    ("nested child larger", {"nested": [{"parent": "country", "child": "capital"}]}),
    ("cyclic 2 entities", {"cyclic": [{"name": "ring", "n_entities": 2}]}),
    ("cyclic hop 0", {"cyclic": [{"name": "ring", "n_entities": 5, "hops": [0]}]}),
    ("cyclic hop 5", {"cyclic": [{"name": "ring", "n_entities": 5, "hops": [5]}]}),
    ("unknown key", {"colour": 3}),
]


def world_spec_cases() -> list[tuple[str, str]]:
    """(id, JSON text) of world specs that must be refused."""
    cases = [(k, {**WORLD, **v}) for k, v in WORLD_RANGES] + field_mutations(WorldSpec, WORLD)
    return [(k, json.dumps(v)) for k, v in cases]  # json writes inf/nan as Infinity/NaN, which it reads back


# ---- models ---------------------------------------------------------------------------------
MODEL_RANGES = [
    ("n_layers 0", {"model": {"n_layers": 0}}), ("d_model 0", {"model": {"d_model": 0}}),
    ("heads do not divide", {"model": {"d_model": 30, "n_heads": 4}}), ("rotary 1.5", {"model": {"rotary_pct": 1.5}}),
    ("too many parameters", {"model": {"d_model": 100_000, "d_mlp": 1_000_000}}),
    ("max_epochs 0", {"train": {"max_epochs": 0}}), ("max_epochs 10**5", {"train": {"max_epochs": 100_000}}),
    ("lr 0", {"train": {"lr": 0.0}}), ("lr -1", {"train": {"lr": -1.0}}), ("batch 0", {"train": {"batch_size": 0}}),
    ("eval_every 0", {"train": {"eval_every": 0}}), ("target 1.5", {"train": {"target_recall": 1.5}}),
    ("warmup -1", {"train": {"warmup_steps": -1}}), ("grad_clip 0", {"train": {"grad_clip": 0.0}}),
    ("preset nope", {"preset": "nope"}), ("preset 5", {"preset": 5}), ("model 5", {"model": 5}),
    ("train list", {"train": [1]}), ("unknown top key", {"optimizer": "sgd"}),
    ("unknown model key", {"model": {"n_layer": 2}}), ("unknown train key", {"train": {"epochs": 2}}),
]


def model_spec_cases() -> list[tuple[str, str]]:
    base = {"preset": "tiny", "model": {}, "train": {"max_epochs": 2}}
    cases = [(k, {**base, **v}) for k, v in MODEL_RANGES]
    cases += [(f"model.{k}", {**base, "model": v}) for k, v in field_mutations(ModelSpec, {})]
    cases += [(f"train.{k}", {**base, "train": v}) for k, v in field_mutations(TrainSpec, {})]
    return [(k, json.dumps(v)) for k, v in cases]


# ---- corrupt checkpoints --------------------------------------------------------------------
def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))


def corrupt_checkpoints(src: Path, root: Path) -> list[tuple[str, Path]]:
    """Copies of checkpoint `src`, each broken in one way (every one must be refused on load)."""
    out: list[tuple[str, Path]] = []

    def variant(name: str, fn) -> None:
        d = root / f"ck{len(out)}"
        shutil.copytree(src, d)
        fn(d)
        out.append((name, d))

    out.append(("missing", root / "no-such-checkpoint"))
    (root / "a-file").write_text("x")
    out.append(("a file", root / "a-file"))
    (root / "empty").mkdir()
    out.append(("empty folder", root / "empty"))
    for f in ("config.json", "model.safetensors", "tokenizer.json", "world.json", "mechedit.json"):
        variant(f"no {f}", lambda d, f=f: (d / f).unlink())
    header = 8 + int.from_bytes((src / "model.safetensors").read_bytes()[:8], "little")
    size = (src / "model.safetensors").stat().st_size
    for i in range(8):  # a flipped byte anywhere in the tensor data: the weights hash no longer matches
        variant(f"flipped weight byte {i}", lambda d, i=i: _flip(d / "model.safetensors", header + (size - header) * i // 8))
    variant("flipped header byte", lambda d: _flip(d / "model.safetensors", 20))
    variant("truncated weights", lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100]))

    def meta_edit(fn):
        def apply(d):
            meta = json.loads((d / "mechedit.json").read_text())
            (d / "mechedit.json").write_text(json.dumps(fn(meta)))
        return apply

    def unhashed_random_weights(d):
        meta_edit(lambda m: {k: v for k, v in m.items() if k != "weights_sha256"})(d)
        (d / "model.safetensors").write_bytes(os.urandom(2000))

    variant("random weights without a hash", unhashed_random_weights)
    for text in ("", "{}", "[]", "null", "{oops", "{\"mechedit_version\": NaN}"):
        variant(f"mechedit.json {text!r}", lambda d, t=text: (d / "mechedit.json").write_text(t))
    variant("mechedit.json not UTF-8", lambda d: (d / "mechedit.json").write_bytes(b"{\"a\": \"\xff\xfe\"}"))
    for key in ("mechedit_version", "model_spec", "train_spec", "world_spec"):
        variant(f"mechedit.json without {key}", meta_edit(lambda m, k=key: {a: b for a, b in m.items() if a != k}))
    variant("wrong weights hash", meta_edit(lambda m: {**m, "weights_sha256": "0" * 64}))
    variant("weights hash not a string", meta_edit(lambda m: {**m, "weights_sha256": 5}))
    for text in ("", "{oops", "[]", "{}", "{\"model_type\": \"gpt_neox\", \"hidden_size\": \"x\"}"):
        variant(f"config.json {text!r}", lambda d, t=text: (d / "config.json").write_text(t))

    def config_edit(**kw):
        def apply(d):
            cfg = json.loads((d / "config.json").read_text())
            (d / "config.json").write_text(json.dumps({**cfg, **kw}))
        return apply

    variant("config of a huge model", config_edit(hidden_size=100_000, intermediate_size=1_000_000))
    variant("config of another shape", config_edit(hidden_size=64))
    variant("config layers 0", config_edit(num_hidden_layers=0))
    variant("config of another architecture", config_edit(model_type="llama", architectures=["LlamaForCausalLM"]))
    for text in ("", "{oops", "[]"):
        variant(f"tokenizer.json {text!r}", lambda d, t=text: (d / "tokenizer.json").write_text(t))
    variant("tokenizer.json not UTF-8", lambda d: (d / "tokenizer.json").write_bytes(b"\xff\xfe\x00"))

    def world_edit(fn):
        def apply(d):
            w = json.loads((d / "world.json").read_text())
            (d / "world.json").write_text(json.dumps(fn(w)))
        return apply

    for key in ("format", "spec", "subjects", "relations", "facts", "function_words_b"):
        variant(f"world.json without {key}", world_edit(lambda w, k=key: {a: b for a, b in w.items() if a != k}))
    for key, value in (("format", 2), ("subjects", "x"), ("facts", [{"index": 1}]), ("relations", 5),
                       ("function_words_b", [1]), ("subjects", [{"id": 0}])):
        variant(f"world.json {key}={value!r}", world_edit(lambda w, k=key, v=value: {**w, k: v}))
    variant("world.json not UTF-8", lambda d: (d / "world.json").write_bytes(b"\xff\xfe"))
    variant("world.json invalid", lambda d: (d / "world.json").write_text("{oops"))
    # the world's spec inside world.json: every bad world spec is a corrupt checkpoint
    for name, text in world_spec_cases():
        variant(f"world.json spec {name}", world_edit(lambda w, t=text: {**w, "spec": json.loads(t)}))
    return out


# ---- the harness ----------------------------------------------------------------------------
def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def check_all(cases: list[tuple[str, list]], outs: Path, min_cases: int = 100) -> None:
    """Run every case (id, argv); each must give exit 2, one stderr line, no traceback, `outs` untouched."""
    assert len(cases) >= min_cases, f"only {len(cases)} cases"
    failures = []
    for name, argv in cases:
        before = _snapshot(outs)
        r = invoke(*argv)
        lines = r.stderr.strip().splitlines()
        after = _snapshot(outs)
        problems = []
        if r.returncode != 2:
            problems.append(f"exit {r.returncode}")
        if len(lines) != 1:
            problems.append(f"{len(lines)} stderr lines")
        if "Traceback" in r.stderr + r.stdout:
            problems.append("traceback")
        if after != before:
            problems.append(f"output touched: {sorted(set(after) ^ set(before)) or 'changed'}")
        if problems:
            failures.append(f"{name}: {', '.join(problems)}: {r.stderr.strip()[-300:]}")
    assert not failures, f"{len(failures)}/{len(cases)} bad inputs mishandled:\n" + "\n".join(failures[:40])
    print(f"{argv_command(cases)}: {len(cases)} bad inputs, all exit 2 with one line, no traceback, output untouched")


def argv_command(cases: list[tuple[str, list]]) -> str:
    return str(cases[0][1][0]) if cases else "?"


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "outs").mkdir()
    (root / "outs" / "a-file").write_text("not a folder")
    (root / "outs" / "full").mkdir()
    (root / "outs" / "full" / "keep.txt").write_text("keep")
    (root / "ck").mkdir()
    return {"root": root, "outs": root / "outs", "ckpts": corrupt_checkpoints(tiny_checkpoint, root / "ck")}


def bad_outputs(outs: Path) -> list[tuple[str, Path]]:
    return [("output is a file", outs / "a-file"), ("output below a file", outs / "a-file" / "x"),
            ("output deep below a file", outs / "a-file" / "x" / "y"), ("output not empty", outs / "full"),
            ("output in /proc", Path("/proc/mechedit-out")), ("output under /dev/null", Path("/dev/null/x"))]


def write_specs(root: Path, cases: list[tuple[str, str]], stem: str) -> list[tuple[str, Path]]:
    out = []
    for i, (name, text) in enumerate(cases):
        p = root / f"{stem}{i}.json"
        p.write_text(text)
        out.append((name, p))
    return out


def file_cases(root: Path) -> list[tuple[str, Path]]:
    """Spec files that cannot be read: missing, a folder, not UTF-8, malformed, not a table."""
    specs = {"missing": None, "folder": None, "latin1.toml": "name = 'caf\xe9'\n".encode("latin-1"),
             "binary.json": os.urandom(64) + b"\xff", "oops.toml": b"seed = [oops\n", "oops.json": b"{oops",
             "list.json": b"[1, 2]", "deep.json": b"[" * 100_000, "nul.toml": b"seed = 1\x00\n"}
    out = []
    for name, data in specs.items():
        p = root / f"spec-{name}"
        if name == "folder":
            p = root / "spec-folder.toml"
            p.mkdir(exist_ok=True)
        elif data is not None:
            p.write_bytes(data)
        else:
            p = root / "spec-missing.toml"
        out.append((f"spec file {name}", p))
    return out


# ---- one test per command ---------------------------------------------------------------------
def test_fuzz_world(fuzz_dir):
    root, outs = fuzz_dir["root"], fuzz_dir["outs"]
    good = root / "good_world.json"
    good.write_text(json.dumps(WORLD))
    assert invoke("world", good, "-o", root / "ok_world").returncode == 0  # the base spec is valid
    cases = [(n, ["world", p, "-o", outs / "w"]) for n, p in write_specs(root, world_spec_cases(), "w")]
    cases += [(n, ["world", p, "-o", outs / "w"]) for n, p in file_cases(root)]
    cases += [(n, ["world", good, "-o", o]) for n, o in bad_outputs(outs)]
    cases += [("no such option", ["world", good, "--colour", "-o", outs / "w"])]
    check_all(cases, outs)


def test_fuzz_train(fuzz_dir):
    root, outs = fuzz_dir["root"], fuzz_dir["outs"]
    good = root / "good_world.json"
    good.write_text(json.dumps(WORLD))
    worlds = write_specs(root, world_spec_cases(), "tw")
    models = write_specs(root, model_spec_cases(), "tm")
    cases = [(n, ["train", p, "--model", "tiny", "--max-epochs", "1", "-o", outs / "m"]) for n, p in worlds]
    cases += [(n, ["train", good, "--model", p, "-o", outs / "m"]) for n, p in models]
    cases += [(n, ["train", p, "--model", "tiny", "-o", outs / "m"]) for n, p in file_cases(root)]
    cases += [(n, ["train", good, "--model", "tiny", "-o", o]) for n, o in bad_outputs(outs)]
    for opt, values in (("--seed", ["-1", str(10**20), "abc", "1.5", ""]),
                        ("--max-epochs", ["0", "-3", "100000", "abc", "1e400"])):
        cases += [(f"{opt} {v}", ["train", good, "--model", "tiny", opt, v, "-o", outs / "m"]) for v in values]
    cases += [("model preset nope", ["train", good, "--model", "nope", "-o", outs / "m"]),
              ("world folder corrupt", ["train", dict(fuzz_dir["ckpts"])["world.json invalid"], "--model", "tiny", "-o", outs / "m"])]
    check_all(cases, outs)


def test_fuzz_info(fuzz_dir, tiny_checkpoint):
    assert invoke("info", tiny_checkpoint).returncode == 0
    check_all([(n, ["info", d]) for n, d in fuzz_dir["ckpts"]], fuzz_dir["outs"])


def test_fuzz_trace(fuzz_dir, tiny_bundle, tiny_checkpoint):
    outs, ck = fuzz_dir["outs"], tiny_checkpoint
    subject = tiny_bundle.world.subjects[0].name
    fact = f"{subject}|capital"
    base = ["trace", ck, "--fact", fact, "--samples", "1", "--sites", "mlp", "-o", outs / "t"]
    cases = []
    for opt in ("--n", "--samples", "--window", "--template", "--seed"):
        for v in ("abc", "1.5", "1e400", "", "nan", "true"):
            cases.append((f"{opt} {v!r}", [*base, opt, v]))
    for opt, values in (("--n", ["0", "-3"]), ("--samples", ["0", "-1", "100000"]), ("--window", ["0", "-2", "1000"]),
                        ("--template", ["99", "-1", "4"]), ("--seed", ["-1", str(HUGE)])):
        cases += [(f"{opt} {v}", ["trace", ck, "--relation", "capital", *base[4:], opt, v]) for v in values]
    for opt in ("--noise", "--noise-scale"):
        for v in ("abc", "nan", "inf", "-inf", "1e400", "-1", ""):
            cases.append((f"{opt} {v!r}", [*base, opt, v]))
    for v in ("bogus", "", ",", "mlp,bogus", "MLP", "resid,,x"):
        cases.append((f"--sites {v!r}", [*base[:6], "--sites", v, "-o", outs / "t"]))
    for v in ("resid", "bogus", "mlp,x"):
        cases.append((f"--severed {v!r}", [*base, "--severed", v]))
    cases += [(f"--precision {v!r}", [*base, "--precision", v]) for v in BAD_PRECISION]
    for v in ("x", "a|b|c", "|", "nosuch|capital", f"{subject}|nosuch", f"{subject}|", "|capital", "ünï|cödé"):
        cases.append((f"--fact {v!r}", ["trace", ck, "--fact", v, "-o", outs / "t"]))
    cases += [("--relation nosuch", ["trace", ck, "--relation", "nosuch", "-o", outs / "t"]),
              ("fact and relation", ["trace", ck, "--fact", fact, "--relation", "capital", "-o", outs / "t"]),
              ("fact and all", ["trace", ck, "--fact", fact, "--all", "-o", outs / "t"]),
              ("nothing chosen", ["trace", ck, "-o", outs / "t"])]
    cases += [(n, [*base[:1], ck, *base[2:-2], "-o", o]) for n, o in bad_outputs(outs)]
    cases += [(n, ["trace", d, "--fact", fact, "-o", outs / "t"]) for n, d in fuzz_dir["ckpts"][:30]]
    check_all(cases, outs)


def _param_cases(method: str) -> list[tuple[str, str]]:
    """`--param key=value` strings that method `method` must refuse (parsed as JSON, as the CLI does)."""
    from mechedit.edit.api import get_method

    params = get_method(method).params
    hints = typing.get_type_hints(params, include_extras=True)
    out = []
    for f in dataclasses.fields(params):
        for v in bad_values(hints[f.name]):
            text = v if isinstance(v, str) else ("NaN" if isinstance(v, float) and math.isnan(v) else
                                                 "Infinity" if v == math.inf else "-Infinity" if v == -math.inf
                                                 else json.dumps(v))
            out.append((f"{method} {f.name}={text}", f"{f.name}={text}"))
    out += [(f"{method} unknown param", "nonsense=1"), (f"{method} no value", "steps"), (f"{method} empty key", "=3"),
            (f"{method} 1e400", "steps=1e400"), (f"{method} steps 10**9", "steps=1000000000")]
    return out


def test_fuzz_edit(fuzz_dir, tiny_bundle, tiny_checkpoint):
    outs, ck = fuzz_dir["outs"], tiny_checkpoint
    w = tiny_bundle.world
    f = w.train_facts[0]
    subject, new = w.subjects[f.subject].name, next(o for o in w.relation(f.relation).objects if o != f.object)
    base = ["edit", ck, "--fact", f"{subject}|{f.relation}", "--new", new, "-o", outs / "e"]
    cases = []
    for method in ("rome", "memit", "lora"):
        cases += [(n, [*base, "--method", method, "--param", kv]) for n, kv in _param_cases(method)]
    cases += [("method bogus", [*base, "--method", "bogus"]), ("layer 99", [*base, "--layer", "99"]),
              ("layer -1", [*base, "--layer", "-1"]), ("layer x", [*base, "--layer", "x"]),
              ("layer 1e400", [*base, "--layer", "1e400"]), ("layers 0,99", [*base, "--method", "memit", "--layer", "0,99"]),
              ("new object unknown", ["edit", ck, "--fact", f"{subject}|{f.relation}", "--new", "zzzq", "-o", outs / "e"]),
              ("fact malformed", ["edit", ck, "--fact", "x", "--new", new, "-o", outs / "e"]),
              ("fact unknown", ["edit", ck, "--fact", f"nosuch|{f.relation}", "--new", new, "-o", outs / "e"]),
              ("no fact", ["edit", ck, "-o", outs / "e"])]
    root = fuzz_dir["root"]
    for name, data in (("missing", None), ("latin1", "{\"subject\": \"caf\xe9\"}".encode("latin-1")), ("oops", b"{oops"),
                       ("list", b"[1]"), ("empty", b""), ("no keys", b"{}"), ("nan", b"{\"subject\": NaN}")):
        p = root / f"req-{name}.jsonl"
        if data is not None:
            p.write_bytes(data)
        cases.append((f"requests {name}", ["edit", ck, "--requests", p, "-o", outs / "e"]))
    cases += [(n, [*base[:-2], "-o", o]) for n, o in bad_outputs(outs)]
    cases += [(n, ["edit", d, *base[2:]]) for n, d in fuzz_dir["ckpts"][:20]]
    check_all(cases, outs)


def test_fuzz_unlearn(fuzz_dir, tiny_bundle, tiny_checkpoint):
    outs, ck = fuzz_dir["outs"], tiny_checkpoint
    subject = next(s.name for s in tiny_bundle.world.subjects if s.kind == "subject" and not s.heldout)
    base = ["unlearn", ck, "--forget", f"subject:{subject}", "-o", outs / "u"]
    cases = []
    for method in ("npo", "rmu"):
        cases += [(n, [*base, "-m", method, "-p", kv]) for n, kv in _param_cases(method)]
    for target in ("subject:nosuch", "nosuch", "fact:x", "fact:a|b|c", "relation:nosuch", "subject:", ":x", ""):
        cases.append((f"--forget {target!r}", ["unlearn", ck, "--forget", target, "-o", outs / "u"]))
    # (no -o is not bad input: -o defaults to runs/unlearn, like every command's output)
    cases += [("method bogus", [*base, "-m", "bogus"]), ("no --forget", ["unlearn", ck, "-o", outs / "u"])]
    cases += [(n, [*base[:-2], "-o", o]) for n, o in bad_outputs(outs)]
    cases += [(n, ["unlearn", d, *base[2:]]) for n, d in fuzz_dir["ckpts"][:20]]
    check_all(cases, outs)


def test_fuzz_diagnose(fuzz_dir, tiny_bundle, tiny_checkpoint):
    outs, ck = fuzz_dir["outs"], tiny_checkpoint
    subject = next(s.name for s in tiny_bundle.world.subjects if s.kind == "subject" and not s.heldout)
    base = ["diagnose", ck, ck, "--forget", f"subject:{subject}", "-s", "edit", "-s", "leftover", "-s", "relearn",
            "-o", outs / "d"]
    cases = []
    typed = {"n_unrelated": int, "n_retain": int, "seed": int, "k": float, "probe_max_train": int,
             "relearn_steps": int, "relearn_lr": float}
    for key, tp in typed.items():
        for v in bad_values(tp):
            text = v if isinstance(v, str) else ("NaN" if isinstance(v, float) and math.isnan(v) else
                                                 "Infinity" if v == math.inf else "-Infinity" if v == -math.inf
                                                 else json.dumps(v))
            cases.append((f"--option {key}={text}", [*base, "--option", f"{key}={text}"]))
    for key in ("zzz", "K", "n-unrelated", "steps", "lr", "probe", "unrelated", "relearn", "n_unrelated2", "Seed",
                "relearn-steps", "max_train", "layer"):
        cases.append((f"unknown option {key}", [*base, "--option", f"{key}=1"]))
    cases += [("option without =", [*base, "--option", "k"]), ("option 1e400", [*base, "--option", "k=1e400"]),
              ("suite nope", [*base[:5], "-s", "nope", "-o", outs / "d"]),
              ("option of an unchosen suite", [*base[:5], "-s", "forget", "--option", "k=0.1", "-o", outs / "d"]),
              ("no requests", ["diagnose", ck, ck, "-o", outs / "d"]),
              ("forget unknown", ["diagnose", ck, ck, "--forget", "subject:nosuch", "-o", outs / "d"])]
    cases += [(f"--precision {v!r}", [*base, "--precision", v]) for v in BAD_PRECISION]
    cases += [(n, [*base[:-2], "-o", o]) for n, o in bad_outputs(outs)]
    cases += [(f"before {n}", ["diagnose", d, ck, *base[3:]]) for n, d in fuzz_dir["ckpts"][:15]]
    cases += [(f"after {n}", ["diagnose", ck, d, *base[3:]]) for n, d in fuzz_dir["ckpts"][15:30]]
    check_all(cases, outs)


ANALYSIS_BAD = [
    ("name 5", {"name": 5}), ("name empty", {"name": ""}), ("unknown key", {"colour": 1}),
    ("world empty", {"world": {}}), ("world spec 5", {"world": {"spec": 5}}), ("world two keys", {"world": {"spec": "default", "dir": "x"}}),
    ("world spec missing", {"world": {"spec": "missing.toml"}}), ("world dir missing", {"world": {"dir": "nodir"}}),
    ("world list", {"world": [1]}), ("model empty", {"model": {}}), ("model preset nope", {"model": {"preset": "nope"}}),
    ("model preset 5", {"model": {"preset": 5}}), ("model checkpoint missing", {"model": {"checkpoint": "/no/such"}}),
    ("model spec missing", {"model": {"spec": "missing.toml"}}), ("model two keys", {"model": {"preset": "tiny", "spec": "x"}}),
    ("trace n 0", {"trace": {"relation": "capital", "n": 0}}), ("trace n x", {"trace": {"relation": "capital", "n": "x"}}),
    ("trace n 1.5", {"trace": {"relation": "capital", "n": 1.5}}), ("trace relation 5", {"trace": {"relation": 5}}),
    ("trace facts x", {"trace": {"facts": "x"}}), ("trace facts [5]", {"trace": {"facts": [5]}}),
    ("trace sites bogus", {"trace": {"relation": "capital", "sites": ["bogus"]}}),
    ("trace sites string", {"trace": {"relation": "capital", "sites": "mlp"}}),
    ("trace sites empty", {"trace": {"relation": "capital", "sites": []}}),
    ("trace samples 0", {"trace": {"relation": "capital", "samples": 0}}),
    ("trace samples 10**6", {"trace": {"relation": "capital", "samples": 10**6}}),
    ("trace noise nan", {"trace": {"relation": "capital", "noise": math.nan}}),
    ("trace noise -1", {"trace": {"relation": "capital", "noise": -1}}),
    ("trace noise x", {"trace": {"relation": "capital", "noise": "x"}}),
    ("trace window 0", {"trace": {"relation": "capital", "window": 0}}),
    ("trace seed -1", {"trace": {"relation": "capital", "seed": -1}}), ("trace unknown", {"trace": {"relation": "capital", "x": 1}}),
    ("trace list", {"trace": [1]}), ("requests list", {"requests": [1]}),
    ("request mode", {"requests": {"single": {"relation": "capital", "mode": "sometimes"}}}),
    ("request n 0", {"requests": {"single": {"relation": "capital", "n": 0}}}),
    ("request n abc", {"requests": {"single": {"relation": "capital", "n": "abc"}}}),
    ("request n 1e400", {"requests": {"single": {"relation": "capital", "n": math.inf}}}),
    ("request seed -1", {"requests": {"single": {"relation": "capital", "seed": -1}}}),
    ("request subjects 0", {"requests": {"single": {"subjects": 0}}}),
    ("request relation 5", {"requests": {"single": {"relation": 5}}}),
    ("request unknown", {"requests": {"single": {"relation": "capital", "colour": 1}}}),
    ("request not table", {"requests": {"single": 5}}),
    ("grid empty", {"grid": []}), ("grid string", {"grid": "x"}), ("grid [5]", {"grid": [5]}),
    ("grid no method", {"grid": [{"requests": ["single"]}]}), ("grid method bogus", {"grid": [{"method": "bogus"}]}),
    ("grid steps 0", {"grid": [{"method": "rome", "params": {"steps": 0}}]}),
    ("grid steps x", {"grid": [{"method": "rome", "params": {"steps": "x"}}]}),
    ("grid steps inf", {"grid": [{"method": "rome", "params": {"steps": math.inf}}]}),
    ("grid steps 10**9", {"grid": [{"method": "rome", "params": {"steps": 10**9}}]}),
    ("grid clamp nan", {"grid": [{"method": "rome", "params": {"clamp_factor": math.nan}}]}),
    ("grid params unknown", {"grid": [{"method": "rome", "params": {"nonsense": 1}}]}),
    ("grid params list", {"grid": [{"method": "rome", "params": [1]}]}),
    ("grid params.layer", {"grid": [{"method": "rome", "params": {"layer": 0}}]}),
    ("grid layers empty", {"grid": [{"method": "rome", "layers": []}]}),
    ("grid layers string", {"grid": [{"method": "rome", "layers": "x"}]}),
    ("grid layer 99", {"grid": [{"method": "rome", "layers": [99]}]}),
    ("grid layer -1", {"grid": [{"method": "rome", "layers": [-1]}]}),
    ("grid layer list 99", {"grid": [{"method": "memit", "layers": [[0, 99]]}]}),
    ("grid layer x", {"grid": [{"method": "rome", "layers": ["x"]}]}),
    ("grid layer traced without trace", {"trace": None, "grid": [{"method": "rome", "layers": ["traced"]}]}),
    ("grid requests unknown", {"grid": [{"method": "rome", "requests": ["nosuch"]}]}),
    ("grid requests [5]", {"grid": [{"method": "rome", "requests": [5]}]}),
    ("grid duplicate", {"grid": [{"method": "rome", "layers": [0]}, {"method": "rome", "layers": [0]}]}),
    ("grid unknown key", {"grid": [{"method": "rome", "colour": 1}]}),
    ("suites nope", {"diagnostics": {"suites": ["nope"]}}), ("suites string", {"diagnostics": {"suites": "edit"}}),
    ("forget suites nope", {"diagnostics": {"forget_suites": ["nope"]}}),
    ("options unknown", {"diagnostics": {"options": {"zzz": 1}}}),
    ("options typed", {"diagnostics": {"options": {"n_unrelated": "x"}}}),
    ("options nan", {"diagnostics": {"options": {"k": math.nan}}}),
    ("options string", {"diagnostics": {"options": "x"}}), ("diagnostics unknown", {"diagnostics": {"colour": 1}}),
    *[(f"precision {v!r}", {"precision": v}) for v in (*BAD_PRECISION, 5, 1.5, True, ["float32"], {"a": 1})],
]


def test_fuzz_run(fuzz_dir, tiny_checkpoint):
    from mechedit.analysis.runner import check_layers, resolve_model
    from mechedit.analysis.spec import load_analysis

    root, outs = fuzz_dir["root"], fuzz_dir["outs"]
    base = {"name": "fz", "world": {"spec": "default"}, "model": {"checkpoint": str(tiny_checkpoint)},
            "trace": {"relation": "capital", "n": 2, "samples": 1, "sites": ["mlp"]},
            "requests": {"single": {"relation": "capital", "n": 1}},
            "grid": [{"method": "rome", "layers": [0], "requests": ["single"], "params": {"steps": 2}}],
            "diagnostics": {"suites": ["edit"], "options": {"n_unrelated": 5}}}
    good = root / "good_analysis.json"
    good.write_text(json.dumps(base))
    spec = load_analysis(good)  # the base is valid (running it is test_analysis.py's business)
    check_layers(spec, resolve_model(spec)[-1])
    texts = [(n, json.dumps({k: v for k, v in {**base, **m}.items() if v is not None})) for n, m in ANALYSIS_BAD]
    worlds = write_specs(root, world_spec_cases(), "aw")
    models = write_specs(root, model_spec_cases(), "am")
    texts += [(f"world {n}", json.dumps({**base, "world": {"spec": p.name}, "model": {"preset": "tiny"}}))
              for n, p in worlds]
    texts += [(f"model {n}", json.dumps({**base, "model": {"spec": p.name}})) for n, p in models]
    cases = [(n, ["run", p, "-o", outs / "r"]) for n, p in write_specs(root, texts, "an")]
    cases += [(n, ["run", p, "-o", outs / "r"]) for n, p in file_cases(root)]
    cases += [(n, ["run", good, "-o", o]) for n, o in bad_outputs(outs) if o.name != "full"]
    cases += [("executor bogus", ["run", good, "--executor", "bogus", "-o", outs / "r"]),
              ("workers 0", ["run", good, "--workers", "0", "-o", outs / "r"]),
              ("workers x", ["run", good, "--workers", "x", "-o", outs / "r"]),
              *[(f"--precision {v!r}", ["run", good, "--precision", v, "-o", outs / "r"]) for v in BAD_PRECISION],
              ("folder of other content", ["run", good, "-o", outs / "full"])]
    check_all(cases, outs)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, tiny_checkpoint):
    """A finished run folder with one cheap case (the report fuzz mutates copies of it)."""
    from mechedit.analysis import run_analysis

    root = tmp_path_factory.mktemp("smallrun")
    spec = root / "a.json"
    spec.write_text(json.dumps({
        "name": "small", "model": {"checkpoint": str(tiny_checkpoint)}, "requests": {"one": {"relation": "capital", "n": 1}},
        "grid": [{"method": "finetune", "layers": [0], "params": {"steps": 1}}],
        "diagnostics": {"suites": ["edit"], "options": {"n_unrelated": 5, "n_retain": 5}}}))
    assert run_analysis(spec, root / "run", workers=1)["done"] == 1
    return root / "run"


def test_fuzz_report(fuzz_dir, small_run):
    from mechedit.analysis.folder import CASE_SCHEMA, RUN_SCHEMA

    root, outs = fuzz_dir["root"], fuzz_dir["outs"]
    assert invoke("report", small_run, "-o", root / "ok_report").returncode == 0
    spec = json.loads((small_run / "spec.json").read_text())
    (case_file,) = [p for p in small_run.glob("case_*.json") if not p.name.endswith(".timing.json")]
    case = json.loads(case_file.read_text())
    runs = []

    def variant(name, spec_json=None, case_json=None, raw_spec: bytes | None = None, raw_case: bytes | None = None):
        d = root / "runs" / f"r{len(runs)}"
        shutil.copytree(small_run, d)
        if spec_json is not None or raw_spec is not None:
            (d / "spec.json").write_bytes(raw_spec if raw_spec is not None else json.dumps(spec_json).encode())
        if case_json is not None or raw_case is not None:
            (d / case_file.name).write_bytes(raw_case if raw_case is not None else json.dumps(case_json).encode())
        runs.append((name, d))

    wrong = {str: [5, [], {}, None, True], dict: ["x", 5, [], None], int: ["x", 1.5, None, True],
             list[dict]: ["x", 5, {}, None, [5]], list[str]: ["x", 5, {}, None, [5]], dict | None: ["x", 5, []],
             int | None: ["x", 1.5, [], True], dict[str, dict]: ["x", 5, [], None, {"a": 5}],
             dict[str, float]: ["x", 5, [], None, {"a": "x"}]}
    for schema, doc, kind in ((RUN_SCHEMA, spec, "spec"), (CASE_SCHEMA, case, "case")):
        for key, tp in schema.items():
            for v in wrong[tp]:
                mutated = {**doc, key: v}
                variant(f"{kind} {key}={v!r}", **({"spec_json": mutated} if kind == "spec" else {"case_json": mutated}))
            dropped = {k: x for k, x in doc.items() if k != key}
            variant(f"{kind} without {key}", **({"spec_json": dropped} if kind == "spec" else {"case_json": dropped}))
    for raw in (b"", b"{oops", b"[]", b"null", b"\xff\xfe", b"{\"name\": NaN}"):
        variant(f"spec.json {raw!r}", raw_spec=raw)
        variant(f"case file {raw!r}", raw_case=raw)
    variant("case of another id", case_json={**case, "id": "other"})
    cases = [(n, ["report", d, "-o", outs / "rep"]) for n, d in runs]
    cases += [("run missing", ["report", root / "nope", "-o", outs / "rep"]),
              ("run is a file", ["report", outs / "a-file", "-o", outs / "rep"]),
              ("run without spec", ["report", outs / "full", "-o", outs / "rep"])]
    cases += [(n, ["report", small_run, "-o", o]) for n, o in bad_outputs(outs)]
    check_all(cases, outs)


def test_real_processes_print_one_line(tmp_path):
    """What only a real process shows: the entry point, warnings of libraries on stderr, files from disk."""
    latin = tmp_path / "w.toml"
    latin.write_bytes("seed = 1\nname = 'caf\xe9'\n".encode("latin-1"))
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    for argv, needle in ((["world", latin, "-o", tmp_path / "w"], "not UTF-8"),
                         (["train", "--model", "tiny", "--seed", str(10**20), "-o", tmp_path / "m"], "seed")):
        r = subprocess.run([sys.executable, "-m", "mechedit.cli", *map(str, argv)], capture_output=True, text=True,
                           env=env, timeout=300)
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    assert not list(tmp_path.glob(".*"))
