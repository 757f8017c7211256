"""z+ (alpha = 1, beta = 0): Montavon et al. 2017 (deep Taylor decomposition), the z+-rule; Bach et al. 2015,
eq. (60) with alpha = 1. For any input sign, as zennit's `ZPlus`:

    z = F(a+, W+, b+) + F(a-, W-, 0)        s = R / stab(z)        R_in = a+ * F^T(s, W+) + a- * F^T(s, W-)

`ones_input` puts an all-ones input in place of a (the original blog's first layer).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..contexts import LayerContext
from ..ops import AffineOp
from ..stabilize import stabilize
from .base import BoundRule, Rule, clamp_pos


class ZPlus(Rule):
    """z+; `zero_bias` drops b+ from z, `ones_input` uses an all-ones input in place of the activation."""

    def __init__(self, stabilizer: float = 1e-6, zero_bias: bool = False, ones_input: bool = False) -> None:
        self.stabilizer = float(stabilizer)
        self.zero_bias = zero_bias
        self.ones_input = ones_input

    @property
    def multiplies_input(self) -> bool:
        return not self.ones_input


class ZPlusGeneral(BoundRule):
    """The formula, both input signs."""

    signed_input = True  # the a- terms are computed (their weights precomputed)

    def __init__(self, rule: ZPlus, op: AffineOp, weight: Tensor, bias: Tensor | None, ctx: LayerContext):
        super().__init__(op)
        self.eps, self.ones_input = rule.stabilizer, rule.ones_input
        t = op.transpose_weight
        w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
        self._buffers_with_transpose("w_pos", w_pos)
        self._buffers_from(b_pos=None if rule.zero_bias else clamp_pos(bias))
        if self.signed_input:
            self._buffers_from(w_neg=w_neg, w_split_t=op.split_transposed([t(w_pos), t(w_neg)]))

    def relevance(self, a, out, stash, relevance, weight):
        if self.ones_input:
            a = torch.ones_like(a)
        a_pos, a_neg = a.clamp(min=0), a.clamp(max=0)
        z = self.op.forward_op(a_pos, self.w_pos, self.b_pos) + self.op.forward_op(a_neg, self.w_neg)
        s = relevance / stabilize(z, self.eps)
        c_pos, c_neg = self.op.chunk(self.op.transpose_op(s, self.w_split_t, a.shape), 2)
        return a_pos * c_pos + a_neg * c_neg


class ZPlusNonnegative(ZPlusGeneral):
    """Input >= 0: a- = 0, so z = F(a, W+, b+) >= 0 and stab(z) = z + eps; one transposed pass."""

    signed_input = False

    @classmethod
    def applies(cls, rule, ctx, bias):
        return ctx.input_nonnegative and not rule.ones_input

    def relevance(self, a, out, stash, relevance, weight):
        z = self.op.forward_op(a, self.w_pos, self.b_pos)
        s = relevance.div_(z.add_(self.eps))
        return self.op.transpose_op(s, self._transposed("w_pos"), a.shape).mul_(a)


class ZPlusOnesInput(ZPlusGeneral):
    """The all-ones input: z >= 0 and the same for every image, so it is computed once and broadcast over the
    batch, and R_in = F^T(s, W+) needs no product with the input."""

    signed_input = False

    @classmethod
    def applies(cls, rule, ctx, bias):
        return rule.ones_input

    def relevance(self, a, out, stash, relevance, weight):
        z = self.op.forward_op(torch.ones_like(a[:1]), self.w_pos, self.b_pos)
        s = relevance / (z + self.eps)
        return self.op.transpose_op(s, self._transposed("w_pos"), a.shape)


ZPlus.paths = (ZPlusOnesInput, ZPlusNonnegative, ZPlusGeneral)
