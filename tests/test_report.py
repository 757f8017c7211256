"""The report on synthetic runs (the pipeline's real file layout and schema): which images the galleries pick,
the colour map's symmetry, file names that cannot escape the report folder, runs without labels / boxes / image
files, with failures and faithfulness columns, the heatmaps command and the one-line errors."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from bench.synthetic_run import stats_table, synthesise_run
from pipeline.cli import main as cli_main
from pipeline.datasets import load_records
from pipeline.preprocess import load
from pipeline.report import build_report, selection, write_heatmaps
from pipeline.report import heatmap as hm
from pipeline.report.files import safe_name
from pipeline.report.tiles import display_crop, preprocessing_for

pytestmark = pytest.mark.timeout(120)
SIZE = 32
SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[str]:
    """A few JPEGs of different shapes (the crop must come out SIZE x SIZE whatever the aspect)."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(60, 40), (40, 70), (50, 50)]):
        path = root / f"p{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _run(tmp_path, photos, n=40, classes=4, **options) -> Path:
    failures = options.pop("failures", 0)
    table = stats_table(n, classes, photos, size=SIZE, shard_size=16, **options)
    return synthesise_run(tmp_path / "run", table, size=SIZE, shard_size=16, failures=failures)


def _section_ids(index: Path, anchor: str) -> list[str]:
    """Image ids of the tiles in one section, in page order."""
    page = index.read_text()
    body = page.split(f'<section id="{anchor}">', 1)[1].split("</section>", 1)[0]
    return re.findall(r"<figure>.*?<b>(.*?)</b>", body)


def _assert_links_resolve(index: Path) -> None:
    page = index.read_text()
    sources = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert sources
    for source in sources:
        if source.startswith("#"):
            assert f'id="{source[1:]}"' in page, source
        else:
            assert not re.match(r"^[a-z]+:|^/", source), f"not a relative link: {source}"
            assert (index.parent / source).is_file(), source


# --- selection -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stats(photos) -> pd.DataFrame:
    return stats_table(300, 7, photos, seed=3).to_pandas()


def test_most_confident_errors_are_the_most_probable_wrong_predictions(stats):
    picked = selection.most_confident_errors(stats, 10)
    wrong = stats[stats.correct.eq(False)]
    assert len(picked) == 10 and picked.correct.eq(False).all()
    assert picked.pred_probability.is_monotonic_decreasing
    rest = wrong[~wrong.image_id.isin(picked.image_id)]
    assert picked.pred_probability.min() >= rest.pred_probability.max()


def test_least_confident_correct_are_the_least_probable_right_predictions(stats):
    picked = selection.least_confident_correct(stats, 10)
    right = stats[stats.correct.eq(True)]
    assert len(picked) == 10 and picked.correct.eq(True).all()
    assert picked.pred_probability.is_monotonic_increasing
    rest = right[~right.image_id.isin(picked.image_id)]
    assert picked.pred_probability.max() <= rest.pred_probability.min()


@pytest.mark.parametrize("by_label", [True, False])
def test_per_class_sample_takes_n_per_class_deterministically(stats, by_label):
    column = "label" if by_label else "pred"
    picked = selection.per_class_sample(stats, 3, by_label)
    counts = stats[column].value_counts()
    assert picked[column].value_counts().to_dict() == {c: min(3, k) for c, k in counts.items()}
    shuffled = stats.sample(frac=1.0, random_state=1)  # shard order must not change the draw
    again = selection.per_class_sample(shuffled, 3, by_label)
    assert sorted(picked.image_id) == sorted(again.image_id)
    other_seed = selection.per_class_sample(stats, 3, by_label, seed=1)
    assert sorted(other_seed.image_id) != sorted(picked.image_id)


# --- colour map ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cmap", sorted(hm.COLOUR_MAPS))
def test_colour_map_is_centred_on_zero_and_symmetric(cmap):
    table = hm.lookup_table(cmap)
    centre = table[hm.CENTRE]
    assert (hm.heatmap(np.zeros((4, 5)), cmap) == centre).all()
    assert (hm.heatmap(np.full((3, 3), np.nan), cmap) == centre).all()
    relevance = np.random.default_rng(0).normal(size=(16, 16)).astype(np.float32)
    indices = hm.colour_indices(hm.normalise(relevance))
    assert (hm.colour_indices(hm.normalise(-relevance)) == 2 * hm.CENTRE - indices).all()
    assert (hm.heatmap(relevance * 123.0, cmap) == hm.heatmap(relevance, cmap)).all()  # each map to its own max
    peak = np.unravel_index(np.abs(relevance).argmax(), relevance.shape)
    end = table[-1] if relevance[peak] > 0 else table[0]
    assert (hm.heatmap(relevance, cmap)[peak] == end).all()
    zero_pixel = relevance.copy()
    zero_pixel[0, 0] = 0.0
    assert (hm.heatmap(zero_pixel, cmap)[0, 0] == centre).all()


@pytest.mark.parametrize("cmap", sorted(hm.COLOUR_MAPS))
def test_palette_png_has_the_heat_map_colours(cmap, tmp_path):
    relevance = np.random.default_rng(1).normal(size=(20, 24)).astype(np.float32)
    hm.heatmap_image(relevance, cmap).save(tmp_path / "map.png")
    assert (np.asarray(Image.open(tmp_path / "map.png").convert("RGB")) == hm.heatmap(relevance, cmap)).all()


def test_zennit_like_anchor_colours():
    assert hm.lookup_table("coldnhot")[hm.CENTRE].tolist() == [0, 0, 0]
    assert hm.lookup_table("coldnhot")[-1].tolist() == [255, 255, 255]
    assert hm.lookup_table("coldnhot")[0].tolist() == [0, 255, 255]
    bwr = hm.lookup_table("bwr")
    assert bwr[hm.CENTRE].tolist() == [255, 255, 255]
    assert (bwr[::-1] == bwr[:, ::-1]).all()  # blue and red mirror each other


def test_overlay_keeps_the_image_where_relevance_is_zero():
    image = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    relevance = np.zeros((8, 8), np.float32)
    relevance[0, 0] = 1.0
    blended = hm.overlay(image, relevance)
    grey = np.rint(image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))
    assert np.abs(blended[1:, 1:].astype(float) - grey[1:, 1:, None]).max() <= 1
    assert not (blended[0, 0] == grey[0, 0]).all()


# --- pictures line up with the maps, and stay inside the report folder ------------------------------------------


def test_tile_image_is_the_crop_the_model_saw():
    record = next(r for r in load_records(SAMPLE))
    preprocessing = preprocessing_for(SIZE)
    crop = display_crop(record.path, preprocessing)
    x, _ = load(record, preprocessing)
    mean, std = torch.tensor(preprocessing.mean)[:, None, None], torch.tensor(preprocessing.std)[:, None, None]
    seen = ((x * std + mean) * 255).permute(1, 2, 0).numpy()
    assert crop.shape == (SIZE, SIZE, 3) and np.abs(crop - seen).max() < 0.01


@pytest.mark.parametrize("image_id", ["../../escaped", "/etc/passwd", "..", "a/../../b", "x\0y", "<b>&'\""])
def test_safe_names_stay_in_the_folder(image_id, tmp_path):
    name = safe_name(image_id)
    assert re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", name) and (tmp_path / name).resolve().parent == tmp_path
    assert safe_name(image_id + "x") != name


def test_hostile_image_ids_cannot_write_outside_the_report(tmp_path, photos):
    table = stats_table(6, 2, photos, size=SIZE, shard_size=16)
    hostile = ["../../escaped", "../x", "<script>alert(1)</script>", "a/b", ".hidden", "ok"]
    table = table.set_column(0, "image_id", [hostile])
    run = synthesise_run(tmp_path / "run", table, size=SIZE, shard_size=16)
    before = {p for p in tmp_path.rglob("*")}
    index = build_report(run, per_class=3)
    new = {p for p in tmp_path.rglob("*")} - before
    assert new and all(p.is_relative_to(run / "report") for p in new)
    page = index.read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    _assert_links_resolve(index)
    written = write_heatmaps(run, ["../../escaped"], out=tmp_path / "maps")
    assert written and all(p.parent == (tmp_path / "maps").resolve() for p in written)


# --- whole reports -----------------------------------------------------------------------------------------------


def test_report_with_labels_boxes_failures_and_faithfulness(tmp_path, photos):
    run = _run(tmp_path, photos, boxes=True, failures=3, faithfulness=True)
    index = build_report(run, gallery=5, per_class=2)
    page = index.read_text()
    stats = pd.read_parquet(run / "stats")
    assert _section_ids(index, "errors") == selection.most_confident_errors(stats, 5).image_id.tolist()
    assert _section_ids(index, "uncertain") == selection.least_confident_correct(stats, 5).image_id.tolist()
    assert sorted(_section_ids(index, "classes")) == sorted(selection.per_class_sample(stats, 2, True).image_id)
    for text in ("accuracy", "pointing game", "relevance mass in box", "AOPC MoRF", "AOPC (mean)", "broken0",
                 "not an image", "RANDOM weights", "conservation (median)", "of the start relevance reaches the input"):
        assert text in page, text
    assert (index.parent / "img" / "curves.png").is_file()
    assert (index.parent / "img" / "hist-aopc_morf.png").is_file()
    per_class = page.split('<section id="per-class">', 1)[1].split("</section>", 1)[0]
    assert per_class.count("<tr>") == 1 + stats.label.nunique()  # heading + one row per class
    _assert_links_resolve(index)
    tiles = list((index.parent / "img").glob("*-heatmap.png"))
    assert tiles and all(Image.open(t).size == (SIZE, SIZE) for t in tiles)


def test_report_without_labels_or_boxes(tmp_path, photos):
    run = _run(tmp_path, photos, labelled=False)
    index = build_report(run, gallery=4, per_class=1, out=tmp_path / "elsewhere")
    page = index.read_text()
    assert index == tmp_path / "elsewhere" / "index.html"
    assert "Most confident predictions" in page and "Most confident errors" not in page
    assert "no labels" in page and "pointing game" not in page and "AOPC" not in page
    stats = pd.read_parquet(run / "stats")
    assert _section_ids(index, "confident") == selection.most_confident(stats, 4).image_id.tolist()
    assert len(_section_ids(index, "classes")) == stats.pred.nunique()
    _assert_links_resolve(index)


def test_missing_image_files_give_heat_maps_only(tmp_path):
    run = _run(tmp_path, ["/nowhere/moved.jpg"], n=10)
    index = build_report(run, gallery=3)
    page = index.read_text()
    assert "image files not found" in page and "heat map only" in page
    assert list((index.parent / "img").glob("*-heatmap.png")) and not list((index.parent / "img").glob("*.jpg"))
    _assert_links_resolve(index)


def test_report_of_a_run_whose_images_all_failed(tmp_path):
    run = _run(tmp_path, ["/nowhere/x.jpg"], n=0, failures=2)
    index = build_report(run)
    page = index.read_text()
    assert "broken1" in page and "0 explained, 2 failed" in page and "None in this run." in page
    _assert_links_resolve(index)


def test_rebuilding_replaces_the_previous_pictures(tmp_path, photos):
    run = _run(tmp_path, photos)
    build_report(run, gallery=8, per_class=3)
    many = len(list((run / "report" / "img").iterdir()))
    build_report(run, gallery=1, per_class=0)
    assert len(list((run / "report" / "img").iterdir())) < many


# --- commands ----------------------------------------------------------------------------------------------------


def test_heatmaps_command_writes_the_requested_pngs(tmp_path, photos, capsys):
    run = _run(tmp_path, photos)
    assert cli_main(["heatmaps", str(run), "--ids", "img0000003,img0000007", "--cmap", "bwr"]) == 0
    written = sorted(p.name for p in (run / "heatmaps").iterdir())
    for image_id in ("img0000003", "img0000007"):
        stem = safe_name(image_id)
        assert {f"{stem}-heatmap.png", f"{stem}-image.png", f"{stem}-overlay.png"} <= set(written)
    assert len(written) == 6
    assert Image.open(run / "heatmaps" / f"{safe_name('img0000003')}-heatmap.png").size == (SIZE, SIZE)


def test_report_command(tmp_path, photos):
    run = _run(tmp_path, photos)
    assert cli_main(["report", str(run), "--gallery", "2", "--per-class", "1"]) == 0
    assert (run / "report" / "index.html").is_file()


@pytest.mark.parametrize("argv, culprit", [
    (["report", "{tmp}/missing"], "missing: no such run directory"),
    (["report", "{tmp}"], "not a run directory"),
    (["report", "{run}", "--gallery", "-1"], "--gallery must be >= 0"),
    (["heatmaps", "{run}", "--ids", "img0000001,nope,also-nope"], "unknown image id(s)"),
    (["heatmaps", "{run}", "--ids", ","], "no image ids given"),
    (["heatmaps", "{tmp}/missing", "--ids", "a"], "no such run directory"),
])
def test_bad_input_is_one_line_error(tmp_path, photos, capsys, argv, culprit):
    run = _run(tmp_path, photos, n=8)
    argv = [a.format(tmp=tmp_path, run=run) for a in argv]
    assert cli_main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith("error: ") and culprit in error
    assert not (run / "heatmaps").exists() and not (run / "report").exists()


def test_a_report_that_cannot_be_written_is_one_line_error(tmp_path, photos, capsys, monkeypatch):
    """The disk fills while index.html is written: one line naming the file, exit code 2, no traceback."""
    from lrp_module.files import OutputError
    from pipeline.report import build

    def full_disk(path, text):
        raise OutputError(f"cannot write {path}: no space left on device")

    run = _run(tmp_path, photos, n=8)
    monkeypatch.setattr(build, "write_text_atomic", full_disk)
    assert cli_main(["report", str(run), "--gallery", "1"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"error: cannot write {run / 'report' / 'index.html'}: no space left on device"


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_report_refuses_a_folder_it_did_not_write_and_changes_nothing(tmp_path, photos, capsys):
    """Issue 19.1: --out pointed at a website folder (its own index.html and img/ tree): one line, exit 2, every file
    as it was; a report folder a user added a file to is refused the same way."""
    run = _run(tmp_path, photos, n=8)
    site = tmp_path / "site"
    (site / "img" / "team").mkdir(parents=True)
    (site / "index.html").write_text("<p>my page</p>")
    (site / "img" / "team" / "bob.jpg").write_bytes(b"bob")
    (site / "img" / "logo.png").write_bytes(b"logo")
    before = _tree(site)
    assert cli_main(["report", str(run), "--out", str(site), "--gallery", "1"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith(f"error: {site}: holds files the report did not write")
    assert _tree(site) == before
    ours = tmp_path / "ours"
    assert cli_main(["report", str(run), "--out", str(ours), "--gallery", "1"]) == 0
    (ours / "notes.txt").write_text("mine")
    assert cli_main(["report", str(run), "--out", str(ours), "--gallery", "1"]) == 2
    assert "notes.txt" in capsys.readouterr().err and (ours / "notes.txt").read_text() == "mine"


def test_a_failed_rebuild_leaves_the_previous_report_whole(tmp_path, photos, capsys, monkeypatch):
    """Issue 19.1: the disk fills half-way through a rebuild (after the tiles): one line, exit 2, and the previous
    index.html with every picture it links to, unchanged; no half-built folder left. A folder a killed build left
    beside it is swept by the next build."""
    import errno

    from pipeline.report import build

    run = _run(tmp_path, photos)
    report = run / "report"
    assert cli_main(["report", str(run), "--out", str(report), "--gallery", "3"]) == 0
    before = _tree(report)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(build, "write_plots", full_disk)
        assert cli_main(["report", str(run), "--gallery", "1"]) == 2
    assert capsys.readouterr().err.strip() == f"error: cannot write the report {report}: no space left on device"
    assert _tree(report) == before
    _assert_links_resolve(report / "index.html")
    killed = run / ".tmp-999999999-report"
    (killed / "img").mkdir(parents=True)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".tmp-")) == [killed.name]
    assert cli_main(["report", str(run), "--gallery", "1"]) == 0
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")]
    _assert_links_resolve(report / "index.html")


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, photos, tmpfs, capsys):
    """Issue 19.1: a real 64 KiB disk fills while the report is written: one line, exit 2, no traceback."""
    run = _run(tmp_path, photos)
    out = tmpfs / "report"
    assert cli_main(["report", str(run), "--out", str(out), "--gallery", "12", "--per-class", "5"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"error: cannot write the report {out}: no space left on device" or (
        "\n" not in error and error.startswith("error: cannot write ") and "no space left on device" in error)
    assert not list(tmpfs.iterdir())


def test_report_on_an_unfinished_run_says_so_and_counts_what_exists(tmp_path, photos):
    """11.12: no manifest (the run was stopped or is still running): the top of the page says the run is
    incomplete, the title comes from run.json, and the counts are those of the finished shards."""
    import json

    run = _run(tmp_path, photos, n=20, failures=2)
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").unlink()
    (run / "failures.parquet").unlink()
    (run / "run.json").write_text(json.dumps({"digest": "x", "identity": {
        "root": "/data/val", "model": manifest["config"]["model"], "composite": "epsilon_plus_flat"}}))
    page = build_report(run, gallery=3).read_text()
    top = page.split('<section id="summary">', 1)[0]
    assert "incomplete" in top.lower() and "?" not in page.split("<title>", 1)[1].split("</title>", 1)[0]
    assert "epsilon_plus_flat" in top
    assert "20 explained, 2 failed so far" in page


def test_pointing_game_reads_as_a_rate(tmp_path, photos):
    run = _run(tmp_path, photos, boxes=True)
    page = build_report(run, gallery=2).read_text()
    stats = pd.read_parquet(run / "stats")
    hits, boxed = int(stats.pointing_game_hit.sum()), int(stats.pointing_game_hit.notna().sum())
    assert f"{100 * hits / boxed:.3g} % ({hits} of {boxed} images with boxes)" in page


def test_histograms_have_integer_counts_and_tick_labels_that_do_not_overlap(tmp_path):
    from pipeline.report.plots import histogram_figure

    stats = pd.DataFrame({"seconds": [1e-4 * (1 + i % 3) for i in range(6)] + [123456.7],
                          "gini": np.linspace(0.2, 0.9, 7), "correct": [True, False] * 3 + [None]})
    for column in ("seconds", "gini"):
        figure = histogram_figure(stats, column, split_by_correct=True)
        axes = figure.axes[0]
        figure.canvas.draw()
        assert all(float(t).is_integer() for t in axes.get_yticks()), axes.get_yticks()
        boxes = [label.get_window_extent() for label in axes.get_xticklabels() if label.get_text()]
        assert boxes and all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:])), \
            [label.get_text() for label in axes.get_xticklabels()]


def test_tiles_draw_the_box_where_the_image_has_one(tmp_path):
    from pipeline.report.tiles import render

    photo = tmp_path / "grey.png"
    Image.new("RGB", (SIZE, SIZE), (128, 128, 128)).save(photo)
    relevance = np.zeros((SIZE, SIZE), np.float32)
    files = render("a", str(photo), relevance, tmp_path, "coldnhot", photo_format="png", boxes=[(4.0, 6.0, 20.0, 24.0)])
    image = np.asarray(Image.open(tmp_path / files.image))
    assert (image[6, 4:20] != 128).any(axis=-1).all() and (image[15, 12] == 128).all()  # an outline, not a fill
    plain = render("b", str(photo), relevance, tmp_path, "coldnhot", photo_format="png")
    assert (np.asarray(Image.open(tmp_path / plain.image)) == 128).all()


@pytest.mark.parametrize("lowest,flagged", [(0.9999991, False), (0.9871, True)])
def test_summary_shows_the_precision_probe_and_flags_low_correlation(tmp_path, photos, lowest, flagged):
    import json

    run = _run(tmp_path, photos, n=8)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["precision"] = {"reference": "float64-cpu", "images": 8, "device": "cuda (NVIDIA H200)",
                             "dtype": "float32", "tf32": True, "cudnn_benchmark": False, "cudnn_deterministic": False,
                             "onednn": None, "max_relative_error": {"max": 2.5e-3, "median": 4e-4},
                             "correlation": {"min": lowest, "median": 0.99999}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    page = build_report(run, gallery=2).read_text()
    assert "precision (float64 probe)" in page and "max relative error 0.0025 (median 0.0004)" in page
    assert f"correlation min {lowest:.6f}" in page and "cuda (NVIDIA H200), float32, TF32" in page
    assert ("LOW CORRELATION" in page) is flagged
