"""Reliability soak: a few thousand tiny images, a few percent of them broken, explained twice side by side —
once undisturbed, once with an actor SIGKILLed on a timer. Reports images lost (must be 0), duplicated (must be
0), broken images recorded, retries, whether the maps equal the clean run's, and the throughput cost of the
faults. Prints a table and writes JSON.

    python -m bench.reliability_soak [--images 2000] [--broken 0.03] [--kill-at 0.4] [--out PATH]
"""
from __future__ import annotations

import argparse
import os
import signal
import tempfile
import threading
import warnings
from pathlib import Path

import pandas as pd

from bench import write_results
from bench.fault_tools import actor_processes, make_images, read_run

DEFAULT_OUT = Path("bench/results/reliability.json")


def run(dataset: Path, out: Path, cache: Path, args: argparse.Namespace) -> dict:
    from pipeline.config import load_config
    from pipeline.run import explain

    config = load_config({"dataset": str(dataset), "model": args.model, "weights": "random", "size": args.size,
                          "batch_size": args.batch, "shard_size": args.shard_size, "actors": args.actors,
                          "map_dtype": "float32", "out": str(out), "cache": str(cache)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return explain(config, progress=False)


def kill_one_actor_after(delay_s: float, killed: list[int]) -> threading.Timer:
    """SIGKILL one of this process's ShardExplainer actors after `delay_s` seconds."""
    def kill() -> None:
        victims = actor_processes(ancestor=os.getpid())
        if victims:
            os.kill(victims[0], signal.SIGKILL)
            killed.append(victims[0])

    timer = threading.Timer(delay_s, kill)
    timer.start()
    return timer


def audit(out: Path, manifest: dict, expected_ids: list[str], broken_ids: set[str]) -> dict:
    _, stats, failures = read_run(out)
    ids = stats.image_id.tolist() + failures.image_id.tolist()
    seconds = manifest["timings"]["explain_seconds"]
    return {
        "images": len(expected_ids), "explained": len(stats), "failed": len(failures),
        "failed_broken": int(failures.image_id.isin(broken_ids).sum()),
        "failed_other": int((~failures.image_id.isin(broken_ids)).sum()),
        "lost": len(set(expected_ids) - set(ids)), "duplicated": len(ids) - len(set(ids)),
        "retries": manifest["retries"].get("total", 0), "crashed": manifest["retries"].get("crashed", 0),
        "seconds": seconds, "images_per_second": len(expected_ids) / seconds,
    }


def _cell(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--broken", type=float, default=0.03, help="fraction of files that are not images")
    parser.add_argument("--kill-at", type=float, default=0.4, help="kill an actor at this fraction of the clean "
                                                                   "run's time")
    parser.add_argument("--model", default="vgg11")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    import ray

    every = max(1, round(1 / args.broken)) if args.broken > 0 else 0
    broken = tuple(range(every // 2, args.images, every)) if every else ()
    expected_ids = [f"img{i:05d}" for i in range(args.images)]
    broken_ids = {expected_ids[i] for i in broken}
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        work = Path(tmp)
        dataset = make_images(work / "images", args.images, broken=broken)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            clean_manifest = run(dataset, work / "clean", work / "cache", args)
            clean = audit(work / "clean", clean_manifest, expected_ids, broken_ids)
            killed: list[int] = []
            timer = kill_one_actor_after(args.kill_at * clean["seconds"], killed)
            faulty_manifest = run(dataset, work / "faulty", work / "cache", args)
            timer.cancel()
            faulty = audit(work / "faulty", faulty_manifest, expected_ids, broken_ids)
            faulty["actors_killed"] = len(killed)
            clean_maps, clean_stats, _ = read_run(work / "clean")
            faulty_maps, faulty_stats, _ = read_run(work / "faulty")
            faulty["maps_equal_clean"] = clean_maps.tobytes() == faulty_maps.tobytes()
            faulty["stats_equal_clean"] = clean_stats.equals(faulty_stats)
        finally:
            ray.shutdown()
    result = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "broken_images": len(broken), "clean": clean, "faulty": faulty,
              "throughput_ratio": faulty["images_per_second"] / clean["images_per_second"]}
    rows = ["images", "explained", "failed", "failed_broken", "failed_other", "lost", "duplicated", "retries",
            "crashed", "actors_killed", "maps_equal_clean", "stats_equal_clean", "seconds", "images_per_second"]
    table = pd.DataFrame({name: [_cell(run.get(row, "-")) for row in rows] for name, run in
                          (("clean", clean), ("faulty", faulty))}, index=rows)
    print(f"reliability soak: {args.images} images {args.size}x{args.size}, {len(broken)} broken, {args.model}, "
          f"{args.actors} actors, shards of {args.shard_size}; one actor SIGKILLed at {args.kill_at:.0%} of the "
          "clean run's time")
    print(table.to_string())
    print(f"throughput with the fault: {result['throughput_ratio']:.0%} of the clean run's")
    write_results(args.out, result)
    assert faulty["lost"] == 0 and faulty["duplicated"] == 0 and faulty["failed_other"] == 0, "images lost"
    return result


if __name__ == "__main__":
    main()
