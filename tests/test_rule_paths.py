"""Every fast path of every rule equals its rule's general path (the formula) to 1e-12 in float64, on a layer whose
facts (lrp_module/contexts.py) satisfy the path's predicate, the facts made true by construction: an input >= 0
(with exact zeros), relevance only where the fused ReLU fired. The general paths themselves equal zennit's rules
(tests/test_zennit_agreement.py, tests/test_resnet.py)."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import lrp_module as lrp
from lrp_module import rules
from lrp_module.contexts import LayerContext
from lrp_module.ops import make_op

from .helpers import relative_error

EXACT = 1e-12
RULES = [
    lrp.Epsilon(), lrp.Epsilon(0.0), lrp.Epsilon(1e-3, rms_scale=0.25), lrp.Epsilon(zero_bias=True),
    lrp.ZPlus(), lrp.ZPlus(zero_bias=True), lrp.ZPlus(ones_input=True),
    lrp.Gamma(0.25), lrp.Gamma(0.5, zero_bias=True),
    lrp.AlphaBeta(2.0, 1.0), lrp.AlphaBeta(1.5, 0.5, zero_bias=True),
    lrp.ZBox(-1.5, 2.0), lrp.Flat(), lrp.WSquare(),
]
LAYERS = {
    "conv": lambda: nn.Conv2d(4, 6, 3, padding=1),
    "conv-strided-grouped": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
    "linear": lambda: nn.Linear(12, 7),
}
# every combination of the facts the engine can prove (relevance only where the ReLU fired implies a ReLU)
CONTEXTS = [LayerContext(nonnegative, relu, on_active)
            for nonnegative, relu, on_active in itertools.product((False, True), repeat=3) if relu or not on_active]


def _name(ctx: LayerContext) -> str:
    return "+".join(f for f, v in zip(("nonneg", "relu", "on-active"), (ctx.input_nonnegative, ctx.relu,
                                                                          ctx.relevance_on_active)) if v) or "none"


def _cases():
    for rule, (layer, _), ctx in itertools.product(RULES, LAYERS.items(), CONTEXTS):
        for path in rule.paths[:-1]:
            if path.applies(rule, ctx, torch.zeros(1)):  # every layer here has a bias
                yield pytest.param(rule, path, layer, ctx, id=f"{rule!r}-{path.__name__}-{layer}-{_name(ctx)}")


def _layer(layer: str, ctx: LayerContext, seed: int = 0):
    """A float64 layer, an input and an output relevance that satisfy `ctx`, and the layer's pre-activation."""
    torch.manual_seed(seed)
    module = LAYERS[layer]().double()
    nn.init.normal_(module.bias)  # biases of both signs and of the weights' size: every bias term matters
    a = torch.randn(3, 4, 9, 9, dtype=torch.float64) if isinstance(module, nn.Conv2d) else \
        torch.randn(3, 12, dtype=torch.float64)
    if ctx.input_nonnegative:
        a = a.clamp(min=0)
    op, weight, bias = make_op(module), module.weight.detach(), module.bias.detach()
    o = op.forward_op(a, weight, bias)
    relevance = torch.randn_like(o)
    if ctx.relevance_on_active:
        relevance = relevance * (o > 0)
    return op, weight, bias, a, o, relevance


def _input_relevance(path, rule, layer: str, ctx: LayerContext):
    """The input relevance as the engine's step computes it with `path` (forward, stash, fused ReLU, relevance)."""
    op, weight, bias, a, o, relevance = _layer(layer, ctx)
    bound = path(rule, op, weight, bias, ctx)
    stash = bound.stash(o)
    out = torch.relu(o) if ctx.relu else o
    return bound.relevance(a, out, stash, relevance, weight)


@pytest.mark.parametrize("rule,path,layer,ctx", list(_cases()))
def test_fast_path_equals_the_general_path(rule, path, layer, ctx):
    fast = _input_relevance(path, rule, layer, ctx)
    general = _input_relevance(rule.general, rule, layer, ctx)
    assert general.abs().max() > 0
    assert relative_error(fast[None], general[None]).item() <= EXACT


@pytest.mark.parametrize("ctx", [c for c in CONTEXTS if c.relevance_on_active], ids=_name)
def test_sum_norm_on_active_equals_the_general_path(ctx):
    torch.manual_seed(1)
    inputs = [torch.randn(2, 5, 4, 4, dtype=torch.float64) for _ in range(3)]
    o = inputs[0] + inputs[1] + inputs[2]
    relevance = torch.randn_like(o) * (o > 0)
    results = []
    for path in (rules.SumNormOnActive, rules.SumNormGeneral):
        assert path.applies(lrp.Norm(), ctx)
        bound = path(1e-6, ctx)
        results.append(torch.stack(bound.relevance_sum(inputs, torch.relu(o), bound.stash(o), relevance.clone())))
    assert relative_error(results[0][None], results[1][None]).item() <= EXACT


@pytest.mark.parametrize("rule", RULES, ids=repr)
def test_the_general_path_is_last_and_applies_everywhere(rule):
    """The engine binds the first path that applies: the general path ends the list and applies to every layer."""
    assert all(rule.general.applies(rule, ctx, bias) for ctx in CONTEXTS for bias in (None, torch.zeros(1)))


def test_the_engine_takes_the_fast_paths_its_facts_allow():
    """A VGG: gamma on ReLU layers that only multiplying readers follow takes the on-active path, the dense layers
    epsilon's, the last one (no ReLU) reads its pre-activation from the forward; z^B has one path."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 3))
    engine = lrp.LRPModel(model, "epsilon_gamma_box")
    paths = [type(step.rule) for step in engine.steps if getattr(step, "rule", None) is not None]
    assert paths == [rules.ZBoxGeneral, rules.GammaOnActive, rules.WinnerTakesAllGeneral, rules.EpsilonOnActive,
                     rules.EpsilonFromForward]


def test_zbox_bounds_are_kept_in_the_models_precision():
    """A float64 model computes with the bounds as given, not with a float32 rounding of them."""
    low, high = [-2.1179039301310043, -2.0357142857142856], [2.2489082969432315, 2.4285714285714284]
    step = lrp.LRPModel(nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 2)).double(),
                        lrp.Composite({nn.Linear: lrp.Epsilon()}, first=lrp.ZBox(low, high))).steps[0]
    assert step.rule.low.dtype == torch.float64 and step.rule.low.flatten().tolist() == low
    assert step.rule.high.flatten().tolist() == high
