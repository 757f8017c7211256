"""Open a run directory for reporting: the manifest, the statistics columns the report uses (Parquet column
projection, no map is read here), the failures; and the maps of chosen rows only, each shard opened once."""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from ..layout import RunLayout

# Never needed by the report (wide list / repeated string columns); everything else is read.
UNUSED_COLUMNS = ("top5", "wnid")


class ReportError(ValueError):
    """The run cannot be reported on; the message names the culprit."""


@dataclass
class RunData:
    root: Path
    manifest: dict
    stats: pd.DataFrame
    failures: pd.DataFrame
    list_columns: list[str] = field(default_factory=list)  # per-image curves (list<float>), if the run has any
    complete: bool = True  # manifest.json and _SUCCESS exist: the run finished

    @property
    def config(self) -> dict:
        """The run's configuration: the manifest's, or (unfinished run) what run.json recorded when it started."""
        return self.manifest.get("config") or self.manifest.get("identity") or {}

    @property
    def size(self) -> int:
        """Side of the (square) maps and crops."""
        return int(self.config.get("size") or 224)

    @property
    def has_labels(self) -> bool:
        return bool(self.stats["correct"].notna().any()) if len(self.stats) else False


def open_run(root: str | Path) -> RunData:
    """Read what the report needs from a run directory; ReportError when it is not one."""
    if not str(root).strip():
        raise ReportError("no run directory given (RUN=...)")
    root = Path(root)
    layout = RunLayout(root)
    stats_dir = root / RunLayout.STATS
    if not root.is_dir():
        raise ReportError(f"{root}: no such run directory")
    if not stats_dir.is_dir() or not any(stats_dir.glob("shard-*.parquet")):
        raise ReportError(f"{root}: not a run directory (no stats/shard-*.parquet)")
    manifest_file = layout.manifest
    complete = manifest_file.is_file() and layout.success.is_file()
    source = manifest_file if manifest_file.is_file() else layout.run_file
    try:
        manifest = json.loads(source.read_text()) if source.is_file() else {}
    except json.JSONDecodeError as error:
        raise ReportError(f"{source}: not valid JSON ({error})") from None
    if not manifest_file.is_file():  # unfinished: only run.json's identity, no totals (they are counted)
        manifest = {"identity": manifest.get("identity", {})}
    try:
        dataset = ds.dataset(sorted(str(p) for p in stats_dir.glob("shard-*.parquet")), format="parquet")
        columns = [f.name for f in dataset.schema if f.name not in UNUSED_COLUMNS]
        table = dataset.to_table(columns=columns)
    except (pa.ArrowInvalid, OSError) as error:
        raise ReportError(f"{stats_dir}: unreadable statistics ({error})") from None
    list_columns = [f.name for f in table.schema if (pa.types.is_list(f.type) or pa.types.is_large_list(f.type))
                    and not pa.types.is_list(f.type.value_type)]  # curves; not the boxes (lists of boxes)
    stats = table.to_pandas()
    failure_files = [layout.failures] if layout.failures.is_file() and complete else [
        p for p in sorted((root / RunLayout.FAILURES).glob("shard-*.parquet"))]
    tables = [pq.read_table(p).to_pandas() for p in failure_files]
    failures = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(
        columns=["image_id", "path", "reason", "shard"])
    return RunData(root=root, manifest=manifest, stats=stats, failures=failures, list_columns=list_columns,
                   complete=complete)


def read_maps(root: Path, rows: pd.DataFrame) -> dict[str, np.ndarray]:
    """image_id -> its (H, W) float32 map, for the given stats rows only; each shard file is opened once and
    read in row order. A shard outside the run directory or missing is an error naming it."""
    by_shard: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for image_id, shard, row in zip(rows["image_id"], rows["shard"], rows["row"]):
        by_shard[shard].append((int(row), image_id))
    resolved_root = root.resolve()
    maps: dict[str, np.ndarray] = {}
    for shard, wanted in by_shard.items():
        path = (root / shard).resolve()
        if not path.is_relative_to(resolved_root):
            raise ReportError(f"map shard {shard!r} lies outside the run directory {root}")
        try:
            with h5py.File(path, "r") as handle:
                relevance = handle["relevance"]
                for row, image_id in sorted(wanted):
                    maps[image_id] = np.asarray(relevance[row], dtype=np.float32)
        except (OSError, KeyError, IndexError, ValueError) as error:
            raise ReportError(f"{path}: cannot read maps ({error})") from None
    return maps
