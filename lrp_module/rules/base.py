"""What every rule shares: a rule is a parameter set with a list of paths; a path is the rule bound to one layer.

`Rule.paths` lists the rule's fast paths first and its general path (the formula, as zennit 1.0 computes it) last.
`Rule.bind` binds the first path whose `applies(rule, ctx, bias)` holds for the layer: the general path applies
everywhere, a fast path only where the facts the engine proved (`LayerContext`, lrp_module/contexts.py) make it
equal the general one. A bound path holds every modified weight precomputed and computes the input relevance with
explicit conv / conv-transpose / matmul calls: no autograd, no hooks.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from ..contexts import LayerContext
from ..ops import AffineOp
from ..stabilize import rms_per_sample, safe_divide


@dataclass(frozen=True)
class Stash:
    """What a step keeps from its forward for its relevance pass, besides its input and output."""

    preactivation: Tensor | None = None  # the layer's output before its fused ReLU
    rms: Tensor | None = None  # per-image root mean square of the pre-activation (Epsilon's rms_scale)
    indices: Tensor | None = None  # max pooling's arg-max positions

    def map(self, fn: Callable[[Tensor], Tensor]) -> Stash:
        """The same stash with `fn` applied to each tensor it holds (the concept maps' row views and repeats)."""
        return Stash(*(None if t is None else fn(t) for t in (self.preactivation, self.rms, self.indices)))


NOTHING = Stash()


class Keep(Enum):
    """Which of the `Stash` fields a path needs (besides the layer's input and output)."""

    NOTHING = "nothing"
    PREACTIVATION = "preactivation"
    RMS = "rms"


def divide(relevance: Tensor, denominator: Tensor, eps: float | Tensor) -> Tensor:
    """relevance / denominator, defining 0/0 as 0 when the rule has no stabiliser (LRP-0)."""
    if isinstance(eps, (int, float)) and eps == 0:
        return safe_divide(relevance, denominator)
    return relevance / denominator


def clamp_pos(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.clamp(min=0)


def clamp_neg(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.clamp(max=0)


class Rule:
    """A relevance rule for affine layers (conv2d, linear): its parameters and its paths, general path last."""

    paths: tuple[type[BoundRule], ...] = ()
    multiplies_input = True  # the input relevance is zero wherever the layer's input is zero
    routes_to_input = False
    zero_bias = False

    def bias_in_forward(self, bias: Tensor | None) -> bool:
        """The rule's z uses the bias the forward's pre-activation carries (none dropped by `zero_bias`)."""
        return bias is None or not self.zero_bias

    def bind(self, op: AffineOp, weight: Tensor, bias: Tensor | None, ctx: LayerContext) -> BoundRule:
        """The first path that applies to this layer, with its modified weights precomputed."""
        return self.path_for(ctx, bias)(self, op, weight, bias, ctx)

    def path_for(self, ctx: LayerContext, bias: Tensor | None) -> type[BoundRule]:
        return next(path for path in self.paths if path.applies(self, ctx, bias))

    @property
    def general(self) -> type[BoundRule]:
        """The path that computes the formula itself, wherever it is used."""
        return self.paths[-1]

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


class Path(nn.Module):
    """One way to compute a rule on one layer; the general path is the formula, a fast path equals it where
    `applies` holds."""

    def __init__(self) -> None:
        super().__init__()
        self.keeps = Keep.NOTHING

    @classmethod
    def applies(cls, rule: Any, ctx: LayerContext | None, bias: Tensor | None = None) -> bool:
        """Whether this path equals the rule's general path on this layer (a general path: everywhere)."""
        return True

    def stash(self, preactivation: Tensor) -> Stash:
        """Called during the forward with the pre-activation: what `relevance` will need of it."""
        if self.keeps is Keep.PREACTIVATION:
            return Stash(preactivation=preactivation)
        if self.keeps is Keep.RMS:
            return Stash(rms=rms_per_sample(preactivation))
        return NOTHING

    def _preactivation(self, out: Tensor, stash: Stash) -> Tensor:
        """The layer's output before its ReLU: the stashed one where a ReLU is fused, else the output itself."""
        return out if stash.preactivation is None else stash.preactivation


class BoundRule(Path):
    """A path of an affine rule bound to one layer: precomputed weights, and the relevance step."""

    def __init__(self, op: AffineOp) -> None:
        super().__init__()
        self.op = op

    def relevance(self, a: Tensor, out: Tensor, stash: Stash, relevance: Tensor, weight: Tensor) -> Tensor:
        """Input relevance from the layer input `a`, its (post-ReLU) output `out`, what the forward stashed, the
        output relevance and the layer's own weight (passed, not stored, so that no tensor is held twice)."""
        raise NotImplementedError

    def _buffers_with_transpose(self, name: str, weight: Tensor) -> None:
        """Register `weight` as `name` and its transpose as `name + '_t'`, unless that is `weight` itself (dense
        layers), which would store it twice and is something tracers refuse."""
        transposed = self.op.transpose_weight(weight)
        self._buffers_from(**{name: weight, name + "_t": None if transposed is weight else transposed})

    def _transposed(self, name: str) -> Tensor:
        transposed = getattr(self, name + "_t")
        return getattr(self, name) if transposed is None else transposed

    def _buffers_from(self, **tensors: Tensor | None) -> None:
        """Register precomputed tensors as (non-persistent) buffers, so they follow the module's device."""
        for name, tensor in tensors.items():
            if tensor is None:
                setattr(self, name, None)
            else:
                self.register_buffer(name, tensor, persistent=False)


def _cat_bias(op: AffineOp, *biases: Tensor | None) -> Tensor | None:
    """The biases of stacked weight variants, in the order `op.cat_weights` stacks them (per group)."""
    if all(b is None for b in biases):
        return None
    ref = next(b for b in biases if b is not None)
    return op.cat_weights([torch.zeros_like(ref) if b is None else b for b in biases])


class SignSplit(BoundRule):
    """What alpha-beta and gamma's general path share: a weight pair (P for the positive contributions, N for the
    negative ones) applied to a+ as (P, N) and to a- as (N, P), each pair as one stacked conv."""

    signed_input = True  # False in the paths for an input >= 0: the a- terms are dropped

    def _bind_pair(self, w_p: Tensor, w_n: Tensor, b_p: Tensor | None, b_n: Tensor | None) -> None:
        op, t = self.op, self.op.transpose_weight
        self._buffers_from(w_both=op.cat_weights([w_p, w_n]), b_both=_cat_bias(op, b_p, b_n),
                           w_pos_t=op.cat_transposed([t(w_p), t(w_n)]))
        if self.signed_input:
            self._buffers_from(w_both_swapped=op.cat_weights([w_n, w_p]), w_neg_t=op.cat_transposed([t(w_n), t(w_p)]))

    def _denominators(self, a: Tensor) -> tuple[Tensor, Tensor]:
        """z_p = F(a+, P, b_p) + F(a-, N, 0) and z_n = F(a+, N, b_n) + F(a-, P, 0)."""
        if self.signed_input:
            z = self.op.forward_op(a.clamp(min=0), self.w_both, self.b_both) + self.op.forward_op(
                a.clamp(max=0), self.w_both_swapped)
        else:
            z = self.op.forward_op(a, self.w_both, self.b_both)
        z_p, z_n = self.op.chunk(z, 2)
        return z_p, z_n

    def _redistribute(self, a: Tensor, s_p: Tensor, s_n: Tensor) -> Tensor:
        """a+ (F^T(s_p, P) + F^T(s_n, N)) + a- (F^T(s_p, N) + F^T(s_n, P))."""
        s = self.op.cat_outputs([s_p, s_n])
        if not self.signed_input:
            return self.op.transpose_op(s, self.w_pos_t, a.shape).mul_(a)
        return a.clamp(min=0) * self.op.transpose_op(s, self.w_pos_t, a.shape) + a.clamp(max=0) * \
            self.op.transpose_op(s, self.w_neg_t, a.shape)
