"""Output folders: atomic commit, cleanup on errors, stale partials of dead writers, adoption, modes."""
from __future__ import annotations

import os
import subprocess

import pytest

from mechedit.errors import MecheditError
from mechedit.fileio import check_output_dir, output_dir, prepare_output_dir, read_json, read_text


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_error_inside_leaves_nothing_and_success_commits(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError):
        with output_dir(out) as tmp:
            (tmp / "half.txt").write_text("x")
            raise ValueError("boom")
    assert not out.exists() and os.listdir(tmp_path) == []
    with output_dir(out) as tmp:
        (tmp / "whole.txt").write_text("x")
    assert os.listdir(out) == ["whole.txt"] and os.listdir(tmp_path) == ["out"]
    with pytest.raises(MecheditError, match="--force"):
        with output_dir(out):
            pass
    with output_dir(out, force=True) as tmp:
        (tmp / "new.txt").write_text("y")
    assert os.listdir(out) == ["new.txt"] and os.listdir(tmp_path) == ["out"]


def test_stale_partials_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    dead, live = tmp_path / f".out.partial.{dead_pid()}.abc", tmp_path / f".out.partial.{os.getppid()}.def"
    other = tmp_path / f".other.partial.{dead_pid()}.ghi"
    for d in (dead, live, other):
        d.mkdir()
    with output_dir(tmp_path / "out"):
        pass
    assert not dead.exists() and live.exists() and other.exists()  # only the same output's, only the dead's


def test_a_dead_writers_partial_can_be_adopted(tmp_path):
    stale = tmp_path / f".out.partial.{dead_pid()}.abc"
    stale.mkdir()
    (stale / "state").write_text("epoch 5")
    tmp = prepare_output_dir(tmp_path / "out", adopt=lambda p: (p / "state").is_file())
    assert (tmp / "state").read_text() == "epoch 5" and f".{os.getpid()}." in tmp.name and not stale.exists()


def test_interrupt_keeps_a_resumable_partial_only_when_asked(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with output_dir(tmp_path / "a", keep_on=(KeyboardInterrupt,)):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        with output_dir(tmp_path / "b"):
            raise KeyboardInterrupt
    assert [p.name.split(".partial.")[0] for p in tmp_path.iterdir()] == [".a"]


def test_a_commit_killed_between_its_renames_is_repaired(tmp_path):
    out = tmp_path / "out"
    with output_dir(out) as tmp:
        (tmp / "v1").write_text("1")
    os.replace(out, tmp_path / ".out.old")  # the kill came after the first rename
    with pytest.raises(MecheditError, match="--force"):  # the previous output is back, and protected
        prepare_output_dir(out)
    assert (out / "v1").is_file() and not (tmp_path / ".out.old").exists()


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("x"), "not a directory"),
    (lambda p: None, "not a directory"),
])
def test_output_paths_are_checked_before_work(tmp_path, make, message):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(MecheditError, match=message):
        check_output_dir(blocker / "deeper" / "out")
    make(tmp_path / "file")
    if (tmp_path / "file").exists():
        with pytest.raises(MecheditError, match="not a directory"):
            check_output_dir(tmp_path / "file")
    with pytest.raises(MecheditError, match="not writable"):
        check_output_dir("/proc/mechedit-out")


def test_reads_are_utf8_with_one_line_errors(tmp_path):
    (tmp_path / "l1.json").write_bytes('{"a": "caf\xe9"}'.encode("latin-1"))
    (tmp_path / "nan.json").write_text('{"a": NaN}')
    for name, message in (("l1.json", "not UTF-8"), ("nan.json", "NaN is not a JSON number"), ("none.json", "not found")):
        with pytest.raises(MecheditError, match=message) as exc:
            read_json(tmp_path / name, "thing")
        assert "\n" not in str(exc.value)
    with pytest.raises(MecheditError, match="not a file"):
        read_text(tmp_path, "thing")
