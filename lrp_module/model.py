"""LRPModel: a model's graph (lrp_module/graph.py) walked forward, keeping what each rule needs, then backward in
reverse topological order with explicit conv / conv-transpose / matmul / pooling-index code, relevance summed where
a value fans out. One engine for every VGG, every torchvision ResNet / ResNeXt / Wide ResNet and user models built
from the same parts.

No autograd, no hooks: `torch.jit.trace`, `torch.export` and the ONNX exporter capture the whole thing (see
`LRPModel.exportable`). The engine, which sees the graph, proves where a rule's fast path is exact
(lrp_module/contexts.py: the input is non-negative; relevance arrives only where the ReLU after the layer fired)
and each rule binds the first of its paths that the proof allows.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .composites import AnyRule, Composite, LayerInfo, get_composite
from .contexts import LayerContext, prove
from .graph import GraphError, Step, StepKind, canonize, capture, min_input_size, num_classes
from .ops import PoolGeometry, make_op
from .rules import NOTHING, BoundPoolRule, BoundRule, PoolRule, Rule, Stash
from .topk import TopKFilter


class AffineStep(nn.Module):
    """conv2d / linear (batch norm folded in), optionally followed by ReLU, with its bound rule."""

    filtered = True

    def __init__(self, name: str, layer: nn.Conv2d | nn.Linear, weight: Tensor, bias: Tensor | None, relu: bool,
                 share: bool = False):
        """share: hold `weight` and `bias` themselves, not copies (LRPModel(share_weights=True))."""
        super().__init__()
        self.name, self.relu = name, relu
        try:
            self.op = make_op(layer)
        except ValueError as error:
            raise GraphError(f"layer {name}: {error}") from None
        held = (lambda t: t.detach()) if share else (lambda t: t.detach().clone())
        self.register_buffer("weight", held(weight))
        self.register_buffer("bias", None if bias is None else held(bias))
        self.rule: BoundRule | None = None

    def bind(self, rule: Rule, ctx: LayerContext) -> None:
        self.rule = rule.bind(self.op, self.weight, self.bias, ctx)

    def forward(self, inputs: list[Tensor]) -> tuple[Tensor, Stash]:
        o = self.op.forward_op(inputs[0], self.weight, self.bias)
        stash = self.rule.stash(o)
        if self.relu:
            o = F.relu_(o) if stash.preactivation is None else F.relu(o)
        return o, stash

    def relevance(self, inputs: list[Tensor], out: Tensor, stash: Stash, relevance: Tensor) -> list[Tensor]:
        return [self.rule.relevance(inputs[0], out, stash, relevance, self.weight)]


class PoolStep(nn.Module):
    """Max, average or adaptive average pooling with its bound pooling rule."""

    filtered = True

    def __init__(self, name: str, pool: nn.Module) -> None:
        super().__init__()
        self.name, self.pool = name, pool
        self.rule: BoundPoolRule | None = None
        self.with_indices = False
        if isinstance(pool, (nn.MaxPool2d, nn.AvgPool2d)):
            try:
                self.geometry = PoolGeometry.of(pool)
            except ValueError as error:
                raise GraphError(f"layer {name}: {error}") from None

    def bind(self, rule: PoolRule, ctx: LayerContext | None = None) -> None:
        try:
            self.rule = rule.bind(self.pool)
        except ValueError as error:
            raise GraphError(f"layer {self.name}: {error}") from None
        self.with_indices = rule.needs_indices

    def forward(self, inputs: list[Tensor]) -> tuple[Tensor, Stash]:
        a = inputs[0]
        if isinstance(self.pool, nn.MaxPool2d):
            g = self.geometry
            if self.with_indices:
                out, indices = F.max_pool2d(a, g.kernel, g.stride, g.padding, g.dilation, return_indices=True)
                return out, Stash(indices=indices)
            return F.max_pool2d(a, g.kernel, g.stride, g.padding, g.dilation), NOTHING
        return self.pool(a), NOTHING

    def relevance(self, inputs: list[Tensor], out: Tensor, stash: Stash, relevance: Tensor) -> list[Tensor]:
        return [self.rule.relevance(inputs[0], out, stash, relevance)]


class SumStep(nn.Module):
    """An addition (residual connection), optionally followed by ReLU, with its rule (zennit: Norm on `Sum`)."""

    filtered = False

    def __init__(self, name: str, module: nn.Module, relu: bool) -> None:
        super().__init__()
        self.name, self.module, self.relu = name, module, relu
        self.rule: BoundPoolRule | None = None

    def bind(self, rule: PoolRule, ctx: LayerContext) -> None:
        try:
            self.rule = rule.bind(self.module, ctx)
        except ValueError as error:
            raise GraphError(f"layer {self.name}: {error}") from None

    def forward(self, inputs: list[Tensor]) -> tuple[Tensor, Stash]:
        o = inputs[0] + inputs[1]
        for extra in inputs[2:]:
            o = o + extra
        stash = self.rule.stash(o)
        if self.relu:
            o = F.relu_(o) if stash.preactivation is None else F.relu(o)
        return o, stash

    def relevance(self, inputs: list[Tensor], out: Tensor, stash: Stash, relevance: Tensor) -> list[Tensor]:
        return self.rule.relevance_sum(inputs, out, stash, relevance)


class FlattenStep(nn.Module):
    """torch.flatten(x, 1) between features and classifier; relevance is reshaped back."""

    filtered = False

    def __init__(self, name: str = "flatten") -> None:
        super().__init__()
        self.name = name

    def forward(self, inputs: list[Tensor]) -> tuple[Tensor, Stash]:
        return torch.flatten(inputs[0], 1), NOTHING

    def relevance(self, inputs: list[Tensor], out: Tensor, stash: Stash, relevance: Tensor) -> list[Tensor]:
        return [relevance.reshape(inputs[0].shape)]


class ReLUStep(nn.Module):
    """A ReLU that could not be fused (its input is read elsewhere too): relevance passes unchanged (zennit: Pass)."""

    filtered = False

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, inputs: list[Tensor]) -> tuple[Tensor, Stash]:
        return F.relu(inputs[0]), NOTHING

    def relevance(self, inputs: list[Tensor], out: Tensor, stash: Stash, relevance: Tensor) -> list[Tensor]:
        return [relevance]


class CatStep(nn.Module):
    """Concatenation: relevance is split back along the same dimension (the gradient; zennit has no rule here)."""

    filtered = False

    def __init__(self, name: str, dim: int) -> None:
        super().__init__()
        self.name, self.dim = name, dim

    def forward(self, inputs: list[Tensor]) -> tuple[Tensor, Stash]:
        return torch.cat(inputs, dim=self.dim), NOTHING

    def relevance(self, inputs: list[Tensor], out: Tensor, stash: Stash, relevance: Tensor) -> list[Tensor]:
        return list(relevance.split([t.shape[self.dim] for t in inputs], dim=self.dim))


_STEP_MODULES = {
    StepKind.AFFINE: lambda spec, share: AffineStep(spec.name, spec.layer.module, spec.weight, spec.bias, spec.relu,
                                                    share),
    StepKind.POOL: lambda spec, _: PoolStep(spec.name, spec.layer.module),
    StepKind.ADD: lambda spec, _: SumStep(spec.name, spec.layer.module, spec.relu),
    StepKind.FLATTEN: lambda spec, _: FlattenStep(spec.name),
    StepKind.RELU: lambda spec, _: ReLUStep(spec.name),
    StepKind.CAT: lambda spec, _: CatStep(spec.name, spec.layer.module.dim),
}
# the steps that take a rule, the kind of rule, and the step module's name for messages
_RULED = {StepKind.AFFINE: (Rule, "AffineStep"), StepKind.POOL: (PoolRule, "PoolStep"),
          StepKind.ADD: (PoolRule, "SumStep")}


def _choose_rules(specs: Sequence[Step], composite: Composite, count: int) -> list[AnyRule | None]:
    """The composite's rule for every affine, pooling and sum step (by name, position, first layer, type)."""
    rules: list[AnyRule | None] = []
    for spec in specs:
        if spec.kind not in _RULED:
            rules.append(None)
            continue
        layer = spec.layer
        rule = composite.rule_for(LayerInfo(layer.name, layer.index, count, layer.module, spec.first_affine,
                                            spec.block))
        kind, step = _RULED[spec.kind]
        if not isinstance(rule, kind):
            raise ValueError(f"rule {rule!r} cannot be used on {spec.name} ({step})")
        rules.append(rule)
    return rules


class LRPModel(nn.Module):
    """Layer-wise relevance propagation for a torchvision VGG, ResNet, ResNeXt, Wide ResNet or a user model built
    from Conv2d, BatchNorm2d, ReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Linear, Flatten, Dropout, + and cat.

    lrp = LRPModel(model, composite="epsilon_gamma_box", top_k=0.0)
    relevance = lrp(x)                          # (N, H, W) for the predicted class
    logits, relevance = lrp.explain(x, target)  # (N, classes), (N, C, H, W)
    """

    def __init__(
        self,
        model: nn.Module,
        composite: str | Composite = "epsilon_gamma_box",
        top_k: float = 0.0,
        rescale_top_k: bool = False,
        channels_last: bool = False,
        composite_params: dict[str, Any] | None = None,
        share_weights: bool = False,
    ) -> None:
        """share_weights: the steps hold `model`'s weight tensors (where no batch norm is folded in) instead of
        copies, for a caller that owns `model` and drops it (the float64 oracle: one copy of a VGG16's 1.1 GB of
        float64 weights, not two). By default the LRPModel is a snapshot that later changes to `model` do not touch."""
        super().__init__()
        model = model.eval()
        self.composite = get_composite(composite, **(composite_params or {}))
        layers = capture(model)
        specs, self.output = canonize(layers)
        steps = [_STEP_MODULES[spec.kind](spec, share_weights) for spec in specs]
        rules = _choose_rules(specs, self.composite, len(layers) - 1)
        for step, rule, ctx in zip(steps, rules, prove(specs, rules, self.output)):
            if rule is not None:
                step.bind(rule, ctx)
        self.steps = nn.ModuleList(steps)
        self.wiring: list[list[int]] = [list(spec.inputs) for spec in specs]  # input step indices, -1 = image
        self.rules = rules
        self.top_k = TopKFilter(top_k, rescale_top_k)
        self.channels_last = channels_last
        first = next(spec for spec in specs if spec.first_affine)
        self._first = specs.index(first)
        module = first.layer.module
        self.in_channels = module.in_channels if isinstance(module, nn.Conv2d) else None
        self.num_classes = num_classes(specs, self.output)
        self.min_size = min_input_size(specs)

    # ------------------------------------------------------------------------------------ public API
    def forward(self, x: Tensor, target: Tensor | Sequence[int] | int | None = None) -> Tensor:
        """Channel-summed relevance (N, H, W) for `target` (default: the predicted class)."""
        return self.explain(x, target)[1].sum(dim=1)

    def explain(self, x: Tensor, target: Tensor | Sequence[int] | int | None = None) -> tuple[Tensor, Tensor]:
        """Logits (N, classes) and input relevance (N, C, H, W). target entries of -1 mean the prediction."""
        x, target = self._validate(x, target)
        with torch.inference_mode():
            logits, relevance = self.propagate(x, target)
        return logits, relevance.contiguous()

    def exportable(self, channel_sum: bool = True) -> ExportableLRP:
        """A module with forward(x, target) -> (logits, relevance) for tracing / exporting (no input checks)."""
        return ExportableLRP(self, channel_sum)

    def rule_table(self) -> list[tuple[str, str]]:
        """(layer name, rule) for each step: what the composite chose."""
        return [(s.name, repr(r)) for s, r in zip(self.steps, self.rules) if r is not None]

    # ------------------------------------------------------------------------------------------ core
    def propagate(self, x: Tensor, target: Tensor | None, traceable: bool = False) -> tuple[Tensor, Tensor]:
        """Forward pass keeping what the rules need, then the relevance pass in reverse topological order, summing
        where a value fans out. No validation.

        traceable: use only ops that tracers and exporters capture with dynamic batch (top-k via topk)."""
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        values: list[Tensor | None] = []
        stashes: list[Stash | None] = []
        for step, wiring in zip(self.steps, self.wiring):
            out, stash = step([x if i < 0 else values[i] for i in wiring])
            values.append(out)
            stashes.append(stash)
        logits = values[self.output]
        incoming: list[Tensor | None] = [None] * len(self.steps)
        incoming[self.output] = self.start_relevance(logits, target)
        at_input: Tensor | None = None
        start_filtered = self.composite.start == "softmax"
        for k in range(len(self.steps) - 1, -1, -1):
            relevance, incoming[k] = incoming[k], None
            if relevance is None:  # a value the output does not depend on
                continue
            step, wiring = self.steps[k], self.wiring[k]
            # the one-hot start vector is never filtered (its zeros would beat a negative logit: an all-zero map);
            # seed's softmax start is, as the blog does
            if self.top_k.active and step.filtered and (k != self.output or start_filtered):
                relevance = self.top_k(relevance, traceable)
            parts = step.relevance([x if i < 0 else values[i] for i in wiring], values[k], stashes[k], relevance)
            values[k] = stashes[k] = None  # every reader of this value is done: free it
            for i, part in zip(wiring, parts):
                if i < 0:
                    at_input = part if at_input is None else at_input + part
                else:
                    incoming[i] = part if incoming[i] is None else incoming[i] + part
        return logits, at_input if at_input is not None else torch.zeros_like(x)

    def start_relevance(self, logits: Tensor, target: Tensor | None) -> Tensor:
        """one-hot(target) * logits (target -1 or None: the predicted class), or softmax for `seed`."""
        if self.composite.start == "softmax":
            return torch.softmax(logits, dim=1)
        predicted = logits.argmax(dim=1)
        index = predicted if target is None else torch.where(target < 0, predicted, target)
        index = index.unsqueeze(1)
        return torch.zeros_like(logits).scatter_(1, index, logits.gather(1, index))

    def _validate(self, x: Tensor, target) -> tuple[Tensor, Tensor | None]:
        if not isinstance(x, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4 or (self.in_channels is not None and x.shape[1] != self.in_channels):
            raise ValueError(f"input must be (N, {self.in_channels or 'C'}, H, W), got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("input batch is empty")
        if min(x.shape[-2:]) < self.min_size:
            raise ValueError(f"input {tuple(x.shape[-2:])} is too small: this network needs H, W >= {self.min_size}")
        weight = self.steps[self._first].weight
        if not x.is_floating_point() or x.dtype != weight.dtype:
            raise ValueError(f"input dtype must be {weight.dtype}, got {x.dtype}")
        if x.device != weight.device:
            raise ValueError(f"input is on {x.device}, the model on {weight.device}")
        if target is None:
            return x, None
        target = torch.as_tensor(target, device=x.device)
        if target.ndim == 0:
            target = target.expand(x.shape[0])
        if target.dtype.is_floating_point or target.dtype == torch.bool or target.shape != (x.shape[0],):
            raise ValueError(f"target must be integer class indices of shape ({x.shape[0]},), got "
                             f"{target.dtype} {tuple(target.shape)}")
        if bool(((target < -1) | (target >= self.num_classes)).any()):
            raise ValueError(f"target classes must be in [0, {self.num_classes}) or -1, got {target.tolist()}")
        return x, target.long()


class ExportableLRP(nn.Module):
    """forward(x, target) -> (logits, relevance) with target (N,) int64, -1 = predicted class."""

    def __init__(self, lrp: LRPModel, channel_sum: bool = True) -> None:
        super().__init__()
        self.lrp = lrp
        self.channel_sum = channel_sum

    def forward(self, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        logits, relevance = self.lrp.propagate(x, target, traceable=True)
        return logits, relevance.sum(dim=1) if self.channel_sum else relevance
