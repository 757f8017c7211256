"""`make explain MODEL=resnet18`: a ResNet through the whole pipeline (traced LRP artifact, Ray actors, HDF5 maps,
Parquet statistics); the maps equal LRPModel on the same preprocessed images."""
from __future__ import annotations

import warnings

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import lrp_module as lrp
from lrp_module.zoo import build_model
from pipeline.config import load_config
from pipeline.datasets import load_records
from pipeline.preprocess import Preprocessing, load
from pipeline.run import explain

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.timeout(900)
SIZE = 64


def test_resnet18_end_to_end(tmp_path, local_ray):
    root = tmp_path / "images"
    rng = np.random.default_rng(1)
    for i, wnid in enumerate(["n01440764", "n02123045", "n07920052"]):
        (root / wnid).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (70 + 5 * i, 90, 3), dtype=np.uint8)).save(root / wnid / f"i{i}.JPEG")
    config = load_config(dict(dataset=str(root), model="resnet18", weights="random", size=SIZE, batch_size=2,
                              shard_size=2, map_dtype="float32", out=str(tmp_path / "run"),
                              cache=str(tmp_path / "cache")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manifest = explain(config, progress=False)
        model = lrp.LRPModel(build_model("resnet18", "random")[0], "epsilon_gamma_box")
    assert manifest["totals"] == {"images": 3, "explained": 3, "failed": 0}
    records = load_records(root)
    prep = Preprocessing.for_size(SIZE)
    _, expected = model.explain(torch.stack([load(r, prep)[0] for r in records]))
    with h5py.File(tmp_path / "run" / "relevance.h5") as handle:
        maps = torch.from_numpy(handle["relevance"][:])
    expected = expected.sum(1)
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
