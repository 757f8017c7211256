"""The ImageNet-style layouts, each a function root -> records, and detection of which one a root is.

- `imagefolder`: root/<wnid>/<image>; class index from the full ILSVRC list (as torchvision's ImageNet and the
  weights' class index), so a folder holding a subset of classes still gets the right indices;
- `imagenet_val`: flat ILSVRC2012_val_*.JPEG with the devkit's ground truth (+ meta.mat, + optional PASCAL VOC
  box XMLs in bbox/ or val/) or Kaggle's LOC_val_solution.csv (+ LOC_synset_mapping.txt), boxes kept. A
  LOC_synset_mapping.txt naming other classes than ImageNet's (e.g. the generated shapes) defines the class
  indices (its line order) and names; one naming only ImageNet wnids keeps ImageNet's indices and names;
- `webdataset`: *.tar shards with <key>.jpg and <key>.cls (class index) members;
- `plain`: any folder of images, unlabelled.

A record that cannot be explained for a reason the listing already shows (a link leading outside the dataset
root, an unknown wnid or class index, an image the labels name that does not exist, an image id from a label
file that is not a validation image name) carries that reason as `problem`; the worker records it as a failure
without opening anything. Label and annotation files never supply paths: image paths come from listing the root.
"""
from __future__ import annotations

import csv
import glob
import re
import tarfile
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from pathlib import Path

from ..classes import ClassList, imagenet_classes
from .records import Box, DatasetError, ImageRecord

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
VAL_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})$")
DEVKIT_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
KAGGLE_SOLUTION = "LOC_val_solution.csv"
KAGGLE_MAPPING = "LOC_synset_mapping.txt"


def _images(folder: Path) -> list[Path]:
    """Image files of a folder; links are listed even when dangling, so that they are reported, not skipped."""
    return sorted(p for p in folder.iterdir() if (p.is_file() or p.is_symlink()) and p.suffix.lower() in IMAGE_SUFFIXES)


def outside_root(root: Path, path: Path) -> str | None:
    """Why `path` may not be read as part of the dataset at `root` (it resolves outside it), or None."""
    target = path.resolve()
    if target.is_relative_to(root.resolve()):
        return None
    return f"outside the dataset root: links to {target}"


def _labelled(image_id: str, path: Path | str, wnid: str | None, boxes=(), root: Path | None = None,
              source: str = "labels", problem: str | None = None, classes: ClassList | None = None) -> ImageRecord:
    classes = classes or imagenet_classes()
    index = classes.index(wnid) if wnid else None
    name = classes.names[index] if index is not None else None
    if problem is None and wnid and index is None:
        problem = f"unknown wnid in {source}: {wnid}"
    if problem is None and root is not None:
        problem = outside_root(root, Path(path))
    return ImageRecord(image_id, str(path), wnid, index, name, tuple(boxes), problem)


def imagefolder(root: Path) -> list[ImageRecord]:
    records = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        records += [_labelled(p.stem, p, folder.name, root=root, source="the folder name")
                    for p in _images(folder)]
    return records


def _find(root: Path, name: str) -> Path | None:
    for candidate in (root / name, root.parent / name, root / "devkit" / name, root / "data" / name):
        if candidate.is_file():
            return candidate
    return None


def _devkit_wnids(meta: Path) -> dict[int, str]:
    import scipy.io

    try:
        synsets = scipy.io.loadmat(str(meta), squeeze_me=True)["synsets"]
    except Exception as error:
        raise DatasetError(f"{meta}: not a readable devkit meta.mat ({type(error).__name__})") from None
    return {int(s[0]): str(s[1]) for s in synsets if int(s[4]) == 0}  # num_children == 0: the 1000 leaves


def _voc_boxes(xml: Path) -> list[tuple[str, Box]]:
    try:
        tree = ElementTree.parse(xml)
    except ElementTree.ParseError as error:
        raise DatasetError(f"{xml}: unreadable box annotation ({error})") from None
    boxes = []
    for obj in tree.getroot().iter("object"):
        box = obj.find("bndbox")
        coords = tuple(float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append((obj.findtext("name"), coords))
    return boxes


def _mapping_classes(root: Path) -> ClassList:
    """ImageNet's classes, unless a LOC_synset_mapping.txt names others: then its order and names."""
    mapping = _find(root, KAGGLE_MAPPING)
    imagenet = imagenet_classes()
    if mapping is None:
        return imagenet
    rows = [line.split(maxsplit=1) for line in mapping.read_text().splitlines() if line.strip()]
    if any(len(row) != 2 for row in rows):
        raise DatasetError(f"{mapping}: every line must be '<wnid> <name>'")
    if all(imagenet.index(wnid) is not None for wnid, _ in rows):
        return imagenet  # ImageNet (or a subset of it): torchvision's indices and names
    return ClassList(tuple(wnid for wnid, _ in rows), tuple(name.strip() for _, name in rows))


def imagenet_val(root: Path) -> list[ImageRecord]:
    images = {p.stem: p for p in _images(root) if VAL_NAME.match(p.stem)}
    classes = _mapping_classes(root)
    truth, solution = _find(root, DEVKIT_TRUTH), _find(root, KAGGLE_SOLUTION)
    labels: dict[str, str] = {}
    boxes: dict[str, list[Box]] = {}
    source = (solution or truth or Path("labels")).name
    if solution is not None:
        with open(solution, newline="") as handle:
            for row in csv.DictReader(handle):
                parts = (row.get("PredictionString") or "").split()
                if not parts:
                    continue
                image_id = row.get("ImageId") or ""
                labels[image_id] = parts[0]
                boxes[image_id] = [tuple(float(v) for v in parts[i + 1:i + 5])
                                   for i in range(0, len(parts), 5) if parts[i] == parts[0]]
    elif truth is not None:
        meta = _find(root, "meta.mat")
        if meta is None:
            raise DatasetError(f"{truth} needs the devkit's meta.mat beside it (ILSVRC IDs -> wnids)")
        ids = _devkit_wnids(meta)
        for number, line in enumerate(truth.read_text().split(), start=1):
            if int(line) not in ids:
                raise DatasetError(f"{truth}: line {number} names unknown ILSVRC2012 ID {line}")
            labels[f"ILSVRC2012_val_{number:08d}"] = ids[int(line)]
        for folder in (root / "bbox", root / "val", root):
            for image_id in images:
                xml = folder / f"{image_id}.xml"
                if image_id not in boxes and xml.is_file():
                    annotated = _voc_boxes(xml)
                    boxes[image_id] = [b for wnid, b in annotated if wnid == labels.get(image_id)]
    else:
        raise DatasetError(f"{root}: ImageNet validation images without {DEVKIT_TRUTH} (+ meta.mat) or "
                           f"{KAGGLE_SOLUTION}")
    records = [_labelled(i, images[i], labels.get(i), boxes.get(i, ()), root, source, classes=classes) for i in images]
    for image_id in sorted(set(labels) - set(images)):  # promised by the labels, not on disk: never opened
        if VAL_NAME.match(image_id):
            problem = f"missing image: {source} labels it, no such file in the dataset root"
            path = root / f"{image_id}.JPEG"
        else:
            problem, path = f"invalid image id in {source}: {image_id!r}", root / source
        records.append(ImageRecord(image_id, str(path), labels[image_id], problem=problem))
    return sorted(records, key=lambda record: record.image_id)


def webdataset(root: Path | str) -> list[ImageRecord]:
    shards = sorted(glob.glob(str(Path(root) / "*.tar"))) if Path(root).is_dir() else sorted(glob.glob(str(root)))
    if not shards:
        raise DatasetError(f"{root}: no .tar shards")
    classes = imagenet_classes()
    records = []
    for shard in shards:
        problem = outside_root(Path(root), Path(shard)) if Path(root).is_dir() else None
        if problem:
            raise DatasetError(f"{shard}: shard {problem}")
        try:
            with tarfile.open(shard) as archive:
                members = {m.name: m for m in archive.getmembers() if m.isfile()}
                for name in sorted(members):
                    key, suffix = name.rsplit(".", 1) if "." in name else (name, "")
                    if suffix.lower() not in ("jpg", "jpeg", "png"):
                        continue
                    label, problem = None, None
                    cls = members.get(f"{key}.cls")
                    if cls is not None:
                        text = archive.extractfile(cls).read().decode(errors="replace").strip()
                        label = int(text) if re.fullmatch(r"-?\d+", text) else None
                        if label is None or not 0 <= label < len(classes.wnids):
                            problem = f"unknown class index: {text[:20]!r} in {cls.name}"
                    wnid = classes.wnids[label] if label is not None and problem is None else None
                    # members are read from inside the shard only, so a name like ../x cannot reach outside
                    records.append(_labelled(Path(key).name, f"{shard}::{name}", wnid, problem=problem))
        except tarfile.TarError as error:
            raise DatasetError(f"{shard}: unreadable tar shard ({error})") from None
    return records


def plain(root: Path) -> list[ImageRecord]:
    return [ImageRecord(p.stem, str(p), problem=outside_root(root, p)) for p in _images(root)]


LAYOUTS: dict[str, Callable[[Path], list[ImageRecord]]] = {
    "imagefolder": imagefolder, "imagenet_val": imagenet_val, "webdataset": webdataset, "plain": plain,
}


def detect_layout(root: str | Path) -> str:
    """Which layout a dataset root (or a tar glob) is."""
    text = str(root)
    if any(ch in text for ch in "*?[") or text.endswith(".tar"):
        return "webdataset"
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset directory")
    if any(root.glob("*.tar")):
        return "webdataset"
    if any(VAL_NAME.match(p.stem) for p in _images(root)) and (_find(root, DEVKIT_TRUTH) or _find(root, KAGGLE_SOLUTION)):
        return "imagenet_val"  # without label files, validation images are a plain folder
    subfolders = [p for p in root.iterdir() if p.is_dir() and _images(p)]
    if subfolders and all(re.fullmatch(r"n\d{8}", p.name) for p in subfolders):
        return "imagefolder"
    if _images(root):
        return "plain"
    raise DatasetError(f"{root}: no images found (layouts: {', '.join(LAYOUTS)})")


def load_records(root: str | Path, layout: str | None = None) -> list[ImageRecord]:
    """All records of a dataset in a fixed order (sorted by id within each layout)."""
    layout = layout or detect_layout(root)
    if layout not in LAYOUTS:
        raise DatasetError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    records = LAYOUTS[layout](root if layout == "webdataset" else Path(root))
    seen: set[str] = set()
    for record in records:
        if record.image_id in seen:
            raise DatasetError(f"{root}: image id {record.image_id} appears twice")
        seen.add(record.image_id)
    return records
