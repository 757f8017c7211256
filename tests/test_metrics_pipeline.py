"""The evaluation metrics inside the pipeline: every metric's column written by the actors equals the function
recomputed here on the stored float32 maps (and the eager model for region perturbation); bad settings stop at
configuration time in one line naming the key."""
from __future__ import annotations

import warnings

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from lrp_module.zoo import build_vgg
from pipeline.config import ConfigError, load_config
from pipeline.datasets import load_records
from pipeline.metrics import METRICS, expand, maps
from pipeline.metrics import model as model_metrics
from pipeline.preprocess import Preprocessing, load
from pipeline.report import metrics as metrics_report
from pipeline.report.run_data import open_run
from pipeline.report.tables import fmt

from .test_pipeline import SIZE, _config, _run, dataset  # noqa: F401  (the dataset fixture)

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.timeout(600)
# the scalar metric columns the report summarises, in the schema's order
METRIC_SCALARS = ["pointing_game", "relevance_rank_accuracy", "top_k_intersection", "attribution_localisation",
                  "sparseness", "complexity", "effective_complexity", "faithfulness_correlation", "region_morf_aopc",
                  "region_lerf_aopc", "region_abpc", "road_auc", "random_logit"]
SETTINGS = dict(metrics=["all"], correlation_runs=3, correlation_subset=12, region_patch=16, region_steps=3,
                road_percentages=[10, 60], top_k_pixels=50)


def test_every_metric_column_equals_its_function(dataset, tmp_path, local_ray):  # noqa: F811
    config = _config(dataset, tmp_path, **SETTINGS)
    manifest = _run(config)
    assert manifest["totals"]["explained"] == 6
    table = pd.read_parquet(tmp_path / "run" / "stats").sort_values(["shard", "row"]).reset_index(drop=True)
    with h5py.File(tmp_path / "run" / "relevance.h5") as handle:
        relevance = torch.from_numpy(handle["relevance"][:])
    np.testing.assert_allclose(table.sparseness, maps.sparseness(relevance).float(), rtol=1e-6)
    np.testing.assert_allclose(table.complexity, maps.complexity(relevance).float(), rtol=1e-6)
    np.testing.assert_array_equal(table.effective_complexity, maps.effective_complexity(relevance))
    assert table.pointing_game.isna().all() and table.top_k_intersection.isna().all()  # no boxes in this set
    records = {r.image_id: r for r in load_records(dataset)}
    x = torch.stack([load(records[i], Preprocessing.for_size(SIZE))[0] for i in table.image_id])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vgg = build_vgg("vgg11", "random")[0]
    target = torch.tensor(table.target.to_numpy())
    for order in ("morf", "lerf"):
        curves = np.stack(table[f"region_{order}"].to_numpy())
        expected = model_metrics.region_perturbation(vgg, x, relevance, target, 16, 3, order)
        np.testing.assert_allclose(curves, expected.numpy(), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(table.region_abpc, table.region_morf_aopc - table.region_lerf_aopc, rtol=1e-5,
                               atol=1e-7)
    road = np.stack(table.road.to_numpy())
    assert road.shape == (6, 2) and set(np.unique(road)) <= {0.0, 1.0}
    assert (table.random_logit_class != table.target).all() and table.random_logit.between(-1, 1).all()
    assert table.faithfulness_correlation.between(-1, 1).all() and (table.metrics_seconds > 0).all()
    assert manifest["config"]["metrics"] == ["all"]
    _check_report_section(tmp_path / "run", table)


def _check_report_section(run, table: pd.DataFrame) -> None:
    """The report's Evaluation metrics section summarises exactly the metrics the run computed, each row's mean
    the column's mean; a run without metrics gets no section."""
    stats = open_run(run).stats
    headings, rows = metrics_report.overall(stats, metrics_report.metric_columns(stats))
    summarised = {row[0]: row for row in rows}
    computed = [c for c in METRIC_SCALARS if table[c].notna().any()]
    assert list(summarised) == computed and "pointing_game" not in summarised  # no boxes: nothing to summarise
    for name in computed:
        values = table[name].astype(float)
        assert summarised[name][headings.index("mean")] == fmt(values.mean())
        assert summarised[name][headings.index("images")] == fmt(int(values.notna().sum()))
    class_headings, class_rows = metrics_report.per_class(stats, metrics_report.metric_columns(stats), False)
    assert sum(int(row[2]) for row in class_rows) == len(table) and class_headings[3:] == computed
    section = metrics_report.section(stats, False)
    assert section is not None and 'id="metrics"' in section and "faithfulness_correlation" in section
    without = stats.assign(**{name: None for name in computed})
    assert metrics_report.section(without, False) is None


@pytest.mark.parametrize("values,message", [
    ({"metrics": ["pointing_game", "sparsity"]}, "metrics names an unknown metric 'sparsity'"),
    ({"metrics": "localisation,bogus"}, "unknown metric 'bogus'"),
    ({"pointing_tolerance": -1}, "pointing_tolerance must be a number of pixels >= 0"),
    ({"metrics": ["top_k_intersection"], "top_k_pixels": 64 * 64 + 1}, "top_k_pixels must be at most 4096"),
    ({"metrics": ["region_perturbation"], "region_patch": 16, "region_steps": 17}, "region_steps must be at most 16"),
    ({"region_score": "probability"}, "region_score must be one of logit, softmax"),
    ({"road_percentages": [0, 50]}, "road_percentages must be a list of percentages in (0, 100)"),
    ({"road_noise": -0.1}, "road_noise must be a number >= 0"),
    ({"metrics": ["faithfulness_correlation"], "correlation_runs": 1}, "correlation_runs must be at least 2"),
])
def test_bad_metric_settings_stop_in_one_line(values, message, tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config({"dataset": str(tmp_path), "size": 64, **values})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_groups_expand_to_their_metrics():
    assert expand(["all"]) == METRICS and expand([]) == ()
    assert expand(["randomisation", "sparseness"]) == ("sparseness", "random_logit")
