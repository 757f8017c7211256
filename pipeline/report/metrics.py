"""The report's "Evaluation metrics" section: every per-image metric the run computed (the schema's "metrics"
group, docs/metrics.md) summarised over the images (count, mean, spread, quartiles) with its definition, and its
mean per class, so an auditor can cite each figure with the protocol that produced it."""
from __future__ import annotations

import pandas as pd
import pyarrow as pa

from ..schema import STATS_COLUMNS, Column
from . import html
from .selection import NO_LABEL, class_key
from .tables import class_names, fmt

# bookkeeping of the metrics group, not a metric: the timing and the class random logit drew
NOT_SUMMARISED = ("metrics_seconds", "random_logit_class")


def _scalar(column: Column) -> bool:
    kind = column.kind
    return pa.types.is_boolean(kind) or pa.types.is_floating(kind) or pa.types.is_integer(kind)


def metric_columns(stats: pd.DataFrame) -> list[Column]:
    """The run's scalar metric columns that hold a value for at least one image, in the schema's order (the
    curves, `region_morf`, `region_lerf` and `road`, are summarised by their scalar columns and plotted under
    Distributions)."""
    return [c for c in STATS_COLUMNS if c.group == "metrics" and _scalar(c) and c.name not in NOT_SUMMARISED
            and c.name in stats and bool(stats[c.name].notna().any())]


def _values(stats: pd.DataFrame, name: str) -> pd.Series:
    """The column as floats (a boolean metric as 0/1: its mean is the rate), missing values dropped."""
    return stats[name].astype("Float64").dropna().astype(float)


def overall(stats: pd.DataFrame, columns: list[Column]) -> tuple[list[str], list[list[str]]]:
    """One row per metric: images with a value, mean, standard deviation, quartiles, and the definition."""
    headings = ["metric", "images", "mean", "sd", "25 %", "median", "75 %", "definition (docs/metrics.md)"]
    rows = []
    for column in columns:
        values = _values(stats, column.name)
        quartiles = values.quantile([0.25, 0.5, 0.75]).tolist()
        rows.append([column.name, fmt(len(values)), fmt(values.mean()), fmt(values.std(ddof=1)),
                     *(fmt(q) for q in quartiles), column.doc])
    return headings, rows


def per_class(stats: pd.DataFrame, columns: list[Column], by_label: bool) -> tuple[list[str], list[list[str]]]:
    """One row per class (by label when the run has labels, else by prediction): its images and each metric's
    mean over them."""
    key = class_key(stats, by_label)
    names = class_names(stats, by_label)
    frame = pd.DataFrame({c.name: stats[c.name].astype("Float64") for c in columns}).assign(_class=key.to_numpy())
    groups = frame.groupby("_class", sort=True)
    means, counts = groups.mean(), groups.size()
    rows = []
    for cls in means.index:
        label = "no label" if int(cls) == NO_LABEL else str(int(cls))
        rows.append([label, names.get(int(cls), "–"), fmt(int(counts.loc[cls])),
                     *(fmt(means.loc[cls, c.name]) for c in columns)])
    return ["class", "name", "images", *(c.name for c in columns)], rows


def section(stats: pd.DataFrame, by_label: bool) -> str | None:
    """The section's HTML, or None when the run computed no metric (`metrics: []`, the default)."""
    columns = metric_columns(stats)
    if not columns:
        return None
    body = html.table(*overall(stats, columns))
    body += "<h3>Mean per class</h3>" + html.table(*per_class(stats, columns, by_label))
    note = ("Each metric as Quantus 0.6.0 computes it, with the run's `metrics` settings (manifest.json); a boolean "
            "metric's mean is its rate. Per-image values: the statistics' columns of the same names.")
    return html.section("metrics", "Evaluation metrics", body, note)
