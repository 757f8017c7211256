"""The fresh-process check of an artifact's concept outputs (export/concepts.py) against the float64 oracle, as
export/verify.py checks its logits and map: each output no further from float64 than `oracle.bound` of eager
float32's own distance on the same batch.

float32 may rank two near-equal channels (or neurons) the other way round than float64 does, so the choices are
checked by value, and the maps for the channels the artifact chose:
- concept relevance (N, C) per layer: per image, against float64's;
- most relevant neuron per channel: float64's relevance at the artifact's position is within the bound (of the
  image's largest |R| at the layer) of float64's largest for that channel;
- the K channels: float64's concept relevance of the chosen channels, in the artifact's order, is within the
  bound (of the image's largest |value|) of float64's K largest values, and no channel is chosen twice;
- the K maps: per map, against float64's conditional map of the same (image, channel), recomputed for the
  artifact's choice (eager float32's distance, the bound's basis, on the same channels)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from lrp_module import LRPModel
from lrp_module.concepts import ConceptPlan, channel_relevance
from lrp_module.oracle import FLOOR, Float64Oracle, bound, compare

from .concepts import ConceptRequest, ConceptsRecord


@dataclass
class ConceptReference:
    """The verification batch's concept outputs in float64 (and eager float32): each layer's relevance over space;
    the conditional maps of any K channels per image on request (`maps`, cached per choice)."""

    lrp: LRPModel
    source: nn.Module
    request: ConceptRequest
    record: ConceptsRecord
    x: Tensor
    target: Tensor
    channel_sum: bool
    float64_layers: list[Tensor] = field(default_factory=list)  # per layer (N, C, h, w) or (N, C)
    eager_layers: list[Tensor] = field(default_factory=list)
    _maps: dict[bytes, tuple[Tensor, Tensor]] = field(default_factory=dict)

    @classmethod
    def build(cls, lrp: LRPModel, source: nn.Module, request: ConceptRequest, record: ConceptsRecord, x: Tensor,
              target: Tensor, channel_sum: bool) -> ConceptReference:
        """The float64 pass one image at a time (its activations held for one image), then eager float32's."""
        reference = cls(lrp, source, request, record, x, target, channel_sum)
        oracle = Float64Oracle.like(source, lrp).lrp
        per_image = [reference._layers(oracle, x[i:i + 1].double(), target[i:i + 1]) for i in range(x.shape[0])]
        reference.float64_layers = [torch.cat(parts) for parts in zip(*per_image)]
        del oracle
        reference.eager_layers = reference._layers(lrp, x, target)
        return reference

    def _layers(self, lrp: LRPModel, x: Tensor, target: Tensor) -> list[Tensor]:
        steps = [lrp.concept_layers[layer.name].step for layer in self.record.layers]
        with torch.inference_mode():
            _, _, recorded = lrp.propagate_concepts(x, target, ConceptPlan(record=tuple(dict.fromkeys(steps))))
        return [recorded[step].detach().clone() for step in steps]

    def maps(self, channels: np.ndarray) -> tuple[Tensor, Tensor]:
        """float64 and eager float32 conditional maps (N, K, H, W) of these (N, K) channels at the maps layer."""
        key = np.ascontiguousarray(channels, np.int64).tobytes()
        if key not in self._maps:
            layer = self.record.maps_layer
            conditions = [[{layer: [int(c)]} for c in row] for row in channels]
            oracle = Float64Oracle.like(self.source, self.lrp).lrp
            float64 = torch.cat([oracle.concept_maps(self.x[i:i + 1].double(), self.target[i:i + 1],
                                                     conditions[i:i + 1], self.request.exclude_parallel,
                                                     self.channel_sum) for i in range(len(conditions))])
            del oracle
            eager = self.lrp.concept_maps(self.x, self.target, conditions, self.request.exclude_parallel,
                                          self.channel_sum)
            self._maps[key] = (float64, eager)
        return self._maps[key]


def _per_row_error(ours: Tensor, reference: Tensor) -> float:
    return compare(ours, reference).worst


def check_concepts(got: dict[str, np.ndarray], reference: ConceptReference) -> tuple[dict, list[str], list[str]]:
    """(the outputs' entries, problems, details) of one artifact's concept outputs against float64."""
    entries, problems, details = {}, [], []

    def judge(key: str, worst: float, eager: float) -> None:
        limit = bound(eager, FLOOR)
        entries[key] = {"max_relative_error": worst, "eager_float32": eager, "bound": limit}
        details.append(f"{key} {worst:.2e}")
        if not worst <= limit:  # NaN fails too
            problems.append(f"{key} {worst:.2e} exceeds the bound {limit:.1e} (eager float32's {eager:.1e})")

    for i, (float64, eager) in enumerate(zip(reference.float64_layers, reference.eager_layers)):
        values64, eager_values = channel_relevance(float64), channel_relevance(eager)
        ours = torch.from_numpy(np.asarray(got[f"concept_relevance_{i}"]))
        eager_error = _per_row_error(eager_values, values64)
        judge(f"concept_relevance_{i}", _per_row_error(ours, values64), eager_error)
        judge(f"concept_position_{i}", _position_error(np.asarray(got[f"concept_position_{i}"]), float64),
              _position_error(_positions(eager), float64) if float64.ndim > 2 else 0.0)
    if reference.record.maps:
        index = next(i for i, layer in enumerate(reference.record.layers) if layer.name == reference.record.maps_layer)
        values64 = channel_relevance(reference.float64_layers[index])
        channels = np.asarray(got["concept_channels"]).astype(np.int64)
        eager_channels = torch.topk(channel_relevance(reference.eager_layers[index]), channels.shape[1],
                                    dim=1).indices.numpy()
        judge("concept_channels", _choice_error(channels, values64), _choice_error(eager_channels, values64))
        float64_maps, eager_maps = reference.maps(channels)
        flat = (lambda t: t.flatten(0, 1))  # noqa: E731  (one row per (image, channel) map)
        ours = torch.from_numpy(np.asarray(got["concept_maps"]))
        judge("concept_maps", _per_row_error(flat(ours), flat(float64_maps)),
              _per_row_error(flat(eager_maps), flat(float64_maps)))
    return entries, problems, details


def _positions(spatial: Tensor) -> np.ndarray:
    return spatial.flatten(2).argmax(dim=2).numpy()


def _position_error(positions: np.ndarray, float64: Tensor) -> float:
    """How much less float64's relevance at the chosen neurons is than at its own choice, per image over the
    image's largest |R| at the layer (0: the same neurons, or ties)."""
    if float64.ndim <= 2:
        return 0.0 if (np.asarray(positions) == 0).all() else float("inf")
    flat = float64.flatten(2)
    at = flat.gather(2, torch.from_numpy(np.asarray(positions, np.int64)).unsqueeze(2)).squeeze(2)
    shortfall = (flat.amax(dim=2) - at).amax(dim=1)
    scale = flat.abs().flatten(1).amax(dim=1).clamp_min(torch.finfo(flat.dtype).tiny)
    return float((shortfall / scale).max())


def _choice_error(channels: np.ndarray, values64: Tensor) -> float:
    """How far float64's values of the chosen channels (in the chosen order) are from its own K largest, per
    image over its largest |value|; a channel chosen twice is an infinite error."""
    if any(len(set(row.tolist())) != len(row) for row in channels):
        return float("inf")
    chosen = values64.gather(1, torch.from_numpy(channels))
    best = torch.topk(values64, channels.shape[1], dim=1).values
    scale = values64.abs().amax(dim=1).clamp_min(torch.finfo(values64.dtype).tiny)
    return float(((best - chosen).abs().amax(dim=1) / scale).max())
