"""ILSVRC-2012's class list (index = torchvision's class index, the wnid's position in sorted order; wnid; name),
shipped in configs/imagenet_classes.tsv. A leaf module: the dataset layouts and pipeline/classes.py both read it,
and neither imports the other through it."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

CLASSES_FILE = Path(__file__).resolve().parent.parent / "configs" / "imagenet_classes.tsv"


@dataclass(frozen=True)
class ClassList:
    wnids: tuple[str, ...]
    names: tuple[str, ...]
    positions: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:  # built once: looked up for every record of a dataset
        object.__setattr__(self, "positions", {wnid: i for i, wnid in enumerate(self.wnids)})

    def index(self, wnid: str) -> int | None:
        return self.positions.get(wnid)


@lru_cache(maxsize=1)
def imagenet_classes() -> ClassList:
    rows = [line.split("\t") for line in CLASSES_FILE.read_text().splitlines() if line and not line.startswith("#")]
    return ClassList(tuple(r[1] for r in rows), tuple(r[2] for r in rows))
