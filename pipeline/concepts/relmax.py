"""Relevance maximisation (CRP's RelMax) and its per-class form (RelStats): for every channel of a layer, the n
images with the largest value, kept as a mergeable top-n so the result is the same whatever the number of actors,
shards or invocations.

An image is keyed by `image_key(shard, row)` (its place in the run, not its worker), values are ranked descending
and ties broken by the key ascending: merging any partition of the images in any order gives the same table.
Memory: O(C x n) per table (per class: O(C x n) per class seen).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ROW_BITS = 32


def image_key(shard: int | np.ndarray, row: int | np.ndarray) -> np.ndarray:
    """One int64 per image: shard in the high bits, row in the low ones (ordered as the run's images are)."""
    return (np.asarray(shard, dtype=np.int64) << ROW_BITS) | np.asarray(row, dtype=np.int64)


def split_key(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(shard, row) of image keys."""
    key = np.asarray(key, dtype=np.int64)
    return key >> ROW_BITS, key & ((1 << ROW_BITS) - 1)


@dataclass
class TopN:
    """For each of C channels the n best (value, key, position) so far; a slot never filled holds key -1."""

    values: np.ndarray  # (C, n) float64, descending per channel
    keys: np.ndarray  # (C, n) int64
    positions: np.ndarray  # (C, n) int64: the most relevant neuron's flat position in the channel (-1: none)

    @classmethod
    def empty(cls, channels: int, n: int) -> TopN:
        return cls(np.full((channels, n), -np.inf), np.full((channels, n), -1, np.int64),
                   np.full((channels, n), -1, np.int64))

    @property
    def n(self) -> int:
        return self.values.shape[1]

    def update(self, values: np.ndarray, keys: np.ndarray, positions: np.ndarray) -> None:
        """Add a batch: values (B, C), keys (B,), positions (B, C)."""
        if len(keys) == 0:
            return
        c = self.values.shape[0]
        self._keep(np.concatenate([self.values, np.asarray(values, np.float64).T], axis=1),
                   np.concatenate([self.keys, np.broadcast_to(np.asarray(keys, np.int64), (c, len(keys)))], axis=1),
                   np.concatenate([self.positions, np.asarray(positions, np.int64).T], axis=1))

    def merge(self, other: TopN) -> None:
        """Fold another TopN (another shard, actor or invocation) in."""
        self._keep(np.concatenate([self.values, other.values], axis=1),
                   np.concatenate([self.keys, other.keys], axis=1),
                   np.concatenate([self.positions, other.positions], axis=1))

    def _keep(self, values: np.ndarray, keys: np.ndarray, positions: np.ndarray) -> None:
        # unfilled slots (key -1) sort last whatever their value; then value descending, key ascending
        filled = keys >= 0
        order = np.lexsort((np.where(filled, keys, np.iinfo(np.int64).max), -np.where(filled, values, -np.inf),
                            ~filled), axis=1)[:, :self.n]
        self.values = np.take_along_axis(values, order, axis=1)
        self.keys = np.take_along_axis(keys, order, axis=1)
        self.positions = np.take_along_axis(positions, order, axis=1)


@dataclass
class RelMax:
    """One layer's RelMax (all images) and RelStats (per class of the explained target)."""

    channels: int
    n: int
    overall: TopN
    per_class: dict[int, TopN]

    @classmethod
    def empty(cls, channels: int, n: int) -> RelMax:
        return cls(channels, n, TopN.empty(channels, n), {})

    def update(self, values: np.ndarray, keys: np.ndarray, positions: np.ndarray, classes: np.ndarray) -> None:
        """A batch: values (B, C) (CRP: summed, normalised concept relevance), keys (B,), positions (B, C), the
        classes (B,) the maps explain."""
        self.overall.update(values, keys, positions)
        classes = np.asarray(classes, np.int64)
        for c in np.unique(classes):
            rows = classes == c
            self.per_class.setdefault(int(c), TopN.empty(self.channels, self.n)).update(
                values[rows], keys[rows], positions[rows])

    def merge(self, other: RelMax) -> None:
        self.overall.merge(other.overall)
        for c, table in other.per_class.items():
            self.per_class.setdefault(c, TopN.empty(self.channels, self.n)).merge(table)
