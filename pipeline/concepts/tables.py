"""relmax.parquet: relevance maximisation (CRP's RelMax) and its per-class form (RelStats) over the whole run, merged
by the driver from every shard's concept outputs when the run finishes.

Each shard's relevance file holds its images' concept relevance (N, C) and most relevant neurons (N, C) per layer
(pipeline/concepts/outputs.py); the merge reads them shard by shard into mergeable top-n tables (relmax.py), keyed
by (shard, row), so the table depends only on the shards' contents: the same for any number of actors, shards
explained in any order, and a run resumed any number of times (a finished shard's file is never rewritten). Memory:
one shard's arrays plus O(C x n) per layer for RelMax and per class seen for RelStats (classes x C x n values)."""
from __future__ import annotations

from collections.abc import Iterator

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lrp_module.files import atomic

from ..layout import RunLayout
from ..schema import RELMAX_SCHEMA
from .outputs import ConceptsRecord, position_name, relevance_name
from .per_image import shares
from .relmax import RelMax, TopN, image_key, split_key


def merge_relmax(layout: RunLayout, shards: int, record: ConceptsRecord, n: int) -> dict[str, RelMax]:
    """Each layer's RelMax over the run's `shards` relevance files (normalised concept relevance, as CRP ranks)."""
    tables = {layer.name: RelMax.empty(layer.channels, n) for layer in record.layers}
    for index in range(shards):
        with h5py.File(layout.relevance_shard(index), "r") as handle:
            rows = handle["relevance"].shape[0]
            if not rows:
                continue
            classes = handle["target"][:]
            keys = image_key(index, np.arange(rows))
            for layer in record.layers:
                tables[layer.name].update(shares(handle[relevance_name(layer.name)][:]), keys,
                                          handle[position_name(layer.name)][:], classes)
    return tables


def _rows(layer: str, width: int, klass: int | None, top: TopN) -> dict[str, np.ndarray]:
    """One TopN as table columns (filled slots only), channel by channel, rank by rank."""
    channels, ranks = np.nonzero(top.keys >= 0)
    keys = top.keys[channels, ranks]
    shard, row = split_key(keys)
    neuron = top.positions[channels, ranks]
    return {"layer": np.full(len(keys), layer, dtype=object), "channel": channels, "class": np.full(len(keys), klass),
            "rank": ranks, "_shard": shard, "row": row, "value": top.values[channels, ranks].astype(np.float32),
            "neuron": neuron, "neuron_row": neuron // width, "neuron_col": neuron % width}


def _pieces(record: ConceptsRecord, tables: dict[str, RelMax]) -> Iterator[dict[str, np.ndarray]]:
    """Per layer (in the record's order): overall first, then each class ascending."""
    for layer in record.layers:
        table = tables[layer.name]
        yield _rows(layer.name, layer.width, None, table.overall)
        for klass in sorted(table.per_class):
            yield _rows(layer.name, layer.width, klass, table.per_class[klass])


def relmax_table(layout: RunLayout, record: ConceptsRecord, tables: dict[str, RelMax]) -> pa.Table:
    """The merged tables as RELMAX_SCHEMA rows, with each image's id and relevance file."""
    pieces = list(_pieces(record, tables))
    columns = {name: np.concatenate([piece[name] for piece in pieces]) for name in pieces[0]} if pieces else {}
    if not pieces or not len(columns["row"]):
        return RELMAX_SCHEMA.empty_table()
    image_ids = np.empty(len(columns["row"]), dtype=object)
    shard_names = np.empty(len(columns["row"]), dtype=object)
    for shard in np.unique(columns["_shard"]):
        path = layout.relevance_shard(int(shard))
        with h5py.File(path, "r") as handle:
            ids = handle["image_id"][:]
        at = columns["_shard"] == shard
        image_ids[at] = [i.decode() if isinstance(i, bytes) else str(i) for i in ids[columns["row"][at]]]
        shard_names[at] = layout.relative(path)
    classes = columns["class"]
    arrays = {"layer": columns["layer"], "channel": columns["channel"],
              "class": pa.array([None if c is None else int(c) for c in classes], pa.int64()),
              "rank": columns["rank"], "image_id": image_ids, "shard": shard_names, "row": columns["row"],
              "value": columns["value"], "neuron": columns["neuron"], "neuron_row": columns["neuron_row"],
              "neuron_col": columns["neuron_col"]}
    typed = [value if isinstance(value := arrays[field.name], pa.Array) else pa.array(value, field.type)
             for field in RELMAX_SCHEMA]
    return pa.Table.from_arrays(typed, schema=RELMAX_SCHEMA)


def write_relmax(layout: RunLayout, shards: int, record: ConceptsRecord, n: int) -> int:
    """relmax.parquet from the run's shards; returns its number of rows."""
    table = relmax_table(layout, record, merge_relmax(layout, shards, record, n))
    with atomic(layout.relmax) as tmp:
        pq.write_table(table, tmp)
    return table.num_rows
