"""The driver: config -> records -> fixed shards -> Ray actors -> progress -> virtual dataset, manifest, _SUCCESS.

The driver never touches pixels; actors never decide what to do next. A shard is done when its statistics file
exists (written last, atomically); running the same command again skips done shards and redoes the rest.
"""
from __future__ import annotations

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

from lrp_module.zoo import WeightsError, build_vgg, default_weights, weights_file

from .artifact_trust import record_trust, untrusted_reason
from .classes import check_classes
from .config import RunConfig
from .datasets import load_records
from .datasets.records import ImageRecord
from .output_checks import check_free_space, check_writable
from .writers import (FAILURE_SCHEMA, atomic, commit, sha256, shard_name, temporary, write_failed_shard,
                      write_virtual_dataset)

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
        build_vgg(config.model, trained)
        return trained, None
    except WeightsError as error:
        return "random", f"{RANDOM_WARNING} ({error})"


def cached_artifact(config: RunConfig, weights: str) -> tuple[Path, dict]:
    """The traced LRP module for this configuration, built (and verified) once, reused by later runs."""
    from export.artifacts import ExportConfig, export_artifacts

    source = weights_file(config.model, weights)
    if source is not None:  # a state-dict file: key by content, so a replaced file is never served stale
        from lrp_module.zoo import sha256_file

        weights_key = f"{source.stem}-{sha256_file(source)[:12]}"
    else:
        weights_key = weights
    key = f"{config.model}-{config.composite}-k{config.top_k}-{config.size}-{weights_key}"
    directory = Path(config.cache) / key
    artifact, sidecar = directory / "lrp.torchscript.pt", directory / "lrp.json"
    if artifact.is_file() and sidecar.is_file():
        reason = untrusted_reason([artifact, sidecar])
        if reason:  # never load TorchScript this project did not build: rebuild it
            print(f"rebuilding the cached artifact {artifact}: {reason}", file=sys.stderr, flush=True)
            artifact.unlink()
    if not (artifact.is_file() and sidecar.is_file()):
        export = ExportConfig(model=config.model, weights=weights, composite=config.composite, top_k=config.top_k,
                              height=config.size, width=config.size, formats=("torchscript",))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_artifacts(export, directory, verify=True)
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
    name = shard_name(index)
    return all((out / sub / f"{name}{ext}").is_file()
               for sub, ext in (("relevance", ".h5"), ("failures", ".parquet"), ("stats", ".parquet")))


def _prepare_run_dir(out: Path, config: RunConfig, overwrite: bool) -> None:
    run_file = out / "run.json"
    if run_file.is_file():
        previous = json.loads(run_file.read_text())
        if previous.get("digest") != config.digest():
            if not overwrite:
                changed = sorted(k for k, v in config.identity().items() if previous["identity"].get(k) != v)
                raise RunError(f"{out} holds a run with another configuration (differs in {', '.join(changed)}); "
                               "use --overwrite or another OUT")
            shutil.rmtree(out)
    try:
        for sub in ("relevance", "stats", "failures"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        for leftover in out.rglob(".tmp-*"):  # a killed run's unfinished files
            leftover.unlink()
        tmp = temporary(run_file)
        tmp.write_text(json.dumps({"digest": config.digest(), "identity": config.identity()}, indent=2))
        commit(tmp, run_file)
    except OSError as error:
        raise RunError(f"run directory {out} is not writable: {error.strerror or error}") from None


def _start_ray():
    import ray

    if ray.is_initialized():
        return ray, False
    address = os.environ.get("RAY_ADDRESS")
    ray.init(address=address or None, num_cpus=None if address else os.cpu_count(), include_dashboard=False,
             configure_logging=False, log_to_driver=False)
    return ray, True


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
    records = load_records(config.root, config.layout)
    if config.limit:
        records = records[:config.limit]
    if not records:
        raise RunError(f"{config.root}: no images to explain")
    check_writable(out)  # before anything is written, the artifact cache included
    shards = shards_of(records, config.shard_size)
    if check_space:
        remaining = sum(len(shard) for i, shard in enumerate(shards) if not shard_done(out, i))
        check_free_space(out, remaining, config.size, config.map_dtype, config.compression)
    weights, weights_warning = resolve_weights(config)
    if weights_warning:
        print(f"\n{'!' * 100}\n{weights_warning}\n{'!' * 100}\n", file=sys.stderr, flush=True)
    artifact, sidecar = cached_artifact(config, weights)  # missing weights fail here, before the run dir exists
    check_classes(records, sidecar["metadata"].get("class_names") or _imagenet_names(), config.model, config.root)
    classifier = cached_classifier(config, weights, artifact) if config.faithfulness else None
    _prepare_run_dir(out, config, overwrite)
    todo = [i for i in range(len(shards)) if not shard_done(out, i)]
    metadata = sidecar["metadata"]
    settings = {
        "batch_size": config.batch_size, "size": config.size, "map_dtype": config.map_dtype,
        "compression": config.compression, "target": config.target, "decode_threads": config.decode_threads,
        "precision": config.precision, "strict": strict,
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
    return _finish(out, config, shards, weights, weights_warning, sidecar, started, work)


def _run_shards(config: RunConfig, artifact: Path, settings: dict, shards: list[list[ImageRecord]],
                todo: list[int], out: Path, strict: bool, progress: bool) -> dict:
    """Feed the unfinished shards to actors through the fault-tolerant scheduler (pipeline/scheduler.py), with a
    progress bar. Returns what the manifest records of this work: images, seconds, actors' peak memory, retries,
    and which node / process explained each shard."""
    from tqdm import tqdm

    from .scheduler import SchedulingError, ShardScheduler
    from .worker import ShardExplainer

    ray, started_ray = _start_ray()
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
        for leftover in out.rglob(".tmp-*"):  # files dead actors had begun
            leftover.unlink(missing_ok=True)
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


def _finish(out: Path, config: RunConfig, shards, weights: str, warning: str | None, sidecar: dict,
            started: float, work: dict) -> dict:
    import h5py

    rows, entries, failures = [], [], []
    for index in range(len(shards)):
        name = shard_name(index)
        h5, stats, failed = (out / "relevance" / f"{name}.h5", out / "stats" / f"{name}.parquet",
                             out / "failures" / f"{name}.parquet")
        with h5py.File(h5, "r") as handle:
            count = handle["relevance"].shape[0]
        rows.append(count)
        failures.append(pq.read_table(failed))
        entries.append({"shard": index, "images": len(shards[index]), "explained": count,
                        "failed": failures[-1].num_rows, "relevance": f"relevance/{name}.h5",
                        "relevance_sha256": sha256(h5), "stats": f"stats/{name}.parquet",
                        "stats_sha256": sha256(stats), "worker": work.get("workers", {}).get(index)})
    write_virtual_dataset(out / "relevance.h5", [out / "relevance" / f"{shard_name(i)}.h5" for i in range(len(shards))],
                          rows, config.size, config.size, config.map_dtype)
    all_failures = pa.concat_tables(failures) if failures else FAILURE_SCHEMA.empty_table()
    with atomic(out / "failures.parquet") as tmp:
        pq.write_table(all_failures, tmp)
    explained, failed = sum(rows), all_failures.num_rows
    seconds = time.time() - started
    import torch

    manifest = {
        "config": asdict(config), "digest": config.digest(),
        "weights": sidecar["metadata"]["weights"], "random_weights": weights == "random",
        "weights_warning": warning, "artifact": sidecar["metadata"],
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     **sidecar["metadata"]["versions"]},
        "totals": {"images": sum(len(s) for s in shards), "explained": explained, "failed": failed},
        "failure_reasons": _reason_counts(all_failures),
        "retries": work.get("retries", {"total": 0}),
        "precision": _precision(out),
        "shards": entries,
        "timings": {"seconds_this_invocation": seconds,
                    **{k: v for k, v in work.items() if k not in ("retries", "workers")}},
    }
    with atomic(out / "manifest.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, default=str))
    with atomic(out / "_SUCCESS") as tmp:
        tmp.write_text("")
    return manifest


def _precision(out: Path) -> dict:
    """The precision probe the actor of shard 0 wrote (it stays with the run when a later invocation resumes)."""
    from .worker import PROBE_FILE

    path = out / PROBE_FILE
    if path.is_file():
        return json.loads(path.read_text())
    return {"reference": "float64-cpu", "images": 0, "error": "no image of shard 0 was explained"}


def _reason_counts(failures: pa.Table) -> dict[str, int]:
    counts: dict[str, int] = {}
    for reason in failures.column("reason").to_pylist() if failures.num_rows else []:
        key = reason.split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    return counts

