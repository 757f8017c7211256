"""A run's concept data as the reference images and the report read it: the statistics rows (where each image is,
which class its map explains), the RelMax table, each layer's number of channels and the per-image concept
relevance (N, C), read shard by shard for the rows asked for only."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from ..layout import RunLayout
from ..run_manifest import Manifest, read_manifest
from ..run_reader import map_size, open_run_folder, read_stats

STATS_COLUMNS = ("image_id", "path", "target", "label", "pred", "shard", "row")
RELMAX_COLUMNS = ("layer", "channel", "class", "rank", "image_id", "shard", "row", "value", "neuron")
NO_CONCEPTS = "has no concept data (explain it with CONCEPTS=<layer>, `concepts:` in configs/run.yaml)"


def relmax_file(layout: RunLayout) -> Path:
    return layout.root / "relmax.parquet"


def concept_dataset(layer: str) -> str:
    """The HDF5 dataset of a layer's per-image concept relevance in each relevance shard."""
    return f"concept_relevance/{layer}"  # pipeline/concepts/outputs.py (h-pipe): relevance_name


@dataclass
class RunConcepts:
    """What the concept readers need of a run: its statistics (STATS_COLUMNS + member), its RelMax table and the
    channels of each concept layer."""

    root: Path
    manifest: Manifest
    size: int
    stats: pd.DataFrame
    relmax: pd.DataFrame
    layers: dict[str, int]  # layer -> channels
    error: type[Exception] = ValueError
    _relevance: dict[str, np.ndarray] = field(default_factory=dict)

    def check_layer(self, layer: str) -> None:
        if layer not in self.layers:
            raise self.error(f"unknown concept layer {layer!r}: the run has concept data for "
                             f"{', '.join(self.layers)}")

    def channels(self, layer: str) -> int:
        self.check_layer(layer)
        return self.layers[layer]

    def has_class(self, layer: str, klass: int) -> bool:
        table = self.relmax
        return bool(((table["layer"] == layer) & (table["class"] == klass)).any())

    def relevance(self, layer: str) -> np.ndarray:
        """(N, C) float64 concept relevance of every statistics row (stats order), read once."""
        self.check_layer(layer)
        if layer not in self._relevance:
            self._relevance[layer] = read_relevance(self.root, self.stats, layer, self.error)
        return self._relevance[layer]

    def mean_relevance(self, layer: str, klass: int | None = None) -> np.ndarray:
        """(C,) mean concept relevance over the run's images, or over those whose map explains `klass`."""
        values = self.relevance(layer)
        if klass is not None:
            values = values[self.stats["target"].to_numpy() == klass]
        return values.mean(axis=0) if len(values) else np.zeros(self.layers[layer])


def read_relevance(root: Path, rows: pd.DataFrame, layer: str, error: type[Exception]) -> np.ndarray:
    """(len(rows), C) concept relevance of `rows` (columns shard, row), each shard file opened once."""
    out: np.ndarray | None = None
    resolved = root.resolve()
    for shard, group in rows.assign(_position=np.arange(len(rows))).groupby("shard", sort=True):
        path = (root / shard).resolve()
        if not path.is_relative_to(resolved):
            raise error(f"concept shard {shard!r} lies outside the run directory {root}")
        order = np.argsort(group["row"].to_numpy(), kind="stable")
        wanted = group["row"].to_numpy()[order]
        try:
            with h5py.File(path, "r") as handle:
                unique, inverse = np.unique(wanted, return_inverse=True)
                values = handle[concept_dataset(layer)][unique.tolist()][inverse]
        except (OSError, KeyError, ValueError, TypeError) as problem:
            raise error(f"{path}: cannot read the concept relevance of {layer} ({problem})") from None
        if out is None:
            out = np.zeros((len(rows), values.shape[1]))
        out[group["_position"].to_numpy()[order]] = values
    return out if out is not None else np.zeros((0, 0))


def open_concepts(root: str | Path, error: type[Exception]) -> RunConcepts:
    """The concept data of the run at `root`; `error` naming the culprit when it is not a run or has none."""
    layout = open_run_folder(root, error)
    manifest = read_manifest(layout)
    path = relmax_file(layout)
    if not path.is_file():
        raise error(f"{layout.root}: {NO_CONCEPTS}")
    try:
        relmax = pq.read_table(path, columns=list(RELMAX_COLUMNS)).to_pandas()
    except (OSError, ValueError, KeyError) as problem:
        raise error(f"{path}: unreadable RelMax table ({problem})") from None
    stats = read_stats(layout, error, STATS_COLUMNS, optional=("member",)).to_pandas()
    if "member" not in stats:
        stats["member"] = None
    layers = {}
    for layer, group in relmax.groupby("layer", sort=False):
        layers[str(layer)] = _channels(layout, stats, str(layer), int(group["channel"].max()) + 1)
    if not layers:
        raise error(f"{layout.root}: {NO_CONCEPTS}")
    return RunConcepts(layout.root, manifest, map_size(layout, manifest, error), stats, relmax, layers, error)


def _channels(layout: RunLayout, stats: pd.DataFrame, layer: str, seen: int) -> int:
    """A layer's channels: the width of its per-image relevance, else the largest channel RelMax lists + 1."""
    for shard in stats["shard"].drop_duplicates():
        try:
            with h5py.File(layout.root / shard, "r") as handle:
                return int(handle[concept_dataset(layer)].shape[1])
        except (OSError, KeyError, ValueError, TypeError):
            continue
    return seen
