"""What the driver hands a shard worker and what a shard hands back: frozen dataclasses, defined once.

The driver builds `WorkerSettings` from the run's configuration (`from_config`: the only place where a
configuration value becomes a worker setting, so every default lives in the configuration alone); the worker
returns one `ShardResult` per shard, which the scheduler passes on to the driver unchanged."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from export.concepts import ConceptsRecord

if TYPE_CHECKING:
    from .config import RunConfig
    from .metrics import MetricSettings


@dataclass(frozen=True)
class Flipping:
    """Pixel flipping: the traced forward-only classifier and the perturbation's steps and region side."""

    classifier: str
    steps: int
    patch: int


@dataclass(frozen=True)
class ConceptWork:
    """Concepts (CRP) per image: what the artifact computes (its sidecar's record) and how many top channels per
    layer the statistics list."""

    record: ConceptsRecord
    top: int


@dataclass(frozen=True)
class ProbeImages:
    """What the actor of shard 0 explained for the precision probe (pipeline/precision_probe.py): shard 0's first
    explained images, in order."""

    image_ids: tuple[str, ...]
    inputs: np.ndarray  # (n, C, H, W) float32: the model's inputs, as the actor preprocessed them
    targets: tuple[int, ...]  # the classes explained (the prediction where the target is `predicted`)
    relevance: np.ndarray  # (n, H, W) float32: the channel-summed maps, before any storage rounding
    numerics: Mapping[str, Any]  # lrp_module.oracle.numeric_settings of the actor's device


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a shard worker needs besides the traced module: how to decode, explain and write a shard."""

    size: int
    batch_size: int
    map_dtype: str
    compression: int
    target: str | int
    decode_threads: int
    precision: str
    gpu_decode: bool
    max_image_bytes: int  # an image file or tar member over this is a failure row, never read
    strict: bool = False  # stop a shard at its first failed image, writing nothing
    class_names: tuple[str, ...] = ()
    attributes: Mapping[str, Any] = field(default_factory=dict)  # written to every relevance shard (HDF5 attrs)
    start: str = "logit"  # what LRP starts from: the target's logit, or a softmax (seed); for `conservation`
    probe_images: int = 0  # shard 0's first images returned for the driver's precision probe
    flipping: Flipping | None = None
    concepts: ConceptWork | None = None  # the artifact's concept outputs (None: concepts off)
    device: str = "cpu"  # decided by the driver's actor plan
    threads: int = 1  # torch threads of a CPU actor
    metrics: MetricSettings | None = None  # the evaluation metrics (pipeline/metrics/); None: none

    @classmethod
    def from_config(cls, config: RunConfig, **decided: Any) -> WorkerSettings:
        """The worker's share of a run configuration; `decided` adds what the driver worked out (class names,
        the artifact's start, the probe, pixel flipping's classifier, device and threads)."""
        decided.setdefault("metrics", config.metric_settings())
        return cls(size=config.size, batch_size=config.batch_size, map_dtype=config.map_dtype,
                   compression=config.compression, target=config.target, decode_threads=config.decode_threads,
                   precision=config.precision, gpu_decode=config.gpu_decode,
                   max_image_bytes=config.max_image_bytes, **decided)


@dataclass(frozen=True)
class ShardResult:
    """One shard's outcome. `write_error`: a run file could not be written (the run stops, the shard stays
    undone); `stopped_at`: --strict stopped the shard at this failure row (nothing of it was written)."""

    shard: int
    explained: int
    failed: int
    reasons: tuple[str, ...] = ()
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    worker: Mapping[str, Any] | None = None  # node, host and process that explained it (None: written by the driver)
    write_error: str | None = None
    stopped_at: Mapping[str, Any] | None = None
    probe_images: ProbeImages | None = None  # shard 0 only: what the precision probe compares with float64
