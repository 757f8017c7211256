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

from .classes import check_classes
from .config import RunConfig
from .datasets import load_records
from .datasets.records import ImageRecord
from .writers import FAILURE_SCHEMA, commit, sha256, shard_name, temporary, write_virtual_dataset

RANDOM_WARNING = ("NO IMAGENET WEIGHTS: this run uses RANDOM weights; its maps say nothing about a trained "
                  "model. Put the torchvision checkpoint in the torch hub cache, or pass WEIGHTS=<file>.")


class RunError(RuntimeError):
    """The run cannot start or finish; the message says why."""


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
    if not (artifact.is_file() and sidecar.is_file()):
        export = ExportConfig(model=config.model, weights=weights, composite=config.composite, top_k=config.top_k,
                              height=config.size, width=config.size, formats=("torchscript",))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_artifacts(export, directory, verify=True)
    return artifact, json.loads(sidecar.read_text())


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


def explain(config: RunConfig, overwrite: bool = False, strict: bool = False, progress: bool = True) -> dict:
    """Run the job; returns the manifest. Raises RunError (or DatasetError / WeightsError) before writing when
    the configuration cannot work."""
    started = time.time()
    out = Path(config.out)
    records = load_records(config.root, config.layout)
    if config.limit:
        records = records[:config.limit]
    if not records:
        raise RunError(f"{config.root}: no images to explain")
    weights, weights_warning = resolve_weights(config)
    if weights_warning:
        print(f"\n{'!' * 100}\n{weights_warning}\n{'!' * 100}\n", file=sys.stderr, flush=True)
    artifact, sidecar = cached_artifact(config, weights)  # missing weights fail here, before the run dir exists
    check_classes(records, sidecar["metadata"].get("class_names") or _imagenet_names(), config.model, config.root)
    _prepare_run_dir(out, config, overwrite)
    shards = shards_of(records, config.shard_size)
    todo = [i for i in range(len(shards)) if not shard_done(out, i)]
    metadata = sidecar["metadata"]
    settings = {
        "batch_size": config.batch_size, "size": config.size, "map_dtype": config.map_dtype,
        "compression": config.compression, "target": config.target, "decode_threads": config.decode_threads,
        "tf32": config.tf32, "class_names": metadata.get("class_names") or _imagenet_names(),
        "attributes": {"config": asdict(config), "lrp": {k: metadata[k] for k in ("composite", "top_k", "weights")}},
    }
    work = _run_shards(config, artifact, settings, shards, todo, out, strict, progress) if todo else {}
    return _finish(out, config, shards, weights, weights_warning, sidecar, started, work)


def _run_shards(config: RunConfig, artifact: Path, settings: dict, shards: list[list[ImageRecord]],
                todo: list[int], out: Path, strict: bool, progress: bool) -> dict:
    """Feed the unfinished shards to a pool of actors, one shard in flight per actor, with a progress bar.
    Returns what the manifest records of this work: images, seconds, the actors' peak memory."""
    from ray.util import ActorPool
    from tqdm import tqdm

    from .worker import ShardExplainer

    ray, started_ray = _start_ray()
    try:
        count, options, device, threads = _actor_plan(ray, config)
        settings = {**settings, "device": device, "threads": threads}
        remote = ray.remote(ShardExplainer).options(max_restarts=2, max_task_retries=2, **options)
        pool = ActorPool([remote.remote(str(artifact.resolve()), settings) for _ in range(min(count, len(todo)))])
        total = sum(len(s) for s in shards)
        done = total - sum(len(shards[i]) for i in todo)
        failed, peak, begun = 0, 0.0, time.time()
        with tqdm(total=total, initial=done, unit="img", disable=not progress, desc="explain",
                  dynamic_ncols=True) as bar:
            for result in pool.map_unordered(
                    lambda actor, i: actor.explain_shard.remote(i, shards[i], str(out.resolve())), todo):
                failed += result["failed"]
                peak = max(peak, result["peak_rss_mb"])
                bar.update(result["explained"] + result["failed"])
                bar.set_postfix(failed=failed)
                if strict and result["failed"]:
                    raise RunError(f"--strict: shard {result['shard']} had failures: {result['reasons'][0]}")
        images = sum(len(shards[i]) for i in todo)
        seconds = time.time() - begun
        return {"images_this_invocation": images, "explain_seconds": seconds,
                "images_per_second": images / seconds if seconds else None, "actor_peak_rss_mb": peak}
    finally:
        if started_ray:
            ray.shutdown()


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
                        "stats_sha256": sha256(stats)})
    write_virtual_dataset(out / "relevance.h5", [out / "relevance" / f"{shard_name(i)}.h5" for i in range(len(shards))],
                          rows, config.size, config.size, config.map_dtype)
    all_failures = pa.concat_tables(failures) if failures else FAILURE_SCHEMA.empty_table()
    tmp = temporary(out / "failures.parquet")
    pq.write_table(all_failures, tmp)
    commit(tmp, out / "failures.parquet")
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
        "shards": entries,
        "timings": {"seconds_this_invocation": seconds, **work},
    }
    tmp = temporary(out / "manifest.json")
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    commit(tmp, out / "manifest.json")
    (out / "_SUCCESS").write_text("")
    return manifest


def _reason_counts(failures: pa.Table) -> dict[str, int]:
    counts: dict[str, int] = {}
    for reason in failures.column("reason").to_pylist() if failures.num_rows else []:
        key = reason.split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    return counts

