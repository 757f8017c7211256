"""The run's evaluation metrics beside the map statistics, by name (docs/metrics.md): which exist, which need the
model, their settings, and the per-image columns of one batch (`batch_columns`), as Quantus 0.6.0 computes them.

maps.py: localisation and complexity (the map and the boxes' mask alone); model.py: faithfulness correlation,
region perturbation, ROAD (forward passes of the traced classifier) and random logit (a second LRP pass)."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..faithfulness import stable_seed
from . import maps
from . import model as model_metrics

GROUPS: dict[str, tuple[str, ...]] = {
    "localisation": ("pointing_game", "relevance_rank_accuracy", "top_k_intersection", "attribution_localisation"),
    "complexity": ("sparseness", "complexity", "effective_complexity"),
    "faithfulness": ("faithfulness_correlation", "region_perturbation", "road"),
    "randomisation": ("random_logit",),
}
METRICS = tuple(name for names in GROUPS.values() for name in names)
NEEDS_CLASSIFIER = frozenset(GROUPS["faithfulness"])  # forward passes of perturbed inputs
NEEDS_LRP = frozenset(GROUPS["randomisation"])  # a second LRP pass, for another class
ROAD_PERCENTAGES = tuple(range(1, 100, 2))  # Quantus's default: 1, 3, ..., 99 % of the pixels


def expand(names: str | Sequence[str] | None) -> tuple[str, ...]:
    """Metric names from names and group names ("all": every metric), in METRICS order; an unknown name is a
    ValueError naming it."""
    if names is None:
        return ()
    if isinstance(names, str):
        names = [names]
    chosen: set[str] = set()
    for name in names:
        if name == "all":
            chosen.update(METRICS)
        elif name in GROUPS:
            chosen.update(GROUPS[name])
        elif name in METRICS:
            chosen.add(name)
        else:
            raise ValueError(f"unknown metric {name!r} (metrics: {', '.join(METRICS)}; groups: "
                             f"{', '.join(GROUPS)}, all)")
    return tuple(name for name in METRICS if name in chosen)


@dataclass(frozen=True)
class MetricSettings:
    """Which metrics a run computes and their parameters (configs/run.yaml's metrics block; docs/metrics.md)."""

    names: tuple[str, ...]
    pointing_tolerance: float = 0.0  # pixels; Quantus 0, TorchRay 15
    top_k_pixels: int = 1000
    effective_complexity_eps: float = 1e-5
    correlation_runs: int = 100
    correlation_subset: int = 224
    region_patch: int = 8
    region_steps: int = 100
    region_score: str = "softmax"  # Quantus's default; Samek et al. use the logit
    road_percentages: tuple[float, ...] = ROAD_PERCENTAGES
    road_noise: float = 0.01
    seed: int = 0
    classifier: str | None = None  # the traced forward-only classifier, for the faithfulness metrics

    def needs_classifier(self) -> bool:
        return bool(NEEDS_CLASSIFIER & set(self.names))


def box_masks(boxes: Sequence[Sequence[Sequence[float]] | None], height: int, width: int) -> Tensor:
    """(N, H, W) masks of each image's boxes (pipeline.stats.box_mask; empty without boxes)."""
    from ..stats import box_mask

    return torch.stack([box_mask(b or [], height, width) for b in boxes]) if boxes else \
        torch.zeros(0, height, width, dtype=torch.bool)


def map_columns(relevance: Tensor, masks: Tensor, settings: MetricSettings) -> dict[str, Tensor]:
    """The localisation and complexity columns chosen, per image."""
    names, out = set(settings.names), {}
    if "pointing_game" in names:
        out["pointing_game"] = maps.pointing_game(relevance, masks, settings.pointing_tolerance)
    if "relevance_rank_accuracy" in names:
        out["relevance_rank_accuracy"] = maps.relevance_rank_accuracy(relevance, masks)
    if "top_k_intersection" in names:
        out["top_k_intersection"] = maps.top_k_intersection(relevance, masks, settings.top_k_pixels)
    if "attribution_localisation" in names:
        out["attribution_localisation"] = maps.attribution_localisation(relevance, masks)
    if "sparseness" in names:
        out["sparseness"] = maps.sparseness(relevance)
    if "complexity" in names:
        out["complexity"] = maps.complexity(relevance)
    if "effective_complexity" in names:
        out["effective_complexity"] = maps.effective_complexity(relevance, settings.effective_complexity_eps)
    return out


def model_columns(forward: Callable[[Tensor], Tensor] | None, explain: Callable[[Tensor, Tensor], Tensor] | None,
                  x: Tensor, relevance: Tensor, target: Tensor, classes: int, image_ids: Sequence[str],
                  settings: MetricSettings, batch_size: int = 64) -> dict[str, Tensor]:
    """The faithfulness and randomisation columns chosen, per image; every random draw from a generator seeded
    by the image's id and the run's seed (the same values whatever the batch, device or actor)."""
    names, out = set(settings.names), {}
    seeds = [stable_seed(image_id, settings.seed) for image_id in image_ids]
    n = x.shape[0]
    if "faithfulness_correlation" in names:
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        subsets = model_metrics.draw_subsets(generators, x[0].numel(), settings.correlation_runs,
                                             settings.correlation_subset)
        out["faithfulness_correlation"] = model_metrics.faithfulness_correlation(
            forward, x, relevance, target, subsets, batch_size=batch_size)
    if "region_perturbation" in names:
        curves = {order: model_metrics.region_perturbation(forward, x, relevance, target, settings.region_patch,
                                                           settings.region_steps, order, settings.region_score,
                                                           batch_size) for order in ("morf", "lerf")}
        morf, lerf = (model_metrics.aopc(curves[order]) for order in ("morf", "lerf"))
        out.update(region_morf=curves["morf"], region_lerf=curves["lerf"], region_morf_aopc=morf,
                   region_lerf_aopc=lerf, region_abpc=morf - lerf)
    if "road" in names:
        generators = [torch.Generator().manual_seed(s + 1) for s in seeds]
        shape = (len(settings.road_percentages), *x.shape[1:])
        noise = torch.stack([torch.randn(shape, generator=g, dtype=torch.float64) for g in generators]) \
            * settings.road_noise if n else torch.zeros(0, *shape)
        curve = model_metrics.road(forward, x, relevance, target, settings.road_percentages, noise, batch_size)
        out.update(road=curve, road_auc=curve.mean(1))
    if "random_logit" in names:
        generators = [torch.Generator().manual_seed(s + 2) for s in seeds]
        draws = torch.stack([torch.randint(0, classes - 1, (1,), generator=g) for g in generators]).flatten() \
            if n else torch.zeros(0, dtype=torch.long)
        other = model_metrics.other_classes(target, classes, draws)
        other_relevance = explain(x, other.to(x.device)).to(relevance)
        out.update(random_logit=model_metrics.random_logit(relevance, other_relevance), random_logit_class=other)
    return out


def batch_columns(settings: MetricSettings, relevance: Tensor, boxes: Sequence, x: Tensor, target: Tensor,
                  classes: int, image_ids: Sequence[str], forward: Callable[[Tensor], Tensor] | None = None,
                  explain: Callable[[Tensor, Tensor], Tensor] | None = None,
                  batch_size: int = 64) -> dict[str, Tensor]:
    """Every chosen metric's columns for one batch of maps (N, H, W) and the time they took per image."""
    start = time.perf_counter()
    h, w = relevance.shape[-2:]
    out = map_columns(relevance, box_masks(boxes, h, w), settings)
    if (NEEDS_CLASSIFIER | NEEDS_LRP) & set(settings.names):
        out.update(model_columns(forward, explain, x, relevance.to(x.device), target, classes, image_ids, settings,
                                 batch_size))
    out["metrics_seconds"] = torch.full((relevance.shape[0],), (time.perf_counter() - start) / max(1, len(image_ids)))
    # the columns are float32 (computed in float64): the value a row holds is the value its file holds
    return {name: v.float().cpu() if v.is_floating_point() else v.cpu() for name, v in out.items()}
