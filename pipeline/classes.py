"""The ILSVRC-2012 class list: index (= torchvision's class index, the wnid's position in sorted order), wnid,
name. Shipped in configs/imagenet_classes.tsv."""
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


def check_classes(records, class_names: list[str], model: str, root: str) -> None:
    """Stop before any work when the dataset's labels are not the model's classes (a shapes dataset explained by
    an ImageNet model, or the reverse): label index i must name the model's class i."""
    from .datasets.records import DatasetError

    seen: set[tuple[int, str | None]] = set()
    for record in records:
        if record.label is None or (record.label, record.label_name) in seen:
            continue
        seen.add((record.label, record.label_name))
        name = class_names[record.label] if record.label < len(class_names) else None
        if name != record.label_name:
            model_has = f"{name!r}" if name is not None else f"no class {record.label} ({len(class_names)} classes)"
            raise DatasetError(f"{root}: the dataset's class {record.label} is {record.label_name!r} "
                               f"({record.wnid}) but model {model}'s is {model_has}: the model was not trained "
                               "on this dataset's classes (DATASET=shapes goes with MODEL=vgg-shapes)")
