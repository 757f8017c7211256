"""The original blog's LRP (kaifishr/PyTorchRelevancePropagation), re-implemented straightforwardly, layer by layer
with the autograd gradient trick (z = rho(layer)(a) + eps; s = R / z; (z * s).sum().backward(); R = a * a.grad):
the independent reference the tests check `seed` and the top-k filter against, and a contender in bench/lrp_speed.
Here, not in tests/, because no benchmark imports tests."""
from __future__ import annotations

import copy

import torch
from torch import nn


def layer_list(model: nn.Module) -> list[nn.Module]:
    """A torchvision VGG as the flat layer list the blog's code walks."""
    return list(model.features) + [model.avgpool, nn.Flatten(1)] + list(model.classifier)


def gradient_step(layer: nn.Module, a: torch.Tensor, relevance: torch.Tensor, incr) -> torch.Tensor:
    """One LRP step through `layer` by the gradient trick; `incr` stabilises the denominator z."""
    a = a.detach().requires_grad_(True)
    z = incr(layer(a))
    s = (relevance / z).detach()
    (z * s).sum().backward()
    return (a * a.grad).detach()


def blog_topk(r: torch.Tensor, top_k: float) -> torch.Tensor:
    """The blog's filter: torch.topk, then scatter into zeros."""
    flat = r.flatten(1)
    k = max(1, int(top_k * flat.shape[-1]))
    top = torch.topk(flat, k=k, dim=-1)
    return torch.zeros_like(flat).scatter_(1, top.indices, top.values).view(r.shape)


class BlogLRP:
    """kaifishr/PyTorchRelevancePropagation's algorithm: z+ with zero bias everywhere, max pool as 2x2 average
    pool, ones as the first layer's input, softmax start; channel-summed. Built once, like the blog's model."""

    def __init__(self, model: nn.Module, eps: float = 1e-5) -> None:
        self.layers = layer_list(model)
        self.lrp_layers = copy.deepcopy(self.layers)
        for i, layer in enumerate(self.lrp_layers):
            if isinstance(layer, nn.MaxPool2d):
                self.lrp_layers[i] = nn.AvgPool2d(kernel_size=2)
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                layer.weight = nn.Parameter(layer.weight.clamp(min=0.0))
                layer.bias = nn.Parameter(torch.zeros_like(layer.bias))
        self.eps = eps

    def __call__(self, x: torch.Tensor, top_k: float = 0.0) -> torch.Tensor:
        activations = [torch.ones_like(x)]
        with torch.no_grad():
            h = x
            for layer in self.layers:
                h = layer(h.clone())
                activations.append(h)
        relevance = torch.softmax(activations.pop(), dim=-1)
        for layer in reversed(self.lrp_layers):
            a = activations.pop()
            if isinstance(layer, (nn.ReLU, nn.Dropout)):
                continue
            if isinstance(layer, nn.Flatten):
                relevance = relevance.view(a.shape)
                continue
            if top_k:
                relevance = blog_topk(relevance, top_k)
            relevance = gradient_step(layer, a, relevance, lambda z: z + self.eps)
        return relevance.sum(dim=1)


def blog_lrp(model: nn.Module, x: torch.Tensor, top_k: float = 0.0) -> torch.Tensor:
    """The blog's channel-summed map of `x` (the model rebuilt for this one call)."""
    return BlogLRP(model)(x, top_k)
