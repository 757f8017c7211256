"""Composites: which rule each layer gets, by name, by position or by layer type (as zennit's).

Named composites follow zennit 1.0's layer maps and default parameters, plus `montavon` (the LRP tutorial's
VGG16 recipe) and `seed` (the original PyTorchRelevancePropagation blog). A user composite is a mapping::

    Composite({nn.Conv2d: Gamma(0.25), nn.Linear: Epsilon(), "features.0": ZBox(low, high), -1: Epsilon(0)})

Keys are checked in this order: module name ("features.0", "layer1.0.conv1"; an addition is named after the module
whose forward does it: "layer1.0.add"), layer index (int, position among the model's operations in execution order,
for a VGG `features..., avgpool, flatten, classifier...`; negative counts from the end), then `first`, then type
(`lrp_module.Sum` for additions, as zennit's `Sum`).

A `ChannelProjection` (the 1x1 convolution a P-ClArC correction inserts, lrp_module/projection.py) gets LRP-epsilon
in every composite unless a name, an index or its own type names it: it is a fixed projection I - v v^T with a bias,
not a learned filter. Epsilon passes relevance through its identity part unchanged (the corrected model's maps
equal the original's where the projection changes nothing); gamma and z+ would favour the positive part of its
mixed-sign weights and of the pre-projection activations, which reshapes relevance even where it projects nothing.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from .graph import ChannelProjection, Sum
from .rules import AlphaBeta, AvgPoolRule, Epsilon, Flat, Gamma, Norm, PoolRule, Rule, WinnerTakesAll, ZBox, ZPlus
from .weights_recipe import IMAGENET_HIGH, IMAGENET_LOW

AnyRule = Rule | PoolRule
STARTS = ("logit", "softmax")
PROJECTION_EPSILON = 1e-6  # LRP-epsilon's epsilon on an inserted ChannelProjection


def projection_rule(composite: Composite) -> Rule:
    """The rule of an inserted `ChannelProjection`: LRP-epsilon with the composite's epsilon (or stabiliser)."""
    params = composite.params
    return Epsilon(float(params.get("epsilon", params.get("stabilizer", PROJECTION_EPSILON))))


@dataclass(frozen=True)
class LayerInfo:
    """Where a layer sits in the network: what composites choose rules by."""

    name: str  # module name, e.g. "features.0", "classifier.6", "layer1.0.conv1", "layer1.0.add"
    index: int  # position among the model's operations (for a VGG: features..., avgpool, flatten, classifier...)
    count: int  # length of that list, so negative indices work
    module: nn.Module
    first_affine: bool  # the first convolution / linear layer
    block: int  # downsampling layers (max pools, strided convs / pools) before this one (a VGG's block, 0-based)


class Composite:
    """Maps each layer to a rule. Pooling layers default to zennit's treatment (arg-max, Norm)."""

    def __init__(
        self,
        rules: Mapping[Any, AnyRule] | None = None,
        first: Rule | None = None,
        start: str = "logit",
        name: str = "custom",
        params: Mapping[str, Any] | None = None,
    ) -> None:
        if start not in STARTS:
            raise ValueError(f"composite start relevance must be one of {STARTS}, got {start!r}")
        self.rules = dict(rules or {})
        for key, rule in self.rules.items():
            if not isinstance(key, (str, int, type)):
                raise TypeError(f"composite keys are module names, layer indices or layer types, got {key!r}")
            if not isinstance(rule, (Rule, PoolRule)):
                raise TypeError(f"composite value for {key!r} is not a rule: {rule!r}")
        self.first = first
        self.start = start
        self.name = name
        self.params = dict(params or {})

    def rule_for(self, info: LayerInfo) -> AnyRule:
        if info.name in self.rules:
            return self.rules[info.name]
        for key, rule in self.rules.items():
            if isinstance(key, int) and not isinstance(key, bool) and key % info.count == info.index:
                return rule
        if isinstance(info.module, ChannelProjection) and ChannelProjection not in self.rules:
            return projection_rule(self)
        if info.first_affine and self.first is not None:
            return self.first
        for key, rule in self.rules.items():
            if isinstance(key, type) and isinstance(info.module, key):
                return rule
        if isinstance(info.module, nn.MaxPool2d):
            return WinnerTakesAll()
        if isinstance(info.module, (nn.AdaptiveAvgPool2d, nn.AvgPool2d, Sum)):
            return Norm()
        raise ValueError(f"composite {self.name!r} has no rule for layer {info.name} ({type(info.module).__name__})")

    def describe(self) -> dict[str, Any]:
        """Name and parameters, for provenance records."""
        return {"name": self.name, "start": self.start, **self.params}


def _zennit_base(stabilizer: float) -> dict[Any, AnyRule]:
    """zennit's layer_map_base: Norm on average pools and on the residual Sum (ResNetCanonizer), arg-max pooling."""
    return {nn.AdaptiveAvgPool2d: Norm(stabilizer), nn.AvgPool2d: Norm(stabilizer), Sum: Norm(stabilizer),
            nn.MaxPool2d: WinnerTakesAll()}


def epsilon_gamma_box(low=IMAGENET_LOW, high=IMAGENET_HIGH, epsilon: float = 1e-6, gamma: float = 0.25,
                      stabilizer: float = 1e-6) -> Composite:
    """zennit EpsilonGammaBox: z^B on the first conv, gamma on convs, epsilon on dense layers."""
    return Composite(
        {**_zennit_base(stabilizer), nn.Conv2d: Gamma(gamma, stabilizer), nn.Linear: Epsilon(epsilon)},
        first=ZBox(low, high, stabilizer),
        name="epsilon_gamma_box",
        params=dict(low=list(low), high=list(high), epsilon=epsilon, gamma=gamma, stabilizer=stabilizer),
    )


def epsilon_plus(epsilon: float = 1e-6, stabilizer: float = 1e-6) -> Composite:
    """zennit EpsilonPlus: z+ on convs, epsilon on dense layers."""
    return Composite(
        {**_zennit_base(stabilizer), nn.Conv2d: ZPlus(stabilizer), nn.Linear: Epsilon(epsilon)},
        name="epsilon_plus",
        params=dict(epsilon=epsilon, stabilizer=stabilizer),
    )


def epsilon_plus_flat(epsilon: float = 1e-6, stabilizer: float = 1e-6) -> Composite:
    """zennit EpsilonPlusFlat: flat on the first layer, z+ on convs, epsilon on dense layers."""
    return Composite(
        {**_zennit_base(stabilizer), nn.Conv2d: ZPlus(stabilizer), nn.Linear: Epsilon(epsilon)},
        first=Flat(stabilizer),
        name="epsilon_plus_flat",
        params=dict(epsilon=epsilon, stabilizer=stabilizer),
    )


def epsilon_alpha2_beta1(epsilon: float = 1e-6, stabilizer: float = 1e-6) -> Composite:
    """zennit EpsilonAlpha2Beta1: alpha=2, beta=1 on convs, epsilon on dense layers."""
    return Composite(
        {**_zennit_base(stabilizer), nn.Conv2d: AlphaBeta(2.0, 1.0, stabilizer), nn.Linear: Epsilon(epsilon)},
        name="epsilon_alpha2_beta1",
        params=dict(epsilon=epsilon, stabilizer=stabilizer),
    )


def epsilon_alpha2_beta1_flat(epsilon: float = 1e-6, stabilizer: float = 1e-6) -> Composite:
    """zennit EpsilonAlpha2Beta1Flat: flat first layer, alpha=2, beta=1 on convs, epsilon on dense layers."""
    return Composite(
        {**_zennit_base(stabilizer), nn.Conv2d: AlphaBeta(2.0, 1.0, stabilizer), nn.Linear: Epsilon(epsilon)},
        first=Flat(stabilizer),
        name="epsilon_alpha2_beta1_flat",
        params=dict(epsilon=epsilon, stabilizer=stabilizer),
    )


RESNET_STAGE = re.compile(r"^layer(\d+)\.")  # torchvision ResNets' residual stages: layer1 ... layer4


class _Montavon(Composite):
    """The LRP tutorial's VGG16 recipe, generalised to every VGG by block (a block ends at a max pool) and to
    torchvision's ResNets by stage (the stem is block 0, layerN block N), so that no residual block is split."""

    def __init__(self, low, high, gamma: float, rms_scale: float, stabilizer: float, gamma_blocks: int) -> None:
        super().__init__(first=ZBox(low, high, stabilizer), name="montavon", params=dict(
            low=list(low), high=list(high), gamma=gamma, rms_scale=rms_scale, stabilizer=stabilizer,
            gamma_blocks=gamma_blocks,
        ))
        self._gamma = Gamma(gamma, stabilizer)
        self._epsilon_rms = Epsilon(stabilizer, rms_scale=rms_scale)
        self._lrp0 = Epsilon(stabilizer)
        self._pool_low = AvgPoolRule(stabilizer)
        self._pool_high = AvgPoolRule(stabilizer, rms_scale=rms_scale)
        self._gamma_blocks = gamma_blocks

    def _block(self, info: LayerInfo) -> int:
        """A VGG's block; a ResNet's stage (every layer of a residual block gets its stage's rule)."""
        stage = RESNET_STAGE.match(info.name)
        if stage:
            return int(stage.group(1))
        if isinstance(info.module, Sum):
            raise ValueError(f"montavon cuts gamma from epsilon by block, which could split the residual addition "
                             f"{info.name} of this network: it is defined for VGGs and torchvision's ResNets "
                             "(layer1-layer4) only; choose rules by name with your own Composite")
        return 0 if info.name in ("conv1", "bn1", "relu", "maxpool") else info.block

    def rule_for(self, info: LayerInfo) -> AnyRule:
        if isinstance(info.module, ChannelProjection):
            return projection_rule(self)
        low_block = self._block(info) < self._gamma_blocks
        if isinstance(info.module, nn.Conv2d):
            if info.first_affine:
                return self.first
            return self._gamma if low_block else self._epsilon_rms
        if isinstance(info.module, nn.MaxPool2d):  # the pool closing block b belongs to block b
            return self._pool_low if low_block else self._pool_high
        if isinstance(info.module, (nn.AdaptiveAvgPool2d, nn.AvgPool2d, Sum)):
            return Norm(self.params["stabilizer"])
        if isinstance(info.module, nn.Linear):
            return self._lrp0
        return super().rule_for(info)


def montavon(low=IMAGENET_LOW, high=IMAGENET_HIGH, gamma: float = 0.25, rms_scale: float = 0.25,
             stabilizer: float = 1e-9, gamma_blocks: int = 3) -> Composite:
    """Montavon et al.'s tutorial: z^B first, gamma in blocks 1-3, epsilon = 0.25 * rms(z) in blocks 4-5,
    LRP-0 on dense layers, max pooling as average pooling. The tutorial's 1e-9 is added sign-aware.
    On a ResNet the five blocks are the stem and layer1-layer4 (gamma: stem, layer1, layer2; epsilon: layer3,
    layer4), the cut between stages as Montavon et al. 2019 place it between lower and middle layers."""
    return _Montavon(low, high, gamma, rms_scale, stabilizer, gamma_blocks)


def seed(stabilizer: float = 1e-5) -> Composite:
    """The original blog (kaifishr/PyTorchRelevancePropagation): z+ with zeroed bias on every conv and linear
    layer, an all-ones input for the first layer, max pooling as 2x2 average pooling, softmax start."""
    zplus = ZPlus(stabilizer, zero_bias=True)
    return Composite(
        {nn.Conv2d: zplus, nn.Linear: zplus, nn.MaxPool2d: AvgPoolRule(stabilizer),
         nn.AdaptiveAvgPool2d: Norm(stabilizer),
         nn.AvgPool2d: Norm(stabilizer), Sum: Norm(stabilizer)},
        first=ZPlus(stabilizer, zero_bias=True, ones_input=True),
        start="softmax",
        name="seed",
        params=dict(stabilizer=stabilizer),
    )


COMPOSITES: dict[str, Callable[..., Composite]] = {
    "epsilon_gamma_box": epsilon_gamma_box,
    "epsilon_plus": epsilon_plus,
    "epsilon_plus_flat": epsilon_plus_flat,
    "epsilon_alpha2_beta1": epsilon_alpha2_beta1,
    "epsilon_alpha2_beta1_flat": epsilon_alpha2_beta1_flat,
    "montavon": montavon,
    "seed": seed,
}


def get_composite(composite: str | Composite, **params: Any) -> Composite:
    """A composite by name (with optional parameters), or the given one."""
    if isinstance(composite, Composite):
        if params:
            raise ValueError("parameters can only be given with a composite name")
        return composite
    if composite not in COMPOSITES:
        raise ValueError(f"unknown composite {composite!r}; known: {', '.join(sorted(COMPOSITES))}")
    try:
        return COMPOSITES[composite](**params)
    except TypeError as error:
        raise ValueError(f"bad parameters for composite {composite!r}: {error}") from None
