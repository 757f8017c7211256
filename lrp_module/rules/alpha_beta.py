"""alpha-beta: Bach et al. 2015, eq. (60); Montavon et al. 2019, Sec. 10.2.2. For any input sign, as zennit's
`AlphaBeta` (alpha - beta = 1):

    z_p = F(a+, W+, b+) + F(a-, W-, 0)        z_n = F(a+, W-, b-) + F(a-, W+, 0)
    R_in = alpha (a+ F^T(R / stab(z_p), W+) + a- F^T(R / stab(z_p), W-))
         - beta  (a+ F^T(R / stab(z_n), W-) + a- F^T(R / stab(z_n), W+))
"""
from __future__ import annotations

from torch import Tensor

from ..contexts import LayerContext
from ..ops import AffineOp
from ..stabilize import stabilize
from .base import Rule, SignSplit, clamp_neg, clamp_pos


class AlphaBeta(Rule):
    """alpha * (positive contributions) - beta * (negative contributions), alpha - beta = 1."""

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6, zero_bias: bool = False):
        if alpha < 0 or beta < 0 or abs((alpha - beta) - 1.0) > 1e-12:
            raise ValueError(f"AlphaBeta: need alpha, beta >= 0 and alpha - beta = 1, got alpha={alpha}, beta={beta}")
        self.alpha, self.beta = float(alpha), float(beta)
        self.stabilizer = float(stabilizer)
        self.zero_bias = zero_bias


class AlphaBetaGeneral(SignSplit):
    """The formula, both input signs."""

    def __init__(self, rule: AlphaBeta, op: AffineOp, weight: Tensor, bias: Tensor | None, ctx: LayerContext):
        super().__init__(op)
        self.alpha, self.beta, self.eps = rule.alpha, rule.beta, rule.stabilizer
        bias = None if rule.zero_bias else bias
        self._bind_pair(weight.clamp(min=0), weight.clamp(max=0), clamp_pos(bias), clamp_neg(bias))

    def relevance(self, a, out, stash, relevance, weight):
        z_p, z_n = self._denominators(a)
        s_p = relevance * self.alpha / stabilize(z_p, self.eps)
        s_n = relevance * -self.beta / stabilize(z_n, self.eps)
        return self._redistribute(a, s_p, s_n)


class AlphaBetaNonnegative(AlphaBetaGeneral):
    """Input >= 0: a- = 0, so both denominators come from one stacked conv of a, and one transposed pass."""

    signed_input = False

    @classmethod
    def applies(cls, rule, ctx, bias):
        return ctx.input_nonnegative


AlphaBeta.paths = (AlphaBetaNonnegative, AlphaBetaGeneral)
