"""What every dataset layout produces: one record per image, in a fixed (sorted) order."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import PipelineError

Box = tuple[float, float, float, float]  # x_min, y_min, x_max, y_max in original image pixels


@dataclass(frozen=True)
class TarMember:
    """Where a WebDataset image lies inside its shard, from the listing: read by seeking, never by a name search.
    For a link inside the shard, `offset` and `size` are its target's data; `compression` is None, gz, bz2 or xz
    (offsets then count in the decompressed stream)."""

    name: str  # the member's own name (a link's, not its target's)
    offset: int  # of the data, in the (decompressed) tar stream; -1: no data (the record's `problem` says why)
    size: int  # bytes of data (a sparse member: its expanded size)
    compression: str | None = None
    sparse: bool = False  # a GNU sparse member: refused when read (images are never sparse files)


@dataclass(frozen=True)
class ImageRecord:
    image_id: str  # file stem, unique within the dataset
    path: str  # the file read: the image, or for WebDataset the shard that holds `member`
    wnid: str | None = None
    label: int | None = None  # ILSVRC class index (torchvision's), None when unlabelled or unknown
    label_name: str | None = None
    boxes: tuple[Box, ...] = field(default_factory=tuple)
    problem: str | None = None  # why it cannot be explained, known from the listing alone (never opened then)
    member: TarMember | None = None  # a WebDataset image: the member of the shard `path`; None for a plain file

    @property
    def member_name(self) -> str | None:
        """The tar member's name (the `member` column of the run's tables), None for a plain file."""
        return self.member.name if self.member else None


class DatasetError(PipelineError, ValueError):
    """A dataset cannot be read as the layout says; the message names the file."""
