"""Conservation where the rules conserve: with no biases, LRP-0 and z+ pass the whole target logit down."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lrp_module as lrp

from .helpers import make_vgg


def _bias_free(arch: str) -> nn.Module:
    model = make_vgg(arch)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.bias.zero_()
            if isinstance(module, nn.BatchNorm2d):  # folded bias = beta - mean * scale: make it zero
                module.bias.copy_(module.running_mean * module.weight / (module.running_var + module.eps).sqrt())
    return model


COMPOSITES = {
    "lrp0": lambda: lrp.Composite({nn.Conv2d: lrp.Epsilon(0.0), nn.Linear: lrp.Epsilon(0.0),
                                   nn.AdaptiveAvgPool2d: lrp.Norm(0.0)}),
    "zplus": lambda: lrp.Composite({nn.Conv2d: lrp.ZPlus(0.0), nn.Linear: lrp.ZPlus(0.0),
                                    nn.AdaptiveAvgPool2d: lrp.Norm(0.0)}),
}


@pytest.mark.parametrize("rules", sorted(COMPOSITES))
@pytest.mark.parametrize("arch", ["vgg11", "vgg11_bn"])
def test_relevance_sums_to_target_logit(rules, arch):
    model = _bias_free(arch)
    x = torch.randn(3, 3, 64, 64).abs()  # z+ conserves for a non-negative input
    target = torch.tensor([0, 5, 9])
    logits, relevance = lrp.LRPModel(model, COMPOSITES[rules]()).explain(x, target)
    expected = logits.gather(1, target[:, None]).squeeze(1)
    torch.testing.assert_close(relevance.sum(dim=(1, 2, 3)), expected, rtol=1e-4, atol=1e-6)


def test_biases_absorb_relevance():
    """The check above can fail: with biases, LRP-0 does not conserve."""
    model = make_vgg("vgg11")
    x = torch.randn(2, 3, 64, 64)
    logits, relevance = lrp.LRPModel(model, COMPOSITES["lrp0"]()).explain(x)
    assert not torch.allclose(relevance.sum(dim=(1, 2, 3)), logits.max(dim=1).values, rtol=1e-3)
