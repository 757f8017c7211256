"""`seed` and `montavon` against independent, straightforward re-implementations: the original blog's algorithm
(bench/blog_lrp.py, also a contender in bench/lrp_speed) and the LRP tutorial's (here), layer by layer with the
autograd gradient trick (z = rho(layer)(a) + eps; s = R / z; (z * s).sum().backward(); R = a * a.grad)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lrp_module as lrp
from bench.blog_lrp import blog_lrp, gradient_step, layer_list
from lrp_module.weights_recipe import IMAGENET_HIGH, IMAGENET_LOW

from .helpers import make_vgg, relative_error


@pytest.mark.parametrize("arch,size", [("vgg11", (64, 64)), ("vgg11", (64, 96)), ("vgg16", (64, 64))])
def test_seed_matches_blog(arch, size):
    model = make_vgg(arch)
    x = torch.randn(3, 3, *size)
    ours = lrp.LRPModel(model, "seed")(x)
    reference = blog_lrp(model, x)
    assert ours.shape == reference.shape == (3, *size)
    assert (relative_error(ours, reference) <= 1e-4).all()


@pytest.mark.parametrize("top_k", [0.1, 0.02])
def test_seed_with_top_k_matches_blog_filter(top_k):
    model = make_vgg("vgg11")
    x = torch.randn(2, 3, 64, 64)
    ours = lrp.LRPModel(model, "seed", top_k=top_k)(x)
    reference = blog_lrp(model, x, top_k=top_k)
    assert (relative_error(ours, reference) <= 1e-4).all()
    # the filter really acted: without it the map differs
    assert (relative_error(lrp.LRPModel(model, "seed")(x), reference) > 1e-2).all()


def tutorial_lrp(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Montavon et al.'s LRP tutorial for VGG16 (their layer index ranges), batch-wise with a per-image rms."""
    layers = layer_list(model)
    activations = [x]
    with torch.no_grad():
        for layer in layers:
            activations.append(layer(activations[-1].clone()))
    logits = activations[-1]
    relevance = torch.zeros_like(logits).scatter_(1, target[:, None], logits.gather(1, target[:, None]))

    def rms(z):
        return (z ** 2).mean(dim=tuple(range(1, z.ndim)), keepdim=True).sqrt().detach()

    def modified(layer, rho):
        layer = copy.deepcopy(layer)
        layer.weight = nn.Parameter(rho(layer.weight))
        layer.bias = nn.Parameter(rho(layer.bias))
        return layer

    for index in range(len(layers) - 1, 0, -1):
        layer, a = layers[index], activations[index]
        if isinstance(layer, (nn.ReLU, nn.Dropout)):
            continue
        if isinstance(layer, nn.Flatten):
            relevance = relevance.view(a.shape)
            continue
        if isinstance(layer, nn.MaxPool2d):
            layer = nn.AvgPool2d(2)
        if index <= 16:  # blocks 1-3: gamma = 0.25
            if isinstance(layer, nn.Conv2d):
                layer = modified(layer, lambda p: p + 0.25 * p.clamp(min=0))
            incr = lambda z: z + 1e-9  # noqa: E731
        elif index <= 30:  # blocks 4-5: epsilon = 0.25 * rms(z)
            incr = lambda z: z + 1e-9 + 0.25 * rms(z)  # noqa: E731
        else:  # adaptive pool and dense layers: LRP-0
            incr = lambda z: z + 1e-9  # noqa: E731
        relevance = gradient_step(layer, a, relevance, incr)
    # first layer: z^B with the ImageNet box
    first = layers[0]
    a = x.detach().requires_grad_(True)
    low = (torch.ones_like(x) * torch.tensor(IMAGENET_LOW)[None, :, None, None]).requires_grad_(True)
    high = (torch.ones_like(x) * torch.tensor(IMAGENET_HIGH)[None, :, None, None]).requires_grad_(True)
    z = first(a) + 1e-9
    z = z - modified(first, lambda p: p.clamp(min=0))(low) - modified(first, lambda p: p.clamp(max=0))(high)
    s = (relevance / z).detach()
    (z * s).sum().backward()
    return (a * a.grad + low * low.grad + high * high.grad).detach()


@pytest.mark.parametrize("size", [(64, 64), (96, 64)])
def test_montavon_matches_tutorial(size):
    model = make_vgg("vgg16")
    x = torch.randn(2, 3, *size)
    target = torch.tensor([3, 7])
    _, ours = lrp.LRPModel(model, "montavon").explain(x, target)
    reference = tutorial_lrp(model, x, target)
    assert (relative_error(ours, reference) <= 1e-4).all()
