"""The prototypes' tables (RUN/prototypes/images.parquet and prototypes.parquet), each column declared once with its
type and doc (stored as each Parquet field's `doc`; docs/outputs.md is generated from them)."""
from __future__ import annotations

import pyarrow as pa

from ..schema import Column

GROUP = "prototypes"

PROTOTYPE_IMAGE_COLUMNS = (
    Column("image_id", pa.string(), "image id (the statistics' `image_id`: join on it)", GROUP, False),
    Column("layer", pa.string(), "the concept layer whose relevance vectors were modelled", GROUP, False),
    Column("class", pa.int64(), "the class the image's concept relevance explains (the statistics' `target`: the "
           "predicted class unless the run explained another)", GROUP, False),
    Column("prototype", pa.int64(), "the image's most probable prototype (mixture component) of its class, 0 = the "
           "heaviest", GROUP, False),
    Column("probability", pa.float32(), "the posterior probability of that prototype", GROUP, False),
    Column("log_likelihood", pa.float64(), "log density of the image's normalised concept-relevance vector under "
           "its class's mixture (over all C concepts: the mixture in the leading principal components, an isotropic "
           "Gaussian in the rest); low = unusual for the class", GROUP, False),
    Column("outlier_rank", pa.int64(), "rank of log_likelihood within the class, 0 = the lowest (the most unusual "
           "image); ties by dataset order", GROUP, False),
    Column("over_concepts", pa.list_(pa.int64()), "the channels the image uses most above its prototype's mean "
                                                  "profile, largest deviation first", GROUP, False),
    Column("over_deviations", pa.list_(pa.float32()), "their deviations: the image's share of relevance minus the "
           "prototype's mean share (> 0)", GROUP, False),
    Column("under_concepts", pa.list_(pa.int64()), "the channels the image uses most below its prototype's mean "
                                                   "profile, largest shortfall first", GROUP, False),
    Column("under_deviations", pa.list_(pa.float32()), "their deviations (< 0)", GROUP, False),
)

PROTOTYPE_COLUMNS = (
    Column("layer", pa.string(), "the concept layer", GROUP, False),
    Column("class", pa.int64(), "the class (the statistics' `target`)", GROUP, False),
    Column("prototype", pa.int64(), "the prototype's number within the class, 0 = the heaviest", GROUP, False),
    Column("components", pa.int64(), "the class's number of prototypes (BIC's choice)", GROUP, False),
    Column("weight", pa.float32(), "the mixture weight: the prototype's share of the class", GROUP, False),
    Column("images", pa.int64(), "the class's images whose most probable prototype it is", GROUP, False),
    Column("closest", pa.list_(pa.string()), "image ids of its closest images (its members with the highest density "
                                             "under it), closest first", GROUP, False),
    Column("closest_log_density", pa.list_(pa.float32()), "their log densities under the prototype (in the class's "
           "principal components)", GROUP, False),
    Column("top_concepts", pa.list_(pa.int64()), "the channels with the largest mean share of relevance, largest "
                                                 "first", GROUP, False),
    Column("top_shares", pa.list_(pa.float32()), "their mean shares", GROUP, False),
    Column("mean", pa.list_(pa.float32()), "the mean concept profile: per channel (C values), the posterior-"
           "weighted mean of the class's normalised concept relevance (each image's relevance / its sum of |R|)",
           GROUP, False),
)

PROTOTYPE_IMAGE_SCHEMA = pa.schema([column.field() for column in PROTOTYPE_IMAGE_COLUMNS])
PROTOTYPE_SCHEMA = pa.schema([column.field() for column in PROTOTYPE_COLUMNS])
