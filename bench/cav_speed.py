"""`make bench-cav`: the CAV audit of a 50,000-image run with C = 512 concepts (the issue's target: < 1 min), on a
synthetic run folder with the real layout (bench/synthetic_run.py, plus each shard's concept relevance as the
pipeline writes it): 1 % of the images carry a planted artifact direction, 100 of them are marked, the truth names
all. Times `cav_audit` end to end and by phase (read the vectors and the inputs; fit both CAVs and rank; every
channel's AUROC and the retrieval figures; write), with the process's peak memory, and checks that the planted
images were found. Prints a table and writes bench/results/cav_speed.json.

    python -m bench.cav_speed [--images 50000] [--channels 512] [--marked 100]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from bench.synthetic_run import stats_table, synthesise_run
from export.concepts import ConceptLayerRecord, ConceptsRecord
from pipeline.audit.cav_run import CavOptions, cav_audit
from pipeline.concepts.outputs import ATTRIBUTE, ConceptArrays, write_concepts
from pipeline.layout import RunLayout

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "cav_speed.json"
LAYER = "features.28"
SHARD_SIZE = 1024
ARTIFACT_SHARE = 0.01
TARGET_S = 60.0


def concept_run(root: Path, images: int, channels: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """A run folder of `images` images (no maps written: the audit reads none without masks) whose shards carry
    (N, channels) concept relevance at LAYER; returns the ids and which images carry the planted artifact."""
    table = stats_table(images, 10, ["/nowhere/image.jpg"], shard_size=SHARD_SIZE, size=8, seed=seed)
    synthesise_run(root, table, size=8, shard_size=SHARD_SIZE, maps_for=lambda frame: frame.iloc[:0], seed=seed)
    rng = np.random.default_rng(seed)
    spread = rng.uniform(0.2, 2.0, channels)
    direction = np.zeros(channels)
    direction[rng.choice(channels, 8, replace=False)] = 1.0
    artifact = rng.random(images) < ARTIFACT_SHARE
    record = ConceptsRecord((ConceptLayerRecord(LAYER, channels, 14, 14),), LAYER, 0, True)
    layout = RunLayout(root)
    all_ids = table.column("image_id").to_pylist()
    for index, start in enumerate(range(0, images, SHARD_SIZE)):
        stop = min(images, start + SHARD_SIZE)
        values = rng.normal(size=(stop - start, channels)) * spread + 1.5 * artifact[start:stop, None] * direction
        positions = np.zeros((stop - start, channels), np.int32)
        arrays = ConceptArrays({LAYER: values.astype(np.float32)}, {LAYER: positions})
        with h5py.File(layout.relevance_shard(index), "a") as handle:
            handle.create_dataset("image_id", data=np.array(all_ids[start:stop], dtype=object),
                                  dtype=h5py.string_dtype())
            write_concepts(handle, arrays, stop - start, "float16", 4)
            handle.attrs[ATTRIBUTE] = record.to_json()
    return all_ids, artifact


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cav_speed", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--marked", type=int, default=100, help="planted images marked (the rest found by the CAV)")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "run"
        started = time.perf_counter()
        ids, artifact = concept_run(root, args.images, args.channels)
        synthesis_s = time.perf_counter() - started
        planted = np.flatnonzero(artifact)
        pd.DataFrame({"image_id": np.array(ids)[planted[:args.marked]]}).to_csv(root.parent / "marked.csv", index=False)
        pd.DataFrame({"image_id": ids, "truth": artifact.astype(int)}).to_csv(root.parent / "truth.csv", index=False)
        baseline_mb = peak_mb()
        started = time.perf_counter()
        summary = cav_audit(root, CavOptions(layer=LAYER, marked=str(root.parent / "marked.csv"),
                                             truth=str(root.parent / "truth.csv")))
        total_s = time.perf_counter() - started
    retrieval = summary["truth"]["retrieval"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    result = {
        "images": args.images, "channels": args.channels, "planted": int(artifact.sum()), "marked": args.marked,
        "synthesis_s": round(synthesis_s, 1), "total_s": round(total_s, 2), "phases_s": summary["seconds"],
        "target_s": TARGET_S, "within_target": total_s < TARGET_S, "peak_mb": round(peak_mb(), 0),
        "peak_mb_before_audit": round(baseline_mb, 0),
        "auroc_unmarked": {name: entry["unmarked"]["auroc"] for name, entry in retrieval.items()},
        "load_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "commit": commit.stdout.strip(), "cpus": os.cpu_count(),
    }
    rows = [("read vectors, statistics, marks, truth", summary["seconds"]["read"]),
            ("fit both CAVs, score and rank", summary["seconds"]["fit_and_rank"]),
            ("channel AUROCs, retrieval", summary["seconds"]["measure"]),
            ("write the four files", summary["seconds"]["write"]),
            ("total (cav_audit)", round(total_s, 2))]
    print(f"CAV audit: {args.images} images, C = {args.channels}, {int(artifact.sum())} planted, {args.marked} marked "
          f"(synthetic run written in {synthesis_s:.0f} s)")
    print("| phase | seconds |\n|---|---|")
    for label, seconds in rows:
        print(f"| {label} | {seconds:.2f} |")
    verdict = "met" if result["within_target"] else "MISSED"
    print(f"target < {TARGET_S:.0f} s: {verdict}; peak {result['peak_mb']:.0f} MB "
          f"(before the audit {baseline_mb:.0f} MB); held-out AUROC " + ", ".join(
              f"{name} {value:.3f}" for name, value in result["auroc_unmarked"].items() if value is not None)
          + f"; load {result['load_1min']['before']} -> {result['load_1min']['after']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
