"""Generalised gamma: Montavon et al. 2019, Sec. 10.2.1 (LRP-gamma, for a >= 0), generalised to any input sign by
Andéol et al. 2021 as zennit 1.0's `Gamma` computes it. With W_g+ = W + gamma W+, W_g- = W + gamma W- (biases
likewise) and o = F(a, W, b) the layer's unmodified output:

    where o > 0:  z = F(a+, W_g+, b_g+) + F(a-, W_g-, 0)    R_in = a+ F^T(s, W_g+) + a- F^T(s, W_g-)
    where o < 0:  z = F(a+, W_g-, b_g-) + F(a-, W_g+, 0)    R_in = a+ F^T(s, W_g-) + a- F^T(s, W_g+)
    where o = 0:  no relevance passes                        (s = R / stab(z) in both cases)
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..contexts import LayerContext
from ..ops import AffineOp
from ..stabilize import stabilize
from .base import BoundRule, Keep, Rule, SignSplit, clamp_neg, clamp_pos


class Gamma(Rule):
    """Generalised gamma; `zero_bias` drops the bias from z (o keeps it, as in zennit)."""

    def __init__(self, gamma: float = 0.25, stabilizer: float = 1e-6, zero_bias: bool = False) -> None:
        if gamma < 0:
            raise ValueError(f"Gamma: gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.stabilizer = float(stabilizer)
        self.zero_bias = zero_bias

    def modified(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """W_g+, W_g-, b_g+, b_g- (the biases None with zero_bias)."""
        g, bias = self.gamma, None if self.zero_bias else bias
        b_gp = None if bias is None else bias + g * clamp_pos(bias)
        b_gn = None if bias is None else bias + g * clamp_neg(bias)
        return weight + g * weight.clamp(min=0), weight + g * weight.clamp(max=0), b_gp, b_gn


class GammaGeneral(SignSplit):
    """The formula: zennit's four terms, masked by the sign of the stored pre-activation o."""

    def __init__(self, rule: Gamma, op: AffineOp, weight: Tensor, bias: Tensor | None, ctx: LayerContext):
        super().__init__(op)
        self.eps = rule.stabilizer
        self._bind_pair(*rule.modified(weight, bias))
        if ctx.relu:
            self.keeps = Keep.PREACTIVATION

    def relevance(self, a, out, stash, relevance, weight):
        o = self._preactivation(out, stash)
        z_p, z_n = self._denominators(a)
        s_p = relevance * (o > 0) / stabilize(z_p, self.eps)
        s_n = relevance * (o < 0) / stabilize(z_n, self.eps)
        return self._redistribute(a, s_p, s_n)


class GammaFromOutput(SignSplit):
    """Input >= 0 and z keeps the bias: with q = gamma F(a, W+, b+), z_p = o + q and z_n = (1 + gamma) o - q
    (as F(a, W-) + b- = o - q / gamma), so one extra conv gives both. Where o > 0, z_p >= o > 0; where o < 0,
    z_n <= (1 + gamma) o < 0, whose sign is folded into the second transposed weight."""

    signed_input = False

    @classmethod
    def applies(cls, rule, ctx, bias):
        return ctx.input_nonnegative and rule.bias_in_forward(bias)

    def __init__(self, rule: Gamma, op: AffineOp, weight: Tensor, bias: Tensor | None, ctx: LayerContext):
        super().__init__(op)
        self.eps, self.gamma = rule.stabilizer, rule.gamma
        w_gp, w_gn, _, _ = rule.modified(weight, bias)
        b_q = clamp_pos(bias)
        t = op.transpose_weight
        self._buffers_from(w_q=rule.gamma * weight.clamp(min=0), b_q=None if b_q is None else rule.gamma * b_q,
                           w_pos_t=op.cat_transposed([t(w_gp), t(-w_gn)]))
        if ctx.relu:
            self.keeps = Keep.PREACTIVATION

    def relevance(self, a, out, stash, relevance, weight):
        o = self._preactivation(out, stash)
        positive, negative = o > 0, o < 0
        q = self.op.forward_op(a, self.w_q, self.b_q)
        # stab(z_p) = o + q + eps; stab(z_n) = -(q - (1 + gamma) o + eps), its sign in the weight
        denominator = torch.where(positive, o + q, torch.add(q, o, alpha=-(1.0 + self.gamma))).add_(self.eps)
        s = relevance.div_(denominator)
        return self._redistribute(a, s * positive, s * negative)


class GammaOnActive(BoundRule):
    """Input >= 0 and relevance only where the fused ReLU fired (o > 0): only the (o > 0, a+) term is non-zero,
    z = F(a, W_g+, b_g+) >= o > 0 there, and stab(z) = max(z, 0) + eps (the max keeps 0/0 away elsewhere)."""

    @classmethod
    def applies(cls, rule, ctx, bias):
        return ctx.input_nonnegative and ctx.relevance_on_active and rule.bias_in_forward(bias)

    def __init__(self, rule: Gamma, op: AffineOp, weight: Tensor, bias: Tensor | None, ctx: LayerContext):
        super().__init__(op)
        self.eps = rule.stabilizer
        w_gp, _, b_gp, _ = rule.modified(weight, bias)
        self._buffers_with_transpose("w_gp", w_gp)
        self._buffers_from(b_gp=b_gp)

    def relevance(self, a, out, stash, relevance, weight):
        z = self.op.forward_op(a, self.w_gp, self.b_gp)
        s = relevance.div_(z.clamp_(min=0).add_(self.eps))
        return self.op.transpose_op(s, self._transposed("w_gp"), a.shape).mul_(a)


Gamma.paths = (GammaOnActive, GammaFromOutput, GammaGeneral)
