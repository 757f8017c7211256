"""The driver: config -> records -> fixed shards -> Ray actors -> progress -> virtual dataset, manifest, _SUCCESS.

The driver never touches pixels; actors never decide what to do next. A shard is done when its statistics file
exists (written last, atomically); running the same command again skips done shards and redoes the rest. Every
check that can refuse a run comes before anything is written; OUT is locked (run_lock.py) from the first check that
reads it, so a second driver is refused before it writes.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict

from lrp_module import demo_model
from lrp_module.zoo import head_classes, weights_file

from . import run_folder
from .artifact_cache import ResolvedWeights, cached_artifact, cached_classifier, resolve_weights
from .classes import ClassesError, ModelClasses, check_classes, model_classes
from .concepts.check import check_concept_layers
from .config import RunConfig
from .contracts import ConceptWork, Flipping, WorkerSettings
from .datasets import Dataset, DatasetFiles, ImageRecord, load_dataset
from .errors import RunError, StrictStop
from .layout import RunLayout
from .manifest import RunPlan, finish
from .output_checks import check_free_space, check_out_placement, check_writable
from .precision_probe import PrecisionProbe, ProbeModel, probe_images
from .run_lock import hold_run
from .shard_runner import InvocationWork, check_device, run_shards

__all__ = ["RunError", "StrictStop", "explain"]


def explain(config: RunConfig, overwrite: bool = False, strict: bool = False, progress: bool = True,
            check_space: bool = True) -> dict:
    """Run the job; returns the manifest. Raises RunError (or DatasetError / WeightsError / OutputCheckError)
    before writing when the configuration cannot work, OutputError when a write fails (the run stops)."""
    started = time.time()
    layout = RunLayout(config.out)
    check_device(config)  # --device cuda without CUDA: one line before any work, never a silent CPU run
    _check_target(config, _known_class_count(config))  # before any work, where the count is known without a build
    check_out_placement(layout.root, config.root, layout.is_run())  # before anything is read or written
    with hold_run(layout.root, "explain"):  # one driver per OUT, for the whole run; the checks below under it
        return _explain(config, layout, started, overwrite, strict, progress, check_space)


def _explain(config: RunConfig, layout: RunLayout, started: float, overwrite: bool, strict: bool, progress: bool,
             check_space: bool) -> dict:
    """explain() under the run folder's lock: what may run in OUT is decided only by its holder."""
    replace = run_folder.replaces_previous_run(layout, config, overwrite)  # before the (minute-long) artifact build
    dataset = load_dataset(config.root, config.layout,
                           DatasetFiles(labels=config.labels, boxes=config.boxes, synsets=config.synsets))
    records = dataset.records[:config.limit] if config.limit else dataset.records
    if not records:
        raise RunError(f"{config.root}: no images to explain")
    if config.target == "label" and all(record.label is None for record in records):
        raise RunError(f"{config.root}: --target label, but the dataset has no labels ({dataset.layout} layout): "
                       "use --target predicted or a class index")
    expected = _known_classes(config)
    if expected is not None:  # before the (minute-long) artifact build, where the classes are known without it
        check_classes(records, expected, config.model, config.root)
    check_writable(layout.root)  # before anything is written, the artifact cache included
    shards = run_folder.shards_of(records, config.shard_size)
    todo = run_folder.unfinished(layout, shards, replace)
    if check_space:
        concept_maps = config.concepts.maps if config.concepts.enabled else 0
        check_free_space(layout.root, sum(len(shards[i]) for i in todo), config.size, config.map_dtype,
                         config.compression, 1 + concept_maps)
    weights = resolve_weights(config)
    check_concept_layers(config, weights.choice)  # a bad layer name: one line listing the valid ones
    if weights.warning:
        print(f"\n{'!' * 100}\n{weights.warning}\n{'!' * 100}\n", file=sys.stderr, flush=True)
    probe = start_probe(config, weights.choice, len(records), shards[0]) if 0 in todo else None
    try:
        return _run(config, layout, started, replace, strict, progress, dataset, records, shards, weights, probe)
    finally:
        if probe is not None:
            probe.cancel()


def _run(config: RunConfig, layout: RunLayout, started: float, replace: bool, strict: bool, progress: bool,
         dataset: Dataset, records: list[ImageRecord], shards: list[list[ImageRecord]], weights: ResolvedWeights,
         probe: PrecisionProbe | None) -> dict:
    """From the artifact on: build or load it, prepare OUT, explain the shards left, finish."""
    building = time.time()
    artifact, sidecar = cached_artifact(config, weights.choice)  # missing weights fail here, before the run dir
    artifact_seconds = time.time() - building
    metadata = sidecar.metadata
    if config.concepts.enabled and metadata.concepts is None:
        raise RunError(f"{sidecar.path}: the cached artifact has no concept outputs; remove it to rebuild it")
    concepts = ConceptWork(metadata.concepts, config.concepts.top) if config.concepts.enabled else None
    classes = _classes(config, metadata.class_count, metadata.class_names, metadata.weights.kind)  # its logits
    _check_target(config, classes.count)
    check_classes(records, classes, config.model, config.root)
    metrics = config.metric_settings()
    classifier = cached_classifier(config, weights.choice, artifact) \
        if config.faithfulness or metrics.needs_classifier() else None
    if classifier is not None and metrics.needs_classifier():
        metrics = dataclasses.replace(metrics, classifier=str(classifier.resolve()))
    run_folder.prepare(layout, config, replace)
    print(dataset.describe(), file=sys.stderr, flush=True)  # once the run starts: a refused one is one line
    todo = run_folder.unfinished(layout, shards)
    settings = WorkerSettings.from_config(
        config, strict=strict, class_names=classes.names or (),
        attributes={"config": asdict(config),
                    "lrp": {k: v for k, v in metadata.record.items() if k in ("composite", "top_k", "weights")},
                    **({"concepts": concepts.record.to_json()} if concepts else {})},
        concepts=concepts,
        start=metadata.start,
        probe_images=probe.job.spec.images if probe else 0,  # shard 0's first images go back for the probe
        flipping=Flipping(str(classifier.resolve()), config.flip_steps, config.flip_patch)
        if classifier and config.faithfulness else None, metrics=metrics)
    before_ray = time.time() - started
    work = run_shards(config, artifact, settings, shards, todo, progress, probe) if todo else InvocationWork()
    if work.phases:  # the manifest's timings: seconds per phase (bench/first_run.py)
        work.phases.update(before_ray_s=before_ray, artifact_s=artifact_seconds)
    return finish(RunPlan(config, layout, shards, weights, metadata, dataset.manifest(), started, classes.record()),
                  work)


def start_probe(config: RunConfig, weights: str, run_images: int, first_shard: list[ImageRecord]) -> PrecisionProbe:
    """The precision probe's float64 pass, started now in another process: beside the artifact build, Ray's start
    and the shards (bench/first_run.py measures the run without it by replacing this function)."""
    spec = ProbeModel(config.model, weights, config.composite, config.top_k, probe_images(run_images))
    return PrecisionProbe(spec, first_shard, config.size, config.target, config.max_image_bytes).start()


def _known_class_count(config: RunConfig) -> int | None:
    """The model's number of classes where its name, weights choice or state-dict file's head tell."""
    if config.model in demo_model.NAMES:
        record = demo_model.record_file(config.model)
        return len(json.loads(record.read_text())["classes"]) if record.is_file() else None
    source = weights_file(config.model, config.weights)
    return 1000 if source is None else head_classes(config.model, source)


def _classes(config: RunConfig, count: int, names: Sequence[str] | None, weights_kind: str | None) -> ModelClasses:
    """The model's classes (pipeline/classes.py) from the artifact's (or the model's) class names and weights kind
    (None: not known yet); a --classes file that does not fit is a RunError (exit 2)."""
    imagenet_head = config.model not in demo_model.NAMES and weights_kind in (None, "random", "file")
    try:
        return model_classes(count, config.model, list(names) if names else None, config.classes, imagenet_head)
    except ClassesError as error:
        raise RunError(str(error)) from None


def _known_classes(config: RunConfig) -> ModelClasses | None:
    """The model's classes before its artifact is built, where they are known without it (as the artifact will
    have them: the demo models' names, ImageNet's for a 1000-class head, a --classes file), else None."""
    count = _known_class_count(config)
    if count is None:
        return None
    names = demo_model.class_names(config.model) if config.model in demo_model.NAMES else None
    return _classes(config, count, names, None)


def _check_target(config: RunConfig, classes: int | None) -> None:
    """A class index as target must be one of the model's classes: refused before any work (exit code 2)."""
    if classes is not None and isinstance(config.target, int) and not 0 <= config.target < classes:
        raise RunError(f"target {config.target} is out of range: model {config.model} has {classes} classes "
                       f"(0-{classes - 1})")
