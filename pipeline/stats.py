"""Per-image statistics of relevance maps: pure, batched functions of (N, H, W) maps, logits and boxes.

Every function takes channel-summed maps `relevance` (N, H, W) and returns one value (or one row) per image,
so the pipeline's actors compute them for a whole batch at once.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

TOP_FRACTIONS = (0.01, 0.05, 0.10)


def sums(relevance: Tensor) -> dict[str, Tensor]:
    """Total, positive and negative relevance and the largest |value| per image."""
    flat = relevance.flatten(1)
    return {
        "relevance_sum": flat.sum(1),
        "positive_sum": flat.clamp(min=0).sum(1),
        "negative_sum": flat.clamp(max=0).sum(1),
        "max_abs": flat.abs().amax(1),
    }


def positive_fraction_in_top(relevance: Tensor, fractions: Sequence[float] = TOP_FRACTIONS) -> dict[str, Tensor]:
    """Share of each image's positive relevance held by its top 1 %, 5 %, 10 % of pixels (ranked by value)."""
    positive = relevance.flatten(1).clamp(min=0)
    ranked = positive.sort(dim=1, descending=True).values.cumsum(dim=1)
    total = ranked[:, -1]
    n = positive.shape[1]
    out = {}
    for fraction in fractions:
        k = max(1, int(round(fraction * n)))
        share = ranked[:, k - 1] / total.masked_fill(total == 0, 1.0)
        out[f"positive_in_top{round(fraction * 100):d}pct"] = torch.where(total > 0, share, torch.nan)
    return out


def gini(relevance: Tensor) -> Tensor:
    """Gini sparsity of |relevance| (0: spread evenly, 1: one pixel holds everything); NaN for an all-zero map."""
    x = relevance.flatten(1).abs().sort(dim=1).values
    n = x.shape[1]
    total = x.sum(1)
    weights = 2.0 * torch.arange(1, n + 1, dtype=x.dtype, device=x.device) - n - 1
    value = (x * weights).sum(1) / (n * total.masked_fill(total == 0, 1.0))
    return torch.where(total > 0, value, torch.nan)


def entropy(relevance: Tensor) -> Tensor:
    """Shannon entropy of the positive relevance as a distribution over pixels, divided by log(pixels), so
    0 means one pixel and 1 means uniform; NaN when there is no positive relevance."""
    p = relevance.flatten(1).clamp(min=0)
    total = p.sum(1, keepdim=True)
    p = p / total.masked_fill(total == 0, 1.0)
    h = -(p * torch.log(p.masked_fill(p == 0, 1.0))).sum(1)
    n = p.shape[1]
    return torch.where(total.squeeze(1) > 0, h / torch.log(torch.tensor(float(n))), torch.nan)


def centre_of_mass(relevance: Tensor) -> tuple[Tensor, Tensor]:
    """(row, column) of the positive relevance's centre of mass in map pixels; NaN without positive relevance."""
    positive = relevance.clamp(min=0)
    total = positive.flatten(1).sum(1)
    h, w = relevance.shape[-2:]
    rows = torch.arange(h, dtype=relevance.dtype, device=relevance.device)
    cols = torch.arange(w, dtype=relevance.dtype, device=relevance.device)
    safe = total.masked_fill(total == 0, 1.0)
    row = (positive.sum(2) * rows).sum(1) / safe
    col = (positive.sum(1) * cols).sum(1) / safe
    missing = total == 0
    return row.masked_fill(missing, torch.nan), col.masked_fill(missing, torch.nan)


def box_mask(boxes: Sequence[Sequence[float]], height: int, width: int) -> Tensor:
    """Boolean (H, W) mask of the union of boxes (x_min, y_min, x_max, y_max) in map pixels, edges inclusive of
    every pixel whose centre lies inside."""
    mask = torch.zeros(height, width, dtype=torch.bool)
    centres_y = torch.arange(height, dtype=torch.float32) + 0.5
    centres_x = torch.arange(width, dtype=torch.float32) + 0.5
    for x0, y0, x1, y1 in boxes:
        inside_y = (centres_y >= y0) & (centres_y <= y1)
        inside_x = (centres_x >= x0) & (centres_x <= x1)
        mask |= inside_y[:, None] & inside_x[None, :]
    return mask


def localisation(relevance: Tensor, boxes: Sequence[Sequence[Sequence[float]] | None]) -> dict[str, Tensor]:
    """Pointing game (is the arg-max pixel inside a box?) and the share of positive relevance inside the boxes,
    which is Arras et al.'s relevance mass accuracy (Information Fusion 2022, CLEVR-XAI) for a channel-summed
    map with their "sum,pos" pooling: positive relevance inside / all positive relevance, the union of the boxes as
    the mask. `boxes[i]` is a list of boxes for image i in map pixels, or None/empty (then both are NaN); both are
    NaN too for a map without positive relevance (its arg-max would be an arbitrary pixel)."""
    n, h, w = relevance.shape
    hit = torch.full((n,), torch.nan)
    inside = torch.full((n,), torch.nan)
    for i, image_boxes in enumerate(boxes):
        if not image_boxes:
            continue
        mask = box_mask(image_boxes, h, w).to(relevance.device)
        r = relevance[i]
        positive = r.clamp(min=0)
        total = positive.sum()
        if total > 0:  # without positive relevance there is nothing to point with: both stay null
            hit[i] = float(mask.flatten()[r.flatten().argmax()])
            inside[i] = float(positive[mask].sum() / total)
    return {"pointing_game_hit": hit, "positive_in_box": inside}


def prediction(logits: Tensor, target: Tensor, top: int = 5) -> dict[str, Tensor]:
    """Predicted class, the class explained, probability and logit of both, and the top classes."""
    probabilities = torch.softmax(logits, dim=1)
    predicted = logits.argmax(1)
    k = min(top, logits.shape[1])
    return {
        "pred": predicted,
        "target": target,
        "pred_logit": logits.gather(1, predicted[:, None]).squeeze(1),
        "pred_probability": probabilities.gather(1, predicted[:, None]).squeeze(1),
        "target_logit": logits.gather(1, target[:, None]).squeeze(1),
        "target_probability": probabilities.gather(1, target[:, None]).squeeze(1),
        "top5": logits.topk(k, dim=1).indices,
    }


def correctness(predicted: Tensor, labels: Sequence[int | None]) -> dict[str, Tensor]:
    """Whether each prediction equals the label, as 1. / 0., NaN for an image without label."""
    known = torch.tensor([label is not None for label in labels], dtype=torch.bool)
    label = torch.tensor([-1 if label is None else label for label in labels], dtype=torch.long)
    hit = (predicted.cpu().long() == label).float()
    return {"correct": torch.where(known, hit, torch.nan)}


def start_relevance(logits: Tensor, target: Tensor, start: str = "logit") -> Tensor:
    """The relevance LRP starts from, per image: the target's logit, or 1 for a softmax start (`seed`)."""
    if start == "softmax":
        return torch.ones(logits.shape[0], dtype=logits.dtype, device=logits.device)
    return logits.gather(1, target[:, None]).squeeze(1)


def conservation(relevance_sum: Tensor, start: Tensor) -> dict[str, Tensor]:
    """How much of the start relevance reaches the input (sum of the map / start) and the share absorbed on the
    way (1 - conservation: by biases, stabilisers and the top-k filter; negative where biases added relevance).
    NaN where the start relevance is 0."""
    ratio = relevance_sum / start.masked_fill(start == 0, 1.0)
    ratio = ratio.masked_fill(start == 0, torch.nan)
    return {"conservation": ratio, "absorbed": 1.0 - ratio}


def map_statistics(relevance: Tensor) -> dict[str, Tensor]:
    """Every box-free statistic of a batch of maps, by column name."""
    row, col = centre_of_mass(relevance)
    return {**sums(relevance), **positive_fraction_in_top(relevance), "gini": gini(relevance),
            "entropy": entropy(relevance), "centre_row": row, "centre_col": col}
