"""Decode an image as the eye sees it and apply the weights' preprocessing, boxes through the same resize/crop.

Preprocessing is torchvision's ImageNet recipe (Resize 256 bilinear with antialiasing, CenterCrop 224,
normalisation), done with torchvision.transforms.v2 so that bounding boxes follow the image exactly.
"""
from __future__ import annotations

import errno
import io
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torchvision import tv_tensors
from torchvision.transforms import v2

from lrp_module.weights_recipe import IMAGENET_MEAN, IMAGENET_RECIPE, IMAGENET_STD, ImageRecipe

from .datasets.records import Box, ImageRecord
from .reading import DEFAULT_MAX_IMAGE_BYTES, DecodeError, read_bytes

# Oversized images are refused by `decode` itself (a failure row); Pillow's own warning would only add noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# Unsigned 16-bit grey (PNG, TIFF, PGM, ...): scaled by the type's range, 65535 -> 255 (as torchvision's
# ToDtype(scale=True) does for 16-bit PNGs). Pillow opens some of them in mode I (32-bit): those are 16-bit
# when their format holds at most 16 bits per sample or their raw mode is one of these.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
SIXTEEN_BIT_FORMATS = ("PNG", "PPM")  # mode I from these is 16-bit (PGM with a maxval < 65535 is scaled by Pillow)
# 32-bit float and integer samples have no defined range (0..1? 0..255? Hounsfield units?): rescaling them per
# image would silently change what the model sees, so they are failure rows (convert them to 8 or 16 bits)
NO_RANGE_MODES = {"F": "32-bit float", "I": "32-bit integer"}
# The resize makes the short side 256/224 of the crop before the centre crop: a 4000x1 image would become
# 256 x 1,024,000 (0.8 GB) at 224 px. Beyond this ratio of long to short side an image is a failure row;
# up to it the resized image stays under 50 x 1.3 x crop^2 pixels (10 MB at 224 px, a fraction of LRP's own
# memory per image at any crop size) and is resized exactly as always.
MAX_ASPECT_RATIO = 50


@dataclass(frozen=True)
class Preprocessing:
    """One preprocessing setting (hashable: its transforms are built once); the defaults are the weights' recipe
    at 224 px (lrp_module.weights_recipe)."""

    resize: int = IMAGENET_RECIPE.resize
    crop: int = IMAGENET_RECIPE.crop
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def from_recipe(cls, recipe: ImageRecipe) -> Preprocessing:
        return cls(resize=recipe.resize, crop=recipe.crop, mean=recipe.mean, std=recipe.std)

    @classmethod
    def for_size(cls, size: int, recipe: ImageRecipe = IMAGENET_RECIPE) -> Preprocessing:
        """The weights' recipe for a `size` x `size` input (resize round(size * 256 / 224), crop size)."""
        return cls.from_recipe(recipe.at_crop(size))

    def transforms(self) -> v2.Compose:
        return _transforms(self)


def geometry(preprocessing: Preprocessing) -> list[v2.Transform]:
    """The resize and centre crop alone: what the maps' pixels line up with (the report shows this crop)."""
    p = preprocessing
    return [v2.Resize(p.resize, interpolation=v2.InterpolationMode.BILINEAR, antialias=True), v2.CenterCrop(p.crop)]


@lru_cache(maxsize=8)
def _transforms(preprocessing: Preprocessing) -> v2.Compose:
    """The transform pipeline of one preprocessing setting, built once (it is applied to every image; the
    transforms are deterministic and stateless, so the decode threads can share it)."""
    p = preprocessing
    return v2.Compose([
        *geometry(p),
        v2.ClampBoundingBoxes(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(p.mean, p.std),
    ])


def _open(data: bytes) -> Image.Image:
    """Pillow's image with only the header read; refuses images over Pillow's pixel limit before decoding them."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:  # over twice the limit: Pillow refuses at open
        found = re.search(r"\((\d+) pixels\)", str(error))
        raise DecodeError(f"decompression bomb: {found.group(1) if found else '?'} pixels > limit "
                          f"{Image.MAX_IMAGE_PIXELS}") from None
    except UnidentifiedImageError:
        raise DecodeError("not an image (no known image format)") from None
    pixels = image.size[0] * image.size[1]
    if Image.MAX_IMAGE_PIXELS and pixels > Image.MAX_IMAGE_PIXELS:
        raise DecodeError(f"decompression bomb: {pixels} pixels > limit {Image.MAX_IMAGE_PIXELS}")
    return image


def _is_sixteen_bit(image: Image.Image) -> bool:
    """Whether the image's samples are unsigned 16-bit: mode I;16*, or mode I from a 16-bit source (its format,
    or the raw mode of its tiles, read from the header: Pillow forgets them once the image is loaded)."""
    if image.mode in SIXTEEN_BIT_MODES:
        return True
    raw_modes = {tile.args[0] if isinstance(tile.args, tuple) else str(tile.args) for tile in image.tile
                 if tile.args}
    return image.mode == "I" and (image.format in SIXTEEN_BIT_FORMATS
                                  or bool(raw_modes) and raw_modes <= set(SIXTEEN_BIT_MODES))


def _check_mode(image: Image.Image) -> bool:
    """Whether the opened (not yet loaded) image is 16-bit; refuses modes without a defined range (32-bit float
    or integer) before they are decoded."""
    sixteen_bit = _is_sixteen_bit(image)
    if image.mode in NO_RANGE_MODES and not sixteen_bit:
        raise DecodeError(f"unsupported pixel mode {image.mode} ({NO_RANGE_MODES[image.mode]}): its values have "
                          "no defined range to scale to 0-255; convert the image to 8 or 16 bits")
    return sixteen_bit


def check_aspect_ratio(width: int, height: int) -> None:
    """Refuses an image whose resize (short side to 256/224 of the crop) would be huge: see MAX_ASPECT_RATIO."""
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise DecodeError(f"aspect ratio too extreme: {width}:{height} (limit {MAX_ASPECT_RATIO}:1): resizing its "
                          "short side to the recipe's size would make it too large to preprocess")


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit grey scaled to 8 bits (65535 -> 255); Pillow's own convert would clip everything above 255."""
    array = np.asarray(image, dtype=np.float64)
    grey = np.clip(np.rint(array / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")


def decode(data: bytes) -> Image.Image:
    """RGB as the eye sees it: EXIF orientation applied, alpha composited on white, palettes, grey, CMYK and
    16-bit grey converted. Truncated files fail (Pillow's LOAD_TRUNCATED_IMAGES must stay off)."""
    return decode_oriented(data)[0]


EXIF_ORIENTATION = 0x0112


def orient_boxes(boxes: tuple[Box, ...], orientation: int, size: tuple[int, int]) -> tuple[Box, ...]:
    """Boxes drawn on the stored pixels (width, height = size) moved by the EXIF orientation that decoding applied
    (the same flips and rotations as PIL's exif_transpose), so that they frame the same pixels."""
    w, h = size
    points = {
        2: lambda x, y: (w - x, y), 3: lambda x, y: (w - x, h - y), 4: lambda x, y: (x, h - y),
        5: lambda x, y: (y, x), 6: lambda x, y: (h - y, x), 7: lambda x, y: (h - y, w - x), 8: lambda x, y: (y, w - x),
    }.get(orientation)
    if points is None:
        return boxes
    moved = []
    for x0, y0, x1, y1 in boxes:
        (ax, ay), (bx, by) = points(x0, y0), points(x1, y1)
        moved.append((min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)))
    return tuple(moved)


def decode_oriented(data: bytes) -> tuple[Image.Image, int, tuple[int, int]]:
    """`decode`, plus the EXIF orientation it applied and the stored size (what boxes are drawn on)."""
    if not data:
        raise DecodeError("empty file")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise DecodeError("refused: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set, truncated images would pass")
    try:
        image = _open(data)
        sixteen_bit = _check_mode(image)  # from the header, before anything is decoded
        check_aspect_ratio(*image.size)  # (transform checks again: the device path's images come there directly)
        image.load()
        stored_size = image.size
        orientation = int(image.getexif().get(EXIF_ORIENTATION, 1) or 1)
        image = ImageOps.exif_transpose(image)
        if sixteen_bit:
            return _sixteen_bit_to_rgb(image), orientation, stored_size
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            background = Image.new("RGB", image.size, (255, 255, 255))  # alpha composited on white
            background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
            return background, orientation, stored_size
        return image.convert("RGB"), orientation, stored_size
    except DecodeError:
        raise
    except (OSError, EOFError, SyntaxError, ValueError) as error:
        # PIL names the in-memory file by its address; drop it so that reasons are the same in every run
        text = re.sub(r' <[^<>]* at 0x[0-9a-fA-F]+>', '', str(error))
        if "truncated" in text.lower() or isinstance(error, EOFError):
            raise DecodeError(f"truncated image: {text}") from None
        if isinstance(error, OSError) and error.errno == errno.ENOMEM:
            raise DecodeError("out of memory decoding the image") from None
        raise DecodeError(f"not a decodable image: {text}") from None


def preprocess(image: Image.Image, boxes: tuple[Box, ...], preprocessing: Preprocessing = Preprocessing()
               ) -> tuple[torch.Tensor, list[Box]]:
    """(3, crop, crop) normalised tensor and the boxes in its pixel coordinates (empty ones dropped)."""
    return transform(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1), boxes, preprocessing)


def transform(pixels: torch.Tensor, boxes: tuple[Box, ...], preprocessing: Preprocessing = Preprocessing()
              ) -> tuple[torch.Tensor, list[Box]]:
    """preprocess for a (3, H, W) uint8 tensor on any device (the GPU decoder's output too): same transforms.
    An extreme aspect ratio is a DecodeError before anything is resized."""
    height, width = pixels.shape[-2:]
    check_aspect_ratio(int(width), int(height))
    box_tensor = tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                          format="XYXY", canvas_size=(height, width))
    out, out_boxes = preprocessing.transforms()(tv_tensors.Image(pixels), box_tensor)
    kept = [tuple(float(v) for v in b) for b in out_boxes.tolist() if b[2] > b[0] and b[3] > b[1]]
    return out.as_subclass(torch.Tensor), kept


def load(record: ImageRecord, preprocessing: Preprocessing = Preprocessing(),
         max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> tuple[torch.Tensor, list[Box]]:
    """Read (pipeline/reading.py: at most `max_bytes`), decode and preprocess one record; its boxes follow the EXIF
    orientation and the resize and crop."""
    image, orientation, stored_size = decode_oriented(read_bytes(record.path, record.member, max_bytes))
    return preprocess(image, orient_boxes(record.boxes, orientation, stored_size), preprocessing)
