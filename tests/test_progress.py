"""Progress of long steps (mechedit.progress): what a log shows, the heartbeat, worker progress."""
from __future__ import annotations

import io
import multiprocessing as mp
import re
import time

from mechedit import progress

STAMP = re.compile(r"^\[\d\d:\d\d:\d\d +[\d a-z]+s\] ")


def _wait_for(predicate, seconds: float = 20.0) -> bool:
    """Poll for a state (not a timing): true as soon as `predicate()` is."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_library_calls_do_nothing_without_a_sink():
    assert not progress.active()
    with progress.step("nothing listens"):
        progress.status("x")
        progress.note("y")


def test_plain_lines_steps_notes_and_throttled_status():
    buf = io.StringIO()
    with progress.Reporter(buf, rich=False, every=3600, heartbeat=3600) as rep, progress.activate(rep):
        with progress.step("training"):
            progress.status("batch 1")  # something was printed just now: a status waits
            progress.note("epoch 5: recall 0.5")
            with progress.step("inner", quiet=True):
                progress.status("batch 2")
    lines = buf.getvalue().splitlines()
    assert all(STAMP.match(line) for line in lines), lines
    bodies = [STAMP.sub("", line) for line in lines]
    assert bodies[0] == "training ..."
    assert bodies[1] == "training > epoch 5: recall 0.5"
    assert re.fullmatch(r"training: done in \d+ s", bodies[2])
    assert len(bodies) == 3  # statuses throttled, the quiet step silent


def test_status_prints_after_silence():
    buf = io.StringIO()
    with progress.Reporter(buf, rich=False, every=0.0, heartbeat=3600) as rep, progress.activate(rep):
        with progress.step("tracing"):
            progress.status("rows 10/20")
    assert "tracing > rows 10/20" in buf.getvalue()


def test_heartbeat_names_the_steps_in_progress():
    buf = io.StringIO()
    with progress.Reporter(buf, rich=False, every=3600, heartbeat=0.2) as rep, progress.activate(rep):
        with progress.step("diagnose"), progress.step("suite leftover", quiet=True):
            progress.status("probes")
            assert _wait_for(lambda: "still running" in buf.getvalue())
    beat = next(line for line in buf.getvalue().splitlines() if "still running" in line)
    assert "diagnose > suite leftover: probes (" in beat and "in all)" in beat


def test_no_heartbeat_without_a_step():
    buf = io.StringIO()
    with progress.Reporter(buf, rich=False, every=3600, heartbeat=0.05):
        time.sleep(0.5)
    assert buf.getvalue() == ""


def _worker(queue) -> None:
    with progress.activate(progress.ChannelSink(queue, "case-7")):
        with progress.step("rome at layer 0"):
            progress.note("request 1/2")


def test_worker_progress_comes_back_tagged_with_its_case():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_worker, args=(queue,))
    p.start()
    p.join(60)
    buf = io.StringIO()
    with progress.Reporter(buf, rich=False, every=3600, heartbeat=3600) as rep, progress.activate(rep):
        for _ in range(3):
            progress.forward(queue.get(timeout=30))
    bodies = [STAMP.sub("", line) for line in buf.getvalue().splitlines()]
    assert bodies[:2] == ["case case-7 > rome at layer 0 ...", "case case-7 > rome at layer 0 > request 1/2"]


def test_terminal_mode_prints_lines_and_leaves_no_spinner_behind():
    buf = io.StringIO()
    with progress.Reporter(buf, rich=True, every=3600, heartbeat=3600) as rep, progress.activate(rep):
        with progress.step("training"):
            progress.status("epoch 1")
            progress.note("epoch 5: recall 0.5")
        assert rep._live is None  # no step left: the spinner is gone before results are printed
    out = buf.getvalue()
    assert "training ..." in out and "epoch 5: recall 0.5" in out


def test_a_failing_step_prints_no_done_line():
    buf = io.StringIO()
    with progress.Reporter(buf, rich=False, every=3600, heartbeat=3600) as rep, progress.activate(rep):
        try:
            with progress.step("tracing"):
                raise ValueError("bad window")
        except ValueError:
            pass
        with progress.step("after"):
            pass
    bodies = [STAMP.sub("", line) for line in buf.getvalue().splitlines()]
    assert bodies[:1] == ["after ..."] and not any("tracing" in b for b in bodies)  # failed at once: only its error


def test_a_step_start_is_printed_after_the_delay():
    buf = io.StringIO()
    with progress.Reporter(buf, rich=False, every=3600, heartbeat=3600, delay=0.1) as rep, progress.activate(rep):
        with progress.step("training"):
            assert _wait_for(lambda: "training ..." in buf.getvalue())
