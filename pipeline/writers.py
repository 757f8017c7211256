"""Shard files: HDF5 relevance maps, Parquet statistics (explicit, documented schema), failures; the HDF5
virtual dataset over all shards. Every file is written under a temporary name and renamed when complete."""
from __future__ import annotations

import json
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lrp_module.files import atomic

from .layout import RunLayout, shard_name  # noqa: F401  (shard_name: re-exported)


def _field(name: str, kind: pa.DataType, doc: str, nullable: bool = True) -> pa.Field:
    return pa.field(name, kind, nullable=nullable, metadata={"doc": doc})


STATS_SCHEMA = pa.schema([
    _field("image_id", pa.string(), "image id (file stem), unique in the dataset", False),
    _field("path", pa.string(), "image file, or <shard.tar>::<member>", False),
    _field("wnid", pa.string(), "WordNet id of the label"),
    _field("label", pa.int64(), "ILSVRC class index of the label (torchvision's)"),
    _field("label_name", pa.string(), "class name of the label"),
    _field("pred", pa.int64(), "predicted class index", False),
    _field("pred_name", pa.string(), "predicted class name"),
    _field("target", pa.int64(), "class the map explains", False),
    _field("target_probability", pa.float32(), "softmax probability of the target class", False),
    _field("target_logit", pa.float32(), "logit of the target class", False),
    _field("pred_probability", pa.float32(), "softmax probability of the predicted class", False),
    _field("pred_logit", pa.float32(), "logit of the predicted class", False),
    _field("top5", pa.list_(pa.int64()), "the five highest-scoring classes, best first", False),
    _field("correct", pa.bool_(), "prediction equals label (null without label)"),
    _field("relevance_sum", pa.float32(), "sum of the map", False),
    _field("positive_sum", pa.float32(), "sum of the map's positive values", False),
    _field("negative_sum", pa.float32(), "sum of the map's negative values", False),
    _field("max_abs", pa.float32(), "largest absolute value of the map", False),
    _field("conservation", pa.float32(), "sum of the map / the start relevance (the target logit; 1 for a softmax "
           "start): the share of the decision the map explains (null when the start is 0)"),
    _field("absorbed", pa.float32(), "1 - conservation: the share absorbed on the way by biases, stabilisers and "
           "the top-k filter (negative where biases added relevance)"),
    _field("positive_in_top1pct", pa.float32(), "share of positive relevance in the top 1 % of pixels"),
    _field("positive_in_top5pct", pa.float32(), "share of positive relevance in the top 5 % of pixels"),
    _field("positive_in_top10pct", pa.float32(), "share of positive relevance in the top 10 % of pixels"),
    _field("gini", pa.float32(), "Gini sparsity of |relevance| (0 even, 1 one pixel)"),
    _field("entropy", pa.float32(), "entropy of positive relevance over pixels / log(pixels)"),
    _field("centre_row", pa.float32(), "row of the positive relevance's centre of mass (map pixels)"),
    _field("centre_col", pa.float32(), "column of the positive relevance's centre of mass (map pixels)"),
    _field("pointing_game_hit", pa.bool_(),
           "arg-max pixel inside a label box (null without boxes, or without positive relevance)"),
    _field("positive_in_box", pa.float32(), "relevance mass accuracy (Arras et al. 2022, 'sum,pos' pooling): positive "
           "relevance inside the label boxes / all positive relevance (null without boxes)"),
    _field("boxes", pa.list_(pa.list_(pa.float32())), "label boxes in map pixels, each [x_min, y_min, x_max, "
           "y_max] (null without boxes)"),
    _field("shard", pa.string(), "relevance shard file holding the map", False),
    _field("row", pa.int64(), "row of the map in that shard's `relevance` dataset", False),
    _field("seconds", pa.float32(), "explanation time of the image's batch, per image", False),
    # pixel flipping (pipeline/faithfulness.py), null unless the run has `faithfulness: true`
    _field("aopc_morf", pa.float32(), "AOPC of the target logit, regions perturbed most relevant first"),
    _field("aopc_random", pa.float32(), "AOPC of the target logit, regions perturbed in a random order"),
    _field("flip_curve_morf", pa.list_(pa.float32()),
           "target logit after k = 0..flip_steps regions perturbed, most relevant first"),
    _field("flip_curve_random", pa.list_(pa.float32()),
           "target logit after k = 0..flip_steps regions perturbed, in a random order (the baseline)"),
    _field("flip_seconds", pa.float32(), "pixel flipping time (both orders) of the image's batch, per image"),
])

FAILURE_SCHEMA = pa.schema([
    _field("image_id", pa.string(), "image id", False),
    _field("path", pa.string(), "image file", False),
    _field("reason", pa.string(), "why it could not be read or explained", False),
    _field("shard", pa.int64(), "shard index", False),
])


def write_parquet(rows: Sequence[dict], schema: pa.Schema, path: Path) -> None:
    table = pa.Table.from_pylist(list(rows), schema=schema)
    with atomic(path) as tmp:
        pq.write_table(table, tmp)


def compress_map(relevance_map: np.ndarray, dtype: str = "float16", compression: int = 4) -> bytes:
    """One (H, W) map as the chunk HDF5's shuffle + gzip filters store, so that worker threads can compress maps
    while the model runs (zlib releases the GIL; h5py's own filters run under its lock, one at a time)."""
    data = np.ascontiguousarray(relevance_map, dtype=dtype)
    return zlib.compress(data.view(np.uint8).reshape(-1, data.itemsize).T.tobytes(), compression)


def write_relevance(path: Path, maps: np.ndarray, columns: dict[str, Sequence[str] | np.ndarray], attributes: dict,
                    dtype: str = "float16", compression: int = 4, chunks: Sequence[bytes] | None = None) -> None:
    """(N, H, W) maps, one image per chunk, gzip + shuffle; per-image columns beside; run attributes.
    `chunks`: the maps already compressed by compress_map (same dtype and level), written as they are."""
    with atomic(path) as tmp, h5py.File(tmp, "w") as handle:
        n, h, w = maps.shape
        options = {"chunks": (1, h, w), "compression": "gzip", "compression_opts": compression, "shuffle": True} \
            if n else {}
        if n and chunks is not None:
            if len(chunks) != n:
                raise ValueError(f"{len(chunks)} compressed chunks for {n} maps")
            dataset = handle.create_dataset("relevance", shape=(n, h, w), dtype=dtype, **options)
            for i, chunk in enumerate(chunks):
                dataset.id.write_direct_chunk((i, 0, 0), chunk)
        else:
            handle.create_dataset("relevance", data=maps.astype(dtype), **options)
        strings = h5py.string_dtype()
        for name, values in columns.items():  # numpy arrays as they are; lists are strings
            if isinstance(values, np.ndarray):
                handle.create_dataset(name, data=values)
            else:
                handle.create_dataset(name, data=np.array(values, dtype=object), dtype=strings)
        for key, value in attributes.items():
            handle.attrs[key] = value if isinstance(value, (int, float, str)) else json.dumps(value)


def write_virtual_dataset(path: Path, shard_files: Sequence[Path], rows: Sequence[int], height: int, width: int,
                          dtype: str) -> None:
    """relevance.h5: one (N, H, W) dataset over all shards in dataset order (paths relative to the run)."""
    total = int(sum(rows))
    layout = h5py.VirtualLayout(shape=(total, height, width), dtype=dtype)
    start = 0
    for shard, count in zip(shard_files, rows):
        if count:
            source = h5py.VirtualSource(os.path.relpath(shard, path.parent), "relevance", shape=(count, height, width))
            layout[start:start + count] = source
        start += count
    with atomic(path) as tmp, h5py.File(tmp, "w") as handle:
        handle.create_virtual_dataset("relevance", layout, fillvalue=np.nan)


def write_failed_shard(out: Path, index: int, records: Sequence, reason: str, settings: dict) -> dict:
    """A shard none of whose images could be explained (its actor kept dying): no maps, every image a failure;
    written by the driver in the same files and order as an actor would."""
    layout = RunLayout(out)
    size = int(settings["size"])
    columns = {"image_id": [], "path": [], "label": np.zeros(0, np.int64), "pred": np.zeros(0, np.int64),
               "target": np.zeros(0, np.int64)}
    write_relevance(layout.relevance_shard(index), np.zeros((0, size, size), np.float32), columns,
                    settings.get("attributes", {}), dtype=settings.get("map_dtype", "float16"))
    failures = [{"image_id": r.image_id, "path": r.path, "reason": reason, "shard": index} for r in records]
    write_parquet(failures, FAILURE_SCHEMA, layout.failure_shard(index))
    write_parquet([], STATS_SCHEMA, layout.stats_shard(index))
    return {"shard": index, "explained": 0, "failed": len(failures), "reasons": [reason] * len(failures),
            "worker": None}
