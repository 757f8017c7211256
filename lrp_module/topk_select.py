"""The k-th largest value per row by radix selection on the floats' bit patterns: no sort, no sync, no loop.

Made for the GPU, where the sampled-bracket selection of `topk.kth_largest` loops over rows and syncs, and
`torch.topk` sorts: each float is mapped to an integer key with the same order (negative values get their
magnitude bits flipped), and the key of the k-th largest value is found 16 bits at a time. Each pass counts,
per row, how many values fall in each of the 65,536 buckets of the next 16 bits among the values that share
the prefix found so far (one `scatter_add_`), and a reverse cumulative sum picks the bucket holding the k-th
value. float32 takes 2 passes, float64 4, float16 / bfloat16 1. Exact on any device: the key order refines
the float order (only -0.0 sorts below +0.0, and they compare equal, so the threshold is the same float).
"""
from __future__ import annotations

import torch
from torch import Tensor

DIGIT_BITS = 16
BUCKETS = 1 << DIGIT_BITS
_INT_OF = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def order_key(flat: Tensor) -> Tensor:
    """Integer keys (int32, int64 for float64) whose signed order is the float order (NaN-free input)."""
    size = flat.element_size()
    bits = flat.view(_INT_OF[size])
    if size == 2:
        bits = bits.to(torch.int32)  # sign-extended: the 16-bit pattern as a signed int32
        return bits ^ ((bits >> 15) & 0x7FFF)
    magnitude = (1 << (8 * size - 1)) - 1
    return bits ^ ((bits >> (8 * size - 1)) & magnitude)  # an involution: it also maps keys back to bits


def _float_of_key(key: Tensor, dtype: torch.dtype) -> Tensor:
    """The float whose order key is `key` (inverse of order_key)."""
    size = torch.empty((), dtype=dtype).element_size()
    if size == 2:
        return (key ^ ((key >> 15) & 0x7FFF)).to(torch.int16).view(dtype)
    magnitude = (1 << (8 * size - 1)) - 1
    return (key ^ ((key >> (8 * size - 1)) & magnitude)).view(dtype)


def kth_largest_radix(flat: Tensor, k: int) -> Tensor:
    """(N, 1) exact k-th largest value per row of a NaN-free (N, n) float tensor, 1 <= k <= n."""
    n_rows, n = flat.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    key = order_key(flat.contiguous())
    total_bits = 16 if flat.element_size() == 2 else 8 * flat.element_size()
    rows = torch.arange(n_rows, device=flat.device)
    need = torch.full((n_rows,), k, dtype=torch.int64, device=flat.device)  # rank still to find inside the prefix
    prefix = None  # per row: the key's bits above the current digit, as a signed value of key >> (shift + 16)
    ones = torch.ones((), dtype=torch.int32, device=flat.device).expand(n_rows, n)
    for shift in range(total_bits - DIGIT_BITS, -1, -DIGIT_BITS):
        high = key >> shift
        if prefix is None:  # the top digit is signed: offset to 0 .. 65535
            digit, weight = (high + BUCKETS // 2).long(), ones
        else:  # only values sharing the prefix count; the others add 0 to their own bucket (spread atomics)
            digit = (high & (BUCKETS - 1)).long()
            weight = ((high >> DIGIT_BITS) == prefix[:, None]).to(torch.int32)
        counts = torch.zeros(n_rows, BUCKETS, dtype=torch.int32, device=flat.device).scatter_add_(1, digit, weight)
        at_or_above = counts.flip(1).cumsum(1).flip(1)  # per bucket: values in it or in higher buckets
        bucket = (at_or_above >= need[:, None]).sum(1) - 1  # the highest bucket whose tail reaches rank `need`
        need = need - (at_or_above[rows, bucket] - counts[rows, bucket])
        bucket = bucket.to(key.dtype)
        prefix = bucket - BUCKETS // 2 if prefix is None else (prefix << DIGIT_BITS) | bucket
    return _float_of_key(prefix, flat.dtype).unsqueeze(1)
