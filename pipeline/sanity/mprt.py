"""MPRT and eMPRT on a batch of images: the maps of the original model and of each randomised model (our engine,
LRPModel, on the randomised copy), compared per image and per layer. A table, one row per image, mode and step."""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from lrp_module import LRPModel

from .measures import ENTROPY_BINS, SSIM_MODES, discrete_entropy, prepared, spearman, ssim, top_k_intersection
from .randomise import DEFAULT_SEED, MODES, randomisable, randomised_models

INTERSECTION_K = 1000  # Quantus's TopKIntersection default (pixels)


@dataclass(frozen=True)
class SanityParams:
    """The test's settings (docs/sanity.md): modes, the randomisation seed, the SSIM variant, the top-k
    intersection's k (pixels; at most the map's), eMPRT's histogram bins, images per LRP pass."""

    modes: tuple[str, ...] = MODES
    seed: int = DEFAULT_SEED
    ssim: str = "image"
    intersection_k: int = INTERSECTION_K
    entropy_bins: int = ENTROPY_BINS
    batch_size: int = 16

    def problem(self) -> str | None:
        """What is wrong with these settings, in one line, or None."""
        unknown = [m for m in self.modes if m not in MODES]
        if not self.modes or unknown:
            return f"unknown mode {','.join(unknown) or '(none)'} (known: {', '.join(MODES)})"
        if self.ssim not in SSIM_MODES:
            return f"unknown SSIM variant {self.ssim!r} (known: {', '.join(SSIM_MODES)})"
        for name in ("intersection_k", "entropy_bins", "batch_size"):
            if getattr(self, name) < 1:
                return f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
        return None


@dataclass
class MapSet:
    """One model's maps (N, H, W) and predictions (N,) for the sample."""

    maps: np.ndarray
    pred: np.ndarray


def explain(model: nn.Module, composite: str, top_k: float, x: torch.Tensor, targets: torch.Tensor,
            batch_size: int, device: torch.device, dtype: torch.dtype) -> MapSet:
    """The channel-summed LRP maps of `model` for `targets`, `batch_size` images per pass, on `device`. The LRP
    model holds `model`'s own weight tensors where it can (no copy), or those of a converted copy when `model` is
    on another device or of another dtype (`model` itself is never changed: it may be a working copy whose
    next draw must be Quantus's)."""
    weight = next(model.parameters())
    if weight.device != device or weight.dtype != dtype:
        model = copy.deepcopy(model).to(device=device, dtype=dtype)
    lrp = LRPModel(model, composite=composite, top_k=top_k, share_weights=True)
    maps, preds = [], []
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size].to(device=device, dtype=dtype)
        logits, relevance = lrp.explain(xb, targets[start:start + batch_size].to(device))
        maps.append(relevance.sum(dim=1).double().cpu().numpy())
        preds.append(logits.argmax(dim=1).cpu().numpy())
    return MapSet(np.concatenate(maps), np.concatenate(preds))


def compare(original: MapSet, other: MapSet, params: SanityParams, original_entropy: np.ndarray
            ) -> dict[str, np.ndarray]:
    """Each image's similarities of `other`'s map to the original's, its entropy and eMPRT's relative change."""
    a, b = prepared(original.maps), prepared(other.maps)
    k = min(params.intersection_k, a[0].size)
    h = discrete_entropy(other.maps, params.entropy_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        emprt = (h - original_entropy) / original_entropy
    return {"pred": other.pred.astype(np.int64), "spearman_abs": spearman(a, b),
            "spearman": spearman(original.maps, other.maps), "ssim": ssim(a, b, params.ssim),
            "top_k_intersection": top_k_intersection(a, b, k), "entropy": h, "emprt": emprt}


@dataclass
class Timing:
    """Seconds spent: the LRP passes (original + randomised models), the randomisation, the comparisons."""

    lrp: float = 0.0
    randomise: float = 0.0
    compare: float = 0.0
    passes: int = 0  # LRP passes over the whole sample


def mprt(model: nn.Module, composite: str, top_k: float, x: torch.Tensor, targets: torch.Tensor,
         params: SanityParams = SanityParams(), device: torch.device | str = "cpu",
         dtype: torch.dtype = torch.float32, progress: Callable[[int], None] | None = None,
         timing: Timing | None = None) -> pd.DataFrame:
    """Rows of SANITY_COLUMNS less the run's bookkeeping (image_id, shard, row): `index` is the image's position
    in `x`. Every randomised model is explained on the whole sample in batches of `params.batch_size`."""
    device, timing = torch.device(device), timing if timing is not None else Timing()
    layers = randomisable(model)
    if not layers:
        raise ValueError("the model has no layer with reset_parameters to randomise")

    def explained(candidate: nn.Module) -> MapSet:
        started = time.perf_counter()
        maps = explain(candidate, composite, top_k, x, targets, params.batch_size, device, dtype)
        timing.lrp += time.perf_counter() - started
        timing.passes += 1
        return maps

    original = explained(copy.deepcopy(model).cpu().eval())
    h0 = discrete_entropy(original.maps, params.entropy_bins)
    frames = []
    cache: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
    for mode in params.modes:
        frames.append(_frame(mode, 0, "original", targets, compare(original, original, params, h0)))
        started = time.perf_counter()
        for step, layer, random_layers, candidate in randomised_models(model, layers, mode, params.seed):
            timing.randomise += time.perf_counter() - started
            key = tuple(sorted(random_layers))
            if key not in cache:  # the first cascading step is the top layer's independent one
                other = explained(candidate)
                started = time.perf_counter()
                cache[key] = compare(original, other, params, h0)
                timing.compare += time.perf_counter() - started
            frames.append(_frame(mode, step, layer, targets, cache[key]))
            if progress is not None:
                progress(1)
            started = time.perf_counter()
    return pd.concat(frames, ignore_index=True)


def _frame(mode: str, step: int, layer: str, targets: torch.Tensor, values: dict[str, np.ndarray]) -> pd.DataFrame:
    n = len(targets)
    return pd.DataFrame({"index": np.arange(n), "target": targets.cpu().numpy().astype(np.int64), "mode": mode,
                         "step": step, "layer": layer, **values})


def total_steps(model: nn.Module, modes: Sequence[str]) -> int:
    """Randomised models a test of `modes` explains (for a progress bar)."""
    return len(randomisable(model)) * len(modes)
