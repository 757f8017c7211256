"""Test helpers: small random VGGs with non-trivial biases and batch-norm statistics."""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import pytest
import torch
import torchvision
from torch import nn

from lrp_module.oracle import relative_error  # noqa: F401  (per image max |difference| / max |reference|)
from pipeline.config import RunConfig
from pipeline.contracts import WorkerSettings


def worker_settings(**values) -> WorkerSettings:
    """A shard worker's settings as the driver makes them from the run configuration's defaults, with `values`."""
    return dataclasses.replace(WorkerSettings.from_config(RunConfig()), **values)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random non-zero biases and batch-norm statistics, so every bias and folding path is exercised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.05)
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.running_mean.copy_(torch.randn(c, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.5)
                module.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(c, generator=generator) * 0.1)
    return model.eval()


def make_vgg(name: str = "vgg11", num_classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize(getattr(torchvision.models, name)(num_classes=num_classes), seed)


def make_tiny_vgg(num_classes: int = 10, batch_norm: bool = False, seed: int = 0) -> nn.Module:
    """A torchvision VGG with narrow convolutions and dense layers: the same structure, kilobytes of weights."""
    torch.manual_seed(seed)
    cfg = [8, "M", 16, "M", 16, 16, "M", 32, "M", 32, "M"]
    features = torchvision.models.vgg.make_layers(cfg, batch_norm=batch_norm)
    model = torchvision.models.VGG(features, num_classes=num_classes, init_weights=True)
    model.classifier = nn.Sequential(
        nn.Linear(32 * 7 * 7, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, 64), nn.ReLU(True), nn.Dropout(),
        nn.Linear(64, num_classes),
    )
    return randomize(model, seed)


def sampled_matrix(names: Sequence, cases: Sequence[tuple], ids: Sequence[str]) -> list:
    """Parameters (*case, name) for every pair of a parity matrix; a covering sample (each name once, each case at
    least once: name i with case i mod len(cases)) runs by default, the other pairs are marked `full` (conftest)."""
    sample = {(i % len(cases), i % len(names)) for i in range(max(len(names), len(cases)))}
    return [pytest.param(*case, name, id=f"{case_id}-{name}", marks=() if (c, n) in sample else pytest.mark.full)
            for c, (case, case_id) in enumerate(zip(cases, ids)) for n, name in enumerate(names)]


def explain_on_local_ray(config) -> dict:
    """`pipeline.run.explain` quietly (random weights warn) on a local Ray, started and shut down here unless one
    is running already; the manifest."""
    ray = pytest.importorskip("ray")
    from pipeline.run import explain
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return explain(config, progress=False)
    finally:
        if started:
            ray.shutdown()
