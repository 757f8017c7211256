"""LRPModel.refresh (a model's layers changed in place: the steps that read them rebuilt, nothing else) and
LRPModel.record / explain_from (the forward below a changed layer reused): bit for bit what a fresh LRPModel of the
changed model holds and computes, in float64, for VGGs with and without batch norm and a ResNet."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lrp_module import LRPModel

from .helpers import make_tiny_vgg
from .test_resnet import make_resnet

COMPOSITES = ("epsilon_gamma_box", "epsilon_alpha2_beta1", "epsilon_plus_flat")
MODELS = {
    "vgg": lambda: make_tiny_vgg().double(),
    "vgg_bn": lambda: make_tiny_vgg(batch_norm=True).double(),
    "resnet18": lambda: make_resnet("resnet18"),
}
# layers reset in each model: the first convolution (z^B / flat), middle ones, a batch norm (folded into the
# convolution before it), the last convolution and dense layers
CHANGED = {
    "vgg": ["features.0", "features.6", "classifier.3"],
    "vgg_bn": ["features.1", "features.4", "features.12", "classifier.0"],
    "resnet18": ["conv1", "bn1", "layer2.0.downsample.1", "layer3.1.conv2", "fc"],
}


def _reset(model: nn.Module, names: list[str], seed: int = 5) -> None:
    """Re-initialise the named modules in place, as the parameter randomisation test does."""
    modules = dict(model.named_modules())
    torch.manual_seed(seed)
    for name in names:
        modules[name].reset_parameters()  # in place: the dtype stays float64


def _inputs(n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 32, 32, generator=generator, dtype=torch.float64), torch.tensor([1, 7])


def assert_same_engine(refreshed: LRPModel, fresh: LRPModel) -> None:
    """Every tensor the two engines hold (weights, folded batch norms, the rules' precomputed weights) equal bit
    for bit, and each step bound to the same path of the same rule."""
    ours, theirs = dict(refreshed.named_buffers()), dict(fresh.named_buffers())
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert tensor.dtype == theirs[name].dtype and torch.equal(tensor, theirs[name]), name
    assert [type(getattr(s, "rule", None)) for s in refreshed.steps] == \
        [type(getattr(s, "rule", None)) for s in fresh.steps]


@pytest.mark.parametrize("share", [True, False], ids=["shared", "copied"])
@pytest.mark.parametrize("composite", COMPOSITES)
@pytest.mark.parametrize("arch", MODELS)
def test_refreshed_model_equals_a_fresh_build(arch, composite, share):
    """Layers reset one after the other, each followed by refresh: the engine holds what a fresh build over the
    changed model holds and explains as it does; without the refresh it would not (the rules' weights are stale)."""
    model = MODELS[arch]()
    x, target = _inputs()
    lrp = LRPModel(model, composite, share_weights=share)
    stale = LRPModel(model, composite, share_weights=share)
    for name in CHANGED[arch]:
        _reset(model, [name])
        assert lrp.refresh(model, [name]), name
    fresh = LRPModel(model, composite, share_weights=share)
    assert_same_engine(lrp, fresh)
    assert torch.equal(lrp.explain(x, target)[1], fresh.explain(x, target)[1])
    assert not torch.equal(stale.explain(x, target)[1], fresh.explain(x, target)[1])


@pytest.mark.parametrize("composite", COMPOSITES)
@pytest.mark.parametrize("arch", MODELS)
def test_explain_from_reuses_the_forward_below_the_changed_layers(arch, composite):
    """record + explain_from on the unchanged model is explain; after the top layers are reset and refreshed, the
    forward of the original model below them gives the changed model's map bit for bit, and stays reusable."""
    model = MODELS[arch]()
    x, target = _inputs()
    lrp = LRPModel(model, composite, share_weights=True)
    forward = lrp.record(x)
    logits, relevance = lrp.explain_from(forward, target)
    expected = lrp.explain(x, target)
    assert torch.equal(logits, expected[0]) and torch.equal(relevance, expected[1])
    top = [name for name in CHANGED[arch] if name not in ("features.0", "features.1", "conv1", "bn1")]  # above
    _reset(model, top)
    lrp.refresh(model, top)
    start = lrp.first_step_reading(top)
    assert 0 < start < len(lrp.steps)
    fresh = LRPModel(model, composite, share_weights=True).explain(x, target)
    for _ in range(2):
        logits, relevance = lrp.explain_from(forward, target, start)
        assert torch.equal(logits, fresh[0]) and torch.equal(relevance, fresh[1])
    assert not torch.equal(lrp.explain_from(forward, target)[1], fresh[1])  # the stale upper forward matters


def test_refresh_and_explain_from_refuse_what_does_not_fit():
    """A module the model lacks, a layer of another shape, a start outside the steps: one clear error each."""
    model = make_tiny_vgg().double()
    lrp = LRPModel(model, "epsilon_gamma_box")
    with pytest.raises(ValueError, match="no module 'features.99'"):
        lrp.refresh(model, ["features.99"])
    other = make_tiny_vgg(num_classes=3).double()
    with pytest.raises(ValueError, match="classifier.6 is not the layer"):
        lrp.refresh(other, ["classifier.6"])
    assert lrp.refresh(model, ["features.2"]) == []  # a pooling: no step reads weights from it
    forward = lrp.record(_inputs()[0])
    with pytest.raises(ValueError, match="start must be in"):
        lrp.explain_from(forward, None, len(lrp.steps) + 1)
