"""A deterministic ImageNet-style dataset of coloured shapes on cluttered backgrounds, with exact object masks.

Each 64x64 RGB image holds one filled shape (its class) of random colour, size, position and rotation on a
background of smooth colour noise, pixel noise, straight lines and blurred blobs in random colours, so that no
background pixel tells the class. Written in the ImageNet validation layout the pipeline reads (flat
`ILSVRC2012_val_XXXXXXXX.JPEG`, Kaggle's `LOC_val_solution.csv` with one box per image and
`LOC_synset_mapping.txt`), plus `masks.npz` (the object's pixels) for tests. Image i of a split depends only on
(seed, i), so the same seed gives the same bytes.

    python -m demo.shapes --out data/shapes            # the validation split (seed 2, 32 images per class)
"""
from __future__ import annotations

import argparse
import csv
import io
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# class index -> (wnid-like id, name). The ids are not WordNet ids: "s" + 8 digits, one per shape.
CLASSES: tuple[tuple[str, str], ...] = (
    ("s00000001", "circle"), ("s00000002", "square"), ("s00000003", "triangle"),
    ("s00000004", "star"), ("s00000005", "cross"), ("s00000006", "ring"),
)
CLASS_NAMES = tuple(name for _, name in CLASSES)
IMAGE_SIZE = 64
TRAIN_SEED, VAL_SEED = 1, 2
VAL_PER_CLASS = 32
SUPERSAMPLE = 4  # shapes are drawn at 4x and averaged down: smooth edges, a coverage-exact mask
MARGIN = 6  # objects stay this far from the border: the pipeline's 256/224 centre crop keeps them whole
RADIUS = (10.0, 16.0)
JPEG_QUALITY = 95
MASKS_FILE = "masks.npz"


@dataclass(frozen=True)
class ShapeSample:
    """One generated image: pixels (H, W, 3) uint8, the object's mask (H, W) bool, class index and tight box
    (x_min, y_min, x_max, y_max) in pixel edges, so pixel columns x_min .. x_max - 1 hold the object."""

    image: np.ndarray
    mask: np.ndarray
    label: int
    box: tuple[int, int, int, int]


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a shape with outer radius r around (cx, cy), rotated by angle (radians)."""
    if kind == "square":
        points = [(r, a) for a in (0.25, 0.75, 1.25, 1.75)]
    elif kind == "triangle":
        points = [(r, a) for a in (0.5, 0.5 + 2 / 3, 0.5 + 4 / 3)]
    elif kind == "star":
        points = [(r if k % 2 == 0 else 0.42 * r, 0.5 + k / 5) for k in range(10)]
    elif kind == "cross":  # a plus sign with arms of half-width 0.3 r
        w = 0.3 * r
        corners = [(w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w), (-w, -r), (w, -r), (w, -w), (r, -w),
                   (r, w), (w, w)]
        return [(cx + x * math.cos(angle) - y * math.sin(angle), cy + x * math.sin(angle) + y * math.cos(angle))
                for x, y in corners]
    else:
        raise ValueError(f"no polygon for shape {kind!r}")
    return [(cx + radius * math.cos(math.pi * turn + angle), cy + radius * math.sin(math.pi * turn + angle))
            for radius, turn in points]


def _coverage(kind: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """The shape's coverage of each pixel in [0, 1], (H, W) float32, drawn at SUPERSAMPLE x and averaged."""
    s = SUPERSAMPLE
    canvas = Image.new("L", (IMAGE_SIZE * s, IMAGE_SIZE * s), 0)
    draw = ImageDraw.Draw(canvas)
    x, y, rr = cx * s, cy * s, r * s
    if kind in ("circle", "ring"):
        draw.ellipse((x - rr, y - rr, x + rr, y + rr), fill=255)
        if kind == "ring":
            inner = 0.55 * rr
            draw.ellipse((x - inner, y - inner, x + inner, y + inner), fill=0)
    else:
        draw.polygon([(px * s, py * s) for px, py in _polygon(kind, cx, cy, r, angle)], fill=255)
    small = canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3)


def _background(rng: np.random.Generator) -> np.ndarray:
    """Smooth colour noise + pixel noise + lines + blurred blobs, (H, W, 3) float32 in [0, 255]."""
    n = IMAGE_SIZE
    coarse = Image.fromarray(rng.uniform(40, 215, (4, 4, 3)).astype(np.uint8))
    base = np.asarray(coarse.resize((n, n), Image.Resampling.BICUBIC), dtype=np.float32)
    layer = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    blobs = Image.new("RGBA", (n, n), (0, 0, 0, 0))
    draw = ImageDraw.Draw(blobs)
    for _ in range(int(rng.integers(2, 5))):
        cx, cy = rng.uniform(0, n, 2)
        rx, ry = rng.uniform(4, 12, 2)
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=(*_random_colour(rng).astype(int), 160))
    blobs = blobs.filter(ImageFilter.GaussianBlur(float(rng.uniform(2.0, 3.5))))
    layer.paste(blobs, (0, 0), blobs)
    lines = Image.new("RGBA", (n, n), (0, 0, 0, 0))
    draw = ImageDraw.Draw(lines)
    for _ in range(int(rng.integers(2, 6))):  # half-transparent: clutter, but fainter than the object's edges
        x0, y0, x1, y1 = rng.uniform(-8, n + 8, 4)
        draw.line((x0, y0, x1, y1), fill=(*_random_colour(rng).astype(int), 128), width=int(rng.integers(1, 3)))
    layer.paste(lines, (0, 0), lines)
    pixels = np.asarray(layer, dtype=np.float32) + rng.normal(0, 8, (n, n, 3))
    return np.clip(pixels, 0, 255)


def _object_colour(rng: np.random.Generator, background: np.ndarray, coverage: np.ndarray) -> np.ndarray:
    """A random colour that stands out from the background under the object (resampled until it does)."""
    under = (background * coverage[..., None]).sum((0, 1)) / max(float(coverage.sum()), 1.0)
    colour = _random_colour(rng)
    for _ in range(20):
        if np.linalg.norm(colour - under) > 120:
            break
        colour = _random_colour(rng)
    return colour


def make_sample(seed: int, index: int) -> ShapeSample:
    """Image `index` of the split generated with `seed` (classes cycle through CLASSES)."""
    rng = np.random.default_rng([seed, index])
    label = index % len(CLASSES)
    kind = CLASS_NAMES[label]
    r = float(rng.uniform(*RADIUS))
    cx, cy = rng.uniform(MARGIN + r, IMAGE_SIZE - MARGIN - r, 2)
    angle = float(rng.uniform(0, 2 * math.pi))
    background = _background(rng)
    coverage = _coverage(kind, float(cx), float(cy), r, angle)
    colour = _object_colour(rng, background, coverage)
    alpha = coverage[..., None]
    image = np.clip(background * (1 - alpha) + colour * alpha, 0, 255).round().astype(np.uint8)
    mask = coverage >= 0.5
    rows, cols = np.nonzero(mask)
    box = (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)
    return ShapeSample(image, mask, label, box)


def samples(seed: int, count: int) -> Iterator[ShapeSample]:
    return (make_sample(seed, i) for i in range(count))


def jpeg_bytes(image: np.ndarray) -> bytes:
    """The image as the JPEG file the dataset holds (training reads these same bytes)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def image_id(number: int) -> str:
    return f"ILSVRC2012_val_{number:08d}"


def write_split(root: str | Path, per_class: int = VAL_PER_CLASS, seed: int = VAL_SEED,
                make_sample: Callable[[int, int], ShapeSample] = make_sample) -> Path:
    """Write per_class images of every class in the ImageNet validation layout (Kaggle's files) + masks.npz;
    `make_sample(seed, index)` draws image `index` (shapes_hans passes its tagged variant)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    ids, masks, rows = [], [], []
    for index in range(per_class * len(CLASSES)):
        sample = make_sample(seed, index)
        name = image_id(index + 1)
        (root / f"{name}.JPEG").write_bytes(jpeg_bytes(sample.image))
        wnid = CLASSES[sample.label][0]
        rows.append((name, f"{wnid} {' '.join(str(v) for v in sample.box)}"))
        ids.append(name)
        masks.append(sample.mask)
    with open(root / "LOC_val_solution.csv", "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["ImageId", "PredictionString"])
        writer.writerows(rows)
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{wnid} {name}\n" for wnid, name in CLASSES))
    np.savez_compressed(root / MASKS_FILE, image_id=np.array(ids), mask=np.stack(masks))
    return root


def read_masks(root: str | Path) -> dict[str, np.ndarray]:
    """image id -> the object's mask (H, W) bool in the original image's pixels."""
    with np.load(Path(root) / MASKS_FILE) as data:
        return dict(zip(data["image_id"].tolist(), data["mask"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.shapes", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--per-class", type=int, default=VAL_PER_CLASS, help="images per class")
    parser.add_argument("--seed", type=int, default=VAL_SEED, help=f"split seed (training uses {TRAIN_SEED})")
    args = parser.parse_args(argv)
    if args.per_class < 1:
        parser.error(f"--per-class must be positive, got {args.per_class}")
    root = write_split(args.out, args.per_class, args.seed)
    print(f"{args.per_class * len(CLASSES)} images ({', '.join(CLASS_NAMES)}) -> {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
