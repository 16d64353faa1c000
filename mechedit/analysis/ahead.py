"""Retrained references trained beside the model they are the reference of ("ahead").

An analysis whose model is not cached yet trains it first; its unlearning cases then each need the
model retrained without their forget set (`mechedit.diagnose.reference`), one more training of the
same length that used to start only when the first such case ran. Which facts a batch forget set
names does not depend on the model (`forget_requests` draws subjects from the world alone), so its
retrained reference can train from the first second, in a process of its own, while the model trains:
on two cores the two trainings take about as long together as the two one after the other on their
own core each, and the cases start with the reference already there.

The reference's rule is unchanged: the same schedule, stopped at the epoch where the model stopped.
That epoch is known only when the model stops, so the reference asks at every epoch where the model
could stop (`train_model(stop_at=...)`) and waits there, if it is ahead, until the model has gone
past that epoch or stopped at it. Its record (`retrain_record`: the model's weights hash and epochs)
is written once the model is saved. The model trains exactly as it would alone (same threads), the
reference with one thread, as in a case worker: both are bitwise what they would have been without
this (tests/test_ahead.py). The reference holds the cache's lock while it trains, so a case that
needs it waits for it instead of training it twice; if anything goes wrong it leaves nothing behind
and the case trains the reference itself, as before.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Iterator

from mechedit.unlearn.targets import ForgetTarget

NEEDS_REFERENCE = {"forget", "leftover", "forget_quality", "relearn", "all"}
POLL_S = 0.1


class Aborted(Exception):
    """The model's training failed or was interrupted: the reference ahead stops, writing nothing."""


def targets_ahead(spec, world) -> list[tuple[str, ForgetTarget]]:
    """(request set, forget target) of each batch forget set an unlearning case of `spec` diagnoses
    against a retrained reference, in the order of the cases; [] for a two-stage model (its reference
    retrains both stages: `retrain_finetuned`)."""
    from mechedit.analysis.requests import forget_requests

    if not NEEDS_REFERENCE & set(spec.forget_suites) or spec.model.get("finetune_facts"):
        return []
    out, seen = [], set()
    for case in spec.cases:
        rset = spec.request_sets[case.requests]
        if case.requests in seen or rset.kind != "forget" or rset.mode != "batch" or rset.knowledge == "finetuned":
            continue
        seen.add(case.requests)
        out.append((case.requests, ForgetTarget.from_requests(world, forget_requests(world, rset))))
    return out


class Ahead:
    """The references in training beside the model, and the model's side of their protocol."""

    def __init__(self, procs, epoch, final, saved, started):
        self.procs, self._epoch, self._final, self._saved, self._started = procs, epoch, final, saved, started

    def on_epoch(self, epoch: int, stopping: bool) -> None:
        """The model's `train_model(on_epoch=...)`: it finished `epoch` (and stops there)."""
        if stopping:
            self._final.value = epoch
        self._epoch.value = epoch

    def saved(self, epochs: int) -> None:
        """The model's checkpoint is written (it trained `epochs` epochs). Returns once every reference
        holds its cache lock (or has ended), so a case that needs one finds it in training, whatever
        the order in which the processes started (a tiny model trains before a child has imported torch)."""
        if self._final.value == 0:  # a training resumed after its last epoch tells no epoch
            self._final.value = epochs
        self._saved.value = 1
        _wait(lambda: self._started.value >= len(self.procs) or not any(p.is_alive() for p in self.procs))

    def close(self, ok: bool = True) -> None:
        """Wait for the references (or, after a failure, stop them: they write nothing)."""
        if not ok:
            self._final.value = -1
            self._saved.value = -1
        for p in self.procs:
            p.join(None if ok else 10)
            if p.is_alive():
                p.terminate()
                p.join()


def start_ahead(spec, world, mspec, tspec, checkpoint: Path, say=None) -> Ahead | None:
    """Start a reference ahead for the first batch forget sets of `spec` (one per core beyond the
    model's own), on the CPU only; None when there is nothing to train ahead."""
    from mechedit.device import current_device
    from mechedit.diagnose.reference import retrained_path

    cores = os.cpu_count() or 1
    if current_device().type != "cpu" or cores < 2:
        return None
    todo = []
    for name, target in targets_ahead(spec, world):
        if not (retrained_path(checkpoint, target) / "mechedit.json").is_file():
            todo.append((name, target))
    todo = todo[: cores - 1]
    if not todo:
        return None
    ctx = mp.get_context("spawn")
    epoch, final, saved, started = (ctx.Value("i", 0) for _ in range(4))
    procs = []
    for name, target in todo:
        p = ctx.Process(target=_train_reference, daemon=True,
                        args=(os.getpid(), world, mspec, tspec, str(checkpoint), sorted(target.forget_ids),
                              epoch, final, saved, started))
        p.start()
        procs.append(p)
        if say:
            say(f"training the retrained reference of '{name}' ({len(target.forget)} facts left out) beside the model")
    return Ahead(procs, epoch, final, saved, started)


def _wait(cond) -> None:
    while not cond():
        time.sleep(POLL_S)


def _train_reference(parent: int, world, mspec, tspec, checkpoint: str, forget_ids: list[int], epoch, final,
                     saved, started) -> None:
    """The child: train the reference of `checkpoint` without `forget_ids`, in lockstep (see module doc)."""
    import torch
    from threadpoolctl import threadpool_limits

    from mechedit.analysis.executors import die_with_parent

    die_with_parent(parent)  # a killed command leaves no reference waiting for a model that never comes
    for key in ("MECHEDIT_CRASH_AT", "MECHEDIT_CRASH_LOG"):  # fault injection kills the command and its case
        os.environ.pop(key, None)  # workers; this child dies with the command (and if it dies alone, a case trains it)

    from mechedit.diagnose.reference import _lock, retrain_record, retrained_path
    from mechedit.model.checkpoint import load_checkpoint
    from mechedit.model.pipeline import train_checkpoint

    torch.set_num_threads(1)  # as a case worker trains it (mechedit.analysis.cases.run_case)
    threadpool_limits(limits=1)
    target = ForgetTarget._make(world, set(forget_ids))
    out = retrained_path(checkpoint, target)

    def stop_at(e: int) -> bool:
        _wait(lambda: final.value != 0 or epoch.value > e)
        if final.value < 0 or 0 < final.value < e:
            raise Aborted
        return final.value == e

    def record() -> dict:
        _wait(lambda: saved.value != 0)
        if saved.value < 0:
            raise Aborted
        want = retrain_record(load_checkpoint(checkpoint), target)
        if want["stop_epoch"] != final.value:
            raise Aborted
        return {"retrain": want}

    try:
        # another process holding the lock trains this reference already (a second `mechedit run`):
        # this child leaves it to that one, and the case that needs it waits on the lock as usual
        with _lock(out.parent / f".{out.name}.lock", wait=False) as held:
            with started.get_lock():
                started.value += 1
            if not held or (out / "mechedit.json").is_file():
                return
            train_checkpoint(world, mspec, tspec, out, force=True, exclude_facts=target.forget_ids,
                             stop_at=stop_at, meta_extra=record)
    except Aborted:
        pass


@contextlib.contextmanager
def references_ahead() -> Iterator[list]:
    """A list for `resolve_checkpoint(aheads=...)`; at the end its references are waited for, or
    stopped if the block raised."""
    aheads: list[Ahead] = []
    try:
        yield aheads
    except BaseException:
        for a in aheads:
            a.close(ok=False)
        raise
    for a in aheads:
        a.close()
