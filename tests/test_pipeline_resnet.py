"""`make explain MODEL=resnet18`: a ResNet through the whole pipeline (traced LRP artifact, Ray actors, HDF5 maps,
Parquet statistics); the maps equal LRPModel on the same preprocessed images. With concepts at a container
(`layer4`) and a convolution inside a residual block: the stored concept relevance and top-K concept maps equal
the float64 oracle's within eager float32's bound, as on the VGGs (tests/test_pipeline_concepts.py)."""
from __future__ import annotations

import warnings

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import lrp_module as lrp
from lrp_module.oracle import Float64Oracle, bound, compare
from lrp_module.zoo import build_model
from pipeline.config import load_config
from pipeline.datasets import load_records
from pipeline.layout import RunLayout
from pipeline.preprocess import Preprocessing, load
from pipeline.run import explain
from pipeline.run_reader import concept_relevance

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.timeout(900)
SIZE = 64
LAYERS = ["layer4", "layer3.1.conv2"]  # the maps layer (a container: the last block's output), one inside a block


def test_resnet18_end_to_end(tmp_path, local_ray):
    root = tmp_path / "images"
    rng = np.random.default_rng(1)
    for i, wnid in enumerate(["n01440764", "n02123045", "n07920052"]):
        (root / wnid).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (70 + 5 * i, 90, 3), dtype=np.uint8)).save(root / wnid / f"i{i}.JPEG")
    config = load_config(dict(dataset=str(root), model="resnet18", weights="random", size=SIZE, batch_size=2,
                              shard_size=2, map_dtype="float32", out=str(tmp_path / "run"),
                              cache=str(tmp_path / "cache"), concepts=dict(layers=LAYERS, maps=2, top=2, relmax=2)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manifest = explain(config, progress=False)
        source = build_model("resnet18", "random")[0]
        model = lrp.LRPModel(source, "epsilon_gamma_box")
    assert manifest["totals"] == {"images": 3, "explained": 3, "failed": 0}
    records = load_records(root)
    prep = Preprocessing.for_size(SIZE)
    x = torch.stack([load(r, prep)[0] for r in records])
    _, expected = model.explain(x)
    with h5py.File(tmp_path / "run" / "relevance.h5") as handle:
        maps = torch.from_numpy(handle["relevance"][:])
        channels = handle["concept_channels"][:]
        stored_maps = torch.from_numpy(handle["concept_maps"][:].astype(np.float64))
    expected = expected.sum(1)
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    oracle = Float64Oracle.like(source, model).lrp
    float64 = oracle.concept_relevance(x.double(), None, LAYERS)
    eager = model.concept_relevance(x, None, LAYERS)
    layout = RunLayout(tmp_path / "run")
    for layer in LAYERS:
        ids, stored = concept_relevance(layout, layer)
        assert ids == [r.image_id for r in records] and stored.shape == float64[layer].shape
        assert compare(torch.from_numpy(stored), float64[layer]).worst <= \
            bound(compare(eager[layer], float64[layer]).worst)
    assert channels.shape == (3, 2) and stored_maps.shape == (3, 2, SIZE, SIZE)
    conditions = [[{LAYERS[0]: [int(c)]} for c in row] for row in channels]
    maps64 = oracle.concept_maps(x.double(), None, conditions)
    eager_maps = model.concept_maps(x, None, conditions)
    assert compare(stored_maps, maps64).worst <= bound(compare(eager_maps, maps64).worst)
