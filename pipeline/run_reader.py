"""Reading a run folder for analysis (the report, SpRAy): is it a run, the side of its maps, its statistics by column
(Parquet projection, no map read), the maps of chosen rows, shard file by shard file (its manifest:
run_manifest.py), and a run's concept outputs (CRP: concept relevance, neurons, concept maps, relmax.parquet).
Each reader passes its own error class, so that its messages name the culprit in its own terms."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds

from .concepts import outputs as concept_outputs
from .concepts.outputs import ConceptsRecord
from .errors import PipelineError
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


# ---------------------------------------------------------------------------------------------- concepts (CRP)
class ConceptsReadError(PipelineError, ValueError):
    """A run's concept outputs cannot be read (no concepts in the run, unknown layer, unreadable shard)."""


def concepts_record(layout: RunLayout, error: type[Exception] = ConceptsReadError) -> ConceptsRecord:
    """What the run's concept outputs hold (layers with channels and grids, maps layer, K): the `concepts`
    attribute of its relevance shards; `error` when the run has none."""
    for shard in _relevance_shards(layout):
        try:
            with h5py.File(shard, "r") as handle:
                text = handle.attrs.get(concept_outputs.ATTRIBUTE)
        except OSError as problem:
            raise error(f"{shard}: unreadable relevance shard ({problem})") from None
        if text is not None:
            return ConceptsRecord.from_json(text if isinstance(text, str) else text.decode())
    raise error(f"{layout.root}: the run has no concept outputs (explain it with CONCEPTS=<layer> / `concepts:` in "
                "configs/run.yaml)")


def concept_relevance(layout: RunLayout, layer: str, normalised: bool = False,
                      error: type[Exception] = ConceptsReadError) -> tuple[list[str], np.ndarray]:
    """(image ids, (N, C) float32) every explained image's concept relevance at `layer` (summed over space), in
    dataset order (shard by shard, row by row); normalised: divided by each row's sum of |R| (CRP's RelMax value)."""
    ids, values = [], []
    for _, handle_ids, value in _concept_arrays(layout, concept_outputs.relevance_name(layer), layer, error):
        ids += handle_ids
        values.append(value.astype(np.float32))
    record = concepts_record(layout, error)
    matrix = np.concatenate(values) if values else np.zeros((0, record.layer(layer).channels), np.float32)
    if normalised:
        matrix = (matrix / (np.abs(matrix).sum(axis=1, keepdims=True) + 1e-10)).astype(np.float32)
    return ids, matrix


def concept_positions(layout: RunLayout, layer: str, error: type[Exception] = ConceptsReadError
                      ) -> tuple[list[str], np.ndarray]:
    """(image ids, (N, C) int64) each channel's most relevant neuron at `layer` as a flat position in the layer's
    grid (`concepts_record(...).layer(layer)`: height x width), in dataset order."""
    ids, values = [], []
    for _, handle_ids, value in _concept_arrays(layout, concept_outputs.position_name(layer), layer, error):
        ids += handle_ids
        values.append(value.astype(np.int64))
    return ids, np.concatenate(values) if values else np.zeros((0, 0), np.int64)


def concept_maps(layout: RunLayout, rows: pd.DataFrame, error: type[Exception] = ConceptsReadError
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(channels (M, K) int64, maps (M, K, H, W) float32) of the statistics rows `rows` (columns `shard`, `row`;
    e.g. rows of read_stats or relmax_table), in their order: each image's K most relevant channels of the maps
    layer and their conditional maps."""
    if concepts_record(layout, error).maps == 0:
        raise error(f"{layout.root}: the run has no concept maps (concepts.maps: 0)")
    channels: list[np.ndarray] = [np.zeros((0, 0), np.int64)] * len(rows)
    maps: list[np.ndarray] = [np.zeros((0, 0, 0, 0), np.float32)] * len(rows)
    frame = pd.DataFrame({"shard": rows["shard"].to_numpy(), "row": rows["row"].to_numpy(),
                          "_position": np.arange(len(rows))})
    root = layout.root.resolve()
    for shard, group in frame.groupby("shard", sort=True):
        path = (layout.root / shard).resolve()
        if not path.is_relative_to(root):
            raise error(f"shard {shard!r} lies outside the run directory {layout.root}")
        wanted = group["row"].to_numpy()
        unique, inverse = np.unique(wanted, return_inverse=True)
        try:
            with h5py.File(path, "r") as handle:
                got_channels = handle[concept_outputs.CHANNELS][unique.tolist()][inverse]
                got_maps = handle[concept_outputs.MAPS][unique.tolist()][inverse].astype(np.float32)
        except (OSError, KeyError, IndexError, ValueError, TypeError) as problem:
            raise error(f"{path}: cannot read concept maps ({problem})") from None
        for position, c, m in zip(group["_position"], got_channels, got_maps):
            channels[position], maps[position] = c.astype(np.int64), m
    if not len(rows):
        return np.zeros((0, 0), np.int64), np.zeros((0, 0, 0, 0), np.float32)
    return np.stack(channels), np.stack(maps)


def relmax_table(layout: RunLayout, layer: str | None = None, error: type[Exception] = ConceptsReadError
                 ) -> pd.DataFrame:
    """relmax.parquet (columns: pipeline/schema.py RELMAX_SCHEMA): per layer, channel and class (null: all images)
    the most relevant images by rank; only `layer`'s rows when given."""
    if not layout.relmax.is_file():
        raise error(f"{layout.relmax}: no relevance maximisation table (the run has no concepts, or has not "
                    "finished)")
    try:
        table = pd.read_parquet(layout.relmax, filters=[("layer", "==", layer)] if layer is not None else None)
    except (OSError, pa.ArrowException) as problem:
        raise error(f"{layout.relmax}: unreadable ({problem})") from None
    return table


def _relevance_shards(layout: RunLayout) -> list[Path]:
    folder = layout.root / RunLayout.RELEVANCE
    return sorted(folder.glob("shard-*.h5")) if folder.is_dir() else []


def _concept_arrays(layout: RunLayout, name: str, layer: str, error: type[Exception]
                    ) -> Iterator[tuple[Path, list[str], np.ndarray]]:
    """(shard, image ids, the dataset `name`) of each relevance shard with explained images, in shard order."""
    try:
        concepts_record(layout, error).layer(layer)
    except KeyError as problem:
        raise error(f"{layout.root}: {problem.args[0]}") from None
    for shard in _relevance_shards(layout):
        try:
            with h5py.File(shard, "r") as handle:
                if handle["relevance"].shape[0] == 0:
                    continue  # a shard none of whose images was explained
                ids = [i.decode() if isinstance(i, bytes) else str(i) for i in handle["image_id"][:]]
                yield shard, ids, handle[name][:]
        except (OSError, KeyError) as problem:
            raise error(f"{shard}: cannot read {name} ({problem})") from None
