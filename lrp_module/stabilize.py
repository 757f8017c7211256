"""zennit's sign-aware stabiliser, plus the cheaper forms that are exact where the sign of z is known."""
from __future__ import annotations

import torch
from torch import Tensor


def stabilize(z: Tensor, eps: float | Tensor) -> Tensor:
    """`z + eps` where z >= 0, `z - eps` where z < 0 (zennit: `z + eps * (sign(z) + (z == 0))`)."""
    return torch.where(z >= 0, z + eps, z - eps)


def safe_divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator with 0/0 := 0 (only needed when a rule is used with epsilon 0, i.e. LRP-0)."""
    zero = denominator == 0
    return numerator / denominator.masked_fill(zero, 1.0) * (~zero)


def rms_per_sample(z: Tensor) -> Tensor:
    """Root mean square of z over all but the batch dimension, shaped to broadcast against z."""
    dims = tuple(range(1, z.ndim))
    return z.square().mean(dim=dims, keepdim=True).sqrt()
