"""Concept Relevance Propagation (Achtibat et al., Nature Machine Intelligence 2023) on the graph engine: what a
concept condition is and how the engine's backward pass applies it.

A concept is a channel of a hidden layer's output. A condition `{layer: [channels]}` keeps, at that layer's output,
only the relevance of the listed channels (CRP's `ChannelConcept.mask`; an empty list keeps none); a condition may
name several layers (CRP's nested conditions). Every LRP rule here is linear in the relevance it receives (the
forward pass fixes every denominator), so the backward pass above the topmost conditioned layer is shared by all K
conditions and only what lies below it runs K times: in eager calls one image at a time as a batch of K rows that
reads the image's stored activations as one row (broadcast, nothing repeated; memory: one image's K rows), in traced
and exported modules as one batch of N x K (a loop over the batch would fix N in the trace).

`exclude_parallel` (CRP's default, True): at a conditioned layer only the relevance that flows through it goes on;
relevance that reached the layers below by a path around it (a ResNet's skip connection, a parallel branch) is
dropped. With False, that relevance is kept and is the same in all K maps (CRP's `exclude_parallel=False`). On a
chain (VGG) the two are equal.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .graph import Step, StepKind

Condition = Mapping[str, Sequence[int]]


class ConceptError(ValueError):
    """A concept request the model cannot answer (unknown layer, channel out of range, no condition)."""


@dataclass
class ConceptLayer:
    """A layer concepts can be taken at: the step whose output it is and its number of channels."""

    name: str
    step: int
    channels: int


@dataclass
class ConceptPlan:
    """What one backward pass does besides the map: record the relevance at `record`'s steps; at `masks`' steps
    multiply it by (N, K, C) masks (the first one reached expands the batch to N x K); at `top_k_step` choose
    each image's `top_k` most relevant channels as the K conditions. with_full: a first extra condition that keeps
    everything, parallel paths included (the unconditional map, in the same pass as the K concept maps)."""

    record: tuple[int, ...] = ()
    masks: dict[int, Tensor] = field(default_factory=dict)
    top_k_step: int | None = None
    top_k: int = 0
    exclude_parallel: bool = True
    with_full: bool = False
    named: dict[int, Tensor] = field(default_factory=dict)  # (N, K) 1 where a condition names the step; a masked
    # step absent here is named by every condition (the common case, and a top-K step)

    @property
    def conditions(self) -> int:
        """The number of maps per image: K (+ 1 with the full map), 1 when nothing is masked."""
        if self.top_k_step is not None:
            return self.top_k + int(self.with_full)
        return next(iter(self.masks.values())).shape[1] + int(self.with_full) if self.masks else 1

    @property
    def masked_steps(self) -> set[int]:
        return set(self.masks) | ({self.top_k_step} if self.top_k_step is not None else set())

    def drops_around(self, step: int) -> bool:
        """Does every row drop the relevance that reached lower layers around `step` (exclude_parallel, every
        condition names the step, no full map)?"""
        return self.exclude_parallel and step not in self.named and not self.with_full

    def around(self, step: int, k_maps: int, like: Tensor, image: int | None = None) -> Tensor | None:
        """What each of the N x k_maps rows of `like` keeps of the relevance that reached lower layers around `step`
        (a skip connection) when the conditions are applied there: None all of it (exclude_parallel=False), else
        (rows, 1, ...) 0/1: 0 for the conditions that name the step, 1 for the others and the full map's row (CRP
        computes each group of conditions naming the same layers apart). Only where not `drops_around`. image: the
        rows are that image's alone."""
        if not self.exclude_parallel:
            return None
        named = self.named.get(step)
        if named is None:
            return first_row_only(like.shape[0], k_maps, like)
        keep = 1.0 - (named if image is None else named[image:image + 1]).to(like.dtype)
        if self.with_full:
            keep = with_full_row(keep.unsqueeze(2)).squeeze(2)
        return keep.reshape(-1, *(1,) * (like.ndim - 1))


def channel_relevance(relevance: Tensor) -> Tensor:
    """(N, C): a layer's output relevance summed over its spatial positions (CRP's `ChannelConcept.attribute`)."""
    return relevance.flatten(2).sum(dim=2) if relevance.ndim > 2 else relevance


def normalise(relevance: Tensor) -> Tensor:
    """Each row divided by its sum of |R| over the channels, as CRP's `abs_norm` (its 1e-10 guard included)."""
    return relevance / (relevance.abs().sum(dim=1, keepdim=True) + 1e-10)


def top_k_masks(channel_rel: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Each image's k most relevant channels (signed relevance, descending) as indices (N, k) and one-hot masks
    (N, k, C)."""
    indices = torch.topk(channel_rel, k, dim=1).indices
    masks = torch.zeros(channel_rel.shape[0], k, channel_rel.shape[1], dtype=channel_rel.dtype,
                        device=channel_rel.device).scatter(2, indices.unsqueeze(2), 1.0)
    return indices, masks


def with_full_row(mask: Tensor) -> Tensor:
    """(N, K, C) masks with an all-ones first condition: (N, K + 1, C)."""
    return torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)


def first_row_only(rows: int, per_image: int, like: Tensor) -> Tensor:
    """(rows, 1, ...) 1 for each image's first condition (the full map), 0 for the others."""
    keep = (torch.arange(rows, device=like.device) % per_image == 0).to(like.dtype)
    return keep.reshape(rows, *(1,) * (like.ndim - 1))


def apply_mask(relevance: Tensor, mask: Tensor, expanded: bool) -> Tensor:
    """Relevance (N, C, ...) times masks (N, K, C) -> (N*K, C, ...); or, already expanded, (N*K, C, ...) times
    the masks flattened to (N*K, C)."""
    extra = (1,) * (relevance.ndim - 2)
    if expanded:
        return relevance * mask.flatten(0, 1).reshape(-1, mask.shape[2], *extra)
    n, k, c = mask.shape
    return (relevance.unsqueeze(1) * mask.reshape(n, k, c, *extra)).flatten(0, 1)


def condition_masks(conditions: Sequence[Condition] | Sequence[Sequence[Condition]], n: int,
                    layers: Mapping[str, ConceptLayer], dtype: torch.dtype, device: torch.device) -> dict[int, Tensor]:
    """{step: (N, K, C) 0/1 mask} from K conditions shared by the N images, or from N lists of K conditions (one
    list per image). A layer a condition does not name is not masked in that condition."""
    return condition_masks_named(conditions, n, layers, dtype, device)[0]


def condition_masks_named(conditions: Sequence[Condition] | Sequence[Sequence[Condition]], n: int,
                          layers: Mapping[str, ConceptLayer], dtype: torch.dtype, device: torch.device
                          ) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """`condition_masks` and, for each masked step that not every condition names, (N, K) 1 where the condition
    names it (`ConceptPlan.named`: exclude_parallel applies only to the conditions that name a layer)."""
    if isinstance(conditions, Mapping) or not isinstance(conditions, Sequence) or len(conditions) == 0:
        raise ConceptError("conditions must be a non-empty list of {layer: [channels]} dicts (or one such list per "
                           "image)")
    per_image = not isinstance(conditions[0], Mapping)
    rows: list[Sequence[Condition]] = list(conditions) if per_image else [conditions] * n
    if per_image and len(rows) != n:
        raise ConceptError(f"per-image conditions: got {len(rows)} lists for {n} images")
    k = len(rows[0])
    if k == 0 or any(len(row) != k for row in rows):
        raise ConceptError(f"every image needs the same number (>= 1) of conditions, got {[len(r) for r in rows]}")
    names: list[str] = []
    for row in rows:
        for condition in row:
            if not isinstance(condition, Mapping) or not condition:
                raise ConceptError(f"a condition must be a non-empty {{layer: [channels]}} dict, got {condition!r}")
            names += [name for name in condition if name not in names]
    masks: dict[int, Tensor] = {}
    named: dict[int, Tensor] = {}
    for name in names:
        layer = resolve(name, layers)
        mask = torch.ones(n, k, layer.channels, dtype=dtype)
        names_it = torch.zeros(n, k, dtype=torch.bool)
        for i, row in enumerate(rows):
            for j, condition in enumerate(row):
                if name in condition:
                    mask[i, j] = 0.0
                    mask[i, j, _channels(condition[name], layer)] = 1.0
                    names_it[i, j] = True
        if layer.step in masks:  # two names of the same layer (a module and its fused ReLU): both masks hold
            masks[layer.step] = masks[layer.step] * mask.to(device)
            named[layer.step] = named[layer.step] | names_it
        else:
            masks[layer.step] = mask.to(device)
            named[layer.step] = names_it
    return masks, {step: names_it.to(device) for step, names_it in named.items() if not bool(names_it.all())}


def _channels(channels: Sequence[int] | Tensor, layer: ConceptLayer) -> list[int]:
    values = channels.tolist() if isinstance(channels, Tensor) else list(channels)
    for c in values:
        if isinstance(c, bool) or not isinstance(c, int):
            raise ConceptError(f"layer {layer.name}: channels must be integers, got {c!r}")
        if not 0 <= c < layer.channels:
            raise ConceptError(f"layer {layer.name}: channel {c} is out of range (it has {layer.channels} channels)")
    return values


def check_k(k: object, layer: ConceptLayer) -> int:
    """k, the number of top channels asked of `layer`: an integer in [1, C]."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= layer.channels:
        raise ConceptError(f"k must be an integer in [1, {layer.channels}] for layer {layer.name}, got {k!r}")
    return k


def resolve(name: str, layers: Mapping[str, ConceptLayer]) -> ConceptLayer:
    """The concept layer of a module name; an unknown name lists the valid ones."""
    if not isinstance(name, str) or name not in layers:
        listed = ", ".join(layers)
        raise ConceptError(f"unknown layer {name!r}: concepts can be taken at {listed}")
    return layers[name]


def _channels_of(specs: Sequence[Step], k: int) -> int | None:
    """The channel count of step k's output (None once the tensor is flat: after a flatten)."""
    spec = specs[k]
    if spec.kind is StepKind.AFFINE:
        return spec.weight.shape[0]
    if spec.kind is StepKind.FLATTEN:
        return None
    if spec.kind is StepKind.CAT:
        parts = [_channels_of(specs, i) if i >= 0 else None for i in spec.inputs]
        return sum(parts) if spec.layer.module.dim == 1 and None not in parts else None
    return _channels_of(specs, spec.inputs[0]) if spec.inputs[0] >= 0 else None


def concept_layers(specs: Sequence[Step], model: nn.Module) -> dict[str, ConceptLayer]:
    """Every name a condition may use -> its step: each step's module name and the batch norm and ReLU folded or
    fused into it (their outputs carry the same relevance), and each container module (`layer4`, `layer4.2`,
    `features`) as the last step inside it, whose output is the container's. A module called more than once (a
    ResNet block's shared ReLU) names no single output and is left out."""
    found: dict[str, list[int]] = {}
    for k, spec in enumerate(specs):
        for name in dict.fromkeys([spec.name, *spec.covers]):
            found.setdefault(name, []).append(k)
    for name, _ in model.named_modules():
        if name and name not in found:
            inside = [k for k, spec in enumerate(specs) if spec.name.startswith(name + ".")]
            if inside:
                found[name] = [inside[-1]]
    layers: dict[str, ConceptLayer] = {}
    for name, steps in found.items():
        channels = _channels_of(specs, steps[0])
        if len(set(steps)) == 1 and channels is not None:
            layers[name] = ConceptLayer(name, steps[0], channels)
    return layers
