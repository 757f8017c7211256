"""The float64 oracle: eager LRP recomputed in float64 on the CPU, the numerical reference for every float32
implementation (eager, traced, exported, on a GPU, zennit's).

Why float64: on VGGs with random weights LRP in float32 is ill-conditioned (the stabilised divisions amplify
rounding about a thousandfold), so two correct float32 implementations differ by up to ~1e-3 of a map's maximum,
and by how much depends on the kernels the CPU's instruction set selects. Each is close to float64, though. An
implementation is judged by its distance to float64 on the same inputs against a bound derived from eager
float32's own distance on the same machine (`bound`; the measurements behind it are in docs/correctness.md).
"""
from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .composites import Composite
from .model import LRPModel

# error(implementation) <= max(MULTIPLE * error(eager float32 here), FLOOR), errors as max |diff| / max |float64|.
# Measured (docs/correctness.md): correct implementations lie within 0.04x to 4.3x of eager float32 on the same
# kernel path, with one outlier (zennit's autograd kernels, 170x on one image, 1.0e-3); the worst correct float32
# error on any path was 7.2e-3. The floor covers both; the smallest defect tested is 0.53, 53x the floor.
MULTIPLE = 10.0
FLOOR = 1e-2  # relevance: an absolute budget above every correct implementation measured on every kernel path
LOGITS_FLOOR = 1e-4  # logits are well conditioned (1e-7 to 3e-6 measured)
CORRELATION_WARNING = 0.999  # a probe below this per-image Pearson correlation is flagged in the report


def relative_error(ours: Tensor, reference: Tensor) -> Tensor:
    """Per image (first dimension): max |ours - reference| / max |reference|, in float64 (0 / 0 := 0)."""
    ours, reference = ours.detach().cpu().double().flatten(1), reference.detach().cpu().double().flatten(1)
    scale = reference.abs().amax(1)
    difference = (ours - reference).abs().amax(1)
    return torch.where(scale > 0, difference / scale.masked_fill(scale == 0, 1.0), difference)


def correlation(ours: Tensor, reference: Tensor) -> Tensor:
    """Per image: Pearson correlation of the two maps; where either is constant (e.g. an all-zero map), 1 if they
    are equal and 0 otherwise, so that a map that lost everything is flagged rather than undefined."""
    ours, reference = ours.detach().cpu().double().flatten(1), reference.detach().cpu().double().flatten(1)
    a, b = ours - ours.mean(1, keepdim=True), reference - reference.mean(1, keepdim=True)
    denominator = (a.square().sum(1) * b.square().sum(1)).sqrt()
    value = (a * b).sum(1) / denominator.masked_fill(denominator == 0, 1.0)
    equal = (ours == reference).all(1)
    return torch.where(denominator > 0, value, equal.double())


@dataclass(frozen=True)
class Agreement:
    """How far an implementation's maps are from float64, per image."""

    max_relative_error: Tensor  # (N,) float64
    correlation: Tensor  # (N,) float64

    @property
    def worst(self) -> float:
        return float(self.max_relative_error.max())

    def summary(self) -> dict[str, dict[str, float]]:
        """The probe's numbers: max and median of the per-image error, min and median of the correlation."""
        error, corr = self.max_relative_error, self.correlation
        return {"max_relative_error": {"max": float(error.max()), "median": float(error.median())},
                "correlation": {"min": float(corr.min()), "median": float(corr.median())}}


def compare(ours: Tensor, reference: Tensor) -> Agreement:
    return Agreement(relative_error(ours, reference), correlation(ours, reference))


def bound(eager_error: float, floor: float = FLOOR) -> float:
    """The largest distance to float64 a correct float32 implementation may have, given eager float32's."""
    return max(MULTIPLE * float(eager_error), floor)


class Float64Oracle:
    """Eager `LRPModel` in float64 on the CPU, built from the source VGG with the same composite and top-k."""

    def __init__(self, model: nn.Module, composite: str | Composite = "epsilon_gamma_box", top_k: float = 0.0,
                 rescale_top_k: bool = False, composite_params: dict[str, Any] | None = None,
                 copy_model: bool = True) -> None:
        """copy_model=False converts `model` itself (saves a copy when the caller built it for the oracle)."""
        reference = copy.deepcopy(model) if copy_model else model
        reference = reference.to(device="cpu", dtype=torch.float64).eval()
        self.lrp = LRPModel(reference, composite, top_k=top_k, rescale_top_k=rescale_top_k,
                            composite_params=composite_params, share_weights=True)  # `reference` is the oracle's

    @classmethod
    def like(cls, model: nn.Module, lrp: LRPModel) -> Float64Oracle:
        """The oracle of `lrp` (its composite and top-k filter), which was built from `model`."""
        return cls(model, lrp.composite, top_k=lrp.top_k.top_k, rescale_top_k=lrp.top_k.rescale)

    def explain(self, x: Tensor, target: Tensor | Sequence[int] | int | None = None) -> tuple[Tensor, Tensor]:
        """float64 logits (N, classes) and relevance (N, C, H, W) on the CPU for the same inputs."""
        if isinstance(target, Tensor):
            target = target.cpu()
        return self.lrp.explain(x.detach().cpu().double(), target)

    def explain_each(self, x: Tensor, target: Tensor | Sequence[int] | int | None = None,
                     channel_sum: bool = False) -> tuple[Tensor, Tensor]:
        """As `explain`, one image at a time: the float64 activations of one image are held at once, not the
        batch's (a batch of 8 at 224x224 on a VGG16 held 4 GB more than one image). channel_sum: relevance
        (N, H, W), summed per image as it is computed. Each image's result is that of `explain` on the batch."""
        logits, relevance = [], []
        for i in range(x.shape[0]):
            each = target if target is None or isinstance(target, int) else target[i:i + 1]
            image_logits, image_relevance = self.explain(x[i:i + 1], each)
            logits.append(image_logits)
            relevance.append(image_relevance.sum(1) if channel_sum else image_relevance)
        return torch.cat(logits), torch.cat(relevance)


def numeric_settings(device: str | torch.device) -> dict[str, Any]:
    """What decides float32 rounding where `device` computes: dtype, TF32, cuDNN's choices, oneDNN on or off."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    description = "cpu"
    if cuda:
        description = f"cuda ({torch.cuda.get_device_name(device)})"
    elif os.environ.get("ONEDNN_MAX_CPU_ISA"):
        description = f"cpu (ONEDNN_MAX_CPU_ISA={os.environ['ONEDNN_MAX_CPU_ISA']})"
    return {
        "device": description,
        "dtype": "float32",
        "tf32": cuda and bool(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark) if cuda else None,
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic) if cuda else None,
        "onednn": bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled) if not cuda else None,
    }


def probe_record(relevance: Tensor, reference: Tensor, numerics: Mapping[str, Any]) -> dict[str, Any]:
    """The precision probe as recorded in manifest.json and lrp.json under "precision"; `numerics`: the
    `numeric_settings` of the device that computed `relevance` (read there: TF32 and cuDNN flags are per process)."""
    return {"reference": "float64-cpu", "images": int(relevance.shape[0]), **numerics,
            **compare(relevance, reference).summary()}
