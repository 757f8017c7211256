"""The concept audit's three commands on a random-weights ImageNet-style run (wnid folders, a torchvision VGG11,
not a demo): `prototypes`, `cav` and `correct` each finish, write what their docs name, and the corrected model's
export is verified. The shapes demos carry the proofs (tests/test_prototypes_hans.py, test_cav_shapes_hans.py,
test_correction.py); this checks nothing in them depends on the demos' models or layouts."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.layout import RunLayout
from pipeline.run_reader import concept_relevance

from .helpers import explain_on_local_ray

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.timeout(900)
SIZE = 32
LAYER = "features.13"  # VGG11's sixth convolution (4 x 4 at 32 px)
WNIDS = ["n01440764", "n02123045", "n07920052"]


@pytest.fixture(scope="module")
def imagenet_style_run(tmp_path_factory, local_ray) -> tuple:
    """24 random images in three wnid folders, explained by a random VGG11 with concepts at LAYER."""
    home = tmp_path_factory.mktemp("audit")
    rng = np.random.default_rng(3)
    for i in range(24):
        folder = home / "images" / WNIDS[i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40 + i, 48, 3), dtype=np.uint8)).save(folder / f"i{i:02d}.JPEG")
    config = load_config(dict(dataset=str(home / "images"), model="vgg11", weights="random", size=SIZE,
                              batch_size=4, shard_size=8, map_dtype="float32", out=str(home / "run"),
                              cache=str(home / "cache"), concepts=dict(layers=[LAYER], maps=2, top=2, relmax=2)))
    manifest = explain_on_local_ray(config)
    assert manifest["totals"]["explained"] == 24
    return home, home / "run"


def test_prototypes_cav_and_correct_run_on_it(imagenet_style_run, capsys):
    home, run = imagenet_style_run
    layout = RunLayout(run)
    ids, vectors = concept_relevance(layout, LAYER)
    assert vectors.shape == (24, 512)

    assert main(["prototypes", str(run), "--layer", LAYER, "--no-progress"]) == 0
    images = pd.read_parquet(layout.prototypes / "images.parquet")
    table = pd.read_parquet(layout.prototypes / "prototypes.parquet")
    summary = json.loads((layout.prototypes / "summary.json").read_text())
    assert set(images.image_id) <= set(ids) and len(images) > 0, summary  # every class with >= 10 images is fitted
    assert set(images["class"]) == set(table["class"]) and (table.groupby("class").weight.sum() - 1).abs().max() < 1e-5

    marked = home / "marked.csv"
    pd.DataFrame({"image_id": ids[:6]}).to_csv(marked, index=False)
    assert main(["cav", str(run), "--layer", LAYER, "--marked", str(marked)]) == 0
    scored = pd.read_parquet(layout.cav_images("artifact"))
    assert sorted(scored.image_id) == sorted(ids) and scored.marked.sum() == 6

    out = home / "corrected"
    assert main(["correct", str(run), "--layer", LAYER, "--marked", str(marked), "--out", str(out)]) == 0
    record = json.loads((out / "correction.json").read_text())
    assert record["model"] == "vgg11" and record["images"]["marked"] == 6 and record["images"]["clean"] == 18
    assert all(check["ok"] for check in record["export"]["verification"].values())
    assert json.loads(layout.correction_record(out.name).read_text()) == record
    capsys.readouterr()
