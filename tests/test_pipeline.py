"""End to end: a small generated dataset through Ray actors into HDF5 and Parquet; the maps equal LRPModel on
the same preprocessed images, the statistics equal recomputed ones, a corrupt image is recorded and the run goes
on, a deleted shard is redone on resume, and bad configurations stop before anything is written."""
from __future__ import annotations

import json
import shutil
import warnings

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import lrp_module as lrp
from lrp_module.oracle import Float64Oracle, bound, compare
from lrp_module.zoo import build_vgg
from pipeline import stats
from pipeline.cli import main as cli_main
from pipeline.config import ConfigError, load_config
from pipeline.datasets import load_records
from pipeline.precision_probe import IMAGES_PER_PROBE_IMAGE, PROBE_MAX_IMAGES, probe_images
from pipeline.preprocess import load
from pipeline.run import RunError, explain

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.timeout(600)
SIZE = 64


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "images"
    rng = np.random.default_rng(0)
    for i, wnid in enumerate(["n01440764", "n01440764", "n02123045", "n02123045", "n07920052", "n07920052"]):
        folder = root / wnid
        folder.mkdir(parents=True, exist_ok=True)
        size = (80 + 10 * i, 64 + 7 * i)
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"img{i}.JPEG")
    (root / "n07920052" / "broken.JPEG").write_bytes(b"not an image at all")
    return root


def _config(dataset, tmp_path, **overrides):
    values = dict(dataset=str(dataset), model="vgg11", weights="random", size=SIZE, batch_size=2, shard_size=3,
                  map_dtype="float32", out=str(tmp_path / "run"), cache=str(tmp_path.parent / "artifact-cache"))
    values.update(overrides)
    return load_config(values)


def _run(config, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return explain(config, progress=False, **kwargs)


def test_end_to_end(dataset, tmp_path, local_ray):
    config = _config(dataset, tmp_path)
    manifest = _run(config)
    out = tmp_path / "run"
    assert manifest["totals"] == {"images": 7, "explained": 6, "failed": 1}
    assert manifest["random_weights"] and (out / "_SUCCESS").exists()
    failures = pd.read_parquet(out / "failures.parquet")
    assert failures.image_id.tolist() == ["broken"] and failures.reason[0].startswith("not an image")
    # the maps, through the virtual dataset, equal LRPModel on the same preprocessed images
    records = [r for r in load_records(dataset) if r.image_id != "broken"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vgg = build_vgg("vgg11", "random")[0]
    model = lrp.LRPModel(vgg, "epsilon_gamma_box")
    from pipeline.preprocess import Preprocessing
    prep = Preprocessing.for_size(SIZE)
    x = torch.stack([load(r, prep)[0] for r in records])
    logits, expected = model.explain(x)
    expected = expected.sum(1)
    reference = Float64Oracle(vgg).explain(x)[1].sum(1)
    table = pd.read_parquet(out / "stats").sort_values("image_id").reset_index(drop=True)
    with h5py.File(out / "relevance.h5") as handle:
        maps = torch.from_numpy(handle["relevance"][:])
    assert maps.shape == (6, SIZE, SIZE)
    by_id = {r.image_id: i for i, r in enumerate(records)}
    order = [by_id[i] for i in table.image_id]
    # the virtual dataset is in dataset order, which is the order of records (broken is last in its class)
    # the worker's float32 maps are no further from float64 than eager float32's bound
    assert compare(maps, reference).worst <= bound(compare(expected, reference).worst)
    recomputed = stats.map_statistics(expected[order])
    for column in ("relevance_sum", "positive_sum", "gini", "entropy", "centre_row", "positive_in_top5pct"):
        np.testing.assert_allclose(table[column].to_numpy(), recomputed[column].numpy(), rtol=1e-3, atol=1e-6)
    # conservation: the map's sum over the start relevance (the target logit), and the share absorbed
    np.testing.assert_allclose(table.conservation, table.relevance_sum / table.target_logit, rtol=1e-5)
    np.testing.assert_allclose(table.absorbed, 1 - table.conservation, rtol=1e-5, atol=1e-6)
    # the precision probe: shard 0's first image(s) (probe_images: one for a run this small) recomputed in float64
    probe = manifest["precision"]
    assert set(probe) == {"reference", "images", "device", "dtype", "tf32", "cudnn_benchmark", "cudnn_deterministic",
                          "onednn", "max_relative_error", "correlation"}
    probed = probe_images(7)
    assert probe["reference"] == "float64-cpu" and probe["images"] == probed and probe["device"].startswith("cpu")
    assert probe["dtype"] == "float32" and probe["tf32"] is False and probe["cudnn_benchmark"] is None
    first = compare(maps[:probed], reference[:probed])  # shard 0's first images are the first in dataset order
    assert probe["max_relative_error"]["max"] == pytest.approx(first.worst, rel=1e-3, abs=1e-9)
    assert probe["correlation"]["min"] == pytest.approx(float(first.correlation.min()), abs=1e-9)
    assert probe == json.loads((out / "precision.json").read_text()) and manifest["config"]["precision"] == "fp32"
    phases = manifest["timings"]["phases"]  # seconds per phase, for bench/first_run.py; the probe beside them
    assert set(phases) == {"before_ray_s", "artifact_s", "ray_start_s", "explain_s", "probe_s", "probe_wait_s"}
    assert 0 < phases["artifact_s"] < phases["before_ray_s"] and phases["probe_s"] > 0 <= phases["probe_wait_s"]
    assert table.pred.tolist() == logits.argmax(1)[order].tolist()
    assert table.label.tolist() == [0, 0, 281, 281, 967, 967] and table.wnid[2] == "n02123045"
    assert table.label_name[2] == "tabby" and table.correct.notna().all()
    assert table.shard.str.startswith("relevance/shard-").all()
    duckdb = pytest.importorskip("duckdb")
    assert duckdb.sql(f"select count(*) from '{out}/stats/*.parquet'").fetchall()[0][0] == 6


def test_probe_images_are_bounded_whatever_the_run_size():
    """The probe's float64 work (issue 20.4): one image for a small run, more for a large one, never more than
    PROBE_MAX_IMAGES however large; so its share of a run's time shrinks as the run grows."""
    counts = [probe_images(n) for n in (1, 9, IMAGES_PER_PROBE_IMAGE - 1, 2 * IMAGES_PER_PROBE_IMAGE, 50_000,
                                        10**9)]
    assert counts[:3] == [1, 1, 1] and counts[3] == 2 and counts == sorted(counts)
    assert counts[-1] == PROBE_MAX_IMAGES and counts[-2] <= PROBE_MAX_IMAGES


def test_resume_redoes_only_missing_shards(dataset, tmp_path, local_ray):
    config = _config(dataset, tmp_path)
    probe = _run(config)["precision"]
    out = tmp_path / "run"
    before = pd.read_parquet(out / "stats").drop(columns="seconds").sort_values("image_id").reset_index(drop=True)
    with h5py.File(out / "relevance.h5") as handle:
        maps_before = handle["relevance"][:]
    (out / "stats" / "shard-00001.parquet").unlink()  # as if killed mid-shard
    (out / "_SUCCESS").unlink()
    untouched = (out / "relevance" / "shard-00000.h5").stat().st_mtime_ns
    assert _run(config)["precision"] == probe  # shard 0 was not redone: its probe stays with the run
    assert (out / "relevance" / "shard-00000.h5").stat().st_mtime_ns == untouched
    after = pd.read_parquet(out / "stats").drop(columns="seconds").sort_values("image_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(before, after)
    with h5py.File(out / "relevance.h5") as handle:
        np.testing.assert_array_equal(handle["relevance"][:], maps_before)
    assert (out / "_SUCCESS").exists()


def test_other_configuration_is_refused_unless_overwrite(dataset, tmp_path, local_ray):
    _run(_config(dataset, tmp_path, limit=3))
    with pytest.raises(RunError, match="differs in composite"):
        _run(_config(dataset, tmp_path, limit=3, composite="epsilon_plus_flat"))
    manifest = _run(_config(dataset, tmp_path, limit=3, composite="epsilon_plus_flat"), overwrite=True)
    assert manifest["config"]["composite"] == "epsilon_plus_flat" and manifest["totals"]["images"] == 3


def test_bad_configuration_stops_before_writing(tmp_path, dataset, capsys):
    configs = tmp_path / "configs"
    shutil.copytree(load_config.__globals__["CONFIG_DIR"], configs)
    good = (configs / "run.yaml").read_text()
    (configs / "run.yaml").write_text(good + "colour: blue\n")
    with pytest.raises(ConfigError, match=r"run.yaml: unknown key 'colour'"):
        load_config({}, config_dir=configs)
    (configs / "run.yaml").write_text(good)
    with pytest.raises(ConfigError, match=r"command line: top_k must be a fraction"):
        load_config({"dataset": str(dataset), "top_k": 2.0})
    with pytest.raises(ConfigError, match=r"command line: model must be one of"):
        load_config({"dataset": str(dataset), "model": "mobilenet_v2"})
    (configs / "datasets" / "mine.yaml").write_text("root: ${SURELY_UNSET_VARIABLE_X}\n")
    with pytest.raises(ConfigError, match="SURELY_UNSET_VARIABLE_X is not set: export SURELY_UNSET_VARIABLE_X="):
        load_config({"dataset": "mine"}, config_dir=configs)
    out = tmp_path / "never"
    assert cli_main(["explain", "--dataset", str(dataset), "--composite", "nope", "--out", str(out)]) == 2
    assert "error: command line: composite must be one of" in capsys.readouterr().err
    assert not out.exists()
    assert cli_main(["explain", "--dataset", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "no such dataset directory" in capsys.readouterr().err and not out.exists()


from .test_datasets import layouts  # noqa: E402,F401  (the same images written in every layout)


def test_every_layout_end_to_end_agrees(layouts, tmp_path, local_ray):  # noqa: F811
    results = {}
    for name in ("imagefolder", "kaggle", "devkit", "wds", "plain"):
        out = tmp_path / name
        _run(_config(layouts / name, tmp_path, out=str(out), layout="plain" if name == "plain" else None))
        table = pd.read_parquet(out / "stats").sort_values("image_id").reset_index(drop=True)
        with h5py.File(out / "relevance.h5") as handle:
            maps = handle["relevance"][:]
        order = np.argsort([f"{s}:{r:05d}" for s, r in zip(table.shard, table.row)])
        results[name] = (table, maps[np.argsort(order)] if len(order) else maps)
    reference_table, reference_maps = results["plain"]
    for name, (table, maps) in results.items():
        assert table.image_id.tolist() == reference_table.image_id.tolist(), name
        np.testing.assert_array_equal(table.pred, reference_table.pred)
        np.testing.assert_allclose(table.gini, reference_table.gini, rtol=1e-6)
        np.testing.assert_array_equal(maps, reference_maps)
        if name != "plain":
            assert table.label.tolist() == [281, 0, 999, 281], name
    for name in ("kaggle", "devkit"):  # boxes only there: the first two images have them, the third none
        table = results[name][0]
        assert table.positive_in_box[:2].notna().all() and pd.isna(table.positive_in_box[2]), name
        np.testing.assert_allclose(table.positive_in_box[:2], results["kaggle"][0].positive_in_box[:2])
    assert results["imagefolder"][0].positive_in_box.isna().all()


def test_explicit_imagenet_weights_fail_when_missing(dataset, tmp_path, monkeypatch):
    """The sample falls back to random weights only under `auto`; asking for ImageNet weights that are not there
    fails before the run directory exists."""
    from lrp_module import zoo

    monkeypatch.setenv(zoo.OFFLINE_ENV, "1")
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "empty-hub"))
    try:
        with pytest.raises(zoo.WeightsError, match="ImageNet weights for vgg11 are not available"):
            _run(_config(dataset, tmp_path, weights="imagenet", out=str(tmp_path / "never")))
        assert not (tmp_path / "never").exists()
        from pipeline.artifact_cache import resolve_weights

        weights, warning = resolve_weights(_config(dataset, tmp_path, weights="auto"))
        assert weights == "random" and "RANDOM weights" in warning
    finally:
        torch.hub.set_dir(previous)
