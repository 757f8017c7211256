"""Synthetic relevance maps with planted strategies, for SpRAy's tests and benchmark: each group of maps shares a
prototype (a strong blob at the group's own place, like an object part or a watermark the model reads) and every
map adds its own weaker blobs at random places, pixel noise and a random overall scale."""
from __future__ import annotations

import numpy as np


def prototype_centres(groups: int, size: int) -> np.ndarray:
    """(groups, 2) row/column centres spread on a circle around the middle."""
    angles = 2 * np.pi * np.arange(groups) / max(groups, 1)
    radius = size * 0.3
    return np.stack([size / 2 + radius * np.sin(angles), size / 2 + radius * np.cos(angles)], 1)


def group_of(index: int, shares: np.ndarray) -> int:
    """Group of map `index`: a fixed interleaving that gives each group its share of every block of 1,000."""
    position = (index * 0.6180339887498949) % 1.0  # golden-ratio sequence: evenly spread, deterministic
    return int(np.searchsorted(np.cumsum(shares), position, side="right").clip(0, len(shares) - 1))


def planted_map(index: int, groups: int, size: int, seed: int = 0, shares: np.ndarray | None = None
                ) -> tuple[np.ndarray, int]:
    """(size, size) float32 map number `index` and its group; depends only on (index, groups, size, seed)."""
    shares = np.full(groups, 1.0 / groups) if shares is None else np.asarray(shares, dtype=float) / np.sum(shares)
    group = group_of(index, shares)
    rng = np.random.default_rng([seed, index])
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    r, c = prototype_centres(groups, size)[group] + rng.normal(0, size * 0.02, 2)
    width = size * 0.07
    relevance = np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * width ** 2))
    for _ in range(2):  # the map's own evidence, anywhere
        r, c = rng.uniform(0, size, 2)
        w = rng.uniform(size * 0.04, size * 0.1)
        relevance += rng.uniform(0.2, 0.5) * np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * w ** 2))
    relevance += rng.normal(0, 0.02, (size, size))
    return (relevance * rng.uniform(0.5, 2.0) * 1e-2).astype(np.float32), group


def planted_maps(n: int, groups: int, size: int, seed: int = 0, shares: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(n, size, size) float32 maps and (n,) their groups."""
    maps = np.empty((n, size, size), np.float32)
    labels = np.empty(n, np.int64)
    for i in range(n):
        maps[i], labels[i] = planted_map(i, groups, size, seed, shares)
    return maps, labels
