"""lrp_module/receptive_field.py: the box computed from the graph's geometry equals zennit-crp's way of finding a
neuron's receptive field (back-propagate that one neuron, take the bounding box of the input pixels that receive
something), done here with plain autograd on a copy of the model whose weights are all 1 (no cancellation: every
pixel the neuron reads gets a positive gradient), on VGG11, ResNet18 and a model with dilation, strides larger than
the kernel, padding wider than the kernel, adaptive pooling and a spatial concatenation."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import lrp_module as lrp
from lrp_module.concepts import ConceptError
from lrp_module.receptive_field import crop, input_box, input_boxes, step_sizes


class Odd(nn.Module):
    """Geometry the torchvision models lack: dilation 3 (holes), a 1x1 stride-3 conv (skips positions), a spatial
    concatenation, a 1x1 conv with padding 1 (its border neurons read only padding), adaptive pooling to 3 x 4."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 2, 2, dilation=3, padding=2)
        self.b = nn.Conv2d(2, 2, 1, stride=3)
        self.c = nn.Conv2d(1, 2, 3, stride=3, padding=1)
        self.e = nn.Conv2d(2, 2, 1, padding=1)
        self.pool = nn.AdaptiveAvgPool2d((3, 4))
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        u = self.b(self.a(x)).relu()
        v = self.c(x).relu()
        w = self.e(torch.cat([u, v], dim=3)).relu()
        return self.head(torch.flatten(self.pool(w), 1))


def _all_ones(model: nn.Module) -> nn.Module:
    """A float64 copy with every weight 1, no bias, batch norm the identity and max pooling as average pooling: the
    gradient of a neuron is positive exactly on the pixels it reads."""
    ones = copy.deepcopy(model).double().eval()
    for name, module in list(ones.named_modules()):
        replacement = None
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            with torch.no_grad():
                module.weight.fill_(1.0)
                if module.bias is not None:
                    module.bias.zero_()
        elif isinstance(module, nn.BatchNorm2d):
            replacement = nn.Identity()
        elif isinstance(module, nn.MaxPool2d):
            replacement = nn.AvgPool2d(module.kernel_size, module.stride, module.padding)
        if replacement is not None:
            parent, _, child = name.rpartition(".")
            setattr(ones.get_submodule(parent) if parent else ones, child, replacement)
    return ones


def gradient_boxes(ones: nn.Module, layer: str, positions: list[tuple[int, int]], size: tuple[int, int],
                   channels: int) -> tuple[tuple[int, ...], list[tuple[int, int, int, int]]]:
    """zennit-crp's way, on an `_all_ones` copy: back-propagate one neuron of `layer`'s output (channel 0), the
    bounding box (half-open) of the input pixels with a non-zero gradient; one forward pass for all positions.
    Also the layer's output (H, W) in that pass."""
    found = {}
    handle = ones.get_submodule(layer).register_forward_hook(lambda m, i, o: found.setdefault("out", o))
    x = torch.ones(1, channels, *size, dtype=torch.float64, requires_grad=True)
    ones(x)
    handle.remove()
    out, boxes = found["out"], []
    for row, col in positions:
        neuron = out[0, 0] if out.ndim == 2 else out[0, 0, row, col]
        grad = torch.autograd.grad(neuron, x, retain_graph=True)[0] if neuron.requires_grad else torch.zeros_like(x)
        rows, cols = np.nonzero(grad[0].abs().sum(0).numpy() > 0)
        boxes.append((0, 0, 0, 0) if len(rows) == 0 else
                     (int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1))
    return tuple(out.shape[-2:]), boxes


def _cases():
    torch.manual_seed(0)
    vgg = torchvision.models.vgg11(num_classes=10).eval()
    vgg.classifier = nn.Linear(512 * 7 * 7, 10)  # VGG11's features; a small head (the classifier's 120M weights
    # change no receptive field)
    resnet = torchvision.models.resnet18(num_classes=10).eval()
    odd = Odd().eval()
    return [
        (vgg, (32, 40), ["features.0", "features.3", "features.8", "features.10", "features.20", "avgpool"]),
        (resnet, (33, 48), ["conv1", "maxpool", "layer1.0.conv2", "layer1", "layer2.0.conv1", "layer2.0",
                            "layer3.1", "layer4", "avgpool"]),
        (odd, (20, 23), ["a", "b", "c", "e", "pool"]),
    ]


def test_box_equals_the_back_propagated_neurons_bounding_box():
    """Every layer's size from the geometry equals the forward pass's; every box the back-propagated one's."""
    checked = 0
    for model, size, layers in _cases():
        engine, ones = lrp.LRPModel(model, "epsilon_plus"), _all_ones(model)
        sizes = step_sizes(engine, size)
        for layer in layers:
            h, w = sizes[engine.concept_layers[layer].step]
            positions = sorted({(0, 0), (h - 1, w - 1), (h // 2, w // 3), (0, w - 1), (h - 1, 0)})
            shape, reference = gradient_boxes(ones, layer, positions, size, 1 if isinstance(model, Odd) else 3)
            assert shape == (h, w), (layer, shape)
            for (row, col), theirs in zip(positions, reference):
                ours = input_box(engine, layer, row * w + col, size)
                assert ours == input_box(engine, layer, (row, col), size)
                assert ours == theirs, (type(model).__name__, layer, (row, col))
                checked += 1
    assert checked > 60


def test_flat_layers_padding_only_neurons_and_crop():
    engine = lrp.LRPModel(Odd().eval(), "epsilon_plus")
    for layer in ("a", "c", "e", "pool", "head"):  # the table of every position is input_box position by position
        table = input_boxes(engine, layer, (20, 23))
        assert [tuple(row) for row in table] == [input_box(engine, layer, p, (20, 23)) for p in range(len(table))]
    assert input_box(engine, "head", 0, (20, 23)) == (0, 0, 20, 23)  # a Linear neuron reads every pixel
    assert input_box(engine, "e", (0, 0), (20, 23)) == (0, 0, 0, 0)  # it reads only the padding
    image = torch.arange(20 * 23.0).reshape(1, 20, 23)
    box = input_box(engine, "c", (2, 3), (20, 23))
    assert box == (5, 8, 8, 11)  # rows 3*2-1 .. 3*2+1, columns 3*3-1 .. 3*3+1
    assert torch.equal(crop(image, box), image[:, 5:8, 8:11])
    assert crop(image.numpy(), box).shape == (1, 3, 3)


@pytest.mark.parametrize("layer, position, match", [
    ("nope", 0, "unknown layer 'nope'"),
    ("c", 56, r"position 56 is out of range \(its channels are 7 x 8"),
    ("c", (7, 0), r"position \(7, 0\) is out of range"),
    ("c", True, "out of range"),
    ("head", 1, "layer head is flat"),
])
def test_bad_neurons(layer, position, match):
    engine = lrp.LRPModel(Odd().eval(), "epsilon_plus")
    with pytest.raises(ConceptError, match=match):
        input_box(engine, layer, position, (20, 23))
    with pytest.raises(ValueError, match="input_size must be"):
        input_box(engine, "c", 0, (0, 23))
