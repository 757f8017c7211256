"""A synthetic run directory with the pipeline's real file layout and schema (stats/shard-*.parquet,
relevance/shard-*.h5, failures.parquet, manifest.json), for the report's tests and benchmark: any size, with or
without labels, boxes, failures and faithfulness columns, maps written for all rows or only for chosen ones."""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.layout import shard_name
from pipeline.schema import FAILURE_SCHEMA, STATS_SCHEMA, failure_row

CURVE_STEPS = 9


def smooth_map(rng: np.random.Generator, size: int) -> np.ndarray:
    """A relevance-like map: a few positive and negative Gaussian blobs."""
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    relevance = np.zeros((size, size), np.float32)
    for sign in (1.0, 1.0, -0.5):
        r, c, width = rng.uniform(0, size, 2).tolist() + [rng.uniform(size / 10, size / 4)]
        relevance += sign * np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * width ** 2))
    return relevance * 1e-3


def stats_table(n: int, classes: int, image_paths: Sequence[str], labelled: bool = True, boxes: bool = False,
                faithfulness: bool = False, shard_size: int = 64, size: int = 32, seed: int = 0) -> pa.Table:
    """n rows of the real statistics schema with plausible values (accuracy about 0.7)."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, classes, n)
    correct = rng.random(n) < 0.7
    pred = np.where(correct, label, (label + rng.integers(1, max(classes, 2), n)) % max(classes, 2))
    probability = np.where(correct, rng.uniform(0.2, 1.0, n), rng.uniform(0.05, 0.9, n)).astype(np.float32)
    names = np.array([f"class {i}" for i in range(max(classes, 2))], dtype=object)
    def f32(low: float, high: float) -> np.ndarray:
        return rng.uniform(low, high, n).astype(np.float32)

    none = [None] * n
    columns = {
        "image_id": [f"img{i:07d}" for i in range(n)],
        "path": [image_paths[i % len(image_paths)] for i in range(n)],
        "wnid": [f"n{c:08d}" for c in label] if labelled else none,
        "label": label if labelled else none,
        "label_name": names[label] if labelled else none,
        "pred": pred, "pred_name": names[pred], "target": pred,
        "target_probability": probability, "target_logit": f32(0, 20),
        "pred_probability": probability, "pred_logit": f32(0, 20),
        "top5": [[int(p)] + [int(p + k) % max(classes, 2) for k in range(1, 5)] for p in pred],
        "correct": correct if labelled else none,
        "relevance_sum": f32(0, 2), "positive_sum": f32(1, 3), "negative_sum": f32(-1, 0), "max_abs": f32(0, 1),
        "positive_in_top1pct": f32(0, 0.2), "positive_in_top5pct": f32(0.1, 0.5),
        "positive_in_top10pct": f32(0.2, 0.7), "gini": f32(0.3, 0.9), "entropy": f32(0.6, 1.0),
        "centre_row": f32(0, size), "centre_col": f32(0, size),
        "pointing_game_hit": rng.random(n) < 0.6 if boxes else none,
        "positive_in_box": f32(0, 1) if boxes else none,
        "shard": [f"relevance/{shard_name(i // shard_size)}.h5" for i in range(n)],
        "row": np.arange(n) % shard_size,
        "seconds": f32(0.01, 0.02),
    }
    columns["conservation"] = f32(0.2, 1.1)
    columns["absorbed"] = (1 - columns["conservation"]).astype(np.float32)
    if faithfulness:
        morf = f32(0.2, 0.6)
        columns.update({
            "aopc_morf": morf, "aopc_random": (morf * 0.3).astype(np.float32),
            "flip_curve_morf": [np.linspace(1, 0, CURVE_STEPS, dtype=np.float32).tolist()] * n,
            "flip_curve_random": [np.linspace(1, 0.7, CURVE_STEPS, dtype=np.float32).tolist()] * n,
        })
    columns = {f.name: columns.get(f.name, none) for f in STATS_SCHEMA}  # a column added to the schema later: null
    return pa.Table.from_pydict(columns, schema=STATS_SCHEMA)


def synthesise_run(root: Path, table: pa.Table, size: int = 32, shard_size: int = 64,
                   maps_for: Callable[[pd.DataFrame], pd.DataFrame] | None = None, failures: int = 0,
                   random_weights: bool = True, seed: int = 0,
                   map_of: Callable[[int], np.ndarray] | None = None) -> Path:
    """Write the run: one stats Parquet and one HDF5 file per shard (maps declared for every row, written for the
    rows `maps_for` picks, all rows when None; row i's map is `map_of(i)`, a smooth random one when None),
    failures.parquet with `failures` rows, manifest.json."""
    rng = np.random.default_rng(seed)
    for sub in ("stats", "relevance", "failures"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    n = table.num_rows
    shards = max(1, (n + shard_size - 1) // shard_size)  # a run whose images all failed still has a shard
    chosen = None
    if maps_for is not None:
        frame = table.to_pandas()
        chosen = set(maps_for(frame)["image_id"])
    ids = table.column("image_id").to_pylist()
    failure_rows = [failure_row(f"broken{i}", f"/nowhere/broken{i}.jpg", "not an image (no known image format)", 0)
                    for i in range(failures)]
    for index in range(shards):
        start, stop = index * shard_size, min(n, (index + 1) * shard_size)
        pq.write_table(table.slice(start, stop - start), root / "stats" / f"{shard_name(index)}.parquet")
        with h5py.File(root / "relevance" / f"{shard_name(index)}.h5", "w") as handle:
            count = max(0, stop - start)
            chunked = {"chunks": (1, size, size), "compression": "gzip", "shuffle": True} if count else {}
            maps = handle.create_dataset("relevance", shape=(count, size, size), dtype="float16", **chunked)
            for row in range(stop - start):
                if chosen is None or ids[start + row] in chosen:
                    maps[row] = smooth_map(rng, size) if map_of is None else map_of(start + row)
        shard_failures = failure_rows if index == 0 else []
        pq.write_table(pa.Table.from_pylist(shard_failures, schema=FAILURE_SCHEMA),
                       root / "failures" / f"{shard_name(index)}.parquet")
    pq.write_table(pa.Table.from_pylist(failure_rows, schema=FAILURE_SCHEMA), root / "failures.parquet")
    manifest = {
        "config": {"dataset": "synthetic", "root": str(root), "model": "vgg11", "weights": "random",
                   "composite": "epsilon_gamma_box", "top_k": 0.0, "target": "predicted", "size": size,
                   "shard_size": shard_size, "map_dtype": "float16"},
        "weights": {"model": "vgg11", "kind": "random" if random_weights else "imagenet", "source": "seed=0",
                    "sha256": None},
        "random_weights": random_weights,
        "totals": {"images": n + failures, "explained": n, "failed": failures},
        "failure_reasons": {"not an image (no known image format)": failures} if failures else {},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (root / "_SUCCESS").write_text("")
    return root
