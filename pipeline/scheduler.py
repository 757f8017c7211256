"""Fault-tolerant shard scheduling on Ray actors: one shard in flight per actor, a timeout per shard, a fresh
actor after a crash or a hang, bounded retries, then isolation of the images that break the worker.

A shard that kills or hangs its actor `retries + 1` times is probed image by image (each probe on a fresh actor
after a death, each retried as often as a shard); the images whose probe kills or hangs the worker every time
are recorded as failed, and the shard is explained once more without them. Ray's own actor restarts and task
retries are off: this loop sees every death, counts it and decides what happens next.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .contracts import ShardResult
from .datasets.records import ImageRecord

CRASHED, TIMED_OUT, ERROR = "crashed", "timed_out", "error"
STARTUP_FAILURES_ALLOWED = 3  # consecutive actors that die before serving anything: the run cannot work
STARTUP_TIMEOUT_S = 600.0  # an actor that has not loaded its module by then is taken for dead


class SchedulingError(RuntimeError):
    """The run cannot go on (actors cannot start, or a shard raises the same error every time)."""


@dataclass
class Job:
    """A whole shard (image is None), or a probe of one image of it (its position in the shard)."""
    shard: int
    image: int | None = None
    attempts: int = 0
    failures: list[str] = field(default_factory=list)  # CRASHED / TIMED_OUT, one per failed attempt


@dataclass
class Slot:
    """One actor and what it is doing: starting (ref = its ready() call), idle, or running a job."""
    actor: Any
    ref: Any = None
    job: Job | None = None
    began: float = 0.0


@dataclass
class Isolation:
    """A shard being probed image by image: probes still out, and the images found to break the worker."""
    outstanding: int
    skip: dict[int, str] = field(default_factory=dict)


class ShardScheduler:
    """Runs shards on `count` actors made by `make_actor`; calls `on_result(result)` for every finished shard
    (the worker's ShardResult, or the one `write_failed` returns for a shard given up)."""

    def __init__(self, *, ray, make_actor: Callable[[], Any], count: int, shards: list[list[ImageRecord]], out: str,
                 timeout_s: float, retries: int, on_result: Callable[[ShardResult], None],
                 on_retry: Callable[[], None] = lambda: None,
                 write_failed: Callable[[int, str], ShardResult] | None = None):
        self.ray, self.make_actor, self.count, self.shards, self.out = ray, make_actor, count, shards, out
        self.timeout_s, self.retries, self.on_result, self.on_retry = timeout_s, retries, on_result, on_retry
        self.write_failed = write_failed
        self.queue: deque[Job] = deque()
        self.isolations: dict[int, Isolation] = {}
        self.skips: dict[int, dict[int, str]] = {}  # shards explained again without their breaking images
        self.counts = {CRASHED: 0, TIMED_OUT: 0, ERROR: 0, "probes": 0, "isolated_images": 0,
                       "failed_shards": 0}
        self.startup_failures = 0

    # -- the loop ---------------------------------------------------------------------------------------
    def run(self, todo: list[int]) -> dict:
        """Explain the shards in `todo`; returns the retry counts."""
        self.queue.extend(Job(i) for i in todo)
        slots = [self._start(Slot(None)) for _ in range(min(self.count, len(todo)))]
        try:
            while self.queue or any(s.job for s in slots):
                for slot in slots:
                    if slot.ref is None and self.queue:
                        self._submit(slot, self.queue.popleft())
                busy = {s.ref: s for s in slots if s.ref is not None}
                ready, _ = self.ray.wait(list(busy), num_returns=1, timeout=self._wait_s(slots))
                for ref in ready:
                    self._collect(busy[ref])
                now = time.monotonic()
                for slot in slots:
                    if slot.ref is not None and now - slot.began > self._limit(slot):
                        job = slot.job
                        self._replace(slot)
                        if job is None:
                            self._startup_failed(f"an actor did not start within {STARTUP_TIMEOUT_S:g} s")
                        else:
                            self._failed(job, TIMED_OUT, f"no result within shard_timeout_s={self.timeout_s:g}")
        finally:
            for slot in slots:
                self.ray.kill(slot.actor)
        return dict(self.counts)

    def _limit(self, slot: Slot) -> float:
        return self.timeout_s if slot.job else max(self.timeout_s, STARTUP_TIMEOUT_S)

    def _wait_s(self, slots: list[Slot]) -> float:
        deadlines = [s.began + self._limit(s) for s in slots if s.ref is not None]
        if not deadlines:
            return 1.0
        return max(0.01, min(1.0, min(deadlines) - time.monotonic()))

    def _start(self, slot: Slot) -> Slot:
        """A fresh actor in the slot; jobs go to it once its ready() call returns (so loading the model does
        not count against a shard's timeout)."""
        slot.actor = self.make_actor()
        slot.ref, slot.job, slot.began = slot.actor.ready.remote(), None, time.monotonic()
        return slot

    def _replace(self, slot: Slot) -> None:
        self.ray.kill(slot.actor)
        self._start(slot)

    def _submit(self, slot: Slot, job: Job) -> None:
        if job.image is None:
            ref = slot.actor.explain_shard.remote(job.shard, self.shards[job.shard], self.out,
                                                  self.skips.get(job.shard))
        else:
            ref = slot.actor.probe.remote(self.shards[job.shard][job.image])
        slot.ref, slot.job, slot.began = ref, job, time.monotonic()

    def _collect(self, slot: Slot) -> None:
        job = slot.job
        try:
            result = self.ray.get(slot.ref)
        except self.ray.exceptions.RayTaskError as error:  # the code raised: not the image's fault
            slot.ref, slot.job = None, None
            if job is None:
                raise SchedulingError(f"an actor could not start: {_first_line(error)}") from None
            self._failed(job, ERROR, _first_line(error))
            return
        except self.ray.exceptions.RayError as error:  # the actor's process died (or its node)
            self._replace(slot)
            if job is None:
                self._startup_failed(_first_line(error))
                return
            self._failed(job, CRASHED, _first_line(error))
            return
        slot.ref, slot.job = None, None
        if job is None:
            self.startup_failures = 0
        elif job.image is None:
            self.on_result(result)
        else:
            self._probe_done(job, None)

    def _startup_failed(self, detail: str) -> None:
        self.startup_failures += 1
        if self.startup_failures >= STARTUP_FAILURES_ALLOWED:
            raise SchedulingError(f"{self.startup_failures} actors in a row died while starting: {detail}")

    # -- what happens after a failure ---------------------------------------------------------------------
    def _failed(self, job: Job, kind: str, detail: str) -> None:
        self.counts[kind] += 1
        self.on_retry()
        job.attempts += 1
        job.failures.append(kind)
        if job.attempts <= self.retries:
            self.queue.append(job)
        elif kind == ERROR:
            raise SchedulingError(f"shard {job.shard} failed {job.attempts} times: {detail}")
        elif job.image is not None:
            self._probe_done(job, _reason(job.failures))
        elif job.shard in self.skips:  # even without its breaking images: give the shard up
            self.counts["failed_shards"] += 1
            self.on_result(self.write_failed(job.shard, f"the shard {_reason(job.failures)} "
                                                        "even after isolating its images"))
        else:
            self._isolate(job.shard)

    def _isolate(self, shard: int) -> None:
        images = range(len(self.shards[shard]))
        self.isolations[shard] = Isolation(outstanding=len(images))
        self.counts["probes"] += len(images)
        self.queue.extend(Job(shard, image=i) for i in images)

    def _probe_done(self, job: Job, reason: str | None) -> None:
        isolation = self.isolations[job.shard]
        isolation.outstanding -= 1
        if reason:
            isolation.skip[job.image] = reason
            self.counts["isolated_images"] += 1
        if isolation.outstanding == 0:
            self.skips[job.shard] = isolation.skip
            self.queue.append(Job(job.shard))


def _reason(failures: list[str]) -> str:
    crashes, hangs = failures.count(CRASHED), failures.count(TIMED_OUT)
    parts = ([f"crashed the worker {_times(crashes)}"] if crashes else []) + \
        ([f"timed out {_times(hangs)}"] if hangs else [])
    return " and ".join(parts)


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__


def _times(count: int) -> str:
    return "once" if count == 1 else f"{count} times"
