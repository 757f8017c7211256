"""The planted Clever Hans surfaces as a prototype, without being told where it is: shapes-hans (a third of the 60
stars carry a tag) explained by vgg-shapes-hans (trained on it: it reads the tag) with concepts at LAYER, then
`make prototypes`; among the star class's prototypes, one whose images are the tagged stars (purity >= 0.9). The
clean vgg-shapes on the same images has no such prototype. The runs are the session's `hans_concept_runs` (concepts
at the last three convolutions, features.12 among them), shared with the CAV proof: run alone, each test explains
the 360 images once (about 80-110 s on the shared 2 cores), else it reads the run the CAV proof made."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from demo import shapes_hans
from pipeline.audit.prototypes import PrototypeOptions, prototypes
from pipeline.layout import RunLayout

pytestmark = pytest.mark.timeout(600)
STAR = shapes_hans.PLANTED
LAYER = "features.12"  # vgg-shapes: the fourth of its five convolutions, 32 channels, 8 x 8 at 64 px
MIN_MEMBERS = 5  # a prototype of fewer images says nothing about purity


def _star_prototypes(data: Path, run: Path) -> pd.DataFrame:
    """The star class's images.parquet rows with their tag, after `make prototypes` at LAYER on the run."""
    prototypes(run, PrototypeOptions(classes=(STAR,), layer=LAYER), progress=False)
    images = pd.read_parquet(RunLayout(run).prototypes / "images.parquet")
    images["tag"] = images["image_id"].map(shapes_hans.read_tags(data))
    return images


def _purity(images: pd.DataFrame) -> pd.DataFrame:
    """Per prototype: its images, how many are tagged, their share."""
    table = images.groupby("prototype")["tag"].agg(images="size", tagged="sum", purity="mean")
    return table[table["images"] >= MIN_MEMBERS]


def test_a_star_prototype_is_the_tagged_stars(hans_concept_runs, local_ray):
    images = _star_prototypes(*hans_concept_runs("vgg-shapes-hans"))
    assert images["tag"].sum() == 20 and len(images) >= 50
    table = _purity(images)
    best = table.sort_values("purity").iloc[-1]
    assert best["purity"] >= 0.9, table
    assert best["tagged"] >= 0.8 * 20, table  # and it holds most of the tagged stars


def test_the_clean_model_has_no_tag_prototype(hans_concept_runs, local_ray):
    images = _star_prototypes(*hans_concept_runs("vgg-shapes"))
    assert images["tag"].sum() == 20
    assert _purity(images)["purity"].max() < 0.9, _purity(images)
