"""Rules for pooling layers and the residual sum.

- WinnerTakesAll (max pooling, zennit's default: the gradient): all relevance of a window goes to its arg-max.
- AvgPoolRule (max pooling as average pooling: the LRP tutorial, the original blog):
  z = avgpool(a), R_in = a * avgpool^T(R / stab(z)).
- Norm (zennit's `Norm`, LRP-epsilon without weights: Montavon et al. 2019, Sec. 10.2.1 with W = the pooling):
  average / adaptive average pooling z = layer(a), R_in = a * layer^T(R / stab(z)); the residual sum
  o = x_1 + x_2 (+ ...): R_i = x_i * R / stab(o).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..contexts import LayerContext
from ..graph import Sum
from ..ops import PoolGeometry, adaptive_pool_matrix, sum_pool_transpose
from ..stabilize import rms_per_sample, stabilize
from .base import Keep, Path, Stash, divide


class PoolRule:
    """A relevance rule for pooling layers (and for the residual sum, zennit's `Sum` module: Norm)."""

    multiplies_input = True  # the input relevance is zero wherever the layer's input is zero
    routes_to_input = False  # relevance goes to input positions equal to an output value (arg-max)
    needs_indices = False  # the forward must return max pooling's arg-max positions

    def bind(self, pool: nn.Module, ctx: LayerContext | None = None) -> BoundPoolRule:
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


class BoundPoolRule(Path):
    """A pooling rule's path bound to one layer."""

    def relevance(self, a: Tensor, out: Tensor, stash: Stash, relevance: Tensor) -> Tensor:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------ winner takes all
class WinnerTakesAll(PoolRule):
    """Max pooling: all relevance of a window goes to its arg-max (zennit's default: the gradient)."""

    needs_indices = True
    routes_to_input = True

    def bind(self, pool, ctx=None):
        if not isinstance(pool, nn.MaxPool2d):
            raise ValueError(f"WinnerTakesAll is for MaxPool2d, got {type(pool).__name__}")
        return WinnerTakesAllGeneral(PoolGeometry.of(pool).overlapping)


class WinnerTakesAllGeneral(BoundPoolRule):
    """Unpooling as a scatter into the flattened input plane: exact, and what every tracer and exporter supports
    (ONNX ScatterElements); where windows overlap, a position that wins several adds them up."""

    def __init__(self, overlapping: bool = False) -> None:
        super().__init__()
        self.overlapping = overlapping

    def relevance(self, a, out, stash, relevance):
        planes, indices = torch.zeros_like(a).flatten(2), stash.indices
        if self.overlapping:
            return planes.scatter_add_(2, indices.flatten(2), relevance.flatten(2)).view_as(a)
        return planes.scatter_(2, indices.flatten(2), relevance.flatten(2)).view_as(a)


# ------------------------------------------------------------------------------------------ average pooling
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
        return AveragePoolGeneral(geometry, self.stabilizer, self.rms_scale)


class AveragePoolGeneral(BoundPoolRule):
    """z = avgpool(a) over the layer's windows (zero padding counted, as avg_pool2d's default), or the layer's own
    average pool (`divisor`: count_include_pad=False / divisor_override); R_in = a * sumpool^T(R / stab(z) / n)."""

    def __init__(self, geometry: PoolGeometry, eps: float, rms_scale: float, count_include_pad: bool = True,
                 divisor_override: int | None = None) -> None:
        super().__init__()
        self.geometry, self.eps, self.rms_scale = geometry, eps, rms_scale
        self.count_include_pad, self.divisor_override = count_include_pad, divisor_override

    def relevance(self, a, out, stash, relevance):
        g = self.geometry
        z = F.avg_pool2d(a, g.kernel, g.stride, g.padding, False, self.count_include_pad, self.divisor_override)
        eps = self.eps + self.rms_scale * rms_per_sample(z) if self.rms_scale else self.eps
        s = divide(relevance, stabilize(z, eps), eps)
        if self.divisor_override:
            s = s / self.divisor_override
        elif self.count_include_pad:
            s = s / (g.kernel[0] * g.kernel[1])
        else:  # per window: the number of positions inside the input
            ones = torch.ones_like(a[:1, :1])
            s = s / F.avg_pool2d(ones, g.kernel, g.stride, g.padding, False, False, 1)
        return sum_pool_transpose(s, g, a.shape).mul_(a)


# --------------------------------------------------------------------------------------------------- Norm
class Norm(PoolRule):
    """Average / adaptive average pooling and the residual sum (zennit's Norm): z = layer(a),
    R_in = a * layer^T(R / stab(z)); for a sum of x_1, x_2: R_i = x_i * R / stab(x_1 + x_2)."""

    sum_paths: tuple[type[BoundPoolRule], ...] = ()  # the residual sum's paths, general last (below)

    def __init__(self, stabilizer: float = 1e-6) -> None:
        self.stabilizer = float(stabilizer)

    def bind(self, pool, ctx=None):
        if isinstance(pool, nn.AdaptiveAvgPool2d):
            return AdaptiveAveragePoolGeneral(pool.output_size, self.stabilizer)
        if isinstance(pool, nn.AvgPool2d):
            return AveragePoolGeneral(PoolGeometry.of(pool), self.stabilizer, 0.0, pool.count_include_pad,
                                      pool.divisor_override)
        if isinstance(pool, Sum):
            path = next(path for path in self.sum_paths if path.applies(self, ctx))
            return path(self.stabilizer, ctx)
        raise ValueError(f"Norm supports AvgPool2d, AdaptiveAvgPool2d and sums, got {pool}")


class AdaptiveAveragePoolGeneral(BoundPoolRule):
    """z = the layer's output; R_in = a * P_h^T (R / stab(z)) P_w, the separable adjoint of adaptive pooling."""

    def __init__(self, output_size, eps: float) -> None:
        super().__init__()
        size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        self.output_size = size
        self.eps = eps

    def relevance(self, a, out, stash, relevance):
        s = divide(relevance, stabilize(out, self.eps), self.eps)
        (h, w), (oh, ow) = a.shape[-2:], out.shape[-2:]
        if (h, w) != (oh, ow):  # separable adjoint: P_h^T s P_w
            s = adaptive_pool_matrix(h, oh, s).t() @ s @ adaptive_pool_matrix(w, ow, s)
        return s * a


class SumNormGeneral(BoundPoolRule):
    """The formula: R_i = x_i * R / stab(o) for o = x_1 + x_2 (+ ...), o stashed before a fused ReLU."""

    def __init__(self, eps: float, ctx: LayerContext | None) -> None:
        super().__init__()
        self.eps = eps
        if ctx is not None and ctx.relu:
            self.keeps = Keep.PREACTIVATION

    def relevance_sum(self, inputs: Sequence[Tensor], out: Tensor, stash: Stash, relevance: Tensor) -> list[Tensor]:
        s = divide(relevance, stabilize(self._preactivation(out, stash), self.eps), self.eps)
        return [x * s for x in inputs]


class SumNormOnActive(SumNormGeneral):
    """A fused ReLU and relevance only where it fired: relu(o) stands in for o, and stab(o) = relu(o) + eps there."""

    @classmethod
    def applies(cls, rule, ctx, bias=None):
        return ctx is not None and ctx.relevance_on_active

    def __init__(self, eps: float, ctx: LayerContext | None) -> None:
        super().__init__(eps, None)

    def relevance_sum(self, inputs, out, stash, relevance):
        s = divide(relevance, out + self.eps, self.eps)
        return [x * s for x in inputs]


Norm.sum_paths = (SumNormOnActive, SumNormGeneral)
