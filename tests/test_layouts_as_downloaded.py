"""Issue 11.5-11.7: ImageNet as people download and unpack it, folders as people keep them, annotation files as
tools write them. Every image is found, every label kept, and what was used is said."""
from __future__ import annotations

import csv
import io
import tarfile

import numpy as np
import pytest
import scipy.io
from PIL import Image

from pipeline.classes import imagenet_classes
from pipeline.config import ConfigError, load_config
from pipeline.datasets import DatasetError, DatasetFiles, detect_layout, load_dataset, load_records

CLASSES = imagenet_classes()
LABELS = {1: 281, 2: 0, 3: 999}  # validation image number -> class index


def _jpeg(seed: int = 0, size=(40, 30), format="JPEG") -> bytes:
    array = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=format)
    return buffer.getvalue()


def _name(n: int) -> str:
    return f"ILSVRC2012_val_{n:08d}"


def _val_images(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for n in LABELS:
        (folder / f"{_name(n)}.JPEG").write_bytes(_jpeg(n))
    return folder


def _devkit(folder):
    """The devkit as extracted: ILSVRC2012_devkit_t12/data/{ground truth, meta.mat}."""
    data = folder / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    ids = {wnid: i + 1 for i, wnid in enumerate(CLASSES.wnids)}
    synsets = np.array([(ids[w], w, "words", "gloss", 0) for w in CLASSES.wnids],
                       dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"),
                              ("num_children", "O")])
    scipy.io.savemat(data / "meta.mat", {"synsets": synsets})
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "".join(f"{ids[CLASSES.wnids[c]]}\n" for c in LABELS.values()))


def _voc(folder, objects: str, n: int = 1):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{_name(n)}.xml").write_text(f"<annotation>{objects}</annotation>")


def _box(wnid: str, coords=(1, 2, 20, 25)) -> str:
    x0, y0, x1, y1 = coords
    return (f"<object><name>{wnid}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax>"
            f"<ymax>{y1}</ymax></bndbox></object>")


def _labels(records) -> dict[str, int | None]:
    return {r.image_id: r.label for r in records}


EXPECTED = {_name(n): c for n, c in LABELS.items()}


@pytest.mark.parametrize("where", ["beside", "one level up"])
def test_devkit_as_extracted_is_found(tmp_path, where):
    images = _val_images(tmp_path / "val")
    _devkit(images if where == "beside" else tmp_path)
    dataset = load_dataset(images)
    assert dataset.layout == "imagenet_val" and _labels(dataset.records) == EXPECTED
    assert dataset.files["labels"].endswith("ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt")
    assert "labels" in dataset.describe() and dataset.manifest()["files"]["synsets"].endswith("meta.mat")


def _kaggle(top, bom: bool = False):
    images = _val_images(top / "ILSVRC" / "Data" / "CLS-LOC" / "val")
    with open(top / "LOC_val_solution.csv", "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ImageId", "PredictionString"])
        for n, c in LABELS.items():
            writer.writerow([_name(n), f"{CLASSES.wnids[c]} 1 2 20 25"])
    (top / "LOC_synset_mapping.txt").write_text("".join(f"{w} {nm}\n" for w, nm in zip(CLASSES.wnids, CLASSES.names)))
    return images


@pytest.mark.parametrize("given", ["the archive's top", "the image folder"])
def test_kaggle_archive_as_unpacked(tmp_path, given):
    images = _kaggle(tmp_path / "imagenet-object-localization-challenge")
    root = images.parents[3] if given == "the archive's top" else images
    assert detect_layout(root) == "imagenet_val"
    records = load_records(root)
    assert _labels(records) == EXPECTED and all(r.boxes == ((1.0, 2.0, 20.0, 25.0),) for r in records)


def test_kaggle_csv_with_a_byte_order_mark_keeps_its_labels(tmp_path):
    images = _kaggle(tmp_path / "top", bom=True)
    assert _labels(load_records(images)) == EXPECTED


def test_box_xmls_in_their_own_folder_are_found(tmp_path):
    images = _val_images(tmp_path / "val")
    _devkit(tmp_path)
    _voc(tmp_path / "ILSVRC2012_bbox_val_v3" / "val", _box(CLASSES.wnids[281]))
    dataset = load_dataset(images)
    assert {r.image_id: r.boxes for r in dataset.records}[_name(1)] == ((1.0, 2.0, 20.0, 25.0),)
    assert dataset.files["boxes"].endswith("ILSVRC2012_bbox_val_v3/val")


def test_voc_object_without_bndbox_is_ignored_with_a_warning(tmp_path, capsys):
    images = _val_images(tmp_path / "val")
    _devkit(images)
    _voc(images / "bbox", "<object><name>n04328186</name></object>" + _box(CLASSES.wnids[281]))
    dataset = load_dataset(images)
    assert {r.image_id: r.boxes for r in dataset.records}[_name(1)] == ((1.0, 2.0, 20.0, 25.0),)
    assert "1 box annotations without a usable <bndbox> ignored" in capsys.readouterr().err
    assert dataset.notes


def test_files_named_by_the_user_replace_the_search(tmp_path):
    images = _val_images(tmp_path / "images")
    _devkit(tmp_path / "elsewhere")
    _voc(tmp_path / "my-boxes", _box(CLASSES.wnids[281], (3, 4, 30, 28)))
    data = tmp_path / "elsewhere" / "ILSVRC2012_devkit_t12" / "data"
    files = DatasetFiles(labels=str(data / "ILSVRC2012_validation_ground_truth.txt"),
                         synsets=str(data / "meta.mat"), boxes=str(tmp_path / "my-boxes"))
    records = load_records(images, files=files)
    assert _labels(records) == EXPECTED and records[0].boxes == ((3.0, 4.0, 30.0, 28.0),)
    with pytest.raises(DatasetError, match="labels .*nope.csv: no such file"):
        load_records(images, files=DatasetFiles(labels=str(tmp_path / "nope.csv")))
    config = load_config({"dataset": str(images), "labels": str(data / "ILSVRC2012_validation_ground_truth.txt"),
                          "synsets": str(data / "meta.mat")})
    assert config.labels.endswith("ground_truth.txt") and "labels" in config.identity()


def test_validation_images_whose_labels_are_not_found_are_an_error_saying_where_it_looked(tmp_path):
    images = _val_images(tmp_path / "val")
    with pytest.raises(DatasetError, match=r"without labels: .* in .*val.*--labels"):
        load_records(images)


def test_dataset_name_without_its_variable_says_what_to_set(monkeypatch):
    monkeypatch.delenv("IMAGENET_VAL_DIR", raising=False)
    with pytest.raises(ConfigError,
                       match=r"imagenet-val.yaml: root is \$\{IMAGENET_VAL_DIR\}.*export IMAGENET_VAL_DIR="):
        load_config({"dataset": "imagenet-val"})


def test_unknown_dataset_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"'imagenet_val'.*imagenet-val, sample, shapes"):
        load_config({"dataset": "imagenet_val"})


# ---- 11.6: nothing skipped without a word ---------------------------------------------------------------------

def test_nested_subfolders_of_a_plain_folder_are_listed(tmp_path):
    for rel in ("a.jpg", "2019/b.jpg", "2019/summer/c.png", "2020/a.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(_jpeg())
    dataset = load_dataset(tmp_path)
    assert dataset.layout == "plain"
    # ids: the stem where unique, else the path below the root
    assert sorted(r.image_id for r in dataset.records) == ["2020/a", "a", "b", "c"]


def test_same_stem_in_two_formats_gives_two_distinct_ids(tmp_path):
    (tmp_path / "photo.jpg").write_bytes(_jpeg(1))
    (tmp_path / "photo.png").write_bytes(_jpeg(2, format="PNG"))
    assert sorted(r.image_id for r in load_records(tmp_path)) == ["photo.jpg", "photo.png"]


def test_class_folders_not_named_by_wnid_are_classes_in_sorted_order(tmp_path):
    for cls in ("dog", "cat", "bird"):
        (tmp_path / cls / "sub").mkdir(parents=True)
        (tmp_path / cls / "sub" / f"{cls}1.jpg").write_bytes(_jpeg())
    (tmp_path / "loose.jpg").write_bytes(_jpeg())
    dataset = load_dataset(tmp_path, "imagefolder")
    labels = {r.image_id: (r.label, r.label_name) for r in dataset.records if r.problem is None}
    assert labels == {"bird1": (0, "bird"), "cat1": (1, "cat"), "dog1": (2, "dog")}  # torchvision's order
    loose = [r.problem for r in dataset.records if r.image_id == "loose"]
    assert loose == ["not in a class folder (ImageFolder layout)"]
    from pipeline.classes import ModelClasses, check_classes

    with pytest.raises(DatasetError, match="class 0 is 'bird'.*model vgg16's is 'tench'"):
        check_classes(dataset.records, ModelClasses(1000, CLASSES.names, CLASSES.wnids), "vgg16", str(tmp_path))


def _tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as archive:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))


def test_webdataset_keys_end_at_the_first_dot_and_every_pillow_format_is_read(tmp_path):
    _tar(tmp_path / "shard-000000.tar", {
        "000012.input.jpg": _jpeg(1), "000012.cls": b"281",
        "000013.webp": _jpeg(2, format="WEBP"), "000013.cls": b"0",
        "sub/000014.png": _jpeg(3, format="PNG"), "sub/000014.cls": b"999",
    })
    labels = _labels(load_records(tmp_path))
    assert labels == {"000012": 281, "000013": 0, "000014": 999}
