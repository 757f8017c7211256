"""Shard files: HDF5 relevance maps, Parquet statistics and failures (schemas: pipeline/schema.py); the HDF5
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

from .concepts.outputs import ATTRIBUTE as CONCEPTS_ATTRIBUTE
from .concepts.outputs import ConceptArrays, ConceptsRecord, virtual_datasets, write_concepts
from .contracts import ShardResult, WorkerSettings
from .layout import RunLayout
from .schema import FAILURE_SCHEMA, STATS_SCHEMA, failure_row, map_columns


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
                    dtype: str = "float16", compression: int = 4, chunks: Sequence[bytes] | None = None,
                    concepts: ConceptArrays | None = None) -> None:
    """(N, H, W) maps, one image per chunk, gzip + shuffle; per-image columns beside; run attributes.
    `chunks`: the maps already compressed by compress_map (same dtype and level), written as they are.
    `concepts`: the images' concept outputs (pipeline/concepts/outputs.py), row for row with the maps."""
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
        if concepts is not None:
            write_concepts(handle, concepts, n, dtype, compression)


def _virtual_layout(path: Path, shard_files: Sequence[Path], rows: Sequence[int], name: str, shape: tuple[int, ...],
                    dtype: str) -> h5py.VirtualLayout:
    """The dataset `name` ((rows, *shape) in each shard) over all shards in dataset order."""
    layout = h5py.VirtualLayout(shape=(int(sum(rows)), *shape), dtype=dtype)
    start = 0
    for shard, count in zip(shard_files, rows):
        if count:
            layout[start:start + count] = h5py.VirtualSource(os.path.relpath(shard, path.parent), name,
                                                             shape=(count, *shape))
        start += count
    return layout


def write_virtual_dataset(path: Path, shard_files: Sequence[Path], rows: Sequence[int], height: int, width: int,
                          dtype: str, concepts: ConceptsRecord | None = None) -> None:
    """relevance.h5: one (N, H, W) dataset over all shards in dataset order (paths relative to the run), and the
    concept datasets where the run has them; its attributes `note` and `shards` say that it reads the shards and
    that a copy without them reads as NaN."""
    layout = _virtual_layout(path, shard_files, rows, "relevance", (height, width), dtype)
    shards = f"{RunLayout.RELEVANCE}/shard-*.h5"
    note = (f"a virtual dataset: it reads the shard files {shards} relative to this file; a copy without them "
            "reads as fill values (NaN), so copy or move the run folder whole (or read the shards)")
    with atomic(path) as tmp, h5py.File(tmp, "w") as handle:
        dataset = handle.create_virtual_dataset("relevance", layout, fillvalue=np.nan)
        for node in (handle, dataset):  # HDF5 reads a missing source as fill values without a word
            node.attrs["note"], node.attrs["shards"] = note, shards
        if concepts is not None:
            handle.attrs[CONCEPTS_ATTRIBUTE] = concepts.to_json()
        for name, shape, kind, fill in virtual_datasets(concepts, height, width, dtype) if concepts else ():
            part = handle.create_virtual_dataset(name, _virtual_layout(path, shard_files, rows, name, shape, kind),
                                                 fillvalue=fill)
            part.attrs["note"], part.attrs["shards"] = note, shards


def write_failed_shard(out: Path, index: int, records: Sequence, reason: str, settings: WorkerSettings
                       ) -> ShardResult:
    """A shard none of whose images could be explained (its actor kept dying): no maps, every image a failure;
    written by the driver in the same files and order as an actor would."""
    layout = RunLayout(out)
    size = settings.size
    write_relevance(layout.relevance_shard(index), np.zeros((0, size, size), np.float32), map_columns([]),
                    settings.attributes, dtype=settings.map_dtype)
    failures = [failure_row(r.image_id, r.path, reason, index, r.member_name) for r in records]
    write_parquet(failures, FAILURE_SCHEMA, layout.failure_shard(index))
    write_parquet([], STATS_SCHEMA, layout.stats_shard(index))
    return ShardResult(shard=index, explained=0, failed=len(failures), reasons=(reason,) * len(failures))
