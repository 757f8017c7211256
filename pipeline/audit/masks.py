"""Masks of an artifact and R_bias, the share of an image's positive relevance inside its mask (Reveal to Revise's
artifact relevance, Arras et al.'s relevance mass accuracy on the positive part, as the run's `positive_in_box`).

Masks come as the dataset gives them (demo/shapes.py's masks.npz): an .npz file with `mask`, (M, H, W) boolean in
each image's own pixels (as decoded: EXIF orientation applied), and `image_id` (M,) naming the images; or `mask`
alone, (H, W), one mask for every image (an artifact at a fixed place). Each mask goes through the run's resize
(nearest) and centre crop, as the run's boxes do, so that it lines up with the maps."""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..errors import PipelineError
from ..preprocess import EXIF_ORIENTATION, Preprocessing
from ..reading import DecodeError, read_bytes

ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class MaskError(PipelineError, ValueError):
    """Masks that cannot be used: unreadable, of the wrong shape or size, naming no image of the run."""


@dataclass
class Masks:
    """Masks by image id, or one mask shared by every image."""

    source: str
    by_image: dict[str, np.ndarray] = field(default_factory=dict)
    shared: np.ndarray | None = None

    def of(self, image_id: str) -> np.ndarray | None:
        return self.shared if self.shared is not None else self.by_image.get(image_id)


def read_masks(path: str | Path) -> Masks:
    """The masks of an .npz file (module docstring); MaskError naming the file when it is not one."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError) as problem:
        raise MaskError(f"{path}: not a readable .npz file of masks ({problem})") from None
    if "mask" not in arrays:
        raise MaskError(f"{path}: no array `mask` (found: {', '.join(arrays) or 'none'}); masks come as the dataset's "
                        "masks.npz: `mask` (M, H, W) with `image_id` (M,), or one (H, W) `mask` for every image")
    mask = arrays["mask"]
    if mask.dtype != bool and not (np.issubdtype(mask.dtype, np.number) and np.isin(mask, (0, 1)).all()):
        raise MaskError(f"{path}: `mask` must be boolean or 0/1, got {mask.dtype}")
    mask = mask.astype(bool)
    if "image_id" not in arrays:
        if mask.ndim != 2:
            raise MaskError(f"{path}: without `image_id`, `mask` must be one (H, W) mask, got shape {mask.shape}")
        return Masks(str(path), shared=mask)
    ids = arrays["image_id"]
    if mask.ndim != 3 or ids.shape != (len(mask),):
        raise MaskError(f"{path}: `mask` (M, H, W) and `image_id` (M,) expected, got {mask.shape} and {ids.shape}")
    return Masks(str(path), by_image={str(i): m for i, m in zip(ids.tolist(), mask)})


def image_size(path: str, member: str | None) -> tuple[int, int]:
    """(height, width) of an image as decoded (EXIF orientation applied), from its header."""
    try:
        with Image.open(io.BytesIO(read_bytes(path, member))) as image:
            width, height = image.size
            orientation = int(image.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except (OSError, DecodeError, ValueError) as problem:
        raise MaskError(f"{path}{f' ({member})' if member else ''}: cannot read the image's size to place its mask "
                        f"({problem})") from None
    return (width, height) if orientation in ROTATED else (height, width)


def mask_in_map(mask: np.ndarray, size: int) -> np.ndarray:
    """(size, size) bool: a mask in the image's pixels through the run's resize (nearest) and centre crop."""
    preprocessing = Preprocessing.for_size(size)
    steps = v2.Compose([v2.Resize(preprocessing.resize, interpolation=v2.InterpolationMode.NEAREST),
                        v2.CenterCrop(preprocessing.crop)])
    return steps(tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(mask))[None])).numpy()[0].astype(bool)


def map_masks(masks: Masks, images: list[tuple[str, str, str | None]], size: int) -> dict[str, np.ndarray]:
    """image id -> its mask in map pixels, for the run's `images` (image id, path, tar member) that have one. A mask
    whose size is not its image's is a MaskError naming both; masks naming no image of the run are an error too."""
    out: dict[str, np.ndarray] = {}
    placed: dict[tuple[int, int], np.ndarray] = {}  # the shared mask, per image size
    for image_id, path, member in images:
        mask = masks.of(image_id)
        if mask is None:
            continue
        height, width = image_size(path, member)
        if mask.shape != (height, width):
            raise MaskError(f"{masks.source}: the mask of {image_id} is {mask.shape[0]}x{mask.shape[1]} (HxW) but "
                            f"the image is {height}x{width}: masks are in the image's own pixels")
        if masks.shared is not None:
            if (height, width) not in placed:
                placed[(height, width)] = mask_in_map(mask, size)
            out[image_id] = placed[(height, width)]
        else:
            out[image_id] = mask_in_map(mask, size)
    if not out:
        raise MaskError(f"{masks.source}: no mask names an image of the run")
    return out


def positive_share(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(N,) float64 R_bias: positive relevance inside the mask / all positive relevance, for (N, H, W) maps and
    masks; NaN for a map without positive relevance (nothing to share)."""
    positive = np.clip(np.asarray(maps, np.float64), 0, None).reshape(len(maps), -1)
    inside = (positive * np.asarray(masks, bool).reshape(len(masks), -1)).sum(axis=1)
    total = positive.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / np.where(total > 0, total, 1), np.nan)
