"""Where a run's concept outputs (CRP) live: the dataset names inside each relevance shard (and, as virtual datasets,
in relevance.h5) and the attribute describing them. One place, so the worker, the driver's merge and the readers
(pipeline/run_reader.py) agree; docs/outputs.md documents them."""
from __future__ import annotations

from export.concepts import ConceptLayerRecord, ConceptsRecord

__all__ = ["ATTRIBUTE", "CHANNELS", "MAPS", "POSITION", "RELEVANCE", "ConceptLayerRecord", "ConceptsRecord",
           "position_name", "relevance_name"]

RELEVANCE = "concept_relevance"  # group: one (N, C) float32 dataset per layer, named by the layer
POSITION = "concept_position"  # group: one (N, C) int32 dataset per layer: the most relevant neuron's flat position
CHANNELS = "concept_channels"  # (N, K) int64: the channels of the concept maps, most relevant first
MAPS = "concept_maps"  # (N, K, H, W) map_dtype, gzip + shuffle, one image per chunk
ATTRIBUTE = "concepts"  # a JSON attribute of every relevance shard: the ConceptsRecord


def relevance_name(layer: str) -> str:
    return f"{RELEVANCE}/{layer}"


def position_name(layer: str) -> str:
    return f"{POSITION}/{layer}"

