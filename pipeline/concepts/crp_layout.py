"""relmax.parquet again in zennit-crp 0.6.0's `.npy` layout (crp/maximization.py, crp/statistics.py), so its
visualisation code can read a run's RelMax and RelStats: under RUN/crp/,
`RelMax_sum_normed/<layer>_{data,rel,rf}.npy` and `RelStats_sum_normed/<layer>/<class>_{data,rel,rf}.npy` with
`RelStats_sum_normed/targets.npy`. Each array is (n, C): `data` the image's index in the run's dataset order (the
index of `python -m pipeline explain`'s records, as CRP indexes its dataset), `rel` the normalised concept relevance,
`rf` the most relevant neuron's flat position; rank 0 first."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from lrp_module.files import atomic

from ..datasets.records import ImageRecord
from ..layout import RunLayout
from .outputs import ConceptsRecord
from .relmax import RelMax, TopN, split_key


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)


def _dataset_index(layout: RunLayout, shards: Sequence[Sequence[ImageRecord]], keys: np.ndarray) -> np.ndarray:
    """Each image key's index in the run's dataset order (its record's place among all shards' records)."""
    index = np.full(keys.shape, -1, np.int64)
    shard_of, row_of = split_key(keys)
    starts = np.cumsum([0, *(len(shard) for shard in shards)])
    for shard in np.unique(shard_of[keys >= 0]):
        with h5py.File(layout.relevance_shard(int(shard)), "r") as handle:
            ids = [i.decode() if isinstance(i, bytes) else str(i) for i in handle["image_id"][:]]
        place = {record.image_id: starts[shard] + i for i, record in enumerate(shards[int(shard)])}
        at = (shard_of == shard) & (keys >= 0)
        index[at] = [place[ids[row]] for row in row_of[at]]
    return index


def _arrays(layout: RunLayout, shards: Sequence[Sequence[ImageRecord]], top: TopN
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(data, rel, rf), each (filled ranks, C): every channel has the same number of filled ranks."""
    filled = int((top.keys[0] >= 0).sum()) if len(top.keys) else 0
    keys = top.keys[:, :filled]
    return (_dataset_index(layout, shards, keys).T.copy(), top.values[:, :filled].T.astype(np.float32),
            top.positions[:, :filled].T.copy())


def write_crp_layout(layout: RunLayout, shards: Sequence[Sequence[ImageRecord]], record: ConceptsRecord,
                     tables: dict[str, RelMax]) -> None:
    """The merged tables (tables.merge_relmax) in zennit-crp's layout under RUN/crp/."""
    relmax, relstats = layout.root / RunLayout.CRP_RELMAX, layout.root / RunLayout.CRP_RELSTATS
    classes: set[int] = set()
    for layer in record.layers:
        table = tables[layer.name]
        for suffix, array in zip(("data", "rel", "rf"), _arrays(layout, shards, table.overall)):
            _save(relmax / f"{layer.name}_{suffix}.npy", array)
        for klass, top in sorted(table.per_class.items()):
            classes.add(klass)
            for suffix, array in zip(("data", "rel", "rf"), _arrays(layout, shards, top)):
                _save(relstats / layer.name / f"{klass}_{suffix}.npy", array)
    _save(relstats / "targets.npy", np.array(sorted(classes), np.int64))
