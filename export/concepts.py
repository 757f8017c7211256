"""Concept outputs (CRP) in the exported artifacts: what is asked (`ConceptRequest`), the module that is traced
(`ConceptOutputs`, one flat tuple of tensors, as every exporter takes) and what the sidecar records of it
(`ConceptsRecord`).

An artifact with concepts returns, after `logits` and `relevance` (the unconditional map): for each layer
`concept_relevance_i` (N, C) (the relevance at each channel of the layer's output, summed over space, not
normalised) and `concept_position_i` (N, C) (the flat position `row * width + col` of each channel's most
relevant neuron: the argmax of its relevance over space; 0 for a layer without space), then, with maps,
`concept_channels` (N, K) (each image's K most relevant channels of the maps layer, most relevant first) and
`concept_maps` (N, K, H, W) (their conditional maps). Every value is taken in the one backward pass of the map."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lrp_module import LRPModel
from lrp_module.concepts import ConceptPlan, channel_relevance
from lrp_module.model import TOP_K_CHANNELS, ExportableConcepts


@dataclass(frozen=True)
class ConceptRequest:
    """The concepts an artifact computes: each of `layers`' concept relevance and most relevant neurons, and at
    `maps_layer` (None: the first layer) each image's `maps` most relevant channels' conditional maps (0: none).
    exclude_parallel: CRP's default (lrp_module/concepts.py)."""

    layers: tuple[str, ...]
    maps_layer: str | None = None
    maps: int = 8
    exclude_parallel: bool = True

    @property
    def map_layer(self) -> str | None:
        """The layer the maps are conditioned on (None without maps)."""
        return (self.maps_layer or self.layers[0]) if self.maps else None

    def identity(self) -> dict[str, Any]:
        """What shapes the artifact (its cache key)."""
        return {"layers": list(self.layers), "maps_layer": self.map_layer, "maps": self.maps,
                "exclude_parallel": self.exclude_parallel}


@dataclass(frozen=True)
class ConceptLayerRecord:
    """A concept layer as the artifact computes it: its module name, channels and output height x width at the
    exported input size (the grid of `concept_position`: position = row * width + col)."""

    name: str
    channels: int
    height: int
    width: int


@dataclass(frozen=True)
class ConceptsRecord:
    """What a concept artifact (and so a run) computes, as lrp.json's metadata "concepts" records it."""

    layers: tuple[ConceptLayerRecord, ...]
    maps_layer: str | None
    maps: int
    exclude_parallel: bool

    def layer(self, name: str) -> ConceptLayerRecord:
        """The layer called `name`; KeyError listing the run's layers."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no concept layer {name!r}: the concept layers are {', '.join(x.name for x in self.layers)}")

    def output_names(self) -> list[str]:
        """The artifact's outputs, in order."""
        count = range(len(self.layers))
        return ["logits", "relevance", *(f"concept_relevance_{i}" for i in count),
                *(f"concept_position_{i}" for i in count), *(["concept_channels", "concept_maps"] if self.maps else [])]

    def record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ConceptsRecord:
        layers = tuple(ConceptLayerRecord(str(layer["name"]), int(layer["channels"]), int(layer["height"]),
                                          int(layer["width"])) for layer in record["layers"])
        return cls(layers, record.get("maps_layer"), int(record.get("maps", 0)),
                   bool(record.get("exclude_parallel", True)))

    def to_json(self) -> str:
        return json.dumps(self.record())

    @classmethod
    def from_json(cls, text: str) -> ConceptsRecord:
        return cls.from_record(json.loads(text))


class ConceptOutputs(nn.Module):
    """forward(x, target) -> the flat tuple `ConceptsRecord.output_names` lists (see the module's docstring).
    Built on lrp_module's ExportableConcepts (its plan: one pass; a layer below the maps layer is recorded from
    each image's first condition, the unconditional one)."""

    def __init__(self, lrp: LRPModel, request: ConceptRequest, channel_sum: bool = True) -> None:
        super().__init__()
        self.concepts = ExportableConcepts(lrp, list(request.layers), request.map_layer, request.maps,
                                           request.exclude_parallel, channel_sum)

    def forward(self, x: Tensor, target: Tensor) -> tuple[Tensor, ...]:
        concepts = self.concepts
        logits, relevance, recorded = concepts.lrp.propagate_concepts(x, target, concepts.plan, traceable=True)
        if concepts.channel_sum:
            relevance = relevance.sum(dim=-3)
        values, positions = [], []
        for layer in concepts.layers:
            at = recorded[layer.step]
            values.append(channel_relevance(at))
            positions.append(at.flatten(2).argmax(dim=2) if at.ndim > 2 else torch.zeros_like(values[-1]).long())
        if concepts.maps is None:
            return (logits, relevance, *values, *positions)
        return (logits, relevance[:, 0], *values, *positions, recorded[TOP_K_CHANNELS], relevance[:, 1:])


def concepts_record(lrp: LRPModel, request: ConceptRequest, height: int, width: int) -> ConceptsRecord:
    """The record of `request` on `lrp` at the input size: each layer's channels and output grid, measured by one
    forward and backward pass on a zero image (layer names checked: an unknown one lists the valid ones)."""
    module = ConceptOutputs(lrp, request)  # checks the names, k and the maps layer
    layers = module.concepts.layers
    weight = lrp.steps[lrp._first].weight
    x = torch.zeros(1, lrp.in_channels or 3, height, width, dtype=weight.dtype, device=weight.device)
    plan = ConceptPlan(record=tuple(dict.fromkeys(layer.step for layer in layers)))
    with torch.inference_mode():
        _, _, recorded = lrp.propagate_concepts(x, torch.zeros(1, dtype=torch.long, device=x.device), plan)
    records = []
    for layer in layers:
        shape = recorded[layer.step].shape if layer.step in recorded else (1, layer.channels)
        grid = tuple(shape[2:]) if len(shape) == 4 else (1, 1)
        records.append(ConceptLayerRecord(layer.name, layer.channels, int(grid[0]), int(grid[1])))
    maps = module.concepts.maps
    return ConceptsRecord(tuple(records), maps.name if maps is not None else None, request.maps if maps else 0,
                          request.exclude_parallel)


def split_outputs(outputs: Sequence[Any], record: ConceptsRecord) -> dict[str, Any]:
    """An artifact's outputs by name (`ConceptsRecord.output_names`)."""
    names = record.output_names()
    if len(outputs) != len(names):
        raise ValueError(f"a concept artifact returns {len(names)} outputs, got {len(outputs)}")
    return dict(zip(names, outputs))
