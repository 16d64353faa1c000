"""The CLI as a user runs it: outputs, refusals to overwrite, one-line errors with exit code 2.

In-process (tests/clitools.py); tests/test_fuzz.py keeps the few checks that need a real process.
"""
from __future__ import annotations

import json

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
