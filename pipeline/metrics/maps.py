"""Per-image metrics of a relevance map alone (and an object mask): localisation and complexity, as Quantus 0.6.0
defines them (docs/metrics.md). Pure, batched torch functions of maps `relevance` (N, H, W) and boolean masks
(N, H, W); float64 in, float64 out (the parity tests' precision), any float dtype accepted.

Quantus normalises a batch of maps by the batch's largest |value| (`normalise_by_max` over every axis), so some
of its values depend on which images share a batch; here every map is normalised by its own largest |value|
(Quantus with `normalise_func_kwargs={"normalise_axes": (1, 2, 3)}`), so a value never depends on the batch.
"""
from __future__ import annotations

import torch
from torch import Tensor


def normalise_by_max(relevance: Tensor) -> Tensor:
    """Each map divided by its largest |value| (an all-zero map stays zero), like Quantus's normalise_by_max."""
    flat = relevance.flatten(1)
    largest = flat.abs().amax(1)
    scale = torch.where(largest > 0, largest, torch.ones_like(largest))
    return (flat / scale[:, None]).reshape(relevance.shape)


def _empty_to_nan(values: Tensor, masks: Tensor) -> Tensor:
    """NaN where an image has no mask pixel (Quantus's value there)."""
    empty = masks.flatten(1).sum(1) == 0
    return values.to(torch.float64).masked_fill(empty, torch.nan)


def _disk(radius: float, device: torch.device) -> Tensor:
    r = int(radius)
    offsets = torch.arange(-r, r + 1, device=device, dtype=torch.float64)
    return (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius ** 2).to(torch.float64)


def dilate(masks: Tensor, radius: float) -> Tensor:
    """Masks grown by every pixel within Euclidean distance `radius` (pixel centres) of a mask pixel."""
    if radius <= 0:
        return masks.bool()
    kernel = _disk(radius, masks.device)
    r = kernel.shape[0] // 2
    grown = torch.nn.functional.conv2d(masks[:, None].to(torch.float64), kernel[None, None], padding=r)
    return grown[:, 0] > 0.5


def pointing_game(relevance: Tensor, masks: Tensor, tolerance: float = 0.0) -> Tensor:
    """1. where a pixel holding the map's largest value lies within `tolerance` pixels of the mask, else 0.;
    NaN for an empty mask. tolerance 0 is Quantus's PointingGame (any of tied maxima counts); TorchRay's protocol
    (Zhang et al. 2018) uses 15 pixels at 224."""
    flat = relevance.flatten(1)
    at_max = flat == flat.amax(1, keepdim=True)
    hit = (at_max & dilate(masks, tolerance).flatten(1)).any(1)
    return _empty_to_nan(hit, masks)


def _ranked_mask(relevance: Tensor, masks: Tensor) -> Tensor:
    """The masks' pixels in the order of the map's values, largest first (ties by pixel index)."""
    order = relevance.flatten(1).argsort(dim=1, descending=True, stable=True)
    return masks.flatten(1).gather(1, order)


def relevance_rank_accuracy(relevance: Tensor, masks: Tensor) -> Tensor:
    """Share of the K highest-relevance pixels inside the mask, K = the mask's pixels (Arras et al. 2022);
    Quantus's RelevanceRankAccuracy. NaN for an empty mask."""
    ranked = _ranked_mask(relevance, masks).to(torch.float64).cumsum(1)
    k = masks.flatten(1).sum(1)
    inside = ranked.gather(1, (k - 1).clamp(min=0)[:, None]).squeeze(1)
    return _empty_to_nan(inside / k.clamp(min=1), masks)


def top_k_intersection(relevance: Tensor, masks: Tensor, k: int = 1000, concept_influence: bool = False) -> Tensor:
    """Share of the k highest-relevance pixels inside the mask (Theiner et al. 2021), times pixels / mask pixels
    with `concept_influence`; Quantus's TopKIntersection. NaN for an empty mask."""
    n_pixels = relevance[0].numel()
    if not 1 <= k <= n_pixels:
        raise ValueError(f"top-k intersection: k must be in [1, {n_pixels}] for {tuple(relevance.shape[1:])} maps, "
                         f"got {k}")
    value = _ranked_mask(relevance, masks)[:, :k].to(torch.float64).mean(1)
    if concept_influence:
        value = value * n_pixels / masks.flatten(1).sum(1).clamp(min=1)
    return _empty_to_nan(value, masks)


def attribution_localisation(relevance: Tensor, masks: Tensor, positive: bool = False,
                             weighted: bool = False) -> Tensor:
    """Relevance inside the mask / all relevance (Kohlbrenner et al. 2020) on |normalised map| (on its positive
    part with `positive`), + 1e-9 in the denominator as Quantus's AttributionLocalisation; times the mask's share
    of the image with `weighted` (Quantus 0.6.0 divides by x_batch[2:].size there, a bug: see docs/metrics.md).
    NaN for an empty mask."""
    a = normalise_by_max(relevance.to(torch.float64)).flatten(1)
    a = a.clamp(min=0) if positive else a.abs()
    m = masks.flatten(1)
    value = (a * m).sum(1) / (a.sum(1) + 1e-9)
    if weighted:
        value = value * m.sum(1) / m.shape[1]
    return _empty_to_nan(value, masks)


def sparseness(relevance: Tensor, eps: float = 1e-7) -> Tensor:
    """Gini index of |normalised map| + eps (Chalasani et al. 2020); Quantus's Sparseness (eps 1e-7). The `gini`
    column is the same index without normalisation and eps."""
    a = normalise_by_max(relevance.to(torch.float64)).flatten(1).abs() + eps
    a = a.sort(1).values
    n = a.shape[1]
    weights = 2.0 * torch.arange(1, n + 1, dtype=a.dtype, device=a.device) - n - 1
    return (a * weights).sum(1) / (n * a.sum(1))


def complexity(relevance: Tensor) -> Tensor:
    """Shannon entropy (nats) of |map| as a distribution over pixels, log(p + 1e-12) (Bhatt et al. 2020); Quantus's
    Complexity. The `entropy` column differs: positive part only, divided by log(pixels)."""
    a = normalise_by_max(relevance.to(torch.float64)).flatten(1).abs()
    p = a / a.sum(1, keepdim=True)
    return -(p * torch.log(p + 1e-12)).sum(1)


def effective_complexity(relevance: Tensor, eps: float = 1e-5) -> Tensor:
    """Number of pixels whose |map| / the map's largest |value| exceeds eps (Nguyen and Martinez 2020); Quantus's
    EffectiveComplexity (eps 1e-5)."""
    a = normalise_by_max(relevance.to(torch.float64)).flatten(1).abs()
    return (a > eps).sum(1)
