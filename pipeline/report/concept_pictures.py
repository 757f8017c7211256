"""`make concepts`' pictures (`python -m pipeline concepts RUN --layer L`): each concept's reference crops
(pipeline/concepts/references.py) as PNGs, the crop and its conditional map per reference and a grid per channel,
in RUN/concept-references/ (RunLayout) or --out; the report's Concepts section draws its grids the same way."""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..concepts import references as refs
from ..concepts.run_concepts import open_concepts
from ..layout import RunLayout
from .heatmap import DEFAULT_COLOUR_MAP, heatmap_image, lookup_table

GRID_TILE = 96  # pixels of each picture in a channel's grid


def safe_layer(layer: str) -> str:
    """A layer's module name as it appears in file names: letters, digits, '.' and '_', no leading dot."""
    return re.sub(r"[^A-Za-z0-9._]+", "_", layer).lstrip(".") or "layer"


def file_stem(layer: str, channel: int, klass: int | None) -> str:
    """`<layer>-c<channel>[-k<class>]`, file-name safe."""
    return f"{safe_layer(layer)}-c{channel}" + ("" if klass is None else f"-k{klass}")


def heatmap_picture(heat: np.ndarray, cmap: str) -> Image.Image:
    """The crop's map as an RGB picture, scaled by its own max|R| (as CRP's reference heat maps)."""
    return heatmap_image(heat, cmap).convert("RGB")


def grid(shown: Sequence[refs.ReferenceImage], cmap: str, tile: int = GRID_TILE) -> Image.Image:
    """One channel's references side by side: the crops above, their conditional maps below (grey where the
    image could not be read), each resized to `tile` pixels."""
    sheet = Image.new("RGB", (max(1, len(shown)) * (tile + 2), 2 * tile + 2), (255, 255, 255))
    for i, ref in enumerate(shown):
        if ref.image is not None:
            crop = Image.fromarray(ref.image).resize((tile, tile), Image.Resampling.BILINEAR)
            heat = heatmap_picture(ref.heatmap, cmap).resize((tile, tile), Image.Resampling.NEAREST)
        else:
            crop = heat = Image.new("RGB", (tile, tile), (200, 200, 200))
        sheet.paste(crop, (i * (tile + 2), 0))
        sheet.paste(heat, (i * (tile + 2), tile + 2))
    return sheet


def write_pictures(found: dict[int, list[refs.ReferenceImage]], folder: Path, cmap: str) -> list[Path]:
    """<stem>-r<rank>-image.png and -heatmap.png per reference and <stem>-grid.png per channel; returns them."""
    written = []
    for channel, shown in found.items():
        if not shown:
            continue
        stem = file_stem(shown[0].layer, channel, shown[0].klass)
        for ref in shown:
            if ref.image is None:
                continue
            for kind, picture in (("image", Image.fromarray(ref.image)), ("heatmap", heatmap_image(ref.heatmap, cmap))):
                path = folder / f"{stem}-r{ref.rank}-{kind}.png"
                picture.save(path, compress_level=1)
                written.append(path)
        path = folder / f"{stem}-grid.png"
        grid(shown, cmap).save(path, compress_level=1)
        written.append(path)
    return written


def write_references(run_dir: str | Path, layer: str, channels: Sequence[int] | None = None,
                     klass: int | None = None, n: int = refs.DEFAULT_REFERENCES, out: str | Path | None = None,
                     cmap: str = DEFAULT_COLOUR_MAP, dtype: torch.dtype = torch.float32) -> list[Path]:
    """`make concepts`: the reference PNGs of `channels` of `layer` (default: the most relevant ones) into `out`
    (default RUN/concept-references). Every argument is checked before anything is written; returns the files."""
    if n <= 0:
        raise refs.ConceptsError(f"--references must be >= 1 (got {n})")
    lookup_table(cmap)
    concepts = open_concepts(run_dir, refs.ConceptsError)
    concepts.check_layer(layer)
    if klass is not None and not concepts.has_class(layer, klass):
        raise refs.ConceptsError(f"class {klass}: no image of the run was explained for it (no RelMax entry at "
                                 f"{layer})")
    chosen = refs.choose_channels(concepts, layer, channels, klass)
    lrp = refs.run_lrp(concepts.manifest, dtype)
    found = refs.references(concepts, lrp, layer, chosen, klass, n)
    folder = Path(out) if out else RunLayout(concepts.root).concept_references
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise refs.ConceptsError(f"{folder}: cannot write ({error.strerror or error})") from None
    for shown in found.values():
        for ref in shown:
            if ref.problem:
                print(f"{ref.image_id}: {ref.problem}: left out of channel {ref.channel}'s references")
    return write_pictures(found, folder, cmap)
