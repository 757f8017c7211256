"""Region perturbation (pixel flipping) and AOPC against hand-made classifiers whose score is a known function of
the pixels: the order regions are removed in, the random baseline being a permutation, determinism under any
batch split, the edge cases of patch and steps."""
from __future__ import annotations

import pytest
import torch

from pipeline.faithfulness import aopc, region_count, region_index, region_perturbation, stable_seed

pytestmark = pytest.mark.timeout(120)


def region_labelled_classifier(height: int, width: int, patch: int):
    """Score of class 0 = sum over channel 0 of w * x, with w = (j + 1) / |region j| on region j, so that zeroing
    region j (x = 1 there) lowers the score by exactly j + 1; class 1 is the negated score."""
    index = region_index(height, width, patch)
    sizes = torch.bincount(index.flatten()).float()
    weights = (index + 1).float() / sizes[index]

    def forward(x: torch.Tensor) -> torch.Tensor:
        score = (x[:, 0] * weights).flatten(1).sum(1)
        return torch.stack([score, -score], dim=1)
    return forward


def test_morf_removes_regions_most_relevant_first_and_aopc_is_the_hand_computation():
    h, w, patch, steps = 10, 7, 3, 6  # 4 x 3 regions, the last row and column smaller
    forward = region_labelled_classifier(h, w, patch)
    x = torch.ones(2, 3, h, w)
    count = region_count(h, w, patch)
    order = [torch.randperm(count, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    index = region_index(h, w, patch)
    sizes = torch.bincount(index.flatten()).float()[index]
    # region order[i][r] should be removed r-th: give it a summed relevance of count - r, spread over its pixels
    relevance = torch.stack([(count - o.argsort()).float()[index] / sizes for o in order])
    target = torch.tensor([0, 1])
    curve = region_perturbation(forward, x, relevance, target, steps=steps, patch=patch, low=0.0, high=0.0)
    assert curve.shape == (2, steps + 1)
    for i, sign in enumerate((1.0, -1.0)):
        full = count * (count + 1) / 2  # sum of j + 1 over the regions: x = 1 everywhere
        drops = torch.cumsum(torch.tensor([0.0] + [o + 1.0 for o in order[i][:steps].tolist()]), 0)
        expected = sign * (full - drops)
        torch.testing.assert_close(curve[i], expected)
        # AOPC by hand: mean over k = 0..L of f(x0) - f(xk)
        hand = sum(float(curve[i, 0] - curve[i, k]) for k in range(steps + 1)) / (steps + 1)
        assert aopc(curve)[i].item() == pytest.approx(hand)
    assert aopc(curve)[0] > 0 and aopc(curve)[1] < 0  # removing evidence for class 0 lowers it


def test_random_order_perturbs_every_region_exactly_once():
    h, w, patch = 20, 16, 6
    count = region_count(h, w, patch)  # 4 x 3
    forward = region_labelled_classifier(h, w, patch)
    x = torch.ones(3, 3, h, w)
    relevance = torch.randn(3, h, w)
    curve = region_perturbation(forward, x, relevance, torch.zeros(3, dtype=torch.long), steps=count, patch=patch,
                                order="random", seed=5, low=0.0, high=0.0)
    removed = (curve[:, :-1] - curve[:, 1:]).round().long()  # region id + 1 at each step
    for row in removed:
        assert sorted(row.tolist()) == list(range(1, count + 1))
    assert curve[:, -1].abs().max() < 1e-4  # everything removed
    assert len({tuple(r.tolist()) for r in removed}) == 3  # each image its own order


def test_noise_lies_in_the_pixel_range_per_channel_and_only_in_perturbed_regions():
    h = w = 12
    seen = []

    def forward(batch):
        seen.append(batch.clone())
        return batch.flatten(1)[:, :2]
    x = torch.full((1, 3, h, w), 100.0)
    relevance = torch.zeros(1, h, w)
    relevance[0, :4, :4] = 1.0  # region 0 of 3x3 is most relevant
    low, high = (-1.0, 0.0, 2.0), (0.0, 1.0, 3.0)
    region_perturbation(forward, x, relevance, torch.tensor([0]), steps=2, patch=4, low=low, high=high)
    inputs = torch.cat(seen)
    torch.testing.assert_close(inputs[0], x[0])
    first = inputs[1]
    assert (first[:, 4:, :] == 100).all() and (first[:, :4, 4:] == 100).all()
    for c in range(3):
        values = first[c, :4, :4]
        assert (values >= low[c]).all() and (values <= high[c]).all() and values.std() > 0
    assert (inputs[2] != 100).sum() == 2 * 3 * 16  # two regions
    torch.testing.assert_close(inputs[2][:, :4, :4], first[:, :4, :4])  # a region keeps its noise


def test_independent_of_batch_split_and_batch_composition():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(16, 5)).double()
    x = torch.randn(4, 3, 17, 17, dtype=torch.float64)
    relevance = torch.randn(4, 17, 17)
    target = torch.tensor([0, 3, 1, 4])
    seeds = [stable_seed(f"img{i}") for i in range(4)]
    for order in ("morf", "random"):
        whole = region_perturbation(net, x, relevance, target, steps=9, patch=5, order=order, seed=seeds)
        for batch_size in (1, 3, 7, 40):
            split = region_perturbation(net, x, relevance, target, steps=9, patch=5, order=order, seed=seeds,
                                        batch_size=batch_size)
            torch.testing.assert_close(split, whole, rtol=1e-6, atol=1e-6)
        alone = region_perturbation(net, x[2:3], relevance[2:3], target[2:3], steps=9, patch=5, order=order,
                                    seed=seeds[2:3])
        torch.testing.assert_close(alone[0], whole[2], rtol=1e-6, atol=1e-6)
    morf = region_perturbation(net, x, relevance, target, steps=9, patch=5, seed=seeds)
    assert not torch.allclose(morf, whole)  # `whole` is the random order: a different curve
    torch.testing.assert_close(morf[:, 0], net(x).gather(1, target[:, None]).squeeze(1).float())


def test_patch_and_steps_edge_cases():
    forward = region_labelled_classifier(10, 10, 10)
    x, relevance, target = torch.ones(1, 3, 10, 10), torch.rand(1, 10, 10), torch.tensor([0])
    curve = region_perturbation(forward, x, relevance, target, steps=1, patch=10, low=0.0, high=0.0)
    torch.testing.assert_close(curve, torch.tensor([[1.0, 0.0]]))  # one region: the whole image
    assert region_count(224, 224, 9) == 625
    with pytest.raises(ValueError, match=r"steps must be an integer in \[1, 4\]"):
        region_perturbation(forward, x, relevance, target, steps=5, patch=5)
    with pytest.raises(ValueError, match=r"patch must be an integer in \[1, 10\]"):
        region_perturbation(forward, x, relevance, target, steps=1, patch=11)
    with pytest.raises(ValueError, match="order must be one of morf, random"):
        region_perturbation(forward, x, relevance, target, steps=1, order="lerf")
    with pytest.raises(ValueError, match="shapes"):
        region_perturbation(forward, x, relevance[0], target, steps=1)
    with pytest.raises(ValueError, match="2 per-image seeds for 1 images"):
        region_perturbation(forward, x, relevance, target, steps=1, seed=[1, 2])


def test_stable_seed_depends_only_on_the_id():
    assert stable_seed("ILSVRC2012_val_00000001") == stable_seed("ILSVRC2012_val_00000001")
    assert stable_seed("a") != stable_seed("b") and stable_seed("a") != stable_seed("a", base=1)
    assert 0 <= stable_seed("a") < 2**63
