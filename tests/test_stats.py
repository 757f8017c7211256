"""Per-image statistics against hand-made maps and plain per-image re-computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline import stats


def test_uniform_and_single_pixel_extremes():
    uniform = torch.ones(1, 8, 8)
    spike = torch.zeros(1, 8, 8)
    spike[0, 2, 5] = 3.0
    both = torch.cat([uniform, spike])
    assert stats.gini(both)[0] == pytest.approx(0.0, abs=1e-6)
    assert stats.gini(both)[1] == pytest.approx(63 / 64)
    assert stats.entropy(both)[0] == pytest.approx(1.0) and stats.entropy(both)[1] == pytest.approx(0.0)
    row, col = stats.centre_of_mass(both)
    assert (row[0], col[0]) == (pytest.approx(3.5), pytest.approx(3.5))
    assert (row[1], col[1]) == (2.0, 5.0)
    top = stats.positive_fraction_in_top(both)
    assert top["positive_in_top1pct"][1] == 1.0 and top["positive_in_top10pct"][0] == pytest.approx(6 / 64)


def test_against_per_image_numpy():
    torch.manual_seed(0)
    maps = torch.randn(4, 16, 12)
    values = stats.map_statistics(maps)
    for i, m in enumerate(maps.numpy()):
        flat = m.ravel()
        assert values["relevance_sum"][i] == pytest.approx(flat.sum(), rel=1e-5)
        assert values["positive_sum"][i] == pytest.approx(flat[flat > 0].sum(), rel=1e-5)
        assert values["negative_sum"][i] == pytest.approx(flat[flat < 0].sum(), rel=1e-5)
        assert values["max_abs"][i] == pytest.approx(np.abs(flat).max())
        a = np.sort(np.abs(flat))
        n = a.size
        expected_gini = 1 - 2 * np.sum((n - np.arange(1, n + 1) + 0.5) / n * a / a.sum())
        assert values["gini"][i] == pytest.approx(expected_gini, rel=1e-4)
        p = np.clip(flat, 0, None) / np.clip(flat, 0, None).sum()
        nz = p[p > 0]
        assert values["entropy"][i] == pytest.approx(-(nz * np.log(nz)).sum() / math.log(n), rel=1e-4)
        k = round(0.05 * n)
        assert values["positive_in_top5pct"][i] == pytest.approx(np.sort(np.clip(flat, 0, None))[::-1][:k].sum()
                                                                / np.clip(flat, 0, None).sum(), rel=1e-5)
        weights = np.clip(m, 0, None)
        assert values["centre_row"][i] == pytest.approx((weights.sum(1) * np.arange(16)).sum() / weights.sum())


def test_no_positive_relevance_gives_nan_not_errors():
    values = stats.map_statistics(-torch.rand(2, 4, 4))
    for key in ("entropy", "centre_row", "positive_in_top1pct"):
        assert torch.isnan(values[key]).all(), key
    assert torch.isnan(stats.gini(torch.zeros(1, 4, 4))).all()


def test_localisation():
    maps = torch.zeros(3, 10, 10)
    maps[0, 2, 3] = 5.0  # inside the box x 1..5, y 0..4
    maps[0, 8, 8] = 5.0  # the same value outside: relevance split half and half
    maps[1, 9, 9] = 1.0
    result = stats.localisation(maps, [[(1, 0, 5, 4)], [(1, 0, 5, 4)], None])
    assert result["pointing_game_hit"][0] == 1.0 and result["positive_in_box"][0] == pytest.approx(0.5)
    assert result["pointing_game_hit"][1] == 0.0 and result["positive_in_box"][1] == 0.0
    assert torch.isnan(result["pointing_game_hit"][2]) and torch.isnan(result["positive_in_box"][2])
    mask = stats.box_mask([(0, 0, 2, 2), (8, 8, 10, 10)], 10, 10)
    assert mask.sum() == 8 and mask[0, 0] and mask[9, 9] and not mask[5, 5]


def test_prediction():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    result = stats.prediction(logits, torch.tensor([2, 0]), top=2)
    assert result["pred"].tolist() == [1, 0]
    assert result["target_logit"].tolist() == [1.0, 3.0]
    assert result["top5"].tolist() == [[1, 2], [0, 1]]
    probabilities = torch.softmax(logits, 1)
    assert result["target_probability"][0] == pytest.approx(probabilities[0, 2].item())


def test_pointing_game_is_null_without_positive_relevance():
    """A map with no positive relevance has no arg-max to point with (it would be pixel (0, 0)): its pointing game
    is null, like its relevance mass in the box (issue 11.3); a map with some positive value still points."""
    negative = -torch.rand(1, 8, 8) - 0.1
    zero = torch.zeros(1, 8, 8)
    pointing = -torch.rand(1, 8, 8)
    pointing[0, 6, 6] = 0.5
    box = [(0.0, 0.0, 4.0, 4.0)]  # holds pixel (0, 0)
    result = stats.localisation(torch.cat([negative, zero, pointing]), [box, box, [(5.0, 5.0, 8.0, 8.0)]])
    assert math.isnan(result["pointing_game_hit"][0]) and math.isnan(result["pointing_game_hit"][1])
    assert math.isnan(result["positive_in_box"][0]) and result["pointing_game_hit"][2] == 1.0


def test_correctness_is_nan_without_label():
    result = stats.correctness(torch.tensor([1, 2, 3]), [1, None, 0])["correct"]
    assert result[0] == 1.0 and torch.isnan(result[1]) and result[2] == 0.0
