"""The top-k filter: the same kept set as topk + scatter, k in {0, 1} is off, rescaling conserves the total."""
from __future__ import annotations

import pytest
import torch

import lrp_module as lrp
from bench.blog_lrp import blog_topk
from lrp_module.topk import TopKFilter, relevance_filter


@pytest.mark.parametrize("shape", [(4, 64, 14, 14), (3, 1000), (2, 3, 7, 5)])
@pytest.mark.parametrize("top_k", [0.5, 0.1, 0.02, 1e-6])
def test_filter_equals_topk_scatter(shape, top_k):
    torch.manual_seed(0)
    r = torch.randn(shape)  # continuous values: no ties
    torch.testing.assert_close(relevance_filter(r, top_k), blog_topk(r, top_k), rtol=0, atol=0)


def test_filter_keeps_k_per_image():
    r = torch.randn(5, 2000)
    kept = relevance_filter(r, 0.1)
    assert ((kept != 0).sum(dim=1) == 200).all()


def test_rescale_conserves_each_image_total():
    r = torch.rand(3, 8, 6, 6) + 0.1
    kept = relevance_filter(r, 0.2, rescale=True)
    torch.testing.assert_close(kept.flatten(1).sum(1), r.flatten(1).sum(1))
    assert ((kept != 0).flatten(1).sum(1) == int(0.2 * 288)).all()


@pytest.mark.parametrize("top_k", [0.0, 1.0])
def test_off_changes_nothing_and_is_never_called(vgg11, images, top_k, monkeypatch):
    baseline = lrp.LRPModel(vgg11, "epsilon_plus_flat").explain(images)[1]
    model = lrp.LRPModel(vgg11, "epsilon_plus_flat", top_k=top_k)
    assert not model.top_k.active

    def fail(*args, **kwargs):
        raise AssertionError("filter called while off")

    monkeypatch.setattr(TopKFilter, "forward", fail)
    torch.testing.assert_close(model.explain(images)[1], baseline, rtol=0, atol=0)


def test_filter_changes_the_map_and_sparsifies_it(vgg11, images):
    dense = lrp.LRPModel(vgg11, "epsilon_gamma_box")(images)
    sparse = lrp.LRPModel(vgg11, "epsilon_gamma_box", top_k=0.02)(images)
    assert (sparse != 0).sum() < (dense != 0).sum()


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_bad_k_is_rejected(vgg11, bad):
    with pytest.raises(ValueError, match="top_k"):
        lrp.LRPModel(vgg11, "epsilon_plus", top_k=bad)


def _rows(n: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(5)
    relu = torch.randn(2, n).clamp(min=0)  # half exact zeros, like relevance below a ReLU
    periodic = torch.arange(n, dtype=torch.float32).remainder(61.0)[None].repeat(2, 1)  # aliases with the sample
    return {
        "normal": torch.randn(3, n),
        "relu": relu,
        "sorted": torch.sort(torch.randn(2, n), dim=1).values,
        "periodic": periodic + torch.rand(2, n) * 1e-3,
        "constant": torch.full((2, n), 0.5),
        "heavy_tail": torch.randn(2, n).pow(5),
        # mostly exact zeros, as below an arg-max pooling: the answer is zero, positive or negative
        "sparse": torch.randn(2, n) * (torch.rand(2, n) < 0.025),
        "sparse_negative": -torch.rand(2, n) * (torch.rand(2, n) < 0.97),
    }


@pytest.mark.parametrize("kind", ["normal", "relu", "sorted", "periodic", "constant", "heavy_tail", "sparse",
                                  "sparse_negative"])
@pytest.mark.parametrize("top_k", [0.3, 0.1, 0.02, 1e-5])
def test_fast_selection_is_exact(kind, top_k):
    """The sampled bracket never changes the answer: equal to kthvalue, including where the sample misleads."""
    from lrp_module.topk import kept_count, kth_largest, kth_largest_traceable

    rows = _rows(200_003)[kind]
    k = kept_count(top_k, rows.shape[1])
    expected = torch.kthvalue(rows, rows.shape[1] - k + 1, dim=1, keepdim=True).values
    assert torch.equal(kth_largest(rows, k), expected)
    assert torch.equal(kth_largest_traceable(rows, k), expected)


def _negative_targets(model: lrp.LRPModel, x: torch.Tensor) -> torch.Tensor:
    """Per image, the class with the most negative logit."""
    with torch.no_grad():
        logits = model.explain(x)[0]
    assert (logits.min(1).values < 0).all()
    return logits.argmin(1)


@pytest.mark.parametrize("composite", ["epsilon_gamma_box", "epsilon_plus_flat", "epsilon_alpha2_beta1"])
def test_negative_logit_target_is_not_wiped_by_the_filter(vgg11, images, composite):
    """The start vector one-hot(target) * logit is never filtered: with a negative logit the zeros would beat it
    and every map would be zero (issue 11.2). Inner layers keep the largest values, as before."""
    model = lrp.LRPModel(vgg11, composite, top_k=0.1)
    target = _negative_targets(model, images)
    relevance = model(images, target)
    assert (relevance.flatten(1).abs().amax(1) > 0).all()


def test_onnx_artifact_keeps_negative_logit_maps_too(tmp_path):
    from export import ExportConfig, load_artifact
    from export.artifacts import write_artifacts
    from lrp_module.zoo import WeightsInfo

    from .helpers import make_tiny_vgg

    vgg = make_tiny_vgg()
    model = lrp.LRPModel(vgg, "epsilon_gamma_box", top_k=0.1)
    config = ExportConfig(model="tiny-vgg", weights="random", composite="epsilon_gamma_box", top_k=0.1, height=64,
                          width=64, formats=("onnx",))
    write_artifacts(model, WeightsInfo("tiny-vgg", "random", "tests"), config, tmp_path, verify=False, source=vgg)
    torch.manual_seed(3)
    x = torch.randn(3, 3, 64, 64)
    target = _negative_targets(model, x)
    _, relevance = load_artifact(tmp_path / "lrp.onnx")(x.numpy(), target.numpy())
    eager = model(x, target).numpy()
    assert (abs(relevance).reshape(3, -1).max(1) > 0).all()
    assert abs(relevance - eager).max() <= 1e-4 * abs(eager).max()
