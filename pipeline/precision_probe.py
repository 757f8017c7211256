"""The run's precision probe: the first images of shard 0 recomputed in float64 on the driver's machine's CPU,
against the float32 maps the actor of shard 0 computed on its device (lrp_module.oracle).

Off the shards' critical path: when the run starts, a separate process (spawned, so that nothing of torch's global
state is shared: torch.fx patches nn.Module while it captures a graph, and the artifact build captures at the
same time) computes the float64 maps of shard 0's first images as the actors will most likely see them: decoded
with the actors' Pillow path, for the configured class or label (for `predicted`, float64's own prediction). Its
float64 weights are held once (LRPModel shares them) and freed when it exits. The actor of shard 0 returns its
inputs, classes and float32 maps for those images (`ProbeImages`); once the shards are done, an image whose input or
class differs from the guess (decoded on a GPU, a float32 prediction other than float64's) is recomputed in the
driver for exactly what the actor had (issue 20.4).
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lrp_module.files import atomic
from lrp_module.oracle import Float64Oracle, probe_record
from lrp_module.zoo import build_model

from .contracts import ProbeImages
from .datasets.records import ImageRecord
from .preprocess import Preprocessing, load

# How many images the probe recomputes in float64: one per this many images of the run, at least one, at most
# PROBE_MAX_IMAGES. A wrong float32 path shows on any real image; a fixed 8 cost more than a small run's explain.
IMAGES_PER_PROBE_IMAGE = 200
PROBE_MAX_IMAGES = 8
_LOOK_AHEAD = 64  # shard 0's records handed to the probe's process: the first images it can decode are among them


def probe_images(run_images: int) -> int:
    """The images the probe recomputes for a run of `run_images`: bounded whatever the run's size."""
    return max(1, min(PROBE_MAX_IMAGES, run_images // IMAGES_PER_PROBE_IMAGE))


@dataclass(frozen=True)
class ProbeModel:
    """What the probe rebuilds eagerly in float64, and how many of shard 0's first images it recomputes."""

    model: str
    weights: str
    composite: str
    top_k: float
    images: int = 1


@dataclass
class Reference:
    """One image's float64 pass: its input, the class explained and the channel-summed float64 map."""

    inputs: torch.Tensor
    target: int
    relevance: torch.Tensor


class PrecisionProbe:
    """`start` starts the float64 pass over shard 0's first images in another process; `write` (after the shards)
    compares them with the actor's maps and writes the record. The record has the same fields in every run: on an
    error, `images` is 0 and `error` says why."""

    def __init__(self, spec: ProbeModel, records: Sequence[ImageRecord], size: int, target: str | int,
                 max_image_bytes: int) -> None:
        self.job = _Job(spec, tuple(records[:_LOOK_AHEAD]), size, target, max_image_bytes)
        self.seconds = 0.0  # the float64 work's own time: the other process's and any recomputation's
        self.peak_rss_mb: float | None = None  # the other process's peak memory
        self._folder: Path | None = None
        self._process: subprocess.Popen | None = None

    def start(self) -> PrecisionProbe:
        """A fresh interpreter: it shares no torch state with the driver and imports nothing of the caller's script
        (multiprocessing's spawn would re-run it)."""
        self._folder = Path(tempfile.mkdtemp(prefix="lrp-probe-"))
        job = self._folder / "job.pickle"
        job.write_bytes(pickle.dumps(self.job))
        entry = "from pipeline.precision_probe import _in_other_process; _in_other_process()"
        with open(self._folder / "stderr.txt", "wb") as errors:  # a file: a pipe left unread could stall it
            self._process = subprocess.Popen([sys.executable, "-c", entry, str(job),
                                              str(self._folder / "result.pickle")],
                                             stdout=subprocess.DEVNULL, stderr=errors)
        return self

    def cancel(self) -> None:
        """The run stops (or the probe is done): the process is stopped and its folder removed."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def write(self, explained: ProbeImages | None, path: Path) -> None:
        """The probe's record for the actor's maps, written to `path` (atomically)."""
        record = self.record(explained)
        with atomic(path) as tmp:
            tmp.write_text(json.dumps(record, indent=2))

    def record(self, explained: ProbeImages | None) -> dict[str, Any]:
        """The probe's record (manifest.json's "precision") for the actor's maps; waits for the float64 guesses."""
        guesses, failure = self._guesses()
        if explained is None or not explained.image_ids:
            return _failed(failure or "shard 0 explained no image")
        started = time.perf_counter()
        try:
            oracle: list[Float64Oracle] = []  # built only if a guess missed
            references = [_reference(self.job.spec, guesses, explained, i, oracle)
                          for i in range(len(explained.image_ids))]
            return probe_record(torch.from_numpy(explained.relevance.copy()), torch.stack(references),
                                explained.numerics)
        except Exception as error:  # the probe must not cost the run; say why it is missing
            return _failed(f"{type(error).__name__}: {error}")
        finally:
            self.seconds += time.perf_counter() - started

    def _guesses(self) -> tuple[dict[str, Reference], str | None]:
        """The other process's references (and its seconds), or none and why."""
        try:
            if self._process.wait() != 0:
                errors = (self._folder / "stderr.txt").read_text(errors="replace")
                lines = [line for line in errors.strip().splitlines() if line.strip()]
                return {}, lines[-1] if lines else f"the probe's process exited with {self._process.returncode}"
            guesses, self.seconds, self.peak_rss_mb = pickle.loads((self._folder / "result.pickle").read_bytes())  # noqa: S301 (ours)
            return guesses, None
        finally:
            self.cancel()


@dataclass(frozen=True)
class _Job:
    """What the other process computes: the probe's model and the first images of shard 0."""

    spec: ProbeModel
    records: tuple[ImageRecord, ...]
    size: int
    target: str | int
    max_image_bytes: int


def _failed(reason: str) -> dict[str, Any]:
    return {"reference": "float64-cpu", "images": 0, "error": reason}


def guess_references(job: _Job) -> tuple[dict[str, Reference], float, float]:
    """In the other process: float64 references for the first `spec.images` of the records that the actor will
    explain, decoded as it decodes them on a CPU; the seconds it took and the process's peak memory (MB)."""
    started = time.perf_counter()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))  # half the machine: the run goes on beside it
    preprocessing = Preprocessing.for_size(job.size)
    oracle = _oracle(job.spec)
    references: dict[str, Reference] = {}
    for record in job.records:
        if len(references) == job.spec.images:
            break
        expected = _target(record, job.target)
        if expected is None:
            continue
        try:
            x, _ = load(record, preprocessing, job.max_image_bytes)
        except Exception:  # noqa: S112  (the actor records the failure; the probe takes the next image)
            continue
        references[record.image_id] = _explain(oracle, x.unsqueeze(0), expected)
    return references, time.perf_counter() - started, peak_rss_mb()


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: Linux's VmHWM, which starts afresh at exec (getrusage's
    ru_maxrss keeps the parent's size from before the exec of a forked child); ru_maxrss elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _target(record: ImageRecord, target: str | int) -> int | None:
    """The class the actor will explain, -1 for its prediction; None: the actor will not explain it."""
    if record.problem:
        return None
    if target == "label":
        return record.label
    return int(target) if isinstance(target, int) or str(target).isdigit() else -1


def _explain(oracle: Float64Oracle, x: torch.Tensor, target: int) -> Reference:
    logits, relevance = oracle.explain(x, torch.tensor([target]))
    used = int(logits.argmax(1)) if target < 0 else target
    return Reference(x[0], used, relevance.sum(1)[0])


def _reference(spec: ProbeModel, guesses: dict[str, Reference], explained: ProbeImages, i: int,
               oracle: list[Float64Oracle]) -> torch.Tensor:
    """The float64 map for the actor's image i: the guess, when its input and class are the actor's; else computed
    here for them (`oracle`: the one built for that, at most once)."""
    x = torch.from_numpy(explained.inputs[i].copy())
    target = explained.targets[i]
    guess = guesses.get(explained.image_ids[i])
    if guess is not None and guess.target == target and torch.equal(guess.inputs, x):
        return guess.relevance
    if not oracle:
        oracle.append(_oracle(spec))
    return _explain(oracle[0], x.unsqueeze(0), target).relevance


def _oracle(spec: ProbeModel) -> Float64Oracle:
    """The float64 oracle of the run's model, weights, composite and top-k: a fresh float32 build converted in place
    (the oracle shares its weights), so the float64 weights are held once."""
    model, _ = build_model(spec.model, spec.weights, warn=False)  # the driver has said so loudly already
    return Float64Oracle(model, spec.composite, top_k=spec.top_k, copy_model=False)



def _in_other_process() -> None:
    """The other process's entry: python -c '...; _in_other_process()' JOB RESULT (imported by name, so that what it
    pickles is pipeline.precision_probe's classes, not __main__'s)."""
    job, result = Path(sys.argv[1]), Path(sys.argv[2])
    with contextlib.suppress(OSError):  # the run first: this process takes the CPU time the run leaves idle
        os.nice(19)
    result.write_bytes(pickle.dumps(guess_references(pickle.loads(job.read_bytes()))))  # noqa: S301 (ours)
