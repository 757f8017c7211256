"""Dataset layouts: the same images written in every layout give the same records, labels and boxes; the layout
is detected; preprocessing matches the weights' own transforms and carries boxes through resize and crop."""
from __future__ import annotations

import csv
import io
import tarfile

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from torchvision.models import VGG16_Weights

from pipeline.classes import imagenet_classes
from pipeline.datasets import DatasetError, detect_layout, load_records
from pipeline.preprocess import DecodeError, decode, load, preprocess, read_bytes

CLASSES = imagenet_classes()
# (index in the validation set, class index, image size, boxes in original pixels)
IMAGES = [
    (1, 281, (400, 300), [(100.0, 50.0, 300.0, 250.0)]),
    (2, 0, (300, 500), [(10.0, 20.0, 120.0, 200.0), (150.0, 300.0, 290.0, 480.0)]),
    (3, 999, (256, 256), []),
    (4, 281, (640, 480), [(0.0, 0.0, 639.0, 479.0)]),
]


def _jpeg(seed: int, size) -> bytes:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _name(number: int) -> str:
    return f"ILSVRC2012_val_{number:08d}"


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    data = {n: _jpeg(n, size) for n, _, size, _ in IMAGES}
    # ImageFolder
    for n, cls, _, _ in IMAGES:
        folder = root / "imagefolder" / CLASSES.wnids[cls]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{_name(n)}.JPEG").write_bytes(data[n])
    # ImageNet val, Kaggle flavour
    kaggle = root / "kaggle"
    kaggle.mkdir()
    for n in data:
        (kaggle / f"{_name(n)}.JPEG").write_bytes(data[n])
    with open(kaggle / "LOC_val_solution.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ImageId", "PredictionString"])
        for n, cls, _, boxes in IMAGES:
            wnid = CLASSES.wnids[cls]
            parts = [f"{wnid} {int(b[0])} {int(b[1])} {int(b[2])} {int(b[3])}" for b in boxes] or [f"{wnid} 0 0 1 1"]
            writer.writerow([_name(n), " ".join(parts)])
    (kaggle / "LOC_synset_mapping.txt").write_text(
        "".join(f"{w} {nm}\n" for w, nm in zip(CLASSES.wnids, CLASSES.names)))
    # ImageNet val, devkit flavour: ILSVRC IDs in another order than the sorted wnids, boxes as VOC XML
    devkit = root / "devkit"
    (devkit / "bbox").mkdir(parents=True)
    for n in data:
        (devkit / f"{_name(n)}.JPEG").write_bytes(data[n])
    ids = {wnid: 1000 - i for i, wnid in enumerate(CLASSES.wnids)}
    synsets = np.array([(ids[w], w, "words", "gloss", 0) for w in CLASSES.wnids],
                       dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"),
                              ("num_children", "O")])
    scipy.io.savemat(devkit / "meta.mat", {"synsets": synsets})
    truth = [ids[CLASSES.wnids[cls]] for _, cls, _, _ in IMAGES]
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(map(str, truth)) + "\n")
    for n, cls, _, boxes in IMAGES:
        objects = "".join(
            f"<object><name>{CLASSES.wnids[cls]}</name><bndbox><xmin>{int(b[0])}</xmin><ymin>{int(b[1])}</ymin>"
            f"<xmax>{int(b[2])}</xmax><ymax>{int(b[3])}</ymax></bndbox></object>" for b in boxes)
        (devkit / "bbox" / f"{_name(n)}.xml").write_text(f"<annotation>{objects}</annotation>")
    # WebDataset
    shards = root / "wds"
    shards.mkdir()
    with tarfile.open(shards / "shard-000000.tar", "w") as archive:
        for n, cls, _, _ in IMAGES:
            for suffix, payload in (("jpg", data[n]), ("cls", str(cls).encode())):
                info = tarfile.TarInfo(f"{_name(n)}.{suffix}")
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
    # plain
    plain = root / "plain"
    plain.mkdir()
    for n in data:
        (plain / f"{_name(n)}.jpg").write_bytes(data[n])
    return root


@pytest.mark.parametrize("name,layout", [("imagefolder", "imagefolder"), ("kaggle", "imagenet_val"),
                                         ("devkit", "imagenet_val"), ("wds", "webdataset"),
                                         ("plain", "imagenet_val")])
def test_detection(layouts, name, layout):
    """Validation images without label files (`plain`) are still the validation layout: loading them says where
    it looked for labels (they never vanish silently); --layout plain explains them unlabelled."""
    assert detect_layout(layouts / name) == layout


def test_every_layout_gives_the_same_labels_and_images(layouts):
    by_layout = {name: load_records(layouts / name, "plain" if name == "plain" else None)
                 for name in ("imagefolder", "kaggle", "devkit", "wds", "plain")}
    expected_ids = [_name(n) for n, _, _, _ in IMAGES]
    for name, records in by_layout.items():
        assert sorted(r.image_id for r in records) == expected_ids, name
    for name in ("imagefolder", "kaggle", "devkit", "wds"):
        labels = {r.image_id: (r.wnid, r.label, r.label_name) for r in by_layout[name]}
        for n, cls, _, _ in IMAGES:
            assert labels[_name(n)] == (CLASSES.wnids[cls], cls, CLASSES.names[cls]), name
    assert all(r.label is None for r in by_layout["plain"])
    reference = {r.image_id: load(r)[0] for r in by_layout["plain"]}
    for name, records in by_layout.items():
        for record in records:
            assert torch.equal(load(record)[0], reference[record.image_id]), (name, record.image_id)


def test_boxes_from_both_validation_sources_agree(layouts):
    kaggle = {r.image_id: r.boxes for r in load_records(layouts / "kaggle")}
    devkit = {r.image_id: r.boxes for r in load_records(layouts / "devkit")}
    for n, _, _, boxes in IMAGES[:2]:
        assert list(kaggle[_name(n)]) == boxes == list(devkit[_name(n)])
    assert devkit[_name(3)] == ()


def test_preprocessing_matches_weights_transforms_and_moves_boxes():
    image = Image.new("RGB", (400, 300), (10, 200, 30))
    tensor, boxes = preprocess(image, ((100.0, 50.0, 300.0, 250.0),))
    assert (tensor - VGG16_Weights.DEFAULT.transforms()(image)).abs().max() < 1e-5
    # resize 300 -> 256 (x 0.8525 for the 341-wide image), centre crop offsets 58 and 16
    assert boxes[0] == pytest.approx((100 * 341 / 400 - 58, 50 * 256 / 300 - 16, 300 * 341 / 400 - 58,
                                      250 * 256 / 300 - 16), abs=1e-3)
    _, outside = preprocess(Image.new("RGB", (600, 200)), ((0.0, 0.0, 50.0, 50.0),))
    assert outside == []  # cropped away entirely


def test_decoding_errors_are_specific(tmp_path):
    with pytest.raises(DecodeError, match="empty file"):
        decode(b"")
    with pytest.raises(DecodeError, match=r"not an image \(no known image format\)"):
        decode(b"this is text, not a JPEG")
    with pytest.raises(DecodeError, match="missing file"):
        read_bytes(str(tmp_path / "missing.jpg"))
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    assert decode(buffer.getvalue()).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white


def test_layout_errors(tmp_path):
    with pytest.raises(DatasetError, match="no such dataset directory"):
        detect_layout(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images found"):
        detect_layout(tmp_path / "empty")
    val = tmp_path / "val"
    val.mkdir()
    (val / "ILSVRC2012_val_00000001.JPEG").write_bytes(_jpeg(0, (32, 32)))
    assert detect_layout(val) == "imagenet_val"  # validation names: their labels are expected
    with pytest.raises(DatasetError, match="without labels: no LOC_val_solution.csv or "
                                           "ILSVRC2012_validation_ground_truth.txt .* in .*val"):
        load_records(val)
    assert [r.label for r in load_records(val, layout="plain")] == [None]
    with pytest.raises(DatasetError, match="unknown layout"):
        load_records(val, layout="coco")
