"""z^B for an input bounded by l <= a <= h (the first layer): Montavon et al. 2017 (deep Taylor decomposition),
the z^B-rule; Montavon et al. 2019, Sec. 10.3.2. As zennit's `ZBox`:

    z = F(a, W, b) - F(l, W+, b+) - F(h, W-, b-)        s = R / stab(z)
    R_in = a * F^T(s, W) - l * F^T(s, W+) - h * F^T(s, W-)

The bounds are kept in float64 and bound to the layer in its own precision, so a float64 model computes with the
bounds as given (a float32 copy of them would differ from the float64 reference by ~1e-8).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..contexts import LayerContext
from ..ops import AffineOp
from ..stabilize import stabilize
from .base import BoundRule, Keep, Rule


class ZBox(Rule):
    """z^B; low/high are scalars or per-channel bounds of the layer input.

    No zero_bias option: the biases cancel in z^B (b - b+ - b- = 0), so it would change nothing."""

    multiplies_input = False  # the box terms give relevance where the input is zero

    def __init__(self, low: float | Sequence[float], high: float | Sequence[float], stabilizer: float = 1e-6) -> None:
        self.low = torch.as_tensor(low, dtype=torch.float64)
        self.high = torch.as_tensor(high, dtype=torch.float64)
        if self.low.shape != self.high.shape or bool((self.low > self.high).any()):
            raise ValueError(f"ZBox: low and high must have the same shape and low <= high, got {low}, {high}")
        self.stabilizer = float(stabilizer)

    def __repr__(self) -> str:
        return f"ZBox(low={self.low.tolist()!r}, high={self.high.tolist()!r}, stabilizer={self.stabilizer!r})"


class ZBoxGeneral(BoundRule):
    """The formula. The biases cancel (b = b+ + b-): z = o - b - F(l, W+) - F(h, W-), o the pre-activation."""

    def __init__(self, rule: ZBox, op: AffineOp, weight: Tensor, bias: Tensor | None, ctx: LayerContext):
        super().__init__(op)
        self.eps = rule.stabilizer
        in_channels = weight.shape[1]
        if rule.low.numel() not in (1, in_channels):
            raise ValueError(f"ZBox: bounds have {rule.low.numel()} values, the layer has {in_channels} input channels")
        shape = (1, -1) + (1,) * (weight.ndim - 2)  # broadcast over the input's channel dim
        w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
        t = op.transpose_weight
        self._buffers_from(
            low=rule.low.to(weight).reshape(shape) if rule.low.numel() > 1 else rule.low.to(weight),
            high=rule.high.to(weight).reshape(shape) if rule.high.numel() > 1 else rule.high.to(weight),
            w_pos=w_pos,
            w_neg=w_neg,
            bias=None if bias is None else bias.reshape(shape),
            w_split_t=op.split_transposed([t(weight), t(w_pos), t(w_neg)]),
        )
        if ctx.relu:
            self.keeps = Keep.PREACTIVATION

    def relevance(self, a, out, stash, relevance, weight):
        o = self._preactivation(out, stash)
        ones = torch.ones_like(a[:1])
        low, high = ones * self.low, ones * self.high
        box = self.op.forward_op(low, self.w_pos) + self.op.forward_op(high, self.w_neg)
        if self.bias is not None:
            box = box + self.bias
        s = relevance / stabilize(o - box, self.eps)
        c, c_low, c_high = self.op.chunk(self.op.transpose_op(s, self.w_split_t, a.shape), 3)
        return a * c - low * c_low - high * c_high


ZBox.paths = (ZBoxGeneral,)
