"""The CLI as a user runs it: outputs, refusals to overwrite, one-line errors with exit code 2.

In-process (tests/clitools.py); tests/test_fuzz.py keeps the few checks that need a real process.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from clitools import invoke as run


def test_world_command_writes_and_refuses_to_overwrite(tmp_path):
    spec = tmp_path / "w.toml"
    spec.write_text('seed = 1\nn_subjects = 10\n[[relations]]\nname = "capital"\nn_objects = 4\n')
    out = tmp_path / "world"
    r = run("world", spec, "-o", out)
    assert r.returncode == 0, r.stderr
    first = (out / "world.json").read_bytes()
    r = run("world", spec, "-o", out)
    assert r.returncode == 2 and "--force" in r.stderr and "Traceback" not in r.stderr
    assert (out / "world.json").read_bytes() == first
    assert run("world", spec, "-o", out, "--force").returncode == 0
    assert (out / "world.json").read_bytes() == first


@pytest.mark.parametrize("content, needle", [
    ('seed = 1\nrelations = []\n', "at least one relation"),
    ('seed = 1\ncolour = 3\n[[relations]]\nname = "a"\n', "unknown key 'colour'"),
    ('seed = 1\n[[relations]]\nname = "a"\n[[relations]]\nname = "b"\n[[correlated]]\nsource = "a"\ntarget = "b"\np = 2.0\n',
     "p must be in"),
    ('seed = 1\nn_subjects = 200000\nsyllables = [1, 1]\n[[relations]]\nname = "a"\n', "name generator"),
    ('seed = [oops\n', "malformed spec"),
])
def test_bad_world_specs_exit_2_with_one_line(tmp_path, content, needle):
    spec = tmp_path / "bad.toml"
    spec.write_text(content)
    r = run("world", spec, "-o", tmp_path / "out")
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_info_and_bad_checkpoints(tmp_path, tiny_checkpoint):
    r = run("info", tiny_checkpoint)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["final_recall"]["trained"]["by_kind"]["cloze"] >= 0.99
    r = run("info", tmp_path / "missing")
    assert r.returncode == 2 and "checkpoint not found" in r.stderr and "Traceback" not in r.stderr


def test_train_refuses_existing_output_and_keeps_it(tmp_path, tiny_checkpoint):
    before = (tiny_checkpoint / "model.safetensors").read_bytes()
    r = run("train", tiny_checkpoint, "-m", "tiny", "-o", tiny_checkpoint)
    assert r.returncode == 2 and "--force" in r.stderr
    assert (tiny_checkpoint / "model.safetensors").read_bytes() == before
    r = run("train", tmp_path / "no-such-world.toml", "-o", tmp_path / "m")
    assert r.returncode == 2 and "not found" in r.stderr


def test_train_command_end_to_end(tmp_path):
    spec = tmp_path / "w.toml"
    spec.write_text('seed = 2\nn_subjects = 8\nheldout_subject_fraction = 0.0\n[[relations]]\nname = "capital"\nn_objects = 3\n')
    r = run("train", spec, "-m", "tiny", "--max-epochs", "2", "-o", tmp_path / "m")
    assert r.returncode == 0, r.stderr
    assert "checkpoint written" in r.stdout
    import mechedit

    b = mechedit.load(tmp_path / "m")
    assert b.meta["epochs"] == 2 and b.world.spec.n_subjects == 8


def test_world_then_train_gives_the_model_run_trains(tmp_path):
    """`mechedit world -o W` + `mechedit train W` and `mechedit run` (same world and model specs) train
    bit-identical weights with the same tokenizer."""
    from mechedit.world import tiny_world_spec

    (tmp_path / "w.json").write_text(json.dumps(tiny_world_spec(5).to_dict()))
    (tmp_path / "m.json").write_text(json.dumps({"preset": "tiny", "train": {"max_epochs": 3, "eval_every": 3}}))
    assert run("world", tmp_path / "w.json", "-o", tmp_path / "W").returncode == 0
    r = run("train", tmp_path / "W", "-m", tmp_path / "m.json", "-o", tmp_path / "M")
    assert r.returncode == 0, r.stderr
    (tmp_path / "a.json").write_text(json.dumps({
        "name": "same", "world": {"spec": "w.json"}, "model": {"spec": "m.json"},
        "requests": {"one": {"n": 1}}, "grid": [{"method": "finetune", "layers": [0], "params": {"steps": 1}}],
        "diagnostics": {"options": {"n_unrelated": 5, "n_retain": 5}}}))
    r = run("run", tmp_path / "a.json", "-o", tmp_path / "R", env={"MECHEDIT_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    cached = Path(json.loads((tmp_path / "R" / "spec.json").read_text())["checkpoint"])
    assert cached.parent == (tmp_path / "cache" / "models").resolve()
    assert (tmp_path / "M" / "model.safetensors").read_bytes() == (cached / "model.safetensors").read_bytes()
    for tok in (tmp_path / "M", cached):
        assert (tok / "tokenizer.json").read_bytes() == (tmp_path / "W" / "tokenizer.json").read_bytes()
    # a cached model of another world for the same spec (another mechedit version) is not reused
    from mechedit.analysis.runner import resolve_checkpoint
    from mechedit.analysis.spec import load_analysis

    world = json.loads((cached / "world.json").read_text())
    world["facts"][0]["object"] = world["facts"][1]["object"] if world["facts"][1]["object"] != world["facts"][0]["object"] \
        else world["facts"][2]["object"]
    (cached / "world.json").write_text(json.dumps(world))
    said = []
    assert resolve_checkpoint(load_analysis(tmp_path / "a.json"), tmp_path / "cache", said.append) == cached
    assert any("another world" in m for m in said)
    assert (tmp_path / "M" / "world.json").read_bytes() == (cached / "world.json").read_bytes()
    assert (tmp_path / "M" / "model.safetensors").read_bytes() == (cached / "model.safetensors").read_bytes()


def test_outputs_get_the_users_umask(tmp_path):
    """Files 0666 and folders 0777 minus the umask (tempfile alone would give 0600 and 0700)."""
    import os

    old = os.umask(0o027)
    try:
        assert run("world", "-o", tmp_path / "w").returncode == 0
    finally:
        os.umask(old)
    assert (tmp_path / "w").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "w" / "world.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "w" / "tokenizer.json").stat().st_mode & 0o777 == 0o640
