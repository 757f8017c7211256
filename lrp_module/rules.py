"""LRP rules, one small class each (zennit-exact; formulas in shared/design/lrp-rules.md).

A rule is a parameter set. `Rule.bind` turns it, for one concrete layer, into a `BoundRule` module that holds
every modified weight precomputed (w+, w-, w + gamma*w+, their transposes) and computes the input relevance
from the stored forward values with explicit conv / conv-transpose / matmul calls: no autograd, no hooks.

Fast paths. Inside a VGG or ResNet most layers see a non-negative input (it follows a ReLU) and many receive
relevance only where their ReLU fired (every reader above multiplies by its input, which is zero elsewhere). Where
the engine proves either from the graph (`LayerContext`, lrp_module/model.py), rules drop the terms that are
exactly zero and use the stored ReLU output in place of the pre-activation. Elsewhere the general, zennit-literal
formula runs. Both give the same numbers.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .graph import Sum
from .ops import AffineOp
from .stabilize import rms_per_sample, safe_divide, stabilize


@dataclass(frozen=True)
class LayerContext:
    """What the model builder proved about one layer's surroundings."""

    input_nonnegative: bool  # the layer's input is >= 0 everywhere (it follows a ReLU)
    relu: bool  # a ReLU follows the layer (fused into the step)
    relevance_on_active: bool  # incoming relevance is zero wherever that ReLU outputs zero


def _clamp_pos(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.clamp(min=0)


def _clamp_neg(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.clamp(max=0)


def _cat_bias(op: AffineOp, *biases: Tensor | None) -> Tensor | None:
    """The biases of stacked weight variants, in the order `op.cat_weights` stacks them (per group)."""
    if all(b is None for b in biases):
        return None
    ref = next(b for b in biases if b is not None)
    return op.cat_weights([torch.zeros_like(ref) if b is None else b for b in biases])


def _divide(relevance: Tensor, denominator: Tensor, eps: float | Tensor) -> Tensor:
    """relevance / denominator, defining 0/0 as 0 when the rule has no stabiliser (LRP-0)."""
    if isinstance(eps, (int, float)) and eps == 0:
        return safe_divide(relevance, denominator)
    return relevance / denominator


class Rule:
    """A relevance rule for affine layers (conv2d, linear)."""

    def bind(self, op: AffineOp, weight: Tensor, bias: Tensor | None, ctx: LayerContext) -> BoundRule:
        raise NotImplementedError

    @property
    def multiplies_input(self) -> bool:
        """True when the input relevance is zero wherever the layer's input is zero."""
        return True

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


class BoundRule(nn.Module):
    """A rule bound to one layer: precomputed weights, and the relevance step."""

    keeps_preactivation = False  # the step must store the pre-activation (before ReLU) for `relevance`

    def __init__(self, op: AffineOp) -> None:
        super().__init__()
        self.op = op

    def stash(self, preactivation: Tensor) -> Tensor | None:
        """Called during the forward with the pre-activation; what it returns reaches `relevance`."""
        return preactivation if self.keeps_preactivation else None

    def relevance(self, a: Tensor, out: Tensor, stash: Tensor | None, relevance: Tensor, weight: Tensor) -> Tensor:
        """Input relevance from the layer input `a`, its (post-ReLU) output `out`, the output relevance and
        the layer's own weight (passed, not stored, so that no tensor is held twice)."""
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


# ----------------------------------------------------------------------------------------------- epsilon
class Epsilon(Rule):
    """LRP-epsilon (LRP-0 with epsilon=0): z = F(a, W, b), R_in = a * F^T(R / stab(z), W).

    `rms_scale` adds `rms_scale * rms(z)` per image to epsilon (the Montavon tutorial's 0.25 * std rule).
    """

    def __init__(self, epsilon: float = 1e-6, zero_bias: bool = False, rms_scale: float = 0.0) -> None:
        if epsilon < 0 or rms_scale < 0:
            raise ValueError(f"Epsilon: epsilon and rms_scale must be >= 0, got {epsilon}, {rms_scale}")
        self.epsilon = float(epsilon)
        self.zero_bias = zero_bias
        self.rms_scale = float(rms_scale)

    def bind(self, op, weight, bias, ctx):
        return _BoundEpsilon(self, op, weight, bias, ctx)


class _BoundEpsilon(BoundRule):
    def __init__(self, rule: Epsilon, op: AffineOp, weight: Tensor, bias: Tensor | None, ctx: LayerContext):
        super().__init__(op)
        self.eps = rule.epsilon
        self.rms_scale = rule.rms_scale
        self.zero_bias = rule.zero_bias and bias is not None
        # fast: the ReLU output equals z wherever relevance is non-zero, and z >= 0 there
        self.fast = ctx.relu and ctx.relevance_on_active and not self.zero_bias
        self.keeps_preactivation = ctx.relu and not self.fast and not self.zero_bias
        weight_t = op.transpose_weight(weight)
        self._buffers_from(weight_t=None if weight_t is weight else weight_t)  # dense: W^T pass uses W itself

    def stash(self, preactivation: Tensor) -> Tensor | None:
        if self.keeps_preactivation:
            return preactivation
        if self.rms_scale:
            return rms_per_sample(preactivation)
        return None

    def relevance(self, a, out, stash, relevance, weight):
        if self.zero_bias:
            z = self.op.forward_op(a, weight)
        else:
            z = stash if self.keeps_preactivation else out
        eps = self.eps
        if self.rms_scale:  # the stash is the rms itself unless it had to be the pre-activation
            stash_is_rms = not (self.keeps_preactivation or self.zero_bias)
            eps = eps + self.rms_scale * (stash if stash_is_rms else rms_per_sample(z))
        denominator = z + eps if self.fast else stabilize(z, eps)
        s = _divide(relevance, denominator, eps)
        weight_t = weight if self.weight_t is None else self.weight_t
        return self.op.transpose_op(s, weight_t, a.shape).mul_(a)


# ------------------------------------------------------------------------------------------------ z-plus
class ZPlus(Rule):
    """z+ (alpha=1, beta=0): z = F(a+, W+, b+) + F(a-, W-, 0); R_in = a+ F^T(s, W+) + a- F^T(s, W-).

    `ones_input` uses an all-ones input in place of the activation (the original blog's first layer).
    """

    def __init__(self, stabilizer: float = 1e-6, zero_bias: bool = False, ones_input: bool = False) -> None:
        self.stabilizer = float(stabilizer)
        self.zero_bias = zero_bias
        self.ones_input = ones_input

    @property
    def multiplies_input(self) -> bool:
        return not self.ones_input

    def bind(self, op, weight, bias, ctx):
        return _BoundZPlus(self, op, weight, bias, ctx)


class _BoundZPlus(BoundRule):
    def __init__(self, rule: ZPlus, op: AffineOp, weight: Tensor, bias: Tensor | None, ctx: LayerContext):
        super().__init__(op)
        self.eps = rule.stabilizer
        self.ones_input = rule.ones_input
        self.nonnegative = ctx.input_nonnegative or rule.ones_input
        w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
        b_pos = None if rule.zero_bias else _clamp_pos(bias)
        self._buffers_with_transpose("w_pos", w_pos)
        self._buffers_from(b_pos=b_pos)
        if not self.nonnegative:
            self._buffers_from(
                w_neg=w_neg, w_split_t=op.split_transposed([op.transpose_weight(w_pos), op.transpose_weight(w_neg)])
            )

    def relevance(self, a, out, stash, relevance, weight):
        if self.ones_input:
            # z >= 0: the all-ones input and W+ are non-negative; one image's worth, broadcast over the batch
            z = self.op.forward_op(torch.ones_like(a[:1]), self.w_pos, self.b_pos)
            s = relevance / (z + self.eps)
            return self.op.transpose_op(s, self._transposed("w_pos"), a.shape)
        if self.nonnegative:
            z = self.op.forward_op(a, self.w_pos, self.b_pos)  # >= 0, so stab(z) = z + eps
            s = relevance.div_(z.add_(self.eps))
            return self.op.transpose_op(s, self._transposed("w_pos"), a.shape).mul_(a)
        a_pos, a_neg = a.clamp(min=0), a.clamp(max=0)
        z = self.op.forward_op(a_pos, self.w_pos, self.b_pos) + self.op.forward_op(a_neg, self.w_neg)
        s = relevance / stabilize(z, self.eps)
        c_pos, c_neg = self.op.chunk(self.op.transpose_op(s, self.w_split_t, a.shape), 2)
        return a_pos * c_pos + a_neg * c_neg


# ------------------------------------------------------------------------------------------------- gamma
class Gamma(Rule):
    """Generalised gamma (zennit 1.0): W + gamma*W+ where the unmodified output is positive, W + gamma*W- where
    it is negative, each split by input sign; no relevance where the output is zero."""

    def __init__(self, gamma: float = 0.25, stabilizer: float = 1e-6, zero_bias: bool = False) -> None:
        if gamma < 0:
            raise ValueError(f"Gamma: gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.stabilizer = float(stabilizer)
        self.zero_bias = zero_bias

    def bind(self, op, weight, bias, ctx):
        return _BoundGamma(self, op, weight, bias, ctx)


class _SignSplit(BoundRule):
    """What gamma (general path) and alpha-beta share: a weight pair (P for the positive contributions, N for
    the negative ones) applied to a+ as (P, N) and to a- as (N, P), each pair as one stacked conv."""

    def _bind_pair(self, w_p: Tensor, w_n: Tensor, b_p: Tensor | None, b_n: Tensor | None, nonnegative: bool):
        op, t = self.op, self.op.transpose_weight
        self.nonnegative = nonnegative
        self._buffers_from(w_both=op.cat_weights([w_p, w_n]), b_both=_cat_bias(op, b_p, b_n),
                           w_pos_t=op.cat_transposed([t(w_p), t(w_n)]))
        if not nonnegative:
            self._buffers_from(w_both_swapped=op.cat_weights([w_n, w_p]), w_neg_t=op.cat_transposed([t(w_n), t(w_p)]))

    def _denominators(self, a: Tensor) -> tuple[Tensor, Tensor]:
        """z_p = F(a+, P, b_p) + F(a-, N, 0) and z_n = F(a+, N, b_n) + F(a-, P, 0)."""
        if self.nonnegative:
            z = self.op.forward_op(a, self.w_both, self.b_both)
        else:
            z = self.op.forward_op(a.clamp(min=0), self.w_both, self.b_both) + self.op.forward_op(
                a.clamp(max=0), self.w_both_swapped)
        z_p, z_n = self.op.chunk(z, 2)
        return z_p, z_n

    def _redistribute(self, a: Tensor, s_p: Tensor, s_n: Tensor) -> Tensor:
        """a+ (F^T(s_p, P) + F^T(s_n, N)) + a- (F^T(s_p, N) + F^T(s_n, P))."""
        s = self.op.cat_outputs([s_p, s_n])
        if self.nonnegative:
            return self.op.transpose_op(s, self.w_pos_t, a.shape).mul_(a)
        return a.clamp(min=0) * self.op.transpose_op(s, self.w_pos_t, a.shape) + a.clamp(max=0) * \
            self.op.transpose_op(s, self.w_neg_t, a.shape)


class _BoundGamma(_SignSplit):
    """Three paths, one formula. fast: the input is >= 0 and relevance arrives only where the ReLU above fired, so
    only the (o > 0, a+) term is non-zero. from_output: the input is >= 0, so with q = F(a, W+, b+) the two
    denominators are z_p = F(a, W + gW+, b + gb+) = o + g q and z_n = F(a, W + gW-, b + gb-) = (1 + g) o - g q
    (as F(a, W-) + b- = o - q): one extra conv instead of two. general: zennit's four terms, literally."""

    def __init__(self, rule: Gamma, op: AffineOp, weight: Tensor, bias: Tensor | None, ctx: LayerContext):
        super().__init__(op)
        g, self.eps, self.gamma = rule.gamma, rule.stabilizer, rule.gamma
        bias_kept = bias is None or not rule.zero_bias  # o carries the layer's bias: z may use it only then
        bias = None if rule.zero_bias else bias
        w_gp, w_gn = weight + g * weight.clamp(min=0), weight + g * weight.clamp(max=0)
        b_gp = None if bias is None else bias + g * bias.clamp(min=0)
        b_gn = None if bias is None else bias + g * bias.clamp(max=0)
        self.fast = ctx.input_nonnegative and ctx.relu and ctx.relevance_on_active
        self.from_output = ctx.input_nonnegative and not self.fast and bias_kept
        self.keeps_preactivation = ctx.relu and not self.fast
        if self.fast:
            self._buffers_with_transpose("w_gp", w_gp)
            self._buffers_from(b_gp=b_gp)
        elif self.from_output:  # q = g F(a, W+, b+); the second variant's sign is folded into its weight
            t = op.transpose_weight
            self.nonnegative = True
            b_q = _clamp_pos(bias)
            self._buffers_from(w_q=g * weight.clamp(min=0), b_q=None if b_q is None else g * b_q,
                               w_pos_t=op.cat_transposed([t(w_gp), t(-w_gn)]))
        else:
            self._bind_pair(w_gp, w_gn, b_gp, b_gn, ctx.input_nonnegative)

    def relevance(self, a, out, stash, relevance, weight):
        if self.fast:
            z = self.op.forward_op(a, self.w_gp, self.b_gp)
            # where relevance flows z >= o > 0, so clamp(z, 0) + eps == stab(z); elsewhere it keeps 0/0 away
            s = relevance.div_(z.clamp_(min=0).add_(self.eps))
            return self.op.transpose_op(s, self._transposed("w_gp"), a.shape).mul_(a)
        o = stash if self.keeps_preactivation else out
        positive, negative = o > 0, o < 0
        if self.from_output:
            # o > 0: stab(z_p) = o + q + eps; o < 0: stab(z_n) = -(q - (1 + g) o + eps), its sign in the weight
            q = self.op.forward_op(a, self.w_q, self.b_q)
            denominator = torch.where(positive, o + q, torch.add(q, o, alpha=-(1.0 + self.gamma))).add_(self.eps)
            s = relevance.div_(denominator)
            return self._redistribute(a, s * positive, s * negative)
        z_p, z_n = self._denominators(a)
        s_p = relevance * positive / stabilize(z_p, self.eps)
        s_n = relevance * negative / stabilize(z_n, self.eps)
        return self._redistribute(a, s_p, s_n)


# -------------------------------------------------------------------------------------------- alpha-beta
class AlphaBeta(Rule):
    """alpha-beta: alpha * (positive contributions) - beta * (negative contributions), alpha - beta = 1."""

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6, zero_bias: bool = False):
        if alpha < 0 or beta < 0 or abs((alpha - beta) - 1.0) > 1e-12:
            raise ValueError(f"AlphaBeta: need alpha, beta >= 0 and alpha - beta = 1, got alpha={alpha}, beta={beta}")
        self.alpha, self.beta = float(alpha), float(beta)
        self.stabilizer = float(stabilizer)
        self.zero_bias = zero_bias

    def bind(self, op, weight, bias, ctx):
        return _BoundAlphaBeta(self, op, weight, bias, ctx)


class _BoundAlphaBeta(_SignSplit):
    def __init__(self, rule: AlphaBeta, op: AffineOp, weight: Tensor, bias: Tensor | None, ctx: LayerContext):
        super().__init__(op)
        self.alpha, self.beta, self.eps = rule.alpha, rule.beta, rule.stabilizer
        bias = None if rule.zero_bias else bias
        self._bind_pair(weight.clamp(min=0), weight.clamp(max=0), _clamp_pos(bias), _clamp_neg(bias),
                        ctx.input_nonnegative)

    def relevance(self, a, out, stash, relevance, weight):
        z_p, z_n = self._denominators(a)
        s_p = relevance * self.alpha / stabilize(z_p, self.eps)
        s_n = relevance * -self.beta / stabilize(z_n, self.eps)
        return self._redistribute(a, s_p, s_n)


# ------------------------------------------------------------------------------------------------- z-box
class ZBox(Rule):
    """z^B for bounded input (first layer): low/high are scalars or per-channel bounds of the layer input.

    No zero_bias option: the biases cancel in z^B (b - b+ - b- = 0), so it would change nothing."""

    def __init__(self, low: float | Sequence[float], high: float | Sequence[float], stabilizer: float = 1e-6) -> None:
        self.low = torch.as_tensor(low, dtype=torch.float32)
        self.high = torch.as_tensor(high, dtype=torch.float32)
        if self.low.shape != self.high.shape or bool((self.low > self.high).any()):
            raise ValueError(f"ZBox: low and high must have the same shape and low <= high, got {low}, {high}")
        self.stabilizer = float(stabilizer)

    @property
    def multiplies_input(self) -> bool:
        return False  # the box terms give relevance where the input is zero

    def bind(self, op, weight, bias, ctx):
        return _BoundZBox(self, op, weight, bias, ctx)


class _BoundZBox(BoundRule):
    keeps_preactivation = True

    def __init__(self, rule: ZBox, op: AffineOp, weight: Tensor, bias: Tensor | None, ctx: LayerContext):
        super().__init__(op)
        self.eps = rule.stabilizer
        in_channels = weight.shape[1]
        if rule.low.numel() not in (1, in_channels):
            raise ValueError(f"ZBox: bounds have {rule.low.numel()} values, the layer has {in_channels} input channels")
        shape = (1, -1) + (1,) * (weight.ndim - 2)  # broadcast over the input's channel dim
        w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
        t = op.transpose_weight
        self.relu = ctx.relu
        # z = F(a,W,b) - F(l,W+,b+) - F(h,W-,b-) = F(a,W) - F(l,W+) - F(h,W-): the biases cancel (b = b+ + b-),
        # with or without zero_bias, so z is the pre-activation minus the bias minus the box term
        self._buffers_from(
            low=rule.low.to(weight).reshape(shape) if rule.low.numel() > 1 else rule.low.to(weight),
            high=rule.high.to(weight).reshape(shape) if rule.high.numel() > 1 else rule.high.to(weight),
            w_pos=w_pos,
            w_neg=w_neg,
            bias=None if bias is None else bias.reshape((1, -1) + (1,) * (weight.ndim - 2)),
            w_split_t=op.split_transposed([t(weight), t(w_pos), t(w_neg)]),
        )

    def relevance(self, a, out, stash, relevance, weight):
        o = stash if self.relu else out
        ones = torch.ones_like(a[:1])
        low, high = ones * self.low, ones * self.high
        box = self.op.forward_op(low, self.w_pos) + self.op.forward_op(high, self.w_neg)
        if self.bias is not None:
            box = box + self.bias
        s = relevance / stabilize(o - box, self.eps)
        c, c_low, c_high = self.op.chunk(self.op.transpose_op(s, self.w_split_t, a.shape), 3)
        return a * c - low * c_low - high * c_high


# ------------------------------------------------------------------------------------------ flat and w^2
class Flat(Rule):
    """flat: every input gets relevance in proportion to its connection count (all-ones input and weights)."""

    def __init__(self, stabilizer: float = 1e-6) -> None:
        self.stabilizer = float(stabilizer)

    @property
    def multiplies_input(self) -> bool:
        return False

    def bind(self, op, weight, bias, ctx):
        return _BoundSquaredOrFlat(op, torch.ones_like(weight), None, self.stabilizer)


class WSquare(Rule):
    """w^2: relevance in proportion to squared weights (zennit squares the bias too unless zero_bias)."""

    def __init__(self, stabilizer: float = 1e-6, zero_bias: bool = False) -> None:
        self.stabilizer = float(stabilizer)
        self.zero_bias = zero_bias

    @property
    def multiplies_input(self) -> bool:
        return False

    def bind(self, op, weight, bias, ctx):
        squared_bias = None if (bias is None or self.zero_bias) else bias.square()
        return _BoundSquaredOrFlat(op, weight.square(), squared_bias, self.stabilizer)


class _BoundSquaredOrFlat(BoundRule):
    """z = F(1, V, c) >= 0 for a non-negative V, c; R_in = F^T(R / (z + eps), V). z depends on shape only."""

    def __init__(self, op: AffineOp, weight: Tensor, bias: Tensor | None, eps: float):
        super().__init__(op)
        self.eps = eps
        self._buffers_with_transpose("modified", weight)
        self._buffers_from(bias=bias)

    def relevance(self, a, out, stash, relevance, weight):
        z = self.op.forward_op(torch.ones_like(a[:1]), self.modified, self.bias)
        return self.op.transpose_op(relevance / (z + self.eps), self._transposed("modified"), a.shape)


# ----------------------------------------------------------------------------------------------- pooling
class PoolRule:
    """A relevance rule for pooling layers (and for the residual sum, zennit's `Sum` module: Norm)."""

    def bind(self, pool: nn.Module, ctx: LayerContext | None = None) -> BoundPoolRule:
        raise NotImplementedError

    multiplies_input = True
    needs_indices = False

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


class BoundPoolRule(nn.Module):
    def relevance(self, a: Tensor, out: Tensor, indices: Tensor | None, relevance: Tensor) -> Tensor:
        raise NotImplementedError


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


@dataclass(frozen=True)
class PoolGeometry:
    """Kernel, stride, padding and dilation of a 2-d pooling layer."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    @classmethod
    def of(cls, pool: nn.Module) -> PoolGeometry:
        if getattr(pool, "ceil_mode", False):
            raise ValueError(f"pooling with ceil_mode=True is not supported, got {pool}")
        kernel = _pair(pool.kernel_size)
        return cls(kernel, _pair(pool.stride or pool.kernel_size), _pair(getattr(pool, "padding", 0)),
                   _pair(getattr(pool, "dilation", 1)))

    @property
    def overlapping(self) -> bool:
        return any(d * (k - 1) + 1 > s for k, s, d in zip(self.kernel, self.stride, self.dilation))

    @property
    def tiles(self) -> bool:
        """Windows tile the input exactly from its corner: kernel == stride, no padding or dilation."""
        return self.kernel == self.stride and self.padding == (0, 0) and self.dilation == (1, 1)


def _pool_geometry(pool: nn.Module) -> tuple[tuple[int, int], tuple[int, int]]:
    geometry = PoolGeometry.of(pool)
    return geometry.kernel, geometry.stride


def sum_pool_transpose(s: Tensor, geometry: PoolGeometry, input_shape: torch.Size) -> Tensor:
    """Adjoint of sum pooling over the windows of `geometry`: each value spread over its window (windows that
    overlap add up), zero where no window reaches. A depthwise transposed convolution with a ones kernel."""
    (kh, kw), channels = geometry.kernel, s.shape[1]
    if geometry.tiles:  # spread each value over its window, zero in leftover rows and columns
        up = s.repeat_interleave(kh, dim=2).repeat_interleave(kw, dim=3)
        return F.pad(up, (0, input_shape[-1] - up.shape[-1], 0, input_shape[-2] - up.shape[-2]))
    ones = s.new_ones((channels, 1, kh, kw))
    out_pad = [size - ((o - 1) * st - 2 * p + d * (k - 1) + 1) for size, o, st, p, d, k in zip(
        input_shape[-2:], s.shape[-2:], geometry.stride, geometry.padding, geometry.dilation, geometry.kernel)]
    return F.conv_transpose2d(s, ones, None, geometry.stride, geometry.padding, out_pad, channels, geometry.dilation)


class WinnerTakesAll(PoolRule):
    """Max pooling: all relevance of a window goes to its arg-max (zennit's default: the gradient)."""

    needs_indices = True

    def bind(self, pool, ctx=None):
        if not isinstance(pool, nn.MaxPool2d):
            raise ValueError(f"WinnerTakesAll is for MaxPool2d, got {type(pool).__name__}")
        return _BoundWinnerTakesAll(PoolGeometry.of(pool).overlapping)


class _BoundWinnerTakesAll(BoundPoolRule):
    def __init__(self, overlapping: bool = False) -> None:
        super().__init__()
        self.overlapping = overlapping

    def relevance(self, a, out, indices, relevance):
        # unpooling as a scatter into the flattened input plane: exact, and what every tracer and exporter
        # supports (ONNX ScatterElements); where windows overlap, a position that wins several adds them up
        planes = torch.zeros_like(a).flatten(2)
        if self.overlapping:
            return planes.scatter_add_(2, indices.flatten(2), relevance.flatten(2)).view_as(a)
        return planes.scatter_(2, indices.flatten(2), relevance.flatten(2)).view_as(a)


class AvgPoolRule(PoolRule):
    """Max pooling treated as average pooling over the same windows (the LRP tutorial, the original blog)."""

    def __init__(self, stabilizer: float = 1e-6, rms_scale: float = 0.0) -> None:
        self.stabilizer = float(stabilizer)
        self.rms_scale = float(rms_scale)

    def bind(self, pool, ctx=None):
        if not isinstance(pool, (nn.MaxPool2d, nn.AvgPool2d)):
            raise ValueError(f"AvgPoolRule is for MaxPool2d / AvgPool2d, got {type(pool).__name__}")
        geometry = PoolGeometry.of(pool)
        if geometry.dilation != (1, 1):
            raise ValueError(f"AvgPoolRule: a dilated max pool has no average-pool counterpart, got {pool}")
        return _BoundAvgPool(geometry, self.stabilizer, self.rms_scale)


class _BoundAvgPool(BoundPoolRule):
    """z = avgpool(a) over the layer's windows (zero padding counted, as avg_pool2d's default), or the layer's own
    average pool (`divisor`: count_include_pad=False / divisor_override); R_in = a * sumpool^T(R / stab(z) / n)."""

    def __init__(self, geometry: PoolGeometry, eps: float, rms_scale: float, count_include_pad: bool = True,
                 divisor_override: int | None = None) -> None:
        super().__init__()
        self.geometry, self.eps, self.rms_scale = geometry, eps, rms_scale
        self.count_include_pad, self.divisor_override = count_include_pad, divisor_override

    def relevance(self, a, out, indices, relevance):
        g = self.geometry
        z = F.avg_pool2d(a, g.kernel, g.stride, g.padding, False, self.count_include_pad, self.divisor_override)
        eps = self.eps + self.rms_scale * rms_per_sample(z) if self.rms_scale else self.eps
        s = _divide(relevance, stabilize(z, eps), eps)
        if self.divisor_override:
            s = s / self.divisor_override
        elif self.count_include_pad:
            s = s / (g.kernel[0] * g.kernel[1])
        else:  # per window: the number of positions inside the input
            ones = torch.ones_like(a[:1, :1])
            s = s / F.avg_pool2d(ones, g.kernel, g.stride, g.padding, False, False, 1)
        return sum_pool_transpose(s, g, a.shape).mul_(a)


class Norm(PoolRule):
    """Average / adaptive average pooling and the residual sum (zennit's Norm): z = layer(a),
    R_in = a * layer^T(R / stab(z)); for a sum of x_1, x_2: R_i = x_i * R / stab(x_1 + x_2)."""

    def __init__(self, stabilizer: float = 1e-6) -> None:
        self.stabilizer = float(stabilizer)

    def bind(self, pool, ctx=None):
        if isinstance(pool, nn.AdaptiveAvgPool2d):
            return _BoundAdaptiveNorm(pool.output_size, self.stabilizer)
        if isinstance(pool, nn.AvgPool2d):
            return _BoundAvgPool(PoolGeometry.of(pool), self.stabilizer, 0.0, pool.count_include_pad,
                                 pool.divisor_override)
        if isinstance(pool, Sum):
            return _BoundSumNorm(self.stabilizer, ctx)
        raise ValueError(f"Norm supports AvgPool2d, AdaptiveAvgPool2d and sums, got {pool}")


def adaptive_pool_matrix(n_in: int, n_out: int, like: Tensor) -> Tensor:
    """(n_out, n_in) matrix of adaptive average pooling along one axis (PyTorch's bins: floor(i n_in / n_out) to
    ceil((i + 1) n_in / n_out)), in `like`'s dtype, computed from a tensor made by `like.new_ones`: a trace then
    follows its input's device instead of baking in the one it was traced on (a CPU-traced module runs on GPUs)."""
    ones = like.new_ones((n_out, n_in), dtype=torch.int64)  # integers: exact bins on every device
    row, col = ones.cumsum(0) - 1, ones.cumsum(1) - 1
    start, end = (row * n_in) // n_out, -((-(row + 1) * n_in) // n_out)
    return ((col >= start) & (col < end)).to(like.dtype) / (end - start).to(like.dtype)


class _BoundAdaptiveNorm(BoundPoolRule):
    def __init__(self, output_size, eps: float) -> None:
        super().__init__()
        size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        self.output_size = size
        self.eps = eps

    def relevance(self, a, out, indices, relevance):
        s = _divide(relevance, stabilize(out, self.eps), self.eps)
        (h, w), (oh, ow) = a.shape[-2:], out.shape[-2:]
        if (h, w) != (oh, ow):  # separable adjoint: P_h^T s P_w
            s = adaptive_pool_matrix(h, oh, s).t() @ s @ adaptive_pool_matrix(w, ow, s)
        return s * a


class _BoundSumNorm(BoundPoolRule):
    """R_i = x_i * R / stab(o) for o = x_1 + x_2 (+ ...), o optionally followed by a ReLU. fast: the ReLU output
    stands in for o, valid where relevance arrives only where the ReLU fired (the engine proves it)."""

    def __init__(self, eps: float, ctx: LayerContext | None) -> None:
        super().__init__()
        self.eps = eps
        self.relu = ctx is not None and ctx.relu
        self.fast = self.relu and ctx.relevance_on_active
        self.keeps_preactivation = self.relu and not self.fast

    def relevance_sum(self, inputs: Sequence[Tensor], out: Tensor, stash: Tensor | None,
                      relevance: Tensor) -> list[Tensor]:
        if self.fast:  # out = relu(o) >= 0, and relevance is zero wherever it is zero
            s = _divide(relevance, out + self.eps, self.eps)
        else:
            z = stash if self.keeps_preactivation else out
            s = _divide(relevance, stabilize(z, self.eps), self.eps)
        return [x * s for x in inputs]
