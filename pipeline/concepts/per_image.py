"""A shard worker's concept outputs (CRP) per image: split from the artifact's outputs (export/concepts.py), the
statistics' concepts_* columns (pipeline/schema.py), and the shard's arrays as pipeline/concepts/outputs.py writes
them."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from export.concepts import ConceptsRecord, split_outputs

from .outputs import ConceptArrays


@dataclass(frozen=True)
class ConceptImage:
    """One image's concept outputs: per layer (C,) relevance and neuron positions; its K channels and (K, H, W)
    maps at the maps layer (None without maps)."""

    relevance: dict[str, np.ndarray]
    positions: dict[str, np.ndarray]
    channels: np.ndarray | None
    maps: np.ndarray | None


def split_batch(outputs: Sequence[Any], record: ConceptsRecord) -> list[ConceptImage]:
    """A batch's concept outputs (the artifact's outputs after logits and relevance), image by image, on the CPU."""
    named = {key: value.float().cpu().numpy() if value.is_floating_point() else value.cpu().numpy()
             for key, value in split_outputs(outputs, record).items()}
    count = len(named["logits"])
    images = []
    for i in range(count):
        images.append(ConceptImage(
            relevance={layer.name: named[f"concept_relevance_{j}"][i] for j, layer in enumerate(record.layers)},
            positions={layer.name: named[f"concept_position_{j}"][i] for j, layer in enumerate(record.layers)},
            channels=named["concept_channels"][i] if record.maps else None,
            maps=named["concept_maps"][i] if record.maps else None))
    return images


def shares(values: np.ndarray) -> np.ndarray:
    """Each channel's relevance / the sum of |relevance| over the layer's channels (CRP's normalisation, its 1e-10
    guard included)."""
    values = np.asarray(values, np.float64)
    return values / (np.abs(values).sum(axis=-1, keepdims=True) + 1e-10)


def top_channels(values: np.ndarray, top: int) -> np.ndarray:
    """The `top` most relevant channels, most relevant first (ties: the lower channel first)."""
    return np.argsort(-np.asarray(values, np.float64), kind="stable")[:top]


def statistics(images: Sequence[ConceptImage], record: ConceptsRecord, top: int) -> dict[str, list]:
    """The statistics' concept columns for these images: the maps layer's (else the first layer's) top channels
    and shares, and every layer's."""
    first = record.maps_layer or record.layers[0].name
    columns: dict[str, list] = {"concepts_top": [], "concepts_top_share": [], "concepts_by_layer": []}
    for image in images:
        by_layer = []
        for layer in record.layers:
            values = image.relevance[layer.name]
            chosen = top_channels(values, top)
            entry = {"layer": layer.name, "top": chosen.tolist(),
                     "share": shares(values)[chosen].astype(np.float32).tolist()}
            by_layer.append(entry)
            if layer.name == first:
                columns["concepts_top"].append(entry["top"])
                columns["concepts_top_share"].append(entry["share"])
        columns["concepts_by_layer"].append(by_layer)
    return columns


def shard_arrays(images: Sequence[ConceptImage], map_chunks: Sequence[bytes], record: ConceptsRecord, height: int,
                 width: int) -> ConceptArrays:
    """The shard's concept arrays from its explained images, in row order (`map_chunks`: their compressed maps)."""
    def stacked(name: str, attribute: str, channels: int, dtype: type) -> np.ndarray:
        rows = [getattr(image, attribute)[name] for image in images]
        return np.stack(rows).astype(dtype) if rows else np.zeros((0, channels), dtype)

    relevance = {layer.name: stacked(layer.name, "relevance", layer.channels, np.float32) for layer in record.layers}
    positions = {layer.name: stacked(layer.name, "positions", layer.channels, np.int32) for layer in record.layers}
    if not record.maps:
        return ConceptArrays(relevance, positions)
    channels = np.stack([image.channels for image in images]).astype(np.int64) if images else \
        np.zeros((0, record.maps), np.int64)
    return ConceptArrays(relevance, positions, channels, list(map_chunks), (record.maps, height, width))
