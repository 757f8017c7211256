"""What every dataset layout produces: one record per image, in a fixed (sorted) order."""
from __future__ import annotations

from dataclasses import dataclass, field

Box = tuple[float, float, float, float]  # x_min, y_min, x_max, y_max in original image pixels


@dataclass(frozen=True)
class ImageRecord:
    image_id: str  # file stem, unique within the dataset
    path: str  # a file path, or "<shard.tar>::<member>" for WebDataset shards
    wnid: str | None = None
    label: int | None = None  # ILSVRC class index (torchvision's), None when unlabelled or unknown
    label_name: str | None = None
    boxes: tuple[Box, ...] = field(default_factory=tuple)
    problem: str | None = None  # why it cannot be explained, known from the listing alone (never opened then)


class DatasetError(ValueError):
    """A dataset cannot be read as the layout says; the message names the file."""
