"""Concepts (CRP) over a dataset: `concepts:` in the run configuration adds each image's concept relevance, most
relevant neurons, top channels with their shares and top-K concept maps to the run's shards and statistics, and the
run's relevance maximisation (RelMax / RelStats) to relmax.parquet. The stored values equal the float64 oracle's
within the float32 bounds; the outputs read with h5py, pandas and DuckDB in a process that cannot import this
project; relmax.parquet is the same for one actor or two and after a resumed run; a bad layer stops the run before
anything is written. On the demo model (vgg-shapes, 32 px, the embedded sample): cheap."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from lrp_module import LRPModel
from lrp_module.oracle import Float64Oracle, bound, compare
from lrp_module.zoo import build_model
from pipeline.cli import main as cli_main
from pipeline.concepts.relmax import RelMax, image_key
from pipeline.config import ConfigError, load_config
from pipeline.datasets import load_records
from pipeline.layout import RunLayout
from pipeline.preprocess import Preprocessing, load
from pipeline.run import RunError, explain
from pipeline.run_reader import concept_maps, concept_positions, concept_relevance, concepts_record, relmax_table

from .helpers import make_tiny_vgg

pytestmark = pytest.mark.timeout(900)
ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample"
SIZE = 32
LAYERS = ["features.12", "features.8", "classifier.0"]  # the maps layer, one below it, one without space
CONCEPTS = {"layers": LAYERS, "maps": 2, "top": 3, "relmax": 3}


def _config(tmp_path: Path, cache: Path, out: str = "run", **values):
    settings = dict(dataset=str(SAMPLE), layout="plain", model="vgg-shapes", size=SIZE, batch_size=2, shard_size=4,
                    map_dtype="float32", out=str(tmp_path / out), cache=str(cache), concepts=dict(CONCEPTS))
    settings.update(values)
    return load_config(settings)


def _run(config, **kwargs) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return explain(config, progress=False, **kwargs)


@pytest.fixture(scope="module")
def concept_run(tmp_path_factory, artifact_cache, local_ray) -> tuple[Path, dict]:
    """One finished run with concepts (3 shards of the 9 sample images)."""
    home = tmp_path_factory.mktemp("concepts")
    manifest = _run(_config(home, artifact_cache))
    return home / "run", manifest


READER = r"""
import json, sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("lrp_module", "export", "pipeline"):
            raise ImportError(name + " must not be imported")
sys.meta_path.insert(0, Refuse())
import h5py, numpy as np, pandas as pd
run, layers = sys.argv[1], sys.argv[2].split(",")
out = {}
with h5py.File(f"{run}/relevance.h5") as f:
    out["concepts"] = json.loads(f.attrs["concepts"])
    out["vectors"] = {layer: f[f"concept_relevance/{layer}"][:].tolist() for layer in layers}
    out["positions"] = {layer: f[f"concept_position/{layer}"][:].tolist() for layer in layers}
    out["channels"] = f["concept_channels"][:].tolist()
    out["maps_shape"] = list(f["concept_maps"].shape)
    out["maps"] = f["concept_maps"][:].astype("float64").tolist()
stats = pd.read_parquet(f"{run}/stats")
out["stats"] = json.loads(stats[["image_id", "shard", "row", "target", "concepts_top", "concepts_top_share"]]
                          .to_json(orient="records"))
relmax = pd.read_parquet(f"{run}/relmax.parquet")
out["relmax_rows"] = len(relmax)
try:
    import duckdb
    out["duckdb"] = duckdb.sql(f"select count(*) from '{run}/relmax.parquet' where \"class\" is null").fetchall()[0][0]
    out["duckdb_top"] = duckdb.sql(f"select image_id, concepts_top[1] from '{run}/stats/*.parquet' "
                                   "order by image_id").fetchall()
except ImportError:
    out["duckdb"] = None
print(json.dumps(out))
"""


def _read_without_the_project(run: Path) -> dict:
    result = subprocess.run([sys.executable, "-I", "-c", READER, str(run), ",".join(LAYERS)], capture_output=True,
                            text=True, cwd=run, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def _inputs() -> tuple[list[str], torch.Tensor]:
    records = load_records(SAMPLE, "plain")
    prep = Preprocessing.for_size(SIZE)
    return [r.image_id for r in records], torch.stack([load(r, prep)[0] for r in records])


def test_concept_outputs_equal_float64_and_read_without_the_project(concept_run):
    run, manifest = concept_run
    assert manifest["totals"]["failed"] == 0 and manifest["concepts"]["relmax"] == "relmax.parquet"
    read = _read_without_the_project(run)
    record = read["concepts"]
    assert [layer["name"] for layer in record["layers"]] == LAYERS and record["maps_layer"] == LAYERS[0]
    assert [layer["channels"] for layer in record["layers"]] == [32, 32, 64]
    assert [(layer["height"], layer["width"]) for layer in record["layers"]] == [(4, 4), (8, 8), (1, 1)]
    ids, x = _inputs()
    n = len(ids)
    assert read["maps_shape"] == [n, 2, SIZE, SIZE] and read["relmax_rows"] > 0
    # the run's rows are in dataset order: the virtual datasets' rows are the sample's images in order
    stats = pd.DataFrame(read["stats"]).sort_values(["shard", "row"]).reset_index(drop=True)
    assert stats.image_id.tolist() == ids
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = build_model("vgg-shapes", "demo")
    lrp = LRPModel(model, "epsilon_gamma_box")
    oracle = Float64Oracle(model).lrp
    float64 = oracle.concept_relevance(x.double(), None, LAYERS)
    eager = lrp.concept_relevance(x, None, LAYERS)
    for layer in LAYERS:  # each layer's concept relevance: the float64 oracle's, within eager float32's bound
        stored = torch.tensor(read["vectors"][layer])
        assert compare(stored, float64[layer]).worst <= bound(compare(eager[layer], float64[layer]).worst)
        positions = np.array(read["positions"][layer])
        grid = next(item["height"] * item["width"] for item in record["layers"] if item["name"] == layer)
        assert positions.shape == (n, stored.shape[1]) and ((positions >= 0) & (positions < grid)).all()
    # the statistics' top channels and shares are the stored vector's
    vectors = np.array(read["vectors"][LAYERS[0]])
    for i, row in stats.iterrows():
        order = np.argsort(-vectors[i], kind="stable")[:3]
        assert row.concepts_top == order.tolist()
        np.testing.assert_allclose(row.concepts_top_share, vectors[i][order] / np.abs(vectors[i]).sum(), rtol=1e-5)
    # the maps for the channels the run chose equal float64's for the same channels (per map, eager's bound)
    channels = np.array(read["channels"])
    assert (channels[:, 0] == stats.concepts_top.str[0]).all()
    conditions = [[{LAYERS[0]: [int(c)]} for c in row] for row in channels]
    maps64 = oracle.concept_maps(x.double(), None, conditions).flatten(0, 1)
    eager_maps = lrp.concept_maps(x, None, conditions).flatten(0, 1)
    stored_maps = torch.tensor(read["maps"]).flatten(0, 1)
    assert compare(stored_maps, maps64).worst <= bound(compare(eager_maps, maps64).worst)
    if read["duckdb"] is not None:
        assert read["duckdb"] == (32 + 32 + 64) * CONCEPTS["relmax"]  # overall: every channel's top n
        assert [row[1] for row in read["duckdb_top"]] == \
            stats.sort_values("image_id").concepts_top.str[0].tolist()


def test_relmax_table_is_the_top_n_of_the_stored_vectors(concept_run):
    """relmax.parquet, read with the project's accessors, equals a brute-force ranking of every image's normalised
    concept relevance: overall and per class explained, ties by dataset order."""
    run, _ = concept_run
    layout = RunLayout(run)
    table = relmax_table(layout)
    stats = pd.read_parquet(run / "stats").sort_values(["shard", "row"]).reset_index(drop=True)
    for layer in LAYERS:
        ids, values = concept_relevance(layout, layer, normalised=True)
        _, positions = concept_positions(layout, layer)
        assert ids == stats.image_id.tolist()
        ours = table[table.layer == layer]
        width = concepts_record(layout).layer(layer).width
        groups = [(None, np.ones(len(ids), bool))] + [(c, (stats.target == c).to_numpy())
                                                      for c in sorted(stats.target.unique())]
        for klass, members in groups:
            rows = ours[ours["class"].isna()] if klass is None else ours[ours["class"] == klass]
            for channel in (0, values.shape[1] - 1):
                picked = rows[rows.channel == channel].sort_values("rank")
                order = [i for i in np.lexsort((np.arange(len(ids)), -values[:, channel])) if members[i]][:3]
                assert picked.image_id.tolist() == [ids[i] for i in order], (layer, klass, channel)
                assert picked["rank"].tolist() == list(range(len(order)))
                np.testing.assert_allclose(picked.value, values[order, channel], rtol=1e-6)
                assert picked.neuron.tolist() == positions[order, channel].tolist()
                assert (picked.neuron == picked.neuron_row * width + picked.neuron_col).all()
    first = table.iloc[0]
    channels, maps = concept_maps(layout, table.iloc[:3])
    assert channels.shape == (3, 2) and maps.shape == (3, 2, SIZE, SIZE)
    with h5py.File(run / first.shard) as handle:
        np.testing.assert_array_equal(maps[0], handle["concept_maps"][first.row])


def test_relmax_is_the_same_for_one_or_two_actors_and_after_a_resume(concept_run, tmp_path, artifact_cache):
    """The merged table depends on the shards' contents only: two actors (the other order of shards) and a run
    whose shard was lost and redone give the same relmax.parquet as one actor."""
    run, _ = concept_run
    reference = pd.read_parquet(run / "relmax.parquet")
    config = _config(tmp_path, artifact_cache, out="two", actors=2)
    _run(config)
    two = tmp_path / "two"
    pd.testing.assert_frame_equal(pd.read_parquet(two / "relmax.parquet"), reference)
    (two / "stats" / "shard-00001.parquet").unlink()  # as if killed mid-shard
    (two / "_SUCCESS").unlink()
    untouched = (two / "relevance" / "shard-00000.h5").stat().st_mtime_ns
    _run(config)
    assert (two / "relevance" / "shard-00000.h5").stat().st_mtime_ns == untouched
    pd.testing.assert_frame_equal(pd.read_parquet(two / "relmax.parquet"), reference)
    assert (two / "_SUCCESS").exists()


def test_relmax_merge_is_partition_free_and_bounded():
    """RelMax over any partition of the images, merged in any order, is the one-pass table; its size is C x n
    however many images it has seen."""
    rng = np.random.default_rng(0)
    count, channels, n = 2000, 6, 5
    values = rng.normal(size=(count, channels)).round(1)  # rounded: many ties, broken by the image key
    positions = rng.integers(0, 16, (count, channels))
    classes = rng.integers(0, 3, count)
    keys = image_key(np.arange(count) // 100, np.arange(count) % 100)
    whole = RelMax.empty(channels, n)
    whole.update(values, keys, positions, classes)
    parts = []
    for start, stop in ((1500, 2000), (0, 700), (700, 1500)):
        part = RelMax.empty(channels, n)
        part.update(values[start:stop], keys[start:stop], positions[start:stop], classes[start:stop])
        parts.append(part)
    merged = RelMax.empty(channels, n)
    for part in parts:
        merged.merge(part)
    for a, b in [(whole.overall, merged.overall), *((whole.per_class[c], merged.per_class[c]) for c in range(3))]:
        np.testing.assert_array_equal(a.keys, b.keys)
        np.testing.assert_array_equal(a.values, b.values)
        np.testing.assert_array_equal(a.positions, b.positions)
    assert whole.overall.values.shape == (channels, n)
    best = np.lexsort((keys, -values[:, 0]))[:n]
    np.testing.assert_array_equal(whole.overall.keys[0], keys[best])


def test_a_bad_concept_layer_stops_before_anything_is_written(tmp_path, artifact_cache, capsys):
    out = tmp_path / "never"
    config = _config(tmp_path, tmp_path / "cache", out="never", concepts={"layers": ["features.99"]})
    with pytest.raises(RunError, match=r"concepts: unknown layer 'features.99': concepts can be taken at "
                                       r"features.0, .*features.12"):
        _run(config)
    assert not out.exists() and not (tmp_path / "cache").exists()
    assert cli_main(["explain", "--dataset", str(SAMPLE), "--layout", "plain", "--model", "vgg-shapes", "--size",
                     str(SIZE), "--out", str(out), "--cache", str(tmp_path / "cache"), "--concepts",
                     "features.12,layer9"]) == 2
    assert "error: concepts: unknown layer 'layer9'" in capsys.readouterr().err and not out.exists()
    with pytest.raises(ConfigError, match=r"command line: unknown key 'concepts.colour'"):
        _config(tmp_path, artifact_cache, concepts={"layers": ["features.12"], "colour": "blue"})
    with pytest.raises(ConfigError, match=r"concepts.maps_layer must be one of concepts.layers \(features.12\)"):
        _config(tmp_path, artifact_cache, concepts={"layers": ["features.12"], "maps_layer": "features.8"})
    with pytest.raises(ConfigError, match=r"concepts.relmax must be an integer >= 1, got 0"):
        _config(tmp_path, artifact_cache, concepts={"layers": ["features.12"], "relmax": 0})
    off = load_config({"dataset": str(SAMPLE)})
    assert not off.concepts.enabled and "concepts" not in off.identity()  # off by default; old runs still match
    assert _config(tmp_path, artifact_cache).identity()["concepts"]["maps_layer"] == "features.12"


def test_concept_relevance_of_a_layer_is_the_same_with_or_without_maps_below_it():
    """The relevance recorded at a layer is what arrives there, whatever the rules below do with it (a rule that
    divided its incoming relevance in place once changed the recorded copy of a gamma layer)."""
    from export.concepts import ConceptOutputs, ConceptRequest

    lrp = LRPModel(make_tiny_vgg(), "epsilon_gamma_box")
    x, target = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)), torch.tensor([-1, 0, 1])
    with_maps = ConceptOutputs(lrp, ConceptRequest(("features.8", "features.3"), None, 2))(x, target)
    without = ConceptOutputs(lrp, ConceptRequest(("features.8", "features.3"), None, 0))(x, target)
    reference = lrp.concept_relevance(x, target, ["features.8", "features.3"])
    for i, layer in enumerate(("features.8", "features.3")):
        torch.testing.assert_close(with_maps[2 + i], reference[layer])
        torch.testing.assert_close(without[2 + i], reference[layer])
