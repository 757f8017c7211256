"""`make cav`'s files in RUN/cav/ (names: RunLayout), each column declared once with its type and doc (stored as
each Parquet field's `doc`; docs/outputs.md is generated from them): per image its scores and ranks, per channel
its retrieval AUROC, the CAVs themselves, and a JSON summary. Each file is written under a temporary name and
renamed; all are computed before the first is written."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lrp_module.files import atomic

from ..layout import RunLayout
from ..schema import Column
from .cav import KINDS, Cav

IMAGE_COLUMNS = (
    Column("image_id", pa.string(), "image id (the run's `image_id`; every explained image of the run, in dataset "
           "order)", "record", False),
    Column("shard", pa.string(), "the run's relevance shard of the image (as the statistics' `shard`)", "record",
           False),
    Column("row", pa.int64(), "the image's row in that shard", "record", False),
    Column("target", pa.int64(), "the class the run explained (its concept relevance is for this class)", "record",
           False),
    Column("pred", pa.int64(), "the predicted class", "record", False),
    Column("marked", pa.bool_(), "the image is in the marked set (`--marked` CSV or `--prototype`)", "cav", False),
    Column("truth", pa.bool_(), "the truth CSV's 0/1 for the image (null without `--truth`, or where it does not "
           "name the image)", "cav"),
    *(column for kind in KINDS for column in (
        Column(f"score_{kind}", pa.float32(), f"projection of the image's concept-relevance vector at the layer on "
               f"the {kind} CAV, from the clean images' mean (x - clean_mean) . v: higher = more like the marked "
               "images", "cav", False),
        Column(f"rank_{kind}", pa.int64(), f"1 = the highest score_{kind} of the run (ties in dataset order)", "cav",
               False))),
    Column("r_bias", pa.float32(), "R_bias: the share of the map's positive relevance inside the image's mask "
           "(`--masks`; null without a mask for the image, or a map without positive relevance)", "cav"),
    Column("r_bias_concept", pa.float32(), "the same share for the conditional map of channel `concept_channel` "
           "(the summary's; the run's concept maps: null where the channel is not among the image's stored K "
           "channels, the layer is not the run's maps layer, or without a mask)", "cav"),
)

CHANNEL_COLUMNS = (
    Column("channel", pa.int64(), "the channel (concept) of the layer", "cav", False),
    Column("auroc_marked", pa.float64(), "AUROC of the channel's concept relevance as a score retrieving the marked "
           "images among all the run's images (0.5: no better than chance; ties count one half)", "cav", False),
    Column("rank", pa.int64(), "1 = the channel with the highest auroc_marked (ties by channel)", "cav", False),
    Column("auroc_truth", pa.float64(), "AUROC of its relevance retrieving the truth's positive images, over the "
           "images the truth CSV names (null without `--truth`)", "cav"),
    Column("auroc_truth_marked_classes", pa.float64(), "the same over the images explained for the marked images' "
           "classes only (`target`): the artifact apart from the class it comes with (null without `--truth`)", "cav"),
    Column("marked_mean", pa.float32(), "its mean concept relevance over the marked images", "cav", False),
    Column("clean_mean", pa.float32(), "its mean concept relevance over the other images", "cav", False),
    *(Column(kind, pa.float32(), f"its component of the {kind} CAV (unit vector)", "cav", False) for kind in KINDS),
)

VECTOR_COLUMNS = (
    Column("kind", pa.string(), "pattern (Pahde et al. 2024: cov(x, mark), normalised) | classifier (logistic "
           "regression's weights, normalised)", "cav", False),
    Column("layer", pa.string(), "the concept layer the CAV lives at", "cav", False),
    Column("normalised", pa.bool_(), "fitted on normalised concept relevance (each image's vector / its sum of "
           "|R|, CRP's shares; false: `--raw`, the relevance as stored)", "cav", False),
    Column("vector", pa.list_(pa.float64()), "the CAV: a unit vector over the layer's channels", "cav", False),
    Column("clean_mean", pa.list_(pa.float64()), "the mean vector of the clean (unmarked) images: where P-ClArC "
           "moves the artifact direction to", "cav", False),
    Column("marked_mean", pa.list_(pa.float64()), "the mean vector of the marked images", "cav", False),
    Column("marked", pa.int64(), "marked images it was fitted on", "cav", False),
    Column("clean", pa.int64(), "clean images it was fitted on", "cav", False),
)


def schema(columns: Sequence[Column]) -> pa.Schema:
    return pa.schema([column.field() for column in columns])


IMAGES_SCHEMA, CHANNELS_SCHEMA, VECTORS_SCHEMA = map(schema, (IMAGE_COLUMNS, CHANNEL_COLUMNS, VECTOR_COLUMNS))


def _table(columns: Mapping[str, Any], target: pa.Schema) -> pa.Table:
    arrays = []
    for field in target:
        values = columns[field.name]
        if pa.types.is_floating(field.type) and not pa.types.is_list(field.type):
            values = pa.array(np.asarray(values, np.float64), type=pa.float64(), from_pandas=True).cast(field.type)
            arrays.append(values)
        else:
            arrays.append(pa.array(values, type=field.type, from_pandas=True))
    return pa.Table.from_arrays(arrays, schema=target)


def images_table(columns: Mapping[str, Any]) -> pa.Table:
    """IMAGES_SCHEMA from columns by name (NaN floats and None become null)."""
    return _table(columns, IMAGES_SCHEMA)


def channels_table(columns: Mapping[str, Any]) -> pa.Table:
    return _table(columns, CHANNELS_SCHEMA)


def vectors_table(cavs: Sequence[Cav], normalised: bool, marked: int, clean: int) -> pa.Table:
    return _table({"kind": [c.kind for c in cavs], "layer": [c.layer for c in cavs],
                   "normalised": [normalised] * len(cavs), "vector": [c.vector.tolist() for c in cavs],
                   "clean_mean": [c.clean_mean.tolist() for c in cavs],
                   "marked_mean": [c.marked_mean.tolist() for c in cavs],
                   "marked": [marked] * len(cavs), "clean": [clean] * len(cavs)}, VECTORS_SCHEMA)


def write_all(layout: RunLayout, name: str, images: pa.Table, channels: pa.Table, vectors: pa.Table,
              summary: dict) -> None:
    """The four files of artifact concept `name`, the summary last."""
    layout.cav.mkdir(parents=True, exist_ok=True)
    for path, table in ((layout.cav_images(name), images), (layout.cav_channels(name), channels),
                        (layout.cav_vectors(name), vectors)):
        with atomic(path) as tmp:
            pq.write_table(table, tmp)
    with atomic(layout.cav_summary(name)) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
