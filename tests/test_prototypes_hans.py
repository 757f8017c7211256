"""The planted Clever Hans surfaces as a prototype, without being told where it is: shapes-hans (a third of the 60
stars carry a tag) explained by vgg-shapes-hans (trained on it: it reads the tag) with concepts at LAYER, then
`make prototypes`; among the star class's prototypes, one whose images are the tagged stars (purity >= 0.9). The
clean vgg-shapes on the same images has no such prototype. Each test explains the 360 images once: 2.5 minutes for
both on the shared 2 cores (load 8-10, including the artifacts' build), beyond the ~20 s of a unit test."""
from __future__ import annotations

import warnings
from pathlib import Path

import pandas as pd
import pytest

from demo import shapes_hans
from pipeline.audit.prototypes import PrototypeOptions, prototypes
from pipeline.config import load_config
from pipeline.layout import RunLayout
from pipeline.run import explain

pytestmark = pytest.mark.timeout(600)
STAR = shapes_hans.PLANTED
LAYER = "features.12"  # vgg-shapes: the fourth of its five convolutions, 32 channels, 8 x 8 at 64 px
MIN_MEMBERS = 5  # a prototype of fewer images says nothing about purity


@pytest.fixture(scope="module")
def hans_data(tmp_path_factory) -> Path:
    return shapes_hans.write_split(tmp_path_factory.mktemp("hans") / "data")


def _star_prototypes(data: Path, model: str, out: Path, cache: Path) -> pd.DataFrame:
    """The star class's images.parquet rows with their tag, after explaining shapes-hans with `model`."""
    config = load_config({"dataset": "shapes-hans", "model": model, "out": str(out), "cache": str(cache),
                          "batch_size": 32, "shard_size": 128,
                          "concepts": {"layers": [LAYER], "maps": 0, "top": 3, "relmax": 4}})
    config.root = str(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explain(config, progress=False)
    prototypes(out, PrototypeOptions(classes=(STAR,)), progress=False)
    images = pd.read_parquet(RunLayout(out).prototypes / "images.parquet")
    images["tag"] = images["image_id"].map(shapes_hans.read_tags(data))
    return images


def _purity(images: pd.DataFrame) -> pd.DataFrame:
    """Per prototype: its images, how many are tagged, their share."""
    table = images.groupby("prototype")["tag"].agg(images="size", tagged="sum", purity="mean")
    return table[table["images"] >= MIN_MEMBERS]


def test_a_star_prototype_is_the_tagged_stars(hans_data, artifact_cache, local_ray):
    images = _star_prototypes(hans_data, "vgg-shapes-hans", hans_data.parent / "hans-run", artifact_cache)
    assert images["tag"].sum() == 20 and len(images) >= 50
    table = _purity(images)
    best = table.sort_values("purity").iloc[-1]
    assert best["purity"] >= 0.9, table
    assert best["tagged"] >= 0.8 * 20, table  # and it holds most of the tagged stars


def test_the_clean_model_has_no_tag_prototype(hans_data, artifact_cache, local_ray):
    images = _star_prototypes(hans_data, "vgg-shapes", hans_data.parent / "clean-run", artifact_cache)
    assert images["tag"].sum() == 20
    assert _purity(images)["purity"].max() < 0.9, _purity(images)
