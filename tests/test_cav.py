"""Artifact concepts (`python -m pipeline cav`): the pattern CAV is Pahde et al.'s formula, both CAVs rank planted
marked vectors first, the retrieval figures are scikit-learn's, R_bias is the positive share inside a mask (masks
through the run's resize and crop, as its boxes), and on a real run with concepts (the 9 sample images, vgg-shapes,
32 px, as tests/test_pipeline_concepts.py makes it) the files hold what their columns say; bad input is one line
(exit 2) and writes nothing."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from pipeline.audit import cav_outputs
from pipeline.audit.cav import classifier_cav, fit_cavs, pattern_cav, ranks
from pipeline.audit.masks import mask_in_map, positive_share
from pipeline.audit.retrieval import auroc_ap, column_aurocs
from pipeline.cli import main as cli_main
from pipeline.config import load_config
from pipeline.layout import RunLayout
from pipeline.preprocess import Preprocessing, transform
from pipeline.run import explain
from pipeline.run_reader import concept_maps, concept_relevance, read_stats

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample"
SIZE = 32
LAYER, BELOW = "features.12", "features.8"  # the maps layer (K = 2) and one below it


# ------------------------------------------------------------------------------------------------ the CAVs
def _planted(n: int = 400, channels: int = 32, planted: int = 20, seed: int = 0
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian vectors of different spreads; `planted` of them shifted along a direction of 3 channels."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, channels)) * rng.uniform(0.5, 2.0, channels)
    direction = np.zeros(channels)
    direction[[3, 11, 17]] = 1.0
    artifact = np.zeros(n, bool)
    artifact[rng.choice(n, planted, replace=False)] = True
    x[artifact] += 4.0 * direction
    return x, artifact, direction


def test_pattern_cav_is_the_covariance_with_the_mark_normalised():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 6))
    t = rng.random(50) < 0.3
    covariance = np.cov(np.c_[x, t.astype(float)].T)[:-1, -1]  # numpy's cov(x_c, t) for each channel c
    expected = covariance / np.linalg.norm(covariance)
    assert np.allclose(pattern_cav(x, t), expected, atol=1e-12)
    difference = x[t].mean(0) - x[~t].mean(0)  # for a 0/1 mark: along the difference of the means
    assert np.allclose(pattern_cav(x, t), difference / np.linalg.norm(difference), atol=1e-12)


def test_both_cavs_rank_the_planted_vectors_first_from_a_few_marked():
    """5 of 20 planted vectors marked: the pattern CAV points at the planted direction and ranks the rest first; the
    classifier CAV retrieves them too, from a direction that also fits the noise of so few marks (Pahde et al.'s
    reason for the pattern)."""
    x, artifact, direction = _planted()
    marked = np.zeros(len(x), bool)
    marked[np.flatnonzero(artifact)[:5]] = True
    held_out = ~marked
    found = {}
    for cav in fit_cavs(x, marked, "layer"):
        assert np.isclose(np.linalg.norm(cav.vector), 1.0)
        scores = cav.scores(x)
        assert np.allclose(scores, (x - x[~marked].mean(0)) @ cav.vector)
        top = np.argsort(ranks(scores))[:artifact.sum()]  # the images ranked 1..20
        found[cav.kind] = (cav.vector @ direction / np.linalg.norm(direction),
                           auroc_ap(artifact[held_out], scores[held_out])[0], artifact[top].mean())
    cosine, auroc, top_share = found["pattern"]
    assert cosine > 0.8 and auroc > 0.99 and top_share >= 0.9
    cosine, auroc, top_share = found["classifier"]
    assert 0.2 < cosine < found["pattern"][0] and auroc > 0.9 and top_share >= 0.5


def test_classifier_cav_is_deterministic_and_in_the_vectors_units():
    x, artifact, _ = _planted(seed=3)
    first, second = classifier_cav(x, artifact), classifier_cav(x, artifact)
    assert np.array_equal(first, second)
    units = np.r_[10.0, np.ones(x.shape[1] - 1)]  # channel 0 in other units: its weight is divided by 10
    again = classifier_cav(x * units, artifact) * units
    assert np.allclose(again / np.linalg.norm(again), first, atol=1e-4)


def test_ranks_are_one_for_the_highest_and_ties_in_dataset_order():
    assert ranks(np.array([0.5, 2.0, 0.5, -1.0])).tolist() == [2, 1, 3, 4]


# ------------------------------------------------------------------------------------------------ retrieval
def test_auroc_and_average_precision_on_known_data():
    truth, scores = np.array([1, 0, 1, 0], bool), np.array([0.9, 0.8, 0.3, 0.1])
    auroc, ap = auroc_ap(truth, scores)
    assert auroc == pytest.approx(3 / 4)  # positive above negative in 3 of the 4 pairs
    assert ap == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)  # precision 1 at recall 1/2, 2/3 at recall 1
    assert auroc_ap(np.ones(4, bool), scores) == (None, None)


def test_column_aurocs_equal_scikit_learn_with_ties():
    rng = np.random.default_rng(2)
    values = rng.integers(0, 4, size=(200, 7)).astype(np.float32)  # many ties
    truth = rng.random(200) < 0.2
    values[truth, 2] += 2  # one channel that retrieves
    expected = [roc_auc_score(truth, values[:, c]) for c in range(7)]
    assert np.allclose(column_aurocs(values, truth), expected, atol=1e-12)
    assert np.allclose([average_precision_score(truth, values[:, 2])], [auroc_ap(truth, values[:, 2])[1]])
    assert np.isnan(column_aurocs(values, np.zeros(200, bool))).all()


# ------------------------------------------------------------------------------------------------ R_bias
def test_r_bias_is_the_positive_share_inside_the_mask():
    relevance = np.zeros((3, 4, 4))
    relevance[0, 0, 0], relevance[0, 3, 3], relevance[0, 1, 1] = 3.0, 1.0, -5.0  # negative relevance is left out
    relevance[1] = -1.0  # no positive relevance: undefined
    relevance[2, 2:, 2:] = 1.0
    masks = np.zeros((3, 4, 4), bool)
    masks[:, :2, :2] = True  # the top-left quarter
    share = positive_share(relevance, masks)
    assert share[0] == pytest.approx(3 / 4) and np.isnan(share[1]) and share[2] == 0.0


def test_masks_follow_the_runs_resize_and_crop_as_its_boxes_do():
    preprocessing = Preprocessing.for_size(64)  # a 64 px image: resized to 73, centre-cropped to 64
    mask = np.zeros((64, 64), bool)
    mask[41:58, 43:58] = True  # the box (x 43..58, y 41..58) in the image's pixels
    placed = mask_in_map(mask, 64)
    _, boxes = transform(torch.zeros(3, 64, 64, dtype=torch.uint8), ((43.0, 41.0, 58.0, 58.0),), preprocessing)
    x0, y0, x1, y1 = boxes[0]
    rows, cols = np.nonzero(placed)
    assert abs(cols.min() - x0) <= 1 and abs(cols.max() + 1 - x1) <= 1
    assert abs(rows.min() - y0) <= 1 and abs(rows.max() + 1 - y1) <= 1
    assert mask_in_map(np.ones((30, 40), bool), 32).all()  # any image size -> the map's size


# ------------------------------------------------------------------------------------------------ on a run
@pytest.fixture(scope="module")
def concept_run(tmp_path_factory, artifact_cache, local_ray) -> Path:
    """A finished run with concepts at LAYER (with K = 2 concept maps) and BELOW: the 9 sample images."""
    home = tmp_path_factory.mktemp("cav")
    config = load_config(dict(dataset=str(SAMPLE), layout="plain", model="vgg-shapes", size=SIZE, batch_size=3,
                              shard_size=4, map_dtype="float32", out=str(home / "run"), cache=str(artifact_cache),
                              concepts={"layers": [LAYER, BELOW], "maps": 2, "top": 3, "relmax": 3}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explain(config, progress=False)
    return home / "run"


def _write_inputs(run: Path, folder: Path) -> dict[str, Path]:
    """marked.csv (2 images), truth.csv (3 positives, shaped as hans.csv), mask-<i>.npz (image i's right half)."""
    ids = [Path(p).stem for p in read_stats(RunLayout(run), ValueError, ["path"]).column("path").to_pylist()]
    ids = sorted(ids)
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"image_id": ids[:2]}).to_csv(folder / "marked.csv", index=False)
    pd.DataFrame({"image_id": ids, "tag": [1, 1, 1] + [0] * (len(ids) - 3)}).to_csv(folder / "truth.csv", index=False)
    masks = []
    for image_id in ids:
        with Image.open(SAMPLE / f"{image_id}.JPEG") as image:
            width, height = image.size
        mask = np.zeros((height, width), bool)
        mask[:, width // 2:] = True
        masks.append(mask)
    # the sample's images differ in size, so their masks cannot be one (M, H, W) array: one file per image here
    for i, (image_id, mask) in enumerate(zip(ids, masks)):
        np.savez(folder / f"mask-{i}.npz", image_id=np.array([image_id]), mask=mask[None])
    return {"marked": folder / "marked.csv", "truth": folder / "truth.csv", "ids": ids, "masks": masks}

def _cli(*args: str) -> int:
    return cli_main(["cav", *map(str, args)])


def test_cav_on_a_run_writes_what_its_columns_say(concept_run, tmp_path, capsys):
    inputs = _write_inputs(concept_run, tmp_path)
    ids = inputs["ids"]
    # the same-size masks of the sample (most images share a size): one file with those, as a dataset's masks.npz
    sizes = [m.shape for m in inputs["masks"]]
    common = max(set(sizes), key=sizes.count)
    chosen = [i for i, s in enumerate(sizes) if s == common]
    np.savez(tmp_path / "same.npz", image_id=np.array([ids[i] for i in chosen]),
             mask=np.stack([inputs["masks"][i] for i in chosen]))
    assert _cli(concept_run, "--layer", LAYER, "--marked", inputs["marked"], "--truth", inputs["truth"],
                "--masks", tmp_path / "same.npz", "--name", "half") == 0
    printed = capsys.readouterr().out
    assert "images ranked at features.12 (2 marked)" in printed
    layout = RunLayout(concept_run)
    images = pd.read_parquet(layout.cav_images("half"))
    vectors = pd.read_parquet(layout.cav_vectors("half"))
    channels = pd.read_parquet(layout.cav_channels("half"))
    summary = json.loads(layout.cav_summary("half").read_text())
    run_ids, x = concept_relevance(layout, LAYER, normalised=True)
    assert images["image_id"].tolist() == run_ids and len(run_ids) == 9
    assert images["marked"].tolist() == [i in ids[:2] for i in run_ids]
    assert images["truth"].tolist() == [i in ids[:3] for i in run_ids]
    for row in vectors.itertuples():  # each CAV: unit vector, the means, and the scores are projections on it
        vector = np.array(row.vector)
        assert row.layer == LAYER and row.normalised and np.isclose(np.linalg.norm(vector), 1)
        marked = images["marked"].to_numpy()
        assert np.allclose(row.clean_mean, x[~marked].mean(0), atol=1e-6)
        assert np.allclose(row.marked_mean, x[marked].mean(0), atol=1e-6)
        scores = (x - np.array(row.clean_mean)) @ vector
        assert np.allclose(images[f"score_{row.kind}"], scores, atol=1e-5)
        assert sorted(images[f"rank_{row.kind}"]) == list(range(1, 10))
        assert images[f"rank_{row.kind}"].to_numpy()[np.argmax(scores)] == 1
    assert np.allclose(vectors.set_index("kind").loc["pattern", "vector"], pattern_cav(x, marked))
    # channels: AUROC for the marked set and for the truth are scikit-learn's, rank 1 the best
    truth = images["truth"].to_numpy(bool)
    for c in (0, int(channels.loc[channels["rank"] == 1, "channel"].iloc[0])):
        assert channels["auroc_marked"][c] == pytest.approx(roc_auc_score(marked, x[:, c]))
        assert channels["auroc_truth"][c] == pytest.approx(roc_auc_score(truth, x[:, c]))
    assert channels["auroc_marked"][channels["rank"] == 1].iloc[0] == channels["auroc_marked"].max()
    pattern = summary["truth"]["retrieval"]["cav_pattern"]["all"]
    assert pattern["auroc"] == pytest.approx(roc_auc_score(truth, images["score_pattern"]), abs=1e-6)
    assert pattern["average_precision"] == pytest.approx(average_precision_score(truth, images["score_pattern"]),
                                                         abs=1e-6)
    # R_bias: the map's positive share inside the mask put through the run's resize and crop; the concept's on its
    # conditional map where the channel is among the image's stored two
    stats = read_stats(layout, ValueError, ["image_id", "shard", "row"]).to_pandas().set_index("image_id")
    channel = summary["masks"]["concept_channel"]
    with h5py.File(concept_run / "relevance.h5") as handle:
        maps = handle["relevance"][:]
    by_position = {image_id: i for i, image_id in enumerate(run_ids)}
    stored_channels, stored_maps = concept_maps(layout, stats.loc[run_ids].reset_index())
    for i, image_id in enumerate(run_ids):
        value = images["r_bias"][i]
        if image_id not in [ids[j] for j in chosen]:
            assert pd.isna(value) and pd.isna(images["r_bias_concept"][i])
            continue
        mask = mask_in_map(inputs["masks"][ids.index(image_id)], SIZE)
        assert value == pytest.approx(positive_share(maps[by_position[image_id]][None], mask[None])[0], abs=1e-6)
        if channel in stored_channels[i]:
            k = stored_channels[i].tolist().index(channel)
            assert images["r_bias_concept"][i] == pytest.approx(
                positive_share(stored_maps[i, k][None], mask[None])[0], abs=1e-6)
        else:
            assert pd.isna(images["r_bias_concept"][i])
    assert images["r_bias"].notna().sum() == len(chosen)
    # every column documented, as the schema declares it
    for path, schema in ((layout.cav_images("half"), cav_outputs.IMAGES_SCHEMA),
                         (layout.cav_channels("half"), cav_outputs.CHANNELS_SCHEMA)):
        stored = pd.read_parquet(path).columns.tolist()
        assert stored == schema.names and all(f.metadata[b"doc"] for f in schema)
    assert {layout.relative(p) for p in layout.own_files()} >= set(summary["files"])


def test_a_layer_below_the_maps_layer_ranks_without_concept_maps(concept_run, tmp_path):
    inputs = _write_inputs(concept_run, tmp_path)
    assert _cli(concept_run, "--layer", BELOW, "--marked", inputs["marked"], "--masks", tmp_path / "mask-0.npz",
                "--name", "below", "--raw") == 0
    layout = RunLayout(concept_run)
    images = pd.read_parquet(layout.cav_images("below"))
    summary = json.loads(layout.cav_summary("below").read_text())
    assert summary["layer"] == BELOW and not summary["normalised"] and not summary["masks"]["concept_maps"]
    assert images["r_bias"].notna().sum() == 1 and images["r_bias_concept"].isna().all()
    _, raw = concept_relevance(layout, BELOW, normalised=False)
    vector = np.array(pd.read_parquet(layout.cav_vectors("below")).set_index("kind").loc["pattern", "vector"])
    assert np.allclose(images["score_pattern"], (raw - raw[~images["marked"].to_numpy()].mean(0)) @ vector,
                       atol=1e-5)


def test_bad_input_is_one_line_and_writes_nothing(concept_run, tmp_path, capsys):
    inputs = _write_inputs(concept_run, tmp_path / "in")
    run = tmp_path / "run"
    shutil.copytree(concept_run, run, ignore=shutil.ignore_patterns(RunLayout.CAV, "run.lock"))
    (tmp_path / "unknown.csv").write_text("image_id\nnot-an-image\n")
    (tmp_path / "empty.csv").write_text("image_id\n")
    (tmp_path / "noid.csv").write_text("name\nx\n")
    (tmp_path / "all.csv").write_text("image_id\n" + "\n".join(inputs["ids"]) + "\n")
    (tmp_path / "badtruth.csv").write_text("image_id,tag\n" + "\n".join(f"{i},2" for i in inputs["ids"]) + "\n")
    first = inputs["ids"][0]
    np.savez(tmp_path / "wrong.npz", image_id=np.array([first]), mask=np.ones((1, 7, 9), bool))
    np.savez(tmp_path / "nomask.npz", image_id=np.array([first]))
    marked = ["--marked", inputs["marked"]]
    cases = {
        "not in the run": [run, "--layer", LAYER, "--marked", tmp_path / "unknown.csv"],
        "marked set is empty": [run, "--layer", LAYER, "--marked", tmp_path / "empty.csv"],
        "no `image_id` column": [run, "--layer", LAYER, "--marked", tmp_path / "noid.csv"],
        "no clean image": [run, "--layer", LAYER, "--marked", tmp_path / "all.csv"],
        "no concept layer 'features.99'": [run, "--layer", "features.99", *marked],
        "must hold 0 or 1": [run, "--layer", LAYER, *marked, "--truth", tmp_path / "badtruth.csv"],
        "but the image is": [run, "--layer", LAYER, *marked, "--masks", tmp_path / "wrong.npz"],
        "no array `mask`": [run, "--layer", LAYER, *marked, "--masks", tmp_path / "nomask.npz"],
        "no prototypes table": [run, "--layer", LAYER, "--prototype", "3:0"],
        "CLASS:K": [run, "--layer", LAYER, "--prototype", "star"],
        "out of range": [run, "--layer", LAYER, *marked, "--channel", "32"],
        "--name must be": [run, "--layer", LAYER, *marked, "--name", "../x"],
        "no such run directory": [tmp_path / "nowhere", "--layer", LAYER, *marked],
    }
    for expected, args in cases.items():
        assert _cli(*args) == 2, expected
        error = capsys.readouterr().err.strip()
        assert error.count("\n") == 0 and error.startswith("error: ") and expected in error, (expected, error)
        assert not (run / RunLayout.CAV).exists(), expected
    without = tmp_path / "without"  # the same run with its concept record removed: a run explained without concepts
    shutil.copytree(run, without)
    for shard in sorted((without / "relevance").glob("shard-*.h5")):
        with h5py.File(shard, "a") as handle:
            del handle.attrs["concepts"]
    assert _cli(without, "--layer", LAYER, *marked) == 2
    error = capsys.readouterr().err.strip()
    assert "has no concept outputs" in error and error.count("\n") == 0
    assert not (without / RunLayout.CAV).exists()



def test_a_prototypes_images_are_the_marks(concept_run, tmp_path, capsys):
    """--prototype CLASS:K marks the images `make prototypes` gives prototype K of class CLASS
    (RUN/prototypes/images.parquet, its columns prototype, class, image_id); an unknown class or prototype is one
    line naming what there is."""
    run = tmp_path / "run"
    shutil.copytree(concept_run, run, ignore=shutil.ignore_patterns(RunLayout.CAV, "run.lock"))
    ids = concept_relevance(RunLayout(run), LAYER)[0]
    prototypes = RunLayout(run).prototypes
    prototypes.mkdir()
    pd.DataFrame({"image_id": ids, "class": [3] * 5 + [1] * (len(ids) - 5),
                  "prototype": [0, 0, 1, 1, 1] + [0] * (len(ids) - 5)}).to_parquet(prototypes / "images.parquet")
    assert _cli(run, "--layer", LAYER, "--prototype", "3:1") == 0
    images = pd.read_parquet(RunLayout(run).cav_images("artifact"))
    assert images.loc[images["marked"], "image_id"].tolist() == ids[2:5]
    assert json.loads(RunLayout(run).cav_summary("artifact").read_text())["marked"]["source"] == "prototype 3:1"
    capsys.readouterr()
    for spec, expected in (("7:0", "no prototype of class 7 (classes: 1, 3)"), ("3:4", "has no prototype 4")):
        assert _cli(run, "--layer", LAYER, "--prototype", spec, "--name", "other") == 2
        error = capsys.readouterr().err.strip()
        assert expected in error and error.count("\n") == 0
        assert not RunLayout(run).cav_images("other").exists()
