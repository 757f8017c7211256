"""Pipeline throughput and memory, side by side in one run: end-to-end images/s (decode, Ray, writing) against
bare LRPModel on the same preprocessed images; driver and actor peak memory at two dataset sizes; stored bytes
per map. Prints a table and writes JSON.

    python -m bench.pipeline_speed [--images 256] [--flat-small 256] [--flat-large 4096] [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

DEFAULT_OUT = Path("bench/results/pipeline_speed.json")


def make_images(root: Path, count: int, size: tuple[int, int], seed: int = 0) -> Path:
    """A plain folder of JPEGs: smooth random colour fields (compress and decode like photographs, not noise)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize(size, Image.BICUBIC)
        image.save(root / f"img{i:06d}.jpg", quality=90)
    return root


def run_pipeline(dataset: Path, out: Path, cache: Path, model: str, size: int, batch: int) -> dict:
    from pipeline.config import load_config
    from pipeline.run import explain

    config = load_config({"dataset": str(dataset), "model": model, "weights": "random", "size": size,
                          "batch_size": batch, "shard_size": 64, "out": str(out), "cache": str(cache)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return explain(config, progress=False)


def bare_lrp(dataset: Path, model: str, size: int, batch: int) -> float:
    """images/s of LRPModel alone on already preprocessed images (the ceiling for the pipeline)."""
    from lrp_module import LRPModel
    from lrp_module.zoo import build_vgg
    from pipeline.datasets import load_records
    from pipeline.preprocess import Preprocessing, load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lrp = LRPModel(build_vgg(model, "random")[0], "epsilon_gamma_box")
    prep = Preprocessing(resize=round(size * 256 / 224), crop=size)
    x = torch.stack([load(r, prep)[0] for r in load_records(dataset)])
    lrp.explain(x[:batch])
    start = time.perf_counter()
    for i in range(0, len(x), batch):
        lrp.explain(x[i:i + batch])
    return len(x) / (time.perf_counter() - start)


def _memory_probe(dataset: str, out: str, cache: str) -> None:
    """In a fresh process: one pipeline run on a small VGG; prints driver and actor peak RSS in MB."""
    manifest = run_pipeline(Path(dataset), Path(out), Path(cache), "vgg11", 32, 16)
    driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"driver_peak_mb": driver, "actor_peak_mb": manifest["timings"]["actor_peak_rss_mb"]}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--flat-small", type=int, default=256)
    parser.add_argument("--flat-large", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--memory-probe", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe:
        _memory_probe(*args.memory_probe)
        return 0
    import ray

    report: dict = {"setup": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as scratch:
        scratch = Path(scratch)
        data = make_images(scratch / "images", args.images, (320, 240))
        ray.init(num_cpus=None, include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            run_pipeline(data, scratch / "warm", scratch / "cache", args.model, args.size, args.batch)  # builds
            manifest = run_pipeline(data, scratch / "run", scratch / "cache", args.model, args.size, args.batch)
        finally:
            ray.shutdown()
        bare = bare_lrp(data, args.model, args.size, args.batch)
        timings = manifest["timings"]
        stored = sum(p.stat().st_size for p in (scratch / "run" / "relevance").glob("*.h5")) / args.images
        report["throughput"] = {"pipeline_images_per_s": timings["images_per_second"],
                                "pipeline_wall_images_per_s": args.images / timings["seconds_this_invocation"],
                                "bare_lrp_images_per_s": bare,
                                "ratio": timings["images_per_second"] / bare,
                                "stored_bytes_per_map": stored}
        memory = {}
        for count in (args.flat_small, args.flat_large):
            folder = make_images(scratch / f"flat{count}", count, (48, 48))
            command = [sys.executable, "-m", "bench.pipeline_speed", "--memory-probe", str(folder),
                       str(scratch / f"flat-run{count}"), str(scratch / "cache-small")]
            result = subprocess.run(command, capture_output=True, text=True, timeout=3600)
            if result.returncode != 0:
                raise SystemExit(result.stderr[-2000:])
            memory[count] = json.loads(result.stdout.strip().splitlines()[-1])
        report["memory"] = memory
    small, large = memory[args.flat_small], memory[args.flat_large]
    targets = [
        {"target": "end-to-end images/s >= 85 % of bare LRPModel", "value": round(report["throughput"]["ratio"], 3),
         "met": report["throughput"]["ratio"] >= 0.85},
        {"target": f"driver peak memory {args.flat_large} vs {args.flat_small} images within 10 %",
         "value": round(large["driver_peak_mb"] / small["driver_peak_mb"], 3),
         "met": large["driver_peak_mb"] <= 1.1 * small["driver_peak_mb"]},
        {"target": f"actor peak memory {args.flat_large} vs {args.flat_small} images within 10 %",
         "value": round(large["actor_peak_mb"] / small["actor_peak_mb"], 3),
         "met": large["actor_peak_mb"] <= 1.1 * small["actor_peak_mb"]},
        {"target": "stored size per map <= 60 KB", "value": round(stored / 1024, 1), "met": stored <= 60 * 1024},
    ]
    report["targets"] = targets
    t = report["throughput"]
    print(f"\n{args.model} {args.size}x{args.size}, batch {args.batch}, {args.images} images, {torch.get_num_threads()} threads")
    print(f"  pipeline (actors, decode, write)  {t['pipeline_images_per_s']:.2f} images/s "
          f"({t['pipeline_wall_images_per_s']:.2f} with start-up)")
    print(f"  bare LRPModel                     {t['bare_lrp_images_per_s']:.2f} images/s")
    print(f"  stored per map                    {stored / 1024:.1f} KB")
    for count, row in memory.items():
        print(f"  vgg11 32x32, {count:>5d} images: driver peak {row['driver_peak_mb']:.0f} MB, "
              f"actor peak {row['actor_peak_mb']:.0f} MB")
    print("\ntargets:")
    for target in targets:
        print(f"  [{'met' if target['met'] else 'MISSED'}] {target['target']}: {target['value']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
