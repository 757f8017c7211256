"""LRPModel: a torchvision VGG turned into a chain of (layer, rule) steps with an explicit relevance pass.

The forward keeps each step's input (and what its rule asked for); the relevance pass walks the steps back with
plain conv / conv-transpose / matmul / pooling-index code. No autograd, no hooks: `torch.jit.trace`,
`torch.export` and the ONNX exporter capture the whole thing (see `LRPModel.exportable`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import VGG

from .canonize import fold_batchnorm
from .composites import AnyRule, Composite, LayerInfo, get_composite
from .ops import make_op
from .rules import BoundPoolRule, BoundRule, LayerContext, PoolRule, Rule, WinnerTakesAll
from .topk import TopKFilter


class AffineStep(nn.Module):
    """conv2d / linear (batch norm folded in), optionally followed by ReLU, with its bound rule."""

    filtered = True

    def __init__(self, name: str, layer: nn.Conv2d | nn.Linear, weight: Tensor, bias: Tensor | None, relu: bool):
        super().__init__()
        self.name, self.relu, self.op = name, relu, make_op(layer)
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.rule: BoundRule | None = None

    def bind(self, rule: Rule, ctx: LayerContext) -> None:
        self.rule = rule.bind(self.op, self.weight, self.bias, ctx)

    def forward(self, a: Tensor) -> tuple[Tensor, Tensor | None]:
        o = self.op.forward_op(a, self.weight, self.bias)
        stash = self.rule.stash(o)
        if self.relu:
            o = F.relu(o) if stash is o else F.relu_(o)
        return o, stash

    def relevance(self, a: Tensor, out: Tensor, stash: Tensor | None, relevance: Tensor) -> Tensor:
        return self.rule.relevance(a, out, stash, relevance, self.weight)


class PoolStep(nn.Module):
    """Max pooling or adaptive average pooling with its bound pooling rule."""

    filtered = True

    def __init__(self, name: str, pool: nn.Module) -> None:
        super().__init__()
        self.name, self.pool = name, pool
        self.rule: BoundPoolRule | None = None
        self.with_indices = False

    def bind(self, rule: PoolRule, ctx: LayerContext | None = None) -> None:
        self.rule = rule.bind(self.pool)
        self.with_indices = rule.needs_indices

    def forward(self, a: Tensor) -> tuple[Tensor, Tensor | None]:
        if isinstance(self.pool, nn.MaxPool2d):
            if self.with_indices:
                return F.max_pool2d(a, self.pool.kernel_size, self.pool.stride, return_indices=True)
            return F.max_pool2d(a, self.pool.kernel_size, self.pool.stride), None
        return self.pool(a), None

    def relevance(self, a: Tensor, out: Tensor, stash: Tensor | None, relevance: Tensor) -> Tensor:
        return self.rule.relevance(a, out, stash, relevance)


class FlattenStep(nn.Module):
    """torch.flatten(x, 1) between features and classifier; relevance is reshaped back."""

    filtered = False
    name = "flatten"

    def forward(self, a: Tensor) -> tuple[Tensor, None]:
        return torch.flatten(a, 1), None

    def relevance(self, a: Tensor, out: Tensor, stash: Tensor | None, relevance: Tensor) -> Tensor:
        return relevance.reshape(a.shape)


def _vgg_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The VGG as the flat layer list composites index into: features..., avgpool, flatten, classifier..."""
    if not isinstance(model, VGG) and not all(hasattr(model, n) for n in ("features", "avgpool", "classifier")):
        raise TypeError(f"LRPModel needs a torchvision VGG (features/avgpool/classifier), got {type(model).__name__}")
    layers = [(f"features.{i}", m) for i, m in enumerate(model.features)]
    layers.append(("avgpool", model.avgpool))
    layers.append(("flatten", nn.Flatten(1)))
    layers += [(f"classifier.{i}", m) for i, m in enumerate(model.classifier)]
    return layers


def _parse_steps(model: nn.Module, composite: Composite) -> tuple[list[nn.Module], list[AnyRule | None]]:
    """Group the layer list into steps (conv+bn+relu fused) and pick each step's rule."""
    layers = _vgg_layers(model)
    steps: list[nn.Module] = []
    rules: list[AnyRule | None] = []
    block, seen_affine, i = 0, False, 0
    while i < len(layers):
        name, module = layers[i]
        info = LayerInfo(name, i, len(layers), module, False, block)
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            info = LayerInfo(name, i, len(layers), module, not seen_affine, block)
            seen_affine = True
            weight, bias = module.weight.detach(), None if module.bias is None else module.bias.detach()
            j = i + 1
            if j < len(layers) and isinstance(layers[j][1], (nn.BatchNorm2d, nn.BatchNorm1d)):
                weight, bias = fold_batchnorm(module, layers[j][1])
                j += 1
            relu = j < len(layers) and isinstance(layers[j][1], nn.ReLU)
            j += int(relu)
            steps.append(AffineStep(name, module, weight, bias, relu))
            rules.append(composite.rule_for(info))
            i = j
            continue
        if isinstance(module, (nn.MaxPool2d, nn.AdaptiveAvgPool2d)):
            steps.append(PoolStep(name, module))
            rules.append(composite.rule_for(info))
            block += int(isinstance(module, nn.MaxPool2d))
        elif isinstance(module, nn.Flatten):
            steps.append(FlattenStep())
            rules.append(None)
        elif isinstance(module, (nn.Dropout, nn.Identity)):
            pass  # identity in eval mode: relevance passes unchanged
        else:
            raise ValueError(f"unsupported layer {name} ({type(module).__name__}): LRP here covers VGG's "
                             "Conv2d, BatchNorm, ReLU, MaxPool2d, AdaptiveAvgPool2d, Linear and Dropout")
        i += 1
    for step, rule in zip(steps, rules):
        kind = PoolRule if isinstance(step, PoolStep) else Rule
        if rule is not None and not isinstance(rule, kind):
            raise ValueError(f"rule {rule!r} cannot be used on {step.name} ({type(step).__name__})")
    return steps, rules


def _bind_rules(steps: Sequence[nn.Module], rules: Sequence[AnyRule | None]) -> None:
    """Bind rules, passing each what is provable about its input sign and where its relevance can be."""
    nonnegative = []
    state = False  # the image may be negative
    for step in steps:
        nonnegative.append(state)
        if isinstance(step, AffineStep):
            state = step.relu
    # relevance arriving at a step is zero where its output is zero if the consumer above multiplies by it
    guaranteed = False
    contexts: list[LayerContext | None] = [None] * len(steps)
    for k in range(len(steps) - 1, -1, -1):
        step, rule = steps[k], rules[k]
        if isinstance(step, AffineStep):
            contexts[k] = LayerContext(nonnegative[k], step.relu, step.relu and guaranteed)
            guaranteed = rule.multiplies_input
        elif isinstance(step, PoolStep) and not isinstance(rule, WinnerTakesAll):
            guaranteed = rule.multiplies_input  # arg-max routing and flatten keep the property as it is
    for step, rule, ctx in zip(steps, rules, contexts):
        if rule is not None:
            step.bind(rule, ctx)


class LRPModel(nn.Module):
    """Layer-wise relevance propagation for a torchvision VGG (any depth, with or without batch norm).

    lrp = LRPModel(vgg, composite="epsilon_gamma_box", top_k=0.0)
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
    ) -> None:
        super().__init__()
        model = model.eval()
        self.composite = get_composite(composite, **(composite_params or {}))
        steps, rules = _parse_steps(model, self.composite)
        _bind_rules(steps, rules)
        self.steps = nn.ModuleList(steps)
        self.rules = rules
        self.top_k = TopKFilter(top_k, rescale_top_k)
        self.channels_last = channels_last
        first = next(s for s in steps if isinstance(s, AffineStep))
        self.in_channels = first.weight.shape[1]
        self.num_classes = steps[-1].weight.shape[0]
        self.min_size = 2 ** sum(isinstance(s, PoolStep) and isinstance(s.pool, nn.MaxPool2d) for s in steps)

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

    def exportable(self, channel_sum: bool = True) -> "ExportableLRP":
        """A module with forward(x, target) -> (logits, relevance) for tracing / exporting (no input checks)."""
        return ExportableLRP(self, channel_sum)

    def rule_table(self) -> list[tuple[str, str]]:
        """(layer name, rule) for each step: what the composite chose."""
        return [(s.name, repr(r)) for s, r in zip(self.steps, self.rules) if r is not None]

    # ------------------------------------------------------------------------------------------ core
    def propagate(self, x: Tensor, target: Tensor | None, traceable: bool = False) -> tuple[Tensor, Tensor]:
        """Forward pass keeping what the rules need, then the relevance pass. No validation.

        traceable: use only ops that tracers and exporters capture with dynamic batch (top-k via topk)."""
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        inputs: list[Tensor] = []
        stashes: list[Tensor | None] = []
        h = x
        for step in self.steps:
            inputs.append(h)
            h, stash = step(h)
            stashes.append(stash)
        logits = h
        relevance = self.start_relevance(logits, target)
        out = logits
        # the one-hot start vector is never filtered (its zeros would beat a negative logit: an all-zero map);
        # seed's softmax start is, as the blog does
        start_filtered = self.composite.start == "softmax"
        for k in range(len(self.steps) - 1, -1, -1):
            step, a = self.steps[k], inputs.pop()
            if self.top_k.active and step.filtered and (k < len(self.steps) - 1 or start_filtered):
                relevance = self.top_k(relevance, traceable)
            relevance = step.relevance(a, out, stashes.pop(), relevance)
            out = a
        return logits, relevance

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
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"input must be (N, {self.in_channels}, H, W), got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("input batch is empty")
        if min(x.shape[-2:]) < self.min_size:
            raise ValueError(f"input {tuple(x.shape[-2:])} is too small: this VGG needs H, W >= {self.min_size}")
        weight = self.steps[0].weight
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
