"""Concept Relevance Propagation (lrp_module/concepts.py, LRPModel.concept_maps / concept_relevance /
top_concept_maps) is exact: in float64 every concept map and concept relevance equals an independent reference on
zennit 1.0.0 and autograd (tests/crp_zennit_reference.py: the relevance masked at the named modules' outputs as
zennit-crp does, partial backward passes for exclude_parallel) to 1e-9, on a VGG and on ResNets (basic blocks and
bottlenecks), for several composites; the single-channel maps of a layer add up to the map (VGG), and on a ResNet
to the map without what bypasses the layer; float32 stays within the float64 oracle's bound; bad requests fail in
one line. The identities are stated in docs/concepts.md."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from zennit.torchvision import ResNetCanonizer, VGGCanonizer

import lrp_module as lrp
from lrp_module.concepts import ConceptError
from lrp_module.model import ExportableConcepts
from lrp_module.oracle import Float64Oracle, bound

from . import crp_zennit_reference as reference
from .helpers import randomize, relative_error
from .test_resnet import _bias_free, make_resnet
from .test_zennit_agreement import ZENNIT

EXACT = 1e-9  # float64 against the zennit reference, relative to each map's (each image's vector's) max |value|
IDENTITY = 1e-10  # float64 sums of maps from the same engine
COMPOSITES = ["epsilon_gamma_box", "epsilon_plus_flat", "epsilon_alpha2_beta1"]

# Every kind of name a condition takes, several in one call (K = 7): a convolution, the batch norm folded into it
# and the ReLU fused into it, nested conditions on two layers, a container (`features`: its last step), a dense
# layer, and an empty list (keeps nothing).
VGG_CONDITIONS = [{"features.4": [3]}, {"features.5": [0, 7, 9]}, {"features.6": [2, 5]},
                  {"features.22": [1], "features.8": [4, 6]}, {"features": [1, 30]}, {"classifier.0": [12, 45]},
                  {"features.11": []}]
VGG_LAYERS = ["features.4", "features.6", "features.22", "classifier.3", "features"]
# Layers inside residual blocks (a skip connection bypasses them: exclude_parallel matters) and outside (it does
# not): a convolution, a folded batch norm, a container of two steps' block branch (`layer3.0.downsample`), a stage
# (`layer4`), a residual sum with its ReLU, nested conditions across stages, the stem's max pool.
RESNET_CONDITIONS = [{"layer4.1.conv1": [3]}, {"layer3.0.bn2": [3, 7]}, {"layer3.0.downsample": [2, 100]},
                     {"layer4": [1, 2]}, {"layer2.1.add": [4]}, {"layer4.0.conv2": [1], "layer2.0.conv1": [3, 4]},
                     {"maxpool": [7, 8]}]
RESNET_LAYERS = ["layer3.0.conv1", "layer4", "layer2.0.downsample.1", "layer1.1.add", "fc"]


def narrow_vgg11(batch_norm: bool = True, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """torchvision's VGG11 (configuration A, with batch norm) at 1/8 of its widths: the structure of vgg11_bn, a
    zennit reference pass in milliseconds."""
    torch.manual_seed(seed)
    features = torchvision.models.vgg.make_layers([8, "M", 16, "M", 16, 16, "M", 32, 32, "M", 32, 32, "M"],
                                                  batch_norm=batch_norm)
    model = torchvision.models.VGG(features, num_classes=10, init_weights=True)
    model.classifier = nn.Sequential(nn.Linear(32 * 7 * 7, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, 64),
                                     nn.ReLU(True), nn.Dropout(), nn.Linear(64, 10))
    return randomize(model, seed).to(dtype)


@pytest.fixture(scope="module")
def vgg() -> nn.Module:
    return narrow_vgg11()


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    return make_resnet("resnet18")


def _inputs(size: tuple[int, int], seed: int, n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, *size, dtype=torch.float64, generator=generator), torch.tensor([1, 4, 7][:n])


def _assert_maps_equal(ours: torch.Tensor, theirs: torch.Tensor, limit: float = EXACT) -> None:
    """Each (image, condition) map within `limit` of its own max |value|."""
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    error = relative_error(ours.flatten(0, 1), theirs.flatten(0, 1)).reshape(ours.shape[:2])
    assert (error <= limit).all(), f"relative error per image and condition {error.tolist()}"


def _assert_relevance_equal(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(theirs)
    for name in theirs:
        error = relative_error(ours[name], theirs[name])
        assert (error <= EXACT).all(), f"{name}: relative error per image {error.tolist()}"


# ------------------------------------------------------------------------------------------- float64 agreement
@pytest.mark.parametrize("name", COMPOSITES)
def test_vgg_concepts_equal_the_zennit_reference(vgg, name):
    x, target = _inputs((64, 64), 1)
    engine, composite = lrp.LRPModel(vgg, name), ZENNIT[name]([VGGCanonizer()])
    theirs = reference.concept_maps(vgg, composite, x, target, VGG_CONDITIONS)
    _assert_maps_equal(engine.concept_maps(x, target, VGG_CONDITIONS), theirs)
    # on a chain nothing bypasses a layer: exclude_parallel changes nothing
    _assert_maps_equal(engine.concept_maps(x, target, VGG_CONDITIONS, exclude_parallel=False), theirs)
    # every channel of the map, not only their sum, for the nested condition
    full = engine.concept_maps(x, target, VGG_CONDITIONS[3:4], channel_sum=False)[:, 0]
    assert (relative_error(full, reference.conditional_relevance(vgg, composite, x, target, VGG_CONDITIONS[3]))
            <= EXACT).all()
    assert (theirs[:, -1] == 0).all() and (theirs[:, :-1].flatten(2).abs().amax(2) > 0).all()

    logits, relevance, found = engine.explain_concepts(x, target, VGG_LAYERS)
    unconditional, expected = reference.layer_relevance(vgg, composite, x, target, VGG_LAYERS)
    _assert_relevance_equal(found, expected)
    assert (relative_error(relevance, unconditional) <= EXACT).all()
    torch.testing.assert_close(relevance, engine.explain(x, target)[1], rtol=0, atol=0)
    normalised = engine.concept_relevance(x, target, VGG_LAYERS, normalised=True)
    _assert_relevance_equal(normalised, {k: v / (v.abs().sum(1, keepdim=True) + 1e-10) for k, v in expected.items()})


@pytest.mark.parametrize("name,exclude_parallel", [("epsilon_gamma_box", True), ("epsilon_gamma_box", False),
                                                   ("epsilon_plus_flat", True), ("epsilon_alpha2_beta1", False)])
def test_resnet18_concepts_equal_the_zennit_reference(resnet18, name, exclude_parallel):
    """All K conditions in one call, each naming other layers: exclude_parallel drops what bypasses a layer only
    in the conditions that name it, as zennit-crp's separate passes per set of layer names do."""
    x, target = _inputs((32, 32), 2)
    engine, composite = lrp.LRPModel(resnet18, name), ZENNIT[name]([ResNetCanonizer()])
    ours = engine.concept_maps(x, target, RESNET_CONDITIONS, exclude_parallel=exclude_parallel)
    _assert_maps_equal(ours, reference.concept_maps(resnet18, composite, x, target, RESNET_CONDITIONS,
                                                    exclude_parallel))
    if name != "epsilon_gamma_box" or exclude_parallel:
        _, expected = reference.layer_relevance(resnet18, composite, x, target, RESNET_LAYERS)
        _assert_relevance_equal(engine.concept_relevance(x, target, RESNET_LAYERS), expected)


def test_exclude_parallel_differs_exactly_where_a_skip_connection_bypasses_the_layer(resnet18):
    x, target = _inputs((32, 32), 2)
    engine = lrp.LRPModel(resnet18, "epsilon_gamma_box")
    excluded = engine.concept_maps(x, target, RESNET_CONDITIONS, exclude_parallel=True)
    kept = engine.concept_maps(x, target, RESNET_CONDITIONS, exclude_parallel=False)
    differs = relative_error(excluded.flatten(0, 1), kept.flatten(0, 1)).reshape(excluded.shape[:2]) > 1e-3
    # inside a block (conv, batch norm, downsample branch, nested): bypassed; a stage's or a sum's output, the stem
    bypassed = torch.tensor([True, True, True, False, False, True, False])
    assert (differs == bypassed).all(), differs.tolist()


def test_resnet50_bottlenecks_equal_the_zennit_reference():
    """Bottleneck blocks (conv3, the downsample's convolution), both exclude_parallel settings, one composite."""
    model = make_resnet("resnet50")
    x, target = _inputs((32, 32), 3, n=1)
    conditions = [{"layer3.0.conv3": [5]}, {"layer4.2.conv2": [1], "layer4.0.downsample.0": [3, 9]}]
    engine, composite = lrp.LRPModel(model, "epsilon_gamma_box"), ZENNIT["epsilon_gamma_box"]([ResNetCanonizer()])
    for exclude_parallel in (True, False):
        _assert_maps_equal(engine.concept_maps(x, target, conditions, exclude_parallel=exclude_parallel),
                           reference.concept_maps(model, composite, x, target, conditions, exclude_parallel))


def test_per_image_conditions_equal_the_zennit_reference(vgg, resnet18):
    """N lists of K conditions (each image its own channels and layers), in batches smaller than N x K."""
    x, target = _inputs((64, 64), 4)
    conditions = [[{"features.8": [1]}, {"features.15": [0, 3]}, {"classifier.0": [9]}],
                  [{"features.8": [5]}, {"features.22": [2], "features.8": [0]}, {"features.15": [31]}]]
    engine, composite = lrp.LRPModel(vgg, "epsilon_plus_flat"), ZENNIT["epsilon_plus_flat"]([VGGCanonizer()])
    _assert_maps_equal(engine.concept_maps(x, target, conditions, batch_size=4),
                       reference.concept_maps(vgg, composite, x, target, conditions))

    x, target = _inputs((32, 32), 5)
    conditions = [[{"layer3.1.conv1": [1]}, {"layer4": [2]}], [{"layer4": [7]}, {"layer3.1.conv1": [4, 5]}]]
    engine, composite = lrp.LRPModel(resnet18, "epsilon_gamma_box"), ZENNIT["epsilon_gamma_box"]([ResNetCanonizer()])
    _assert_maps_equal(engine.concept_maps(x, target, conditions), reference.concept_maps(resnet18, composite, x,
                                                                                          target, conditions))


def test_names_resolve_to_the_step_whose_output_they_are(vgg, resnet18):
    """A batch norm and a ReLU folded into a convolution name its step; a container its last step."""
    layers = lrp.LRPModel(vgg, "epsilon_gamma_box").concept_layers
    assert layers["features.4"].step == layers["features.5"].step == layers["features.6"].step
    assert layers["features"].step == layers["features.28"].step and layers["features"].channels == 32
    layers = lrp.LRPModel(resnet18, "epsilon_gamma_box").concept_layers
    assert layers["layer4"].step == layers["layer4.1"].step == layers["layer4.1.add"].step
    assert layers["layer3.0.downsample"].step == layers["layer3.0.downsample.1"].step \
        == layers["layer3.0.downsample.0"].step
    assert "layer1.0.relu" not in layers  # called twice in a block: no single output


# ----------------------------------------------------------------------------------------------- completeness
def test_vgg_single_channel_maps_add_up_to_the_map(vgg):
    """Every rule is linear in the relevance it receives: the C one-channel maps of a layer sum to the map."""
    x, target = _inputs((64, 64), 6)
    engine = lrp.LRPModel(vgg, "epsilon_gamma_box")
    _, full = engine.explain(x, target)
    for layer in ("features.8", "classifier.0"):
        channels = engine.concept_layers[layer].channels
        maps = engine.concept_maps(x, target, [{layer: [c]} for c in range(channels)], channel_sum=False)
        assert (relative_error(maps.sum(1), full) <= IDENTITY).all(), layer


def test_vgg_concept_relevance_adds_up_to_what_reaches_the_layer(vgg):
    """Without biases, with LRP-0 / z+ (which conserve) on a non-negative input: the concept relevances of a layer
    sum to the target logit (all relevance reaches the layer), and each one-channel map sums to its channel's
    concept relevance (all of it reaches the input)."""
    model = _bias_free(narrow_vgg11())
    composite = lrp.Composite({nn.Conv2d: lrp.ZPlus(0.0), nn.Linear: lrp.Epsilon(0.0),
                               nn.AdaptiveAvgPool2d: lrp.Norm(0.0)})
    engine = lrp.LRPModel(model, composite)
    x, target = _inputs((64, 64), 7)
    x = x.abs()
    logits, _, found = engine.explain_concepts(x, target, ["features.15", "classifier.3"])
    expected = logits.gather(1, target[:, None])
    for name, relevance in found.items():
        torch.testing.assert_close(relevance.sum(1, keepdim=True), expected, rtol=IDENTITY, atol=0, msg=name)
    maps = engine.concept_maps(x, target, [{"features.15": [c]} for c in range(32)])
    torch.testing.assert_close(maps.sum((2, 3)), found["features.15"], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("layer", ["layer1.1.conv1", "layer2.0.bn2"])
def test_resnet_identity(resnet18, layer):
    """The ResNet identity (docs/concepts.md): with exclude_parallel the one-channel maps sum to the map of all
    that passes through the layer, M({L: all}); M({L: []}) with exclude_parallel=False is what bypasses it; the
    two add up to the map. Without exclude_parallel the one-channel maps sum to M + (C - 1) M({L: []})."""
    x, target = _inputs((32, 32), 8, n=1)
    engine = lrp.LRPModel(resnet18, "epsilon_gamma_box")
    _, full = engine.explain(x, target)
    channels = engine.concept_layers[layer].channels
    singles = [{layer: [c]} for c in range(channels)]
    through = engine.concept_maps(x, target, [{layer: list(range(channels))}], channel_sum=False)[:, 0]
    bypass = engine.concept_maps(x, target, [{layer: []}], exclude_parallel=False, channel_sum=False)[:, 0]
    excluded = engine.concept_maps(x, target, singles, channel_sum=False).sum(1)
    kept = engine.concept_maps(x, target, singles, exclude_parallel=False, channel_sum=False).sum(1)
    assert (relative_error(bypass, full) > 1e-2).all() and (relative_error(through, full) > 1e-2).all()
    assert (relative_error(excluded, through) <= IDENTITY).all()
    assert (relative_error(through + bypass, full) <= IDENTITY).all()
    assert (relative_error(kept, full + (channels - 1) * bypass) <= IDENTITY).all()


# --------------------------------------------------------------------------------------------- top-K concepts
@pytest.mark.parametrize("arch,layer,exclude_parallel", [("vgg", "features.15", True),
                                                        ("resnet18", "layer3.1.conv1", True),
                                                        ("resnet18", "layer3.1.conv1", False)])
def test_top_concept_maps_are_the_map_and_each_images_own_concept_maps(vgg, resnet18, arch, layer,
                                                                       exclude_parallel):
    model = vgg if arch == "vgg" else resnet18
    x, target = _inputs((64, 64) if arch == "vgg" else (32, 32), 9, n=3)
    engine = lrp.LRPModel(model, "epsilon_gamma_box")
    top = engine.top_concept_maps(x, target, layer, k=3, exclude_parallel=exclude_parallel)
    logits, full = engine.explain(x, target)
    torch.testing.assert_close(top.logits, logits, rtol=0, atol=0)
    assert (relative_error(top.relevance, full) <= IDENTITY).all()
    relevance = engine.concept_relevance(x, target, [layer])[layer]
    torch.testing.assert_close(top.concept_relevance[0], relevance, rtol=1e-12, atol=0)
    assert top.channels.tolist() == relevance.topk(3, dim=1).indices.tolist()
    own = [[{layer: [c]} for c in row] for row in top.channels.tolist()]
    expected = engine.concept_maps(x, target, own, exclude_parallel=exclude_parallel, channel_sum=False)
    _assert_maps_equal(top.maps, expected, IDENTITY)


@pytest.mark.parametrize("arch", ["vgg", "resnet18"])
def test_exportable_concepts_trace_as_eager(vgg, resnet18, arch):
    """ExportableConcepts under torch.jit.trace gives what it gives eagerly, with a recorded layer below the maps'
    layer (its relevance is the unconditional one, not the N x K conditional rows) and one above it."""
    model = vgg if arch == "vgg" else resnet18
    layers, maps_layer = (["features.4", "features.15", "classifier.0"], "features.15") if arch == "vgg" else \
        (["layer1.1", "layer3.0.conv2", "layer4"], "layer3.0.conv2")
    x, target = _inputs((64, 64) if arch == "vgg" else (32, 32), 10, n=3)
    engine = lrp.LRPModel(model, "epsilon_gamma_box")
    module = ExportableConcepts(engine, layers, maps_layer, k=2)
    with torch.inference_mode():
        eager = module(x, target)
    traced = torch.jit.trace(module, (x, target), check_trace=False)
    with torch.inference_mode():
        replayed = traced(x, target)
    for got, expected in zip(replayed, eager):
        if isinstance(expected, tuple):
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e, rtol=1e-12, atol=0)
        else:
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    found = engine.concept_relevance(x, target, layers)
    for name, relevance in zip(layers, eager.concept_relevance):
        torch.testing.assert_close(relevance, found[name], rtol=1e-12, atol=0, msg=name)


# ------------------------------------------------------------------------------------------------- bad input
def _one_line_error(call, *words: str) -> None:
    with pytest.raises(ConceptError) as caught:
        call()
    message = str(caught.value)
    assert isinstance(caught.value, ValueError) and "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_bad_requests_fail_in_one_line_naming_the_culprit(vgg, resnet18):
    engine = lrp.LRPModel(vgg, "epsilon_gamma_box")
    x, target = _inputs((64, 64), 11)
    _one_line_error(lambda: engine.concept_maps(x, target, [{"features.99": [0]}]),
                    "'features.99'", "features.0", "classifier.6")
    _one_line_error(lambda: engine.concept_relevance(x, target, ["classifier.9"]), "'classifier.9'", "features.4")
    _one_line_error(lambda: engine.concept_maps(x, target, [{"features.4": [16]}]), "features.4", "channel 16",
                    "16 channels")
    _one_line_error(lambda: engine.concept_maps(x, target, [{"features.4": [-1]}]), "channel -1")
    for empty in ([], {}, {"features.4": [0]}):
        _one_line_error(lambda empty=empty: engine.concept_maps(x, target, empty), "non-empty")
    _one_line_error(lambda: engine.concept_maps(x, target, [{}]), "non-empty")
    _one_line_error(lambda: engine.concept_relevance(x, target, []), "non-empty")
    for bad in (1.0, "3", True, None):
        _one_line_error(lambda bad=bad: engine.concept_maps(x, target, [{"features.4": [bad]}]), "integers",
                        repr(bad))
    _one_line_error(lambda: engine.concept_maps(x, target, [[{"features.4": [0]}]]), "1 lists for 2 images")
    _one_line_error(lambda: engine.concept_maps(x, target, [[{"features.4": [0]}], []]), "same number")
    for k in (0, 17, True, 2.0):
        _one_line_error(lambda k=k: engine.top_concept_maps(x, target, "features.4", k=k), "k must be", "[1, 16]")
    _one_line_error(lambda: engine.top_concept_maps(x, target, "nope", k=1), "'nope'")
    _one_line_error(lambda: lrp.LRPModel(resnet18, "epsilon_gamma_box").concept_maps(
        x[:, :, :48, :48], target, [{"layer1.0.relu": [0]}]), "'layer1.0.relu'", "layer1.0.conv1")


# ------------------------------------------------------------------------------------ float32 against float64
@pytest.mark.precision
@pytest.mark.parametrize("arch", ["vgg11", "resnet18"])
def test_float32_concepts_within_the_oracle_bound(arch):
    """float32 concept maps (the N x K pass below the layer, denominators shared per image) and concept relevance
    against the float64 oracle, within the bound derived from eager float32's own distance (lrp_module/oracle.py)
    on this kernel path; `make test-precision` reruns it under the others."""
    model = narrow_vgg11(batch_norm=False, dtype=torch.float32) if arch == "vgg11" else \
        make_resnet("resnet18", dtype=torch.float32)
    layer, nested = ("features.11", {"features.11": [0, 1], "features.3": [2]}) if arch == "vgg11" else \
        ("layer3.1.conv1", {"layer3.1.conv1": [0, 1], "layer2.0": [2]})
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(12))
    target = torch.tensor([2, 5])
    single, exact = lrp.LRPModel(model, "epsilon_gamma_box"), Float64Oracle(model, "epsilon_gamma_box").lrp
    _, relevance, found = single.explain_concepts(x, target, [layer])
    _, reference_map, reference_found = exact.explain_concepts(x.double(), target, [layer])
    limit = bound(relative_error(relevance.double(), reference_map).max())
    assert (relative_error(found[layer].double(), reference_found[layer]) <= limit).all()
    # each image's three most relevant channels, and a nested condition, in both float32 and float64
    top = reference_found[layer].topk(3, dim=1).indices.tolist()
    conditions = [[{layer: [c]} for c in row] + [nested] for row in top]
    for exclude_parallel in (True, False) if arch == "resnet18" else (True,):
        ours = single.concept_maps(x, target, conditions, exclude_parallel=exclude_parallel)
        expected = exact.concept_maps(x.double(), target, conditions, exclude_parallel=exclude_parallel)
        _assert_maps_equal(ours.double(), expected, limit)
