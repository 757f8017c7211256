"""PCX's prototypes (`make prototypes`, pipeline/audit/): BIC recovers the number of components of a known mixture,
the log-likelihood is a density over all C concepts (probabilistic PCA's, checked against a multivariate normal), a
seed gives the same prototypes, the tables hold their declared columns with values that agree with the run's own
vectors, bad input is one line that writes nothing, and the outputs are the run's own files (replaced as a set,
removed by `--overwrite`, never a user's file). On synthetic runs with concept data (bench/synthetic_run.py's layout
plus the concept datasets a run with concepts writes); one real run of the shapes demo for the command and the
report's section."""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.stats import multivariate_normal
from sklearn.metrics import adjusted_rand_score

from bench.synthetic_run import stats_table, synthesise_run
from demo import shapes
from export.concepts import ConceptLayerRecord, ConceptsRecord
from pipeline.audit.prototype_mixture import MixtureParams, fit_class
from pipeline.audit.prototype_schema import PROTOTYPE_IMAGE_SCHEMA, PROTOTYPE_SCHEMA
from pipeline.audit.prototypes import PrototypeOptions, extreme_deviations, prototypes
from pipeline.cli import main as cli_main
from pipeline.concepts import outputs as concept_outputs
from pipeline.config import load_config
from pipeline.layout import RunLayout
from pipeline.report import build_report
from pipeline.run import explain

pytestmark = pytest.mark.timeout(120)
LAYER, OTHER = "features.16", "classifier.0"
CHANNELS = 16


# ------------------------------------------------------------------------------------------------ synthetic runs
def _strategies(rng: np.random.Generator, count: int, channels: int = CHANNELS) -> np.ndarray:
    """`count` profiles over distinct concepts (each strategy its own three concepts)."""
    profiles = np.full((count, channels), 0.02)
    for j in range(count):
        profiles[j, 3 * j:3 * j + 3] = 1.0
    return profiles


def _concept_run(root: Path, per_class: dict[int, int], strategies: dict[int, int], seed: int = 0) -> Path:
    """A finished run whose images of class c (the `target`, per_class[c] of them) carry raw concept relevance at
    LAYER drawn from strategies[c] planted strategies (scaled per image: normalisation must remove the scale); a
    second concept layer OTHER with 8 channels. Returns the run folder."""
    rng = np.random.default_rng(seed)
    targets = np.concatenate([np.full(n, c) for c, n in per_class.items()])
    rng.shuffle(targets)
    n = len(targets)
    table = stats_table(n, max(per_class) + 1, ["/nowhere/x.jpg"], size=8, shard_size=32, seed=seed)
    table = table.set_column(table.schema.get_field_index("target"), table.schema.field("target"),
                             pa.array(targets, pa.int64()))
    run = synthesise_run(root, table, size=8, shard_size=32, seed=seed)
    vectors = np.zeros((n, CHANNELS))
    for c in per_class:
        rows = np.flatnonzero(targets == c)
        profiles = _strategies(rng, strategies[c])
        chosen = rng.integers(0, strategies[c], len(rows))
        vectors[rows] = profiles[chosen] + rng.normal(0, 0.05, (len(rows), CHANNELS))
    vectors *= rng.uniform(0.5, 5.0, (n, 1))
    record = ConceptsRecord((ConceptLayerRecord(LAYER, CHANNELS, 2, 2), ConceptLayerRecord(OTHER, 8, 1, 1)), LAYER, 0,
                            True)
    ids = table.column("image_id").to_pylist()
    for index, shard in enumerate(sorted((run / "relevance").glob("shard-*.h5"))):
        rows = slice(index * 32, min(n, (index + 1) * 32))
        with h5py.File(shard, "a") as handle:
            handle.create_dataset("image_id", data=np.array(ids[rows], dtype=object), dtype=h5py.string_dtype())
            handle.attrs[concept_outputs.ATTRIBUTE] = json.dumps(record.record())
            count = len(ids[rows])
            handle.create_dataset(concept_outputs.relevance_name(LAYER), data=vectors[rows].astype(np.float32))
            handle.create_dataset(concept_outputs.relevance_name(OTHER), data=rng.normal(0, 1, (count, 8))
                                  .astype(np.float32))
            for layer, c in ((LAYER, CHANNELS), (OTHER, 8)):
                handle.create_dataset(concept_outputs.position_name(layer), data=np.zeros((count, c), np.int32))
    return run


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """Class 0: 3 strategies (90 images), class 1: 1 strategy (60), class 2: 6 images (too few)."""
    return _concept_run(tmp_path_factory.mktemp("synthetic") / "run", {0: 90, 1: 60, 2: 6}, {0: 3, 1: 1, 2: 1})


def _normalised(run: Path, layer: str = LAYER) -> pd.DataFrame:
    """image_id -> its normalised concept relevance, read as a user would (h5py)."""
    ids, values = [], []
    for shard in sorted((run / "relevance").glob("shard-*.h5")):
        with h5py.File(shard) as handle:
            ids += [i.decode() for i in handle["image_id"][:]]
            values.append(handle[f"concept_relevance/{layer}"][:].astype(np.float64))
    matrix = np.concatenate(values)
    return pd.DataFrame(matrix / (np.abs(matrix).sum(1, keepdims=True) + 1e-10), index=ids)


# ------------------------------------------------------------------------------------------------ the method
def _mixture_draws(seed: int, components: int, n: int = 400, dims: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """n points of a known Gaussian mixture: well separated means (about 50 apart), random full covariances (axes
    of about 0.5)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, components, n)
    means = rng.normal(0, 10, (components, dims))
    points = np.empty((n, dims))
    for j in range(components):
        shape = rng.normal(0, 1, (dims, dims)) / np.sqrt(dims)
        rows = labels == j
        points[rows] = means[j] + rng.normal(0, 1, (rows.sum(), dims)) @ shape * 0.5
    return points, labels


@pytest.mark.parametrize("components", [1, 2, 3, 5])
def test_bic_recovers_the_number_of_components_of_a_known_mixture(components):
    points, labels = _mixture_draws(components, components)
    found = fit_class(points, MixtureParams(max_components=8))
    assert found.components == components, found.bic
    assert min(found.bic, key=found.bic.get) == components
    assert adjusted_rand_score(labels, found.prototype) >= 0.95
    assert np.isclose(found.weights.sum(), 1) and (np.diff(found.weights) <= 0).all()  # 0 = the heaviest


def test_a_large_class_searches_a_sample_and_fits_every_image():
    points, labels = _mixture_draws(4, 4, n=1200)
    found = fit_class(points, MixtureParams(search_sample=300))
    assert found.components == 4 and len(found.prototype) == 1200
    assert adjusted_rand_score(labels, found.prototype) >= 0.95
    again = fit_class(points, MixtureParams(search_sample=300))
    assert (again.prototype == found.prototype).all() and (again.log_likelihood == found.log_likelihood).all()


def test_log_likelihood_is_probabilistic_pcas_density_over_all_concepts():
    """One component in d < C principal components: the density is a multivariate normal over all C concepts whose
    covariance keeps the d leading variances and puts the mean discarded variance on the rest (Tipping and Bishop);
    reg_covar 0, so it is exact (the mixture's ML covariance divides by N, PCA's by N - 1)."""
    rng = np.random.default_rng(3)
    n, c, d = 300, 10, 4
    x = rng.normal(0, 1, (n, c)) @ rng.normal(0, 1, (c, c)) + rng.normal(0, 3, c)
    found = fit_class(x, MixtureParams(max_components=1, dims=d, images_per_dim=1, reg_covar=0.0))
    assert found.dims == d and found.components == 1
    centred = x - x.mean(0)
    values, vectors = np.linalg.eigh(np.cov(centred.T))
    values, vectors = values[::-1], vectors[:, ::-1]
    residual = values[d:].mean()
    covariance = vectors @ np.diag(np.r_[values[:d] * (n - 1) / n, np.full(c - d, residual)]) @ vectors.T
    expected = multivariate_normal(x.mean(0), covariance).logpdf(x)
    assert np.allclose(found.log_likelihood, expected, rtol=1e-6, atol=1e-6)
    # an image unusual only outside the kept components is still the least likely
    odd = x.mean(0) + 6 * np.sqrt(residual) * vectors[:, -1]
    again = fit_class(np.vstack([x, odd]), MixtureParams(max_components=1, dims=d, images_per_dim=1, reg_covar=0.0))
    assert again.log_likelihood.argmin() == n


def test_extreme_deviations_name_the_largest_above_and_below_only():
    deviations = np.array([[0.3, -0.1, 0.0, 0.5, -0.4], [-0.1, -0.2, -0.3, -0.05, -0.01]])
    (over, over_values), (under, under_values) = extreme_deviations(deviations, 2)
    assert over.tolist() == [[3, 0], [-1, -1]] and np.allclose(over_values[0], [0.5, 0.3])
    assert np.isnan(over_values[1]).all()
    assert under.tolist() == [[4, 1], [2, 1]] and np.allclose(under_values, [[-0.4, -0.1], [-0.3, -0.2]])


# ------------------------------------------------------------------------------------------------ the command
def _declared(schema: pa.Schema) -> list[tuple]:
    """Each field's name, type (a list by its item type: Parquet renames the item field), nullability and doc."""
    def kind(t: pa.DataType) -> str:
        return f"list<{t.value_type}>" if pa.types.is_list(t) else str(t)

    return [(f.name, kind(f.type), f.nullable, (f.metadata or {}).get(b"doc")) for f in schema]


def test_outputs_hold_the_declared_columns_and_agree_with_the_runs_vectors(synthetic, local_ray):
    summary = prototypes(synthetic, PrototypeOptions(closest=5, deviations=2), progress=False)
    folder = RunLayout(synthetic).prototypes
    images, table = pq.read_table(folder / "images.parquet"), pq.read_table(folder / "prototypes.parquet")
    assert _declared(images.schema) == _declared(PROTOTYPE_IMAGE_SCHEMA)
    assert _declared(table.schema) == _declared(PROTOTYPE_SCHEMA)
    assert summary["layer"] == LAYER and json.loads((folder / "summary.json").read_text()) == summary
    assert {c["class"]: c["components"] for c in summary["classes"]} == {0: 3, 1: 1}
    assert summary["skipped"] == [{"class": 2, "name": "class 2", "images": 6, "reason": "fewer than 10 images"}]
    frame, protos = images.to_pandas(), table.to_pandas()
    stats = pd.read_parquet(synthetic / "stats").set_index("image_id")
    assert (frame["class"].to_numpy() == stats.loc[frame["image_id"], "target"].to_numpy()).all()
    assert len(frame) == 150 and frame["image_id"].is_unique
    vectors = _normalised(synthetic)
    for cls, rows in frame.groupby("class"):
        assert sorted(rows["outlier_rank"]) == list(range(len(rows)))
        assert (rows.sort_values("outlier_rank")["log_likelihood"].diff().dropna() >= 0).all()
        mine = protos[protos["class"] == cls].set_index("prototype")
        assert np.isclose(mine["weight"].sum(), 1, atol=1e-5) and mine["images"].sum() == len(rows)
        for row in rows.itertuples():  # the deviations: the image's vector minus its prototype's mean profile
            deviation = vectors.loc[row.image_id].to_numpy() - np.asarray(mine.loc[row.prototype, "mean"])
            assert row.over_concepts[0] == deviation.argmax() and np.isclose(row.over_deviations[0], deviation.max(),
                                                                               atol=1e-5)
            assert row.under_concepts[0] == deviation.argmin() and np.isclose(row.under_deviations[0],
                                                                                deviation.min(), atol=1e-5)
            assert all(v > 0 for v in row.over_deviations) and all(v < 0 for v in row.under_deviations)
        for k, proto in mine.iterrows():
            members = rows[rows["prototype"] == k]
            assert set(proto["closest"]) <= set(members["image_id"]) and len(proto["closest"]) == min(5, len(members))
            assert list(proto["closest_log_density"]) == sorted(proto["closest_log_density"], reverse=True)
            assert proto["top_concepts"][0] == int(np.argmax(proto["mean"]))
    # the planted strategies of class 0 are its prototypes, each led by one of its three concepts
    zero = protos[protos["class"] == 0]
    assert sorted(int(c) // 3 for c in zero["top_concepts"].str[0]) == [0, 1, 2]


def test_a_seed_gives_the_same_prototypes_and_another_layer_replaces_the_set(synthetic, local_ray, capsys):
    folder = RunLayout(synthetic).prototypes
    assert cli_main(["prototypes", str(synthetic), "--seed", "7", "--no-progress"]) == 0
    first = {name: pq.read_table(folder / name) for name in ("images.parquet", "prototypes.parquet")}
    assert cli_main(["prototypes", str(synthetic), "--seed", "7", "--no-progress"]) == 0
    for name, table in first.items():
        assert pq.read_table(folder / name).equals(table)
    capsys.readouterr()
    assert cli_main(["prototypes", str(synthetic), "--layer", OTHER, "--classes", "0", "--max-components", "2",
                     "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith(f"90 images in 1 classes at {OTHER} in ")
    again = pq.read_table(folder / "images.parquet").to_pandas()
    assert set(again["layer"]) == {OTHER} and set(again["class"]) == {0}
    assert sorted(p.name for p in folder.iterdir()) == ["images.parquet", "prototypes.parquet", "summary.json"]


BAD = [
    (["--classes", "9"], r"unknown class 9: the model has 3 classes"),
    (["--classes", "2"], r"class 2 \(class 2\) has 6 images; a mixture needs at least 10"),
    (["--layer", "features.3"], r"unknown concept layer 'features.3': the run has concept data for features.16, "
                                r"classifier.0"),
    (["--classes", "a,b"], r"--classes must be comma-separated class indices"),
    (["--max-components", "0"], r"--max-components must be >= 1"),
    (["--seed", "-1"], r"--seed must be in 0"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message, capsys):
    run = _concept_run(tmp_path / "run", {0: 20, 1: 20, 2: 6}, {0: 1, 1: 1, 2: 1})
    assert cli_main(["prototypes", str(run), *args, "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and re.search(message, error), error
    assert not RunLayout(run).prototypes.exists()


def test_a_run_without_concept_data_is_one_line(tmp_path, capsys):
    run = synthesise_run(tmp_path / "plain", stats_table(8, 2, ["/nowhere.jpg"], size=8, shard_size=8), size=8,
                         shard_size=8)
    assert cli_main(["prototypes", str(run)]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "has no concept outputs" in error and "CONCEPTS=" in error
    assert not RunLayout(run).prototypes.exists()


def test_no_class_large_enough_is_one_line(tmp_path, capsys):
    run = _concept_run(tmp_path / "run", {0: 5, 1: 4}, {0: 1, 1: 1})
    assert cli_main(["prototypes", str(run)]) == 2
    assert "no class has 10 or more images" in capsys.readouterr().err
    assert not RunLayout(run).prototypes.exists()


def test_outputs_are_the_runs_own_files_and_never_a_users(tmp_path, local_ray, capsys):
    run = _concept_run(tmp_path / "run", {0: 30, 1: 30}, {0: 2, 1: 1})
    layout = RunLayout(run)
    assert cli_main(["prototypes", str(run), "--no-progress"]) == 0
    written = {p for p in layout.own_files() if p.parent == layout.prototypes}
    assert {p.name for p in written} == {"images.parquet", "prototypes.parquet", "summary.json"}
    stale = run / ".tmp-999999999-prototypes"  # what an analysis killed mid-write left: swept by the next one
    (stale / "images.parquet").parent.mkdir()
    (stale / "images.parquet").write_bytes(b"half")
    (layout.prototypes / ".tmp-999999999-summary.json").write_text("{")  # a temporary file: the run's own
    assert cli_main(["prototypes", str(run), "--no-progress"]) == 0
    assert not stale.exists() and not (layout.prototypes / ".tmp-999999999-summary.json").exists()
    (layout.prototypes / "my-notes.txt").write_text("mine")  # a user's file: the set is not replaced
    before = (layout.prototypes / "images.parquet").read_bytes()
    capsys.readouterr()
    assert cli_main(["prototypes", str(run), "--seed", "3", "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "my-notes.txt" in error
    assert (layout.prototypes / "images.parquet").read_bytes() == before
    layout.remove_own()  # what `explain --overwrite` does: the prototypes go, the user's file stays
    assert sorted(p.name for p in layout.prototypes.iterdir()) == ["my-notes.txt"]
    (layout.prototypes / "my-notes.txt").unlink()
    layout.remove_own()
    assert not layout.prototypes.exists()


# ------------------------------------------------------------------------------------------------ a real run
@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory, artifact_cache, local_ray) -> Path:
    """`make explain DATASET=shapes MODEL=vgg-shapes CONCEPTS=features.16` on 60 shapes (10 per class)."""
    root = tmp_path_factory.mktemp("shapes")
    data = shapes.write_split(root / "val", per_class=10)
    config = load_config({"dataset": "shapes", "model": "vgg-shapes", "out": str(root / "run"),
                          "cache": str(artifact_cache), "batch_size": 20, "shard_size": 32,
                          "concepts": {"layers": [LAYER], "maps": 0, "top": 3, "relmax": 4}})
    config.root = str(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explain(config, progress=False)
    return root / "run"


@pytest.mark.timeout(300)
def test_make_prototypes_on_a_real_run_and_the_reports_section(shapes_run, capsys):
    assert cli_main(["prototypes", str(shapes_run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"\d+ images in \d+ classes at {LAYER}", out), out
    summary = json.loads((RunLayout(shapes_run).prototypes / "summary.json").read_text())
    analysed = {c["class"] for c in summary["classes"]}
    stats = pd.read_parquet(shapes_run / "stats")
    counts = stats["target"].value_counts()
    assert analysed == {int(c) for c, n in counts.items() if n >= 10}
    assert {s["class"] for s in summary["skipped"]} == {int(c) for c, n in counts.items() if n < 10}
    page = build_report(shapes_run).read_text()
    body = page.split('<section id="prototypes">', 1)[1].split("</section>", 1)[0]
    images = pd.read_parquet(RunLayout(shapes_run).prototypes / "images.parquet")
    for cls in analysed:
        assert f'id="prototypes-{cls}"' in body
        worst = images[(images["class"] == cls) & (images["outlier_rank"] == 0)]["image_id"].iloc[0]
        assert f"<b>{worst}</b>" in body  # the class's first outlier is shown
    for src in re.findall(r'src="([^"]+)"', body):
        assert (shapes_run / "report" / src).is_file()
