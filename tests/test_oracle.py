"""The float64 oracle and its bound: correct float32 LRP is within the bound on every kernel path, and real defects
(a rule swapped, one layer's relevance dropped or passed through, a transposed kernel left unflipped, top-k off)
are caught by a wide margin. The defects are injected through stable seams: a rule class's `bind`, the ops'
`transpose_weight`, the constructor's arguments."""
from __future__ import annotations

import pytest
import torch

import lrp_module as lrp
from lrp_module import ops, oracle, rules

from .helpers import make_vgg

pytestmark = pytest.mark.precision
MARGIN = 10.0  # a defect must be at least this many times the bound away from float64


@pytest.fixture(scope="module")
def setting():
    """vgg11 with random weights and biases (the ill-conditioned case, where the bound is widest), 64x64."""
    model = make_vgg("vgg11")
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    return model, x


def _error(model, x, explainer: lrp.LRPModel, reference: oracle.Float64Oracle) -> oracle.Agreement:
    _, ours = explainer.explain(x)
    _, expected = reference.explain(x)
    return oracle.compare(ours.sum(1), expected.sum(1))


def _bound(model, x, composite="epsilon_gamma_box", top_k=0.0) -> tuple[float, oracle.Float64Oracle]:
    reference = oracle.Float64Oracle(model, composite, top_k=top_k)
    eager = _error(model, x, lrp.LRPModel(model, composite, top_k=top_k), reference)
    assert eager.worst <= oracle.bound(eager.worst) and eager.correlation.min() > 0.9999
    return oracle.bound(eager.worst), reference


def _caught(agreement: oracle.Agreement, limit: float) -> None:
    assert agreement.worst >= MARGIN * limit, f"defect only {agreement.worst:.2e} from float64 (bound {limit:.1e})"
    assert agreement.correlation.min() < oracle.CORRELATION_WARNING  # the run's probe flags it too


@pytest.mark.parametrize("composite,top_k", [("epsilon_gamma_box", 0.0), ("epsilon_plus_flat", 0.1), ("seed", 0.0)])
def test_correct_float32_is_within_the_bound(setting, composite, top_k):
    model, x = setting
    limit, reference = _bound(model, x, composite, top_k)
    traced = torch.jit.trace(lrp.LRPModel(model, composite, top_k=top_k).exportable(), (x, torch.full((3,), -1)),
                             check_trace=False)
    _, relevance = traced(x, torch.full((3,), -1))
    assert oracle.compare(relevance, reference.explain(x)[1].sum(1)).worst <= limit


def test_rule_swapped_is_caught(setting, monkeypatch):
    """Gamma's layers computed with epsilon instead."""
    model, x = setting
    limit, reference = _bound(model, x)
    monkeypatch.setattr(rules.Gamma, "bind", lambda self, op, weight, bias, ctx:
                        rules.Epsilon(self.stabilizer).bind(op, weight, bias, ctx))
    _caught(_error(model, x, lrp.LRPModel(model, "epsilon_gamma_box"), reference), limit)


@pytest.mark.parametrize("how", ["zeroed", "passed_through"])
def test_one_layer_dropped_is_caught(setting, monkeypatch, how):
    """The last convolution (512 -> 512 channels, 4x4) contributes nothing, or hands relevance on unchanged."""
    model, x = setting
    limit, reference = _bound(model, x)
    bound_rules = []
    original = rules.Gamma.bind

    def recording(self, op, weight, bias, ctx):
        bound_rules.append(original(self, op, weight, bias, ctx))
        return bound_rules[-1]

    monkeypatch.setattr(rules.Gamma, "bind", recording)
    explainer = lrp.LRPModel(model, "epsilon_gamma_box")
    last = bound_rules[-1]  # rules are bound input to output
    if how == "zeroed":
        last.relevance = lambda a, out, stash, relevance, weight: torch.zeros_like(a)
    else:
        last.relevance = lambda a, out, stash, relevance, weight: relevance
    _caught(_error(model, x, explainer, reference), limit)


def test_unflipped_transposed_kernel_is_caught(setting, monkeypatch):
    """The transposed pass of stride-1 convolutions with the kernels transposed but not flipped."""
    model, x = setting
    limit, reference = _bound(model, x)
    original = ops.Conv2dOp.transpose_weight

    def unflipped(self, weight):
        return weight.transpose(0, 1).contiguous() if self.as_flipped_conv else original(self, weight)

    monkeypatch.setattr(ops.Conv2dOp, "transpose_weight", unflipped)
    _caught(_error(model, x, lrp.LRPModel(model, "epsilon_gamma_box"), reference), limit)


def test_top_k_off_is_caught(setting):
    model, x = setting
    limit, reference = _bound(model, x, "epsilon_plus_flat", top_k=0.1)
    _caught(_error(model, x, lrp.LRPModel(model, "epsilon_plus_flat", top_k=0.0), reference), limit)


def test_trained_weights_are_far_inside_the_floor():
    """vgg-shapes (trained here): float32 is ~1e-6 from float64, far inside the floor that bounds it."""
    from lrp_module.zoo import build_vgg

    model, _ = build_vgg("vgg-shapes", "demo")
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    agreement = _error(model, x, lrp.LRPModel(model, "epsilon_gamma_box"), oracle.Float64Oracle(model))
    assert agreement.worst < oracle.FLOOR / 1000 and agreement.correlation.min() > 0.999999


def test_measures():
    reference = torch.randn(2, 5, 5, dtype=torch.float64)
    ours = reference.clone()
    ours[0, 2, 2] += 0.1 * reference[0].abs().max()
    error = oracle.relative_error(ours.float(), reference)
    assert float(error[0]) == pytest.approx(0.1, rel=1e-5) and error[1] < 1e-7
    corr = oracle.correlation(torch.stack([ours[0], 2 * reference[1] + 3]), reference)
    assert float(corr[1]) == pytest.approx(1.0) and 0.0 < float(corr[0]) < 1.0
    constant = torch.ones(1, 5, 5, dtype=torch.float64)
    assert oracle.correlation(constant, constant)[0] == 1.0 and oracle.correlation(reference[:1], constant)[0] == 0.0
    assert oracle.relative_error(torch.zeros(1, 3), torch.zeros(1, 3))[0] == 0.0
    assert oracle.bound(1e-6) == oracle.FLOOR and oracle.bound(1e-2) == pytest.approx(0.1)


@pytest.mark.parametrize("top_k", [0.0, 0.1])
def test_explain_each_is_the_batch_one_image_at_a_time(setting, monkeypatch, top_k):
    """The probe's and the export check's float64 pass (issue 20.4): one image per LRPModel call, so its memory is
    one image's whatever the batch, with each image's result that of the batch (per-image targets kept)."""
    model, x = setting
    reference = oracle.Float64Oracle(model, "epsilon_gamma_box", top_k=top_k)
    target = torch.tensor([-1, 3, 7])
    logits, relevance = reference.explain(x, target)
    batches = []
    explain = reference.lrp.explain
    monkeypatch.setattr(reference.lrp, "explain", lambda x, target: batches.append(x.shape[0]) or explain(x, target))
    each_logits, each_relevance = reference.explain_each(x, target)
    assert batches == [1, 1, 1]
    torch.testing.assert_close(each_logits, logits, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(each_relevance, relevance, rtol=1e-9, atol=1e-12)
    _, summed = reference.explain_each(x, target, channel_sum=True)
    torch.testing.assert_close(summed, relevance.sum(1), rtol=1e-9, atol=1e-12)
