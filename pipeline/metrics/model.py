"""Per-image metrics that need the model: faithfulness correlation, region perturbation (MoRF, LeRF and the area
between), ROAD, and random logit, as Quantus 0.6.0 defines them (docs/metrics.md). Batched torch functions; the
model is a forward callable (B, C, H, W) -> (B, classes) (the worker's traced classifier), called on batches of
perturbed inputs.

Randomness never depends on the batch: each image draws from its own generator (seeded by its id where the
pipeline runs it), and the draws can be passed in instead (the parity tests pass Quantus's own).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.linalg import spsolve
from torch import Tensor

from .maps import normalise_by_max

Forward = Callable[[Tensor], Tensor]
SCORES = ("logit", "softmax")


def _scores(forward: Forward, inputs: Tensor, target: Tensor, score: str) -> Tensor:
    """The target class's logit or softmax probability, float64."""
    with torch.no_grad():
        out = forward(inputs)
    if score == "softmax":
        out = torch.softmax(out.double(), dim=1)
    return out.gather(1, target[:, None].to(out.device)).squeeze(1).double().cpu()


def _batched(forward: Forward, make: Callable[[Tensor], tuple[Tensor, Tensor]], count: int, batch_size: int,
             score: str) -> Tensor:
    """Scores of `count` perturbed inputs built `batch_size` at a time by make(indices) -> (inputs, targets)."""
    out = torch.empty(count, dtype=torch.float64)
    for start in range(0, count, batch_size):
        index = torch.arange(start, min(count, start + batch_size))
        inputs, targets = make(index)
        out[index] = _scores(forward, inputs, targets, score)
    return out


def black(x: Tensor) -> Tensor:
    """Quantus's 'black' baseline: each image's smallest input value (over channels and pixels), (N,)."""
    return x.flatten(1).amin(1)


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of each row of a with the same row of b (scipy.stats.pearsonr's value), float64."""
    a, b = a.double(), b.double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    a = a / a.norm(dim=1, keepdim=True)
    b = b / b.norm(dim=1, keepdim=True)
    return (a * b).sum(1).clamp(-1.0, 1.0)


def draw_subsets(generators: Sequence[torch.Generator], features: int, runs: int, size: int) -> Tensor:
    """(N, runs, size) feature indices: per image and run, `size` distinct features drawn uniformly."""
    return torch.stack([torch.stack([torch.randperm(features, generator=g)[:size] for _ in range(runs)])
                        for g in generators])


def faithfulness_correlation(forward: Forward, x: Tensor, relevance: Tensor, target: Tensor, subsets: Tensor,
                             score: str = "logit", batch_size: int = 64) -> Tensor:
    """Pearson correlation, over runs, between the relevance of a random feature subset and the score's drop when
    that subset is set to the black baseline (Bhatt et al. 2020); Quantus's FaithfulnessCorrelation. Features are
    input values (C x H x W, the map repeated over channels, as Quantus broadcasts it); subsets: (N, runs, size)."""
    n, channels, h, w = x.shape
    runs = subsets.shape[1]
    flat_x = x.flatten(1)
    flat_a = relevance.to(torch.float64).flatten(1).repeat(1, channels)  # the map broadcast over channels
    base = black(x)
    target = target.long()
    original = _scores(forward, x, target, score)
    sums = flat_a.gather(1, subsets.flatten(1).to(flat_a.device)).reshape(n, runs, -1).sum(2)

    def make(index: Tensor) -> tuple[Tensor, Tensor]:
        image, run = index // runs, index % runs
        inputs = flat_x[image].clone()
        chosen = subsets[image, run].to(inputs.device)
        inputs.scatter_(1, chosen, base[image][:, None].expand_as(chosen).to(inputs.dtype))
        return inputs.reshape(len(index), channels, h, w), target[image]

    perturbed = _batched(forward, make, n * runs, batch_size, score).reshape(n, runs)
    return pearson(sums.cpu(), original[:, None] - perturbed)


def padding(size: int, patch: int) -> tuple[int, int]:
    """Quantus's padding of a side to a multiple of the patch: half before (floor), half after (ceil)."""
    extra = (-size) % patch
    return extra // 2, extra - extra // 2


def region_ranking(relevance: Tensor, patch: int, order: str) -> tuple[Tensor, Tensor]:
    """(N, regions) region ids, first perturbed first, and the (H, W) region id of each pixel: patch x patch
    regions of the map padded as Quantus pads it (centred), ranked by summed relevance, descending for MoRF,
    ascending for LeRF, ties by region id (Quantus's argsort leaves ties in an unspecified order)."""
    n, h, w = relevance.shape
    (top, _), (left, _) = padding(h, patch), padding(w, patch)
    rows = (torch.arange(h) + top) // patch
    cols = (torch.arange(w) + left) // patch
    per_row = math.ceil((w + (-w) % patch) / patch)
    region = rows[:, None] * per_row + cols[None, :]
    count = math.ceil((h + (-h) % patch) / patch) * per_row
    sums = torch.zeros(n, count, dtype=torch.float64)
    sums.index_add_(1, region.flatten(), relevance.to(torch.float64).cpu().flatten(1))
    ranking = sums.argsort(dim=1, descending=order == "morf", stable=True)
    return ranking, region


def region_perturbation(forward: Forward, x: Tensor, relevance: Tensor, target: Tensor, patch: int = 8,
                        steps: int = 100, order: str = "morf", score: str = "softmax",
                        batch_size: int = 64) -> Tensor:
    """(N, steps): f(x) - f(x_k) for k = 1..steps, x_k with its k first-ranked regions set to the black baseline
    (Samek et al. 2017's region perturbation as Quantus's RegionPerturbation computes it: centred padding, the
    score a softmax probability by default)."""
    if order not in ("morf", "lerf"):
        raise ValueError(f"region perturbation order must be morf or lerf, got {order!r}")
    n, channels, h, w = x.shape
    ranking, region = region_ranking(relevance, patch, order)
    if not 1 <= steps <= ranking.shape[1]:
        raise ValueError(f"region perturbation: steps must be in [1, {ranking.shape[1]}], got {steps}")
    rank_of_region = torch.empty_like(ranking)
    rank_of_region.scatter_(1, ranking, torch.arange(ranking.shape[1]).expand_as(ranking).contiguous())
    ranks = rank_of_region[:, region].to(x.device)  # (N, H, W)
    base = black(x)
    target = target.long()
    original = _scores(forward, x, target, score)

    def make(index: Tensor) -> tuple[Tensor, Tensor]:
        image, step = index // steps, index % steps + 1
        image_d, step_d = image.to(x.device), step.to(x.device)
        hidden = ranks[image_d] < step_d[:, None, None]
        inputs = torch.where(hidden[:, None], base[image_d][:, None, None, None].to(x.dtype), x[image_d])
        return inputs, target[image]

    perturbed = _batched(forward, make, n * steps, batch_size, score).reshape(n, steps)
    return original[:, None] - perturbed


def aopc(curve: Tensor) -> Tensor:
    """Samek et al.'s AOPC of a drop curve f(x) - f(x_k), k = 1..L: sum / (L + 1) (the k = 0 term is 0)."""
    return curve.sum(1) / (curve.shape[1] + 1)


NEIGHBOURS = ((1, 1, 1 / 12), (0, 1, 1 / 6), (-1, 1, 1 / 12), (1, -1, 1 / 12), (0, -1, 1 / 6), (-1, -1, 1 / 12),
              (1, 0, 1 / 6), (-1, 0, 1 / 6))


def linear_imputation(image: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """(C, H, W) image with the pixels (flat indices into H x W) replaced, in every channel, by the solution of
    the ROAD system (Rong et al. 2022): each replaced pixel equals the weighted mean of its in-frame 8 neighbours
    (1/6 sides, 1/12 corners); float64. Quantus's noisy_linear_imputation without its noise."""
    channels, h, w = image.shape
    flat = image.reshape(channels, -1).astype(np.float64)
    unknown = len(pixels)
    if unknown == 0:
        return flat.reshape(image.shape).copy()
    variable = np.full(h * w, -1, dtype=np.int64)
    variable[pixels] = np.arange(unknown)
    row, col = pixels // w, pixels % w
    diagonal = np.zeros(unknown)
    rhs = np.zeros((unknown, channels))
    a_rows, a_cols, a_values = [np.arange(unknown)], [np.arange(unknown)], []
    for dr, dc, weight in NEIGHBOURS:
        r, c = row + dr, col + dc
        inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
        diagonal[inside] -= weight
        ids = np.nonzero(inside)[0]
        neighbour = r[inside] * w + c[inside]
        other = variable[neighbour]
        free = other >= 0
        a_rows.append(ids[free])
        a_cols.append(other[free])
        a_values.append(np.full(int(free.sum()), weight))
        np.subtract.at(rhs, ids[~free], weight * flat[:, neighbour[~free]].T)
    values = np.concatenate([diagonal, *a_values])
    system = coo_matrix((values, (np.concatenate(a_rows), np.concatenate(a_cols))), shape=(unknown, unknown)).tocsc()
    solution = spsolve(system, rhs)
    out = flat.copy()
    out[:, pixels] = np.asarray(solution).reshape(unknown, channels).T
    return out.reshape(image.shape)


def road_pixels(relevance: Tensor, percentages: Sequence[float]) -> Iterator[tuple[int, np.ndarray]]:
    """Per percentage p: the int(H*W*p/100) most relevant pixels of each map (flat indices, ties by index)."""
    n = relevance.shape[0]
    order = relevance.flatten(1).argsort(dim=1, descending=True, stable=True).cpu().numpy()
    pixels = order.shape[1]
    for p_index, p in enumerate(percentages):
        yield p_index, order[:, :int(pixels * p / 100)].reshape(n, -1)


def road(forward: Forward, x: Tensor, relevance: Tensor, target: Tensor, percentages: Sequence[float],
         noise: Tensor | float = 0.0, batch_size: int = 64) -> Tensor:
    """(N, P) 1. where the model still predicts the target with the p % most relevant pixels imputed (all
    channels, `linear_imputation` + noise), ROAD's MoRF accuracy curve (Rong et al. 2022; docs/metrics.md on how
    Quantus 0.6.0 differs). noise: a float std (drawn from the global generator) or (N, P, C, H, W) values added
    to the imputed pixels."""
    n, channels, h, w = x.shape
    images = x.detach().cpu().double().numpy()
    perturbed = np.empty((n, len(percentages), channels, h, w))
    for p_index, chosen in road_pixels(relevance, percentages):
        for i in range(n):
            filled = linear_imputation(images[i], chosen[i])
            if isinstance(noise, Tensor):
                extra = noise[i, p_index].double().numpy().reshape(channels, -1)
            else:
                extra = noise * np.random.randn(channels, h * w)
            flat = filled.reshape(channels, -1)
            flat[:, chosen[i]] += extra[:, chosen[i]]
            perturbed[i, p_index] = flat.reshape(channels, h, w)
    batch = torch.from_numpy(perturbed).to(device=x.device, dtype=x.dtype).flatten(0, 1)
    target = target.long().cpu()
    hits = torch.empty(n * len(percentages))
    with torch.no_grad():
        for start in range(0, len(batch), batch_size):
            predicted = forward(batch[start:start + batch_size]).argmax(1).cpu()
            hits[start:start + batch_size] = (predicted == target.repeat_interleave(len(percentages))[
                start:start + batch_size]).double()
    return hits.reshape(n, len(percentages)).double()


def ssim_1d(a: Tensor, b: Tensor, window: int = 7) -> Tensor:
    """skimage.metrics.structural_similarity of each row of a with the same row of b as 1-D signals (uniform
    window, sample covariance, K1 0.01, K2 0.03, data_range the rows' joint max - min), as Quantus's ssim on
    flattened maps; float64."""
    a, b = a.double(), b.double()
    data_range = (torch.maximum(a.amax(1), b.amax(1)) - torch.minimum(a.amin(1), b.amin(1))).abs()[:, None]

    def mean(v: Tensor) -> Tensor:
        return torch.nn.functional.avg_pool1d(v[:, None], window, stride=1)[:, 0]  # the cropped windows only

    cov_norm = window / (window - 1)
    ux, uy = mean(a), mean(b)
    vx = cov_norm * (mean(a * a) - ux * ux)
    vy = cov_norm * (mean(b * b) - uy * uy)
    vxy = cov_norm * (mean(a * b) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    return s.mean(1)


def other_classes(target: Tensor, classes: int, draws: Tensor) -> Tensor:
    """A class other than the target from a draw in [0, classes - 1) (Quantus's indexing of the class list
    without the target)."""
    draws = draws.to(target.device).long()
    return draws + (draws >= target.long()).long()


def random_logit(relevance: Tensor, other_relevance: Tensor) -> Tensor:
    """SSIM between the map of the target and the map of a random other class, each normalised by its largest
    |value| (Sixt et al. 2020); Quantus's RandomLogit with per-image normalisation. Low: the map depends on the
    class explained."""
    n = relevance.shape[0]
    return ssim_1d(normalise_by_max(relevance.double()).reshape(n, -1),
                   normalise_by_max(other_relevance.double()).reshape(n, -1))
