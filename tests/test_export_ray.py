"""The TorchScript artifact is what the pipeline's Ray actors load: it runs in an actor that never imports
this project."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import lrp_module as lrp
from export.artifacts import ExportConfig, write_artifacts
from lrp_module.zoo import WeightsInfo

from .helpers import make_tiny_vgg

ray = pytest.importorskip("ray")


@pytest.mark.timeout(240)
def test_torchscript_runs_in_a_ray_actor(tmp_path, local_ray):
    vgg = make_tiny_vgg()
    model = lrp.LRPModel(vgg, "epsilon_gamma_box", top_k=0.1)
    config = ExportConfig(model="tiny-vgg", weights="random", height=64, width=64, formats=("torchscript",),
                          top_k=0.1)
    write_artifacts(model, WeightsInfo("tiny-vgg", "random"), config, tmp_path, verify=False, source=vgg)

    @ray.remote(num_cpus=0.5)  # fractional: a whole CPU per actor starves everything else on 2 cores
    class Explainer:
        def __init__(self, path: str) -> None:
            import torch as actor_torch

            self.module = actor_torch.jit.load(path)

        def explain(self, x, target):
            import sys

            import torch as actor_torch

            with actor_torch.no_grad():
                logits, relevance = self.module(actor_torch.from_numpy(x), actor_torch.from_numpy(target))
            leaked = [m for m in sys.modules if m.split(".")[0] in ("lrp_module", "export", "pipeline")]
            return logits.numpy(), relevance.numpy(), leaked

    actor = Explainer.remote(str(tmp_path / "lrp.torchscript.pt"))
    x, target = torch.randn(3, 3, 64, 64), torch.tensor([-1, 4, -1])
    logits, relevance, leaked = ray.get(actor.explain.remote(x.numpy(), target.numpy()), timeout=180)
    assert leaked == []
    eager_logits, eager_relevance = model.explain(x, target)
    np.testing.assert_allclose(logits, eager_logits.numpy(), rtol=1e-4, atol=1e-5)
    scale = eager_relevance.sum(1).abs().max().item()
    assert np.abs(relevance - eager_relevance.sum(1).numpy()).max() <= 1e-4 * scale
