"""Executors that run analysis cases: local (a process pool sized to the cores) and Ray.

Both yield (case, outcome) as cases finish, so the runner writes each case file as soon as it exists;
killing the run loses only the cases in flight. On CUDA (`ctx["device"]`) the local executor runs
one case per visible GPU, each worker on its own (`cuda` alone: every GPU torch sees; `cuda:N`: that
one), and Ray asks for one GPU per case. Pool workers die with the command that started them:
on Linux the kernel sends them SIGKILL when it exits (`PR_SET_PDEATHSIG`), and a watch thread in
each worker exits it when its parent is gone (other systems, or a parent that died before the
worker had set the signal). A local Ray started here is shut down when the run ends or fails.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Iterator

from mechedit.analysis.cases import run_case
from mechedit.errors import MecheditError

EXECUTORS = ("local", "ray")
PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Make this process exit when `parent` does: PR_SET_PDEATHSIG on Linux, plus a watch thread."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="mechedit-parent-watch", daemon=True).start()


def _init_worker(parent: int, devices, default: str) -> None:
    import torch

    from mechedit.device import use_device

    die_with_parent(parent)
    os.environ["MECHEDIT_CRASH_PID"] = str(parent)  # a fault-injection kill "during a case" hits the command
    torch.set_num_threads(1)
    use_device(devices.get() if devices is not None else default)  # each worker takes its own GPU


def worker_devices(device: str, asked: str | None = None) -> list[str] | None:
    """The device of each local worker: one per visible GPU for `cuda`, the one GPU for `cuda:N`,
    None on the CPU (as many workers as asked, all on the CPU)."""
    from mechedit.device import visible_gpus

    if not device.startswith("cuda"):
        return None
    if (asked or device) in ("cuda", "auto"):
        return [f"cuda:{i}" for i in range(visible_gpus())] or [device]
    return [device]


def run_local(cases: list[dict], ctx: dict, workers: int | None = None) -> Iterator[tuple[dict, dict]]:
    device = ctx.get("device", "cpu")
    gpus = worker_devices(device, ctx.get("device_asked"))
    workers = len(gpus) if gpus else max(1, workers or os.cpu_count() or 1)
    if workers == 1 or len(cases) <= 1:
        for c in cases:
            yield c, run_case(c, ctx)
        return
    spawn = mp.get_context("spawn")
    queue = None
    if gpus:
        queue = spawn.Queue()
        for g in gpus:
            queue.put(g)
    pool = ProcessPoolExecutor(max_workers=min(workers, len(cases)), mp_context=spawn,
                               initializer=_init_worker, initargs=(os.getpid(), queue, device))
    try:
        pending = {pool.submit(run_case, c, ctx): c for c in cases}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                c = pending.pop(fut)
                yield c, fut.result()
    finally:  # an error (or Ctrl-C) in one case: cancel the queued ones instead of running them all
        pool.shutdown(wait=True, cancel_futures=True)


def run_ray(cases: list[dict], ctx: dict, workers: int | None = None, address: str | None = None
            ) -> Iterator[tuple[dict, dict]]:
    try:
        import ray
    except ImportError:
        raise MecheditError("the ray executor needs Ray: pip install 'mechedit[ray]'") from None
    started = False
    if not ray.is_initialized():
        kwargs = {"address": address} if address else {"num_cpus": workers or os.cpu_count() or 1}
        try:
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise MecheditError(f"cannot start or reach Ray ({address or 'local'}): "
                                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        started = True
    try:
        gpu = ctx.get("device", "cpu").startswith("cuda")
        remote = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0)(_ray_case)
        # Ray shows each task only its own GPU (CUDA_VISIBLE_DEVICES), which torch calls cuda:0
        futures = {remote.remote(c, ctx, "cuda" if gpu else "cpu"): c for c in cases}
        while futures:
            done, _ = ray.wait(list(futures), num_returns=1)
            for ref in done:
                c = futures.pop(ref)
                yield c, ray.get(ref)
    finally:
        if started:
            ray.shutdown()


def _ray_case(case: dict, ctx: dict, device: str) -> dict:
    from mechedit.device import use_device

    use_device(device)
    return run_case(case, ctx)


def executor(name: str):
    if name == "local":
        return run_local
    if name == "ray":
        return run_ray
    raise MecheditError(f"unknown executor {name!r} (known: {', '.join(EXECUTORS)})")
