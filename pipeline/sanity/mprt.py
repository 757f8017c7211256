"""MPRT and eMPRT on a batch of images: the maps of the original model and of each randomised model (our engine,
LRPModel, on the randomised copy: one engine refreshed at each step, the forward below the randomised layers reused),
compared per image and per layer. A table, one row per image, mode and step."""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from lrp_module import LRPModel

from .measures import (
    ENTROPY_BINS,
    SSIM_MODES,
    centred_ranks,
    discrete_entropy,
    intersection,
    prepared,
    rank_correlation,
    ssim,
    top_k_mask,
)
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
    """The channel-summed LRP maps of `model` for `targets`, `batch_size` images per pass, on `device`, by an
    LRPModel built for it: the definition of a model's maps (`mprt` computes the same maps bit for bit without a
    build per model). The LRP model holds `model`'s own weight tensors where it can (no copy), or those of a
    converted copy when `model` is on another device or of another dtype (`model` itself is never changed)."""
    weight = next(model.parameters())
    if weight.device != device or weight.dtype != dtype:
        model = copy.deepcopy(model).to(device=device, dtype=dtype)
    lrp = LRPModel(model, composite=composite, top_k=top_k, share_weights=True)
    maps = []
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size].to(device=device, dtype=dtype)
        maps.append(_maps(*lrp.explain(xb, targets[start:start + batch_size].to(device))))
    return MapSet(np.concatenate([m.maps for m in maps]), np.concatenate([m.pred for m in maps]))


def _maps(logits: torch.Tensor, relevance: torch.Tensor) -> MapSet:
    """A batch's channel-summed maps (float64 on the CPU) and predictions."""
    return MapSet(relevance.sum(dim=1).double().cpu().numpy(), logits.argmax(dim=1).cpu().numpy())


class RandomisedEngine:
    """The LRPModel of the working copy that `randomised_models` changes in place: built once per working copy (on
    `device` in `dtype`, over a converted copy when the working copy is not), then refreshed where the copy changed
    (`changed`: `LRPModel.refresh`, the changed layers' rules alone) instead of built again for every model."""

    def __init__(self, composite: str, top_k: float, device: torch.device, dtype: torch.dtype) -> None:
        self.composite, self.top_k, self.device, self.dtype = composite, top_k, device, dtype
        self.work: nn.Module | None = None
        self.target: nn.Module | None = None  # the model the LRPModel reads: the working copy or its conversion
        self.lrp: LRPModel | None = None
        self.pending: set[str] = set()

    def changed(self, names: Iterable[str]) -> None:
        """The working copy's modules `names` changed (re-initialised or put back) since the last `engine`."""
        self.pending.update(names)

    def engine(self, work: nn.Module) -> LRPModel:
        """The LRPModel of `work` as it is now."""
        if work is not self.work:
            weight = next(work.parameters())
            converted = weight.device != self.device or weight.dtype != self.dtype
            self.work, self.target = work, copy.deepcopy(work).to(self.device, self.dtype) if converted else work
            self.lrp = LRPModel(self.target, composite=self.composite, top_k=self.top_k, share_weights=True)
        elif self.pending:
            if self.target is not work:  # the converted copy takes the changed layers' new values
                source, copied = dict(work.named_modules()), dict(self.target.named_modules())
                for name in self.pending:
                    copied[name].load_state_dict(source[name].state_dict())
            self.lrp.refresh(self.target, self.pending)
        self.pending.clear()
        return self.lrp


@dataclass(frozen=True)
class Original:
    """The original maps and what every comparison with them reads (computed once, not once per model): the
    prepared |maps|, the centred ranks of those and of the signed maps, the top-k mask, the entropy."""

    maps: MapSet
    prepared: np.ndarray
    ranks_abs: np.ndarray
    ranks: np.ndarray
    top_k: np.ndarray
    k: int
    entropy: np.ndarray

    @classmethod
    def of(cls, original: MapSet, params: SanityParams) -> Original:
        a = prepared(original.maps)
        k = min(params.intersection_k, a[0].size)
        return cls(original, a, centred_ranks(a), centred_ranks(original.maps), top_k_mask(a, k), k,
                   discrete_entropy(original.maps, params.entropy_bins))


def compare(original: Original, other: MapSet, params: SanityParams) -> dict[str, np.ndarray]:
    """Each image's similarities of `other`'s map to the original's, its entropy and eMPRT's relative change (the
    measures of measures.py: `spearman`, `ssim`, `top_k_intersection`, `discrete_entropy`)."""
    b = prepared(other.maps)
    h = discrete_entropy(other.maps, params.entropy_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        emprt = (h - original.entropy) / original.entropy
    return {"pred": other.pred.astype(np.int64), "spearman_abs": rank_correlation(original.ranks_abs,
                                                                                  centred_ranks(b)),
            "spearman": rank_correlation(original.ranks, centred_ranks(other.maps)),
            "ssim": ssim(original.prepared, b, params.ssim),
            "top_k_intersection": intersection(original.top_k, b, original.k), "entropy": h, "emprt": emprt}


@dataclass
class Timing:
    """Seconds spent: the LRP passes (original + randomised models, the engines' builds and refreshes included),
    the randomisation, the comparisons; the models explained (each over the whole sample)."""

    lrp: float = 0.0
    randomise: float = 0.0
    compare: float = 0.0
    passes: int = 0  # models explained, each over the whole sample


def mprt(model: nn.Module, composite: str, top_k: float, x: torch.Tensor, targets: torch.Tensor,
         params: SanityParams = SanityParams(), device: torch.device | str = "cpu",
         dtype: torch.dtype = torch.float32, progress: Callable[[int], None] | None = None,
         timing: Timing | None = None) -> pd.DataFrame:
    """Rows of SANITY_COLUMNS less the run's bookkeeping (image_id, shard, row): `index` is the image's position
    in `x`. The sample runs in batches of `params.batch_size`; each batch goes through the original model and every
    randomised one (the maps `explain` defines, bit for bit): one LRPModel per working copy, refreshed at each step
    where the copy changed, and the batch's forward pass below the lowest randomised layer taken from the original
    model's (those layers are the original's at every step of both modes). `progress` is called once per model and
    batch (`total_steps`)."""
    device, timing = torch.device(device), timing if timing is not None else Timing()
    layers = randomisable(model)
    if not layers:
        raise ValueError("the model has no layer with reset_parameters to randomise")
    clock = time.perf_counter()
    original_lrp = LRPModel(copy.deepcopy(model).to(device=device, dtype=dtype).eval(), composite=composite,
                            top_k=top_k, share_weights=True)
    timing.lrp += time.perf_counter() - clock
    results: dict[tuple[str, int, str], list[dict[str, np.ndarray]]] = {}
    for start in range(0, len(x), params.batch_size):
        first_batch = start == 0
        xb = x[start:start + params.batch_size].to(device=device, dtype=dtype)
        tb = targets[start:start + params.batch_size].to(device)
        clock = time.perf_counter()
        forward = original_lrp.record(xb)
        original = _maps(*original_lrp.explain_from(forward, tb))
        timing.lrp += time.perf_counter() - clock
        timing.passes += first_batch
        reference = Original.of(original, params)
        cache: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
        for mode in params.modes:
            results.setdefault((mode, 0, "original"), []).append(compare(reference, original, params))
            engine, previous = RandomisedEngine(composite, top_k, device, dtype), ()
            clock = time.perf_counter()
            for step, layer, random_layers, work in randomised_models(model, layers, mode, params.seed):
                timing.randomise += time.perf_counter() - clock
                engine.changed(set(previous) ^ set(random_layers))
                previous = random_layers
                key = tuple(sorted(random_layers))
                if key not in cache:  # the first cascading step is the top layer's independent one
                    clock = time.perf_counter()
                    lrp = engine.engine(work)
                    other = _maps(*lrp.explain_from(forward, tb, lrp.first_step_reading(random_layers)))
                    timing.lrp += time.perf_counter() - clock
                    timing.passes += first_batch
                    clock = time.perf_counter()
                    cache[key] = compare(reference, other, params)
                    timing.compare += time.perf_counter() - clock
                results.setdefault((mode, step, layer), []).append(cache[key])
                if progress is not None:
                    progress(1)
                clock = time.perf_counter()
    frames = [_frame(mode, step, layer, targets, {name: np.concatenate([part[name] for part in parts])
                                                  for name in parts[0]})
              for (mode, step, layer), parts in results.items()]
    return pd.concat(frames, ignore_index=True)


def _frame(mode: str, step: int, layer: str, targets: torch.Tensor, values: dict[str, np.ndarray]) -> pd.DataFrame:
    n = len(targets)
    return pd.DataFrame({"index": np.arange(n), "target": targets.cpu().numpy().astype(np.int64), "mode": mode,
                         "step": step, "layer": layer, **values})


def total_steps(model: nn.Module, modes: Sequence[str], images: int = 1, batch_size: int = 1) -> int:
    """`mprt`'s progress calls for `images` in batches of `batch_size`: one per randomised model and batch."""
    return len(randomisable(model)) * len(modes) * -(-images // batch_size)
