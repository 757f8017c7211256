"""What SpRAy reads of a run: the statistics columns that place each map (shard, row) and name its classes
(Parquet column projection; no map is read here), each image's position in dataset order (the order of the run's
relevance.h5 virtual dataset), and the model's class names and ids."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..run_reader import map_size, open_run_folder, read_json, read_stats, run_config

COLUMNS = ("image_id", "path", "wnid", "label", "label_name", "pred", "pred_name", "target", "pred_probability",
           "target_probability", "shard", "row")
BY = ("pred", "label")


class SprayRunError(ValueError):
    """The run cannot be analysed; the message names the culprit."""


@dataclass
class RunIndex:
    root: Path
    manifest: dict
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


def _class_table(manifest: dict, table: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Class names (the artifact's, else the names seen in the statistics) and ids: the dataset's wnids where a
    label shows them, ImageNet's for a 1000-class model, else 'c' + the zero-padded index."""
    names = list((manifest.get("artifact") or {}).get("class_names") or [])
    seen = max(int(table["pred"].max()) if len(table) else -1, int(table["label"].max()) if table["label"].notna().any()
               else -1) + 1
    count = max(len(names), seen)
    for column, name_column in (("label", "label_name"), ("pred", "pred_name")):
        if len(names) < count:
            names += [""] * (count - len(names))
        known = table[[column, name_column]].dropna().drop_duplicates(column)
        for index, name in zip(known[column].astype(int), known[name_column]):
            if not names[index]:
                names[index] = str(name)
    wnids = [""] * count
    if count == 1000:
        from ..classes import imagenet_classes

        wnids = list(imagenet_classes().wnids)
    labelled = table[["label", "wnid"]].dropna().drop_duplicates("label")
    for index, wnid in zip(labelled["label"].astype(int), labelled["wnid"]):
        wnids[index] = str(wnid)
    wnids = [w or f"c{i:08d}" for i, w in enumerate(wnids)]
    names = [n or wnids[i] for i, n in enumerate(names)]
    return names, wnids


def open_run_index(root: str | Path) -> RunIndex:
    """Read the run's statistics (the columns above) and manifest; SprayRunError when it is not a run."""
    layout = open_run_folder(root, SprayRunError)
    manifest = read_json(layout.manifest, SprayRunError)
    table = read_stats(layout, SprayRunError, COLUMNS).to_pandas()
    if table.empty:
        raise SprayRunError(f"{root}: the run explained no image")
    table = table.sort_values(["shard", "row"], kind="stable").reset_index(drop=True)
    table["index"] = np.arange(len(table), dtype=np.int64)  # = the row of relevance.h5 (shards in order, rows in order)
    names, wnids = _class_table(manifest, table)
    size = map_size(layout, run_config(layout, manifest, SprayRunError), SprayRunError)
    complete = layout.manifest.is_file() and layout.success.is_file()
    return RunIndex(layout.root, manifest, table, names, wnids, size, complete)
