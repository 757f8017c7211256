"""Concept reference images (`make concepts`) and the report's Concepts section on a tiny run of the shapes demo
(vgg-shapes, 64 px, 12 images, explained with concepts on): the conditional map is the full backward pass from the
image's class masked at the layer (equal to zennit's, and unlike zennit-crp's backward from the layer alone, which
cannot show a concept that speaks against the class: its issue #11), the crops are the image and map cut to the
receptive field of the RelMax neuron, the files are written where RunLayout says, bad input is one line and writes
nothing, and the report shows, per class, the concepts with the largest mean relevance."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from zennit import composites as zc
from zennit.attribution import Gradient

from bench.synthetic_run import stats_table, synthesise_run
from demo import shapes
from lrp_module import LRPModel
from lrp_module.receptive_field import crop, input_box
from pipeline.cli import main as cli_main
from pipeline.concepts import outputs
from pipeline.concepts import references as refs
from pipeline.concepts.run_concepts import open_concepts
from pipeline.config import load_config
from pipeline.layout import RunLayout
from pipeline.report import build_report
from pipeline.report import concept_pictures as pictures
from pipeline.run import explain

from .helpers import make_tiny_vgg

pytestmark = pytest.mark.timeout(180)
LAYER = "features.12"  # vgg-shapes: the fourth convolution, 32 channels, 8 x 8 at 64 px
DENSE = "classifier.0"  # a layer without space: its neuron is the whole image
COMPOSITE = "epsilon_plus_flat"
SIZE = shapes.IMAGE_SIZE
RELMAX_N = 4
SHARD_SIZE = 8


# ------------------------------------------------------------------------------------------------ the run
@pytest.fixture(scope="module")
def shape_images(tmp_path_factory) -> Path:
    return shapes.write_split(tmp_path_factory.mktemp("shapes") / "val", per_class=2)


@pytest.fixture(scope="module")
def concept_run(tmp_path_factory, shape_images, artifact_cache, local_ray) -> Path:
    """`make explain DATASET=shapes MODEL=vgg-shapes` with concepts at LAYER and at a dense layer (no space), on 12
    shapes: a finished run with concept outputs and its RelMax table."""
    out = tmp_path_factory.mktemp("runs") / "run"
    config = load_config({"dataset": "shapes", "model": "vgg-shapes", "composite": COMPOSITE, "out": str(out),
                          "cache": str(artifact_cache), "batch_size": 4, "shard_size": SHARD_SIZE,
                          "concepts": {"layers": [LAYER, DENSE], "maps": 0, "top": 3, "relmax": RELMAX_N}})
    config.root = str(shape_images)
    explain(config, progress=False)
    return out


# ------------------------------------------------------------------------------------------------ the map
def _zennit_masked(model, x, target, module, channel, start_at_layer: bool):
    """zennit 1.0.0's map with the relevance at `module`'s output kept in `channel` only: from the output (the
    class's logit) with the gradient masked there, or (zennit-crp's reference heat maps, start_layer) from the
    layer alone, its masked output as the start relevance."""
    mask = torch.zeros(1, module.out_channels, 1, 1, dtype=x.dtype)
    mask[0, channel] = 1
    composite = zc.EpsilonPlusFlat()
    with Gradient(model, composite) as attributor:
        if start_at_layer:
            captured = []
            handle = module.register_forward_hook(lambda module, inputs, output: captured.append(output) and None)
            x = x.clone().requires_grad_(True)
            model(x)
            handle.remove()
            (relevance,) = torch.autograd.grad(captured[0], x, captured[0] * mask)  # zennit: the gradient is R
            return relevance
        def masked(module, inputs, output):
            output.register_hook(lambda gradient: gradient * mask)

        handle = module.register_forward_hook(masked)
        try:
            logits = model(x)
            start = torch.zeros_like(logits)
            start[0, target] = logits[0, target]
            _, relevance = attributor(x.clone().requires_grad_(True), start)
        finally:
            handle.remove()
    return relevance


@pytest.mark.precision
def test_reference_map_is_the_full_backward_from_the_class_not_the_layer_alone():
    """float64: the reference map equals zennit's full backward pass masked at the layer (1e-9); its total has the
    sign of the concept's relevance for the class, which changes with the class. zennit-crp's reference map starts
    at the layer (issue #11): the same for every class and positive, so for a concept that speaks against the class
    it is inverted (negatively correlated with ours)."""
    model = make_tiny_vgg(num_classes=5).double()
    for relu in model.modules():
        if isinstance(relu, torch.nn.ReLU):
            relu.inplace = False  # the layer's output must stay its own (the hooks hold it)
    layer = "features.6"  # a 16-channel convolution, 8 x 8 at 32 px
    module = model.features[6]
    lrp = LRPModel(model, COMPOSITE)
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    concept = lrp.concept_relevance(x.repeat(5, 1, 1, 1), torch.arange(5), [layer])[layer]  # (class, channel)
    spread = concept.amax(0) * concept.amin(0)  # < 0: positive for one class and negative for another
    channel = int(spread.argmin())
    assert spread[channel] < 0, "no concept with opposite signs for two classes on this model"
    against, towards = int(concept[:, channel].argmin()), int(concept[:, channel].argmax())
    layer_only = _zennit_masked(model, x, None, module, channel, start_at_layer=True).sum(1)[0]
    for target in (against, towards):
        ours = refs.conditional_maps(lrp, x, [target], layer, [channel])[0]
        theirs = _zennit_masked(model, x, target, module, channel, start_at_layer=False).sum(1)[0]
        assert float((ours - theirs).abs().max() / theirs.abs().max()) <= 1e-9
        assert float(ours.sum()) * float(concept[target, channel]) > 0  # the concept's sign for this class
    assert float(concept[against, channel]) < 0 < float(layer_only.sum())  # zennit-crp's map: inverted
    ours_against = refs.conditional_maps(lrp, x, [against], layer, [channel])[0]
    assert float(torch.corrcoef(torch.stack([ours_against.flatten(), layer_only.flatten()]))[0, 1]) < 0


# ------------------------------------------------------------------------------------------------ references
def test_references_are_the_relmax_images_cut_to_the_neurons_receptive_field(concept_run):
    """Each channel's references are its RelMax rows in rank order (overall and per class); each picture is the
    run's crop of the image and the conditional map for the image's explained class, both cut to input_box of the
    RelMax neuron (the whole image for a layer without space)."""
    concepts = open_concepts(concept_run, refs.ConceptsError)
    lrp = refs.run_lrp(concepts.manifest, torch.float64)
    stats = concepts.stats.set_index("image_id")
    for layer, klass in ((LAYER, None), (LAYER, int(concepts.stats["target"].iloc[0])), (DENSE, None)):
        relmax = concepts.relmax[concepts.relmax["layer"] == layer]
        found = refs.references(concepts, lrp, layer, [0, 5], klass, n=3)
        for channel, shown in found.items():
            table = relmax[(relmax["channel"] == channel) & (relmax["class"].isna() if klass is None
                                                             else relmax["class"] == klass)].sort_values("rank")
            assert [r.image_id for r in shown] == table["image_id"].head(3).tolist() and shown
            for ref, neuron in zip(shown, table["neuron"]):
                top, left, bottom, right = ref.box
                assert ref.box == input_box(lrp, layer, int(neuron), (SIZE, SIZE))
                assert 0 <= top < bottom <= SIZE and 0 <= left < right <= SIZE
                assert (ref.box == (0, 0, SIZE, SIZE)) == (layer == DENSE)
                x, picture = refs.load_image(stats.loc[ref.image_id, "path"], None, SIZE)
                target = int(stats.loc[ref.image_id, "target"])
                assert ref.target == target
                full = lrp.concept_maps(x[None].double(), [target], [{layer: [channel]}])[0, 0].numpy()
                np.testing.assert_array_equal(ref.image, crop(picture.transpose(2, 0, 1), ref.box).transpose(1, 2, 0))
                assert ref.heatmap.dtype == np.float64
                np.testing.assert_allclose(ref.heatmap, crop(full, ref.box), rtol=0, atol=1e-9 * np.abs(full).max())


def test_make_concepts_writes_each_reference_and_a_grid_per_channel(concept_run, tmp_path, capsys):
    layout = RunLayout(concept_run)
    assert cli_main(["concepts", str(concept_run), "--layer", LAYER, "--channels", "3,1", "--references", "2"]) == 0
    names = sorted(p.name for p in layout.concept_references.iterdir())
    stem = LAYER
    assert names == sorted([f"{stem}-c{c}-{kind}.png" for c in (1, 3) for kind in ("grid",)]
                           + [f"{stem}-c{c}-r{r}-{kind}.png" for c in (1, 3) for r in (0, 1)
                              for kind in ("image", "heatmap")])
    assert all(path.parent == layout.concept_references for path in layout.own_files()
               if path.name in names) and {p.name for p in layout.own_files()} >= set(names)
    grid = np.asarray(Image.open(layout.concept_references / f"{stem}-c1-grid.png"))
    assert grid.shape == (2 * pictures.GRID_TILE + 2, 2 * (pictures.GRID_TILE + 2), 3)
    # default: the most relevant channels by mean concept relevance over the run (per class with --class)
    concepts = open_concepts(concept_run, refs.ConceptsError)
    mean = concepts.relevance(LAYER).mean(0)
    assert refs.choose_channels(concepts, LAYER, None, None, 3) == np.argsort(-mean)[:3].tolist()
    out = tmp_path / "refs"
    klass = int(concepts.stats["target"].iloc[0])
    assert cli_main(["concepts", str(concept_run), "--layer", LAYER, "--class", str(klass), "--references", "1",
                     "--out", str(out)]) == 0
    grids = sorted(p.name for p in out.glob("*-grid.png"))
    assert len(grids) == refs.DEFAULT_CHANNELS and all(f"-k{klass}-" in name for name in grids)


@pytest.mark.parametrize("args,message", [
    (["--layer", "features.99"],
     r"unknown concept layer 'features.99': the run has concept data for features.12, classifier.0"),
    (["--layer", LAYER, "--channels", "2,32"], r"channel 32 is out of range: features.12 has 32 channels"),
    (["--layer", LAYER, "--channels", "a,b"], r"--channels must be comma-separated channel numbers"),
    (["--layer", LAYER, "--class", "99"], r"class 99: no image of the run was explained for it"),
])
def test_bad_input_is_one_line_and_writes_nothing(concept_run, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert cli_main(["concepts", str(concept_run), *args, "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and re.search(message, error), error
    assert not out.exists()


def test_a_run_without_concept_data_is_one_line(tmp_path, capsys):
    run = synthesise_run(tmp_path / "plain", stats_table(8, 2, ["/nowhere.jpg"], size=32, shard_size=8), size=32,
                         shard_size=8)
    assert cli_main(["concepts", str(run), "--layer", LAYER]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "has no concept outputs" in error
    assert not RunLayout(run).concept_references.exists()


# ------------------------------------------------------------------------------------------------ the report
def test_report_shows_each_classs_top_concepts_with_references_and_a_conditional_map(concept_run, tmp_path):
    index = build_report(concept_run, tmp_path / "report")
    page = index.read_text()
    body = page.split('<section id="concepts">', 1)[1].split("</section>", 1)[0]
    frame = pd.read_parquet(concept_run / "stats")
    with_relevance = []
    for shard, group in frame.groupby("shard"):
        with h5py.File(concept_run / shard) as handle:
            with_relevance.append(group.assign(_r=list(handle[outputs.relevance_name(LAYER)][group["row"].tolist()])))
    frame = pd.concat(with_relevance)
    for klass, group in frame.groupby("target"):
        mean = np.stack(group["_r"]).mean(0)
        top = np.argsort(-mean, kind="stable")[:3]
        shares = mean[top] / np.abs(mean).sum()
        cell = ", ".join(f"{c} ({s:.0%})" for c, s in zip(top, shares))
        assert f"<td>{klass}</td>" in body and cell in body, (klass, cell)
        for channel in top:  # every shown class (the run has fewer than CLASSES_SHOWN)
            stem = f"img/concept-{LAYER}-c{channel}-k{klass}"
            assert f'src="{stem}-grid.png"' in body and f'src="{stem}-example-heatmap.png"' in body
    assert f"<h3>{DENSE}</h3>" in body and f"concept-{DENSE}-" not in body  # its table; pictures: the maps layer's
    for source in re.findall(r'src="([^"]+)"', page):
        assert (index.parent / source).is_file(), source
    plain = tmp_path / "plain"
    shutil.copytree(concept_run, plain)
    RunLayout(plain).relmax.unlink()
    assert 'id="concepts"' not in build_report(plain).read_text()


def test_a_run_in_use_is_one_line(concept_run, tmp_path, capsys):
    """`concepts` holds the run's lock as report and spray do: refused while another process uses the run."""
    from .test_run_lock import _holder

    run = tmp_path / "run"
    shutil.copytree(concept_run, run)
    before = sorted(run.rglob("*"))
    with _holder(run, "spray") as holder:
        assert cli_main(["concepts", str(run), "--layer", LAYER, "--channels", "1"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"error: {run} is in use: spray by pid {holder.pid} ")
    assert [p for p in sorted(run.rglob("*")) if p.name != "run.lock"] == before  # nothing written (the killed
    # holder leaves its lock)
