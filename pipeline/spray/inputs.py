"""What SpRAy reads of a run: the statistics columns that place each map (shard, row) and name its classes
(Parquet column projection; no map is read here), each image's position in dataset order (the order of the run's
relevance.h5 virtual dataset), and the model's class names and ids."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import PipelineError
from ..run_manifest import Manifest, class_table, read_manifest
from ..run_reader import map_size, open_run_folder, read_stats

COLUMNS = ("image_id", "path", "wnid", "label", "label_name", "pred", "pred_name", "target", "pred_probability",
           "target_probability", "shard", "row")
BY = ("pred", "label")


class SprayRunError(PipelineError, ValueError):
    """The run cannot be analysed; the message names the culprit."""


@dataclass
class RunIndex:
    root: Path
    manifest: Manifest
    table: pd.DataFrame  # COLUMNS + `index` (position in dataset order), sorted by it
    class_names: list[str]
    wnids: list[str]
    size: int  # side of the maps: the configuration's, else the shards' (run_reader.map_size)
    complete: bool = True  # manifest.json and _SUCCESS exist; else only the shards finished so far are analysed

    def classes_by(self, by: str) -> pd.Series:
        """Each image's class under `by`: `pred` (the predicted class) or `label` (-1 where unlabelled)."""
        if by not in BY:
            raise SprayRunError(f"unknown grouping {by!r} (known: {', '.join(BY)})")
        column = self.table[by]
        return column.fillna(-1).astype(np.int64)


def open_run_index(root: str | Path) -> RunIndex:
    """Read the run's statistics (the columns above) and manifest; SprayRunError when it is not a run."""
    layout = open_run_folder(root, SprayRunError)
    manifest = read_manifest(layout)
    table = read_stats(layout, SprayRunError, COLUMNS, optional=("member",)).to_pandas()
    if table.empty:
        raise SprayRunError(f"{root}: the run explained no image")
    table = table.sort_values(["shard", "row"], kind="stable").reset_index(drop=True)
    table["index"] = np.arange(len(table), dtype=np.int64)  # = the row of relevance.h5 (shards in order, rows in order)
    seen = max(int(table["pred"].max()) if len(table) else -1,
               int(table["label"].max()) if table["label"].notna().any() else -1) + 1
    names, wnids = class_table(manifest, seen)
    size = map_size(layout, manifest, SprayRunError)
    complete = layout.manifest.is_file() and layout.success.is_file()
    return RunIndex(layout.root, manifest, table, names, wnids, size, complete)
