"""The run's tables, each column declared once: the per-image statistics (Parquet), the failures (Parquet) and
the per-image columns beside the maps (HDF5). Rows are built from these declarations (`stats_rows`,
`failure_row`, `map_columns`), so a new statistic is computed in stats.py under its column name and declared
here, nothing more."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

GROUPS = ("record", "prediction", "map", "localisation", "faithfulness", "concepts", "bookkeeping", "metrics")
# columns the worker fills in from the image record, its boxes, the class names and the batch's bookkeeping;
# every other statistics column is computed by pipeline/stats.py or pipeline/faithfulness.py
SUPPLIED_GROUPS = ("record", "bookkeeping")


@dataclass(frozen=True)
class Column:
    """One declared column: name, Arrow type, what it means, whether it may be null, which group it is in."""

    name: str
    kind: pa.DataType
    doc: str
    group: str
    nullable: bool = True

    def field(self) -> pa.Field:
        """The Arrow field as the files store it (the doc as metadata; the group is not written)."""
        return pa.field(self.name, self.kind, nullable=self.nullable, metadata={"doc": self.doc})


# one concept layer's top channels in a statistics row (`concepts_by_layer`)
CONCEPT_LAYER_TOP = pa.struct([pa.field("layer", pa.string()), pa.field("top", pa.list_(pa.int64())),
                               pa.field("share", pa.list_(pa.float32()))])

STATS_COLUMNS = (
    Column("image_id", pa.string(), "image id (file stem), unique in the dataset", "record", False),
    Column("path", pa.string(), "image file (for WebDataset: the tar shard holding `member`)", "record", False),
    Column("member", pa.string(), "the image's member name in the tar shard `path` (null: `path` is the image)",
           "record"),
    Column("wnid", pa.string(), "WordNet id of the label", "record"),
    Column("label", pa.int64(), "class index of the label in the model's classes (ILSVRC's for ImageNet)", "record"),
    Column("label_name", pa.string(), "class name of the label", "record"),
    Column("pred", pa.int64(), "predicted class index", "prediction", False),
    Column("pred_name", pa.string(), "predicted class name", "record"),  # looked up in the dataset's class names
    Column("target", pa.int64(), "class the map explains", "prediction", False),
    Column("target_probability", pa.float32(), "softmax probability of the target class", "prediction", False),
    Column("target_logit", pa.float32(), "logit of the target class", "prediction", False),
    Column("pred_probability", pa.float32(), "softmax probability of the predicted class", "prediction", False),
    Column("pred_logit", pa.float32(), "logit of the predicted class", "prediction", False),
    Column("top5", pa.list_(pa.int64()), "the five highest-scoring classes, best first", "prediction", False),
    Column("correct", pa.bool_(), "prediction equals label (null without label)", "prediction"),
    Column("relevance_sum", pa.float32(), "sum of the map", "map", False),
    Column("positive_sum", pa.float32(), "sum of the map's positive values", "map", False),
    Column("negative_sum", pa.float32(), "sum of the map's negative values", "map", False),
    Column("max_abs", pa.float32(), "largest absolute value of the map", "map", False),
    Column("conservation", pa.float32(), "sum of the map / the start relevance (the target logit; 1 for a softmax "
           "start): the share of the decision the map explains (null when the start is 0)", "map"),
    Column("absorbed", pa.float32(), "1 - conservation: the share absorbed on the way by biases, stabilisers and "
           "the top-k filter (negative where biases added relevance)", "map"),
    Column("positive_in_top1pct", pa.float32(), "share of positive relevance in the top 1 % of pixels", "map"),
    Column("positive_in_top5pct", pa.float32(), "share of positive relevance in the top 5 % of pixels", "map"),
    Column("positive_in_top10pct", pa.float32(), "share of positive relevance in the top 10 % of pixels", "map"),
    Column("gini", pa.float32(), "Gini sparsity of |relevance| (0 even, 1 one pixel)", "map"),
    Column("entropy", pa.float32(), "entropy of positive relevance over pixels / log(pixels)", "map"),
    Column("centre_row", pa.float32(), "row of the positive relevance's centre of mass (map pixels)", "map"),
    Column("centre_col", pa.float32(), "column of the positive relevance's centre of mass (map pixels)", "map"),
    Column("pointing_game_hit", pa.bool_(),
           "arg-max pixel inside a label box (null without boxes, or without positive relevance)", "localisation"),
    Column("positive_in_box", pa.float32(), "relevance mass accuracy (Arras et al. 2022, 'sum,pos' pooling): "
           "positive relevance inside the label boxes / all positive relevance (null without boxes)", "localisation"),
    Column("boxes", pa.list_(pa.list_(pa.float32())), "label boxes in map pixels, each [x_min, y_min, x_max, "
           "y_max] (null without boxes)", "record"),
    Column("shard", pa.string(), "relevance shard file holding the map", "bookkeeping", False),
    Column("row", pa.int64(), "row of the map in that shard's `relevance` dataset", "bookkeeping", False),
    Column("seconds", pa.float32(), "explanation time of the image's batch, per image", "bookkeeping", False),
    # pixel flipping (pipeline/faithfulness.py), null unless the run has `faithfulness: true`
    Column("aopc_morf", pa.float32(), "AOPC of the target logit, regions perturbed most relevant first",
           "faithfulness"),
    Column("aopc_random", pa.float32(), "AOPC of the target logit, regions perturbed in a random order",
           "faithfulness"),
    Column("flip_curve_morf", pa.list_(pa.float32()),
           "target logit after k = 0..flip_steps regions perturbed, most relevant first", "faithfulness"),
    Column("flip_curve_random", pa.list_(pa.float32()),
           "target logit after k = 0..flip_steps regions perturbed, in a random order (the baseline)", "faithfulness"),
    Column("flip_seconds", pa.float32(), "pixel flipping time (both orders) of the image's batch, per image",
           "faithfulness"),
    # concepts (CRP, pipeline/concepts/), null unless the run has `concepts: layers`; share = value / sum |R| over
    # the layer's channels (CRP's normalisation)
    Column("concepts_top", pa.list_(pa.int64()), "the first concept layer's (`concepts.maps_layer`'s) `concepts.top` "
           "most relevant channels, most relevant first (by summed relevance at the layer's output)", "concepts"),
    Column("concepts_top_share", pa.list_(pa.float32()), "their relevance shares: each channel's relevance / the sum "
           "of |relevance| over the layer's channels", "concepts"),
    Column("concepts_by_layer", pa.list_(CONCEPT_LAYER_TOP), "every concept layer's top channels and shares, in "
           "`concepts.layers` order: {layer, top, share}", "concepts"),
    # the evaluation metrics (pipeline/metrics/, docs/metrics.md): each as Quantus 0.6.0 computes it, with the
    # run's `metrics` settings; null unless the run's `metrics` names it (default: localisation and complexity).
    # Maps are normalised per image by their largest |value| (Quantus: by the batch's; docs/metrics.md).
    Column("pointing_game", pa.bool_(), "pointing game (Zhang et al. 2018): a pixel holding the map's largest "
           "value lies within `pointing_tolerance` pixels of a label box (Quantus PointingGame: 0; TorchRay: 15 px "
           "at 224; ties: any maximum counts; null without boxes)", "metrics"),
    Column("relevance_rank_accuracy", pa.float32(), "relevance rank accuracy (Arras et al. 2022): share of the K "
           "highest-relevance pixels inside the label boxes, K = the boxes' pixels (null without boxes)", "metrics"),
    Column("top_k_intersection", pa.float32(), "top-k intersection (Theiner et al. 2021): share of the "
           "`top_k_pixels` highest-relevance pixels inside the label boxes (Quantus default k 1000; null without "
           "boxes)", "metrics"),
    Column("attribution_localisation", pa.float32(), "attribution localisation (Kohlbrenner et al. 2020): |R| "
           "inside the label boxes / (all |R| + 1e-9), R normalised by its largest |value| (Quantus's defaults: "
           "abs, unweighted; null without boxes)", "metrics"),
    Column("sparseness", pa.float32(), "Quantus Sparseness (Chalasani et al. 2020): Gini index of |R| / max|R| + "
           "1e-7 (`gini` is the same without the 1e-7)", "metrics"),
    Column("complexity", pa.float32(), "Quantus Complexity (Bhatt et al. 2020): entropy in nats of |R| / sum |R| "
           "over pixels, log(p + 1e-12) (`entropy` differs: positive part, divided by log(pixels))", "metrics"),
    Column("effective_complexity", pa.int64(), "effective complexity (Nguyen and Martinez 2020): pixels with "
           "|R| / max|R| > `effective_complexity_eps` (Quantus default 1e-5)", "metrics"),
    Column("faithfulness_correlation", pa.float32(), "faithfulness correlation (Bhatt et al. 2020): Pearson, over "
           "`correlation_runs` random subsets of `correlation_subset` input values (C x H x W), between their "
           "relevance sum and the target logit's drop when they are set to the image's minimum (Quantus: 100 runs "
           "of 224, 'black' baseline, logits)", "metrics"),
    Column("region_morf", pa.list_(pa.float32()), "region perturbation (Samek et al. 2017), most relevant first: "
           "f(x) - f(x_k), k = 1..`region_steps`, the k first `region_patch`-square regions (centred padding) set "
           "to the image's minimum; f the target's `region_score` (Quantus: softmax; Samek et al.: logit)",
           "metrics"),
    Column("region_lerf", pa.list_(pa.float32()), "region perturbation, least relevant first (as region_morf)",
           "metrics"),
    Column("region_morf_aopc", pa.float32(), "AOPC of region_morf: sum / (region_steps + 1)", "metrics"),
    Column("region_lerf_aopc", pa.float32(), "AOPC of region_lerf: sum / (region_steps + 1)", "metrics"),
    Column("region_abpc", pa.float32(), "area between the perturbation curves (Schulz et al. 2020): "
           "region_morf_aopc - region_lerf_aopc (high: the map orders regions by their effect)", "metrics"),
    Column("road", pa.list_(pa.float32()), "ROAD (Rong et al. 2022), MoRF: 1 where the model still predicts the "
           "target with the `road_percentages` % most relevant pixels replaced, all channels, by noisy linear "
           "imputation (noise std `road_noise`), else 0", "metrics"),
    Column("road_auc", pa.float32(), "mean of `road` over its percentages (low: the map finds what the model "
           "needs)", "metrics"),
    Column("random_logit", pa.float32(), "random logit (Sixt et al. 2020): SSIM (1-D, window 7, as Quantus) between "
           "the map and the map of `random_logit_class`, each / its largest |value| (low: the map depends on the "
           "class)", "metrics"),
    Column("random_logit_class", pa.int64(), "the other class random logit explained, drawn uniformly from the "
           "classes but the target (seeded by the image id and `metric_seed`)", "metrics"),
    Column("metrics_seconds", pa.float32(), "time of the batch's evaluation metrics, per image", "metrics"),
)

FAILURE_COLUMNS = (
    Column("image_id", pa.string(), "image id", "record", False),
    Column("path", pa.string(), "image file (for WebDataset: the tar shard holding `member`)", "record", False),
    Column("member", pa.string(), "the image's member name in the tar shard `path` (null: `path` is the image)",
           "record"),
    Column("reason", pa.string(), "why it could not be read or explained", "bookkeeping", False),
    Column("shard", pa.int64(), "shard index", "bookkeeping", False),
)

# relmax.parquet (pipeline/concepts/tables.py): relevance maximisation (CRP's RelMax) and its per-class form (RelStats)
RELMAX_COLUMNS = (
    Column("layer", pa.string(), "the concept layer (a module name, `concepts.layers`)", "concepts", False),
    Column("channel", pa.int64(), "the channel (concept) of the layer", "concepts", False),
    Column("class", pa.int64(), "the class explained (`target` of the statistics; null: over all images, RelMax)",
           "concepts"),
    Column("rank", pa.int64(), "0 = the image with the largest value for this channel (and class); ties by dataset "
           "order", "concepts", False),
    Column("image_id", pa.string(), "the image (joins the statistics' `image_id`)", "concepts", False),
    Column("shard", pa.string(), "relevance shard file holding the image's maps and concept outputs", "concepts",
           False),
    Column("row", pa.int64(), "row of the image in that shard", "concepts", False),
    Column("value", pa.float32(), "the channel's relevance (summed over space) / the sum of |relevance| over the "
           "layer's channels: CRP's normalised RelMax value", "concepts", False),
    Column("neuron", pa.int64(), "flat position of the channel's most relevant neuron in the layer's output grid: "
           "neuron_row * width + neuron_col", "concepts", False),
    Column("neuron_row", pa.int64(), "its row in the layer's output grid", "concepts", False),
    Column("neuron_col", pa.int64(), "its column in the layer's output grid", "concepts", False),
)

STATS_SCHEMA = pa.schema([column.field() for column in STATS_COLUMNS])
FAILURE_SCHEMA = pa.schema([column.field() for column in FAILURE_COLUMNS])
RELMAX_SCHEMA = pa.schema([column.field() for column in RELMAX_COLUMNS])


def columns_of(group: str, columns: Sequence[Column] = STATS_COLUMNS) -> tuple[str, ...]:
    """Names of a group's columns, in file order."""
    if group not in GROUPS:
        raise ValueError(f"unknown column group {group!r}; the groups are {', '.join(GROUPS)}")
    return tuple(column.name for column in columns if column.group == group)


FLIP_COLUMNS = columns_of("faithfulness")  # pixel flipping's columns (pipeline/faithfulness.py)
CONCEPT_COLUMNS = columns_of("concepts")  # the concept columns (pipeline/concepts/)


# the relevance shard's per-image datasets, row for row with its `relevance` maps: stats columns (strings stored
# as strings, numbers as arrays of the column's type), each with the value stored for a null
MAP_COLUMNS: dict[str, Any] = {"image_id": None, "path": None, "label": -1, "pred": None, "target": None}


def map_columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, list | np.ndarray]:
    """The relevance shard's per-image datasets from its statistics rows (label -1: no label)."""
    out: dict[str, list | np.ndarray] = {}
    for name, missing in MAP_COLUMNS.items():
        values = [missing if row[name] is None else row[name] for row in rows]
        kind = STATS_SCHEMA.field(name).type
        out[name] = values if pa.types.is_string(kind) else np.array(values, dtype=kind.to_pandas_dtype())
    return out


def failure_row(image_id: str, path: str, reason: str, shard: int, member: str | None = None) -> dict[str, Any]:
    """One row of FAILURE_SCHEMA: an image that could not be read or explained, and why."""
    return {"image_id": image_id, "path": path, "member": member, "reason": reason, "shard": shard}


def stats_rows(columns: Mapping[str, Any], count: int) -> list[dict[str, Any]]:
    """`count` rows of STATS_SCHEMA from per-image columns by name (tensors, arrays or sequences, one value per
    image), each value converted by its field's Arrow type; a column not given is null in every row. A column
    with no field in the schema is an error, so that no computed statistic is silently left out."""
    unknown = sorted(set(columns) - set(STATS_SCHEMA.names))
    if unknown:
        raise ValueError(f"columns without a field in STATS_SCHEMA (declare them in pipeline/schema.py): "
                         f"{', '.join(unknown)}")
    for name, values in columns.items():
        if len(values) != count:
            raise ValueError(f"column {name} has {len(values)} values for {count} images")
    # each column as plain Python once (one tolist per tensor, not one tensor index per image and column)
    present = [(field.name, converter(field.type), _as_list(columns[field.name])) for field in STATS_SCHEMA
               if field.name in columns]
    rows = []
    for i in range(count):
        row = dict.fromkeys(STATS_SCHEMA.names)
        for name, convert, values in present:
            row[name] = convert(values[i])
        rows.append(row)
    return rows


def converter(kind: pa.DataType) -> Callable[[Any], Any]:
    """How one value becomes the plain Python a pyarrow column of `kind` takes: floats with NaN as null,
    booleans from a number (NaN: null), integers, lists via tolist; None stays null."""
    if pa.types.is_floating(kind):
        return _nullable(_finite_or_none)
    if pa.types.is_boolean(kind):
        return _nullable(_bool_or_none)
    if pa.types.is_integer(kind):
        return _nullable(int)
    if pa.types.is_list(kind):
        return _nullable(_plain)
    return lambda value: value


def _nullable(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else convert(value)


def _finite_or_none(value: Any) -> float | None:
    number = float(value)
    return None if math.isnan(number) else number


def _bool_or_none(value: Any) -> bool | None:
    number = _finite_or_none(value)  # a boolean statistic computed as 0. / 1. with NaN for "not defined"
    return None if number is None else bool(number)


def _as_list(values: Any) -> Sequence[Any]:
    return values.tolist() if hasattr(values, "tolist") else values


def _plain(value: Any) -> Any:
    """Tensors and arrays via tolist, tuples as lists, mappings (structs) as dicts, nested."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Mapping):  # a struct
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, Iterable) and not isinstance(value, str):
        return [_plain(item) for item in value]
    return value
