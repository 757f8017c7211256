"""A run's closing files: the virtual dataset over the shards, all failures in one table, manifest.json (with
every invocation's provenance) and _SUCCESS, written last. Each shard's provenance (the worker that wrote it and
the invocation) comes from the invocation that wrote it: a resumed or repeated run keeps earlier entries."""
from __future__ import annotations

import json
import platform
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import h5py
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from export.sidecar import ArtifactMetadata
from lrp_module.files import atomic, sha256_file

from .artifact_cache import ResolvedWeights
from .concepts.tables import write_relmax
from .config import RunConfig
from .datasets.records import ImageRecord
from .layout import RunLayout
from .run_manifest import Manifest, ManifestError, ShardEntry, read_manifest
from .schema import FAILURE_SCHEMA
from .shard_runner import InvocationWork
from .writers import write_virtual_dataset


@dataclass(frozen=True)
class RunPlan:
    """What the driver settled before any shard ran, and what the manifest records of it."""

    config: RunConfig
    layout: RunLayout
    shards: list[list[ImageRecord]]
    weights: ResolvedWeights
    artifact: ArtifactMetadata  # the artifact's sidecar metadata (lrp.json "metadata")
    dataset: dict[str, Any]  # how the dataset was read (layout, label and box sources)
    started: float
    classes: dict[str, Any] | None = None  # the model's classes (classes.ModelClasses.record())


def finish(plan: RunPlan, work: InvocationWork) -> dict:
    """Write the closing files; returns the manifest."""
    layout, shards = plan.layout, plan.shards
    previous = _previous_manifest(layout)
    earlier = previous.invocations if previous else ()
    invocation = len(earlier) + 1
    entries, failures = _shard_entries(layout, shards, previous.shards if previous else (), work, invocation)
    concepts = plan.artifact.concepts if plan.config.concepts.enabled else None
    write_virtual_dataset(layout.virtual_dataset, [layout.relevance_shard(i) for i in range(len(shards))],
                          [e["explained"] for e in entries], plan.config.size, plan.config.size,
                          plan.config.map_dtype, concepts)
    relmax_rows = write_relmax(layout, len(shards), concepts, plan.config.concepts.relmax) if concepts else None
    all_failures = pa.concat_tables(failures, promote_options="default") if failures else FAILURE_SCHEMA.empty_table()
    with atomic(layout.failures) as tmp:
        pq.write_table(all_failures, tmp)
    seconds = time.time() - plan.started
    this = {"invocation": invocation, "started": plan.started, "seconds": seconds,
            "shards_explained": sorted(work.workers), "retries": work.retries, **work.timings(),
            "dataset": plan.dataset}
    artifact = plan.artifact
    manifest = {
        "config": asdict(plan.config), "digest": plan.config.digest(),
        "weights": artifact.record["weights"], "random_weights": plan.weights.choice == "random",
        "weights_warning": plan.weights.warning, "artifact": dict(artifact.record), "classes": plan.classes,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, **artifact.versions},
        "dataset": plan.dataset,
        "totals": {"images": sum(len(s) for s in shards), "explained": sum(e["explained"] for e in entries),
                   "failed": all_failures.num_rows},
        "failure_reasons": _reason_counts(all_failures),
        "retries": _summed_retries([*(i.retries for i in earlier), work.retries]),
        "precision": _precision(layout),
        **({"concepts": {**concepts.record(), "relmax": layout.relative(layout.relmax), "relmax_rows": relmax_rows}}
           if concepts else {}),
        "shards": entries,
        "timings": {"seconds_this_invocation": seconds,
                    "seconds_all_invocations": sum(i.seconds for i in earlier) + seconds, **work.timings()},
        "invocations": [*(i.record for i in earlier), this],
    }
    with atomic(layout.manifest) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, default=str))
    with atomic(layout.success) as tmp:
        tmp.write_text("")
    return manifest


def _shard_entries(layout: RunLayout, shards: list[list[ImageRecord]], previous: tuple[ShardEntry, ...],
                   work: InvocationWork, invocation: int) -> tuple[list[dict], list[pa.Table]]:
    """Each shard's manifest entry (files, hashes, counts, provenance) and its failures table; a shard this
    invocation did not explain keeps the provenance its `previous` entry recorded while its statistics are the
    same."""
    earlier = {e.shard: e for e in previous}
    entries, failures = [], []
    for index, shard in enumerate(shards):
        h5, stats, failed = layout.relevance_shard(index), layout.stats_shard(index), layout.failure_shard(index)
        with h5py.File(h5, "r") as handle:
            explained = handle["relevance"].shape[0]
        failures.append(pq.read_table(failed))
        entry = {"shard": index, "images": len(shard), "explained": explained, "failed": failures[-1].num_rows,
                 "relevance": layout.relative(h5), "relevance_sha256": sha256_file(h5), "stats": layout.relative(stats),
                 "stats_sha256": sha256_file(stats), "worker": None, "invocation": None}
        if index in work.workers:
            entry.update(worker=work.workers[index], invocation=invocation)
        elif (old := earlier.get(index)) and old.stats_sha256 == entry["stats_sha256"]:
            entry.update(worker=old.worker, invocation=old.invocation)
        entries.append(entry)
    return entries, failures


def _previous_manifest(layout: RunLayout) -> Manifest | None:
    """The manifest an earlier invocation wrote; None when there is none or it is unreadable (then it is written
    anew, without the earlier provenance)."""
    if not layout.manifest.is_file():
        return None
    try:
        return read_manifest(layout)
    except ManifestError:
        return None


def _summed_retries(invocations: list[Mapping[str, float]]) -> dict:
    """Retries over every invocation of the run (each invocation's own counts are in `invocations`)."""
    total: dict = {"total": 0}
    for retries in invocations:
        for key, value in retries.items():
            if key == "timeout_s":
                total[key] = value
            else:
                total[key] = total.get(key, 0) + value
    return total


def _precision(layout: RunLayout) -> dict:
    """The precision probe's record, written by the driver once the shards were done (it stays with the run when a
    later invocation resumes)."""
    if layout.precision.is_file():
        return json.loads(layout.precision.read_text())
    return {"reference": "float64-cpu", "images": 0,
            "error": "not recorded: the invocation that explained shard 0 stopped before the probe was written"}


def _reason_counts(failures: pa.Table) -> dict[str, int]:
    counts: dict[str, int] = {}
    for reason in failures.column("reason").to_pylist() if failures.num_rows else []:
        key = reason.split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    return counts

