"""Parity of pipeline/metrics with Quantus 0.6.0: on fixed images, maps and masks (64 of the shapes demo with
vgg-shapes, 4 of a random VGG16 at 224), each of our metrics equals Quantus's with the same parameters to 1e-6
relative, in float64. Quantus runs in its own venv (`make quantus-venv`: .venv-quantus, never imported here) in a
subprocess on arrays saved to .npz (tests/tools/quantus_reference.py), once per case (importing Quantus takes
seconds). The random VGG16 (2 images at 224: its float64 forward passes are slow on a CPU) checks the map
metrics; the model metrics run on vgg-shapes.

Random metrics: Quantus draws from NumPy's global generator; the test seeds it, draws the same numbers here
(legacy RandomState: choice(n, k, replace=False) is permutation(n)[:k]; Quantus's baseline helper also draws
one uniform per image at every perturbation, whatever the baseline) and passes them to ours, so values are
compared one to one. Differences, each explained in docs/metrics.md and tested here: Quantus normalises a batch by
its largest value (we pass per-image normalise_axes); ROAD 0.6.0 fails on 3-channel inputs with one-channel maps
(IndexError), so its imputation and protocol are compared instead; its region ranking's ties are unspecified
(the test's maps have none, checked)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from demo import shapes
from lrp_module import LRPModel
from lrp_module.weights_recipe import IMAGENET_MEAN, IMAGENET_STD
from lrp_module.zoo import build_model
from pipeline.metrics import maps
from pipeline.metrics import model as model_metrics
from pipeline.stats import box_mask, localisation

ROOT = Path(__file__).resolve().parent.parent
QUANTUS_PYTHON = ROOT / ".venv-quantus" / "bin" / "python"
CHILD = ROOT / "tests" / "tools" / "quantus_reference.py"
PER_IMAGE = {"normalise_func_kwargs": {"normalise_axes": [1, 2, 3]}}  # Quantus normalises per image, as we do
RTOL = 1e-6

pytestmark = pytest.mark.timeout(240)


def quantus_values(tmp_path: Path, arrays: dict, spec: list, model: torch.nn.Module | None = None) -> dict:
    """Quantus's values for `spec` on `arrays`, from the reference venv's Python."""
    if not QUANTUS_PYTHON.exists():
        pytest.skip(f"{QUANTUS_PYTHON} missing: `make quantus-venv` builds it (make test does)")
    np.savez(tmp_path / "in.npz", **arrays)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    command = [str(QUANTUS_PYTHON), str(CHILD), str(tmp_path / "in.npz"), str(tmp_path / "spec.json"),
               str(tmp_path / "out.npz")]
    if model is not None:
        example = torch.from_numpy(arrays["x"][:1])
        torch.jit.trace(model, example).save(str(tmp_path / "model.pt"))
        command.append(str(tmp_path / "model.pt"))
    done = subprocess.run(command, capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(np.load(tmp_path / "out.npz"))


def close(ours, theirs, what: str, rtol: float = RTOL) -> None:
    """Equal to rtol relative (of each value; of the array's scale for values near 0), NaN where Quantus's is."""
    ours, theirs = np.asarray(ours, dtype=float), np.asarray(theirs, dtype=float)
    scale = np.nanmax(np.abs(theirs)) if np.isfinite(theirs).any() else 1.0
    np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=rtol * 1e-3 * scale, equal_nan=True, err_msg=what)


def _normalised(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> ImageNet-normalised (N, 3, H, W) float32 values held in float64."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return ((x - mean) / std).float().double()


@pytest.fixture(scope="module")
def shapes_case():
    """64 generated validation shapes, their exact object masks, vgg-shapes (float64) and its LRP maps."""
    samples = [shapes.make_sample(shapes.VAL_SEED, i) for i in range(64)]
    x = _normalised(np.stack([s.image for s in samples]))
    net, _ = build_model("vgg-shapes", "demo", warn=False)
    net = net.double().eval()
    with torch.no_grad():
        y = net(x).argmax(1)
    relevance = LRPModel(net, "epsilon_gamma_box")(x, y).double()
    masks = torch.from_numpy(np.stack([s.mask for s in samples]))
    boxes = [[s.box] for s in samples]
    return {"x": x, "y": y, "a": relevance, "s": masks, "model": net, "boxes": boxes}


@pytest.fixture(scope="module")
def vgg16_case():
    """2 images of noise through a random VGG16 at 224, its LRP maps (float32: fixed data), boxes as masks."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 224, 224, generator=generator)
    net, _ = build_model("vgg16", "random", warn=False)
    with torch.no_grad():
        y = net(x).argmax(1)
    relevance = LRPModel(net, "epsilon_gamma_box")(x, y).double()
    boxes = [[(20 + 30 * i, 40, 120 + 20 * i, 180)] for i in range(2)]
    masks = torch.stack([box_mask(b, 224, 224) for b in boxes])
    return {"x": x.double(), "y": y, "a": relevance, "s": masks, "boxes": boxes}


def _arrays(case: dict) -> dict:
    return {"x": case["x"].numpy(), "y": case["y"].numpy(), "a": case["a"][:, None].numpy(),
            "s": case["s"][:, None].numpy().astype(float)}


MAP_SPEC = [
    {"name": "pointing", "metric": "PointingGame", "init": PER_IMAGE},
    {"name": "rank", "metric": "RelevanceRankAccuracy", "init": PER_IMAGE},
    {"name": "topk", "metric": "TopKIntersection", "init": {"k": 1000, **PER_IMAGE}},
    {"name": "topk_concept", "metric": "TopKIntersection", "init": {"k": 300, "concept_influence": True,
                                                                     **PER_IMAGE}},
    {"name": "localisation", "metric": "AttributionLocalisation", "init": PER_IMAGE},
    # Quantus applies `abs` (its default) before `positive_attributions`, which then changes nothing
    {"name": "localisation_pos", "metric": "AttributionLocalisation", "init": {"positive_attributions": True,
                                                                               "abs": False, **PER_IMAGE}},
    {"name": "sparseness", "metric": "Sparseness", "init": PER_IMAGE},
    {"name": "complexity", "metric": "Complexity", "init": PER_IMAGE},
    {"name": "effective", "metric": "EffectiveComplexity", "init": {"eps": 1e-3, **PER_IMAGE}},
]


def _ours_maps(a: torch.Tensor, s: torch.Tensor) -> dict:
    return {"pointing": maps.pointing_game(a, s), "rank": maps.relevance_rank_accuracy(a, s),
            "topk": maps.top_k_intersection(a, s, 1000),
            "topk_concept": maps.top_k_intersection(a, s, 300, concept_influence=True),
            "localisation": maps.attribution_localisation(a, s),
            "localisation_pos": maps.attribution_localisation(a, s, positive=True),
            "sparseness": maps.sparseness(a), "complexity": maps.complexity(a),
            "effective": maps.effective_complexity(a, 1e-3)}


def _subsets(seed: int, n: int, runs: int, features: int, size: int) -> torch.Tensor:
    """Quantus FaithfulnessCorrelation's draws from NumPy's global generator seeded `seed`: per run, per image,
    choice(features, size, replace=False); then its baseline helper's one uniform per image."""
    state = np.random.RandomState(seed)
    draws = np.empty((n, runs, size), dtype=np.int64)
    for run in range(runs):
        for image in range(n):
            draws[image, run] = state.permutation(features)[:size]
        state.uniform(size=n)
    return torch.from_numpy(draws)


CORRELATION_RUNS, REGION_STEPS, ROAD_IMAGES, PERCENTAGES = 10, 8, 8, (5, 40, 90)


def _random_logit_draws(y: torch.Tensor) -> torch.Tensor:
    """Quantus RandomLogit's other classes: seed 42, randint(0, classes - 1) into the classes but the target."""
    return model_metrics.other_classes(y, 6, torch.from_numpy(np.random.RandomState(42).randint(0, 6 - 1, len(y))))


@pytest.fixture(scope="module")
def shapes_quantus(shapes_case, tmp_path_factory):
    """Every Quantus value for the shapes case, from one subprocess."""
    x, y, a, net = (shapes_case[k] for k in ("x", "y", "a", "model"))
    box_masks = torch.stack([box_mask(b, 64, 64) for b in shapes_case["boxes"]])
    other = _random_logit_draws(y)
    other_a = LRPModel(net, "epsilon_gamma_box")(x, other).double()
    chosen = dict(model_metrics.road_pixels(a[:ROAD_IMAGES], PERCENTAGES))
    arrays = {**_arrays(shapes_case), "a_pos": a.clamp(min=0)[:, None].numpy(),
              "s_box": box_masks[:, None].numpy() * 1.0, "other_a": other_a[:, None].numpy(),
              "other_y": other.numpy()}
    spec = [*MAP_SPEC,
            {"name": "rma", "metric": "RelevanceMassAccuracy", "init": PER_IMAGE, "a": "a_pos", "s": "s_box"},
            {"name": "fc", "metric": "FaithfulnessCorrelation", "seed": 7,
             "init": {"nr_runs": CORRELATION_RUNS, "subset_size": 224, "return_aggregate": False, **PER_IMAGE}},
            *({"name": order, "metric": "RegionPerturbation",
               "init": {"patch_size": 8, "regions_evaluation": REGION_STEPS, "order": order, **PER_IMAGE}}
              for order in ("morf", "lerf")),
            {"name": "rl", "metric": "RandomLogit", "init": {"num_classes": 6, "seed": 42, **PER_IMAGE}},
            {"name": "imputed", "metric": "imputation", "noise": 0.0, "images": [0, 3, 5],
             "pixels": [chosen[p][i].tolist() for p, i in zip(range(3), [0, 3, 5])]},
            {"name": "road", "metric": "road", "noise": 0.01, "seed": 11,
             "pixels": [[chosen[p][i].tolist() for i in range(ROAD_IMAGES)] for p in range(3)]}]
    values = quantus_values(tmp_path_factory.mktemp("quantus-shapes"), arrays, spec, net)
    return {**values, "other": other, "other_a": other_a, "chosen": chosen}


@pytest.fixture(scope="module")
def vgg16_quantus(vgg16_case, tmp_path_factory):
    return quantus_values(tmp_path_factory.mktemp("quantus-vgg16"), _arrays(vgg16_case), MAP_SPEC)


@pytest.mark.parametrize("case_name", ["shapes_case", "vgg16_case"])
def test_localisation_and_complexity_equal_quantus(case_name, request):
    case = request.getfixturevalue(case_name)
    theirs = request.getfixturevalue(case_name.replace("case", "quantus"))
    ours = _ours_maps(case["a"], case["s"])
    for name, values in ours.items():
        close(values, theirs[name], f"{case_name} {name}")
    assert np.nanstd(theirs["rank"]) > 0 and np.nanstd(theirs["sparseness"]) > 0  # values that tell maps apart
    assert not np.allclose(theirs["localisation"], theirs["localisation_pos"])  # the positive part differs


def test_relevance_mass_in_box_is_quantus_mass_accuracy_of_the_positive_part(shapes_case, shapes_quantus):
    """`positive_in_box` (Arras et al.'s 'sum,pos') equals Quantus's RelevanceMassAccuracy on the map's positive
    part with the boxes as the mask (on the signed map Quantus's counts negative relevance too)."""
    ours = localisation(shapes_case["a"].float(), shapes_case["boxes"])["positive_in_box"]
    close(ours, shapes_quantus["rma"], "positive_in_box", rtol=1e-5)  # our column is float32


def test_pointing_game_tolerance_widens_the_mask():
    """A maximum 3 pixels from the mask misses at tolerance 0 (Quantus) and 2, hits at 3 and 15 (TorchRay)."""
    a = torch.zeros(1, 32, 32, dtype=torch.float64)
    a[0, 10, 13] = 1.0
    s = torch.zeros(1, 32, 32, dtype=torch.bool)
    s[0, 5:15, 0:11] = True  # the nearest mask pixel is (10, 10)
    assert [float(maps.pointing_game(a, s, t)[0]) for t in (0, 2, 3, 15)] == [0.0, 0.0, 1.0, 1.0]
    assert torch.isnan(maps.pointing_game(a, torch.zeros_like(s), 15)[0])


def test_gini_is_sparseness_without_its_epsilon(shapes_case):
    """The `gini` column is Quantus's Sparseness with eps 0 (Sparseness adds 1e-7 to the normalised map)."""
    from pipeline.stats import gini

    a = shapes_case["a"]
    close(gini(a), maps.sparseness(a, eps=0.0), "gini")
    assert not np.allclose(gini(a).numpy(), maps.sparseness(a).numpy(), rtol=1e-9, atol=0)


def test_faithfulness_correlation_equals_quantus(shapes_case, shapes_quantus):
    x, y, a, net = (shapes_case[k] for k in ("x", "y", "a", "model"))
    subsets = _subsets(7, len(x), CORRELATION_RUNS, x[0].numel(), 224)
    ours = model_metrics.faithfulness_correlation(net, x, a, y, subsets, batch_size=256)
    close(ours, shapes_quantus["fc"], "faithfulness correlation")


def test_region_perturbation_equals_quantus(shapes_case, shapes_quantus):
    x, y, a, net = (shapes_case[k] for k in ("x", "y", "a", "model"))
    _, region = model_metrics.region_ranking(a, 8, "morf")
    sums = torch.zeros(len(a), 64, dtype=torch.float64).index_add_(1, region.flatten(), a.flatten(1))
    assert all(len(set(row.tolist())) == row.numel() for row in sums)  # no ties: the order is defined
    for order in ("morf", "lerf"):
        ours = model_metrics.region_perturbation(net, x, a, y, patch=8, steps=REGION_STEPS, order=order,
                                                 batch_size=256)
        close(ours, shapes_quantus[order], f"region perturbation {order}")
    odd = model_metrics.region_ranking(a[:, :60, :62], 8, "morf")[1]  # centred padding: 2 + 60 + 2, 1 + 62 + 1
    assert odd[0, 0] == 0 and odd[5, 6] == 0 and odd[5, 7] == 1 and odd[6, 7] == 9 and odd[59, 61] == 63


def test_random_logit_equals_quantus(shapes_case, shapes_quantus):
    y, a = shapes_case["y"], shapes_case["a"]
    assert bool((shapes_quantus["other"] != y).all())
    close(model_metrics.random_logit(a, shapes_quantus["other_a"]), shapes_quantus["rl"], "random logit")


def test_road_imputation_and_protocol_equal_quantus(shapes_case, shapes_quantus):
    """Quantus 0.6.0's ROAD raises IndexError on 3-channel inputs with channel-summed maps (it ranks C*H*W
    features and indexes H*W pixels); its noisy linear imputation on our pixels (the p % most relevant, every
    channel) equals ours without noise, and with noise (its draws passed to ours) the accuracy curves are equal."""
    x, y, a = (shapes_case[k][:ROAD_IMAGES] for k in ("x", "y", "a"))
    net = shapes_case["model"]
    chosen = shapes_quantus["chosen"]
    ours = np.stack([model_metrics.linear_imputation(x[i].numpy(), chosen[p][i]) for p, i in zip(range(3), [0, 3, 5])])
    close(ours, shapes_quantus["imputed"], "noisy linear imputation (noise 0)")
    state = np.random.RandomState(11)
    noise = torch.zeros(len(x), 3, *x.shape[1:], dtype=torch.float64)
    for p in range(3):
        for i in range(len(x)):
            pixels = torch.from_numpy(chosen[p][i])
            noise[i, p].view(3, -1)[:, pixels] = torch.from_numpy(0.01 * state.randn(3, len(pixels)))
    ours_road = model_metrics.road(net, x, a, y, PERCENTAGES, noise=noise)
    np.testing.assert_array_equal(ours_road.numpy(), shapes_quantus["road"])
    assert 0 < shapes_quantus["road"].mean() < 1  # the curve tells images apart
