"""Faithfulness of relevance maps by region perturbation ("pixel flipping", Samek et al. 2017, IEEE TNNLS,
"Evaluating the visualization of what a deep neural network has learned"): pure, batched torch functions.

Choices, each fixed here so that every run measures the same thing:
- regions: the map is cut into non-overlapping `patch` x `patch` squares from the top-left corner; where H or W
  is not a multiple of `patch`, the last row / column of regions is smaller (224 = 24 * 9 + 8: 25 x 25 regions,
  the edge ones 8 pixels wide). Regions are ranked by the relevance SUMMED inside them (so a smaller edge region
  needs more relevance per pixel to rank as high), ties broken by region index (row-major).
  (Samek et al. perturb a 9x9 neighbourhood around each pixel location in relevance order; non-overlapping
  regions make every step perturb fresh pixels and need no per-pixel sort.)
- perturbation: at step k the k-th ranked region is replaced, cumulatively, by values drawn uniformly from the
  pixel range, which in normalised input space is per channel [(0 - mean) / std, (1 - mean) / std] (ImageNet's
  by default). Each image draws one noise image from its own seeded `torch.Generator` on the CPU, and a region
  takes its values from it when perturbed; MoRF and random order with the same seed therefore see the same noise
  (common random numbers), and nothing depends on the batch composition, the device or the number of actors.
- score: the target class's logit (pre-softmax), Samek et al.'s f(x).
- steps: at most the number of regions (more is a ValueError, not a silent clamp).
"""
from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lrp_module.weights_recipe import IMAGENET_HIGH, IMAGENET_LOW

ORDERS = ("morf", "random")


def stable_seed(key: str, base: int = 0) -> int:
    """A 63-bit seed derived from a stable id (e.g. the image id), the same in every process and run."""
    digest = hashlib.sha256(f"{base}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def region_count(height: int, width: int, patch: int) -> int:
    """Number of patch x patch regions of an H x W image (edge regions smaller)."""
    return math.ceil(height / patch) * math.ceil(width / patch)


def region_index(height: int, width: int, patch: int, device: torch.device | str = "cpu") -> Tensor:
    """(H, W) map of each pixel's region index, regions numbered row-major."""
    rows = torch.arange(height, device=device) // patch
    cols = torch.arange(width, device=device) // patch
    return rows[:, None] * math.ceil(width / patch) + cols[None, :]


def region_ranks(relevance: Tensor, patch: int, order: str, generators: Sequence[torch.Generator]) -> Tensor:
    """(N, H, W) rank of each pixel's region (0 = perturbed first): by summed relevance, descending, for MoRF;
    a seeded random permutation for `random`."""
    n, h, w = relevance.shape
    index = region_index(h, w, patch, relevance.device)
    count = region_count(h, w, patch)
    if order == "morf":
        sums = torch.zeros(n, count, dtype=torch.float64, device=relevance.device)
        sums.index_add_(1, index.flatten(), relevance.flatten(1).double())
        ranking = sums.argsort(dim=1, descending=True, stable=True)  # region ids, most relevant first
    else:
        ranking = torch.stack([torch.randperm(count, generator=g) for g in generators]).to(relevance.device)
    rank_of_region = torch.empty_like(ranking)
    rank_of_region.scatter_(1, ranking, torch.arange(count, device=relevance.device).expand(n, count))
    return rank_of_region[:, index]


def _bounds(value: float | Sequence[float], channels: int) -> Tensor:
    bound = torch.as_tensor(value, dtype=torch.float32).flatten()
    if bound.numel() not in (1, channels):
        raise ValueError(f"pixel range bound has {bound.numel()} values for {channels} channels")
    return bound.expand(channels).reshape(channels, 1, 1)


def _seeds(seed: int | Sequence[int] | Tensor, n: int) -> list[int]:
    if isinstance(seed, int):
        return [seed + i for i in range(n)]
    seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"seed: got {len(seeds)} per-image seeds for {n} images")
    return seeds


def region_perturbation(forward: Callable[[Tensor], Tensor], x: Tensor, relevance: Tensor, target: Tensor,
                        steps: int = 100, patch: int = 9, order: str = "morf",
                        seed: int | Sequence[int] | Tensor = 0, batch_size: int | None = None, *,
                        low: float | Sequence[float] = IMAGENET_LOW,
                        high: float | Sequence[float] = IMAGENET_HIGH) -> Tensor:
    """The target logit f(x^(k)) for k = 0..steps as an (N, steps + 1) float32 tensor on the CPU; x^(0) = x,
    x^(k) has the k first-ranked regions replaced by uniform noise in [low, high] (per channel).

    forward: (B, C, H, W) -> (B, classes) logits. x: (N, C, H, W) normalised inputs. relevance: (N, H, W).
    target: (N,) class indices. seed: an int (image i uses seed + i) or one seed per image (e.g. `stable_seed`
    of its id). batch_size: perturbed inputs per forward call (default N); inputs are built batch by batch.
    """
    if x.dim() != 4 or relevance.shape != (x.shape[0], *x.shape[2:]) or tuple(target.shape) != (x.shape[0],):
        raise ValueError(f"shapes: x {tuple(x.shape)}, relevance {tuple(relevance.shape)} and target "
                         f"{tuple(target.shape)} must be (N, C, H, W), (N, H, W) and (N,)")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    n, channels, h, w = x.shape
    if isinstance(patch, bool) or not isinstance(patch, int) or not 1 <= patch <= min(h, w):
        raise ValueError(f"patch must be an integer in [1, {min(h, w)}] for {h}x{w} images, got {patch!r}")
    count = region_count(h, w, patch)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= count:
        raise ValueError(f"steps must be an integer in [1, {count}] (the {patch}x{patch} regions of a {h}x{w} "
                         f"image), got {steps!r}")
    batch_size = batch_size or max(n, 1)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    relevance = relevance.to(x.device)
    generators = [torch.Generator().manual_seed(s) for s in _seeds(seed, n)]
    lower, upper = _bounds(low, channels), _bounds(high, channels)
    # drawn first, so that the noise is the same for MoRF and random order
    noise = torch.stack([torch.rand((channels, h, w), generator=g) * (upper - lower) + lower for g in generators])
    noise = noise.to(device=x.device, dtype=x.dtype)
    ranks = region_ranks(relevance, patch, order, generators)
    pairs = torch.cartesian_prod(torch.arange(n), torch.arange(steps + 1)) if n else torch.zeros(0, 2).long()
    scores = torch.empty(n * (steps + 1), dtype=torch.float32)
    target = target.to(x.device).long()
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            image, step = pairs[start:start + batch_size].to(x.device).unbind(1)
            perturbed = ranks[image] < step[:, None, None]  # (B, H, W): regions ranked before step k
            batch = torch.where(perturbed[:, None], noise[image], x[image])
            logits = forward(batch)
            scores[start:start + len(image)] = logits.gather(1, target[image][:, None]).squeeze(1).float().cpu()
    return scores.reshape(n, steps + 1)


def aopc(curve: Tensor) -> Tensor:
    """Area over the perturbation curve per image: 1/(L+1) * sum_{k=0..L} (f(x^(0)) - f(x^(k)))."""
    return (curve[:, :1] - curve).mean(dim=1)


def flip_statistics(forward: Callable[[Tensor], Tensor], x: Tensor, relevance: Tensor, target: Tensor,
                    image_ids: Sequence[str], steps: int, patch: int, batch_size: int | None = None
                    ) -> dict[str, Tensor]:
    """The pipeline's per-image faithfulness columns: MoRF and random-order curves and their AOPC, each image
    seeded by its id (`stable_seed`), and the time both took per image."""
    seeds = [stable_seed(image_id) for image_id in image_ids]
    start = time.perf_counter()
    curves = {order: region_perturbation(forward, x, relevance, target, steps=steps, patch=patch, order=order,
                                         seed=seeds, batch_size=batch_size) for order in ORDERS}
    seconds = (time.perf_counter() - start) / max(1, x.shape[0])
    return {"aopc_morf": aopc(curves["morf"]), "aopc_random": aopc(curves["random"]),
            "flip_curve_morf": curves["morf"], "flip_curve_random": curves["random"],
            "flip_seconds": torch.full((x.shape[0],), seconds)}
