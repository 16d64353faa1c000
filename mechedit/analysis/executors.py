"""Executors that run analysis cases: local (a process pool sized to the cores) and Ray.

Both yield (case, outcome) as cases finish, so the runner writes each case file as soon as it exists;
killing the run loses only the cases in flight.
"""
from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Iterator

from mechedit.analysis.cases import run_case
from mechedit.errors import MecheditError

EXECUTORS = ("local", "ray")


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def run_local(cases: list[dict], ctx: dict, workers: int | None = None) -> Iterator[tuple[dict, dict]]:
    workers = max(1, workers or os.cpu_count() or 1)
    if workers == 1 or len(cases) <= 1:
        for c in cases:
            yield c, run_case(c, ctx)
        return
    with ProcessPoolExecutor(max_workers=min(workers, len(cases)), mp_context=mp.get_context("spawn"),
                             initializer=_init_worker) as pool:
        pending = {pool.submit(run_case, c, ctx): c for c in cases}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                c = pending.pop(fut)
                yield c, fut.result()


def run_ray(cases: list[dict], ctx: dict, workers: int | None = None, address: str | None = None
            ) -> Iterator[tuple[dict, dict]]:
    try:
        import ray
    except ImportError:
        raise MecheditError("the ray executor needs Ray: pip install 'mechedit[ray]'") from None
    started = False
    if not ray.is_initialized():
        kwargs = {"address": address} if address else {"num_cpus": workers or os.cpu_count() or 1}
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **kwargs)
        started = True
    try:
        remote = ray.remote(num_cpus=1)(run_case)
        futures = {remote.remote(c, ctx): c for c in cases}
        while futures:
            done, _ = ray.wait(list(futures), num_returns=1)
            for ref in done:
                c = futures.pop(ref)
                yield c, ray.get(ref)
    finally:
        if started:
            ray.shutdown()


def executor(name: str):
    if name == "local":
        return run_local
    if name == "ray":
        return run_ray
    raise MecheditError(f"unknown executor {name!r} (known: {', '.join(EXECUTORS)})")
