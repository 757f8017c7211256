"""A run's concept data as the reference images and the report read it (through pipeline/run_reader.py's accessors):
the statistics rows (where each image is, which class its map explains), the concept record (layers, channels,
exclude_parallel), the RelMax table and each layer's per-image concept relevance (N, C), row for row with the
statistics."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..layout import RunLayout
from ..run_manifest import Manifest, read_manifest
from ..run_reader import concept_relevance, concepts_record, map_size, open_run_folder, read_stats, relmax_table
from .outputs import ConceptsRecord

STATS_COLUMNS = ("image_id", "path", "target", "label", "pred", "shard", "row")


@dataclass
class RunConcepts:
    """What the concept readers need of a run: its statistics (STATS_COLUMNS + member), its concept record and its
    RelMax table; `relevance` reads a layer's (N, C) concept relevance once."""

    root: Path
    manifest: Manifest
    size: int
    stats: pd.DataFrame
    record: ConceptsRecord
    relmax: pd.DataFrame
    error: type[Exception] = ValueError
    _relevance: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def layers(self) -> dict[str, int]:
        """Layer -> its number of channels, in the run's order."""
        return {layer.name: layer.channels for layer in self.record.layers}

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
        """(N, C) concept relevance of every statistics row (in the statistics' order), read once."""
        self.check_layer(layer)
        if layer not in self._relevance:
            ids, values = concept_relevance(RunLayout(self.root), layer, error=self.error)
            where = pd.Series(np.arange(len(ids)), index=pd.Index(ids))
            missing = sorted(set(self.stats["image_id"]) - set(ids))
            if missing:
                raise self.error(f"{self.root}: no concept relevance at {layer} for image {missing[0]}")
            self._relevance[layer] = values[where.loc[self.stats["image_id"]].to_numpy()]
        return self._relevance[layer]

    def mean_relevance(self, layer: str, klass: int | None = None) -> np.ndarray:
        """(C,) mean concept relevance over the run's images, or over those whose map explains `klass`."""
        values = self.relevance(layer)
        if klass is not None:
            values = values[self.stats["target"].to_numpy() == klass]
        return values.astype(np.float64).mean(axis=0) if len(values) else np.zeros(self.layers[layer])


def has_concepts(root: str | Path) -> bool:
    """Whether the run at `root` has a RelMax table (a run explained with concepts on, finished)."""
    return RunLayout(root).relmax.is_file()


def open_concepts(root: str | Path, error: type[Exception]) -> RunConcepts:
    """The concept data of the run at `root`; `error` naming the culprit when it is not a run or has none."""
    layout = open_run_folder(root, error)
    manifest = read_manifest(layout)
    record = concepts_record(layout, error)
    relmax = relmax_table(layout, error=error)
    stats = read_stats(layout, error, STATS_COLUMNS, optional=("member",)).to_pandas()
    if "member" not in stats:
        stats["member"] = None
    return RunConcepts(layout.root, manifest, map_size(layout, manifest, error), stats, record, relmax, error)
