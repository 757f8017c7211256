"""Bad inputs beside good ones (issue #5, item 1): every readable image is explained as the eye sees it, every
unreadable one is a failure row with a specific reason, the CLI prints "N explained, M failed: reasons" and
exits 1, and --strict stops at the first bad image without a _SUCCESS.

Permission denied, honestly: root reads a chmod-000 file anyway (CAP_DAC_OVERRIDE). Where the tests run as
root, the reading process is started under `setpriv` with CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH dropped, so
the kernel itself refuses the read (the CLI run and everything it starts, Ray's workers included)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageFile

from pipeline.cli import main as cli_main
from pipeline.datasets import load_records
from pipeline.datasets.records import ImageRecord
from pipeline.preprocess import DecodeError, Preprocessing, decode, load, preprocess, read_bytes

from .bad_inputs import (
    CASES,
    HEIGHT,
    INVALID_ID,
    WIDTH,
    alpha_png,
    grey16,
    make_imagefolder,
    make_imagenet_val,
    reference_rgb,
    rgb16,
    sample_files,
)

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.timeout(600)
SIZE = 32
REPO = Path(__file__).resolve().parent.parent
DROP_READ_OVERRIDE = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                      "--bounding-set=-dac_override,-dac_read_search"]


def unprivileged(command: list[str]) -> list[str]:
    """The command as a process the kernel refuses unreadable files to (already so unless we are root)."""
    if os.geteuid() != 0:
        return command
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot make a file unreadable")
    return DROP_READ_OVERRIDE + command


@pytest.fixture(scope="module")
def folder_dataset(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("bad-folder"))


@pytest.fixture(scope="module")
def val_dataset(tmp_path_factory):
    return make_imagenet_val(tmp_path_factory.mktemp("bad-val"), with_unreadable=False)


def _case_path(root: Path, name: str) -> Path:
    """The file of a case in the ImageFolder dataset (links included, dangling ones too)."""
    return next(folder / name for folder in root.iterdir() if os.path.lexists(folder / name))


def _decoded(data: bytes) -> np.ndarray:
    return np.asarray(decode(data)).astype(np.int32)


# ---- decoding: what each readable case becomes --------------------------------------------------------------

def test_loading_truncated_images_is_off():
    """Truncated files must fail; the project never sets Pillow's global switch that would pad them."""
    import pipeline.run
    import pipeline.worker  # noqa: F401

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_sixteen_bit_png_is_scaled_not_clipped():
    grey = _decoded(sample_files()["grey16"])
    np.testing.assert_array_equal(grey[..., 0], np.rint(grey16() / 257.0))  # 65535 -> 255, not 255 -> 255
    assert grey[..., 0].max() > 240 and len(np.unique(grey)) > 200
    colour = _decoded(sample_files()["rgb16"])
    assert np.abs(colour - np.rint(rgb16().astype(np.float64) / 257.0)).max() <= 1


def test_colour_modes_become_the_rgb_the_eye_sees():
    contents = sample_files()
    cmyk = _decoded(contents["cmyk"])
    assert np.abs(cmyk - reference_rgb(8)).mean() < 4  # converted back, not inverted or channel-swapped
    np.testing.assert_array_equal(_decoded(contents["palette"]),
                                  np.asarray(Image.fromarray(reference_rgb(6)).quantize(colors=16).convert("RGB")))
    grey = _decoded(contents["grey"])
    assert grey.shape == (HEIGHT, WIDTH, 3) and (grey[..., 0] == grey[..., 2]).all()
    alpha = _decoded(alpha_png())
    assert (alpha[:, : WIDTH // 2] == 255).all()  # transparent -> white
    np.testing.assert_array_equal(alpha[:, WIDTH // 2:], reference_rgb(5)[:, WIDTH // 2:])


def test_exif_orientation_is_applied():
    prep = Preprocessing.for_size(SIZE)
    rotated = decode(sample_files()["exif"])
    assert rotated.size == (WIDTH, HEIGHT)  # stored 30 wide, 40 high
    seen, _ = preprocess(rotated, (), prep)
    reference, _ = preprocess(Image.fromarray(reference_rgb(4)), (), prep)
    assert (seen - reference).abs().mean() < 0.05  # JPEG noise only
    mirrored, _ = preprocess(Image.fromarray(reference_rgb(4)[::-1].copy()), (), prep)
    assert (seen - mirrored).abs().mean() > 0.3  # a wrong orientation would be far off


def test_one_pixel_image_is_explainable():
    tensor, _ = preprocess(decode(sample_files()["one_pixel"]), (), Preprocessing(resize=37, crop=SIZE))
    assert tensor.shape == (3, SIZE, SIZE)
    assert torch.allclose(tensor, tensor[:, :1, :1].expand_as(tensor))  # the one colour everywhere


@pytest.mark.parametrize("case", [c for c in CASES if c.expected != "explained"
                                  and c.name not in ("unreadable", "outside")], ids=lambda c: c.name)
def test_unreadable_files_have_specific_reasons(folder_dataset, case):
    root, _ = folder_dataset
    path = _case_path(root, case.name + case.suffix)
    with pytest.raises(DecodeError) as error:
        decode(read_bytes(str(path)))
    assert str(error.value).startswith(case.expected)
    assert "\n" not in str(error.value) and "0x" not in str(error.value)  # one line, no object addresses


def test_image_just_over_the_pixel_limit_is_refused(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40 x 30 = 1200 pixels: over, but under twice
    with pytest.raises(DecodeError, match="decompression bomb: 1200 pixels > limit 1000"):
        decode(sample_files()["good"])


def test_permission_denied_is_reported(folder_dataset):
    root, _ = folder_dataset
    path = _case_path(root, "unreadable.JPEG")
    code = ("import sys; from pipeline.preprocess import read_bytes, DecodeError\n"
            "try: read_bytes(sys.argv[1])\nexcept DecodeError as e: print(e)")
    result = subprocess.run(unprivileged([sys.executable, "-c", code, str(path)]), capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120, check=False)
    assert result.stdout.strip() == "permission denied", result.stderr


# ---- listing: what label files and links can and cannot do -------------------------------------------------

def test_listing_flags_what_cannot_be_explained(val_dataset, folder_dataset):
    root, expected, ids = val_dataset
    records = {r.image_id: r for r in load_records(root)}
    assert set(records) == set(expected)
    for image_id, outcome in expected.items():
        problem = records[image_id].problem
        if outcome == "explained" or outcome.split(":")[0] in ("empty file", "truncated image", "not an image",
                                                                 "decompression bomb", "missing file"):
            assert problem is None, image_id  # known only once read
        else:
            assert problem is not None and problem.startswith(outcome), (image_id, problem)
    invalid = records[INVALID_ID]
    assert Path(invalid.path) == root / "LOC_val_solution.csv"  # an id is never turned into a path
    assert Path(records[ids["missing"]].path).parent == root
    folder = {r.image_id: r for r in load_records(folder_dataset[0])}
    assert folder["outside"].problem.startswith("outside the dataset root")


# ---- end to end --------------------------------------------------------------------------------------------

def _files_outside(base: Path, *allowed: Path) -> set[tuple[str, int]]:
    """Every path under base but the allowed ones, with files' modification times (folders only by name: the
    one holding OUT changes when OUT is made)."""
    return {(str(p), 0 if p.is_dir() and not p.is_symlink() else p.lstat().st_mtime_ns) for p in base.rglob("*")
            if not any(p == a or a in p.parents for a in allowed)}


def test_cli_explains_good_images_and_lists_bad_ones(folder_dataset, tmp_path, artifact_cache):
    """The CLI in a fresh process (its own Ray), unprivileged: every readable image explained, every bad one a
    failure with its reason, the summary line, exit code 1, nothing written outside OUT and the cache."""
    root, expected = folder_dataset
    out, cache = tmp_path / "run", artifact_cache
    before = _files_outside(root.parent.parent, out, cache)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    command = [sys.executable, "-m", "pipeline", "explain", "--dataset", str(root), "--model", "vgg11",
               "--weights", "random", "--size", str(SIZE), "--batch-size", "4", "--shard-size", "4",
               "--out", str(out), "--cache", str(cache), "--no-progress"]
    result = subprocess.run(unprivileged(command), capture_output=True, text=True, env=env, timeout=560, cwd=REPO,
                            check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    good = sorted(k for k, v in expected.items() if v == "explained")
    bad = {k: v for k, v in expected.items() if v != "explained"}
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"{len(good)} explained, {len(bad)} failed: ")
    for reason in ("empty file 1", "truncated image 1", "permission denied 1", "decompression bomb 1",
                   "missing file (deleted, or a dangling link) 1", "not an image (no known image format) 1"):
        assert reason in summary, summary
    stats = pd.read_parquet(out / "stats")
    assert sorted(stats.image_id) == good
    failures = pd.read_parquet(out / "failures.parquet").set_index("image_id").reason.to_dict()
    assert set(failures) == set(bad)
    for image_id, reason in bad.items():
        assert failures[image_id].startswith(reason), (image_id, failures[image_id])
    assert (out / "_SUCCESS").exists() and not list(out.rglob(".tmp-*"))
    assert _files_outside(root.parent.parent, out, cache) == before  # nothing written anywhere else


def test_label_file_cases_end_to_end(val_dataset, tmp_path, artifact_cache, local_ray, capsys):
    """The validation layout's label rows: an unknown wnid, a missing image and an id that is a path are
    failure rows, nothing outside the root is opened, and the summary counts them."""
    root, expected, _ = val_dataset
    out, cache = tmp_path / "run", artifact_cache
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = cli_main(["explain", "--dataset", str(root), "--model", "vgg11", "--weights", "random", "--size",
                         str(SIZE), "--batch-size", "4", "--shard-size", "4", "--out", str(out), "--cache",
                         str(cache), "--no-progress"])
    assert code == 1
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    good = [k for k, v in expected.items() if v == "explained"]
    assert summary.startswith(f"{len(good)} explained, {len(expected) - len(good)} failed: ")
    for reason in ("unknown wnid in LOC_val_solution.csv 1", "missing image 1", "outside the dataset root 1",
                   "invalid image id in LOC_val_solution.csv 1"):
        assert reason in summary, summary
    failures = pd.read_parquet(out / "failures.parquet").set_index("image_id").reason.to_dict()
    for image_id, reason in expected.items():
        if reason != "explained":
            assert failures[image_id].startswith(reason), (image_id, failures[image_id])
    stats = pd.read_parquet(out / "stats")
    assert sorted(stats.image_id) == sorted(good) and stats.label.notna().all()


def test_strict_stops_at_the_first_bad_image(tmp_path, artifact_cache, local_ray, capsys):
    """--strict: the worker returns at the first failed image of its shard (nothing of that shard written), the
    driver raises at once (no later shard started), exit code 1, no _SUCCESS."""
    contents = sample_files()
    root = tmp_path / "data" / "n01440764"
    root.mkdir(parents=True)
    names = ["a0", "a1", "a2", "a3", "b4-empty", "b5", "c6-text", "c7", "c8"]  # shards of 3: bad first in shard 1
    for name in names:
        data = b"" if "empty" in name else contents["text"] if "text" in name else contents["good"]
        (root / f"{name}.JPEG").write_bytes(data)
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = cli_main(["explain", "--dataset", str(root.parent), "--model", "vgg11", "--weights", "random",
                         "--size", str(SIZE), "--batch-size", "2", "--shard-size", "3", "--out", str(out),
                         "--cache", str(artifact_cache), "--no-progress", "--strict", "--actors", "1"])
    err = capsys.readouterr().err
    assert code == 1
    assert f"--strict: image b4-empty ({root / 'b4-empty.JPEG'}) could not be explained: empty file" in err
    assert not (out / "_SUCCESS").exists() and not (out / "manifest.json").exists()
    for sub in ("stats", "failures", "relevance"):  # shard 0 finished; shard 1 stopped, shard 2 never started
        assert sorted(p.name.split(".")[0] for p in (out / sub).iterdir()) == ["shard-00000"], sub
    assert not list(out.rglob(".tmp-*"))
    # without --strict the same run goes on and finishes, both bad images listed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = cli_main(["explain", "--dataset", str(root.parent), "--model", "vgg11", "--weights", "random",
                         "--size", str(SIZE), "--batch-size", "2", "--shard-size", "3", "--out", str(out),
                         "--cache", str(artifact_cache), "--no-progress", "--actors", "1"])
    assert code == 1 and capsys.readouterr().out.startswith("7 explained, 2 failed: empty file 1, not an image")
    assert (out / "_SUCCESS").exists()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_boxes_follow_the_exif_orientation(orientation, tmp_path):
    """Boxes are annotated on the stored pixels; the image is shown (and explained) as the eye sees it, so the boxes
    get the same orientation transform (issue 11.4): the box still frames the white rectangle it was drawn on."""
    stored = np.zeros((60, 90, 3), np.uint8)  # 90 wide, 60 high; a white rectangle off every symmetry axis
    stored[10:25, 50:80] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "oriented.png"
    Image.fromarray(stored).save(path, exif=exif.tobytes())
    record = ImageRecord("oriented", str(path), boxes=((50.0, 10.0, 80.0, 25.0),))
    tensor, boxes = load(record, Preprocessing(resize=64, crop=64))
    bright = (tensor.mean(0) > 0.5).nonzero()
    rows, cols = bright[:, 0], bright[:, 1]
    (x0, y0, x1, y1), = boxes
    assert abs(cols.min() - x0) <= 1.5 and abs(cols.max() + 1 - x1) <= 1.5
    assert abs(rows.min() - y0) <= 1.5 and abs(rows.max() + 1 - y1) <= 1.5
