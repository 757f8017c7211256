"""One shown image as three pictures beside the report: the preprocessed crop the map belongs to (resize and
centre crop as in the pipeline, no normalisation), the heat map, and the overlay. A missing or unreadable image
file leaves the heat map alone."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw

from ..preprocess import DecodeError, Preprocessing, decode, geometry, read_bytes
from . import html
from .files import inside, safe_name
from .heatmap import heatmap_image, overlay


@dataclass(frozen=True)
class TileFiles:
    """File names (relative to the image folder) of one image's pictures; image/overlay None when unreadable."""
    heatmap: str
    image: str | None
    overlay: str | None
    problem: str | None = None

    def tile(self, image_id: str, prefix: str, caption: list[str], verdict: bool | None = None) -> html.Tile:
        """The page's tile of these pictures, linked as prefix + name."""
        return html.Tile(image_id, prefix + self.heatmap, self.image and prefix + self.image,
                         self.overlay and prefix + self.overlay, caption, verdict, self.problem)


def preprocessing_for(size: int) -> Preprocessing:
    """The pipeline's 256/224 recipe at the run's crop size (as pipeline/worker.py builds it)."""
    return Preprocessing.for_size(size)


def display_crop(path: str, preprocessing: Preprocessing, member: str | None = None) -> np.ndarray:
    """(crop, crop, 3) uint8: the image (`member` of the tar shard `path`, when given) as the model saw it, before
    normalisation (the same uint8 tensor resize and crop as pipeline.preprocess, so the map's pixels line up
    exactly). Raises DecodeError."""
    data = read_bytes(path, member)
    image = torch.from_numpy(np.asarray(decode(data)).copy()).permute(2, 0, 1)  # as preprocess() does
    for transform in geometry(preprocessing):
        image = transform(image)
    return image.permute(1, 2, 0).numpy()


def members(rows: pd.DataFrame) -> list[str | None]:
    """Each statistics row's tar member name: None for a plain image file (and in runs made before the column)."""
    if "member" not in rows:
        return [None] * len(rows)
    return [member if isinstance(member, str) else None for member in rows["member"]]


BOX_COLOUR = (0, 255, 0)


def draw_boxes(picture: np.ndarray, boxes) -> np.ndarray:
    """The picture with each box (x_min, y_min, x_max, y_max in map pixels) outlined, one pixel wide."""
    if boxes is None or not len(boxes):
        return picture
    image = Image.fromarray(picture)
    draw = ImageDraw.Draw(image)
    for x0, y0, x1, y1 in boxes:
        draw.rectangle([round(x0), round(y0), max(round(x0), round(x1) - 1), max(round(y0), round(y1) - 1)],
                       outline=BOX_COLOUR)
    return np.asarray(image)


def render(image_id: str, path: str, relevance: np.ndarray, folder: Path, cmap: str, photo_format: str = "jpg",
           boxes=None, member: str | None = None) -> TileFiles:
    """Write <name>-heatmap.png, and <name>-image.<photo_format> / <name>-overlay.<photo_format> when the image
    can be read (`member` of the tar shard `path`, when given), the label boxes outlined on both. PNG keeps the heat
    map's colours exact; JPEG keeps the report's photographs small and fast."""
    stem = safe_name(image_id)
    heat_name = f"{stem}-heatmap.png"
    heatmap_image(relevance, cmap).save(inside(folder, heat_name), compress_level=1)
    try:
        crop = display_crop(path, preprocessing_for(relevance.shape[0]), member)
    except DecodeError as error:
        return TileFiles(heat_name, None, None, f"image not available ({error})")
    if crop.shape[:2] != relevance.shape:  # a non-square map: fit the crop to it rather than fail
        crop = np.asarray(Image.fromarray(crop).resize(relevance.shape[::-1], Image.BILINEAR))
    image_name, overlay_name = f"{stem}-image.{photo_format}", f"{stem}-overlay.{photo_format}"
    options = {"quality": 90} if photo_format == "jpg" else {"compress_level": 1}
    Image.fromarray(draw_boxes(crop, boxes)).save(inside(folder, image_name), **options)
    Image.fromarray(draw_boxes(overlay(crop, relevance, cmap), boxes)).save(inside(folder, overlay_name), **options)
    return TileFiles(heat_name, image_name, overlay_name)


def render_rows(rows: pd.DataFrame, maps: dict[str, np.ndarray], folder: Path, cmap: str) -> dict[str, TileFiles]:
    """image_id -> its files, for statistics rows (their `boxes` outlined where the rows have them) and their maps;
    each image rendered once however many rows name it (threads: PIL and zlib release the GIL while encoding and
    decoding)."""
    unique = rows.drop_duplicates("image_id")
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        boxes = unique["boxes"] if "boxes" in unique else [None] * len(unique)
        futures = {image_id: pool.submit(render, image_id, path, maps[image_id], folder, cmap, boxes=image_boxes,
                                         member=member)
                   for image_id, path, image_boxes, member in zip(unique["image_id"], unique["path"], boxes,
                                                                  members(unique))}
        return {image_id: future.result() for image_id, future in futures.items()}
