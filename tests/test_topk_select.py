"""Radix selection (the GPU's top-k threshold) on the CPU: the exact k-th largest value on adversarial rows, and
the filter's kept set through it identical to the bracket selection's and to torch.topk's threshold."""
from __future__ import annotations

import pytest
import torch

from bench.blog_lrp import blog_topk
from lrp_module import topk
from lrp_module.topk import kept_count, relevance_filter
from lrp_module.topk_select import kth_largest_radix, order_key

from .test_topk import _rows

N = 50_021  # prime: no alignment with the 16-bit digits or the bracket's sample stride


def _adversarial(n: int, dtype: torch.dtype) -> torch.Tensor:
    """One batch whose rows have different distributions: each row is its own selection problem."""
    torch.manual_seed(11)
    signed_zeros = torch.zeros(n)
    signed_zeros[::3] = -0.0
    signed_zeros[::7] = 1.0
    rows = [
        torch.randn(n),
        torch.zeros(n),
        signed_zeros,  # -0.0 and +0.0 are the same float: both kept or both dropped
        -torch.rand(n) - 1e-3,  # all negative
        torch.randn(n).clamp(min=0),  # half exact zeros
        torch.randint(-3, 4, (n,)).float(),  # seven values, all ties
        torch.full((n,), -2.5),
        torch.randn(n) * 1e-40,  # float32 subnormals (zeros in float16)
        torch.randn(n).pow(7) * 1e20,  # heavy tails over many exponents
        torch.where(torch.rand(n) < 0.5, torch.full((n,), float("inf")), torch.full((n,), -float("inf"))),
        torch.sort(torch.randn(n)).values,
    ]
    return torch.stack(rows).to(dtype)


def _kth_by_topk(flat: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(flat, k, dim=1).values[:, k - 1:k]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 2, 17, N // 10, N // 2, N - 1, N])
def test_radix_kth_equals_topk_kth(dtype, k):
    flat = _adversarial(N, dtype)
    expected = _kth_by_topk(flat.double() if dtype in (torch.float16, torch.bfloat16) else flat, k).to(dtype)
    got = kth_largest_radix(flat, k)
    assert got.dtype == dtype and got.shape == (flat.shape[0], 1)
    assert torch.equal(got, expected), (got.flatten().tolist(), expected.flatten().tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_order_key_is_monotone(dtype):
    values = torch.tensor([-float("inf"), -3e4, -1.5, -1e-7, -0.0, 0.0, 1e-7, 1.0, 2.0, 6e4, float("inf")])
    if dtype != torch.float16:
        values = torch.cat([values, torch.tensor([-1e-40, 1e-40, 1e38])]).sort().values
    key = order_key(values.to(dtype)[None])[0]
    assert (key[1:] >= key[:-1]).all()
    assert (key[1:] > key[:-1]).sum() == len(values) - 1  # strictly increasing: no two floats share a key


@pytest.mark.parametrize("kind", ["normal", "relu", "sorted", "periodic", "constant", "heavy_tail", "sparse",
                                  "sparse_negative"])
@pytest.mark.parametrize("top_k", [0.3, 0.1, 0.02, 1e-5])
def test_filter_through_radix_keeps_the_bracket_filters_set(kind, top_k, monkeypatch):
    """The full filter with the selection swapped (as on CUDA): bit-identical output, same mask."""
    rows = _rows(200_003)[kind].unsqueeze(1)  # (N, 1, n): the filter flattens per image
    expected = relevance_filter(rows.clone(), top_k, inplace=True)
    monkeypatch.setattr(topk, "kth_largest", kth_largest_radix)
    got = relevance_filter(rows.clone(), top_k, inplace=True)
    assert torch.equal(got, expected)
    assert torch.equal(got != 0, expected != 0)
    rescaled = relevance_filter(rows.clone(), top_k, rescale=True)
    monkeypatch.undo()
    assert torch.equal(rescaled, relevance_filter(rows.clone(), top_k, rescale=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("top_k", [0.5, 0.1, 1e-4])
def test_radix_mask_is_values_at_or_above_topks_kth(dtype, top_k, monkeypatch):
    """Ties at the threshold are all kept (as the CPU filter does); without ties exactly k, as topk + scatter."""
    flat = _adversarial(N, dtype)
    flat = flat[torch.isfinite(flat).all(1)]  # the filter multiplies by the mask: a dropped inf would be NaN
    k = kept_count(top_k, N)
    monkeypatch.setattr(topk, "kth_largest", kth_largest_radix)
    kept = relevance_filter(flat.clone(), top_k)
    assert torch.equal(kept != 0, (flat >= _kth_by_topk(flat, k)) & (flat != 0))
    continuous = torch.randn(5, N, dtype=dtype)
    torch.testing.assert_close(relevance_filter(continuous, top_k), blog_topk(continuous, top_k), rtol=0, atol=0)


def test_bad_k_is_refused():
    with pytest.raises(ValueError, match="k must be"):
        kth_largest_radix(torch.randn(2, 10), 0)
    with pytest.raises(ValueError, match="k must be"):
        kth_largest_radix(torch.randn(2, 10), 11)
