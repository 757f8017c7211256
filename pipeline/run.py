"""The driver: config -> records -> fixed shards -> Ray actors -> progress -> virtual dataset, manifest, _SUCCESS.

The driver never touches pixels; actors never decide what to do next. A shard is done when its statistics file
exists (written last, atomically); running the same command again skips done shards and redoes the rest.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lrp_module.files import atomic, sha256_file as sha256, temporary_name
from lrp_module.zoo import WeightsError, build_model, default_weights, weights_file

from .artifact_trust import record_trust, untrusted_reason
from .classes import check_classes
from .config import RunConfig
from .datasets import DatasetFiles, load_dataset
from .datasets.records import ImageRecord
from .layout import RunLayout
from .output_checks import check_free_space, check_out_placement, check_writable
from .ray_session import start_ray
from .writers import FAILURE_SCHEMA, write_failed_shard, write_virtual_dataset

RANDOM_WARNING = ("NO IMAGENET WEIGHTS: this run uses RANDOM weights; its maps say nothing about a trained "
                  "model. Put the torchvision checkpoint in the torch hub cache, or pass WEIGHTS=<file>.")


class RunError(RuntimeError):
    """The run cannot start or finish; the message says why."""


class StrictStop(RunError):
    """--strict: an image could not be explained; the message names it and the reason."""


def resolve_weights(config: RunConfig) -> tuple[str, str | None]:
    """'auto' means the model's trained weights (ImageNet's; vgg-shapes' committed ones) where obtainable and
    random (loudly) where not; anything else is taken as asked, and fails when missing."""
    if config.weights != "auto":
        return config.weights, None
    trained = default_weights(config.model)
    try:
        build_model(config.model, trained)
        return trained, None
    except WeightsError as error:
        return "random", f"{RANDOM_WARNING} ({error})"


def cache_key(config: RunConfig, weights: str) -> str:
    """The cache entry's name: the model (a known name) and a hash of what shapes the artifact (composite, top-k,
    size, and the weights: their choice, or a file's content). Never user text: a weights path cannot name or
    escape a folder of the cache."""
    source = weights_file(config.model, weights)
    if source is not None:  # a state-dict file: keyed by content, so a replaced file is never served stale
        from lrp_module.files import sha256_file

        weights_id = {"sha256": sha256_file(source)}
    else:
        weights_id = {"choice": str(weights)}
    identity = {"model": config.model, "composite": config.composite, "top_k": config.top_k, "size": config.size,
                "weights": weights_id}
    return f"{config.model}-{hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]}"


def cached_artifact(config: RunConfig, weights: str) -> tuple[Path, dict]:
    """The traced LRP module for this configuration, built (and verified) once, reused by later runs. A build
    happens in a temporary folder of the cache, moved into place when complete: a failed one leaves nothing."""
    from export.artifacts import ExportConfig, export_artifacts

    cache = Path(config.cache)
    directory = cache / cache_key(config, weights)
    artifact, sidecar = directory / "lrp.torchscript.pt", directory / "lrp.json"
    if artifact.is_file() and sidecar.is_file():
        reason = untrusted_reason([artifact, sidecar])
        if reason:  # never load TorchScript this project did not build: rebuild it
            print(f"rebuilding the cached artifact {artifact}: {reason}", file=sys.stderr, flush=True)
            artifact.unlink()
    if not (artifact.is_file() and sidecar.is_file()):
        export = ExportConfig(model=config.model, weights=weights, composite=config.composite, top_k=config.top_k,
                              height=config.size, width=config.size, formats=("torchscript",))
        created = [p for p in (cache.absolute(), *cache.absolute().parents) if not p.exists()]
        building = cache / temporary_name(directory.name)
        try:
            building.mkdir(parents=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                export_artifacts(export, building, verify=True)
            directory.mkdir(parents=True, exist_ok=True)
            for path in sorted(building.iterdir()):  # what the build wrote: the artifact and its sidecar
                os.replace(path, directory / path.name)
        finally:
            shutil.rmtree(building, ignore_errors=True)  # our own temporary folder
            for folder in created:  # folders this build created, if the build left them empty
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
        record_trust([artifact, sidecar])
    return artifact, json.loads(sidecar.read_text())


def cached_classifier(config: RunConfig, weights: str, artifact: Path) -> Path:
    """The forward-only traced VGG for pixel flipping, beside the LRP artifact (same cache key: configuration +
    weights hash), built once and checked against eager PyTorch and the LRP artifact's logits."""
    from export.classifier import CLASSIFIER_FILE, export_classifier

    path = artifact.parent / CLASSIFIER_FILE
    record = "classifier.sha256"
    if path.is_file():
        reason = untrusted_reason([path], record)
        if reason:  # the same rule as the LRP artifact: only TorchScript this project built is loaded
            print(f"rebuilding the cached classifier {path}: {reason}", file=sys.stderr, flush=True)
            path.unlink()
    if not path.is_file():
        export_classifier(config.model, weights, config.size, path, lrp_artifact=artifact)
        record_trust([path], record)
    return path


def shards_of(records: list[ImageRecord], size: int) -> list[list[ImageRecord]]:
    return [records[i:i + size] for i in range(0, len(records), size)]


def shard_done(out: Path, index: int) -> bool:
    return RunLayout(out).shard_done(index)


def _previous_run(layout: RunLayout, config: RunConfig, overwrite: bool) -> bool:
    """Before any work: may this run use OUT? True when it replaces a run of another configuration
    (--overwrite). A run of the same configuration resumes; one with a larger limit extends it (its shards are a
    prefix of the new ones); anything else is refused, naming what differs."""
    if not layout.run_file.is_file():
        return False
    try:
        previous = json.loads(layout.run_file.read_text())
        identity = previous["identity"]
    except (OSError, ValueError, KeyError, TypeError):
        if overwrite:
            return True
        raise RunError(f"{layout.run_file}: unreadable run record; use --overwrite or another OUT") from None
    current = config.identity()
    changed = sorted(k for k, v in current.items() if k != "limit" and identity.get(k) != v)
    if not changed and not _limit_extends(identity.get("limit"), config.limit):
        changed = ["limit (smaller than the finished run's: its shards would no longer match)"]
    if not changed:
        return False
    if not overwrite:
        raise RunError(f"{layout.root} holds a run with another configuration (differs in {', '.join(changed)}); "
                       "use --overwrite (removes only the run's own files) or another OUT")
    return True


def _limit_extends(previous: int | None, current: int | None) -> bool:
    """A run's shards are a prefix of a run over more images: the same or a larger limit (None = all) extends."""
    return current is None or (previous is not None and current >= previous)


def _prepare_run_dir(layout: RunLayout, config: RunConfig, replace: bool) -> None:
    try:
        if replace:
            layout.remove_own()
        layout.make_folders()
        layout.sweep_temporary()  # a killed run's unfinished files
        with atomic(layout.run_file) as tmp:
            tmp.write_text(json.dumps({"digest": config.digest(), "identity": config.identity()}, indent=2))
    except OSError as error:
        raise RunError(f"run directory {layout.root} is not writable: {error.strerror or error}") from None


def _known_class_count(config: RunConfig) -> int | None:
    """The model's number of classes where its name and weights choice tell (not for a weights file)."""
    from lrp_module import demo_model

    if config.model in demo_model.NAMES:
        record = demo_model.record_file(config.model)
        return len(json.loads(record.read_text())["classes"]) if record.is_file() else None
    return 1000 if weights_file(config.model, config.weights) is None else None


def _check_target(config: RunConfig, classes: int | None) -> None:
    """A class index as target must be one of the model's classes: refused before any work (exit code 2)."""
    if classes is not None and isinstance(config.target, int) and not 0 <= config.target < classes:
        raise RunError(f"target {config.target} is out of range: model {config.model} has {classes} classes "
                       f"(0-{classes - 1})")


def _actor_plan(ray, config: RunConfig) -> tuple[int, dict, str, int]:
    gpus = int(ray.cluster_resources().get("GPU", 0)) if config.device != "cpu" else 0
    count = config.actors if config.actors != "auto" else (gpus or 1)
    if gpus:
        return count, {"num_gpus": 1, "num_cpus": 1}, "cuda", 1
    cpus = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    # fractional CPUs: an actor holding whole CPUs starves Ray's other tasks on small machines
    return count, {"num_cpus": 0.5}, "cpu", max(1, cpus // count)


def explain(config: RunConfig, overwrite: bool = False, strict: bool = False, progress: bool = True,
            check_space: bool = True) -> dict:
    """Run the job; returns the manifest. Raises RunError (or DatasetError / WeightsError / OutputCheckError)
    before writing when the configuration cannot work, OutputError when a write fails (the run stops)."""
    started = time.time()
    out = Path(config.out)
    layout = RunLayout(out)
    _check_target(config, _known_class_count(config))  # before any work, where the count is known by name
    check_out_placement(out, config.root, layout.is_run())  # before anything is read or written
    replace = _previous_run(layout, config, overwrite)  # before the artifact is built (it can take a minute)
    dataset = load_dataset(config.root, config.layout,
                           DatasetFiles(labels=config.labels, boxes=config.boxes, synsets=config.synsets))
    records = dataset.records
    if config.limit:
        records = records[:config.limit]
    if not records:
        raise RunError(f"{config.root}: no images to explain")
    check_writable(out)  # before anything is written, the artifact cache included
    shards = shards_of(records, config.shard_size)
    if check_space:
        remaining = sum(len(shard) for i, shard in enumerate(shards) if replace or not _shard_matches(layout, i, shard))
        check_free_space(out, remaining, config.size, config.map_dtype, config.compression)
    weights, weights_warning = resolve_weights(config)
    if weights_warning:
        print(f"\n{'!' * 100}\n{weights_warning}\n{'!' * 100}\n", file=sys.stderr, flush=True)
    artifact, sidecar = cached_artifact(config, weights)  # missing weights fail here, before the run dir exists
    _check_target(config, sidecar["metadata"]["outputs"]["logits"][1])
    check_classes(records, sidecar["metadata"].get("class_names") or _imagenet_names(), config.model, config.root)
    classifier = cached_classifier(config, weights, artifact) if config.faithfulness else None
    _prepare_run_dir(layout, config, replace)
    print(dataset.describe(), file=sys.stderr, flush=True)  # once the run starts: a refused one is one line
    todo = [i for i in range(len(shards)) if not _shard_matches(layout, i, shards[i])]
    metadata = sidecar["metadata"]
    settings = {
        "batch_size": config.batch_size, "size": config.size, "map_dtype": config.map_dtype,
        "compression": config.compression, "target": config.target, "decode_threads": config.decode_threads,
        "precision": config.precision, "gpu_decode": config.gpu_decode, "strict": strict,
        "class_names": metadata.get("class_names") or _imagenet_names(),
        "attributes": {"config": asdict(config), "lrp": {k: metadata[k] for k in ("composite", "top_k", "weights")}},
        "start": metadata["composite"].get("start", "logit"),
        # the precision probe: the actor explaining shard 0 recomputes its first batch in float64 (pipeline/worker.py)
        "probe": {"model": config.model, "weights": weights, "composite": config.composite, "top_k": config.top_k},
    }
    if classifier is not None:
        settings["faithfulness"] = {"classifier": str(classifier.resolve()), "steps": config.flip_steps,
                                    "patch": config.flip_patch}
    work = _run_shards(config, artifact, settings, shards, todo, out, strict, progress) if todo else {}
    work["dataset"] = dataset.manifest()
    return _finish(out, config, shards, weights, weights_warning, sidecar, started, work)


def _run_shards(config: RunConfig, artifact: Path, settings: dict, shards: list[list[ImageRecord]],
                todo: list[int], out: Path, strict: bool, progress: bool) -> dict:
    """Feed the unfinished shards to actors through the fault-tolerant scheduler (pipeline/scheduler.py), with a
    progress bar. Returns what the manifest records of this work: images, seconds, actors' peak memory, retries,
    and which node / process explained each shard."""
    from tqdm import tqdm

    from .scheduler import SchedulingError, ShardScheduler
    from .worker import ShardExplainer

    ray, started_ray = start_ray()
    try:
        count, options, device, threads = _actor_plan(ray, config)
        settings = {**settings, "device": device, "threads": threads}
        if device == "cpu" and config.precision == "tf32":
            print("note: precision tf32 has no effect on the CPU (float32 is used); recorded as asked",
                  file=sys.stderr, flush=True)
        # no Ray restarts or retries: the scheduler sees every death and replaces the actor itself; SPREAD puts
        # the actors on different nodes of a cluster where it can
        remote = ray.remote(ShardExplainer).options(max_restarts=0, max_task_retries=0, scheduling_strategy="SPREAD",
                                                    **options)
        total = sum(len(s) for s in shards)
        done = total - sum(len(shards[i]) for i in todo)
        failed, retries, peak, workers, begun = 0, 0, 0.0, {}, time.time()
        timeout = config.shard_timeout_s or 120.0 + 10.0 * config.shard_size
        with tqdm(total=total, initial=done, unit="img", disable=not progress, desc="explain",
                  dynamic_ncols=True) as bar:
            def on_result(result: dict) -> None:
                nonlocal failed, peak
                _stop_if_needed(result, strict)  # a write error, or --strict and a failed image
                failed += result["failed"]
                peak = max(peak, result.get("peak_rss_mb", 0.0))
                workers[result["shard"]] = result.get("worker")
                bar.update(result["explained"] + result["failed"])
                bar.set_postfix(failed=failed, retries=retries)

            def on_retry() -> None:
                nonlocal retries
                retries += 1
                bar.set_postfix(failed=failed, retries=retries)

            scheduler = ShardScheduler(
                ray, lambda: remote.remote(str(artifact.resolve()), settings), min(count, len(todo)), shards,
                str(out.resolve()), timeout, config.shard_retries, on_result, on_retry,
                lambda index, reason: write_failed_shard(out, index, shards[index], reason, settings))
            try:
                counts = scheduler.run(todo)
            except SchedulingError as error:
                raise RunError(str(error)) from None
        RunLayout(out).sweep_temporary()  # files dead actors had begun
        images = sum(len(shards[i]) for i in todo)
        seconds = time.time() - begun
        return {"images_this_invocation": images, "explain_seconds": seconds,
                "images_per_second": images / seconds if seconds else None, "actor_peak_rss_mb": peak,
                "retries": {"total": retries, **counts, "timeout_s": timeout}, "workers": workers}
    finally:
        if started_ray:
            ray.shutdown()


def _stop_if_needed(result: dict, strict: bool) -> None:
    """A shard's result that ends the run: a write error (disk full, ...), or under --strict a failed image."""
    if "write_error" in result:
        raise RunError(f"{result['write_error']} (the run stopped; make room and run the same command again "
                       "to resume)")
    stopped = result.get("stopped_at")
    if strict and (stopped or result["failed"]):
        where = f"image {stopped['image_id']} ({stopped['path']})" if stopped else f"shard {result['shard']}"
        raise StrictStop(f"--strict: {where} could not be explained: {result['reasons'][0]}")


def _imagenet_names() -> list[str]:
    from .classes import imagenet_classes

    return list(imagenet_classes().names)


def _shard_matches(layout: RunLayout, index: int, shard: list[ImageRecord]) -> bool:
    """A shard is done when its files exist and hold exactly its images (a shorter last shard of a run with a
    smaller limit is redone when the limit grows)."""
    if not layout.shard_done(index):
        return False
    try:
        ids = (pq.read_table(layout.stats_shard(index), columns=["image_id"]).column(0).to_pylist()
               + pq.read_table(layout.failure_shard(index), columns=["image_id"]).column(0).to_pylist())
    except (OSError, pa.ArrowException):
        return False
    return sorted(ids) == sorted(record.image_id for record in shard)


def _previous_manifest(layout: RunLayout) -> dict:
    try:
        return json.loads(layout.manifest.read_text()) if layout.manifest.is_file() else {}
    except (OSError, ValueError):
        return {}


def _finish(out: Path, config: RunConfig, shards, weights: str, warning: str | None, sidecar: dict,
            started: float, work: dict) -> dict:
    """Virtual dataset, failures, manifest and _SUCCESS. Each shard's provenance (the worker that wrote it and
    the invocation) comes from the invocation that wrote it: a resumed or repeated run keeps earlier entries."""
    import h5py

    layout = RunLayout(out)
    previous = _previous_manifest(layout)
    earlier = {e.get("shard"): e for e in previous.get("shards", []) if isinstance(e, dict)}
    invocation = len(previous.get("invocations", [])) + 1
    rows, entries, failures = [], [], []
    for index in range(len(shards)):
        h5, stats, failed = layout.relevance_shard(index), layout.stats_shard(index), layout.failure_shard(index)
        with h5py.File(h5, "r") as handle:
            count = handle["relevance"].shape[0]
        rows.append(count)
        failures.append(pq.read_table(failed))
        entry = {"shard": index, "images": len(shards[index]), "explained": count,
                 "failed": failures[-1].num_rows, "relevance": layout.relative(h5),
                 "relevance_sha256": sha256(h5), "stats": layout.relative(stats),
                 "stats_sha256": sha256(stats), "worker": None, "invocation": None}
        if index in work.get("workers", {}):
            entry.update(worker=work["workers"][index], invocation=invocation)
        elif (old := earlier.get(index)) and old.get("stats_sha256") == entry["stats_sha256"]:
            entry.update(worker=old.get("worker"), invocation=old.get("invocation", 1))
        entries.append(entry)
    write_virtual_dataset(layout.virtual_dataset, [layout.relevance_shard(i) for i in range(len(shards))],
                          rows, config.size, config.size, config.map_dtype)
    all_failures = pa.concat_tables(failures) if failures else FAILURE_SCHEMA.empty_table()
    with atomic(layout.failures) as tmp:
        pq.write_table(all_failures, tmp)
    explained, failed = sum(rows), all_failures.num_rows
    seconds = time.time() - started
    import torch

    this = {"invocation": invocation, "started": started, "seconds": seconds,
            "shards_explained": sorted(work.get("workers", {})),
            "retries": work.get("retries", {"total": 0}),
            **{k: v for k, v in work.items() if k not in ("retries", "workers")}}
    invocations = [*previous.get("invocations", []), this]
    manifest = {
        "config": asdict(config), "digest": config.digest(),
        "weights": sidecar["metadata"]["weights"], "random_weights": weights == "random",
        "weights_warning": warning, "artifact": sidecar["metadata"],
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     **sidecar["metadata"]["versions"]},
        "dataset": work.get("dataset"),
        "totals": {"images": sum(len(s) for s in shards), "explained": explained, "failed": failed},
        "failure_reasons": _reason_counts(all_failures),
        "retries": _summed_retries(invocations),
        "precision": _precision(out),
        "shards": entries,
        "timings": {"seconds_this_invocation": seconds,
                    "seconds_all_invocations": sum(i.get("seconds", 0.0) for i in invocations),
                    **{k: v for k, v in work.items() if k not in ("retries", "workers", "dataset")}},
        "invocations": invocations,
    }
    with atomic(layout.manifest) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, default=str))
    with atomic(layout.success) as tmp:
        tmp.write_text("")
    return manifest


def _summed_retries(invocations: list[dict]) -> dict:
    """Retries over every invocation of the run (each invocation's own counts are in `invocations`)."""
    total: dict = {"total": 0}
    for item in invocations:
        for key, value in (item.get("retries") or {}).items():
            if isinstance(value, (int, float)) and key != "timeout_s":
                total[key] = total.get(key, 0) + value
            elif key == "timeout_s":
                total[key] = value
    return total


def _precision(out: Path) -> dict:
    """The precision probe the actor of shard 0 wrote (it stays with the run when a later invocation resumes)."""
    path = RunLayout(out).precision
    if path.is_file():
        return json.loads(path.read_text())
    return {"reference": "float64-cpu", "images": 0, "error": "no image of shard 0 was explained"}


def _reason_counts(failures: pa.Table) -> dict[str, int]:
    counts: dict[str, int] = {}
    for reason in failures.column("reason").to_pylist() if failures.num_rows else []:
        key = reason.split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    return counts

