"""Model rewrites done once, before LRP: batch norm folded into the preceding convolution (as zennit does)."""
from __future__ import annotations

import torch
from torch import Tensor, nn


def fold_batchnorm(conv: nn.Conv2d | nn.Linear, bn: nn.BatchNorm2d | nn.BatchNorm1d) -> tuple[Tensor, Tensor]:
    """Weight and bias of `bn(conv(x))` as one affine layer (eval mode: running statistics)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"cannot fold {bn}: it tracks no running statistics")
    scale = bn.running_var.add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = bn.bias if bn.bias is not None else torch.zeros_like(scale)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
    weight = conv.weight * scale.reshape((-1,) + (1,) * (conv.weight.ndim - 1))
    return weight.detach(), ((bias - bn.running_mean) * scale + shift).detach()
