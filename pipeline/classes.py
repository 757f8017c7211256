"""The ILSVRC-2012 class list: index (= torchvision's class index, the wnid's position in sorted order), wnid,
name. Shipped in configs/imagenet_classes.tsv."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

CLASSES_FILE = Path(__file__).resolve().parent.parent / "configs" / "imagenet_classes.tsv"


@dataclass(frozen=True)
class ClassList:
    wnids: tuple[str, ...]
    names: tuple[str, ...]

    def index(self, wnid: str) -> int | None:
        return self._positions().get(wnid)

    def _positions(self) -> dict[str, int]:
        return _positions(self.wnids)


@lru_cache(maxsize=None)
def _positions(wnids: tuple[str, ...]) -> dict[str, int]:
    return {w: i for i, w in enumerate(wnids)}


@lru_cache(maxsize=1)
def imagenet_classes() -> ClassList:
    rows = [line.split("\t") for line in CLASSES_FILE.read_text().splitlines() if line and not line.startswith("#")]
    return ClassList(tuple(r[1] for r in rows), tuple(r[2] for r in rows))
