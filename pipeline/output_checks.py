"""Checks on the run directory made before anything is written: it can be written to, and its disk has room
for what the run will write (an estimate), so that a bad OUT is one clear line, not a failure hours in."""
from __future__ import annotations

import shutil
from pathlib import Path

from lrp_module.files import temporary_path

from .errors import PipelineError
from .layout import RunLayout

STATS_BYTES_PER_IMAGE = 1024  # a Parquet row and its share of the failures / manifest files, generously
FIXED_BYTES = 256 * 1024  # run.json, manifest, virtual dataset, failures
COMPRESSED_SHARE = 0.25  # gzip+shuffle kept 0.38 of a float16 VGG16 map when measured; 0.25 errs on "enough"


class OutputCheckError(PipelineError, RuntimeError):
    """The run directory cannot hold this run; the message names it and says what to do."""


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(out: Path) -> None:
    """Create OUT (and parents) and write a probe file in it; undo whatever this created, so that a refused
    run leaves nothing behind. Root ignores permission bits, so only a real write tells."""
    out = out.absolute()
    created: list[Path] = []
    probe = temporary_path(out / "write-probe")
    try:
        missing = out
        while not missing.exists() and missing != missing.parent:
            created.append(missing)
            missing = missing.parent
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"probe")
    except OSError as error:
        raise OutputCheckError(f"run directory {out} is not writable: {error.strerror or error}") from None
    finally:
        if probe.is_file():
            probe.unlink()
        for directory in created:
            if directory.is_dir():
                directory.rmdir()


def estimated_bytes(images: int, size: int, map_dtype: str, compression: int, maps_per_image: int = 1) -> int:
    """A low estimate of what `images` more maps and their statistics take on disk (`maps_per_image`: the map and
    any concept maps)."""
    raw = size * size * (2 if map_dtype == "float16" else 4)
    per_map = raw if compression == 0 else int(raw * COMPRESSED_SHARE)
    return images * (maps_per_image * per_map + STATS_BYTES_PER_IMAGE) + FIXED_BYTES


def check_free_space(out: Path, images: int, size: int, map_dtype: str, compression: int,
                     maps_per_image: int = 1) -> None:
    """Refuse when the disk holding OUT clearly cannot take the run (the estimate is deliberately low)."""
    need = estimated_bytes(images, size, map_dtype, compression, maps_per_image)
    free = shutil.disk_usage(_existing_ancestor(out)).free
    if free < need:
        raise OutputCheckError(
            f"not enough free space for {out}: about {_mb(need)} needed for {images * maps_per_image} maps of "
            f"{size}x{size} "
            f"{map_dtype}, {_mb(free)} free; free space, choose another --out, or pass --no-space-check")


def _mb(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


def dataset_folder(root: str) -> Path:
    """The folder a dataset lives in: the root itself, or for a tar shard / glob the folder of its shards."""
    text = str(root)
    if any(ch in text for ch in "*?[") or text.endswith(".tar"):
        parts = Path(text).parts
        plain = [p for p in parts[:-1] if not any(ch in p for ch in "*?[")]
        return Path(*plain) if plain else Path(".")
    return Path(text)


def check_out_placement(out: Path, root: str, is_run: bool) -> None:
    """Refuse an OUT that is the dataset, lies inside it or contains it (a run there, or its --overwrite, would
    mix with or delete the user's images), and an existing non-empty folder that is not a run folder (a lock that a
    killed run left is the run's own file: run_lock recovers it)."""
    dataset = dataset_folder(root).resolve()
    target = out.resolve()
    if target == dataset:
        raise OutputCheckError(f"--out {out} is the dataset ({root}): choose another run directory")
    if target.is_relative_to(dataset):
        raise OutputCheckError(f"--out {out} is inside the dataset ({root}): choose a run directory outside it")
    if dataset.is_relative_to(target):
        raise OutputCheckError(f"--out {out} contains the dataset ({root}): choose a run directory beside it")
    if target.is_dir() and not is_run and any(p.name != RunLayout.LOCK for p in target.iterdir()):
        raise OutputCheckError(f"--out {out} exists, is not empty and is not a run folder (no run.json): "
                               "choose a new or empty directory")
    if target.exists() and not target.is_dir():
        raise OutputCheckError(f"--out {out} is a file, not a directory")
