"""Where a run's concept outputs (CRP) live: the datasets inside each relevance shard (and, as virtual datasets,
in relevance.h5) and the attribute describing them; how a shard writes them. One place, so the worker, the driver's
merge (tables.py) and the readers (pipeline/run_reader.py) agree; docs/outputs.md documents them."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import h5py
import numpy as np

from export.concepts import ConceptLayerRecord, ConceptsRecord

__all__ = ["ATTRIBUTE", "CHANNELS", "MAPS", "POSITION", "RELEVANCE", "ConceptArrays", "ConceptLayerRecord",
           "ConceptsRecord", "position_name", "relevance_name", "write_concepts"]

RELEVANCE = "concept_relevance"  # group: one (N, C) float32 dataset per layer, named by the layer
POSITION = "concept_position"  # group: one (N, C) int32 dataset per layer: the most relevant neuron's flat position
CHANNELS = "concept_channels"  # (N, K) int64: the channels of the concept maps, most relevant first
MAPS = "concept_maps"  # (N, K, H, W) map_dtype, gzip + shuffle, one image per chunk
ATTRIBUTE = "concepts"  # a JSON attribute of every relevance shard: the ConceptsRecord


def relevance_name(layer: str) -> str:
    return f"{RELEVANCE}/{layer}"


def position_name(layer: str) -> str:
    return f"{POSITION}/{layer}"


@dataclass(frozen=True)
class ConceptArrays:
    """One shard's concept outputs, row for row with its maps: per layer (N, C) relevance and neuron positions,
    and (with maps) the (N, K) channels and each image's (K, H, W) maps as compressed chunks (writers.compress_map)."""

    relevance: Mapping[str, np.ndarray]
    positions: Mapping[str, np.ndarray]
    channels: np.ndarray | None = None
    map_chunks: Sequence[bytes] = ()
    map_shape: tuple[int, int, int] | None = None  # (K, H, W)


def write_concepts(handle: h5py.File, arrays: ConceptArrays, rows: int, dtype: str, compression: int) -> None:
    """The shard's concept datasets (only where it has rows: a shard without explained images has none)."""
    if not rows:
        return
    for layer, values in arrays.relevance.items():
        handle.create_dataset(relevance_name(layer), data=np.asarray(values, np.float32))
        handle.create_dataset(position_name(layer), data=np.asarray(arrays.positions[layer], np.int32))
    if arrays.channels is not None and arrays.map_shape is not None:
        handle.create_dataset(CHANNELS, data=np.asarray(arrays.channels, np.int64))
        k, h, w = arrays.map_shape
        maps = handle.create_dataset(MAPS, shape=(rows, k, h, w), dtype=dtype, chunks=(1, k, h, w),
                                     compression="gzip", compression_opts=compression, shuffle=True)
        if len(arrays.map_chunks) != rows:
            raise ValueError(f"{len(arrays.map_chunks)} compressed concept-map chunks for {rows} images")
        for i, chunk in enumerate(arrays.map_chunks):
            maps.id.write_direct_chunk((i, 0, 0, 0), chunk)


def virtual_datasets(record: ConceptsRecord, height: int, width: int, dtype: str
                     ) -> list[tuple[str, tuple[int, ...], str, float | int]]:
    """(name, shape per image, dtype, fill value) of every concept dataset relevance.h5 presents over the shards."""
    found: list[tuple[str, tuple[int, ...], str, float | int]] = []
    for layer in record.layers:
        found += [(relevance_name(layer.name), (layer.channels,), "float32", np.nan),
                  (position_name(layer.name), (layer.channels,), "int32", -1)]
    if record.maps:
        found += [(CHANNELS, (record.maps,), "int64", -1), (MAPS, (record.maps, height, width), dtype, np.nan)]
    return found
