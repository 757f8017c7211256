"""Relevance maps -> SpRAy feature vectors: sum-pool each map to a small grid and normalise it, as corelay's SpRAy
recipes do (`spectral`: the signed map over its sum; `absspectral`: |map| over its sum), streaming one class's
maps from the run's HDF5 shards, one shard at a time, so that only the pooled vectors are ever held."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..run_reader import map_pieces

VARIANTS = ("spectral", "absspectral")


class SprayInputError(ValueError):
    """A run's maps cannot be read for SpRAy; the message names the file."""


def _bin_edges(size: int, grid: int) -> np.ndarray:
    """Start of each of `grid` bins over `size` pixels: floor(i * size / grid), as adaptive pooling cuts them."""
    return (np.arange(grid) * size) // grid


def sum_pool(maps: np.ndarray, grid: int) -> np.ndarray:
    """(N, H, W) -> (N, grid, grid) float64 sums over (near-)equal rectangular bins (exact when H and W are multiples
    of grid; otherwise bins differ by one pixel). A map smaller than the grid is an error, not an upsampling."""
    n, h, w = maps.shape
    if h < grid or w < grid:
        raise ValueError(f"maps of {h}x{w} are smaller than the {grid}x{grid} pooling grid")
    rows = np.add.reduceat(maps, _bin_edges(h, grid), axis=1, dtype=np.float64)  # the row sums first: small
    return np.add.reduceat(rows, _bin_edges(w, grid), axis=2)


@dataclass(frozen=True)
class Normalised:
    """Feature vectors (N, grid * grid) float32, and how many maps needed the fallback (sum <= 0) or were empty."""

    vectors: np.ndarray
    fallback: int
    empty: int


def normalise(pooled: np.ndarray, variant: str) -> Normalised:
    """Flatten and divide each pooled map by its sum (corelay's Normalize): `spectral` keeps the signs, `absspectral`
    takes |R| first. A `spectral` map whose sum is not positive (more negative than positive relevance) is divided by
    its sum of |R| instead, so its sign pattern is kept and its scale is comparable; an all-zero map stays zero."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown SpRAy variant {variant!r} (known: {', '.join(VARIANTS)})")
    flat = pooled.reshape(len(pooled), -1)
    if variant == "absspectral":
        flat = np.abs(flat)
    total = flat.sum(1)
    magnitude = np.abs(flat).sum(1)
    empty = magnitude <= 0
    fallback = (total <= 0) & ~empty
    scale = np.where(fallback, magnitude, total)
    scale[empty] = 1.0
    vectors = (flat / scale[:, None]).astype(np.float32)
    return Normalised(vectors, int(fallback.sum()), int(empty.sum()))


def features(maps: np.ndarray, grid: int, variant: str) -> Normalised:
    """(N, H, W) maps -> their SpRAy vectors."""
    return normalise(sum_pool(maps, grid), variant)


def read_class_features(root: str | Path, rows: pd.DataFrame, grid: int, variant: str, batch: int = 1024
                        ) -> tuple[np.ndarray, dict[str, int]]:
    """The SpRAy vectors (len(rows), grid * grid) of one class's images, in the order of `rows` (columns `shard`,
    `row`), read shard by shard in pieces of at most `batch` maps: memory holds the vectors plus one piece of maps.
    Also the counts of maps normalised by their |R| (sum <= 0) and of empty maps."""
    root = Path(root)
    rows = rows[["shard", "row"]].assign(_position=np.arange(len(rows)))
    out = np.zeros((len(rows), grid * grid), dtype=np.float32)
    counts = {"fallback": 0, "empty": 0}
    for positions, maps in map_pieces(root, rows, batch, SprayInputError):
        result = features(maps, grid, variant)
        out[positions] = result.vectors
        counts["fallback"] += result.fallback
        counts["empty"] += result.empty
    return out, counts


def cluster_mean_maps(root: str | Path, rows: pd.DataFrame, labels: dict[int, np.ndarray], batch: int = 1024
                      ) -> dict[int, np.ndarray]:
    """k -> (k, H, W) float32: each cluster's mean map at full resolution, every map first divided by its sum of
    |R| so that each image counts once whatever its scale (a second streaming pass over the class's maps)."""
    root = Path(root)
    rows = rows[["shard", "row"]].assign(_position=np.arange(len(rows)))
    sums: dict[int, np.ndarray] = {}
    counts = {k: np.bincount(v, minlength=k).astype(np.float64) for k, v in labels.items()}
    for positions, maps in map_pieces(root, rows, batch, SprayInputError):
        values = np.asarray(maps, dtype=np.float64)
        scale = np.abs(values).sum((1, 2), keepdims=True)
        values = values / np.where(scale > 0, scale, 1.0)
        for k, assigned in labels.items():
            total = sums.setdefault(k, np.zeros((k, *values.shape[1:])))
            members = assigned[positions]
            for cluster in np.unique(members):
                total[cluster] += values[members == cluster].sum(0)
    return {k: (total / np.maximum(counts[k], 1)[:, None, None]).astype(np.float32) for k, total in sums.items()}
