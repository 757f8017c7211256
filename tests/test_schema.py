"""The schemas are the one source of the run's columns: every statistic stats.py and faithfulness.py compute has
a declared field and every declared statistic is computed by one of them; rows built from the schema convert by
Arrow type and round-trip through Parquet unchanged; a column without a field is an error, not silently dropped."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from export.concepts import ConceptLayerRecord, ConceptsRecord
from pipeline import stats
from pipeline.concepts.per_image import ConceptImage
from pipeline.concepts.per_image import statistics as concept_statistics
from pipeline.faithfulness import flip_statistics
from pipeline.metrics import METRICS, MetricSettings
from pipeline.metrics import batch_columns as metric_columns
from pipeline.schema import (
    FAILURE_SCHEMA,
    FLIP_COLUMNS,
    GROUPS,
    STATS_COLUMNS,
    STATS_SCHEMA,
    SUPPLIED_GROUPS,
    columns_of,
    converter,
    failure_row,
    map_columns,
    stats_rows,
)

pytestmark = pytest.mark.timeout(60)
N, SIZE, CLASSES = 3, 8, 6


def _computed() -> dict[str, torch.Tensor]:
    """Every column the worker takes from stats.py and faithfulness.py, for a batch of three 8x8 maps: a random
    one with a box, an all-zero one (its shares are NaN), one with a box outside its positive relevance."""
    generator = torch.Generator().manual_seed(0)
    relevance = torch.randn(N, SIZE, SIZE, generator=generator)
    relevance[1] = 0.0
    logits = torch.randn(N, CLASSES, generator=generator)
    target = logits.argmax(1)
    x = torch.randn(N, 3, SIZE, SIZE, generator=generator)
    weights = torch.randn(3 * SIZE * SIZE, CLASSES, generator=generator)
    values = {**stats.map_statistics(relevance), **stats.prediction(logits, target)}
    values.update(stats.conservation(values["relevance_sum"], stats.start_relevance(logits, target)))
    values.update(stats.localisation(relevance, [[(0.0, 0.0, 4.0, 4.0)], [], [(6.0, 6.0, 8.0, 8.0)]]))
    values.update(stats.correctness(values["pred"], [int(target[0]), None, (int(target[2]) + 1) % CLASSES]))
    values.update(flip_statistics(lambda batch: batch.flatten(1) @ weights, x, relevance, target,
                                  ["a", "b", "c"], steps=3, patch=4))
    record = ConceptsRecord((ConceptLayerRecord("features.3", 4, 2, 2), ConceptLayerRecord("features.0", 3, 4, 4)),
                            "features.3", 2, True)
    concepts = [ConceptImage({"features.3": torch.randn(4, generator=generator).numpy(),
                              "features.0": torch.randn(3, generator=generator).numpy()}, {}, None, None)
                for _ in range(N)]
    values.update(concept_statistics(concepts, record, top=2))  # pipeline/concepts/per_image.py
    settings = MetricSettings(names=METRICS, top_k_pixels=8, correlation_runs=3, correlation_subset=5,
                              region_patch=4, region_steps=2, road_percentages=(10, 50))
    values.update(metric_columns(settings, relevance, [[(0.0, 0.0, 4.0, 4.0)], [], [(6.0, 6.0, 8.0, 8.0)]], x,
                                 target, CLASSES, ["a", "b", "c"], lambda batch: batch.flatten(1) @ weights.to(batch),
                                 lambda inputs, classes: inputs.sum(1)))
    return values


def _supplied() -> dict[str, list]:
    """The columns the worker fills in from the records and the batch (record and bookkeeping groups)."""
    return {"image_id": ["a", "b", "c"], "path": ["/d/a.jpg", "/d/b.jpg", "/d/s.tar"], "member": [None, None, "c.jpg"],
            "wnid": ["n01440764", None, "n02123045"], "label": [0, None, 281], "label_name": ["tench", None, "tabby"],
            "pred_name": ["class 1", None, "class 5"], "boxes": [[[0.0, 0.0, 4.0, 4.0]], None, [(6.0, 6.0, 8.0, 8.0)]],
            "shard": ["relevance/shard-00000.h5"] * N, "row": range(N), "seconds": [0.25] * N}


def test_every_computed_statistic_has_a_field_and_every_statistic_field_is_computed():
    computed = set(_computed())
    assert computed - set(STATS_SCHEMA.names) == set(), "computed but not declared in pipeline/schema.py"
    statistics = {c.name for c in STATS_COLUMNS if c.group not in SUPPLIED_GROUPS}
    assert statistics - computed == set(), "declared as a statistic but computed by nothing"
    assert computed & {c.name for c in STATS_COLUMNS if c.group in SUPPLIED_GROUPS} == set(), \
        "computed although the worker supplies it"
    assert set(_supplied()) == {c.name for c in STATS_COLUMNS if c.group in SUPPLIED_GROUPS}


def test_flip_columns_are_the_faithfulness_group_and_what_flipping_computes():
    assert FLIP_COLUMNS == columns_of("faithfulness")
    assert set(FLIP_COLUMNS) == set(flip_statistics(lambda b: b.flatten(1), torch.zeros(1, 3, 4, 4),
                                                    torch.zeros(1, 4, 4), torch.zeros(1).long(), ["a"], 1, 2))
    with pytest.raises(ValueError, match="unknown column group 'flip'"):
        columns_of("flip")


def test_each_column_declared_once_with_a_doc_and_a_known_group():
    for schema, columns in ((STATS_SCHEMA, STATS_COLUMNS),):
        assert len(set(schema.names)) == len(schema.names) == len(columns)
    assert all(c.group in GROUPS and c.doc for c in STATS_COLUMNS)
    assert all(field.metadata == {b"doc": field.metadata[b"doc"]} for field in (*STATS_SCHEMA, *FAILURE_SCHEMA))


def test_rows_built_from_the_schema_round_trip_through_parquet(tmp_path):
    rows = stats_rows({**_computed(), **_supplied()}, N)
    assert [list(row) for row in rows] == [STATS_SCHEMA.names] * N
    table = pa.Table.from_pylist(rows, schema=STATS_SCHEMA)
    table.validate(full=True)
    assert table.schema.equals(STATS_SCHEMA, check_metadata=True)
    pq.write_table(table, tmp_path / "stats.parquet")
    back = pq.read_table(tmp_path / "stats.parquet")  # Parquet names list items "element", Arrow "item"
    assert [(f.name, f.nullable, f.metadata) for f in back.schema] == \
        [(f.name, f.nullable, f.metadata) for f in STATS_SCHEMA]
    assert back.cast(STATS_SCHEMA).schema.equals(STATS_SCHEMA, check_metadata=True)
    assert back.to_pylist() == rows
    first, zero, third = rows
    assert first["correct"] is True and zero["correct"] is None and third["correct"] is False
    assert zero["entropy"] is None and zero["pointing_game_hit"] is None and zero["boxes"] is None  # NaN: null
    assert isinstance(first["pointing_game_hit"], bool) and isinstance(first["pred"], int)
    assert third["boxes"] == [[6.0, 6.0, 8.0, 8.0]] and len(first["flip_curve_morf"]) == 4
    assert [entry["layer"] for entry in first["concepts_by_layer"]] == ["features.3", "features.0"]
    assert first["concepts_top"] == first["concepts_by_layer"][0]["top"] and len(first["concepts_top_share"]) == 2
    for name in STATS_SCHEMA.names:  # no column the schema builds from is null in every row by accident
        if not STATS_SCHEMA.field(name).nullable:
            assert back[name].null_count == 0, name


def test_a_column_without_a_field_or_of_the_wrong_length_is_an_error():
    with pytest.raises(ValueError, match="without a field in STATS_SCHEMA.*: sharpness"):
        stats_rows({**_computed(), "sharpness": torch.zeros(N)}, N)
    with pytest.raises(ValueError, match="column gini has 2 values for 3 images"):
        stats_rows({"gini": torch.zeros(2)}, N)
    assert stats_rows({}, 2) == [dict.fromkeys(STATS_SCHEMA.names)] * 2  # nothing given: all null


def test_values_convert_by_arrow_type():
    as_float, as_bool = converter(pa.float32()), converter(pa.bool_())
    assert as_float(torch.tensor(math.nan)) is None and as_float(np.float32(0.5)) == 0.5
    assert as_bool(torch.tensor(math.nan)) is None and as_bool(torch.tensor(1.0)) is True
    assert as_bool(False) is False and as_bool(None) is None
    assert converter(pa.int64())(torch.tensor(7)) == 7 and type(converter(pa.int64())(np.int64(7))) is int
    assert math.isnan(converter(pa.list_(pa.float32()))(torch.tensor([1.0, math.nan]))[1])  # NaN in a list stays
    assert converter(pa.list_(pa.list_(pa.float32())))(((1.0, 2.0),)) == [[1.0, 2.0]]
    assert converter(pa.string())("x") == "x"


def test_map_columns_and_failure_rows():
    rows = stats_rows({**_computed(), **_supplied()}, N)
    columns = map_columns(rows)
    assert list(columns) == ["image_id", "path", "label", "pred", "target"]
    assert columns["image_id"] == ["a", "b", "c"] and columns["label"].tolist() == [0, -1, 281]
    assert columns["pred"].dtype == columns["target"].dtype == np.int64
    empty = map_columns([])
    assert empty["path"] == [] and empty["label"].dtype == np.int64 and empty["label"].shape == (0,)
    failures = [failure_row("a", "/d/a.jpg", "not an image", 3)]
    assert pa.Table.from_pylist(failures, schema=FAILURE_SCHEMA).to_pylist() == failures
