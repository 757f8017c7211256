"""Running the unfinished shards: start (or join) Ray, plan the actors, feed the shards to them through the
fault-tolerant scheduler (pipeline/scheduler.py) with a progress bar, and sum up what this invocation did."""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .config import RunConfig
from .contracts import ProbeImages, ShardResult, WorkerSettings
from .datasets.records import ImageRecord
from .errors import RunError, StrictStop
from .layout import RunLayout
from .precision_probe import PrecisionProbe
from .ray_session import start_ray
from .scheduler import SchedulingError, ShardScheduler
from .worker import ShardExplainer
from .writers import write_failed_shard


@dataclass(frozen=True)
class ActorPlan:
    """How many shard actors, with which Ray resources, on which device, with how many torch threads each."""

    count: int
    resources: dict[str, float]
    device: str
    threads: int


@dataclass
class InvocationWork:
    """What this invocation's shard runs did, as the manifest records it (empty when every shard was done)."""

    images: int = 0
    seconds: float = 0.0
    actor_peak_rss_mb: float = 0.0
    retries: dict[str, Any] = field(default_factory=lambda: {"total": 0})
    workers: dict[int, Any] = field(default_factory=dict)  # shard -> the node / host / process that explained it
    # seconds per phase of this invocation (bench/first_run.py reads them): before_ray_s (checks, dataset, artifact),
    # artifact_s (its build or cache load), ray_start_s, explain_s (the shards), probe_s (the precision probe's float64
    # work, in another process beside the others), probe_wait_s (what the run waited for it after the shards)
    phases: dict[str, float] = field(default_factory=dict)
    probe_peak_rss_mb: float | None = None  # the precision probe's process (pipeline/precision_probe.py)

    def timings(self) -> dict[str, Any]:
        if not self.images:  # every shard was done already
            return {}
        return {"images_this_invocation": self.images, "explain_seconds": self.seconds,
                "images_per_second": self.images / self.seconds if self.seconds else None,
                "actor_peak_rss_mb": self.actor_peak_rss_mb, **({"phases": self.phases} if self.phases else {}),
                **({"probe_peak_rss_mb": self.probe_peak_rss_mb} if self.probe_peak_rss_mb is not None else {})}


def check_device(config: RunConfig) -> None:
    """`device: cuda` never runs silently on the CPU: without RAY_ADDRESS (a local Ray) this machine must have
    CUDA, checked before any work; on a cluster `plan_actors` checks the cluster's GPUs once connected."""
    if config.device == "cuda" and not os.environ.get("RAY_ADDRESS") and not torch.cuda.is_available():
        raise RunError("device cuda: CUDA is not available on this machine (torch.cuda.is_available() is False: "
                       "no GPU or driver visible, or a CPU-only torch); use --device cpu or auto")


def plan_actors(ray, config: RunConfig) -> ActorPlan:
    """One actor per GPU (pinned), else CPU actors holding half a CPU each: an actor holding whole CPUs starves
    Ray's other tasks on small machines. `device: cuda` on a cluster without GPUs is a RunError."""
    gpus = int(ray.cluster_resources().get("GPU", 0)) if config.device != "cpu" else 0
    if config.device == "cuda" and not gpus:
        raise RunError("device cuda: the Ray cluster has no GPU (ray.cluster_resources() lists none); "
                       "use --device cpu or auto")
    count = config.actors if config.actors != "auto" else (gpus or 1)
    if gpus:
        return ActorPlan(count, {"num_gpus": 1, "num_cpus": 1}, "cuda", 1)
    cpus = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    return ActorPlan(count, {"num_cpus": 0.5}, "cpu", max(1, cpus // count))


def stop_if_needed(result: ShardResult, strict: bool) -> None:
    """A shard's result that ends the run: a write error (disk full, ...), or under --strict a failed image."""
    if result.write_error:
        raise RunError(f"{result.write_error} (the run stopped; make room and run the same command again "
                       "to resume)")
    stopped = result.stopped_at
    if strict and (stopped or result.failed):
        where = f"image {stopped['image_id']} ({stopped['path']})" if stopped else f"shard {result.shard}"
        raise StrictStop(f"--strict: {where} could not be explained: {result.reasons[0]}")


class Progress:
    """The progress bar and the counts it shows, fed by the scheduler's callbacks."""

    def __init__(self, bar: tqdm, strict: bool) -> None:
        self.bar, self.strict = bar, strict
        self.probe_images: ProbeImages | None = None  # shard 0's, for the precision probe
        self.failed = self.retries = 0
        self.peak_rss_mb = 0.0
        self.workers: dict[int, Any] = {}

    def result(self, result: ShardResult) -> None:
        stop_if_needed(result, self.strict)
        self.failed += result.failed
        self.peak_rss_mb = max(self.peak_rss_mb, result.peak_rss_mb)
        self.workers[result.shard] = result.worker
        if result.shard == 0:
            self.probe_images = result.probe_images
        self.bar.update(result.explained + result.failed)
        self.bar.set_postfix(failed=self.failed, retries=self.retries)

    def retry(self) -> None:
        self.retries += 1
        self.bar.set_postfix(failed=self.failed, retries=self.retries)


def run_shards(config: RunConfig, artifact: Path, settings: WorkerSettings, shards: list[list[ImageRecord]],
               todo: list[int], progress: bool, probe: PrecisionProbe | None = None) -> InvocationWork:
    """Explain the shards in `todo` on Ray actors; raises RunError when the run cannot go on. `probe`: the run's
    precision probe (pipeline/precision_probe.py), which writes its record once the shards are done."""
    out = Path(config.out)
    starting = time.time()
    ray, started_ray = start_ray()
    ray_start_seconds = time.time() - starting
    try:
        plan = plan_actors(ray, config)
        settings = dataclasses.replace(settings, device=plan.device, threads=plan.threads)
        if plan.device == "cpu" and config.precision == "tf32":
            print("note: precision tf32 has no effect on the CPU (float32 is used); recorded as asked",
                  file=sys.stderr, flush=True)
        # no Ray restarts or retries: the scheduler sees every death and replaces the actor itself; SPREAD puts
        # the actors on different nodes of a cluster where it can
        remote = ray.remote(ShardExplainer).options(max_restarts=0, max_task_retries=0, scheduling_strategy="SPREAD",
                                                    **plan.resources)
        total = sum(len(s) for s in shards)
        images = sum(len(shards[i]) for i in todo)
        timeout = config.shard_timeout_s or 120.0 + 10.0 * config.shard_size
        begun = time.time()
        with tqdm(total=total, initial=total - images, unit="img", disable=not progress, desc="explain",
                  dynamic_ncols=True) as bar:
            tracker = Progress(bar, settings.strict)
            scheduler = ShardScheduler(
                ray=ray, make_actor=lambda: remote.remote(str(artifact.resolve()), settings),
                count=min(plan.count, len(todo)), shards=shards, out=str(out.resolve()), timeout_s=timeout,
                retries=config.shard_retries, on_result=tracker.result, on_retry=tracker.retry,
                write_failed=lambda index, reason: write_failed_shard(out, index, shards[index], reason, settings))
            try:
                counts = scheduler.run(todo)
            except SchedulingError as error:
                raise RunError(str(error)) from None
        RunLayout(out).sweep_temporary()  # files dead actors had begun
        waiting = time.time()
        phases = {"ray_start_s": ray_start_seconds, "explain_s": waiting - begun}
        if probe is not None:  # its float64 pass ran in another process beside the start and the shards
            probe.write(tracker.probe_images, RunLayout(out).precision)
            phases.update(probe_s=probe.seconds, probe_wait_s=time.time() - waiting)
        seconds = time.time() - begun
        return InvocationWork(images=images, seconds=seconds, actor_peak_rss_mb=tracker.peak_rss_mb,
                              retries={"total": tracker.retries, **counts, "timeout_s": timeout},
                              workers=tracker.workers, phases=phases,
                              probe_peak_rss_mb=probe.peak_rss_mb if probe is not None else None)
    finally:
        if started_ray:
            ray.shutdown()
