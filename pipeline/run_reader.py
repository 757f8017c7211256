"""Reading a run folder for analysis (the report, SpRAy): is it a run, the side of its maps, its statistics by column
(Parquet projection, no map read), and the maps of chosen rows, shard file by shard file (its manifest:
run_manifest.py). Each reader passes its own error class, so that its messages name the culprit in its own terms."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds

from .layout import RunLayout
from .run_manifest import Manifest


def open_run_folder(root: str | Path, error: type[Exception]) -> RunLayout:
    """The layout of the run at `root`; `error` when none is given, it is missing, or it holds no statistics."""
    if not str(root).strip():
        raise error("no run directory given (RUN=...)")
    layout = RunLayout(root)
    if not layout.root.is_dir():
        raise error(f"{root}: no such run directory")
    if not layout.stats_shards():
        raise error(f"{root}: not a run directory (no stats/shard-*.parquet)")
    return layout


def map_size(layout: RunLayout, manifest: Manifest, error: type[Exception]) -> int:
    """The side of the run's (square) maps: the recorded configuration's `size` (manifest.json, or run.json for an
    unfinished run), else the shape the shards store; never a guess (a wrong size makes views of the shards
    unreadable)."""
    if manifest.config.size:
        return manifest.config.size
    for shard in sorted((layout.root / RunLayout.RELEVANCE).glob("shard-*.h5")):
        try:
            with h5py.File(shard, "r") as handle:
                return int(handle["relevance"].shape[-1])
        except (OSError, KeyError, IndexError):
            continue
    raise error(f"{layout.root}: no size in manifest.json or run.json and no readable relevance shard")


def read_stats(layout: RunLayout, error: type[Exception], columns: Sequence[str] | None = None,
               leave_out: Sequence[str] = (), optional: Sequence[str] = ()) -> pa.Table:
    """The statistics of every shard, only `columns` (all when None) less `leave_out`; `optional` columns are read
    where the run has them (a run made before a column was added lacks it)."""
    try:
        dataset = ds.dataset([str(p) for p in layout.stats_shards()], format="parquet")
        names = list(columns) if columns is not None else [f.name for f in dataset.schema]
        names += [name for name in optional if name in dataset.schema.names and name not in names]
        return dataset.to_table(columns=[name for name in names if name not in leave_out])
    except (pa.ArrowInvalid, OSError, KeyError) as problem:
        raise error(f"{layout.root / RunLayout.STATS}: unreadable statistics ({problem})") from None


def map_pieces(root: Path, rows: pd.DataFrame, size: int, error: type[Exception]
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(positions, maps) for `rows` (columns `shard`, `row`, `_position`) in pieces of at most `size` maps, shard
    file by shard file, each file opened once and its rows read in increasing order (HDF5 chunk order). A shard
    outside the run folder, or unreadable, is `error` naming it."""
    resolved_root = root.resolve()
    for shard, group in rows.groupby("shard", sort=True):
        path = (root / shard).resolve()
        if not path.is_relative_to(resolved_root):
            raise error(f"map shard {shard!r} lies outside the run directory {root}")
        order = np.argsort(group["row"].to_numpy(), kind="stable")
        positions = group["_position"].to_numpy()[order]
        wanted = group["row"].to_numpy()[order]
        try:
            with h5py.File(path, "r") as handle:
                relevance = handle["relevance"]
                for start in range(0, len(wanted), size):
                    piece = wanted[start:start + size]
                    unique, inverse = np.unique(piece, return_inverse=True)  # h5py wants increasing, distinct rows
                    yield positions[start:start + size], relevance[unique.tolist()][inverse]
        except (OSError, KeyError, IndexError, ValueError, TypeError) as problem:
            raise error(f"{path}: cannot read maps ({problem})") from None
