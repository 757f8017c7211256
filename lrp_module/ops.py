"""Forward and transposed passes of the affine layers (conv2d, linear) and of pooling as plain tensor functions.

LRP needs `F(a, W, b)` and its transpose `F^T(s, W)` with many weight variants. The transposed weight is
prepared once per variant (`transpose_weight`), so the per-call work is a single conv or matmul. Pooling rules need
the window geometry (`PoolGeometry`) and the adjoints of sum and adaptive average pooling.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@contextmanager
def repeated_images(op: AffineOp, rows: int, times: int) -> Iterator[None]:
    """While inside, `op.forward_op` on a batch of `rows` = images x `times` (each image repeated, image major)
    computes each image once: what the K concept maps below a conditioned layer share (every denominator)."""
    op.repeats = (rows, times) if times > 1 else None
    try:
        yield
    finally:
        op.repeats = None


class AffineOp(nn.Module):
    """Geometry of one affine layer; holds no weights, only how to apply them."""

    # (rows, times) while the batch is each of rows / times images repeated `times` times (the concept maps'
    # N x K batch): a forward pass over such a batch runs once per image and is repeated (`repeated_images`)
    repeats: tuple[int, int] | None = None

    def forward_op(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if self.repeats is not None and x.shape[0] == self.repeats[0]:
            times = self.repeats[1]
            return self.compute(x[::times], weight, bias).repeat_interleave(times, 0)
        return self.compute(x, weight, bias)

    def compute(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def transpose_weight(self, weight: Tensor) -> Tensor:
        """Return the weight in the layout `transpose_op` wants (computed once, at build time)."""
        raise NotImplementedError

    def transpose_op(self, s: Tensor, weight_t: Tensor, input_shape: torch.Size) -> Tensor:
        raise NotImplementedError

    def ones_weight(self, weight: Tensor) -> Tensor:
        return torch.ones_like(weight)

    def cat_weights(self, weights: list[Tensor]) -> Tensor:
        """Stack weight variants along the output dimension (one forward computes all of them)."""
        return torch.cat(weights, dim=0)

    def cat_outputs(self, tensors: list[Tensor]) -> Tensor:
        """Stack per-variant outputs (or output relevances) as one forward with `cat_weights` lays them out."""
        return torch.cat(tensors, dim=self.channel_dim)

    def chunk(self, tensor: Tensor, n: int) -> tuple[Tensor, ...]:
        """Split a stacked result (from `cat_weights` or `split_transposed`) back into its n variants."""
        return tensor.chunk(n, dim=self.channel_dim)

    def cat_transposed(self, weights_t: list[Tensor]) -> Tensor:
        """Stack transposed weights so that one transposed pass sums over all variants' inputs."""
        raise NotImplementedError

    def split_transposed(self, weights_t: list[Tensor]) -> Tensor:
        """Stack transposed weights so that one transposed pass returns each variant's input separately."""
        raise NotImplementedError

    @property
    def channel_dim(self) -> int:
        return 1


def interleave(tensors: list[Tensor], groups: int, dim: int) -> Tensor:
    """Concatenate along `dim` group by group: (group, variant, channel) order, which is what a grouped conv
    needs when several weight variants (or their relevances) are stacked into one call. groups=1: torch.cat."""
    if groups == 1:
        return torch.cat(tensors, dim=dim)
    return torch.stack([t.unflatten(dim, (groups, -1)) for t in tensors], dim=dim + 1).flatten(dim, dim + 2)


class Conv2dOp(AffineOp):
    """conv2d (grouped too); its transpose is a conv2d with flipped kernels where stride is 1 (fastest), else
    conv_transpose2d. Stacked variants of a grouped conv are interleaved per group (`interleave`)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.groups = conv.groups
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            raise ValueError(f"only explicit zero padding is supported, got {conv.padding!r}/{conv.padding_mode}")
        self.stride = tuple(conv.stride)
        self.padding = tuple(conv.padding)
        self.dilation = tuple(conv.dilation)
        self.kernel = tuple(conv.kernel_size)
        flip_padding = tuple(d * (k - 1) - p for d, k, p in zip(self.dilation, self.kernel, self.padding))
        self.as_flipped_conv = self.stride == (1, 1) and all(p >= 0 for p in flip_padding)
        self.flip_padding = flip_padding

    def compute(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def transpose_weight(self, weight: Tensor) -> Tensor:
        if self.as_flipped_conv:  # (out, in/g, k, k) -> (in, out/g, k, k), per group, kernels flipped
            g = self.groups
            per_group = weight.unflatten(0, (g, -1)).transpose(1, 2)
            return per_group.flatten(0, 1).flip(2, 3).contiguous()
        return weight.contiguous()

    def cat_weights(self, weights: list[Tensor]) -> Tensor:
        return interleave(weights, self.groups, 0)

    def cat_outputs(self, tensors: list[Tensor]) -> Tensor:
        return interleave(tensors, self.groups, 1)

    def chunk(self, tensor: Tensor, n: int) -> tuple[Tensor, ...]:
        if self.groups == 1:
            return tensor.chunk(n, dim=1)
        return tuple(t.flatten(1, 2) for t in tensor.unflatten(1, (self.groups, n, -1)).unbind(2))

    def transpose_op(self, s: Tensor, weight_t: Tensor, input_shape: torch.Size) -> Tensor:
        if self.as_flipped_conv:
            return F.conv2d(s, weight_t, None, 1, self.flip_padding, self.dilation, self.groups)
        out_pad = [
            size - ((o - 1) * st - 2 * p + d * (k - 1) + 1)
            for size, o, st, p, d, k in zip(
                input_shape[-2:], s.shape[-2:], self.stride, self.padding, self.dilation, self.kernel
            )
        ]
        return F.conv_transpose2d(s, weight_t, None, self.stride, self.padding, out_pad, self.groups, self.dilation)

    def cat_transposed(self, weights_t: list[Tensor]) -> Tensor:
        # flipped layout is (in, out/g, k, k): more "out" channels of the forward = more input channels here;
        # the stacked relevances come in (group, variant, channel) order (`cat_outputs`)
        if self.as_flipped_conv:
            return torch.cat(weights_t, dim=1)
        return interleave(weights_t, self.groups, 0)

    def split_transposed(self, weights_t: list[Tensor]) -> Tensor:
        if self.as_flipped_conv:
            return interleave(weights_t, self.groups, 0)
        return torch.cat(weights_t, dim=1)


class LinearOp(AffineOp):
    """Dense layer; its transpose is `s @ W`."""

    def compute(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        return F.linear(x, weight, bias)

    def transpose_weight(self, weight: Tensor) -> Tensor:
        return weight.contiguous()

    def transpose_op(self, s: Tensor, weight_t: Tensor, input_shape: torch.Size) -> Tensor:
        return torch.matmul(s, weight_t)

    def cat_transposed(self, weights_t: list[Tensor]) -> Tensor:
        return torch.cat(weights_t, dim=0)

    def split_transposed(self, weights_t: list[Tensor]) -> Tensor:
        return torch.cat(weights_t, dim=1)


def make_op(layer: nn.Module) -> AffineOp:
    if isinstance(layer, nn.Conv2d):
        return Conv2dOp(layer)
    if isinstance(layer, nn.Linear):
        return LinearOp()
    raise TypeError(f"no affine op for {type(layer).__name__}")


# ---------------------------------------------------------------------------------------------- pooling
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


def adaptive_pool_matrix(n_in: int, n_out: int, like: Tensor) -> Tensor:
    """(n_out, n_in) matrix of adaptive average pooling along one axis (PyTorch's bins: floor(i n_in / n_out) to
    ceil((i + 1) n_in / n_out)), in `like`'s dtype, computed from a tensor made by `like.new_ones`: a trace then
    follows its input's device instead of baking in the one it was traced on (a CPU-traced module runs on GPUs)."""
    ones = like.new_ones((n_out, n_in), dtype=torch.int64)  # integers: exact bins on every device
    row, col = ones.cumsum(0) - 1, ones.cumsum(1) - 1
    start, end = (row * n_in) // n_out, -((-(row + 1) * n_in) // n_out)
    return ((col >= start) & (col < end)).to(like.dtype) / (end - start).to(like.dtype)
