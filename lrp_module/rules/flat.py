"""flat and w^2, the rules that ignore the input's values. w^2: Montavon et al. 2017 (deep Taylor decomposition),
the w^2-rule; flat: Lapuschkin et al. 2019 (w^2 with all weights 1). As zennit's `WSquare` and `Flat`, with V = W^2
(and c = b^2 unless zero_bias) or V = 1 (c = 0):

    z = F(1, V, c)        s = R / stab(z)        R_in = F^T(s, V)

z >= 0 and depends on the input's shape only, so stab(z) = z + eps and z is computed for one image.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..contexts import LayerContext
from ..ops import AffineOp
from .base import BoundRule, Rule


class Flat(Rule):
    """flat: every input gets relevance in proportion to its connection count (all-ones input and weights)."""

    multiplies_input = False

    def __init__(self, stabilizer: float = 1e-6) -> None:
        self.stabilizer = float(stabilizer)

    def modified(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return torch.ones_like(weight), None


class WSquare(Rule):
    """w^2: relevance in proportion to squared weights (zennit squares the bias too unless zero_bias)."""

    multiplies_input = False

    def __init__(self, stabilizer: float = 1e-6, zero_bias: bool = False) -> None:
        self.stabilizer = float(stabilizer)
        self.zero_bias = zero_bias

    def modified(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return weight.square(), None if (bias is None or self.zero_bias) else bias.square()


class SquaredOrFlatGeneral(BoundRule):
    """The formula, for V and c from the rule's `modified`."""

    def __init__(self, rule: Flat | WSquare, op: AffineOp, weight: Tensor, bias: Tensor | None, ctx: LayerContext):
        super().__init__(op)
        self.eps = rule.stabilizer
        modified, modified_bias = rule.modified(weight, bias)
        self._buffers_with_transpose("modified", modified)
        self._buffers_from(bias=modified_bias)

    def relevance(self, a, out, stash, relevance, weight):
        z = self.op.forward_op(torch.ones_like(a[:1]), self.modified, self.bias)
        return self.op.transpose_op(relevance / (z + self.eps), self._transposed("modified"), a.shape)


Flat.paths = WSquare.paths = (SquaredOrFlatGeneral,)
