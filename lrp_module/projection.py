"""P-ClArC's model surgery (Anders et al. 2022; Pahde et al. 2023, "Reveal to Revise"): project a concept direction
out of a layer's activations, towards a reference point, as a layer inserted into a copy of the model.

At every spatial position of the layer's output h (C channels), h' = h - v v^T (h - z) with v a unit direction and
z the clean images' mean activation: an affine map per position, i.e. a 1x1 convolution with weight I - v v^T and
bias v v^T z (`graph.ChannelProjection`), which the LRP engine and every exporter handle as any convolution.

"The layer" is a concept layer name as CRP uses it (lrp_module/concepts.py): a VGG's `features.28` names the
convolution's output after its folded batch norm and fused ReLU, a ResNet's `layer4.2` the block's output. The
projection goes where that output is produced, inserted into the enclosing `nn.Sequential` after the module that
produces it as `<name>_pclarc` (`features.30_pclarc`, `layer4.2_pclarc`), or appended to a `Sequential` layer as
`pclarc`; every other module keeps its name. A state dict of a corrected model carries the projection's tensors
under those names: `with_projections` re-inserts them, so a corrected model is built from its weights file alone.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .concepts import ConceptError, concept_layers, resolve
from .graph import ChannelProjection, StepKind, canonize, capture

SUFFIX = "_pclarc"  # the inserted layer's name after the module it follows
APPENDED = "pclarc"  # its name when appended to a Sequential layer


class ProjectionError(ValueError):
    """The projection cannot be placed or is malformed; the message says why."""


@dataclass(frozen=True)
class Site:
    """Where a layer's output is produced: the module (`features.30`, `layer4.2`, `layer4`) and its channels."""

    layer: str  # the concept layer name asked for
    module: str  # the module whose output the projection follows
    channels: int
    appended: bool = False  # appended to `module` (a Sequential), not inserted after it in its parent

    @property
    def inserted(self) -> str:
        """The inserted projection's module name."""
        return f"{self.module}.{APPENDED}" if self.appended else f"{self.module}{SUFFIX}"


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str, str]:
    """(parent module, parent's name, child's own name) of a dotted module name."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), parent_name, child


def find_site(model: nn.Module, layer: str) -> Site:
    """The module after which `layer`'s output (as CRP names it) can be projected; one clear line otherwise."""
    layers = capture(model)
    specs, _ = canonize(layers)
    named = concept_layers(specs, model)
    try:
        concept = resolve(layer, named)
    except ConceptError as error:
        raise ProjectionError(str(error)) from None
    flat: set[int] = set()
    for k, spec in enumerate(specs):  # steps in execution order: after a flatten or a linear layer, no positions
        if spec.kind is StepKind.FLATTEN or isinstance(spec.layer.module, nn.Linear) or flat & set(spec.inputs):
            flat.add(k)
    if concept.step in flat:
        raise ProjectionError(f"layer {layer!r} is not a convolutional feature map (it is flat): the projection "
                              "acts on a convolutional layer's channels at every position")
    modules = dict(model.named_modules())
    if layer in modules and len(list(modules[layer].children())) > 0:  # a container: its output is the layer's
        module = layer
    else:  # the step's last layer: a fused ReLU, a folded batch norm, or the layer itself
        index_of = {item.name: item.index for item in layers}
        covered = [name for name in specs[concept.step].covers if name in index_of]
        module = max(covered, key=index_of.__getitem__)
        if module not in modules:
            raise ProjectionError(f"layer {layer!r} ends in the operation {module}, not in a module: name the "
                                  "block that contains it (e.g. layer4.2)")
    if sum(1 for item in layers if item.name == module) > 1:
        raise ProjectionError(f"the output of {layer!r} comes from {module}, which runs more than once per forward: "
                              "name the block that contains it (e.g. layer4.2)")
    parent, _, _ = _parent(model, module)
    if isinstance(parent, nn.Sequential):
        return Site(layer, module, concept.channels)
    if isinstance(modules[module], nn.Sequential):
        return Site(layer, module, concept.channels, appended=True)
    raise ProjectionError(f"cannot insert a layer after {module} (the output of {layer!r}): it sits in no "
                          "nn.Sequential; name a block (layer4.2), a stage (layer4) or a VGG's features.N")


def projection_weights(direction: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]:
    """The 1x1 convolution's weight (C, C, 1, 1) = I - v v^T and bias (C,) = v v^T z, v = direction / |direction|."""
    v = direction.detach().double().flatten()
    z = reference.detach().double().flatten()
    if v.shape != z.shape:
        raise ProjectionError(f"direction ({v.numel()} channels) and reference ({z.numel()}) differ in size")
    norm = v.norm()
    if not torch.isfinite(norm) or norm == 0 or not torch.isfinite(z).all():
        raise ProjectionError("the direction must be finite and non-zero, the reference finite")
    v = v / norm
    outer = torch.outer(v, v)
    weight = torch.eye(v.numel(), dtype=torch.float64) - outer
    return weight.reshape(*weight.shape, 1, 1), outer @ z


def _insert(model: nn.Module, site: Site, projection: ChannelProjection) -> None:
    """Put `projection` after the site's module, in place (names of every other module unchanged)."""
    if site.appended:
        model.get_submodule(site.module).add_module(APPENDED, projection)
        return
    parent, parent_name, child = _parent(model, site.module)
    items: list[tuple[str, nn.Module]] = []
    for name, module in parent.named_children():
        items.append((name, module))
        if name == child:
            items.append((f"{child}{SUFFIX}", projection))
    rebuilt = nn.Sequential(OrderedDict(items))
    if parent_name:
        grand, _, own = _parent(model, parent_name)
        setattr(grand, own, rebuilt)
    else:  # the model itself is the Sequential: rebuild its children in place
        parent._modules = rebuilt._modules


def project_out(model: nn.Module, layer: str, direction: Tensor, reference: Tensor,
                threshold: float | None = None) -> nn.Module:
    """A copy of `model` (eval mode) whose `layer` output is h - v v^T (h - z) at every position; `model` unchanged.
    threshold: project only the images whose artifact score (`artifact_scores`) exceeds it (R-ClArC); None: all."""
    if threshold is not None and threshold != threshold:
        raise ProjectionError("the gate's threshold must be a number, got NaN")
    site = find_site(model, layer)
    weight, bias = projection_weights(direction, reference)
    if weight.shape[0] != site.channels:
        raise ProjectionError(f"layer {layer} has {site.channels} channels, the direction {weight.shape[0]}")
    corrected = copy.deepcopy(model).eval()
    dtype = next(model.parameters()).dtype
    projection = ChannelProjection(site.channels).to(dtype)
    with torch.no_grad():
        projection.weight.copy_(weight.to(dtype))
        projection.bias.copy_(bias.to(dtype))
    if threshold is not None:
        projection.set_gate(direction.detach().double().flatten() / direction.detach().double().norm(), threshold)
    _insert(corrected, site, projection.to(next(model.parameters()).device))
    return corrected


def _projection_sites(state: Mapping[str, Tensor]) -> list[tuple[str, int]]:
    """(inserted module name, channels) of every projection a corrected model's state dict carries."""
    found = []
    for key, value in state.items():
        name, _, leaf = key.rpartition(".")
        own = name.rpartition(".")[2]
        if leaf == "weight" and (own.endswith(SUFFIX) or own == APPENDED) and getattr(value, "dim", lambda: 0)() == 4:
            found.append((name, int(value.shape[0])))
    return found


def with_projections(model: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    """`model` (in place) with an identity `ChannelProjection` wherever `state` has one, so that
    load_state_dict(state) restores a corrected model; unchanged when `state` has none."""
    for name, channels in _projection_sites(state):
        parent_name, _, own = name.rpartition(".")
        if own == APPENDED:
            site = Site(parent_name, parent_name, channels, appended=True)
        else:
            site = Site(name, f"{parent_name}.{own[:-len(SUFFIX)]}".lstrip("."), channels)
        try:
            model.get_submodule(site.module)
        except AttributeError:
            raise ProjectionError(f"the weights place a projection after {site.module}, which this model does "
                                  "not have") from None
        _insert(model, site, ChannelProjection(channels))
    return model


def with_gate_defaults(model: nn.Module, state: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """`state` plus the ungated buffers (`direction`, `threshold`) of each projection of `model` whose gate it lacks:
    a corrected model's file written before the gate existed loads as the ungated projection it was."""
    extra = {f"{name}.{key}": getattr(module, key) for name, module in model.named_modules()
             if isinstance(module, ChannelProjection) for key in ("direction", "threshold")
             if f"{name}.{key}" not in state}
    return {**state, **extra} if extra else state


def site_activations(model: nn.Module, module: str, x: Tensor, batch: int = 64) -> Tensor:
    """The output of `module` (N, C, H, W) for images `x`, in batches, with a forward hook (inference only)."""
    target = model.get_submodule(module)
    captured: list[Tensor] = []
    handle = target.register_forward_hook(lambda _m, _i, out: captured.append(out.detach().clone()))
    try:
        with torch.inference_mode():
            for chunk in x.split(batch):
                model(chunk)
    finally:
        handle.remove()
    if len(captured) != len(x.split(batch)):
        raise ProjectionError(f"module {module} ran {len(captured)} times for {len(x.split(batch))} batches: "
                              "it must run exactly once per forward")
    return torch.cat(captured)


def pattern_cav(pooled: Tensor, labels: Tensor) -> Tensor:
    """The pattern ("signal") CAV of Pahde et al. 2024: the covariance of each channel's (spatially pooled)
    activation with the 0/1 label, cov(a_c, y) = mean((a_c - mean a_c)(y - mean y)), as a unit vector (C,). It
    points where the marked images' activations differ from the others', unlike a classifier's weight vector,
    which also cancels distractors; so it is the direction to project out."""
    a = pooled.double()
    y = labels.double().flatten()
    if a.dim() != 2 or a.shape[0] != y.numel():
        raise ProjectionError(f"pattern_cav needs (N, C) activations and N labels, got {tuple(a.shape)} and "
                              f"{y.numel()}")
    if y.min() == y.max():
        raise ProjectionError("pattern_cav needs both marked (1) and clean (0) images")
    cov = ((a - a.mean(0)) * (y - y.mean())[:, None]).mean(0)
    norm = cov.norm()
    if norm == 0:
        raise ProjectionError("the marked and clean images' activations do not differ: no direction to remove")
    return cov / norm


def artifact_scores(activations: Tensor, direction: Tensor) -> Tensor:
    """(N,): each image's largest v^T h over the layer's positions (v = direction, unit length), the gated
    projection's detector: an artifact is local, so its strongest position is what marks an image."""
    v = direction.detach().double().flatten()
    return torch.einsum("nchw,c->nhw", activations.double(), v / v.norm()).flatten(1).amax(1)


def detection_threshold(marked: Tensor, clean: Tensor) -> float:
    """The threshold on artifact scores that best separates marked from clean images: the largest TPR - FPR
    (Youden's J) over every cut between two consecutive distinct scores, placed halfway between them; among equal
    cuts the highest, which gates the fewest clean images. Scores that no cut separates are an error."""
    if marked.numel() == 0 or clean.numel() == 0:
        raise ProjectionError("the gate needs marked and clean images to set its threshold")
    values = torch.cat([marked, clean]).double().unique()  # sorted
    cuts = torch.cat([values[:1] - 1, (values[1:] + values[:-1]) / 2])
    tpr = (marked.double()[None, :] > cuts[:, None]).double().mean(1)
    fpr = (clean.double()[None, :] > cuts[:, None]).double().mean(1)
    j = tpr - fpr
    if float(j.max()) <= 0:
        raise ProjectionError("the artifact score does not separate the marked from the clean images (no cut has "
                              "more marked than clean above it): gate every image (--gate always) or choose another "
                              "layer")
    best = torch.nonzero(j >= j.max() - 1e-12).max()  # 1 - 1/3 and 2/3 - 0 differ in the last bit
    return float(cuts[best])
