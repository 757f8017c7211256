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

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .canonize import fold_batchnorm
from .composites import AnyRule, Composite, LayerInfo, get_composite
from .concepts import (
    ConceptError,
    ConceptLayer,
    ConceptPlan,
    apply_mask,
    channel_relevance,
    check_k,
    concept_layers,
    condition_masks_named,
    normalise,
    resolve,
    top_k_masks,
    with_full_row,
)
from .contexts import LayerContext, prove
from .graph import (
    ChannelProjection,
    GraphError,
    Step,
    StepKind,
    canonize,
    capture,
    min_input_size,
    num_classes,
    projection_gate,
)
from .ops import PoolGeometry, make_op, repeated_images
from .rules import NOTHING, BoundPoolRule, BoundRule, Epsilon, PoolRule, Rule, Stash
from .rules.base import divide
from .stabilize import rms_per_sample, stabilize
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
        self.hold(weight, bias, share)
        self.rule: BoundRule | None = None

    def hold(self, weight: Tensor, bias: Tensor | None, share: bool) -> None:
        """Hold `weight` and `bias` (themselves when `share`, else copies); a bound rule must be bound again."""
        held = (lambda t: t.detach()) if share else (lambda t: t.detach().clone())
        self.register_buffer("weight", held(weight))
        self.register_buffer("bias", None if bias is None else held(bias))

    def bind(self, rule: Rule, ctx: LayerContext) -> None:
        self.rule = rule.bind(self.op, self.weight, self.bias, ctx)

    def forward(self, inputs: list[Tensor]) -> tuple[Tensor, Stash]:
        o = self.op.forward_op(inputs[0], self.weight, self.bias)
        stash = self.rule.stash(o)
        if self.relu:
            o = F.relu_(o) if stash.preactivation is None else F.relu(o)
        return o, stash

    def relevance(self, inputs: list[Tensor], out: Tensor, stash: Stash, relevance: Tensor,
                  repeats: int = 1) -> list[Tensor]:
        """repeats: the batch is each image repeated this many times (concept maps): z is computed once per image."""
        if repeats == 1:  # every plain pass: no context to enter
            return [self.rule.relevance(inputs[0], out, stash, relevance, self.weight)]
        with repeated_images(self.op, relevance.shape[0], repeats):
            return [self.rule.relevance(inputs[0], out, stash, relevance, self.weight)]


class GatedProjectionStep(AffineStep):
    """A gated `ChannelProjection` (R-ClArC): the projection for the images its gate selects, the identity for the
    others. The gate is fixed in the relevance pass, as a ReLU's is: a projected image gets LRP-epsilon on the
    projection's 1x1 convolution W, R_in = h * W^T s with s = R / stab(z), z = the step's output; the others'
    relevance passes unchanged, so their maps are the original model's (epsilon on an identity would absorb a
    little where h is small)."""

    def __init__(self, name: str, layer: ChannelProjection, weight: Tensor, bias: Tensor | None, relu: bool,
                 share: bool = False):
        if relu:
            raise GraphError(f"layer {name}: a gated projection cannot have a ReLU fused after it")
        super().__init__(name, layer, weight, bias, relu, share)
        self.register_buffer("direction", layer.direction.detach().clone())
        self.register_buffer("threshold", layer.threshold.detach().clone())
        self.epsilon: Epsilon | None = None

    def bind(self, rule: Rule, ctx: LayerContext) -> None:
        """Keep the epsilon rule's settings: `relevance` applies its formula itself (no bound path is used)."""
        if not isinstance(rule, Epsilon):
            raise GraphError(f"layer {self.name}: a gated projection takes LRP-epsilon only, not {rule!r}")
        self.epsilon = rule

    def forward(self, inputs: list[Tensor]) -> tuple[Tensor, Stash]:
        h = inputs[0]
        projected = self.op.forward_op(h, self.weight, self.bias)
        return torch.where(projection_gate(h, self.direction, self.threshold) > 0, projected, h), NOTHING

    def relevance(self, inputs: list[Tensor], out: Tensor, stash: Stash, relevance: Tensor,
                  repeats: int = 1) -> list[Tensor]:
        """Broadcasts where `inputs` and `out` are one image's row and `relevance` its K concept rows."""
        h, rule = inputs[0], self.epsilon
        g = projection_gate(h, self.direction, self.threshold)
        z = out - self.bias[:, None, None] if rule.zero_bias and self.bias is not None else out
        eps = rule.epsilon + rule.rms_scale * rms_per_sample(z) if rule.rms_scale else rule.epsilon
        s = divide(relevance, stabilize(z, eps), eps)
        transposed = torch.einsum("dc,ndhw->nchw", self.weight[:, :, 0, 0], s)  # W^T s of the 1x1 convolution
        return [torch.where(g > 0, h * transposed, relevance)]


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


def _around(relevance: Tensor | None, plan: ConceptPlan, step: int, k_maps: int, expanded: bool,
            image: int | None = None) -> Tensor | None:
    """Relevance that reached a lower layer around the conditioned `step`, when the conditions are applied there:
    dropped in the conditions that name the step with exclude_parallel (kept in the full map's row where the plan
    has one), else the same for every condition (`ConceptPlan.around`). image: a walk over that image alone."""
    if relevance is None or plan.drops_around(step):
        return None
    if not expanded:
        relevance = relevance.repeat_interleave(k_maps, 0)
    keep = plan.around(step, k_maps, relevance, image)
    return relevance if keep is None else relevance * keep


@dataclass(frozen=True)
class Forward:
    """A forward pass over one batch (`LRPModel.record`): the input as the steps read it and every step's value and
    stash, all the relevance pass reads. `LRPModel.explain_from` runs the relevance pass from it, recomputing the
    steps from a given one up (those whose weights changed since)."""

    x: Tensor
    values: tuple[Tensor, ...]
    stashes: tuple[Stash, ...]


TOP_K_CHANNELS = -1  # the key under which `propagate_concepts` records the (N, K) channels a top-K plan chose


def _rows(t: Tensor, rows: int) -> Tensor:
    """One image's stored tensor (one row) as `rows` rows: a view, nothing copied."""
    return t.expand(rows, *t.shape[1:])


def _row(t: Tensor | None, i: int, layout: torch.memory_format | None = None) -> Tensor | None:
    """Row i of a batch tensor (a view), or a copy in `layout` where it is 4-d."""
    if t is None:
        return None
    return t[i:i + 1] if layout is None or t.ndim != 4 else t[i:i + 1].contiguous(memory_format=layout)


@dataclass
class _Walk:
    """The relevance pass's state: the forward's values and stashes (None once read), the relevance arriving at
    each step and at the input, what was recorded; expanded: the batch is N x K rows (a mask was applied); image:
    a walk over one image of the batch (its index), whose stored tensors are one row each."""

    values: list[Tensor | None]
    stashes: list[Stash | None]
    incoming: list[Tensor | None]
    x: Tensor
    at_input: Tensor | None = None
    recorded: dict[int, Tensor] = field(default_factory=dict)
    expanded: bool = False
    image: int | None = None

    def one_image(self, i: int, layout: torch.memory_format | None = None) -> _Walk:
        """Image i's part of this walk (one row each: views, or 4-d copies in `layout`), to go on from where this
        one stopped."""
        return _Walk([_row(v, i, layout) for v in self.values],
                     [None if s is None else s.map(lambda t: _row(t, i, layout)) for s in self.stashes],
                     [_row(r, i, layout) for r in self.incoming], _row(self.x, i, layout),
                     _row(self.at_input, i, layout), image=i)

    def input_relevance(self, k_maps: int) -> Tensor:
        """The relevance that reached the input (zeros where none did), K rows per image once expanded."""
        if self.at_input is not None:
            return self.at_input
        rows = self.x.shape[0] * (k_maps if self.expanded else 1)
        return self.x.new_zeros((rows, *self.x.shape[1:]))


_STEP_MODULES = {
    StepKind.AFFINE: lambda spec, share: (
        GatedProjectionStep if isinstance(spec.layer.module, ChannelProjection) and spec.layer.module.gated
        else AffineStep)(spec.name, spec.layer.module, spec.weight, spec.bias, spec.relu, share),
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
        self.share_weights = share_weights
        self.composite = get_composite(composite, **(composite_params or {}))
        layers = capture(model)
        specs, self.output = canonize(layers)
        steps = [_STEP_MODULES[spec.kind](spec, share_weights) for spec in specs]
        rules = _choose_rules(specs, self.composite, len(layers) - 1)
        contexts = prove(specs, rules, self.output)
        for step, rule, ctx in zip(steps, rules, contexts):
            if rule is not None:
                step.bind(rule, ctx)
        self.steps = nn.ModuleList(steps)
        self.wiring: list[list[int]] = [list(spec.inputs) for spec in specs]  # input step indices, -1 = image
        self.rules = rules
        # what `refresh` needs to redo an affine step's build: its context, its module and folded batch norm's names
        self._contexts: list[LayerContext] = contexts
        self._weight_sources: dict[int, tuple[str, str | None]] = {
            k: (spec.layer.name, spec.batchnorm) for k, spec in enumerate(specs) if spec.kind is StepKind.AFFINE}
        self.top_k = TopKFilter(top_k, rescale_top_k)
        self.channels_last = channels_last
        first = next(spec for spec in specs if spec.first_affine)
        self._first = specs.index(first)
        module = first.layer.module
        self.in_channels = module.in_channels if isinstance(module, nn.Conv2d) else None
        self.num_classes = num_classes(specs, self.output)
        self.min_size = min_input_size(specs)
        # every layer name a concept call accepts (module names: `features.28`, `layer4.2.conv3`, `layer4`)
        self.concept_layers: dict[str, ConceptLayer] = concept_layers(specs, model)

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

    # ------------------------------------------------------------------------------- changed weights
    def refresh(self, model: nn.Module, names: Iterable[str]) -> list[int]:
        """Read again the weights of `model`'s modules `names`, changed in place since this LRPModel was built (e.g.
        re-initialised: the model parameter randomisation test), and redo what the build derived from them: the batch
        norm folded into the layer before it, the rule's precomputed weights (gamma's W + gamma W+, the transposes,
        ...). Afterwards this LRPModel equals `LRPModel(model, <the same settings>)` bit for bit, at the cost of the
        changed layers alone: nothing else the build computes depends on weights (the graph, the rules chosen, the
        facts of lrp_module/contexts.py come from the architecture). `model` is the model it was built from or one of
        the same architecture (the steps' weight shapes, dtype and device must not change). A module no step reads
        changes nothing. Returns the indices of the steps refreshed."""
        names = set(names)
        modules = dict(model.named_modules())
        unknown = sorted(names - modules.keys())
        if unknown:
            raise ValueError(f"refresh: {type(model).__name__} has no module {unknown[0]!r}")
        refreshed = []
        for k, (layer, batchnorm) in self._weight_sources.items():
            if layer not in names and batchnorm not in names:
                continue
            step, module = self.steps[k], modules[layer]
            weight, bias = module.weight.detach(), None if module.bias is None else module.bias.detach()
            if batchnorm is not None:
                weight, bias = fold_batchnorm(module, modules[batchnorm])
            if (weight.shape, weight.dtype, weight.device, bias is None) != \
                    (step.weight.shape, step.weight.dtype, step.weight.device, step.bias is None):
                raise ValueError(f"refresh: {layer} is not the layer this LRPModel was built with (weight "
                                 f"{tuple(weight.shape)} {weight.dtype} on {weight.device}, bias {bias is not None}; "
                                 f"built: {tuple(step.weight.shape)} {step.weight.dtype} on {step.weight.device}, "
                                 f"bias {step.bias is not None})")
            step.hold(weight, bias, self.share_weights)
            step.bind(self.rules[k], self._contexts[k])
            refreshed.append(k)
        return refreshed

    def first_step_reading(self, names: Iterable[str]) -> int:
        """The first step (in the forward's order) whose weights come from one of the modules `names`, or the number
        of steps if none does. The steps before it read neither those weights nor anything computed from them (the
        steps are in topological order), so their values and stashes outlive a change of those modules: `explain_from`
        can take them from a pass made before the change."""
        names = set(names)
        return min((k for k, sources in self._weight_sources.items() if names.intersection(sources)),
                   default=len(self.steps))

    def record(self, x: Tensor) -> Forward:
        """The forward pass alone over `x` (checked as `explain` checks it): what `explain_from` starts from."""
        x, _ = self._validate(x, None)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            values, stashes = self._forward(x)
        return Forward(x, tuple(values), tuple(stashes))

    def explain_from(self, forward: Forward, target: Tensor | Sequence[int] | int | None = None,
                     start: int | None = None) -> tuple[Tensor, Tensor]:
        """`explain(forward.x, target)`, the steps before `start` (default: all of them) not computed but taken from
        `forward`: a pass of this LRPModel, or of one whose steps before `start` held the same weights (this one
        before `refresh` changed steps from `start` on: `first_step_reading`). Equal to `explain` bit for bit; the
        forward's share of the pass costs nothing below `start`. `forward` is not changed (it may be reused)."""
        start = len(self.steps) if start is None else start
        if not 0 <= start <= len(self.steps) or len(forward.values) != len(self.steps):
            raise ValueError(f"explain_from: start must be in [0, {len(self.steps)}] and the forward one of this "
                             f"model's {len(self.steps)} steps, got start {start} and {len(forward.values)} values")
        x, target = self._validate(forward.x, target)
        with torch.inference_mode():
            logits, relevance, _ = self.propagate_concepts(x, target, None, reuse=(forward, start))
        return logits, relevance.contiguous()

    # ------------------------------------------------------------------------------------ concepts (CRP)
    def concept_relevance(self, x: Tensor, target: Tensor | Sequence[int] | int | None = None,
                          layers: Sequence[str] = (), normalised: bool = False) -> dict[str, Tensor]:
        """{layer: (N, C)} the relevance at each channel of each layer's output, summed over space, in the pass that
        computes the map (`explain_concepts` returns both). normalised: each row divided by its sum of |R| (CRP's
        `abs_norm`)."""
        return self.explain_concepts(x, target, layers, normalised=normalised)[2]

    def explain_concepts(self, x: Tensor, target: Tensor | Sequence[int] | int | None = None,
                         layers: Sequence[str] = (), normalised: bool = False
                         ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Logits (N, classes), input relevance (N, C, H, W) and {layer: (N, C)} concept relevance, in one pass."""
        x, target = self._validate(x, target)
        chosen = self._layers(layers)
        plan = ConceptPlan(record=tuple(dict.fromkeys(layer.step for layer in chosen)))
        with torch.inference_mode():
            logits, relevance, recorded = self.propagate_concepts(x, target, plan)
        found = {}
        for layer in chosen:
            rel = channel_relevance(recorded[layer.step]) if layer.step in recorded else \
                torch.zeros(x.shape[0], layer.channels, dtype=x.dtype, device=x.device)
            found[layer.name] = normalise(rel) if normalised else rel
        return logits, relevance.contiguous(), found

    def concept_maps(self, x: Tensor, target: Tensor | Sequence[int] | int | None = None,
                     conditions: Sequence[Mapping[str, Sequence[int]]] | Sequence[Sequence[Mapping]] = (),
                     exclude_parallel: bool = True, channel_sum: bool = True, batch_size: int = 64) -> Tensor:
        """One input heat map per condition: (N, K, H, W) ((N, K, C, H, W) with channel_sum=False).

        conditions: K dicts {layer: [channels]} for every image, or N lists of K dicts (one per image). A condition
        keeps only the listed channels' relevance at each layer it names (several layers: CRP's nested conditions;
        an empty list keeps none). The forward pass and the backward pass down to the topmost conditioned layer
        run once per group of conditions; below it a group's maps run as one batch of at most `batch_size` (N x
        the group's conditions). exclude_parallel: see lrp_module/concepts.py."""
        x, target = self._validate(x, target)
        masks, named = condition_masks_named(conditions, x.shape[0], self.concept_layers, x.dtype, x.device)
        k = next(iter(masks.values())).shape[1]
        group = max(1, batch_size // x.shape[0])
        parts = []
        with torch.inference_mode():
            for start in range(0, k, group):
                plan = ConceptPlan(masks={step: mask[:, start:start + group] for step, mask in masks.items()},
                                   exclude_parallel=exclude_parallel,
                                   named={step: each[:, start:start + group] for step, each in named.items()})
                parts.append(self.propagate_concepts(x, target, plan)[1])
        relevance = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return relevance.sum(dim=2) if channel_sum else relevance.contiguous()

    def top_concept_maps(self, x: Tensor, target: Tensor | Sequence[int] | int | None = None, layer: str = "",
                         k: int = 8, exclude_parallel: bool = True) -> TopConcepts:
        """The map and each image's k most relevant channels of `layer` with their conditional maps, in one pass
        (the map is the first of k + 1 conditions, one that keeps everything). See `TopConcepts`."""
        x, target = self._validate(x, target)
        check_k(k, self._layers([layer])[0])  # k = 0 would be ExportableConcepts' "no maps"
        with torch.inference_mode():
            return ExportableConcepts(self, [layer], layer, k, exclude_parallel, channel_sum=False,
                                      per_image=True)(x, target)

    def _layers(self, names: Sequence[str]) -> list[ConceptLayer]:
        if isinstance(names, str) or not names:
            raise ConceptError(f"layers must be a non-empty list of layer names, got {names!r}")
        return [resolve(name, self.concept_layers) for name in names]

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
        logits, relevance, _ = self.propagate_concepts(x, target, None, traceable)
        return logits, relevance

    def propagate_concepts(self, x: Tensor, target: Tensor | None, plan: ConceptPlan | None,
                           traceable: bool = False, per_image: bool | None = None,
                           reuse: tuple[Forward, int] | None = None) -> tuple[Tensor, Tensor, dict[int, Tensor]]:
        """`propagate` that also does what `plan` asks (lrp_module/concepts.py): the relevance at its recorded
        steps' outputs ({step: tensor}), and its masks. Once the first mask is applied the batch is N x K (image
        major) from there down. Returns the input relevance (N, C, H, W), or (N, K, C, H, W) when the plan masks.

        per_image (default: not traceable): below the first masked step the K rows run one image at a time, each
        rule reading the image's stored input, output and stash as one row that broadcasts against the K rows
        (nothing is repeated, and the memory is one image's K rows). Otherwise (tracers: no loop over the batch)
        the whole N x K batch runs at once, each step expanding its stored tensors to match.

        reuse (forward, start): the values and stashes of the steps before `start` taken from `forward`, a pass over
        `x` (`explain_from`)."""
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        values, stashes = self._forward(x, reuse)
        logits = values[self.output]
        incoming: list[Tensor | None] = [None] * len(self.steps)
        incoming[self.output] = self.start_relevance(logits, target)
        walk = _Walk(values, stashes, incoming, x)
        k_maps = 1 if plan is None else plan.conditions
        split = plan is not None and bool(plan.masked_steps) and (not traceable if per_image is None else per_image)
        stopped = self._backward(walk, len(self.steps) - 1, plan, k_maps, traceable, split)
        if stopped >= 0:  # the first masked step: from here on, one image at a time
            images = []
            # float32 on the CPU: the K rows channels-last (oneDNN's convolutions skip their layout conversions; up
            # to 1.5x faster). float64 runs no oneDNN kernel and is left as it is.
            layout = torch.channels_last if x.device.type == "cpu" and x.dtype != torch.float64 else None
            for i in range(x.shape[0]):
                image = walk.one_image(i, layout)
                self._backward(image, stopped, plan, k_maps, traceable, False)
                images.append(image)
            for key in images[0].recorded:
                walk.recorded[key] = torch.cat([image.recorded[key] for image in images])
            at_input = torch.cat([image.input_relevance(k_maps) for image in images]).contiguous()
            return logits, at_input.reshape(x.shape[0], k_maps, *x.shape[1:]), walk.recorded
        at_input = walk.input_relevance(k_maps)
        if walk.expanded:
            at_input = at_input.reshape(x.shape[0], k_maps, *x.shape[1:])
        return logits, at_input, walk.recorded

    def _forward(self, x: Tensor, reuse: tuple[Forward, int] | None = None
                 ) -> tuple[list[Tensor | None], list[Stash | None]]:
        """Every step's value and stash over `x`; with `reuse` (forward, start), those before `start` are
        `forward`'s (new lists: the relevance pass empties them as it goes)."""
        values: list[Tensor | None] = [] if reuse is None else list(reuse[0].values[:reuse[1]])
        stashes: list[Stash | None] = [] if reuse is None else list(reuse[0].stashes[:reuse[1]])
        for step, wiring in islice(zip(self.steps, self.wiring), len(values), None):
            out, stash = step([x if i < 0 else values[i] for i in wiring])
            values.append(out)
            stashes.append(stash)
        return values, stashes

    def _backward(self, walk: _Walk, start: int, plan: ConceptPlan | None, k_maps: int, traceable: bool,
                  split: bool) -> int:
        """Steps `start`..0 of the relevance pass over `walk`, in reverse topological order, summing where a value
        fans out. split: stop at the first masked step (returned, its relevance not taken), so that the caller runs
        the rest one image at a time; -1 once done."""
        start_filtered = self.composite.start == "softmax"
        masked = set() if plan is None else plan.masked_steps
        values, stashes = walk.values, walk.stashes
        for k in range(start, -1, -1):
            if walk.incoming[k] is None:  # a value the output does not depend on
                continue
            if split and k in masked and not walk.expanded:
                return k
            relevance, walk.incoming[k] = walk.incoming[k], None
            step, wiring = self.steps[k], self.wiring[k]
            if plan is not None and k in plan.record:
                # a copy (some rules divide their incoming relevance in place); below the first mask of a plan
                # with the full map, the full map's rows (the unconditional relevance at this layer)
                walk.recorded[k] = (relevance[::k_maps] if walk.expanded and plan.with_full else relevance).clone()
            if k in masked:
                if k == plan.top_k_step:
                    walk.recorded[TOP_K_CHANNELS], mask = top_k_masks(channel_relevance(relevance), plan.top_k)
                else:
                    mask = plan.masks[k] if walk.image is None else plan.masks[k][walk.image:walk.image + 1]
                if plan.with_full:
                    mask = with_full_row(mask)
                relevance = apply_mask(relevance, mask, walk.expanded)
                walk.incoming = [_around(r, plan, k, k_maps, walk.expanded, walk.image) for r in walk.incoming]
                walk.at_input = _around(walk.at_input, plan, k, k_maps, walk.expanded, walk.image)
                walk.expanded = True
            # the one-hot start vector is never filtered (its zeros would beat a negative logit: an all-zero map);
            # seed's softmax start is, as the blog does
            if self.top_k.active and step.filtered and (k != self.output or start_filtered):
                relevance = self.top_k(relevance, traceable)
            inputs, out, stash = [walk.x if i < 0 else values[i] for i in wiring], values[k], stashes[k]
            if not walk.expanded:
                parts = step.relevance(inputs, out, stash, relevance)
            elif walk.image is None:  # the whole batch, each image's tensors repeated K times
                inputs, out, stash = [t.repeat_interleave(k_maps, 0) for t in inputs], \
                    out.repeat_interleave(k_maps, 0), stash.map(lambda t: t.repeat_interleave(k_maps, 0))
                parts = step.relevance(inputs, out, stash, relevance, k_maps) if isinstance(step, AffineStep) else \
                    step.relevance(inputs, out, stash, relevance)
            else:  # one image: its tensors (one row) broadcast against the K rows; views where a step needs rows
                if not isinstance(step, (AffineStep, SumStep)):
                    rows = relevance.shape[0]
                    inputs, out, stash = [_rows(t, rows) for t in inputs], _rows(out, rows), \
                        stash.map(lambda t, rows=rows: _rows(t, rows))
                parts = step.relevance(inputs, out, stash, relevance)
            values[k] = stashes[k] = None  # every reader of this value is done: free it
            for i, part in zip(wiring, parts):
                if i < 0:
                    walk.at_input = part if walk.at_input is None else walk.at_input + part
                else:
                    walk.incoming[i] = part if walk.incoming[i] is None else walk.incoming[i] + part
        return -1

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


class TopConcepts(NamedTuple):
    """What one concept pass gives: logits (N, classes), the map (N, C, H, W) or (N, H, W), each layer's concept
    relevance (N, C) (summed over space, not normalised), and at the maps' layer each image's K most relevant
    channels (N, K) (most relevant first) and their conditional maps (N, K, C, H, W) or (N, K, H, W)."""

    logits: Tensor
    relevance: Tensor
    concept_relevance: tuple[Tensor, ...]
    channels: Tensor | None
    maps: Tensor | None


class ExportableConcepts(nn.Module):
    """forward(x, target) -> TopConcepts: the map, each of `layers`' concept relevance and, at `maps_layer`, each
    image's k most relevant channels and their conditional maps, in one pass (k = 0: no maps). Layers and k are
    fixed when it is built, so tracers and exporters capture it; target (N,) int64, -1 = predicted class.
    per_image: the maps below the layer one image at a time (`propagate_concepts`; eager only, not traceable)."""

    def __init__(self, lrp: LRPModel, layers: Sequence[str], maps_layer: str | None = None, k: int = 0,
                 exclude_parallel: bool = True, channel_sum: bool = True, per_image: bool = False) -> None:
        super().__init__()
        self.lrp, self.channel_sum, self.per_image = lrp, channel_sum, per_image
        self.layers = lrp._layers(layers)
        no_maps = isinstance(k, int) and not isinstance(k, bool) and k == 0
        self.maps = None if no_maps else lrp._layers([maps_layer])[0]
        if self.maps is not None:
            check_k(k, self.maps)
        steps = [layer.step for layer in self.layers] + ([self.maps.step] if self.maps is not None else [])
        self.plan = ConceptPlan(record=tuple(dict.fromkeys(steps)),
                                top_k_step=None if self.maps is None else self.maps.step, top_k=k,
                                exclude_parallel=exclude_parallel, with_full=True)

    def forward(self, x: Tensor, target: Tensor | None) -> TopConcepts:
        logits, relevance, recorded = self.lrp.propagate_concepts(x, target, self.plan, traceable=True,
                                                                  per_image=self.per_image)
        if self.channel_sum:
            relevance = relevance.sum(dim=-3)
        concept = tuple(channel_relevance(recorded[layer.step]) for layer in self.layers)
        if self.maps is None:
            return TopConcepts(logits, relevance, concept, None, None)
        return TopConcepts(logits, relevance[:, 0], concept, recorded[TOP_K_CHANNELS], relevance[:, 1:])
