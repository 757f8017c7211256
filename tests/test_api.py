"""The public API: shapes, targets, composites by name or mapping, and one clear error per bad input."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import lrp_module as lrp

from .helpers import make_vgg


def test_forward_is_channel_sum_of_explain_for_predicted_class(vgg11, images):
    model = lrp.LRPModel(vgg11, "epsilon_gamma_box")
    logits, relevance = model.explain(images)
    assert logits.shape == (3, 10) and relevance.shape == (3, 3, 64, 64)
    torch.testing.assert_close(model(images), relevance.sum(1))
    predicted = logits.argmax(1)
    torch.testing.assert_close(model(images, target=predicted), model(images))
    torch.testing.assert_close(model(images, target=torch.full((3,), -1)), model(images))


def test_target_selects_class(vgg11, images):
    model = lrp.LRPModel(vgg11, "epsilon_plus")
    a, b = model(images, target=torch.tensor([1, 1, 1])), model(images, target=torch.tensor([2, 2, 2]))
    assert not torch.allclose(a, b)
    torch.testing.assert_close(model(images, target=1), a)  # an int applies to every image


def test_batch_independence(vgg11, images):
    """Each image's map does not depend on its batch neighbours (per-image rms, per-image top-k)."""
    for composite, top_k in [("montavon", 0.0), ("epsilon_gamma_box", 0.05)]:
        model = lrp.LRPModel(make_vgg("vgg16"), composite, top_k=top_k)
        torch.testing.assert_close(model(images)[1:2], model(images[1:2]), rtol=1e-4, atol=1e-6)


def test_every_named_composite_runs_on_every_depth():
    x = torch.randn(2, 3, 32, 48)
    for arch in ["vgg11", "vgg13_bn", "vgg16_bn", "vgg19"]:
        model = make_vgg(arch)
        for name in lrp.COMPOSITES:
            relevance = lrp.LRPModel(model, name)(x)
            assert relevance.shape == (2, 32, 48) and torch.isfinite(relevance).all(), (arch, name)


def test_composite_params_and_rule_table(vgg11):
    model = lrp.LRPModel(vgg11, "epsilon_gamma_box", composite_params={"gamma": 0.5})
    table = dict(model.rule_table())
    assert "ZBox" in table["features.0"] and "gamma=0.5" in table["features.3"]
    assert "Epsilon" in table["classifier.6"] and "WinnerTakesAll" in table["features.2"]


def test_user_composite_by_type_index_and_name(vgg11, images):
    composite = lrp.Composite({nn.Conv2d: lrp.ZPlus(), nn.Linear: lrp.Epsilon(), -1: lrp.Epsilon(0.1),
                               "features.0": lrp.Flat()})
    table = dict(lrp.LRPModel(vgg11, composite).rule_table())
    assert "Flat" in table["features.0"] and "ZPlus" in table["features.3"]
    assert "epsilon=0.1" in table["classifier.6"] and "epsilon=1e-06" in table["classifier.0"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"composite": "nope"}, "unknown composite 'nope'"),
        ({"composite": "epsilon_plus", "composite_params": {"gamma": 1}}, "bad parameters for composite"),
        ({"composite": lrp.Composite({nn.Linear: lrp.Epsilon()})}, "no rule for layer features.0"),
        ({"composite": lrp.Composite({nn.Conv2d: lrp.Epsilon(), nn.Linear: lrp.Epsilon(),
                                      nn.MaxPool2d: lrp.Epsilon()})}, "cannot be used on features.2"),
    ],
)
def test_bad_composites(vgg11, kwargs, match):
    with pytest.raises(ValueError, match=match):
        lrp.LRPModel(vgg11, **kwargs)


def test_bad_rule_parameters():
    with pytest.raises(ValueError, match="alpha - beta = 1"):
        lrp.AlphaBeta(2.0, 2.0)
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        lrp.Gamma(-1.0)
    with pytest.raises(ValueError, match="low <= high"):
        lrp.ZBox(1.0, 0.0)


def test_unknown_layer_is_named():
    model = make_vgg("vgg11")
    model.features[1] = nn.GELU()
    with pytest.raises(ValueError, match=r"unsupported layer features.1 \(GELU\)"):
        lrp.LRPModel(model, "epsilon_plus")
    # a ResNet is explained now (tests/test_resnet.py); a model with other parts still fails, naming the part
    with pytest.raises(ValueError, match=r"unsupported layer features.0.2 \(ReLU6\)"):
        lrp.LRPModel(torchvision.models.mobilenet_v2(), "epsilon_plus")


@pytest.mark.parametrize(
    "x,target,match",
    [
        (torch.randn(3, 64, 64), None, r"must be \(N, 3, H, W\)"),
        (torch.randn(2, 1, 64, 64), None, r"must be \(N, 3, H, W\)"),
        (torch.randn(2, 3, 16, 64), None, "too small"),
        (torch.randn(0, 3, 64, 64), None, "empty"),
        (torch.randn(2, 3, 64, 64).double(), None, "dtype"),
        (torch.randn(2, 3, 64, 64), torch.tensor([1, 2, 3]), "shape"),
        (torch.randn(2, 3, 64, 64), torch.tensor([1.0, 2.0]), "integer class indices"),
        (torch.randn(2, 3, 64, 64), torch.tensor([1, 10]), r"in \[0, 10\)"),
    ],
)
def test_bad_inputs(vgg11, x, target, match):
    with pytest.raises(ValueError, match=match):
        lrp.LRPModel(vgg11, "epsilon_plus").explain(x, target)


def test_model_is_not_modified(vgg11, images):
    before = {k: v.clone() for k, v in vgg11.state_dict().items()}
    logits = vgg11(images)
    lrp.LRPModel(vgg11, "seed").explain(images)
    for key, value in vgg11.state_dict().items():
        assert torch.equal(value, before[key]), key
    torch.testing.assert_close(vgg11(images), logits)


def test_no_autograd_is_used(vgg11, images):
    """Explicit tensor code: nothing records a graph even when the weights require grad."""
    model = lrp.LRPModel(vgg11, "epsilon_gamma_box")
    with torch.enable_grad():
        logits, relevance = model.propagate(images, None)
    assert logits.grad_fn is None and relevance.grad_fn is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(vgg11, images):
    cpu = lrp.LRPModel(vgg11, "epsilon_gamma_box")
    gpu = lrp.LRPModel(vgg11, "epsilon_gamma_box").cuda()
    torch.testing.assert_close(gpu(images.cuda()).cpu(), cpu(images), rtol=1e-3, atol=1e-5)
