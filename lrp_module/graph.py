"""Capture a model's computation as a graph (torch.fx) and canonise it for LRP, as zennit's canonizers do.

`capture` traces the model into `Layer`s in execution order (what composites index by position); `canonize`
groups them into `Step`s: batch norm folded into the convolution / linear layer before it, a ReLU that alone reads
a layer's output fused into that layer, additions as zennit's `Sum` (ResNetCanonizer) with a ReLU after them fused
too, dropout and identities dropped. Anything outside the supported parts fails here, with one line naming the
module or operation and where it sits; nothing passes through silently.
"""
from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from .canonize import fold_batchnorm

SUPPORTED = ("Conv2d, BatchNorm2d, ReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Linear, Flatten, Dropout, "
             "addition and concatenation")


class GraphError(ValueError):
    """The model contains something LRP here does not cover; the message names it and where it sits."""


class Sum(nn.Module):
    """An addition of tensors (a residual connection): composites key it by this type, as zennit's `Sum`."""

    def forward(self, *inputs: Tensor) -> Tensor:
        return torch.stack(inputs, dim=-1).sum(dim=-1)


def projection_gate(h: Tensor, direction: Tensor, threshold: Tensor) -> Tensor:
    """(N, 1, 1, 1): 1 for the images of `h` (N, C, H, W) whose largest v^T h over the positions exceeds
    `threshold` (v = `direction`), else 0: a gated `ChannelProjection`'s choice of the images it projects."""
    score = torch.einsum("nchw,c->nhw", h, direction.to(h.dtype)).flatten(1).amax(1)
    return (score > threshold).to(h.dtype)[:, None, None, None]


class ChannelProjection(nn.Conv2d):
    """A 1x1 convolution inserted after a layer to project a direction out of its activations (P-ClArC:
    lrp_module/projection.py). A torch.fx leaf like torch.nn's own layers, so it is captured as one conv;
    composites give it LRP-epsilon (lrp_module/composites.py), since it is a fixed projection, not a filter.

    Gated (R-ClArC, Bareeva et al. 2024): with a finite `threshold`, an image is projected only where its artifact
    score, the largest v^T h over the positions (v = `direction`), exceeds the threshold; other images pass
    unchanged. Ungated (threshold -inf, the default), every image is projected."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, kernel_size=1, bias=True)
        with torch.no_grad():  # the identity until a direction is set
            self.weight.copy_(torch.eye(channels).reshape(channels, channels, 1, 1))
            self.bias.zero_()
        self.register_buffer("direction", torch.zeros(channels))
        self.register_buffer("threshold", torch.tensor(float("-inf")))
        self.gated = False  # a Python flag, not read from the buffer, so that traces and exports see no branch

    def set_gate(self, direction: Tensor, threshold: float) -> None:
        """Project only images whose largest v^T h exceeds `threshold` (-inf: every image)."""
        with torch.no_grad():
            self.direction.copy_(direction.to(self.direction))
            self.threshold.fill_(threshold)
        self.gated = bool(torch.isfinite(self.threshold))

    def forward(self, h: Tensor) -> Tensor:
        projected = super().forward(h)
        if not self.gated:
            return projected
        return torch.where(projection_gate(h, self.direction, self.threshold) > 0, projected, h)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """Loading a state dict sets the Python flag from the loaded threshold."""
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self.gated = bool(torch.isfinite(self.threshold))


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with `ChannelProjection` a leaf (it is defined outside torch.nn)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, ChannelProjection) or super().is_leaf_module(m, module_qualified_name)


def _symbolic_trace(model: nn.Module) -> fx.GraphModule:
    """fx.symbolic_trace with `_Tracer`."""
    graph = _Tracer().trace(model)
    return fx.GraphModule(model, graph, model.__class__.__name__)


class Concat(nn.Module):
    """A concatenation along `dim`: relevance is split back along it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, *inputs: Tensor) -> Tensor:
        return torch.cat(inputs, dim=self.dim)


@dataclass
class Layer:
    """One operation of the traced model, in execution order."""

    name: str  # module name ("layer1.0.conv1"), or "<module>.<op>" for functions ("layer1.0.add")
    index: int  # position among the model's operations (composites' integer keys)
    kind: str  # conv, linear, batchnorm, relu, maxpool, avgpool, adaptive_avgpool, flatten, identity, add, cat
    module: nn.Module
    inputs: list[int]  # layer indices; -1 is the model input


class StepKind(StrEnum):
    """What an LRP step does; the engine builds one step module per kind (lrp_module/model.py)."""

    AFFINE = "affine"  # conv2d / linear, batch norm folded in, a ReLU maybe fused
    POOL = "pool"  # max, average or adaptive average pooling
    ADD = "add"  # a residual sum (zennit's Sum), a ReLU maybe fused
    FLATTEN = "flatten"
    RELU = "relu"  # a ReLU that could not be fused
    CAT = "cat"


@dataclass
class Step:
    """One LRP step: an affine layer (batch norm folded, ReLU fused), a pooling, a sum, a concatenation, ..."""

    kind: StepKind
    layer: Layer  # the layer that gives the step its name, index and rule
    inputs: list[int]  # step indices; -1 is the model input
    weight: Tensor | None = None
    bias: Tensor | None = None
    relu: bool = False  # a ReLU follows (affine and add steps)
    block: int = 0  # downsampling layers (strided convolutions and pools) before this one
    first_affine: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    covers: list[str] = field(default_factory=list)  # the names of the layers folded or fused into this step
    batchnorm: str | None = None  # the module name of the batch norm folded into `weight` and `bias` (affine steps)

    @property
    def name(self) -> str:
        return self.layer.name


_ADD = {operator.add, operator.iadd, torch.add}
_RELU = {F.relu, torch.relu, torch.relu_}
_FLATTEN = {torch.flatten}
_CAT = {torch.cat, torch.concat}
_MODULE_KINDS: list[tuple[type, str]] = [
    (nn.Conv2d, "conv"), (nn.Linear, "linear"), (nn.BatchNorm2d, "batchnorm"), (nn.BatchNorm1d, "batchnorm"),
    (nn.ReLU, "relu"), (nn.MaxPool2d, "maxpool"), (nn.AvgPool2d, "avgpool"),
    (nn.AdaptiveAvgPool2d, "adaptive_avgpool"), (nn.Flatten, "flatten"), (nn.Dropout, "identity"),
    (nn.Dropout2d, "identity"), (nn.Identity, "identity"),
]


def _where(node: fx.Node) -> str:
    """The module a function call sits in ("layer1.0"), "" at the top level."""
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack)).split("@")[0] if stack else ""


def _fail(node: fx.Node, what: str) -> GraphError:
    where = _where(node)
    return GraphError(f"unsupported {what} in {where or 'the top-level forward'} (node {node.name}): LRP here "
                      f"covers {SUPPORTED}")


def _module_kind(name: str, module: nn.Module) -> str:
    for kind_type, kind in _MODULE_KINDS:
        if type(module) is kind_type or (kind_type is not nn.Dropout and isinstance(module, kind_type)):
            if kind == "flatten" and (module.start_dim != 1 or module.end_dim != -1):
                break
            return kind
    raise GraphError(f"unsupported layer {name} ({type(module).__name__}): LRP here covers {SUPPORTED}")


def _is_flatten_1(node: fx.Node) -> bool:
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return start == 1 and end == -1


def _function_layer(node: fx.Node) -> tuple[str, nn.Module, list[fx.Node]] | None:
    """(kind, stand-in module, tensor inputs) of a call_function / call_method node; None if unsupported."""
    target, args = node.target, node.args
    method = node.op == "call_method"
    if (target in _ADD or (method and target in ("add", "add_"))) and len(args) == 2 and not node.kwargs \
            and all(isinstance(a, fx.Node) for a in args):
        return "add", Sum(), list(args)
    if (target in _RELU or (method and target in ("relu", "relu_"))) and isinstance(args[0], fx.Node):
        return "relu", nn.ReLU(), [args[0]]
    if (target in _FLATTEN or (method and target == "flatten")) and _is_flatten_1(node):
        return "flatten", nn.Flatten(1), [args[0]]
    if target in _CAT:
        tensors = args[0] if args else node.kwargs.get("tensors")
        dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
        if isinstance(dim, int) and dim != 0 and all(isinstance(t, fx.Node) for t in tensors):
            return "cat", Concat(dim), list(tensors)
    if target is F.dropout and not (node.kwargs.get("training", args[2] if len(args) > 2 else True)):
        return "identity", nn.Identity(), [args[0]]
    if target is F.adaptive_avg_pool2d and isinstance(args[0], fx.Node):
        return "adaptive_avgpool", nn.AdaptiveAvgPool2d(args[1] if len(args) > 1 else node.kwargs["output_size"]), \
            [args[0]]
    return None


def _operation(node: fx.Node) -> str:
    """How an unsupported call reads in an error: 'operation mul', 'operation .view', 'operation add with these
    arguments' (a supported operation used otherwise, e.g. adding a constant or flattening from dim 0)."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    known = name.rstrip("_") in ("add", "iadd", "cat", "concat", "flatten", "relu", "dropout")
    return f"operation {'.' if node.op == 'call_method' else ''}{name}{' with these arguments' if known else ''}"


def capture(model: nn.Module) -> list[Layer]:
    """The model's operations in execution order (torch.fx symbolic tracing), each one checked as supported."""
    try:
        traced = _symbolic_trace(model)
    except Exception as error:  # data-dependent control flow, unsupported Python: one line, the tracer's reason
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise GraphError(f"cannot capture {type(model).__name__} with torch.fx ({first[:200]}): LRP needs a model "
                         f"whose forward is a fixed graph of {SUPPORTED}") from None
    modules = dict(traced.named_modules())
    layers: list[Layer] = []
    index_of: dict[fx.Node, int] = {}
    names: set[str] = set()
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise GraphError(f"{type(model).__name__}.forward takes {len(placeholders)} inputs: LRP needs one image tensor")
    index_of[placeholders[0]] = -1
    output = None
    for node in traced.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            output = node
            break
        if node.op == "call_module":
            module = modules[node.target]
            kind = _module_kind(node.target, module)
            name, inputs = node.target, [a for a in node.args if isinstance(a, fx.Node)]
            if len(inputs) != 1 or len(node.args) != 1 or node.kwargs:
                raise _fail(node, f"call of {node.target} with other than one tensor argument")
        elif node.op in ("call_function", "call_method"):
            found = _function_layer(node)
            if found is None:
                raise _fail(node, _operation(node))
            kind, module, inputs = found
            base = f"{_where(node)}.{kind}".lstrip(".")
            name, n = base, 0
            while name in names:
                n += 1
                name = f"{base}_{n}"
        else:  # get_attr: a stored tensor used in the forward
            raise _fail(node, f"use of the stored tensor {node.target}")
        names.add(name)
        unknown = [a for a in inputs if a not in index_of]
        if unknown:
            raise _fail(node, f"input {unknown[0].name}")
        index_of[node] = len(layers)
        layers.append(Layer(name, len(layers), kind, module, [index_of[a] for a in inputs]))
    result = output.args[0] if output is not None else None
    if not isinstance(result, fx.Node) or result not in index_of or index_of[result] < 0:
        raise GraphError(f"{type(model).__name__}.forward must return one tensor computed from its input")
    layers.append(Layer("output", len(layers), "output", nn.Identity(), [index_of[result]]))
    return layers


def _downsamples(layer: Layer) -> bool:
    stride = getattr(layer.module, "stride", 1)
    return layer.kind in ("conv", "maxpool", "avgpool") and max((stride,) if isinstance(stride, int) else stride) > 1


def canonize(layers: list[Layer]) -> tuple[list[Step], int]:
    """Group layers into steps (batch norm folded, ReLU fused); returns the steps and the output's step index."""
    source = {-1: -1}  # layer -> the layer whose value it is (identities and dropout pass their input on)
    for layer in layers:
        source[layer.index] = source[layer.inputs[0]] if layer.kind == "identity" else layer.index
    readers: dict[int, list[Layer]] = {}
    for layer in layers:
        if layer.kind != "identity":
            for i in layer.inputs:
                readers.setdefault(source[i], []).append(layer)
    step_of = {-1: -1}
    absorbed: set[int] = set()
    steps: list[Step] = []
    level = {-1: 0}  # downsampling layers before each step's output

    def only_reader(index: int, kind: str) -> Layer | None:
        found = readers.get(index, [])
        return found[0] if len(found) == 1 and found[0].kind == kind and found[0].index not in absorbed else None

    for layer in layers[:-1]:
        if layer.kind == "identity":
            step_of[layer.index] = step_of[source[layer.index]]
            continue
        if layer.index in absorbed:
            continue
        if layer.kind == "batchnorm":
            raise GraphError(f"batch norm {layer.name} does not directly follow a convolution or linear layer that "
                             "only it reads: it cannot be folded (LRP here folds batch norm into the layer before it)")
        inputs = [step_of[source[i]] for i in layer.inputs]
        step = Step(_STEP_KIND[layer.kind], layer, inputs)
        tail, bn = layer, None
        if layer.kind in ("conv", "linear"):
            module = layer.module
            step.weight = module.weight.detach()
            step.bias = None if module.bias is None else module.bias.detach()
            bn = only_reader(layer.index, "batchnorm")
            if bn is not None:
                try:
                    step.weight, step.bias = fold_batchnorm(module, bn.module)
                except ValueError as error:
                    raise GraphError(f"batch norm {bn.name}: {error}") from None
                absorbed.add(bn.index)
                step.batchnorm, tail = bn.name, bn
        if layer.kind in ("conv", "linear", "add"):
            relu = only_reader(tail.index, "relu")
            if relu is not None:
                step.relu = True
                absorbed.add(relu.index)
                tail = relu
        step.block = max(level[i] for i in inputs)
        level[len(steps)] = step.block + int(_downsamples(layer))
        for covered in {layer.index, tail.index} | ({bn.index} if bn is not None else set()):
            step_of[covered] = len(steps)
            step.covers.append(layers[covered].name)
        steps.append(step)
    first = next((s for s in steps if s.kind is StepKind.AFFINE), None)
    if first is None:
        raise GraphError("the model has no convolution or linear layer: nothing to explain")
    first.first_affine = True
    return steps, step_of[source[layers[-1].inputs[0]]]


_STEP_KIND = {"conv": StepKind.AFFINE, "linear": StepKind.AFFINE, "maxpool": StepKind.POOL, "avgpool": StepKind.POOL,
              "adaptive_avgpool": StepKind.POOL, "add": StepKind.ADD, "flatten": StepKind.FLATTEN,
              "relu": StepKind.RELU, "cat": StepKind.CAT}


# --------------------------------------------------------------------------------- shapes of the step graph
def _spatial_out(spec: Step, size: int, axis: int) -> int | None:
    """Output size along one spatial axis for an input of `size` (None once the tensor is flat)."""
    module = spec.layer.module
    if spec.kind is StepKind.FLATTEN or (spec.kind is StepKind.AFFINE and isinstance(module, nn.Linear)):
        return None
    if isinstance(module, nn.AdaptiveAvgPool2d):
        out = module.output_size if isinstance(module.output_size, tuple) else (module.output_size,) * 2
        return size if out[axis] is None else out[axis]
    if spec.kind in (StepKind.AFFINE, StepKind.POOL):
        def pick(v):
            return v if isinstance(v, int) else v[axis]
        kernel, stride = pick(module.kernel_size), pick(module.stride or module.kernel_size)
        padding, dilation = pick(getattr(module, "padding", 0)), pick(getattr(module, "dilation", 1))
        return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    return size


def _min_size_along(specs: Sequence[Step], axis: int, limit: int = 4096) -> int:
    """The smallest input size along one axis at which every layer's output is at least 1 wide."""
    for size in range(1, limit):
        sizes: dict[int, int | None] = {-1: size}
        ok = True
        for k, spec in enumerate(specs):
            known = [sizes[i] for i in spec.inputs if sizes[i] is not None]
            sizes[k] = None if not known else _spatial_out(spec, min(known), axis)
            if sizes[k] is not None and sizes[k] < 1:
                ok = False
                break
        if ok:
            return size
    return limit


def min_input_size(specs: Sequence[Step]) -> int:
    """The smallest height and width an input may have so that no layer's output is empty."""
    return max(_min_size_along(specs, 0), _min_size_along(specs, 1))


def num_classes(specs: Sequence[Step], output: int) -> int:
    """Classes = the output width: a linear layer's outputs, or a conv's channels after global pooling + flatten."""
    k, pooled = output, False
    while specs[k].kind in (StepKind.FLATTEN, StepKind.RELU, StepKind.POOL):
        module = specs[k].layer.module
        if isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1)):
            pooled = True
        k = specs[k].inputs[0]
        if k < 0:
            break
    if k >= 0 and specs[k].kind is StepKind.AFFINE and (isinstance(specs[k].layer.module, nn.Linear) or pooled):
        return specs[k].weight.shape[0]
    raise GraphError("the model's output must come from a Linear layer (or a convolution + global average pooling + "
                     f"flatten), not {specs[output].name} ({specs[output].kind})")
