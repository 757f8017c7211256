"""The model parameter randomisation test (pipeline/sanity): Quantus 0.6.0's randomisation and measures (parity
with Quantus run in its own environment on the same maps), the cascade's behaviour, the run-level command's
bad settings (one line, nothing written) and its table."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from lrp_module.zoo import build_model
from pipeline.cli import main
from pipeline.sanity.measures import discrete_entropy, prepared, spearman, ssim, top_k_intersection
from pipeline.sanity.mprt import MapSet, SanityParams, explain, mprt
from pipeline.sanity.randomise import randomisable, randomised, randomised_models, steps
from pipeline.sanity.run import SanityError, SanityOptions, sanity
from pipeline.sanity.schema import SANITY_SCHEMA

ROOT = Path(__file__).resolve().parent.parent
QUANTUS_PYTHON = ROOT / ".venv-quantus" / "bin" / "python"
COMPOSITE = "epsilon_gamma_box"


@pytest.fixture(scope="module")
def shapes_model() -> torch.nn.Module:
    return build_model("vgg-shapes", "demo")[0]


def _inputs(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 of a model's state dict (as tests/tools/quantus_mprt_child.py computes it)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_randomisation_follows_quantus(shapes_model):
    """Every module with reset_parameters (batch norms too), top first; a layer's draw depends on the seed and its
    shape alone (so cascading's last model is eMPRT's fully random one); the original and the caller's generator
    are untouched."""
    layers = randomisable(shapes_model)
    assert layers[0] == "features.0" and layers[1] == "features.1" and layers[-1] == "classifier.6"
    cascading = list(steps(layers, "cascading"))
    assert [s[1] for s in cascading] == layers[::-1] and cascading[-1][2] == tuple(layers[::-1])
    assert [s[2] for s in steps(layers, "independent")] == [(name,) for name in layers[::-1]]
    before = fingerprint(shapes_model)
    state = torch.random.get_rng_state()
    both = randomised(shapes_model, ["classifier.6", "features.0"], seed=7)
    one = randomised(shapes_model, ["features.0"], seed=7)
    assert torch.equal(both.features[0].weight, one.features[0].weight)
    assert not torch.equal(one.features[0].weight, shapes_model.features[0].weight)
    assert torch.equal(one.classifier[6].weight, shapes_model.classifier[6].weight)
    assert fingerprint(shapes_model) == before and torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(8)
    shapes_model_copy = randomised(shapes_model, (), 0)
    shapes_model_copy.features[0].reset_parameters()
    assert torch.equal(shapes_model_copy.features[0].weight, one.features[0].weight)


@pytest.mark.parametrize("mode", ["cascading", "independent"])
def test_models_made_in_place_are_the_defined_ones(shapes_model, mode):
    """The working copy changed step by step holds, at every step, exactly randomised(model, that step's layers)."""
    layers = randomisable(shapes_model)
    for _, _, random_layers, model in randomised_models(shapes_model, layers, mode, seed=3):
        assert fingerprint(model) == fingerprint(randomised(shapes_model, random_layers, seed=3))


def test_measures_of_identical_and_unrelated_maps():
    """A map against itself: every similarity 1; against an independent random map: near 0 (Spearman, top-k at
    chance k / pixels), and the measures see the order of values only where they should (Spearman ignores scale)."""
    rng = np.random.default_rng(0)
    a = rng.random((3, 32, 32))
    assert np.allclose(spearman(a, a), 1) and np.allclose(ssim(a, a), 1)
    assert np.allclose(top_k_intersection(a, a, 50), 1)
    b = rng.random((3, 32, 32))
    assert np.all(np.abs(spearman(a, b)) < 0.1) and np.all(top_k_intersection(a, b, 512) < 0.65)
    assert np.allclose(spearman(a, 3 * a ** 3), 1) and not np.allclose(ssim(prepared(a), prepared(a ** 3)), 1)


def test_cascade_starts_at_one_and_falls(shapes_model):
    """Step 0 is the original model (every similarity 1, eMPRT 0); the first cascading step is the first independent
    one (the same model); once every layer is random, the maps share less with the original's than after the top
    layer alone."""
    x, targets = _inputs(), torch.tensor([0, 1, 2, 3])
    table = mprt(shapes_model, COMPOSITE, 0.0, x, targets, SanityParams(batch_size=4))
    original = table[table.step == 0]
    assert np.allclose(original[["spearman_abs", "spearman", "ssim", "top_k_intersection"]], 1)
    assert np.allclose(original["emprt"], 0)
    first = table[table.step == 1].set_index(["mode", "index"])
    assert np.allclose(first.loc["cascading"][["spearman_abs", "ssim"]], first.loc["independent"][["spearman_abs",
                                                                                                    "ssim"]])
    cascade = table[table["mode"] == "cascading"].groupby("step")["spearman_abs"].mean()
    assert cascade.iloc[-1] < cascade.iloc[1] < 1
    assert len(table) == 2 * (len(randomisable(shapes_model)) + 1) * len(x)


def _compared(original: MapSet, other: MapSet, params: SanityParams) -> dict[str, np.ndarray]:
    """Each image's measures by their definitions in measures.py, straight from the two sets of maps."""
    a, b = prepared(original.maps), prepared(other.maps)
    h0, h = (discrete_entropy(m.maps, params.entropy_bins) for m in (original, other))
    with np.errstate(invalid="ignore", divide="ignore"):
        emprt = (h - h0) / h0
    return {"pred": other.pred, "spearman_abs": spearman(a, b), "spearman": spearman(original.maps, other.maps),
            "ssim": ssim(a, b, params.ssim), "top_k_intersection": top_k_intersection(a, b, params.intersection_k),
            "entropy": h, "emprt": emprt}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_table_equals_the_definition(shapes_model, dtype):
    """mprt (one engine per working copy refreshed at each step, each batch's forward below the randomised layers
    taken from the original model's, the sample in batches) gives exactly the definition's table: every step's model
    made by `randomised`, explained by an LRPModel built for it (`explain`), compared."""
    x, targets = _inputs(3), torch.tensor([0, 1, 2])
    params = SanityParams(batch_size=2)
    table = mprt(shapes_model, COMPOSITE, 0.0, x, targets, params, dtype=dtype)
    layers = randomisable(shapes_model)

    def maps(random_layers):
        return explain(randomised(shapes_model, random_layers, params.seed), COMPOSITE, 0.0, x, targets,
                       params.batch_size, torch.device("cpu"), dtype)

    original = maps(())
    for mode in params.modes:
        for step, layer, random_layers in [(0, "original", ()), *steps(layers, mode)]:
            expected = _compared(original, maps(random_layers), params)
            rows = table[(table["mode"] == mode) & (table.step == step)].sort_values("index")
            assert (rows["layer"] == layer).all() and len(rows) == len(x)
            for name, values in expected.items():
                np.testing.assert_array_equal(rows[name].to_numpy(), values, err_msg=f"{mode} {step} {name}")


@pytest.mark.skipif(not QUANTUS_PYTHON.exists(), reason="Quantus 0.6.0's environment: make .venv-quantus")
@pytest.mark.timeout(600)
def test_equals_quantus_mprt_and_emprt(shapes_model, tmp_path):
    """On the demo model, float64 maps of ours for every model Quantus randomises (found by their weights' hash):
    Quantus's MPRT (cascading top-down and independent; Spearman of |maps|, of signed maps, SSIM of the flattened
    maps), EfficientMPRT, TopKIntersection, and scikit-image's 2-D SSIM equal our table to 1e-6 relative (batch size
    1 in Quantus: it normalises by the largest |value| of each batch, we by each map's)."""
    x, targets = _inputs(), torch.tensor([0, 5, 2, 3])
    layers = randomisable(shapes_model)
    maps = {}
    models = [()] + [s[2] for mode in ("cascading", "independent") for s in steps(layers, mode)]
    for random_layers in models:
        model = randomised(shapes_model, random_layers, 42)
        key = fingerprint(model)
        if key not in maps:
            maps[key] = explain(model, COMPOSITE, 0.0, x, targets, 4, torch.device("cpu"), torch.float64).maps
    k = 300
    np.savez(tmp_path / "job.npz", x=x.numpy(), y=targets.numpy(), k=np.array(k),
             **{f"fp_{key}": value for key, value in maps.items()})
    torch.save(shapes_model, tmp_path / "model.pt")
    child = subprocess.run([str(QUANTUS_PYTHON), str(ROOT / "tests/tools/quantus_mprt_child.py"),
                            str(tmp_path / "job.npz"), str(tmp_path / "model.pt"), str(tmp_path / "out.json"),
                            sysconfig.get_paths()["purelib"]], capture_output=True, text=True, timeout=540)
    assert child.returncode == 0, child.stderr[-3000:]
    theirs = json.loads((tmp_path / "out.json").read_text())

    flat = mprt(shapes_model, COMPOSITE, 0.0, x, targets, SanityParams(ssim="flat", intersection_k=k, batch_size=4),
                dtype=torch.float64)
    image = mprt(shapes_model, COMPOSITE, 0.0, x, targets, SanityParams(modes=("cascading",), intersection_k=k,
                                                                       batch_size=4), dtype=torch.float64)

    def ours(table: pd.DataFrame, mode: str, column: str) -> dict[str, list[float]]:
        rows = table[table["mode"] == mode].sort_values(["step", "index"])
        return {layer: group[column].tolist() for layer, group in rows.groupby("layer", sort=False)}

    def same(mine: dict, reference: dict) -> None:
        reference = {("original" if name == "original" else name): v for name, v in reference.items()}
        assert set(mine) == set(reference)
        for layer in mine:
            np.testing.assert_allclose(mine[layer], reference[layer], rtol=1e-6, atol=1e-12, err_msg=layer)

    same(ours(flat, "cascading", "spearman_abs"), theirs["spearman_abs"])
    same(ours(flat, "cascading", "spearman"), theirs["spearman"])
    same(ours(flat, "cascading", "ssim"), theirs["ssim_flat"])
    same(ours(flat, "independent", "spearman_abs"), theirs["independent_spearman_abs"])
    without_original = {n: v for n, v in ours(image, "cascading", "top_k_intersection").items() if n != "original"}
    same(without_original, theirs["top_k_intersection"])
    same({n: v for n, v in ours(image, "cascading", "ssim").items() if n != "original"}, theirs["ssim_image"])
    last = flat[(flat["mode"] == "cascading") & (flat.step == len(layers))].sort_values("index")
    np.testing.assert_allclose(last["emprt"], theirs["emprt"], rtol=1e-6)
    assert theirs["emprt_layers"] == ["orig", layers[-1]]  # Quantus's bottom-up order ends at the top layer


# ----------------------------------------------------------------------------------------- the command on a run
def _fake_run(root: Path, images: int = 3, size: int = 64) -> Path:
    """A finished run as `sanity` reads it: statistics (image, path, target, shard, row) and a manifest naming the
    demo model; the images are small generated pictures."""
    (root / "stats").mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(images):
        path = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    table = pa.table({"image_id": [f"img{i}" for i in range(images)], "path": paths, "target": list(range(images)),
                      "shard": ["relevance/shard-00000.h5"] * images, "row": list(range(images))})
    pq.write_table(table, root / "stats" / "shard-00000.parquet")
    manifest = {"config": {"model": "vgg-shapes", "composite": COMPOSITE, "top_k": 0.0, "size": size},
                "weights": {"kind": "demo"}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.mark.parametrize("argv, culprit", [
    (["--images", "0"], "--images must be at least 1, got 0"),
    (["--images", "4"], "explained only 3 images"),
    (["--images", "2", "--modes", "sideways"], "unknown mode sideways"),
    (["--images", "2", "--ssim", "3d"], "unknown SSIM variant"),
    (["--images", "2", "--intersection-k", "5000"], "exceeds the map's 4096 pixels"),
])
def test_bad_settings_are_one_line_before_any_work(tmp_path, capsys, argv, culprit):
    run = _fake_run(tmp_path / "run")
    assert main(["sanity", str(run), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert culprit in err and len(err.splitlines()) == 1
    assert not (run / "sanity.parquet").exists()


def test_writes_the_table_for_a_sample_of_the_run(tmp_path, capsys):
    """`sanity RUN --images 2`: a seeded sample of the run's images, its table in RunLayout's file with the declared
    columns, every image and step once per mode, the run's targets kept."""
    run = _fake_run(tmp_path / "run")
    assert main(["sanity", str(run), "--images", "2", "--modes", "cascading", "--no-progress"]) == 0
    assert "2 images, 13 layers randomised" in capsys.readouterr().out
    table = pq.read_table(run / "sanity.parquet")
    assert table.schema.names == SANITY_SCHEMA.names
    frame = table.to_pandas()
    assert len(frame) == 2 * 14 and set(frame["mode"]) == {"cascading"}
    assert (frame.groupby("image_id")["target"].first() == frame.groupby("image_id")["row"].first()).all()
    with pytest.raises(SanityError, match="explained only 3"):
        sanity(run, SanityOptions(images=9))


def _sanity_table() -> pd.DataFrame:
    rows = [{"image_id": f"i{i}", "mode": mode, "step": step, "layer": layer, "spearman_abs": value + i / 10,
             "spearman": value, "ssim": value, "top_k_intersection": value, "emprt": 1 - value}
            for mode in ("cascading", "independent") for step, layer, value in ((0, "original", 1.0),
                                                                                 (1, "classifier.6", 0.5))
            for i in range(2)]
    return pd.DataFrame(rows)


def test_the_report_has_the_section_exactly_when_the_run_has_the_test(tmp_path):
    """`make report` on a run without sanity.parquet: no Sanity check section; with it: the section, its plot."""
    from bench.synthetic_run import stats_table, synthesise_run
    from pipeline.report import build_report
    table = stats_table(8, 2, [str(tmp_path / "gone.png")], size=32, shard_size=8)
    run = synthesise_run(tmp_path / "run", table, size=32, shard_size=8)
    assert 'id="sanity"' not in build_report(run).read_text()
    _sanity_table().to_parquet(run / "sanity.parquet")
    index = build_report(run)
    assert 'id="sanity"' in index.read_text() and (index.parent / "img" / "sanity-cascade.png").is_file()


def test_report_section_draws_the_cascade(tmp_path):
    """The report's section: the cascade plot written beside it and linked, the means per layer in the table
    (a layer's mean is the mean over its images)."""
    from pipeline.report.sanity import PLOT_FILE, means, section
    table = _sanity_table()
    page = section(table, tmp_path, "img/")
    assert (tmp_path / PLOT_FILE).stat().st_size > 0 and f'src="img/{PLOT_FILE}"' in page
    assert 'id="sanity"' in page and "classifier.6" in page
    summary = means(table)
    assert np.allclose(summary["spearman_abs"], [1.05, 0.55, 1.05, 0.55]) and (summary["images"] == 2).all()
