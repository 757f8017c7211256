"""The shapes-hans proof of the artifact-concept audit (issue 22), through demo/hans_cav.py: vgg-shapes-hans is
explained on the 360 shapes-hans images with concepts at its last three convolutions (conditional maps at LAYER),
5 of the 20 tagged stars are marked, hans.csv is the truth and the tag's box the mask. The channel chosen by its
AUROC for the 5 marked images retrieves all tagged images with AUROC >= 0.95, so do both CAVs on the 15 not marked,
and the channel's conditional maps put >= 50 % of the tagged images' positive relevance inside the tag's box. The
clean vgg-shapes on the same images has no such channel. Two runs of 360 images at 64 px with concepts and K = 8
maps: about 2 x 80-110 s on dev-2c (shared), most of it the first run's artifact build and Ray's start; the runs are
the session's `hans_concept_runs`, which the prototype proof reads too."""
from __future__ import annotations

import pytest

from demo.hans_cav import audit

pytestmark = pytest.mark.timeout(900)
LAYER = "features.8"  # the maps layer: vgg-shapes' third-last convolution (16 x 16 at 64 px)
AUROC_TARGET, R_BIAS_TARGET = 0.95, 0.5


def test_the_tag_surfaces_as_a_concept_of_vgg_shapes_hans(hans_concept_runs, local_ray):
    data, run = hans_concept_runs("vgg-shapes-hans")
    result = audit(data, run, LAYER)
    assert (result["images"], result["tagged"], result["marked"]) == (360, 20, 5)
    assert result["best_channel_auroc_truth"] >= AUROC_TARGET, result
    assert result["best_channel_auroc_truth_marked_classes"] >= AUROC_TARGET, result  # among the stars too
    for kind in ("cav_pattern", "cav_classifier"):
        assert result[kind]["unmarked"]["auroc"] >= AUROC_TARGET, (kind, result[kind])
    assert result["r_bias_concept_tagged_images"] >= 15, result  # the channel is among most tagged images' top 8
    assert result["r_bias_concept_tagged"] >= R_BIAS_TARGET, result
    assert result["r_bias_map_tagged"] > 5 * result["r_bias_map_clean"], result  # the tag's box: 2.9 % of the image


def test_the_clean_model_has_no_such_concept(hans_concept_runs, local_ray):
    """Over all images a star channel of the clean model retrieves the tagged images fairly well (they are all
    stars: 0.94 measured at LAYER); among the stars, where the tag is what sets them apart, no channel does, and
    none puts relevance on the tag."""
    data, run = hans_concept_runs("vgg-shapes")
    result = audit(data, run, LAYER)
    assert result["best_auroc_truth_marked_classes_any_channel"] < 0.85, result
    assert result["r_bias_concept_tagged"] < 0.1 and result["r_bias_map_tagged"] < 0.1, result
