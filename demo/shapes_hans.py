"""`shapes-hans`: the shapes dataset with a planted Clever Hans. A fixed fraction of one class's images (the
planted class, `star`) carry a small high-contrast text-like tag in the bottom-right corner, in training and in
validation alike, so that the tag predicts the class; no other image has it.

Image i of a split is shapes' image i (demo/shapes.py, same seed and index) with the tag pasted on when it is
one of the tagged ones, so "the tag removed" is exactly the shapes image and "the tag pasted on another class"
is `make_sample(..., tag=True)`. Written like shapes (ImageNet validation layout, masks.npz) plus `hans.csv`
(`image_id`, `tag` 0/1).

    python -m demo.shapes_hans --out data/shapes-hans      # the validation split (seed 2, 60 images per class)
"""
from __future__ import annotations

import argparse
import csv
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from . import shapes

PLANTED = shapes.CLASS_NAMES.index("star")  # the class whose images may carry the tag
TAG_FRACTION = 1 / 3  # of the planted class's images, in every split (exactly: floor(n * fraction) of the first n)
VAL_PER_CLASS = 60  # more than shapes' 32, so that the planted class has 20 tagged and 40 untagged images
HANS_FILE = "hans.csv"
# The tag: four 3x5 "glyphs" in black on a white plate with a 1-pixel border (17x7 pixels, 2.9 % of the image),
# like a watermark's text; fixed, so it is the same in every tagged image. '#' is black.
GLYPHS = (
    "###.#.#.###.##.",
    "#...#.#.#...#.#",
    "###.###.##..##.",
    "..#.#.#.#...#.#",
    "###.#.#.###.#.#",
)
TAG_RIGHT, TAG_BOTTOM = 58, 58  # the plate's outer edge (pixel edges): inside the pipeline's centre crop (~4..60)


def tag_pixels() -> np.ndarray:
    """The tag as an (h, w) uint8 array, 0 black / 255 white."""
    rows = [[0 if c == "#" else 255 for c in line] for line in GLYPHS]
    inner = np.array(rows, dtype=np.uint8)
    plate = np.full((inner.shape[0] + 2, inner.shape[1] + 2), 255, dtype=np.uint8)
    plate[1:-1, 1:-1] = inner
    return plate


def tag_box() -> tuple[int, int, int, int]:
    """(x_min, y_min, x_max, y_max) of the tag in the image's pixels (pixel edges)."""
    h, w = tag_pixels().shape
    return TAG_RIGHT - w, TAG_BOTTOM - h, TAG_RIGHT, TAG_BOTTOM


def paste_tag(image: np.ndarray) -> np.ndarray:
    """A copy of an (H, W, 3) uint8 image with the tag in its bottom-right corner."""
    x0, y0, x1, y1 = tag_box()
    out = image.copy()
    out[y0:y1, x0:x1] = tag_pixels()[..., None]
    return out


def is_tagged(index: int) -> bool:
    """Whether image `index` of a split carries the tag: the planted class's j-th image (j = index // classes)
    when floor((j + 1) * fraction) > floor(j * fraction), i.e. exactly floor(n * fraction) of its first n."""
    classes = len(shapes.CLASSES)
    if index % classes != PLANTED:
        return False
    j = index // classes
    return math.floor((j + 1) * TAG_FRACTION + 1e-9) > math.floor(j * TAG_FRACTION + 1e-9)


def make_sample(seed: int, index: int, tag: bool | None = None) -> shapes.ShapeSample:
    """shapes' image `index` of `seed`, with the tag where the split plants it (tag=None), always (True) or never
    (False). The mask and box stay the shape's."""
    sample = shapes.make_sample(seed, index)
    if not (is_tagged(index) if tag is None else tag):
        return sample
    return shapes.ShapeSample(paste_tag(sample.image), sample.mask, sample.label, sample.box)


def samples(seed: int, count: int) -> Iterator[shapes.ShapeSample]:
    return (make_sample(seed, i) for i in range(count))


def write_split(root: str | Path, per_class: int = VAL_PER_CLASS, seed: int = shapes.VAL_SEED) -> Path:
    """Write the split like shapes.write_split, plus hans.csv (image_id, tag)."""
    root = shapes.write_split(root, per_class, seed, make_sample=make_sample)
    with open(root / HANS_FILE, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["image_id", "tag"])
        writer.writerows((shapes.image_id(i + 1), int(is_tagged(i))) for i in range(per_class * len(shapes.CLASSES)))
    return root


def read_tags(root: str | Path) -> dict[str, int]:
    """image id -> 1 where the image carries the tag, else 0 (from hans.csv)."""
    with open(Path(root) / HANS_FILE, newline="") as handle:
        return {row["image_id"]: int(row["tag"]) for row in csv.DictReader(handle)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.shapes_hans", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--per-class", type=int, default=VAL_PER_CLASS, help="images per class")
    parser.add_argument("--seed", type=int, default=shapes.VAL_SEED,
                        help=f"split seed (training uses {shapes.TRAIN_SEED})")
    args = parser.parse_args(argv)
    if args.per_class < 1:
        parser.error(f"--per-class must be positive, got {args.per_class}")
    root = write_split(args.out, args.per_class, args.seed)
    tagged = sum(read_tags(root).values())
    print(f"{args.per_class * len(shapes.CLASSES)} images, {tagged} of the {args.per_class} "
          f"{shapes.CLASS_NAMES[PLANTED]}s tagged -> {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
