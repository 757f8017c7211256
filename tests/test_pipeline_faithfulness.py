"""Pixel flipping inside the pipeline: with `faithfulness: true` the actors write MoRF and random-order curves and
their AOPC that equal `region_perturbation` recomputed here with the eager model on the same images and maps;
off, the columns are null and no flipping runs; bad settings stop at configuration time."""
from __future__ import annotations

import dataclasses
import warnings

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from lrp_module.zoo import build_vgg
from pipeline import worker
from pipeline.artifact_cache import cached_artifact, cached_classifier
from pipeline.config import ConfigError, load_config
from pipeline.contracts import Flipping
from pipeline.datasets import load_records
from pipeline.faithfulness import aopc, region_perturbation, stable_seed
from pipeline.preprocess import Preprocessing, load
from pipeline.schema import FLIP_COLUMNS

from .helpers import worker_settings
from .test_pipeline import SIZE, _config, _run, dataset  # noqa: F401  (the dataset fixture)

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.timeout(600)
STEPS, PATCH = 8, 8


def _inputs(dataset, ids):  # noqa: F811  (the fixture name as a parameter)
    prep = Preprocessing.for_size(SIZE)
    records = {r.image_id: r for r in load_records(dataset)}
    return torch.stack([load(records[i], prep)[0] for i in ids])


def test_flipping_columns_equal_recomputation_with_the_eager_model(dataset, tmp_path, local_ray):  # noqa: F811
    config = _config(dataset, tmp_path, faithfulness=True, flip_steps=STEPS, flip_patch=PATCH)
    manifest = _run(config)
    assert manifest["totals"]["explained"] == 6
    out = tmp_path / "run"
    table = pd.read_parquet(out / "stats").sort_values(["shard", "row"]).reset_index(drop=True)
    with h5py.File(out / "relevance.h5") as handle:  # float32 maps: exactly those the actors ranked regions by
        relevance = torch.from_numpy(handle["relevance"][:])
    x = _inputs(dataset, table.image_id.tolist())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vgg = build_vgg("vgg11", "random")[0]
    target = torch.tensor(table.target.to_numpy())
    seeds = [stable_seed(i) for i in table.image_id]
    scale = table.target_logit.abs().max()
    for order in ("morf", "random"):
        curves = torch.tensor(np.stack(table[f"flip_curve_{order}"].to_numpy()))
        assert curves.shape == (6, STEPS + 1)
        expected = region_perturbation(vgg, x, relevance, target, steps=STEPS, patch=PATCH, order=order, seed=seeds)
        torch.testing.assert_close(curves, expected, rtol=1e-4, atol=1e-4 * scale)
        np.testing.assert_allclose(table[f"aopc_{order}"], aopc(expected).numpy(), rtol=1e-3, atol=1e-4 * scale)
        np.testing.assert_allclose(curves[:, 0], table.target_logit, rtol=1e-4, atol=1e-4 * scale)
        assert (curves[:, 1:] != curves[:, :1]).any(1).all()  # perturbing changes the score
    assert not np.allclose(table.flip_curve_morf.tolist(), table.flip_curve_random.tolist())
    assert (table.flip_seconds > 0).all()
    assert manifest["config"]["faithfulness"] and (out / "stats").is_dir()


def test_off_means_null_columns_and_no_flipping(dataset, tmp_path, monkeypatch):  # noqa: F811
    """The actor class in this process: off, the flipping code is never reached; on, the classifier's forward
    runs 2 x ceil(N (steps + 1) / batch) times per batch."""
    config = _config(dataset, tmp_path, faithfulness=False, batch_size=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        artifact, _ = cached_artifact(config, "random")
    records = [r for r in load_records(dataset) if r.image_id != "broken"][:3]
    for run in ("off", "on"):  # the driver makes these
        for sub in ("relevance", "stats", "failures"):
            (tmp_path / run / sub).mkdir(parents=True)
    settings = worker_settings(batch_size=3, size=SIZE, map_dtype="float32", compression=1, target="predicted",
                               decode_threads=1, threads=1)

    def never(*args, **kwargs):
        raise AssertionError("pixel flipping ran although faithfulness is off")
    monkeypatch.setattr(worker, "flip_statistics", never)
    off = worker.ShardExplainer(str(artifact), settings)
    assert off.classifier is None
    assert off.explain_shard(0, records, str(tmp_path / "off")).explained == 3
    table = pd.read_parquet(tmp_path / "off" / "stats")
    assert all(table[column].isna().all() for column in FLIP_COLUMNS)
    monkeypatch.undo()

    classifier = cached_classifier(config, "random", artifact)
    on = worker.ShardExplainer(str(artifact), dataclasses.replace(
        settings, flipping=Flipping(str(classifier), STEPS, PATCH)))
    calls = []
    traced = on.classifier
    on.classifier = lambda batch: calls.append(len(batch)) or traced(batch)
    assert on.explain_shard(0, records, str(tmp_path / "on")).explained == 3
    assert len(calls) == 2 * -(-3 * (STEPS + 1) // 3) and max(calls) == 3
    table = pd.read_parquet(tmp_path / "on" / "stats")
    assert table.aopc_morf.notna().all() and table.flip_curve_random.map(len).eq(STEPS + 1).all()


def test_flipping_settings_are_checked_and_part_of_the_identity(dataset):  # noqa: F811
    base = {"dataset": str(dataset), "size": 64}
    with pytest.raises(ConfigError, match=r"command line: flip_steps must be at most 64 \(the 8x8 regions"):
        load_config({**base, "faithfulness": True, "flip_patch": 8, "flip_steps": 65})
    with pytest.raises(ConfigError, match="command line: faithfulness must be true or false"):
        load_config({**base, "faithfulness": "yes"})
    with pytest.raises(ConfigError, match="command line: flip_patch must be a positive integer"):
        load_config({**base, "flip_patch": 0})
    with pytest.raises(ConfigError, match="command line: flip_patch must be at most size"):
        load_config({**base, "faithfulness": True, "flip_patch": 65})
    assert load_config({**base, "flip_steps": 1000}).flip_steps == 1000  # off: not checked against the regions
    off, on = load_config(base), load_config({**base, "faithfulness": True, "flip_steps": 20})
    assert off.digest() != on.digest()
    assert load_config({**base, "flip_steps": 20}).digest() == off.digest()  # off: the steps change nothing
    assert on.digest() != load_config({**base, "faithfulness": True, "flip_steps": 21}).digest()
    from pipeline.cli import parser

    args = parser().parse_args(["explain", "--faithfulness", "--flip-steps", "8", "--flip-patch", "4"])
    assert (args.faithfulness, args.flip_steps, args.flip_patch) == (True, 8, 4)
    assert parser().parse_args(["explain"]).faithfulness is None  # configs/run.yaml decides


def test_classifier_from_other_weights_than_the_lrp_artifact_is_refused(dataset, tmp_path):  # noqa: F811
    """The classifier shares the LRP artifact's cache key; building it checks that both hold the same weights."""
    from export import ExportError
    from export.classifier import export_classifier

    config = _config(dataset, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        artifact, _ = cached_artifact(config, "random")
        state = build_vgg("vgg11", "random")[0].state_dict()
    state["classifier.6.bias"] = state["classifier.6.bias"] + 1.0
    other = tmp_path / "other.pth"
    torch.save(state, other)
    path = tmp_path / "classifier.torchscript.pt"
    with pytest.raises(ExportError, match="classifier logits differ from lrp_artifact"):
        export_classifier("vgg11", str(other), SIZE, path, lrp_artifact=artifact)
    assert not path.exists()
    checks = export_classifier("vgg11", "random", SIZE, path, lrp_artifact=artifact)["checks"]
    assert path.is_file() and checks["lrp_artifact"] <= 1e-4 and checks["eager"] <= 1e-4
