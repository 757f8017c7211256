"""Connect to the Ray cluster named by RAY_ADDRESS, or start a local one with this machine's CPUs; shared by the
jobs that fan out over Ray (explain's actors, SpRAy's and the prototypes' class tasks, `run_per_class`)."""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")
TASK_CPUS = 0.5  # Ray's accounting: fractional, so that class tasks never starve other Ray work on small machines


def start_ray():
    """(ray, started): the ray module, initialised, and whether this call started it (then the caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return ray, False
    address = os.environ.get("RAY_ADDRESS")
    if not address:  # a local cluster: Ray's default token authentication stays on, without its banner
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(address=address or None, num_cpus=None if address else os.cpu_count(), include_dashboard=False,
             configure_logging=False, log_to_driver=False)
    return ray, True


def threads_and_window(cpus: int, jobs: int) -> tuple[int, int]:
    """BLAS/OpenMP threads per task and tasks in flight: the cluster's CPUs shared, never oversubscribed."""
    threads = max(1, cpus // max(1, min(jobs, cpus)))
    return threads, max(1, cpus // threads)


def run_per_class(fn: Callable[..., T], classes: Iterable[int], arguments: Callable[[int], tuple[Any, ...]],
                  error: Callable[[str], Exception], desc: str, progress: bool) -> dict[int, T]:
    """fn(*arguments(cls), threads) for each class as a Ray task (retried once), at most as many in flight as the
    CPUs allow, each task's arguments built only when it starts; a progress bar of `desc`. Results by class, in
    class order; a task that raised is `error("class C: <its error>")`."""
    from tqdm import tqdm

    ray, started = start_ray()
    try:
        pending = list(classes)
        cpus = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
        threads, window = threads_and_window(cpus, len(pending))
        task = ray.remote(num_cpus=TASK_CPUS, max_retries=1)(fn)
        running: dict = {}
        results: dict[int, T] = {}
        bar = tqdm(total=len(pending), desc=desc, unit="class", disable=not progress, file=sys.stderr)
        while pending or running:
            while pending and len(running) < window:
                cls = pending.pop(0)
                running[task.remote(*arguments(cls), threads)] = cls
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                cls = running.pop(ref)
                try:
                    results[cls] = ray.get(ref)
                except ray.exceptions.RayTaskError as failure:  # the task itself raised: name the class
                    cause = failure.cause if getattr(failure, "cause", None) else failure
                    raise error(f"class {cls}: {type(cause).__name__}: {str(cause).splitlines()[0]}") from None
                bar.update(1)
        bar.close()
        return {cls: results[cls] for cls in sorted(results)}
    finally:
        if started:
            ray.shutdown()
