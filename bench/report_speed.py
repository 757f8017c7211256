"""Report generation for a 50,000-image run: a synthetic run with the pipeline's real layout (Parquet statistics and
HDF5 map shards of 64 images, 224x224 float16 maps, 1,000 classes, boxes, faithfulness columns, failures; JPEG
files behind the paths), then the report timed phase by phase. Prints a table and writes JSON.

Maps are declared for every row but written only for the rows the report shows (what it reads); the rest are
unwritten HDF5 chunks, so the benchmark needs megabytes, not the 2 GB of a real run.

    python -m bench.report_speed [--images 50000] [--classes 1000] [--per-class 1] [--gallery 12] [--out PATH]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench import write_results
from bench.synthetic_run import stats_table, synthesise_run
from pipeline.report import build_report, selection

DEFAULT_OUT = Path("bench/results/report_speed.json")
TARGET_SECONDS = 30.0
SHARD_SIZE = 64
SIZE = 224


def make_photos(folder: Path, count: int, seed: int = 0) -> list[str]:
    """320x240 JPEGs (smooth colour fields, decode like photographs) that the run's paths cycle through."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        small = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
        path = folder / f"photo{i:04d}.jpg"
        Image.fromarray(small).resize((320, 240), Image.BICUBIC).save(path, quality=90)
        paths.append(str(path))
    return paths


def shown_rows(gallery: int, per_class: int):
    """The rows the report will show (the same selection functions), so the run has maps exactly there."""
    import pandas as pd

    def pick(stats):
        return pd.concat([selection.most_confident_errors(stats, gallery),
                          selection.least_confident_correct(stats, gallery),
                          selection.per_class_sample(stats, per_class, by_label=True)])
    return pick


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--photos", type=int, default=200, help="distinct JPEG files behind the paths")
    parser.add_argument("--per-class", type=int, default=1)
    parser.add_argument("--gallery", type=int, default=12)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-report-") as scratch:
        scratch = Path(scratch)
        begun = time.perf_counter()
        photos = make_photos(scratch / "photos", args.photos)
        table = stats_table(args.images, args.classes, photos, labelled=True, boxes=True, faithfulness=True,
                            shard_size=SHARD_SIZE, size=SIZE)
        run = synthesise_run(scratch / "run", table, size=SIZE, shard_size=SHARD_SIZE, failures=25,
                             maps_for=shown_rows(args.gallery, args.per_class))
        setup_seconds = time.perf_counter() - begun
        shards = len(list((run / "relevance").glob("*.h5")))
        stats_bytes = sum(p.stat().st_size for p in (run / "stats").glob("*.parquet"))
        timings: dict[str, float] = {}
        build_report(run, per_class=args.per_class, gallery=args.gallery, timings=timings)
        report_dir = run / "report"
        tiles = len(list((report_dir / "img").glob("*-heatmap.png")))
        report_bytes = sum(p.stat().st_size for p in report_dir.rglob("*") if p.is_file())

    result = {
        "setup": {"images": args.images, "classes": args.classes, "shards": shards, "shard_size": SHARD_SIZE,
                  "map_size": SIZE, "photos": args.photos, "per_class": args.per_class, "gallery": args.gallery,
                  "cpus": os.cpu_count(), "stats_mb": round(stats_bytes / 2**20, 1),
                  "synthesis_seconds": round(setup_seconds, 1)},
        "images_shown": tiles,
        "report_mb": round(report_bytes / 2**20, 1),
        "seconds": {k: round(v, 3) for k, v in timings.items()},
        "target": {"target": f"report of a {args.images:,}-image run in < {TARGET_SECONDS:.0f} s",
                   "value": round(timings["total"], 2), "met": timings["total"] < TARGET_SECONDS},
    }
    print(f"\nreport of a synthetic run: {args.images:,} images, {args.classes:,} classes, {shards} shards "
          f"({result['setup']['stats_mb']} MB statistics), {os.cpu_count()} CPUs")
    print(f"{'phase':<20}{'seconds':>10}")
    for phase, seconds in timings.items():
        print(f"{phase:<20}{seconds:>10.2f}")
    print(f"{tiles:,} images shown, report {result['report_mb']} MB")
    target = result["target"]
    print(f"\n[{'met' if target['met'] else 'MISSED'}] {target['target']}: {target['value']} s")
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
