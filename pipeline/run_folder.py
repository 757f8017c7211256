"""The run folder's lifecycle: may this run use OUT (resume, extend, replace or refuse), preparing it, and which
shards are already done. File names come from RunLayout."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from lrp_module.files import atomic

from .config import RunConfig
from .datasets.records import ImageRecord
from .errors import RunError
from .layout import RunLayout


def shards_of(records: list[ImageRecord], size: int) -> list[list[ImageRecord]]:
    """Fixed shards in dataset order: shard i always holds the same images."""
    return [records[i:i + size] for i in range(0, len(records), size)]


def replaces_previous_run(layout: RunLayout, config: RunConfig, overwrite: bool) -> bool:
    """Before any work: may this run use OUT? True when it replaces a run of another configuration
    (--overwrite). A run of the same configuration resumes; one with a larger limit extends it (its shards are a
    prefix of the new ones); anything else is refused, naming what differs."""
    if not layout.run_file.is_file():
        return False
    try:
        identity = json.loads(layout.run_file.read_text())["identity"]
    except (OSError, ValueError, KeyError, TypeError):
        if overwrite:
            return True
        raise RunError(f"{layout.run_file}: unreadable run record; use --overwrite or another OUT") from None
    current = config.identity()
    changed = sorted(k for k, v in current.items() if k != "limit" and identity.get(k) != v)
    if "concepts" in identity and "concepts" not in current:  # a run with concepts, now without them
        changed.append("concepts")
    if not changed and not _limit_extends(identity.get("limit"), config.limit):
        changed = ["limit (smaller than the finished run's: its shards would no longer match)"]
    if not changed:
        return False
    if not overwrite:
        raise RunError(f"{layout.root} holds a run with another configuration (differs in {', '.join(changed)}); "
                       "use --overwrite (removes only the run's own files) or another OUT")
    return True


def _limit_extends(previous: int | None, current: int | None) -> bool:
    """A run's shards are a prefix of a run over more images: the same or a larger limit (None = all) extends."""
    return current is None or (previous is not None and current >= previous)


def prepare(layout: RunLayout, config: RunConfig, replace: bool) -> None:
    """Remove the replaced run's own files, make the folders, sweep a killed run's unfinished files, and record
    this run's identity (what marks the folder as a run)."""
    try:
        if replace:
            layout.remove_own()
        layout.make_folders()
        layout.sweep_temporary()
        with atomic(layout.run_file) as tmp:
            tmp.write_text(json.dumps({"digest": config.digest(), "identity": config.identity()}, indent=2))
    except OSError as error:
        raise RunError(f"run directory {layout.root} is not writable: {error.strerror or error}") from None


def shard_matches(layout: RunLayout, index: int, shard: list[ImageRecord]) -> bool:
    """A shard is done when its files exist and hold exactly its images (a shorter last shard of a run with a
    smaller limit is redone when the limit grows)."""
    if not layout.shard_done(index):
        return False
    try:
        ids = (pq.read_table(layout.stats_shard(index), columns=["image_id"]).column(0).to_pylist()
               + pq.read_table(layout.failure_shard(index), columns=["image_id"]).column(0).to_pylist())
    except (OSError, pa.ArrowException):
        return False
    return sorted(ids) == sorted(record.image_id for record in shard)


def unfinished(layout: RunLayout, shards: list[list[ImageRecord]], replace: bool = False) -> list[int]:
    """The shards still to explain (all of them when the run replaces another)."""
    return [i for i, shard in enumerate(shards) if replace or not shard_matches(layout, i, shard)]
