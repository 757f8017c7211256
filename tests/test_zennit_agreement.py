"""Maps equal zennit 1.0.0's for every composite both have, and for custom composites that drive the general
(non-fast) rule paths. float64: ours and zennit's agree to 1e-9 (the same formulas). float32: float32 LRP on random
weights is ill-conditioned and its rounding depends on the CPU's kernels, so ours and zennit's are each compared with
the float64 oracle, each within `oracle.bound` of the other's distance (max |difference| / max |reference| per
image)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from zennit import composites as zc
from zennit import rules as zr
from zennit.attribution import Gradient
from zennit.composites import NameLayerMapComposite
from zennit.torchvision import VGGCanonizer
from zennit.types import Activation, AvgPool, Convolution

import lrp_module as lrp
from lrp_module.oracle import Float64Oracle, bound
from lrp_module.weights_recipe import IMAGENET_HIGH, IMAGENET_LOW

from .helpers import make_vgg, relative_error, sampled_matrix

EXACT = 1e-9  # float64 against float64
# float64, as given: zennit casts them to the model's dtype (a float32 copy would hide a float32 rounding of ours)
LOW = torch.tensor(IMAGENET_LOW, dtype=torch.float64)[None, :, None, None]
HIGH = torch.tensor(IMAGENET_HIGH, dtype=torch.float64)[None, :, None, None]

ZENNIT = {
    "epsilon_gamma_box": lambda c: zc.EpsilonGammaBox(low=LOW, high=HIGH, canonizers=c),
    "epsilon_plus": lambda c: zc.EpsilonPlus(canonizers=c),
    "epsilon_plus_flat": lambda c: zc.EpsilonPlusFlat(canonizers=c),
    "epsilon_alpha2_beta1": lambda c: zc.EpsilonAlpha2Beta1(canonizers=c),
    "epsilon_alpha2_beta1_flat": lambda c: zc.EpsilonAlpha2Beta1Flat(canonizers=c),
}


def zennit_relevance(model: nn.Module, composite, x: torch.Tensor, target: torch.Tensor | None = None):
    """zennit's attribution with the output gradient one-hot(target) * logits."""
    with Gradient(model, composite) as attributor:
        logits = model(x)
        index = (logits.argmax(1) if target is None else target)[:, None]
        start = torch.zeros_like(logits).scatter_(1, index, logits.gather(1, index))
        _, relevance = attributor(x.clone().requires_grad_(True), start)
    return logits.detach(), relevance


def assert_agree(model, ours_composite, zennit_composite, x, target=None):
    """float64 models: ours equals zennit's to 1e-9. float32: ours and zennit's are both close to the float64
    oracle, neither further than the bound derived from the other's distance."""
    logits, ours = lrp.LRPModel(model, ours_composite).explain(x, target)
    ref_logits, theirs = zennit_relevance(model, zennit_composite, x, target)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(ours).all()
    if x.dtype == torch.float64:
        error = relative_error(ours, theirs)
        assert (error <= EXACT).all(), f"relative error per image {error.tolist()}"
        return
    _, reference = Float64Oracle(model, ours_composite).explain(x, target)
    ours_error, theirs_error = relative_error(ours.double(), reference), relative_error(theirs.double(), reference)
    detail = f"to float64 per image: ours {ours_error.tolist()}, zennit {theirs_error.tolist()}"
    assert ours_error.max() <= bound(theirs_error.max()), detail
    assert theirs_error.max() <= bound(ours_error.max()), detail


NAMED_CASES = [(arch, size) for arch in ("vgg11", "vgg11_bn") for size in ((64, 64), (48, 80))]


@pytest.mark.precision
@pytest.mark.parametrize("arch,size,name", sampled_matrix(sorted(ZENNIT), NAMED_CASES,
                                                          [f"{a}-{h}x{w}" for a, (h, w) in NAMED_CASES]))
def test_named_composites_match_zennit(name, arch, size):
    """Every composite and every architecture and size by default; all their pairs with --full (conftest.py)."""
    model = make_vgg(arch)
    torch.manual_seed(2)
    x = torch.randn(3, 3, *size)
    canonizers = [VGGCanonizer()] if arch.endswith("_bn") else None
    assert_agree(model, name, ZENNIT[name](canonizers), x)


@pytest.mark.parametrize("name", ["epsilon_gamma_box", "epsilon_plus_flat"])
def test_larger_input_with_downsampling_adaptive_pool(name):
    """256x288 gives an 8x9 feature map that the adaptive pool shrinks to 7x7 (overlapping bins)."""
    model = make_vgg("vgg11")
    x = torch.randn(2, 3, 256, 288)
    assert_agree(model, name, ZENNIT[name](None), x)


def test_vgg16_bn_explicit_targets():
    model = make_vgg("vgg16_bn", num_classes=20)
    torch.manual_seed(3)
    x = torch.randn(2, 3, 64, 96)
    target = torch.tensor([4, 17])
    assert_agree(model, "epsilon_gamma_box", ZENNIT["epsilon_gamma_box"]([VGGCanonizer()]), x, target)


@pytest.mark.slow
def test_vgg16_224():
    model = make_vgg("vgg16", num_classes=1000)
    x = torch.randn(2, 3, 224, 224)
    assert_agree(model, "epsilon_gamma_box", ZENNIT["epsilon_gamma_box"](None), x)


def _custom_pair(variant: str, model: nn.Module):
    """(ours, zennit) custom composites that reach the rules' general paths."""
    base = [(Activation, zr.Pass()), (AvgPool, zr.Norm())]
    conv = [f"features.{i}" for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)]
    if variant == "gamma_first_wsquare_flat_middle":
        # gamma on the signed image; w^2 and flat in the middle break the 'relevance only where active'
        # guarantee, so the layers below them take the general gamma path; epsilon without bias on dense
        ours = lrp.Composite({
            conv[0]: lrp.Gamma(0.5), conv[1]: lrp.WSquare(), conv[3]: lrp.Flat(),
            nn.Conv2d: lrp.Gamma(0.25), nn.Linear: lrp.Epsilon(1e-3, zero_bias=True),
        })
        zen = NameLayerMapComposite(
            name_map=[([conv[0]], zr.Gamma(0.5)), ([conv[1]], zr.WSquare()), ([conv[3]], zr.Flat())],
            layer_map=base + [(Convolution, zr.Gamma(0.25)), (nn.Linear, zr.Epsilon(1e-3, zero_params=["bias"]))],
        )
    elif variant == "alphabeta_first_epsilon_conv":
        # alpha-beta on the signed image, epsilon on convs (fast and, under w^2, general), z+ without bias on dense
        ours = lrp.Composite({
            conv[0]: lrp.AlphaBeta(1.5, 0.5), conv[2]: lrp.WSquare(zero_bias=True),
            nn.Conv2d: lrp.Epsilon(1e-4), nn.Linear: lrp.ZPlus(zero_bias=True),
        })
        zen = NameLayerMapComposite(
            name_map=[([conv[0]], zr.AlphaBeta(1.5, 0.5)), ([conv[2]], zr.WSquare(zero_params=["bias"]))],
            layer_map=base + [(Convolution, zr.Epsilon(1e-4)), (nn.Linear, zr.ZPlus(zero_params=["bias"]))],
        )
    elif variant == "zplus_first_gamma_dense":
        # z+ on the signed image, gamma and alpha-beta on dense layers (the last one has no ReLU)
        ours = lrp.Composite({
            conv[0]: lrp.ZPlus(), nn.Conv2d: lrp.AlphaBeta(2.0, 1.0), "classifier.0": lrp.Flat(),
            nn.Linear: lrp.Gamma(0.1),
        })
        zen = NameLayerMapComposite(
            name_map=[([conv[0]], zr.ZPlus()), (["classifier.0"], zr.Flat())],
            layer_map=base + [(Convolution, zr.AlphaBeta(2.0, 1.0)), (nn.Linear, zr.Gamma(0.1))],
        )
    else:
        raise KeyError(variant)
    return ours, zen


@pytest.mark.parametrize(
    "variant", ["gamma_first_wsquare_flat_middle", "alphabeta_first_epsilon_conv", "zplus_first_gamma_dense"]
)
@pytest.mark.parametrize("arch", ["vgg11", "vgg13_bn"])
def test_custom_composites_match_zennit(variant, arch):
    """In float64, so that the exactness of the formulas is what is tested: these rules mask by the sign of the
    pre-activation, and in float32 a pre-activation within rounding of zero may take either side."""
    model = make_vgg(arch).double()
    torch.manual_seed(4)
    x = torch.randn(3, 3, 64, 80, dtype=torch.float64)
    ours, zen = _custom_pair(variant, model)
    if arch.endswith("_bn"):
        zen.canonizers = [VGGCanonizer()]
    assert_agree(model, ours, zen, x)


@pytest.mark.parametrize("name", sorted(ZENNIT))
def test_named_composites_exact_in_float64(name):
    """The same formulas as zennit, not only close: float64 agreement to 1e-9."""
    model = make_vgg("vgg11_bn").double()
    x = torch.randn(2, 3, 64, 80, dtype=torch.float64)
    assert_agree(model, name, ZENNIT[name]([VGGCanonizer()]), x)


def test_gamma_without_bias_matches_zennit_where_biases_are_large():
    """Gamma(zero_bias) drops the bias from z but not from o, whose sign picks the term: where a large bias makes
    o > 0 while z < 0, the on-active path (which assumes z >= o) would be wrong, so it is not taken there."""
    model = make_vgg("vgg11").double()
    torch.manual_seed(8)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.bias.data.normal_().mul_(30 * module.weight.abs().mean())
    ours = lrp.Composite({nn.Conv2d: lrp.Gamma(0.25, zero_bias=True), nn.Linear: lrp.Epsilon()})
    zen = NameLayerMapComposite(name_map=[], layer_map=[(Activation, zr.Pass()), (AvgPool, zr.Norm()),
                                                        (Convolution, zr.Gamma(0.25, zero_params=["bias"])),
                                                        (nn.Linear, zr.Epsilon())])
    assert_agree(model, ours, zen, torch.randn(2, 3, 64, 64, dtype=torch.float64))
