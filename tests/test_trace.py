"""torch.jit.trace captures the whole LRP network: the traced module reproduces eager output."""
from __future__ import annotations

import warnings

import pytest
import torch

import lrp_module as lrp

from .helpers import make_vgg, relative_error


def _trace(module, *inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(module, inputs, check_trace=False)


@pytest.mark.parametrize("composite,top_k", [("epsilon_gamma_box", 0.0), ("epsilon_plus_flat", 0.05),
                                             ("seed", 0.0), ("montavon", 0.0), ("epsilon_alpha2_beta1", 0.0)])
def test_trace_reproduces_eager(composite, top_k):
    model = lrp.LRPModel(make_vgg("vgg11_bn"), composite, top_k=top_k)
    x, target = torch.randn(2, 3, 64, 80), torch.tensor([-1, 4])
    traced = _trace(model.exportable(), x, target)
    fresh_x, fresh_target = torch.randn(2, 3, 64, 80), torch.tensor([3, -1])
    with torch.no_grad():
        logits, relevance = traced(fresh_x, fresh_target)
    eager_logits, eager_relevance = model.explain(fresh_x, fresh_target)
    torch.testing.assert_close(logits, eager_logits)
    assert (relative_error(relevance, eager_relevance.sum(1)) <= 1e-5).all()


def test_traced_graph_has_no_autograd_or_python_ops():
    model = lrp.LRPModel(make_vgg("vgg11"), "epsilon_gamma_box")
    traced = _trace(model.exportable(channel_sum=False), torch.randn(1, 3, 32, 32), torch.tensor([-1]))
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert "aten::conv2d" in kinds or "aten::_convolution" in kinds
    assert "aten::scatter_" in kinds or "aten::scatter" in kinds
    assert not any("PythonOp" in k or "backward" in k for k in kinds)


@pytest.mark.parametrize("composite,top_k", [("epsilon_gamma_box", 0.1), ("seed", 0.0), ("montavon", 0.0)])
def test_traced_graph_bakes_in_no_device(composite, top_k):
    """The pipeline traces on the CPU and loads the module onto GPUs (jit.load's map_location moves parameters
    and constants, not a device written into an op): no op of the graph may name a device. 64x64 inputs make the
    adaptive pool upsample, the path that once built its matrices on the tracing device (failed on an H200)."""
    model = lrp.LRPModel(make_vgg("vgg11"), composite, top_k=top_k)
    traced = _trace(model.exportable(), torch.randn(2, 3, 64, 64), torch.tensor([-1, 4]))
    devices = [str(use.user).strip() for node in traced.inlined_graph.nodes()
               if node.kind() == "prim::Constant" and str(node.output().type()) == "Device"
               for use in node.output().uses()]
    assert not devices, devices[:3]
