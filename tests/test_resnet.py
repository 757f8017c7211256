"""The graph engine beyond VGG: torchvision ResNets / ResNeXt and user models equal zennit 1.0.0 (ResNetCanonizer) in
float64 to 1e-9; float32 stays within a measured bound of float64; conservation; the fast paths the engine proves;
one-line errors for what it does not cover."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from zennit import rules as zr
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import NameLayerMapComposite
from zennit.layer import Sum as ZennitSum
from zennit.torchvision import ResNetCanonizer
from zennit.types import Activation, AvgPool, Convolution

import lrp_module as lrp
from lrp_module import rules
from lrp_module.zoo import RESNET_NAMES

from .helpers import randomize, relative_error, sampled_matrix
from .test_zennit_agreement import ZENNIT, assert_agree


def make_resnet(arch: str, num_classes: int = 10, seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return randomize(getattr(torchvision.models, arch)(num_classes=num_classes), seed).to(dtype)


@pytest.fixture(scope="module")
def resnets():
    """One randomised model per architecture for the module (building resnet50 in float64 takes a while)."""
    cache: dict[str, nn.Module] = {}

    def get(arch: str) -> nn.Module:
        if arch not in cache:
            cache[arch] = make_resnet(arch)
        return cache[arch]
    return get


CASES = [("resnet18", (64, 64), 2), ("resnet18", (48, 80), 2), ("resnet50", (48, 80), 1),
         ("resnext50_32x4d", (64, 64), 1)]


@pytest.mark.timeout(900)  # float64 convolutions have no fast CPU kernels; resnext50 took > 300 s on a loaded machine
@pytest.mark.parametrize("arch,size,batch,name", sampled_matrix(sorted(ZENNIT), CASES,
                                                                [f"{a}-{h}x{w}" for a, (h, w), _ in CASES]))
def test_resnets_match_zennit_in_float64(resnets, arch, size, batch, name):
    """Batch norm folded, residual sums as zennit's Sum with Norm, grouped convolutions (ResNeXt), overlapping
    padded max pooling, the first conv's box / flat rule: the same numbers as zennit to 1e-9. Every composite and
    every architecture and size by default; all their pairs with --full (tests/conftest.py)."""
    torch.manual_seed(5)
    x = torch.randn(batch, 3, *size, dtype=torch.float64)
    assert_agree(resnets(arch), name, ZENNIT[name]([ResNetCanonizer()]), x)


def _paths(engine: lrp.LRPModel) -> dict[str, type]:
    """The path each step's rule took, by step name."""
    return {step.name: type(step.rule) for step in engine.steps if getattr(step, "rule", None) is not None}


def test_fast_paths_are_the_ones_the_graph_proves():
    """conv1/conv2 of a block (ReLU after, relevance only where it fired) and the sum + ReLU take the on-active
    paths; conv3 and the downsample feed the sum without a ReLU of their own: input >= 0 only (gamma from the
    output); the first conv has the one z^B path."""
    paths = _paths(lrp.LRPModel(make_resnet("resnet50", dtype=torch.float32), "epsilon_gamma_box"))
    for name in ("layer2.0.conv1", "layer2.0.conv2", "layer4.2.conv1"):
        assert paths[name] is rules.GammaOnActive, name
    for name in ("layer2.0.conv3", "layer2.0.downsample.0", "layer4.2.conv3"):
        assert paths[name] is rules.GammaFromOutput, name
    assert paths["layer2.0.add"] is paths["layer4.2.add"] is rules.SumNormOnActive
    assert paths["conv1"] is rules.ZBoxGeneral and paths["fc"] is rules.EpsilonFromForward


def test_a_rule_that_ignores_its_input_turns_the_fast_paths_below_off():
    """Flat on layer2.0.conv1 gives relevance where its input (layer1's output) is zero: the sum + ReLU before it
    must use the stored pre-activation, and the result still equals zennit's."""
    model = make_resnet("resnet18")
    ours = lrp.Composite({"layer2.0.conv1": lrp.Flat(), "layer3.1.conv2": lrp.WSquare(), nn.Conv2d: lrp.Gamma(0.25),
                          nn.Linear: lrp.Epsilon()})
    paths = _paths(lrp.LRPModel(model, ours))
    assert paths["layer1.1.add"] is rules.SumNormGeneral
    assert paths["layer3.1.conv1"] is rules.GammaFromOutput and paths["layer2.1.add"] is rules.SumNormOnActive
    zen = NameLayerMapComposite(
        name_map=[(["layer2.0.conv1"], zr.Flat()), (["layer3.1.conv2"], zr.WSquare())],
        layer_map=[(Activation, zr.Pass()), (ZennitSum, zr.Norm()), (AvgPool, zr.Norm()),
                   (Convolution, zr.Gamma(0.25)), (nn.Linear, zr.Epsilon())],
        canonizers=[ResNetCanonizer()],
    )
    torch.manual_seed(6)
    assert_agree(model, ours, zen, torch.randn(2, 3, 64, 64, dtype=torch.float64))


class UserNet(nn.Module):
    """A user model from the supported parts: conv + BN + ReLU, padded max pool, overlapping average pool, two
    branches concatenated, a residual sum, dropout, adaptive pool, flatten, linear. `zennit=True` writes the sum
    as zennit's Sum module (what its canonizers do for ResNets), with the same weights."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.zennit = False
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, padding=1))
        self.left = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(8, 4, 1, groups=2), nn.ReLU(), nn.AvgPool2d(3, 1, padding=1))
        self.mix = nn.Conv2d(10, 8, 3, stride=2, padding=1)
        self.down = nn.Conv2d(8, 8, 1, stride=2)
        self.sum = ZennitSum()
        self.relu = nn.ReLU()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(0.3), nn.Linear(32, 16),
                                  nn.ReLU(), nn.Linear(16, num_classes))

    def forward(self, x):
        x = self.stem(x)
        y = self.mix(torch.cat([self.left(x), self.right(x)], dim=1))
        identity = self.down(x)
        y = self.sum(torch.stack([identity, y], dim=-1)) if self.zennit else identity + y
        return self.head(self.relu(y))


def _user_composites():
    ours = lrp.Composite({nn.Conv2d: lrp.AlphaBeta(2.0, 1.0), nn.Linear: lrp.Epsilon(1e-3), "stem.0": lrp.Flat(),
                          "right.0": lrp.Gamma(0.5)})
    zen = NameLayerMapComposite(
        name_map=[(["stem.0"], zr.Flat()), (["right.0"], zr.Gamma(0.5))],
        layer_map=[(Activation, zr.Pass()), (ZennitSum, zr.Norm()), (AvgPool, zr.Norm()),
                   (Convolution, zr.AlphaBeta(2.0, 1.0)), (nn.Linear, zr.Epsilon(1e-3))],
        canonizers=[SequentialMergeBatchNorm()],
    )
    return ours, zen


@pytest.mark.parametrize("size", [(32, 32), (40, 56)], ids=["32x32", "40x56"])
def test_user_model_matches_zennit_in_float64(size):
    model = randomize(UserNet()).double()
    ours, zen = _user_composites()
    engine = lrp.LRPModel(model, ours)
    torch.manual_seed(7)
    x = torch.randn(3, 3, *size, dtype=torch.float64)
    logits, relevance = engine.explain(x)
    model.zennit = True
    from .test_zennit_agreement import zennit_relevance

    reference_logits, reference = zennit_relevance(model, zen, x)
    torch.testing.assert_close(logits, reference_logits)
    assert (relative_error(relevance, reference) <= 1e-9).all()


# Measured (resnet18 / resnet50, random weights, randomised batch norm, 48x80, the images below) with this machine's
# AVX-512 kernels and under ONEDNN_MAX_CPU_ISA=AVX2 and =SSE41: worst image 2.1e-4 of its max |relevance|
# (epsilon_plus_flat, resnet18, AVX2), 1.2e-4 (epsilon_gamma_box), 3.9e-4 (epsilon_alpha2_beta1); bound 5x above.
FLOAT32_BOUND = {"epsilon_plus_flat": 2e-3, "epsilon_gamma_box": 2e-3}


@pytest.mark.precision
@pytest.mark.parametrize("name", sorted(FLOAT32_BOUND))
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_float32_against_the_float64_oracle(resnets, arch, name):
    """The float64 model is the oracle (float32 LRP on random weights is ill-conditioned): float32 maps stay within
    a bound measured under the AVX-512, AVX2 and SSE4.1 kernels."""
    exact = resnets(arch)
    torch.manual_seed(8)
    x = torch.randn(2, 3, 48, 80, dtype=torch.float64)
    _, reference = lrp.LRPModel(exact, name).explain(x)
    single = make_resnet(arch, dtype=torch.float32)
    _, relevance = lrp.LRPModel(single, name).explain(x.float())
    error = relative_error(relevance.double(), reference)
    assert (error <= FLOAT32_BOUND[name]).all(), error.tolist()


def _bias_free(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
                module.bias.zero_()
            if isinstance(module, nn.BatchNorm2d):  # folded bias = beta - mean * scale: make it zero
                module.bias.copy_(module.running_mean * module.weight / (module.running_var + module.eps).sqrt())
    return model


@pytest.mark.parametrize("rule", ["lrp0", "zplus"])
def test_resnet_conserves_where_the_rules_do(rule):
    """No biases, LRP-0 or z+ on the layers and Norm without stabiliser on the sums and the pool: every image's
    relevance sums to its target logit, through every residual sum and fan-out."""
    model = _bias_free(make_resnet("resnet18"))
    make = (lambda: lrp.Epsilon(0.0)) if rule == "lrp0" else (lambda: lrp.ZPlus(0.0))
    composite = lrp.Composite({nn.Conv2d: make(), nn.Linear: make(), lrp.Sum: lrp.Norm(0.0),
                               nn.AdaptiveAvgPool2d: lrp.Norm(0.0)})
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64).abs()  # z+ conserves for a non-negative input
    target = torch.tensor([1, 7])
    logits, relevance = lrp.LRPModel(model, composite).explain(x, target)
    expected = logits.gather(1, target[:, None]).squeeze(1)
    torch.testing.assert_close(relevance.sum(dim=(1, 2, 3)), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("arch", [a for a in RESNET_NAMES if a not in ("resnet18", "resnet50", "resnext50_32x4d")])
def test_every_listed_resnet_conserves(arch):
    """The listed architectures the zennit tests do not cover (deeper stacks of the same blocks, wide bottlenecks)
    through the same engine: LRP-0 without biases conserves the target logit exactly, in float64."""
    model = _bias_free(make_resnet(arch))
    composite = lrp.Composite({nn.Conv2d: lrp.Epsilon(0.0), nn.Linear: lrp.Epsilon(0.0), lrp.Sum: lrp.Norm(0.0),
                               nn.AdaptiveAvgPool2d: lrp.Norm(0.0)})
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    logits, relevance = lrp.LRPModel(model, composite).explain(x, torch.tensor([3]))
    torch.testing.assert_close(relevance.sum(), logits[0, 3], rtol=1e-9, atol=1e-12)


def test_resnet_names_indices_and_types_in_composites():
    model = make_resnet("resnet18", dtype=torch.float32)
    composite = lrp.Composite({nn.Conv2d: lrp.ZPlus(), nn.Linear: lrp.Epsilon(), -1: lrp.Epsilon(0.1),
                               "layer1.0.add": lrp.Norm(1e-3), lrp.Sum: lrp.Norm(1e-2), "conv1": lrp.Flat()})
    table = dict(lrp.LRPModel(model, composite).rule_table())
    assert "Flat" in table["conv1"] and "ZPlus" in table["layer4.1.conv2"] and "epsilon=0.1" in table["fc"]
    assert "0.001" in table["layer1.0.add"] and "0.01" in table["layer3.0.add"]
    assert "WinnerTakesAll" in table["maxpool"] and "Norm" in table["avgpool"]


class _Mul(nn.Module):
    def forward(self, x):
        return x * 2


class _BranchOnData(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x) if x.sum() > 0 else self.conv(-x)


@pytest.mark.parametrize("build,match", [
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.Flatten(), nn.Linear(4, 2)),
     r"^unsupported layer 1 \(GELU\)"),
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), _Mul(), nn.Flatten(), nn.Linear(4, 2)),
     r"^unsupported operation mul in 1 \(node mul\)"),
    (lambda: nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2)),
     r"^batch norm 0 does not directly follow"),
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2, ceil_mode=True), nn.Flatten(), nn.Linear(4, 2)),
     r"^layer 1: pooling with ceil_mode=True is not supported"),
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding_mode="reflect", padding=1), nn.Flatten(), nn.Linear(4, 2)),
     r"^layer 0: only explicit zero padding"),
    (_BranchOnData, r"^cannot capture _BranchOnData with torch.fx"),
    (lambda: torchvision.models.densenet121(),
     r"^(batch norm features.denseblock1.denselayer1.norm1 does not directly follow|cannot capture DenseNet)"),
])
def test_unsupported_parts_fail_at_construction_in_one_line(build, match):
    with pytest.raises(ValueError, match=match) as error:
        lrp.LRPModel(build(), "epsilon_plus")
    assert "\n" not in str(error.value)


@pytest.mark.timeout(900)  # three exporters and three fresh processes on a shared 2-core machine
def test_resnet18_exports_to_every_format_and_runs_fresh(tmp_path):
    """TorchScript, ONNX (onnxruntime) and torch.export of the LRP ResNet at 64x64, each verified in a fresh
    process without this project, then run at another batch size against eager LRP."""
    import numpy as np

    from export import ExportConfig, load_artifact
    from export.artifacts import FILENAMES, write_artifacts
    from lrp_module.zoo import WeightsInfo

    source = make_resnet("resnet18", dtype=torch.float32)
    engine = lrp.LRPModel(source, "epsilon_gamma_box", top_k=0.1)
    config = ExportConfig(model="resnet18", weights="random", top_k=0.1, height=64, width=64,
                          formats=tuple(FILENAMES))
    record = write_artifacts(engine, WeightsInfo("resnet18", "random", "tests"), config, tmp_path, source=source)
    assert all(check["ok"] for check in record["verification"].values()), record["verification"]
    x, target = torch.randn(3, 3, 64, 64), torch.tensor([-1, 2, 5])
    eager_logits, eager = engine.explain(x, target)
    for name in record["artifacts"].values():
        logits, relevance = load_artifact(tmp_path / name)(x.numpy(), target.numpy())
        np.testing.assert_allclose(logits, eager_logits.numpy(), rtol=1e-4, atol=1e-5)
        assert np.abs(relevance - eager.sum(1).numpy()).max() <= 1e-4 * np.abs(eager.sum(1).numpy()).max(), name


def test_build_model_resnets(tmp_path):
    """ResNets by name: random (loud), a state-dict file (classes read from fc), the hub-cache path named."""
    from lrp_module import zoo

    with pytest.warns(UserWarning, match="RANDOM weights"):
        model, info = zoo.build_model("resnet18", "random", num_classes=4, seed=1)
    assert info.is_random and model.fc.out_features == 4 and not model.training
    path = tmp_path / "r18.pt"
    torch.save(model.state_dict(), path)
    loaded, info = zoo.build_model("resnet18", path)
    assert info.kind == "file" and loaded.fc.out_features == 4
    assert torch.equal(loaded.layer1[0].conv1.weight, model.layer1[0].conv1.weight)
    with pytest.raises(zoo.WeightsError, match="do not match resnet34"):
        zoo.build_model("resnet34", path)
    assert zoo.hub_checkpoint_path("resnext50_32x4d").name.startswith("resnext50_32x4d-")
    assert set(zoo.RESNET_NAMES) <= set(zoo.MODEL_NAMES)


def test_every_named_composite_runs_on_resnets():
    """montavon and seed too (their max pool as average pool over ResNet's overlapping, padded 3x3/2 windows);
    finite maps of the input's shape, and rules by name on the residual sums."""
    x = torch.randn(2, 3, 32, 48)
    for arch in ("resnet18", "resnext50_32x4d"):
        model = make_resnet(arch, dtype=torch.float32)
        for name in lrp.COMPOSITES:
            relevance = lrp.LRPModel(model, name)(x)
            assert relevance.shape == (2, 32, 48) and torch.isfinite(relevance).all(), (arch, name)
    with pytest.raises(ValueError, match=r"cannot be used on layer1.0.add \(SumStep\)"):
        lrp.LRPModel(model, lrp.Composite({nn.Conv2d: lrp.ZPlus(), nn.Linear: lrp.Epsilon(), lrp.Sum: lrp.Epsilon()}))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name", sorted(ZENNIT))
def test_grouped_convolutions_match_zennit_in_float64(name, stride):
    """Grouped convs with stride 1 (flipped-kernel transpose) and 2 (conv-transpose), biases stacked per group."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 12, 3, padding=1, groups=4, stride=stride), nn.ReLU(),
                          nn.Conv2d(12, 8, 1, groups=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(32, 5))
    assert_agree(randomize(model).double(), name, ZENNIT[name](None),
                 torch.randn(2, 3, 12, 12, dtype=torch.float64))


def test_montavon_cuts_resnets_between_stages():
    """montavon's gamma / epsilon cut falls between stages (stem, layer1, layer2 gamma; layer3, layer4 epsilon),
    never inside a residual block (issue 19.15); a residual network of other names is refused in one line."""
    for arch in ("resnet18", "resnet50"):
        table = lrp.LRPModel(make_resnet(arch, dtype=torch.float32), "montavon").rule_table()
        convs = {name: rule for name, rule in table if "conv" in name or "downsample" in name}
        for name, rule in convs.items():
            if name == "conv1":
                assert rule.startswith("ZBox"), rule
                continue
            stage = int(name.split(".")[0].removeprefix("layer"))
            assert rule.startswith("Gamma" if stage <= 2 else "Epsilon"), (arch, name, rule)

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.body = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
            self.pool, self.head = nn.AdaptiveAvgPool2d(1), nn.Linear(4, 2)

        def forward(self, x):
            x = torch.relu(self.conv(x))
            x = torch.relu(self.body(x) + x)
            return self.head(torch.flatten(self.pool(x), 1))

    with pytest.raises(ValueError, match=r"^montavon .* split the residual addition "):
        lrp.LRPModel(Residual(), "montavon")
