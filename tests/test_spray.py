"""SpRAy on small synthetic maps with planted groups: pooling and normalisation as corelay's recipes, the sparse
spectrum against a dense eigendecomposition, the eigengap finds the planted number of groups, k-means and Ward
recover them; `spray` over a synthetic run streams the maps shard by shard and writes clusters.parquet with the
documented columns and dtypes, joinable with the statistics; bad input is one clear error."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score

from bench.spray_maps import planted_map, planted_maps
from bench.synthetic_run import stats_table, synthesise_run
from pipeline.cli import main as cli_main
from pipeline.layout import SPRAY_FILES
from pipeline.spray import cluster, features, graph
from pipeline.spray.analyse import SprayParams, analyse_class
from pipeline.spray.inputs import open_run_index
from pipeline.spray.outputs import CLUSTERS_FILE, SUMMARY_FILE, clusters_schema, read_means
from pipeline.spray.run import SprayOptions, spray

pytestmark = pytest.mark.timeout(300)
SIZE = 32
ROOT = Path(__file__).resolve().parent.parent


def test_sum_pool_and_normalisation_follow_corelays_recipes():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(3, 8, 8))
    pooled = features.sum_pool(maps, 4)
    np.testing.assert_allclose(pooled, maps.reshape(3, 4, 2, 4, 2).sum((2, 4)))
    uneven = features.sum_pool(rng.normal(size=(2, 7, 9)), 3)  # bins of 2-3 pixels, every pixel counted once
    assert uneven.shape == (2, 3, 3)
    maps[1] = -np.abs(maps[1])  # more negative than positive relevance
    maps[2] = 0.0
    spectral = features.normalise(features.sum_pool(maps, 4), "spectral")
    flat = maps.reshape(3, 4, 2, 4, 2).sum((2, 4)).reshape(3, -1)
    np.testing.assert_allclose(spectral.vectors[0], flat[0] / flat[0].sum(), rtol=1e-5)  # R / sum R
    np.testing.assert_allclose(spectral.vectors[1], flat[1] / np.abs(flat[1]).sum(), rtol=1e-5)  # sum <= 0: / sum |R|
    assert not spectral.vectors[2].any() and (spectral.fallback, spectral.empty) == (1, 1)
    absolute = features.normalise(features.sum_pool(maps, 4), "absspectral")
    np.testing.assert_allclose(absolute.vectors[0], np.abs(flat[0]) / np.abs(flat[0]).sum(), rtol=1e-5)
    with pytest.raises(ValueError, match="smaller than the 16x16"):
        features.sum_pool(maps, 16)
    with pytest.raises(ValueError, match="unknown SpRAy variant"):
        features.normalise(pooled, "fullspectral")


def test_sparse_spectrum_equals_the_dense_one():
    maps, _ = planted_maps(150, 3, SIZE)
    vectors = features.features(maps, 16, "absspectral").vectors
    neighbours = graph.nearest_neighbours(vectors, 10)
    assert neighbours.indices.shape == (150, 10) and not (neighbours.indices == np.arange(150)[:, None]).any()
    affinity = graph.affinity(neighbours)
    assert abs(affinity - affinity.T).max() == 0 and affinity.diagonal().sum() == 0
    sparse = graph.spectrum(affinity, 12)
    degree = np.asarray(affinity.sum(1)).ravel()
    laplacian = np.eye(150) - affinity.toarray() / np.sqrt(np.outer(degree, degree))
    dense = np.linalg.eigvalsh(laplacian)[:12]
    np.testing.assert_allclose(sparse.eigenvalues, dense, atol=1e-8)
    assert sparse.eigenvalues[0] == pytest.approx(0, abs=1e-9) and np.all(np.diff(sparse.eigenvalues) >= -1e-12)
    residual = laplacian @ sparse.eigenvectors - sparse.eigenvectors * sparse.eigenvalues
    assert np.abs(residual).max() < 1e-6


@pytest.mark.parametrize("groups", [2, 3, 5])
def test_eigengap_finds_the_planted_groups_and_clusterings_recover_them(groups):
    shares = np.linspace(2, 1, groups)  # unequal sizes
    maps, truth = planted_maps(240, groups, SIZE, seed=groups, shares=shares)
    vectors = features.features(maps, 16, "absspectral").vectors
    result = analyse_class(vectors, SprayParams(k_max=8, embedding=False))
    assert result.k_chosen == groups
    assert adjusted_rand_score(truth, result.kmeans[groups]) >= 0.95
    assert adjusted_rand_score(truth, result.agglomerative[groups]) >= 0.95
    for k, labels in result.kmeans.items():  # numbered by size, every cluster used
        sizes = np.bincount(labels, minlength=k)
        assert len(sizes) == k and (sizes > 0).all() and np.all(np.diff(sizes) <= 0)
    assert result.outlier.dtype == np.float32 and np.median(result.outlier) == pytest.approx(1.0)


def test_one_group_has_a_small_eigengap():
    rng = np.random.default_rng(1)
    vectors = features.features(rng.random((200, SIZE, SIZE)), 16, "absspectral").vectors  # no structure
    planted = analyse_class(features.features(planted_maps(200, 2, SIZE)[0], 16, "absspectral").vectors,
                            SprayParams(embedding=False))
    unstructured = analyse_class(vectors, SprayParams(embedding=False))
    assert planted.eigengap > 3 * unstructured.eigengap


def test_eigengap_rule_and_cluster_numbering():
    assert cluster.eigengap(np.array([0, 0.01, 0.02, 0.5, 0.55, 0.6]), 4) == (3, pytest.approx(0.48))
    assert cluster.eigengap(np.array([0, 0.4, 0.5, 0.6]), 8)[0] == 2  # k_max capped by the eigenvalues
    np.testing.assert_array_equal(cluster.by_size(np.array([2, 2, 0, 1, 1, 1])), [1, 1, 2, 0, 0, 0])


def test_streamed_features_equal_the_in_memory_ones(tmp_path):
    """Pieces of 3 maps over shards of 8, rows out of order: the same vectors as all maps at once."""
    n = 30
    maps = np.stack([planted_map(i, 3, SIZE)[0] for i in range(n)])
    run = synthesise_run(tmp_path / "run", stats_table(n, 2, ["x.jpg"], shard_size=8, size=SIZE), size=SIZE,
                         shard_size=8, map_of=lambda i: planted_map(i, 3, SIZE)[0])
    rows = open_run_index(run).table.sample(frac=1.0, random_state=0)
    streamed, counts = features.read_class_features(run, rows, 16, "spectral", batch=3)
    stored = maps.astype(np.float16)[rows["index"].to_numpy()]  # the shards keep float16
    np.testing.assert_allclose(streamed, features.features(stored, 16, "spectral").vectors, rtol=1e-6)
    assert counts == {"fallback": 0, "empty": 0}


def _planted_run(root: Path, n: int = 240, classes: int = 3) -> tuple[Path, np.ndarray]:
    """A run whose class c's maps come in c + 2 planted groups (class 0: 2, class 1: 3, ...), class `classes` has
    only 5 images (skipped), and each map's group."""
    table = stats_table(n, classes + 1, ["x.jpg"], shard_size=50, size=SIZE)
    frame = table.to_pandas()
    pred = np.where(np.arange(n) < n - 5, np.arange(n) % classes, classes)  # the last 5: a small class
    table = table.set_column(table.schema.get_field_index("pred"), "pred", [pred.astype(np.int64)])
    groups = np.zeros(n, np.int64)

    def map_of(i: int) -> np.ndarray:
        cls = int(pred[i])
        relevance, groups[i] = planted_map(i // classes, cls + 2, SIZE, seed=cls)
        return relevance

    del frame
    return synthesise_run(root, table, size=SIZE, shard_size=50, map_of=map_of), groups


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory, local_ray):
    root, groups = _planted_run(tmp_path_factory.mktemp("spray") / "run")
    options = SprayOptions(grid=16, min_images=20, virelay=False)
    summary = spray(root, options, progress=False)
    return root, groups, summary


def test_spray_writes_the_documented_clusters_table(planted_run):
    root, groups, summary = planted_run
    table = pq.read_table(root / "spray" / CLUSTERS_FILE)
    assert table.schema.equals(clusters_schema(8), check_metadata=False)
    assert table.schema.names == ["image_id", "class", "k_chosen", "cluster"] + [f"cluster_k{k}" for k in range(2, 9)] \
        + ["x", "y", "outlier"]
    assert [str(t) for t in table.schema.types] == ["string"] + ["int64"] * 10 + ["float", "float", "float"]
    clusters = table.to_pandas()
    stats = pd.read_parquet(root / "stats")
    joined = clusters.merge(stats[["image_id", "pred"]], on="image_id", validate="one_to_one")
    assert len(joined) == len(clusters) == len(stats) - 5 and (joined["class"] == joined["pred"]).all()
    assert clusters.groupby("class")["k_chosen"].nunique().eq(1).all()
    assert (clusters["cluster"] == clusters.apply(lambda r: r[f"cluster_k{r.k_chosen}"], axis=1)).all()
    assert summary["skipped"] == [{"class": 3, "name": "class 3", "images": 5, "reason": "fewer than 20 images"}]


def test_spray_recovers_each_classes_planted_strategies(planted_run):
    root, groups, summary = planted_run
    clusters = pq.read_table(root / "spray" / CLUSTERS_FILE).to_pandas()
    index = open_run_index(root).table.set_index("image_id")
    clusters["group"] = groups[index.loc[clusters["image_id"], "index"].to_numpy()]
    for cls, part in clusters.groupby("class"):
        assert part["k_chosen"].iloc[0] == cls + 2
        assert adjusted_rand_score(part["group"], part["cluster"]) >= 0.95
    entries = {e["class"]: e for e in summary["classes"]}
    assert [e["rank"] for e in summary["classes"]] == [1, 2, 3]
    assert np.all(np.diff([e["eigengap"] for e in summary["classes"]]) <= 0)
    assert all(len(e["eigenvalues"]) == 32 and e["eigenvalues"][0] < 1e-8 for e in entries.values())
    means = read_means(root / "spray", 0, 2)
    assert means.shape == (2, SIZE, SIZE) and np.isfinite(means).all()
    saved = json.loads((root / "spray" / SUMMARY_FILE).read_text())
    assert saved["classes"] == summary["classes"] and saved["options"]["variant"] == "absspectral"


def test_spray_by_label_and_chosen_classes(planted_run, tmp_path):
    root, _, _ = planted_run
    summary = spray(root, SprayOptions(by="label", grid=16, classes=(1,), virelay=False, out=str(tmp_path / "s")),
                    progress=False)
    assert [e["class"] for e in summary["classes"]] == [1]
    labels = pd.read_parquet(root / "stats").set_index("image_id")["label"]
    clusters = pd.read_parquet(tmp_path / "s" / CLUSTERS_FILE)
    assert (labels.loc[clusters["image_id"]].to_numpy() == 1).all() and len(clusters) == (labels == 1).sum()


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert cli_main(["spray", str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli_main(["spray", str(tmp_path / "empty")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    run = synthesise_run(tmp_path / "run", stats_table(12, 2, ["x.jpg"], size=SIZE), size=SIZE)
    assert cli_main(["spray", str(run), "--no-progress"]) == 2  # 12 images in 2 classes: none has 20
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no class has 20 or more images" in err
    assert cli_main(["spray", str(run), "--k-max", "40"]) == 2
    assert "--eigenvalues (32) must exceed --k-max (40)" in capsys.readouterr().err
    assert cli_main(["spray", str(run), "--large-class", "-1"]) == 2
    assert "--large-class must be >= 0, got -1" in capsys.readouterr().err
    assert not (run / "spray").exists()
    with pytest.raises(SystemExit):
        cli_main(["spray", str(run), "--variant", "nonsense"])


def test_affinity_is_corelays_sparse_knn():
    """corelay's SparseKNN on the dense distance matrix (argsort, ones, (A + A^T) / 2) gives the same matrix."""
    vectors = features.features(planted_maps(60, 2, SIZE)[0], 16, "spectral").vectors.astype(np.float64)
    distances = np.linalg.norm(vectors[:, None] - vectors[None], axis=2)
    columns = distances.argsort(1)[:, 1:6]
    dense = sp.csr_matrix((np.ones(60 * 5), (np.repeat(np.arange(60), 5), columns.ravel())), shape=(60, 60))
    ours = graph.affinity(graph.nearest_neighbours(vectors, 5))
    assert abs(ours - (dense + dense.T) / 2).max() == 0


def test_sampled_tsne_keeps_the_groups_apart():
    """A class larger than the t-SNE sample: the sampled images are t-SNE'd, the others placed by their nearest
    sampled neighbours; both kinds land among their own group (nearest neighbour in the picture from the same group)."""
    from sklearn.neighbors import KNeighborsClassifier

    from pipeline.spray.embed import tsne

    maps, truth = planted_maps(300, 2, SIZE)
    result = analyse_class(features.features(maps, 16, "absspectral").vectors, SprayParams(embedding=False))
    xy = tsne(result.eigenvectors, seed=0, sample=100)
    assert xy.shape == (300, 2) and xy.dtype == np.float32 and np.isfinite(xy).all()
    chosen = np.sort(np.random.default_rng(0).choice(300, 100, replace=False))
    placed = np.setdiff1d(np.arange(300), chosen)
    nearest = KNeighborsClassifier(1).fit(xy[chosen], truth[chosen])
    assert (nearest.predict(xy[placed]) == truth[placed]).mean() >= 0.95


LARGE_TEST = 1000  # the large-class threshold in these tests (the product's is graph.LARGE_CLASS = 20,000)


def test_large_class_neighbours_via_principal_components_match_the_exact_graph(monkeypatch):
    """Above the threshold, candidates come from a search among REDUCED_DIMS principal components and are re-ranked by
    exact distances: nearly the exact graph, exact distances, nearest first, never a vector itself."""
    maps, _ = planted_maps(3000, 4, SIZE, seed=7)
    vectors = features.features(maps, 16, "absspectral").vectors  # 256 dimensions
    searched = []
    original = graph.exact_neighbours
    monkeypatch.setattr(graph, "exact_neighbours", lambda v, k, t=1: searched.append(v.shape) or original(v, k, t))
    found = graph.nearest_neighbours(vectors, 10, large=LARGE_TEST)
    assert searched == [(3000, graph.REDUCED_DIMS)]  # the reduced path ran, with 3k candidates
    exact = original(vectors, 10)
    assert graph.neighbour_recall(found, exact) >= 0.95
    assert found.indices.shape == (3000, 10) and not (found.indices == np.arange(3000)[:, None]).any()
    measured = np.linalg.norm(vectors[found.indices] - vectors[:, None], axis=2)
    np.testing.assert_allclose(found.distances, measured, rtol=1e-4, atol=1e-7)
    assert np.all(np.diff(found.distances, axis=1) >= 0)
    assert (found.distances[:, 0] >= exact.distances[:, 0] - 1e-6).all()  # never nearer than the true nearest
    searched.clear()
    graph.nearest_neighbours(vectors, 10, large=3000)  # at the threshold: the exact path
    assert searched == [(3000, 256)]


def test_large_class_path_recovers_planted_groups_like_the_exact_one(monkeypatch):
    """A class above the threshold (reduced neighbours; Ward of a 500-image sample, the rest by nearest centroid):
    the same k*, the planted groups recovered by k-means and Ward, and clusters as the exact path's."""
    monkeypatch.setattr(cluster, "WARD_SAMPLE", 500)
    shares = np.array([0.5, 0.3, 0.2])
    maps, truth = planted_maps(3000, 3, SIZE, seed=3, shares=shares)
    vectors = features.features(maps, 16, "absspectral").vectors
    large = analyse_class(vectors, SprayParams(k_max=6, embedding=False, large_class=LARGE_TEST))
    exact = analyse_class(vectors, SprayParams(k_max=6, embedding=False))
    assert large.k_chosen == exact.k_chosen == 3
    for result in (large, exact):
        assert adjusted_rand_score(truth, result.kmeans[3]) >= 0.95
        assert adjusted_rand_score(truth, result.agglomerative[3]) >= 0.95
    assert adjusted_rand_score(exact.kmeans[3], large.kmeans[3]) >= 0.95
    np.testing.assert_allclose(large.eigenvalues[:4], exact.eigenvalues[:4], atol=0.02)
    for k, labels in large.agglomerative.items():  # every k cut, numbered by size
        sizes = np.bincount(labels, minlength=k)
        assert len(sizes) == k and (sizes > 0).all() and np.all(np.diff(sizes) <= 0)


def test_sampled_ward_keeps_the_samples_labels_and_assigns_the_rest_to_the_nearest_centroid():
    rng = np.random.default_rng(0)
    centres = np.array([[4.0, 0, 0], [0, 4.0, 0], [0, 0, 4.0]])
    truth = rng.integers(0, 3, 2000)
    points = centres[truth] + rng.normal(size=(2000, 3))
    labels = cluster.sampled_ward(points, range(2, 4), seed=1, sample=300)
    assert adjusted_rand_score(truth, labels[3]) >= 0.95
    assert len(np.unique(labels[2])) == 2
    chosen = np.sort(np.random.default_rng(1).choice(2000, 300, replace=False))
    others = np.setdiff1d(np.arange(2000), chosen)
    centroids = np.stack([points[chosen][labels[3][chosen] == c].mean(0) for c in range(3)])
    nearest = np.linalg.norm(points[others][:, None] - centroids[None], axis=2).argmin(1)
    np.testing.assert_array_equal(labels[3][others], nearest)


# --- issue 19: options checked up front, the output set, unfinished runs, small classes -----------------------------


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    """Planted groups, two classes of 27-28 images and one of 5, at SIZE px."""
    root, _ = _planted_run(tmp_path_factory.mktemp("spray-small") / "run", n=60, classes=2)
    return root


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("extra, culprit", [
    (["--large-class", "0"], "--large-class must be >= 64"),
    (["--seed", "-1"], "--seed must be in 0 .. 2**32 - 1"),
    (["--grid", "1000"], "--grid 1000 is larger than the run's 32x32 maps"),
    (["--neighbours", "100", "--min-images", "4"], "--neighbours 100 needs classes of at least 102 images"),
])
def test_options_are_checked_before_any_work_naming_the_option(small_run, capsys, monkeypatch, extra, culprit):
    """Issue 19.15: each bad option is one line naming it, exit 2, before Ray starts and before anything is written."""
    from pipeline.spray import run as spray_run

    def no_work(*args, **kwargs):
        raise AssertionError("the analysis started")

    monkeypatch.setattr(spray_run, "_run_tasks", no_work)
    assert cli_main(["spray", str(small_run), "--no-progress", *extra]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith("error: ") and culprit in error
    assert not (small_run / "spray").exists()


def test_spray_names_its_files_only_through_run_layout():
    """RunLayout's SPRAY_FILES is the one list of SpRAy's file names (what --overwrite and a second analysis may
    delete): no module of pipeline/spray spells one of them out."""
    import ast

    spelled = [f"{path.name}: {node.value}" for path in sorted((ROOT / "pipeline" / "spray").glob("*.py"))
               for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.Constant) and node.value in SPRAY_FILES]
    assert not spelled, spelled


def test_spray_replaces_its_outputs_as_a_set(small_run, tmp_path, capsys, monkeypatch, local_ray):
    """Issue 19.7 and 19.15: `--out DIR` prints DIR; a second spray with other options leaves none of the first's
    files; a spray that fails while writing (a full disk) is one line, exit 2, and leaves the previous set whole; a
    folder holding other files is refused before any work."""
    import errno

    from pipeline.spray import outputs

    out = tmp_path / "strategies"
    common = ["spray", str(small_run), "--out", str(out), "--grid", "8", "--no-embedding", "--no-progress"]
    assert cli_main([*common, "--no-virelay-images"]) == 0
    assert f"-> {out}\n" in capsys.readouterr().out
    assert set(_files(out)) == set(SPRAY_FILES)  # RunLayout's list is every file SpRAy writes, and only those
    assert cli_main([*common, "--no-virelay", "--classes", "1"]) == 0
    capsys.readouterr()
    second = _files(out)
    assert set(second) == {CLUSTERS_FILE, SUMMARY_FILE, "cluster_means.h5"}
    assert set(pd.read_parquet(out / CLUSTERS_FILE)["class"]) == {1}

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(outputs, "write_means", full_disk)
        assert cli_main([*common, "--no-virelay"]) == 2
    assert capsys.readouterr().err.strip() == f"error: cannot write the SpRAy {out}: no space left on device"
    assert _files(out) == second and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    (out / "mine.txt").write_text("notes")
    assert cli_main([*common, "--no-virelay"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "holds files the SpRAy did not write (mine.txt)" in error
    assert (out / "mine.txt").read_text() == "notes" and set(_files(out)) == set(second) | {"mine.txt"}


def test_spray_of_an_unfinished_run_takes_the_map_size_from_the_shards_and_says_so(small_run, tmp_path, capsys,
                                                                                    local_ray):
    """Issue 19.6: no manifest yet (the run is unfinished) and no size recorded: the ViRelAy view has the shards'
    size and reads their maps (not a 224 fallback), and the run is said to be unfinished."""
    import shutil

    import h5py

    run = tmp_path / "run"
    shutil.copytree(small_run, run, ignore=shutil.ignore_patterns("spray"))
    (run / "manifest.json").unlink()
    (run / "_SUCCESS").unlink()
    assert cli_main(["spray", str(run), "--grid", "8", "--no-embedding", "--no-progress", "--no-virelay-images"]) == 0
    err = capsys.readouterr().err
    assert "warning: unfinished run" in err
    summary = json.loads((run / "spray" / SUMMARY_FILE).read_text())
    assert summary["complete"] is False and summary["out"] == str(run / "spray")
    index = open_run_index(run)
    with h5py.File(run / "spray" / "attribution.h5", "r") as view, h5py.File(run / "relevance" / "shard-00000.h5",
                                                                            "r") as shard:
        assert view["attribution"].shape == (len(index.table), SIZE, SIZE, 1)
        np.testing.assert_array_equal(view["attribution"][:5, :, :, 0], shard["relevance"][:5])
        assert "a copy without the run's shards reads as fill values (NaN)" in view.attrs["source"]
    with h5py.File(run / "spray" / "dataset.h5", "r") as dataset:
        assert dataset["data"].shape == (len(index.table), SIZE, SIZE, 3)


def test_a_class_too_small_for_k_max_says_which_k_mean_nothing(small_run, tmp_path, capsys, local_ray):
    """Issue 19.15: the 5-image class with k_max 8: k = 3..8 are listed as not meaningful in summary.json, on the
    console and in the report's Strategies section; the large classes' chosen k is not."""
    import shutil

    from pipeline.report import build_report

    run = tmp_path / "run"
    shutil.copytree(small_run, run, ignore=shutil.ignore_patterns("spray", "report"))
    assert cli_main(["spray", str(run), "--grid", "8", "--no-embedding", "--no-progress", "--no-virelay",
                     "--min-images", "4", "--neighbours", "3"]) == 0
    assert "class(es) too small or too uniform for some k" in capsys.readouterr().err
    entries = {e["class"]: e for e in json.loads((run / "spray" / SUMMARY_FILE).read_text())["classes"]}
    small = entries[2]["k_not_meaningful"]
    assert set(small) == {"3", "4", "5", "6", "7", "8"} and small["8"].startswith("not computed")
    assert small["3"] == "fewer than 2 images per cluster (5 images)" or small["3"].startswith("tied")
    for cls in (0, 1):
        assert str(entries[cls]["k_chosen"]) not in entries[cls]["k_not_meaningful"]
    page = build_report(run, gallery=1, per_class=0).read_text()
    assert "Not meaningful for this class" in page and "k = 8: not computed: 5 images" in page


def test_a_full_disk_is_one_line_and_leaves_nothing(small_run, tmpfs, capsys, local_ray):
    """Issue 19.7: a real 8 KiB disk fills while spray writes its HDF5 files (libhdf5 fails in close()): one line,
    exit 2, no traceback, no crash, nothing left on the disk."""
    import subprocess

    subprocess.run(["mount", "-o", "remount,size=8k", str(tmpfs)], check=True)
    out = tmpfs / "spray"
    assert cli_main(["spray", str(small_run), "--out", str(out), "--grid", "8", "--no-embedding", "--no-progress",
                     "--no-virelay-images"]) == 2
    captured = capsys.readouterr()
    error = captured.err.strip()
    assert "\n" not in error and error.startswith(f"error: cannot write {out}") and "no space left on device" in error
    assert "Traceback" not in captured.out + captured.err
    assert not list(tmpfs.iterdir())


def test_hdf5_writes_on_a_full_disk_fail_cleanly_wherever_the_disk_fills(tmpfs):
    """pipeline/h5_writing.py: at several disk sizes the disk fills in a different place (a chunk, a dataset freed
    while the next is written, the close): always one OutputError, nothing left, no 'Exception ignored' noise from
    h5py and no SIGSEGV of libhdf5 later in the process (a subprocess, so that a crash is seen)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import gc, subprocess, numpy as np
        from pathlib import Path
        from lrp_module.files import OutputError
        from pipeline.h5_writing import h5_atomic
        disk = Path({str(tmpfs)!r})
        rng = np.random.default_rng(0)
        for size in ("8k", "24k", "48k", "96k"):
            subprocess.run(["mount", "-o", f"remount,size={{size}}", str(disk)], check=True)
            try:
                with h5_atomic(disk / "means.h5") as handle:
                    for c in range(12):
                        group = handle.create_group(str(c))
                        for k in (2, 3):
                            data = group.create_dataset(f"k{{k}}", data=rng.random((k, 32, 32)).astype("float32"),
                                                        compression="gzip")
                            data.attrs["images"] = np.arange(k)
                raise SystemExit(f"{{size}}: the disk did not fill")
            except OutputError as error:
                assert str(error) == f"cannot write {{disk / 'means.h5'}}: no space left on device", error
            gc.collect()
            assert not list(disk.iterdir()), list(disk.iterdir())
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
    assert "Exception ignored" not in result.stderr and "Traceback" not in result.stderr
