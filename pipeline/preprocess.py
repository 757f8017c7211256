"""Decode an image as the eye sees it and apply the weights' preprocessing, boxes through the same resize/crop.

Preprocessing is torchvision's ImageNet recipe (Resize 256 bilinear with antialiasing, CenterCrop 224,
normalisation), done with torchvision.transforms.v2 so that bounding boxes follow the image exactly.
"""
from __future__ import annotations

import io
import re
import tarfile
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision import tv_tensors
from torchvision.transforms import v2

from lrp_module.composites import IMAGENET_MEAN, IMAGENET_STD

from .datasets.records import Box, ImageRecord


class DecodeError(ValueError):
    """An image cannot be read; the message is the reason recorded in failures.parquet."""


@dataclass(frozen=True)
class Preprocessing:
    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def transforms(self) -> v2.Compose:
        return _transforms(self)


@lru_cache(maxsize=8)
def _transforms(preprocessing: Preprocessing) -> v2.Compose:
    """The transform pipeline of one preprocessing setting, built once (it is applied to every image; the
    transforms are deterministic and stateless, so the decode threads can share it)."""
    p = preprocessing
    return v2.Compose([
        v2.Resize(p.resize, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
        v2.CenterCrop(p.crop),
        v2.ClampBoundingBoxes(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(p.mean, p.std),
    ])


def read_bytes(path: str) -> bytes:
    """File contents, or a member of a WebDataset shard given as '<shard.tar>::<member>'."""
    try:
        if "::" in path:
            shard, member = path.split("::", 1)
            with tarfile.open(shard) as archive:
                return archive.extractfile(member).read()
        with open(path, "rb") as handle:
            return handle.read()
    except (OSError, KeyError, tarfile.TarError, AttributeError) as error:
        raise DecodeError(f"unreadable: {type(error).__name__}: {error}") from None


def decode(data: bytes) -> Image.Image:
    """RGB, EXIF orientation applied (as the eye sees it)."""
    if not data:
        raise DecodeError("empty file")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            background = Image.new("RGB", image.size, (255, 255, 255))  # alpha composited on white
            background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
            return background
        return image.convert("RGB")
    except Image.DecompressionBombError as error:
        raise DecodeError(f"decompression bomb: {error}") from None
    except (OSError, SyntaxError, ValueError) as error:
        # PIL names the in-memory file by its address; drop it so that reasons are the same in every run
        raise DecodeError(f"not a decodable image: {re.sub(r' <[^<>]* at 0x[0-9a-fA-F]+>', '', str(error))}") from None


def preprocess(image: Image.Image, boxes: tuple[Box, ...], preprocessing: Preprocessing = Preprocessing()
               ) -> tuple[torch.Tensor, list[Box]]:
    """(3, crop, crop) normalised tensor and the boxes in its pixel coordinates (empty ones dropped)."""
    width, height = image.size
    tensor = tv_tensors.Image(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
    box_tensor = tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                          format="XYXY", canvas_size=(height, width))
    out, out_boxes = preprocessing.transforms()(tensor, box_tensor)
    kept = [tuple(float(v) for v in b) for b in out_boxes.tolist() if b[2] > b[0] and b[3] > b[1]]
    return out.as_subclass(torch.Tensor), kept


def load(record: ImageRecord, preprocessing: Preprocessing = Preprocessing()) -> tuple[torch.Tensor, list[Box]]:
    """Read, decode and preprocess one record."""
    return preprocess(decode(read_bytes(record.path)), record.boxes, preprocessing)
