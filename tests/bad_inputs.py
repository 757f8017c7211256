"""A dataset generator for reliability tests: tiny good images beside every kind of bad input, in the ImageFolder
and the ImageNet-validation (Kaggle CSV) layouts, with what each case must become (explained, or a failure whose
reason starts with a given text)."""
from __future__ import annotations

import csv
import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

WIDTH, HEIGHT = 40, 30
WNIDS = ("n01440764", "n02123045")  # tench, tabby
EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class Case:
    name: str
    suffix: str
    expected: str  # "explained" or the start of the failure reason


def reference_rgb(seed: int = 0) -> np.ndarray:
    """A smooth, asymmetric picture (JPEG-friendly; a wrong rotation or flip cannot match it)."""
    rows, cols = np.mgrid[0:HEIGHT, 0:WIDTH]
    red = 40 + 180 * cols / WIDTH
    green = 30 + 200 * rows / HEIGHT
    blue = np.where((rows < HEIGHT // 2) & (cols < WIDTH // 3), 230, 40 + 10 * seed)
    return np.stack([red, green, blue], axis=-1).astype(np.uint8)


def encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG written by hand: for what Pillow cannot save (48-bit RGB) or must not decode (a bomb's header)."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(rows))
            + _png_chunk(b"IEND", b""))


def grey16() -> np.ndarray:
    return (np.arange(HEIGHT * WIDTH).reshape(HEIGHT, WIDTH) * 54).astype(np.uint16)  # 0 .. 64746


def rgb16() -> np.ndarray:
    return (reference_rgb(3).astype(np.uint32) * 257 + 100).clip(0, 65535).astype(">u2")


def exif_rotated_jpeg() -> bytes:
    """The reference picture stored turned 90 degrees anticlockwise, with EXIF orientation 6 (turn it 90
    degrees clockwise to view): seen as the eye sees it, it is the reference."""
    stored = Image.fromarray(reference_rgb(4)).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())


def alpha_png() -> bytes:
    rgba = np.dstack([reference_rgb(5), np.full((HEIGHT, WIDTH), 255, np.uint8)])
    rgba[:, : WIDTH // 2, 3] = 0  # left half transparent
    return encode(Image.fromarray(rgba, "RGBA"), "PNG")


def palette_png() -> bytes:
    return encode(Image.fromarray(reference_rgb(6)).quantize(colors=16), "PNG")


def bomb_png() -> bytes:
    """The header of a 20000x20000 image (400 megapixels) with almost no data: refused before decoding."""
    return raw_png(20000, 20000, 8, 0, b"\0" * 64)


def sample_files() -> dict[str, bytes]:
    """The bytes of every case that is a file of its own."""
    good = encode(Image.fromarray(reference_rgb(1)), "JPEG", quality=95)
    rgb16_rows = b"".join(b"\0" + row.tobytes() for row in rgb16())
    grey16_png = encode(Image.fromarray(grey16()), "PNG")
    return {
        "good": good,
        "good2": encode(Image.fromarray(reference_rgb(2)), "JPEG", quality=95),
        "alpha": alpha_png(),
        "palette": palette_png(),
        "grey": encode(Image.fromarray(reference_rgb(7)).convert("L"), "JPEG", quality=95),
        "cmyk": encode(Image.fromarray(reference_rgb(8)).convert("CMYK"), "JPEG", quality=95),
        "grey16": grey16_png,
        "rgb16": raw_png(WIDTH, HEIGHT, 16, 2, rgb16_rows),
        "one_pixel": encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"),
        "exif": exif_rotated_jpeg(),
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "text": b"this is a text file, not a JPEG\n",
        "unreadable": good,
        "bomb": bomb_png(),
    }


CASES = [
    Case("good", ".JPEG", "explained"), Case("good2", ".JPEG", "explained"), Case("alpha", ".png", "explained"),
    Case("palette", ".png", "explained"), Case("grey", ".JPEG", "explained"), Case("cmyk", ".JPEG", "explained"),
    Case("grey16", ".png", "explained"), Case("rgb16", ".png", "explained"),
    Case("one_pixel", ".png", "explained"), Case("exif", ".JPEG", "explained"),
    Case("empty", ".JPEG", "empty file"), Case("truncated", ".JPEG", "truncated image"),
    Case("text", ".JPEG", "not an image"), Case("unreadable", ".JPEG", "permission denied"),
    Case("bomb", ".png", "decompression bomb: 400000000 pixels > limit"),
    Case("outside", ".JPEG", "outside the dataset root"),
    Case("dangling", ".JPEG", "missing file"),
]
# only the validation layout has label files that can be wrong
LABEL_CASES = [
    Case("unknown_wnid", ".JPEG", "unknown wnid in LOC_val_solution.csv: n99999999"),
    Case("missing", ".JPEG", "missing image: LOC_val_solution.csv labels it"),
]
INVALID_ID = "../../etc/passwd"


def val_name(number: int) -> str:
    return f"ILSVRC2012_val_{number:08d}"


def _place(path: Path, name: str, data: bytes | None, outside: Path) -> None:
    if name == "outside":  # a link to a perfectly good image that lies outside the dataset root
        target = outside / "secret.JPEG"
        target.write_bytes(sample_files()["good"])
        path.symlink_to(target)
    elif name == "dangling":
        path.symlink_to(path.parent / "deleted-long-ago.JPEG")
    elif name != "missing":
        path.write_bytes(data)
        if name == "unreadable":
            os.chmod(path, 0)


def make_imagefolder(base: Path) -> tuple[Path, dict[str, str]]:
    """root/<wnid>/<case><suffix> for every case; returns the root and image id -> expected outcome."""
    root, outside = base / "imagefolder", base / "outside-imagefolder"
    outside.mkdir(parents=True)
    contents = sample_files()
    expected = {}
    for i, case in enumerate(CASES):
        folder = root / WNIDS[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        _place(folder / f"{case.name}{case.suffix}", case.name, contents.get(case.name), outside)
        expected[case.name] = case.expected
    return root, expected


def make_imagenet_val(base: Path, with_unreadable: bool = True) -> tuple[Path, dict[str, str], dict[str, str]]:
    """Flat ILSVRC2012_val_* files with Kaggle's LOC_val_solution.csv, whose rows also name an unknown wnid, a
    missing image and an id that is a path outside the root; returns the root, image id -> expected outcome,
    and case name -> image id."""
    root, outside = base / "imagenet_val", base / "outside-val"
    root.mkdir(parents=True)
    outside.mkdir(parents=True)
    contents = sample_files()
    contents["unknown_wnid"] = contents["good"]
    expected, ids, rows = {}, {}, []
    cases = [c for c in CASES + LABEL_CASES if with_unreadable or c.name != "unreadable"]
    for number, case in enumerate(cases, start=1):
        image_id = val_name(number)
        _place(root / f"{image_id}{case.suffix}", case.name, contents.get(case.name), outside)
        wnid = "n99999999" if case.name == "unknown_wnid" else WNIDS[number % 2]
        rows.append([image_id, f"{wnid} 1 1 20 20"])
        expected[image_id], ids[case.name] = case.expected, image_id
    rows.append([INVALID_ID, f"{WNIDS[0]} 1 1 20 20"])
    expected[INVALID_ID] = "invalid image id in LOC_val_solution.csv: '../../etc/passwd'"
    with open(root / "LOC_val_solution.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ImageId", "PredictionString"])
        writer.writerows(rows)
    return root, expected, ids

