"""Open a run directory for reporting: the manifest, the statistics columns the report uses (Parquet column
projection, no map is read here), the failures; and the maps of chosen rows only, each shard opened once."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import PipelineError
from ..run_manifest import Manifest, RecordedConfig, read_manifest
from ..run_reader import map_pieces, map_size, open_run_folder, read_stats
from ..schema import CONCEPT_COLUMNS

# Never needed by the report (wide list / repeated string columns; the concept columns: the Concepts section reads the
# run's concept outputs itself); everything else is read.
UNUSED_COLUMNS = ("top5", "wnid", *CONCEPT_COLUMNS)


class ReportError(PipelineError, ValueError):
    """The run cannot be reported on; the message names the culprit."""


@dataclass
class RunData:
    root: Path
    manifest: Manifest
    size: int  # side of the (square) maps and crops: run_reader.map_size
    stats: pd.DataFrame
    failures: pd.DataFrame
    list_columns: list[str] = field(default_factory=list)  # per-image curves (list<float>), if the run has any
    complete: bool = True  # manifest.json and _SUCCESS exist: the run finished

    @property
    def config(self) -> RecordedConfig:
        """The run's configuration: the manifest's, or (unfinished run) what run.json recorded when it started."""
        return self.manifest.config

    @property
    def has_labels(self) -> bool:
        return bool(self.stats["correct"].notna().any()) if len(self.stats) else False


def open_run(root: str | Path) -> RunData:
    """Read what the report needs from a run directory; ReportError when it is not one."""
    layout = open_run_folder(root, ReportError)
    root = layout.root
    complete = layout.manifest.is_file() and layout.success.is_file()
    manifest = read_manifest(layout)  # unfinished: only run.json's identity, no totals (they are counted)
    table = read_stats(layout, ReportError, leave_out=UNUSED_COLUMNS)
    list_columns = [f.name for f in table.schema if (pa.types.is_list(f.type) or pa.types.is_large_list(f.type))
                    and not pa.types.is_list(f.type.value_type)]  # curves; not the boxes (lists of boxes)
    stats = table.to_pandas()
    failure_files = [layout.failures] if layout.failures.is_file() and complete else layout.failure_shards()
    tables = [pq.read_table(p).to_pandas() for p in failure_files]
    failures = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(
        columns=["image_id", "path", "reason", "shard"])
    return RunData(root=root, manifest=manifest, size=map_size(layout, manifest, ReportError), stats=stats,
                   failures=failures, list_columns=list_columns, complete=complete)


def read_maps(root: Path, rows: pd.DataFrame) -> dict[str, np.ndarray]:
    """image_id -> its (H, W) float32 map, for the given stats rows only; each shard file is opened once and
    read in row order. A shard outside the run directory or missing is an error naming it."""
    image_ids = rows["image_id"].to_numpy()
    located = rows[["shard", "row"]].assign(_position=np.arange(len(rows)))
    maps: dict[str, np.ndarray] = {}
    for positions, pieces in map_pieces(Path(root), located, max(1, len(rows)), ReportError):
        for position, relevance_map in zip(positions, pieces):
            maps[image_ids[position]] = np.asarray(relevance_map, dtype=np.float32)
    return maps
