"""The ImageNet-style layouts, each a function root -> records, and detection of which one a root is.

- `imagefolder`: root/<wnid>/<image>; class index from the full ILSVRC list (as torchvision's ImageNet and the
  weights' class index), so a folder holding a subset of classes still gets the right indices;
- `imagenet_val`: flat ILSVRC2012_val_*.JPEG with the devkit's ground truth (+ meta.mat, + optional PASCAL VOC
  box XMLs in bbox/ or val/) or Kaggle's LOC_val_solution.csv (+ LOC_synset_mapping.txt), boxes kept. A
  LOC_synset_mapping.txt naming other classes than ImageNet's (e.g. the generated shapes) defines the class
  indices (its line order) and names; one naming only ImageNet wnids keeps ImageNet's indices and names;
- `webdataset`: *.tar (.tar.gz, .tgz) shards with <key>.jpg and <key>.cls (class index) members (tar_shards.py);
- `plain`: any folder of images, unlabelled.

A record that cannot be explained for a reason the listing already shows (a link leading outside the dataset
root, an unknown wnid or class index, an image the labels name that does not exist, an image id from a label
file that is not a validation image name) carries that reason as `problem`; the worker records it as a failure
without opening anything. Label and annotation files never supply paths: image paths come from listing the root.
"""
from __future__ import annotations

import csv
import glob
import os
import re
import sys
import tarfile
import xml.etree.ElementTree as ElementTree
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..class_list import ClassList, imagenet_classes
from .records import Box, DatasetError, ImageRecord, TarMember
from .tar_shards import Entry, list_shard

VAL_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})$")
DEVKIT_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "meta.mat"
KAGGLE_SOLUTION = "LOC_val_solution.csv"
KAGGLE_MAPPING = "LOC_synset_mapping.txt"
KAGGLE_IMAGES = "ILSVRC/Data/CLS-LOC/val"  # where Kaggle's archive, as unpacked, keeps the validation images
# where label files sit, below the dataset root, its parent, or the top of Kaggle's archive, as people unpack them
LABEL_FOLDERS = ("", "ILSVRC2012_devkit_t12/data", "ILSVRC2012_devkit_t12", "devkit/data", "devkit", "data")
BOX_FOLDERS = ("bbox", "val", "", "ILSVRC2012_bbox_val_v3/val", "ILSVRC2012_bbox_val_v3", "bbox/val")


def _image_suffixes() -> frozenset[str]:
    """Every file name ending Pillow can open (.jpg, .png, .webp, .gif, .tif, .bmp, .ppm, ...)."""
    from PIL import Image

    Image.init()
    return frozenset(ext.lower() for ext, kind in Image.registered_extensions().items() if kind in Image.OPEN)


IMAGE_SUFFIXES = _image_suffixes()


def looks_like_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def _images(folder: Path) -> list[Path]:
    """Image files of a folder; links are listed even when dangling, so that they are reported, not skipped."""
    return sorted(p for p in folder.iterdir() if (p.is_file() or p.is_symlink()) and looks_like_image(p.name))


def _images_below(folder: Path) -> list[Path]:
    """Image files of a folder and all its subfolders (links to folders are not followed)."""
    found = []
    for directory, subdirs, files in os.walk(folder):
        subdirs.sort()
        found += [Path(directory) / name for name in files if looks_like_image(name)]
    return sorted(found)


def unique_ids(paths: list[Path], root: Path) -> dict[Path, str]:
    """An id per image: its file stem where that is unique in the dataset, else its path below the root without
    the suffix, else with it (photo.jpg beside photo.png are two images, never one refused dataset)."""
    def relative(path: Path, suffix: bool) -> str:
        rel = path.relative_to(root)
        return (rel if suffix else rel.with_suffix("")).as_posix()

    ids: dict[Path, str] = {}
    stems = Counter(p.stem for p in paths)
    without = Counter(relative(p, False) for p in paths)
    for path in paths:
        if stems[path.stem] == 1:
            ids[path] = path.stem
        elif without[relative(path, False)] == 1:
            ids[path] = relative(path, False)
        else:
            ids[path] = relative(path, True)
    return ids


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


@dataclass(frozen=True)
class DatasetFiles:
    """Files the user named for a dataset (dataset config `labels:` / `boxes:` / `synsets:`, or the command line):
    they replace the search. labels: Kaggle's CSV or the devkit's ground-truth .txt; synsets: meta.mat or
    LOC_synset_mapping.txt; boxes: a folder of PASCAL VOC XMLs."""

    labels: str | None = None
    boxes: str | None = None
    synsets: str | None = None

    def named(self) -> bool:
        return any((self.labels, self.boxes, self.synsets))


@dataclass
class Dataset:
    """What a dataset root was read as: its records, the layout and the files used (printed and in the manifest)."""

    records: list[ImageRecord]
    layout: str
    images: str
    files: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        used = ", ".join(f"{k} {v}" for k, v in self.files.items()) or "no label files"
        return "; ".join([f"dataset {self.images}: layout {self.layout}, {len(self.records)} images", used,
                          *self.notes])

    def manifest(self) -> dict:
        return {"layout": self.layout, "images": self.images, "files": self.files, "notes": self.notes}


def imagefolder(root: Path, files: DatasetFiles = DatasetFiles()) -> Dataset:
    """root/<class>/**/<image>. Folders named by wnids take ImageNet's class indices (a subset of classes keeps
    the right ones); other names are classes of their own, indexed in sorted order, as torchvision's ImageFolder
    does (checked against the model's classes before any work). Images beside the class folders are failures."""
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    wnids = all(re.fullmatch(r"n\d{8}", p.name) for p in folders)
    classes = imagenet_classes() if wnids else ClassList(tuple(p.name for p in folders), tuple(p.name for p in folders))
    listed = [(folder, path) for folder in folders for path in _images_below(folder)]
    hidden = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(".")]  # .ipynb_checkpoints: no class
    loose = _images(root) + [path for folder in sorted(hidden) for path in _images_below(folder)]
    ids = unique_ids([path for _, path in listed] + loose, root)
    records = [_labelled(ids[path], path, folder.name, root=root, source="the folder name", classes=classes)
               for folder, path in listed]
    records += [ImageRecord(ids[p], str(p), problem="not in a class folder (ImageFolder layout)") for p in loose]
    notes = [] if wnids else [f"class folders are not wnids: {len(folders)} classes of their own, in sorted order"]
    return Dataset(records, "imagefolder", str(root), {"classes": "wnid folder names" if wnids else
                                                       "sorted folder names"}, notes)


def _bases(root: Path) -> list[Path]:
    """Where label files are looked for: the root, its parent, and the top of Kaggle's archive."""
    bases = [root, root.parent]
    if root.as_posix().endswith(KAGGLE_IMAGES):
        bases.append(root.parents[3])
    if (root / KAGGLE_IMAGES).is_dir():
        bases.insert(0, root)
    return list(dict.fromkeys(bases))


def _find(root: Path, name: str) -> Path | None:
    for base in _bases(root):
        for folder in LABEL_FOLDERS:
            candidate = base / folder / name
            if candidate.is_file():
                return candidate
    return None


def _looked_in(root: Path) -> str:
    return ", ".join(str(base / folder) for base in _bases(root) for folder in LABEL_FOLDERS[:2])


def _named(path: str | None, what: str) -> Path | None:
    if path is None:
        return None
    found = Path(path).expanduser()
    if not found.exists():
        raise DatasetError(f"{what} {path}: no such file")
    return found


def _devkit_wnids(meta: Path) -> dict[int, str]:
    import scipy.io

    try:
        synsets = scipy.io.loadmat(str(meta), squeeze_me=True)["synsets"]
    except Exception as error:
        raise DatasetError(f"{meta}: not a readable devkit meta.mat ({type(error).__name__})") from None
    return {int(s[0]): str(s[1]) for s in synsets if int(s[4]) == 0}  # num_children == 0: the 1000 leaves


def _voc_boxes(xml: Path, skipped: list[str]) -> list[tuple[str, Box]]:
    """(wnid, box) of each object; an object without a usable <bndbox> is left out and noted in `skipped`."""
    try:
        tree = ElementTree.parse(xml)
    except ElementTree.ParseError as error:
        raise DatasetError(f"{xml}: unreadable box annotation ({error})") from None
    boxes = []
    for number, obj in enumerate(tree.getroot().iter("object"), start=1):
        box = obj.find("bndbox")
        try:
            coords = tuple(float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError):
            skipped.append(f"{xml.name} object {number}")
            continue
        boxes.append((obj.findtext("name"), coords))
    return boxes


def _mapping_classes(mapping: Path | None) -> ClassList:
    """ImageNet's classes, unless a LOC_synset_mapping.txt names others: then its order and names."""
    imagenet = imagenet_classes()
    if mapping is None:
        return imagenet
    rows = [line.split(maxsplit=1) for line in mapping.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    if any(len(row) != 2 for row in rows):
        raise DatasetError(f"{mapping}: every line must be '<wnid> <name>'")
    if all(imagenet.index(wnid) is not None for wnid, _ in rows):
        return imagenet  # ImageNet (or a subset of it): torchvision's indices and names
    return ClassList(tuple(wnid for wnid, _ in rows), tuple(name.strip() for _, name in rows))


def validation_images(root: Path) -> Path:
    """The folder holding the validation images: the root, or Kaggle's ILSVRC/Data/CLS-LOC/val below it."""
    nested = root / KAGGLE_IMAGES
    if nested.is_dir() and not any(VAL_NAME.match(p.stem) for p in _images(root)):
        return nested
    return root


def _label_files(root: Path, files: DatasetFiles) -> dict[str, Path | None]:
    """The label, synset and box files to use: the ones named, else the first found where people unpack them."""
    labels, synsets = _named(files.labels, "labels"), _named(files.synsets, "synsets")
    solution = labels if labels is not None and labels.suffix.lower() == ".csv" else None
    truth = labels if labels is not None and solution is None else None
    if labels is None:
        solution = _find(root, KAGGLE_SOLUTION)
        truth = None if solution else _find(root, DEVKIT_TRUTH)
    mapping = synsets if synsets is not None and synsets.suffix.lower() == ".txt" else None
    meta = synsets if synsets is not None and mapping is None else None
    if synsets is None:
        mapping = _find(root, KAGGLE_MAPPING) if solution else None
        meta = _find(root, DEVKIT_META) if truth else None
    boxes = _named(files.boxes, "boxes")
    if boxes is None and truth is not None:
        for base in _bases(root):
            for folder in BOX_FOLDERS:
                if (base / folder).is_dir() and any((base / folder).glob("ILSVRC2012_val_*.xml")):
                    boxes = base / folder
                    break
            if boxes:
                break
    return {"labels": solution or truth, "synsets": mapping or meta, "boxes": boxes, "_solution": solution,
            "_truth": truth, "_meta": meta, "_mapping": mapping}


def imagenet_val(root: Path, files: DatasetFiles = DatasetFiles()) -> Dataset:
    folder = validation_images(root)
    images = {p.stem: p for p in _images(folder) if VAL_NAME.match(p.stem)}
    found = _label_files(folder, files)
    solution, truth = found["_solution"], found["_truth"]
    classes = _mapping_classes(found["_mapping"])
    labels: dict[str, str] = {}
    boxes: dict[str, list[Box]] = {}
    notes: list[str] = []
    source = (solution or truth or Path("labels")).name
    if solution is not None:
        # utf-8-sig: a CSV saved by a spreadsheet starts with a byte-order mark, which would rename ImageId
        with open(solution, newline="", encoding="utf-8-sig") as handle:
            for row in csv.DictReader(handle):
                parts = (row.get("PredictionString") or "").split()
                if not parts:
                    continue
                image_id = (row.get("ImageId") or "").strip()
                labels[image_id] = parts[0]
                boxes[image_id] = [tuple(float(v) for v in parts[i + 1:i + 5])
                                   for i in range(0, len(parts), 5) if parts[i] == parts[0]]
        if not labels:
            raise DatasetError(f"{solution}: no labels read (expected the columns ImageId,PredictionString)")
    elif truth is not None:
        meta = found["_meta"]
        if meta is None:
            raise DatasetError(f"{truth} needs the devkit's meta.mat (ILSVRC IDs -> wnids); looked in "
                               f"{_looked_in(folder)}; name it with synsets: or --synsets")
        ids = _devkit_wnids(meta)
        for number, line in enumerate(truth.read_text(encoding="utf-8-sig").split(), start=1):
            if int(line) not in ids:
                raise DatasetError(f"{truth}: line {number} names unknown ILSVRC2012 ID {line}")
            labels[f"ILSVRC2012_val_{number:08d}"] = ids[int(line)]
        skipped: list[str] = []
        for box_folder in [found["boxes"]] if found["boxes"] else []:
            for image_id in images:
                xml = box_folder / f"{image_id}.xml"
                if image_id not in boxes and xml.is_file():
                    annotated = _voc_boxes(xml, skipped)
                    boxes[image_id] = [b for wnid, b in annotated if wnid == labels.get(image_id)]
        if skipped:
            notes.append(f"{len(skipped)} box annotations without a usable <bndbox> ignored (first: {skipped[0]})")
            print(f"warning: {notes[-1]}", file=sys.stderr, flush=True)
    else:
        raise DatasetError(f"{folder}: ImageNet validation images without labels: no {KAGGLE_SOLUTION} or "
                           f"{DEVKIT_TRUTH} (+ {DEVKIT_META}) in {_looked_in(folder)}; name them with labels: / "
                           "--labels (and synsets: / --synsets), or use --layout plain to explain them unlabelled")
    if images and not any(i in labels for i in images):
        raise DatasetError(f"{solution or truth} labels none of the {len(images)} validation images in {folder}")
    records = [_labelled(i, images[i], labels.get(i), boxes.get(i, ()), root, source, classes=classes) for i in images]
    for image_id in sorted(set(labels) - set(images)):  # promised by the labels, not on disk: never opened
        if VAL_NAME.match(image_id):
            problem = f"missing image: {source} labels it, no such file in the dataset root"
            path = folder / f"{image_id}.JPEG"
        else:
            problem, path = f"invalid image id in {source}: {image_id!r}", folder / source
        records.append(ImageRecord(image_id, str(path), labels[image_id], problem=problem))
    # the other images of the folder: explained, unlabelled, never dropped
    others = [p for p in _images(folder) if not VAL_NAME.match(p.stem)]
    other_ids = unique_ids(others, folder)
    records += [ImageRecord(other_ids[p], str(p), problem=outside_root(root, p)) for p in others]
    used = {k: str(v) for k, v in found.items() if v is not None and not k.startswith("_")}
    return Dataset(sorted(records, key=lambda record: record.image_id), "imagenet_val", str(folder), used, notes)


WDS_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # the webdataset library's base_plus_ext
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")  # compressed shards are read in one sequential pass per actor


def _shards(root: Path | str) -> list[str]:
    """The shard files of a folder (.tar, .tar.gz, .tgz) or of a glob."""
    if Path(root).is_dir():
        return sorted({str(p) for suffix in SHARD_SUFFIXES for p in Path(root).glob(f"*{suffix}")})
    return sorted(glob.glob(str(root)))


def _sample_part(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member that is an image or a label, else None."""
    found = WDS_KEY.match(name)
    if found and (found.group(2) == "cls" or looks_like_image(f"x.{found.group(2)}")):
        return found.group(1), found.group(2)
    return None


def _label(entry: Entry | None, classes: ClassList) -> tuple[int | None, str | None]:
    """(class index, problem) of a sample's .cls member (None, None without one)."""
    if entry is None:
        return None, None
    if entry.member is None or entry.small is None:
        return None, f"unreadable label {entry.name}: {entry.problem or 'over 256 bytes'}"
    text = entry.small.decode(errors="replace").strip()
    label = int(text) if re.fullmatch(r"-?\d+", text) else None
    if label is None or not 0 <= label < len(classes.wnids):
        return None, f"unknown class index: {text[:20]!r} in {entry.name}"
    return label, None


def _shard_records(shard: str, classes: ClassList) -> list[ImageRecord]:
    """The records of one shard, in shard order (see tar_shards: links, duplicates and odd members)."""
    samples: dict[str, dict[str, Entry]] = {}
    earlier: list[tuple[str, str, Entry]] = []  # duplicates: each a failure row of its own
    for entry in list_shard(shard, lambda name: _sample_part(name) is not None):
        key, ext = _sample_part(entry.name)
        if entry.duplicate:
            earlier.append((key, ext, entry))
        else:
            samples.setdefault(key, {})[ext] = entry
    records = []
    for key, members in samples.items():
        images = sorted(ext for ext in members if ext != "cls")
        label, problem = _label(members.get("cls"), classes) if images else (None, None)
        wnid = classes.wnids[label] if label is not None else None
        for ext in images:
            entry = members[ext]
            image_id = Path(key).name if len(images) == 1 else f"{Path(key).name}.{ext}"
            # members are read from inside the shard only, so a name like ../x cannot reach outside
            record = _labelled(image_id, shard, wnid, problem=entry.problem or problem)
            records.append((entry.position, replace(record, member=entry.member or TarMember(entry.name, -1, -1))))
    for key, ext, entry in earlier:
        image_id = Path(key).name if len([e for e in samples.get(key, {}) if e != "cls"]) <= 1 else \
            f"{Path(key).name}.{ext}"
        if ext != "cls":
            records.append((entry.position, ImageRecord(f"{image_id}#{entry.duplicate}", shard, problem=entry.problem,
                                                        member=TarMember(entry.name, -1, -1))))
    return [record for _, record in sorted(records, key=lambda pair: pair[0])]


def webdataset(root: Path | str, files: DatasetFiles = DatasetFiles()) -> Dataset:
    """Tar shards (.tar, .tar.gz, .tgz) of samples: a sample's key is its member name up to the first dot of the
    file name (as in the webdataset library: 000012.input.jpg and 000012.cls are one sample); its image is any
    member Pillow reads (.jpg, .png, .webp, ...), its label <key>.cls (a class index). A sample with several images
    gives one record per image (<key>.<extension>). Records come in shard order (a compressed shard is then read
    in one pass); each carries its member's offset (`TarMember`), so that workers never search a shard."""
    shards = _shards(root)
    if not shards:
        raise DatasetError(f"{root}: no .tar shards (.tar, .tar.gz, .tgz)")
    classes = imagenet_classes()
    records = []
    for shard in shards:
        problem = outside_root(Path(root), Path(shard)) if Path(root).is_dir() else None
        if problem:
            raise DatasetError(f"{shard}: shard {problem}")
        try:
            records += _shard_records(shard, classes)
        except (tarfile.TarError, EOFError, OSError) as error:
            raise DatasetError(f"{shard}: unreadable tar shard ({error})") from None
    return Dataset(records, "webdataset", str(root), {"shards": f"{len(shards)} tar files"})


def plain(root: Path, files: DatasetFiles = DatasetFiles()) -> Dataset:
    """Any folder of images, subfolders included, unlabelled."""
    paths = _images_below(root)
    ids = unique_ids(paths, root)
    notes = ["subfolders explained unlabelled (their names are not wnids; --layout imagefolder makes them classes)"
             ] if any(p.parent != root for p in paths) else []
    return Dataset([ImageRecord(ids[p], str(p), problem=outside_root(root, p)) for p in paths], "plain", str(root),
                   notes=notes)


LAYOUTS: dict[str, Callable[..., Dataset]] = {
    "imagefolder": imagefolder, "imagenet_val": imagenet_val, "webdataset": webdataset, "plain": plain,
}


def detect_layout(root: str | Path, files: DatasetFiles = DatasetFiles()) -> str:
    """Which layout a dataset root (or a tar glob) is. Validation images (ILSVRC2012_val_*) are the imagenet_val
    layout, with or without label files found (without them, loading it says where it looked): their labels
    never vanish silently. Subfolders all named by wnids are an ImageFolder; other subfolders are a plain folder
    (their names are not classes unless --layout imagefolder says so)."""
    text = str(root)
    if any(ch in text for ch in "*?[") or text.endswith(SHARD_SUFFIXES):
        return "webdataset"
    root = Path(root)
    if root.is_file():
        kind = "an image file" if looks_like_image(root.name) else "a file"
        raise DatasetError(f"{root}: {kind}, not a dataset folder (give the folder that holds the images)")
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset directory")
    if _shards(root):
        return "webdataset"
    if files.labels or any(VAL_NAME.match(p.stem) for p in _images(validation_images(root))):
        return "imagenet_val"
    subfolders = [p for p in root.iterdir() if p.is_dir() and _images_below(p)]
    if subfolders and all(re.fullmatch(r"n\d{8}", p.name) for p in subfolders):
        return "imagefolder"
    if subfolders or _images(root):
        return "plain"
    raise DatasetError(f"{root}: no images found (layouts: {', '.join(LAYOUTS)})")


def load_dataset(root: str | Path, layout: str | None = None, files: DatasetFiles = DatasetFiles()) -> Dataset:
    """All records of a dataset in a fixed order (sorted by id within each layout), and what was used."""
    layout = layout or detect_layout(root, files)
    if layout not in LAYOUTS:
        raise DatasetError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    if files.named() and layout != "imagenet_val":
        raise DatasetError(f"labels / boxes / synsets files are read by the imagenet_val layout, not {layout}")
    dataset = LAYOUTS[layout](root if layout == "webdataset" else Path(root), files)
    seen: set[str] = set()
    for record in dataset.records:
        if record.image_id in seen:
            raise DatasetError(f"{root}: image id {record.image_id} appears twice")
        seen.add(record.image_id)
    return dataset


def load_records(root: str | Path, layout: str | None = None, files: DatasetFiles = DatasetFiles()
                 ) -> list[ImageRecord]:
    """All records of a dataset in a fixed order (sorted by id within each layout)."""
    return load_dataset(root, layout, files).records
