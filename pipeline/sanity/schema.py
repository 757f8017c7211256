"""The randomisation test's table (RUN/sanity.parquet), each column declared once with its type and doc (stored
as each Parquet field's `doc`; docs/outputs.md is generated from it)."""
from __future__ import annotations

import pyarrow as pa

from ..schema import Column

SANITY_COLUMNS = (
    Column("image_id", pa.string(), "image id (the run's `image_id`)", "record", False),
    Column("shard", pa.string(), "the run's map shard of the image (as the statistics' `shard`)", "record", False),
    Column("row", pa.int64(), "the image's row in that shard", "record", False),
    Column("target", pa.int64(), "class explained (the run's `target`), kept for every randomised model", "record",
           False),
    Column("mode", pa.string(), "cascading (the top `step` layers randomised) | independent (only `layer`)", "test",
           False),
    Column("step", pa.int64(), "0: the original model; s: the s-th layer from the top randomised", "test", False),
    Column("layer", pa.string(), "the module randomised at this step (`original` at step 0)", "test", False),
    Column("pred", pa.int64(), "the class the (randomised) model predicts", "test", False),
    Column("spearman_abs", pa.float64(), "Spearman rank correlation of |original map| and |randomised map| "
           "(Quantus's MPRT default: abs, normalised by the largest |value|)", "test"),
    Column("spearman", pa.float64(), "Spearman rank correlation of the signed maps (Adebayo et al.'s second)",
           "test"),
    Column("ssim", pa.float64(), "SSIM of the two |maps| normalised by their largest |value| (the 2-D map, 7x7 "
           "window; `--ssim flat`: Quantus's MPRT, the flattened map, a 1-D window of 7)", "test"),
    Column("top_k_intersection", pa.float64(), "share of the original |map|'s k highest pixels among the randomised "
           "|map|'s k highest (k: `--intersection-k`, 1000 pixels as Quantus's TopKIntersection)", "test"),
    Column("entropy", pa.float64(), "eMPRT's complexity: entropy (nats) of the histogram of the raw map, 100 "
           "equal-width bins over its range", "test"),
    Column("emprt", pa.float64(), "eMPRT: (entropy - the original map's) / the original map's; on the last "
           "cascading step (every layer random) Quantus's EfficientMPRT score", "test"),
)
SANITY_SCHEMA = pa.schema([column.field() for column in SANITY_COLUMNS])
