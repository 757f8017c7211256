"""The offline demo: the shapes generator is deterministic and its boxes are its masks' boxes; the committed
vgg-shapes weights load, are the recorded file and reach the recorded accuracy; LRP of the trained model points
at the shapes far more often than maps that know nothing of the image, and its pixel-flipping AOPC is far above
the random-order baseline; the pipeline explains the shapes end to
end with the shapes' class names; and training runs."""
from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from demo import shapes
from demo.localisation import evaluate, validation_set
from demo.train import save, train
from lrp_module import LRPModel, demo_model
from lrp_module.zoo import WeightsError, build_vgg
from pipeline import stats
from pipeline.classes import ModelClasses, check_classes, imagenet_classes
from pipeline.config import load_config
from pipeline.datasets import DatasetError, load_records
from pipeline.faithfulness import aopc, region_perturbation
from pipeline.run import explain

pytestmark = pytest.mark.timeout(300)
SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"


def _digests(root) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())}


@pytest.fixture(scope="module")
def validation(tmp_path_factory):
    """The full validation split, as `make shapes-data` writes it."""
    return shapes.write_split(tmp_path_factory.mktemp("shapes") / "val")


@pytest.fixture(scope="module")
def localisation_results(validation):
    model, _ = build_vgg("vgg-shapes", "demo")
    return evaluate(validation, model)


def test_generator_is_deterministic(tmp_path):
    first = shapes.write_split(tmp_path / "a", per_class=2)
    second = shapes.write_split(tmp_path / "b", per_class=2)
    assert _digests(first) == _digests(second)
    other = shapes.write_split(tmp_path / "c", per_class=2, seed=shapes.TRAIN_SEED)
    assert _digests(other)["ILSVRC2012_val_00000001.JPEG"] != _digests(first)["ILSVRC2012_val_00000001.JPEG"]
    again = shapes.make_sample(shapes.VAL_SEED, 5)
    np.testing.assert_array_equal(again.image, shapes.make_sample(shapes.VAL_SEED, 5).image)
    np.testing.assert_array_equal(again.mask, shapes.read_masks(first)["ILSVRC2012_val_00000006"])


def test_boxes_are_the_masks_boxes_and_classes_come_from_the_mapping(tmp_path):
    root = shapes.write_split(tmp_path / "val", per_class=3)
    masks = shapes.read_masks(root)
    records = load_records(root)  # the layout is detected as imagenet_val
    assert len(records) == 3 * len(shapes.CLASSES)
    for record in records:
        mask = torch.from_numpy(masks[record.image_id])
        (box,) = record.boxes
        rows, cols = np.nonzero(mask.numpy())
        assert box == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
        covered = stats.box_mask([box], *mask.shape)
        assert bool(covered[mask].all()) and int(covered.sum()) == (box[2] - box[0]) * (box[3] - box[1])
        assert record.wnid == shapes.CLASSES[record.label][0]
        assert record.label_name == shapes.CLASS_NAMES[record.label]
        # the object stays whole inside the pipeline's centre crop (64 of 73 after the resize)
        assert box[0] >= shapes.MARGIN and box[2] <= shapes.IMAGE_SIZE - shapes.MARGIN
    assert [r.label for r in records[:6]] == list(range(6))


def test_committed_weights_are_the_recorded_file_and_reach_the_recorded_accuracy(validation):
    record = demo_model.record()
    assert hashlib.sha256(demo_model.WEIGHTS_FILE.read_bytes()).hexdigest() == record["sha256"]
    model, info = build_vgg("vgg-shapes", "auto")
    assert info.kind == "demo" and info.sha256 == record["sha256"] and info.categories == list(shapes.CLASS_NAMES)
    assert record["classes"] == list(shapes.CLASS_NAMES) and record["wnids"] == [w for w, _ in shapes.CLASSES]
    data = validation_set(validation)
    with torch.inference_mode():
        accuracy = float((model(data.images).argmax(1) == data.labels).float().mean())
    recorded = record["training"]["val_accuracy"]
    assert recorded >= 0.9
    assert abs(accuracy - recorded) <= 1.5 / len(data.labels)  # the same images: at most one flips


def test_changed_or_mismatched_weights_are_refused(tmp_path, monkeypatch):
    with pytest.raises(WeightsError, match="no ImageNet weights"):
        build_vgg("vgg-shapes", "imagenet")
    tampered = tmp_path / "vgg-shapes.pt"
    shutil.copy(demo_model.WEIGHTS_FILE, tampered)
    with open(tampered, "ab") as handle:
        handle.write(b"\0")
    monkeypatch.setattr(demo_model, "WEIGHTS_FILE", tampered)
    with pytest.raises(WeightsError, match="not the committed file"):
        build_vgg("vgg-shapes", "demo")
    vgg11 = tmp_path / "vgg11.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(build_vgg("vgg11", "random", num_classes=6)[0].state_dict(), vgg11)
    with pytest.raises(WeightsError, match="do not match vgg-shapes"):
        build_vgg("vgg-shapes", vgg11)


@pytest.mark.parametrize("composite", ["epsilon_gamma_box", "epsilon_plus_flat"])
def test_lrp_points_at_the_shapes(localisation_results, composite):
    """On the 192 validation images: LRP's arg-max falls in the object's box far more often than a random
    map's (whose hit rate is about the box's share of the image), and far more of its positive relevance lies
    in the box and in the exact mask than a uniform map puts there (the box's / mask's area) or than LRP of the
    same network with random weights puts in the box."""
    results = localisation_results
    lrp, noise, area = results["maps"][f"lrp {composite}"], results["maps"]["random Gaussian map"], \
        results["area_fraction"]
    untrained = results["maps"]["lrp epsilon_gamma_box, random weights"]
    assert area["box"] < 0.25 and abs(noise["pointing_game_box"] - area["box"]) < 0.1
    assert lrp["pointing_game_box"] >= 0.8 and lrp["pointing_game_box"] >= noise["pointing_game_box"] + 0.5
    assert lrp["pointing_game_mask"] >= 0.7
    assert lrp["positive_in_box"] >= 2.5 * area["box"]
    assert lrp["positive_in_mask"] >= 3 * area["mask"]
    # training, not only the image's strong edges, puts the relevance on the object
    assert lrp["positive_in_box"] >= untrained["positive_in_box"] + 0.3


@pytest.mark.parametrize("composite", ["epsilon_gamma_box", "epsilon_plus_flat"])
def test_lrp_pixel_flipping_beats_random_order(validation, composite):
    """Region perturbation (Samek et al. 2017) with the shapes' settings (configs/datasets/shapes.yaml: 8x8
    regions, 32 steps): removing regions in LRP's order lowers the true class's logit far faster than removing
    them in a random order, for nearly every image; a map that knows nothing of the image (random Gaussian) does
    no better than the random order."""
    config = load_config({"dataset": "shapes", "model": "vgg-shapes"})
    patch, steps = config.flip_patch, config.flip_steps
    data = validation_set(validation)
    model, _ = build_vgg("vgg-shapes", "demo")
    relevance = LRPModel(model, composite)(data.images, data.labels)

    def aopc_of(maps, order):
        return aopc(region_perturbation(model, data.images, maps, data.labels, steps=steps, patch=patch,
                                        order=order))

    lrp_order, random_order = aopc_of(relevance, "morf"), aopc_of(relevance, "random")
    noise = torch.randn(relevance.shape, generator=torch.Generator().manual_seed(0))
    noise_order = aopc_of(noise, "morf")
    assert float(lrp_order.mean()) >= 1.5 * float(random_order.mean()) > 0
    assert float((lrp_order > random_order).float().mean()) >= 0.9
    assert float(noise_order.mean()) <= 0.7 * float(lrp_order.mean())


def test_pipeline_explains_shapes_with_their_class_names(tmp_path, local_ray):
    root = shapes.write_split(tmp_path / "shapes", per_class=2)
    config = load_config({"dataset": "shapes", "model": "vgg-shapes", "out": str(tmp_path / "run"),
                          "cache": str(tmp_path / "cache"), "batch_size": 4, "shard_size": 8})
    assert config.size == shapes.IMAGE_SIZE and config.root.endswith("data/shapes")  # configs/datasets/shapes.yaml
    config.root = str(root)
    manifest = explain(config, progress=False)
    assert manifest["totals"] == {"images": 12, "explained": 12, "failed": 0}
    assert manifest["weights"]["kind"] == "demo" and not manifest["random_weights"]
    table = pd.read_parquet(tmp_path / "run" / "stats").sort_values("image_id")
    assert table.label_name.tolist() == [shapes.CLASS_NAMES[i % 6] for i in range(12)]
    assert set(table.pred_name) <= set(shapes.CLASS_NAMES)
    assert (table.pred_name == table.label_name).mean() >= 0.75
    assert table.positive_in_box.notna().all() and table.pointing_game_hit.notna().all()


def test_an_imagenet_model_on_shapes_is_one_clear_error(tmp_path):
    records = load_records(shapes.write_split(tmp_path / "shapes", per_class=1))
    classes = imagenet_classes()
    imagenet = ModelClasses(1000, classes.names, classes.wnids)
    shape_classes = ModelClasses(6, tuple(shapes.CLASS_NAMES))
    with pytest.raises(DatasetError, match="class 0 is 'circle' .* but model vgg11's is 'tench'"):
        check_classes(records, imagenet, "vgg11", "data/shapes")
    with pytest.raises(DatasetError, match=r"class \d+ is .* but model vgg-shapes has 6 classes \(0-5\)"):
        check_classes(load_records(SAMPLE), shape_classes, "vgg-shapes", "data/sample")
    check_classes(records, shape_classes, "vgg-shapes", "data/shapes")
    check_classes(load_records(SAMPLE), imagenet, "vgg16", "data/sample")  # the sample keeps ImageNet's


@pytest.mark.timeout(120)
def test_training_runs_and_writes_a_loadable_record(tmp_path):
    model, facts = train(per_class=2, epochs=1, val_per_class=1, log=lambda message: None)
    record = json.loads(save(model, facts, tmp_path).read_text())
    weights = tmp_path / demo_model.WEIGHTS_FILE.name
    assert record["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert record["classes"] == list(shapes.CLASS_NAMES) and record["training"]["epochs"] == 1
    loaded, info = build_vgg("vgg-shapes", weights)
    assert info.kind == "file" and info.categories == list(shapes.CLASS_NAMES)
    torch.testing.assert_close(loaded.state_dict()["features.0.weight"], model.state_dict()["features.0.weight"])
