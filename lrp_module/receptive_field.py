"""The receptive field of one neuron of a layer's output in the input image, from the graph's geometry, and crops to
it: where a concept's reference image is cut (CRP's reference images show the most relevant neuron's field).

A neuron is a layer (any name `LRPModel.concept_layers` accepts) and a position in its channel's H x W: a flat index
(row-major, as zennit-crp's neuron ids) or (row, column). Walking the step graph down from that neuron, each step
maps the set of its output positions that matter to the set of its input positions they read: a convolution or
pooling window (kernel, stride, padding, dilation; positions in the padding do not exist), an adaptive average
pooling bin (PyTorch's floor / ceil bins), a concatenation along a spatial axis split back; an addition, ReLU or
channel concatenation passes the set on to every input, and sets arriving at a value by several paths (a residual
connection, a parallel branch) are joined. A neuron of a flat layer (a Linear layer, after a flatten) reads every
pixel. The sets are kept per axis, as a union of boxes (one per path, a box inside another dropped), so dilation,
strides larger than the kernel and clipping at the border are exact; the result is the bounding box of the union.

Boxes are half-open, as slices: (top, left, bottom, right) covers rows top..bottom-1 and columns left..right-1, so
`crop(image, box)` is `image[..., top:bottom, left:right]`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
from torch import nn

from .concepts import ConceptError, resolve
from .model import AffineStep, CatStep, FlattenStep, LRPModel, PoolStep

Box = tuple[int, int, int, int]  # (top, left, bottom, right), half-open
Size = tuple[int, int] | None  # a step output's (H, W); None once the tensor is flat
_AxisBox = tuple[np.ndarray, np.ndarray]  # boolean masks over rows and over columns: the positions read


def input_box(lrp: LRPModel, layer: str, position: int | tuple[int, int], input_size: tuple[int, int]) -> Box:
    """(top, left, bottom, right), half-open: the bounding box of the input pixels the neuron at `position` of
    `layer`'s output reads, for an input of `input_size` (H, W)."""
    sizes = step_sizes(lrp, input_size)
    step = resolve(layer, lrp.concept_layers).step
    if sizes[step] is None:  # a flat layer's neuron (Linear): every pixel
        if position not in (0, (0, 0)):
            raise ConceptError(f"layer {layer} is flat (no spatial positions): its neuron position is 0, "
                               f"got {position!r}")
        return 0, 0, int(input_size[0]), int(input_size[1])
    return _box(lrp, sizes, input_size, step, _row_col(layer, position, sizes[step]))


def input_boxes(lrp: LRPModel, layer: str, input_size: tuple[int, int]) -> np.ndarray:
    """(H * W, 4) int64: `input_box` of every position of `layer`'s channels, row-major (index it by the flat
    neuron position); (1, 4) for a flat layer. For reference images of many images and channels at once."""
    sizes = step_sizes(lrp, input_size)
    step = resolve(layer, lrp.concept_layers).step
    if sizes[step] is None:
        return np.array([[0, 0, int(input_size[0]), int(input_size[1])]], dtype=np.int64)
    h, w = sizes[step]
    return np.array([_box(lrp, sizes, input_size, step, divmod(p, w)) for p in range(h * w)], dtype=np.int64)


def _box(lrp: LRPModel, sizes: Sequence[Size], input_size: tuple[int, int], step: int,
         row_col: tuple[int, int]) -> Box:
    """The bounding box of what the neuron at `row_col` of `step`'s output reads in the image."""
    rows, cols = np.zeros(sizes[step][0], bool), np.zeros(sizes[step][1], bool)
    rows[row_col[0]], cols[row_col[1]] = True, True
    boxes = _walk_down(lrp, sizes, (int(input_size[0]), int(input_size[1])), step, [(rows, cols)])
    if not boxes:  # the neuron reads only padding (a convolution whose window lies outside its input)
        return 0, 0, 0, 0
    top = min(int(np.argmax(r)) for r, _ in boxes)
    bottom = max(len(r) - int(np.argmax(r[::-1])) for r, _ in boxes)
    left = min(int(np.argmax(c)) for _, c in boxes)
    right = max(len(c) - int(np.argmax(c[::-1])) for _, c in boxes)
    return top, left, bottom, right


T = TypeVar("T")


def crop(image: T, box: Box) -> T:
    """image[..., top:bottom, left:right] (a tensor or an array whose last two axes are H, W)."""
    top, left, bottom, right = box
    return image[..., top:bottom, left:right]


def step_sizes(lrp: LRPModel, input_size: tuple[int, int]) -> list[Size]:
    """Each step's output (H, W) for an input of `input_size`, from the layers' geometry (None: flat)."""
    if len(input_size) != 2 or min(input_size) < lrp.min_size:
        raise ValueError(f"input_size must be (H, W) with H, W >= {lrp.min_size} for this network, got {input_size!r}")
    sizes: list[Size] = []
    for step, wiring in zip(lrp.steps, lrp.wiring):
        inputs = [tuple(input_size) if i < 0 else sizes[i] for i in wiring]
        sizes.append(_output_size(step, inputs))
    return sizes


def _output_size(step: nn.Module, inputs: list[Size]) -> Size:
    first = inputs[0]
    if isinstance(step, FlattenStep) or first is None or (isinstance(step, AffineStep) and not _is_conv(step)):
        return None
    if isinstance(step, CatStep) and step.dim in (2, 3, -1, -2):
        axis = _spatial_axis(step.dim)
        return tuple(sum(s[a] for s in inputs) if a == axis else first[a] for a in (0, 1))
    geometry = _geometry(step)
    if geometry is None:
        return first
    if geometry[0] == "bins":
        return tuple(first[a] if geometry[1][a] is None else geometry[1][a] for a in (0, 1))
    _, kernel, stride, padding, dilation = geometry
    return tuple((first[a] + 2 * padding[a] - dilation[a] * (kernel[a] - 1) - 1) // stride[a] + 1 for a in (0, 1))


def _is_conv(step: AffineStep) -> bool:
    return hasattr(step.op, "kernel")


def _spatial_axis(dim: int) -> int:
    return {2: 0, 3: 1, -2: 0, -1: 1}[dim]


def _geometry(step: nn.Module) -> tuple | None:
    """("window", kernel, stride, padding, dilation) of a convolution or pooling; ("bins", (H or None, W or None))
    of an adaptive average pooling; None for a step that keeps positions (addition, ReLU, channel concatenation)."""
    if isinstance(step, AffineStep) and _is_conv(step):
        op = step.op
        return "window", op.kernel, op.stride, op.padding, op.dilation
    if isinstance(step, PoolStep):
        if isinstance(step.pool, nn.AdaptiveAvgPool2d):
            size = step.pool.output_size
            return "bins", tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        g = step.geometry
        return "window", g.kernel, g.stride, g.padding, g.dilation
    return None


def _window(out_mask: np.ndarray, n_in: int, kernel: int, stride: int, padding: int, dilation: int) -> np.ndarray:
    """The input positions (mask over n_in) the windows of the output positions in `out_mask` read."""
    outputs = np.flatnonzero(out_mask)
    read = (outputs[:, None] * stride - padding + np.arange(kernel)[None, :] * dilation).ravel()
    mask = np.zeros(n_in, bool)
    mask[read[(read >= 0) & (read < n_in)]] = True
    return mask


def _bins(out_mask: np.ndarray, n_in: int) -> np.ndarray:
    """The input positions adaptive average pooling's bins (floor(i n_in / n_out) to ceil((i+1) n_in / n_out))
    of the output positions in `out_mask` read."""
    n_out = len(out_mask)
    mask = np.zeros(n_in, bool)
    for i in np.flatnonzero(out_mask):
        mask[(i * n_in) // n_out: -((-(i + 1) * n_in) // n_out)] = True
    return mask


def _map_down(step: nn.Module, box: _AxisBox, inputs: list[Size]) -> list[_AxisBox | None]:
    """The box each input of `step` contributes to, for its output box (None: that input is not read there)."""
    rows, cols = box
    if isinstance(step, CatStep) and step.dim in (2, 3, -1, -2):
        axis, out, start = _spatial_axis(step.dim), [], 0
        for size in inputs:
            part = (rows, cols[start:start + size[1]]) if axis == 1 else (rows[start:start + size[0]], cols)
            start += size[axis]
            out.append(part if part[0].any() and part[1].any() else None)
        return out
    geometry = _geometry(step)
    if geometry is None:
        return [box] * len(inputs)
    (h, w) = inputs[0]
    if geometry[0] == "bins":
        mapped = (_bins(rows, h), _bins(cols, w))
    else:
        _, kernel, stride, padding, dilation = geometry
        mapped = (_window(rows, h, kernel[0], stride[0], padding[0], dilation[0]),
                  _window(cols, w, kernel[1], stride[1], padding[1], dilation[1]))
    return [mapped if mapped[0].any() and mapped[1].any() else None]


def _join(boxes: list[_AxisBox], new: _AxisBox) -> list[_AxisBox]:
    """The union of boxes with `new` added: a box inside another is dropped (the union is the same)."""
    def inside(a: _AxisBox, b: _AxisBox) -> bool:
        return not (a[0] & ~b[0]).any() and not (a[1] & ~b[1]).any()

    if any(inside(new, b) for b in boxes):
        return boxes
    return [b for b in boxes if not inside(b, new)] + [new]


def _walk_down(lrp: LRPModel, sizes: Sequence[Size], image: tuple[int, int], start: int,
               boxes: list[_AxisBox]) -> list[_AxisBox]:
    """The boxes read in the image, walking the steps from `start` down in reverse topological order."""
    pending: dict[int, list[_AxisBox]] = {start: boxes}
    found: list[_AxisBox] = []
    for k in range(start, -1, -1):
        here = pending.pop(k, None)
        if not here:
            continue
        step, wiring = lrp.steps[k], lrp.wiring[k]
        inputs = [image if i < 0 else sizes[i] for i in wiring]
        for box in here:
            for i, mapped in zip(wiring, _map_down(step, box, inputs)):
                if mapped is None:
                    continue
                if i < 0:
                    found = _join(found, mapped)
                else:
                    pending[i] = _join(pending.get(i, []), mapped)
    return found


def _row_col(layer: str, position: int | tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    h, w = size
    if isinstance(position, (tuple, list)) and len(position) == 2 and all(_is_int(p) for p in position):
        row, col = int(position[0]), int(position[1])
        if 0 <= row < h and 0 <= col < w:
            return row, col
    elif _is_int(position) and 0 <= int(position) < h * w:
        return divmod(int(position), w)
    raise ConceptError(f"layer {layer}: neuron position {position!r} is out of range (its channels are {h} x {w}: "
                       f"a flat index in [0, {h * w}) or (row, column))")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
