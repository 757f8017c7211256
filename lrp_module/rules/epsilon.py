"""LRP-epsilon (LRP-0 for epsilon = 0): Bach et al. 2015, eq. (58); Montavon et al. 2019, Sec. 10.2.1.

    z = F(a, W, b)        s = R / stab(z)        R_in = a * F^T(s, W)

With `rms_scale`, epsilon grows by `rms_scale * rms(z)` per image (the LRP tutorial's 0.25 * std). zennit: `Epsilon`.
"""
from __future__ import annotations

from torch import Tensor

from ..contexts import LayerContext
from ..ops import AffineOp
from ..stabilize import rms_per_sample, stabilize
from .base import BoundRule, Keep, Rule, divide


class Epsilon(Rule):
    """LRP-epsilon; `zero_bias` drops the bias from z, `rms_scale` adds rms_scale * rms(z) to epsilon."""

    def __init__(self, epsilon: float = 1e-6, zero_bias: bool = False, rms_scale: float = 0.0) -> None:
        if epsilon < 0 or rms_scale < 0:
            raise ValueError(f"Epsilon: epsilon and rms_scale must be >= 0, got {epsilon}, {rms_scale}")
        self.epsilon = float(epsilon)
        self.zero_bias = zero_bias
        self.rms_scale = float(rms_scale)


class EpsilonGeneral(BoundRule):
    """The formula: z recomputed from the input (with the bias, or without for zero_bias)."""

    def __init__(self, rule: Epsilon, op: AffineOp, weight: Tensor, bias: Tensor | None, ctx: LayerContext):
        super().__init__(op)
        self.eps, self.rms_scale = rule.epsilon, rule.rms_scale
        self._buffers_from(bias=None if rule.zero_bias else bias)
        weight_t = op.transpose_weight(weight)
        self._buffers_from(weight_t=None if weight_t is weight else weight_t)  # dense: W^T pass uses W itself

    def _epsilon(self, z: Tensor) -> float | Tensor:
        return self.eps + self.rms_scale * rms_per_sample(z) if self.rms_scale else self.eps

    def _redistribute(self, a: Tensor, s: Tensor, weight: Tensor) -> Tensor:
        weight_t = weight if self.weight_t is None else self.weight_t
        return self.op.transpose_op(s, weight_t, a.shape).mul_(a)

    def relevance(self, a, out, stash, relevance, weight):
        z = self.op.forward_op(a, weight, self.bias)
        eps = self._epsilon(z)
        s = divide(relevance, stabilize(z, eps), eps)
        return self._redistribute(a, s, weight)


class EpsilonFromForward(EpsilonGeneral):
    """Where z keeps the layer's bias, z is the forward's pre-activation: read it (stashed before a fused ReLU)
    instead of computing it again."""

    @classmethod
    def applies(cls, rule, ctx, bias):
        return rule.bias_in_forward(bias)

    def __init__(self, rule: Epsilon, op: AffineOp, weight: Tensor, bias: Tensor | None, ctx: LayerContext):
        super().__init__(rule, op, weight, None, ctx)
        if ctx.relu:
            self.keeps = Keep.PREACTIVATION

    def relevance(self, a, out, stash, relevance, weight):
        z = self._preactivation(out, stash)
        eps = self._epsilon(z)
        s = divide(relevance, stabilize(z, eps), eps)
        return self._redistribute(a, s, weight)


class EpsilonOnActive(EpsilonGeneral):
    """A fused ReLU and relevance only where it fired (`relevance_on_active`): wherever R != 0, z = relu(z) > 0, so
    the ReLU output stands in for z and stab(z) = z + eps. Only rms(z) is kept from before the ReLU."""

    @classmethod
    def applies(cls, rule, ctx, bias):
        return rule.bias_in_forward(bias) and ctx.relevance_on_active

    def __init__(self, rule: Epsilon, op: AffineOp, weight: Tensor, bias: Tensor | None, ctx: LayerContext):
        super().__init__(rule, op, weight, None, ctx)
        if self.rms_scale:
            self.keeps = Keep.RMS

    def relevance(self, a, out, stash, relevance, weight):
        eps = self.eps + self.rms_scale * stash.rms if self.rms_scale else self.eps
        s = divide(relevance, out + eps, eps)
        return self._redistribute(a, s, weight)


Epsilon.paths = (EpsilonOnActive, EpsilonFromForward, EpsilonGeneral)
