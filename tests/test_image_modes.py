"""Issue 19 (10, 12, 15): pixel modes without a defined range are failure rows, 16-bit images are scaled by 65535;
images whose resize would explode (extreme aspect ratio) and huge headers are failure rows, on the Pillow and the
device decode paths alike; `--device cuda` without CUDA and an oversized `--size` are one line, exit 2."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.config import MAX_SIZE, ConfigError, load_config
from pipeline.datasets.records import ImageRecord
from pipeline.errors import RunError
from pipeline.gpu_decode import DeviceDecoder
from pipeline.preprocess import MAX_ASPECT_RATIO, DecodeError, Preprocessing, decode, preprocess, transform
from pipeline.shard_runner import plan_actors

from .bad_inputs import bomb_png, encode, reference_rgb
from .test_output_safety import _args, _cli

pytestmark = pytest.mark.timeout(300)
PREP = Preprocessing.for_size(32)
GREY = (np.arange(12 * 16).reshape(12, 16) * 1.3).astype(np.uint8)  # 0 .. 248, a ramp


def tiff(array: np.ndarray) -> bytes:
    return encode(Image.fromarray(array), "TIFF")


def pgm16(array: np.ndarray, maxval: int) -> bytes:
    """A binary 16-bit PGM (Pillow opens it in mode I, scaled to 0..65535 for maxval below 65535)."""
    h, w = array.shape
    return b"P5\n%d %d\n%d\n" % (w, h, maxval) + array.astype(">u2").tobytes()


SIXTEEN_BIT = {  # name -> (file, the mode Pillow opens it in)
    "I;16 tiff": (tiff(GREY.astype(np.uint16) * 257), "I;16"),
    "I;16B tiff": (tiff((GREY.astype(np.uint16) * 257).astype(">u2")), "I;16B"),
    "I;16 png": (encode(Image.fromarray(GREY.astype(np.uint16) * 257), "PNG"), "I;16"),
    "I pgm 65535": (pgm16(GREY.astype(np.uint16) * 257, 65535), "I"),
}
UNSUPPORTED = {  # name -> (file, mode, the start of the failure reason)
    "F tiff": (tiff(GREY.astype(np.float32) / 255.0), "F", "unsupported pixel mode F (32-bit float)"),
    "F tiff 0-255": (tiff(GREY.astype(np.float32)), "F", "unsupported pixel mode F (32-bit float)"),
    "I tiff": (tiff(GREY.astype(np.int32) * 16843009), "I", "unsupported pixel mode I (32-bit integer)"),
    "I tiff small values": (tiff(GREY.astype(np.int32)), "I", "unsupported pixel mode I (32-bit integer)"),
}


def _mode(data: bytes) -> str:
    return Image.open(io.BytesIO(data)).mode


@pytest.mark.parametrize("name", sorted(SIXTEEN_BIT))
def test_sixteen_bit_images_are_scaled_by_65535(name):
    """Each 16-bit variant decodes to the 8-bit picture it was made from (v * 257 -> v), neither black nor
    saturated: the range of the type, as for 16-bit PNGs."""
    data, mode = SIXTEEN_BIT[name]
    assert _mode(data) == mode  # the test really covers that mode
    decoded = np.asarray(decode(data))
    assert decoded.shape == (*GREY.shape, 3)
    np.testing.assert_array_equal(decoded[..., 0], GREY)
    assert (decoded[..., 0] == decoded[..., 2]).all()


def test_pgm_with_a_smaller_maxval_uses_its_range():
    """A 12-bit PGM (maxval 4095): Pillow scales it to 0..65535, so its white is white."""
    twelve = (GREY.astype(np.uint32) * 4095 // 255).astype(np.uint16)
    decoded = np.asarray(decode(pgm16(twelve, 4095)))[..., 0]
    assert decoded.max() == GREY.max() and np.abs(decoded.astype(int) - GREY).max() <= 1


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_modes_without_a_defined_range_are_failures(name):
    """32-bit float and integer images have no range to scale by: a failure naming the mode, never a black or
    saturated picture explained as if it were the image."""
    data, mode, reason = UNSUPPORTED[name]
    assert _mode(data) == mode
    with pytest.raises(DecodeError) as error:
        decode(data)
    assert str(error.value).startswith(reason) and "\n" not in str(error.value)


@pytest.mark.parametrize("width,height", [(4000, 1), (1, 4000), (MAX_ASPECT_RATIO * 3 + 1, 3)])
def test_extreme_aspect_ratio_is_refused_before_the_resize(width, height):
    """A 4000x1 image would be resized to 37 x 148,000 here (256 x 1,024,000 at 224 px) before the crop: refused."""
    image = Image.fromarray(np.full((height, width, 3), 128, np.uint8))
    with pytest.raises(DecodeError, match=rf"^aspect ratio too extreme: {width}:{height} \(limit "
                                          rf"{MAX_ASPECT_RATIO}:1\)"):
        preprocess(image, (), PREP)


@pytest.mark.parametrize("width,height", [(MAX_ASPECT_RATIO, 1), (1, MAX_ASPECT_RATIO), (1, 1), (500, 375)])
def test_aspect_ratio_up_to_the_limit_is_explained_unchanged(width, height):
    """At the limit and below, the same transforms as always: bit-identical to torchvision's Resize + CenterCrop."""
    rng = np.random.default_rng(width + height)
    pixels = torch.from_numpy(rng.integers(0, 255, (3, height, width), dtype=np.uint8))
    tensor, _ = transform(pixels, (), PREP)
    expected = PREP.transforms()(pixels.clone())
    assert tensor.shape == (3, 32, 32) and torch.equal(tensor, expected.as_subclass(torch.Tensor))


def test_device_path_gives_the_same_aspect_ratio_failure(tmp_path):
    """The device decoder (run here on the CPU) refuses a wide JPEG with the Pillow path's own reason."""
    wide_size = 8 * (MAX_ASPECT_RATIO + 1)
    files = {"wide": encode(Image.fromarray(np.full((8, wide_size, 3), 90, np.uint8)), "JPEG"),
             "good": encode(Image.fromarray(reference_rgb(0)), "JPEG", quality=95)}
    records = []
    for name, data in files.items():
        (tmp_path / f"{name}.jpg").write_bytes(data)
        records.append(ImageRecord(image_id=name, path=str(tmp_path / f"{name}.jpg")))
    decoder = DeviceDecoder(PREP, "cpu", batch_size=2)
    try:
        items = list(decoder.iterate(records, lambda at, record: AssertionError("no fallback expected")))
    finally:
        decoder.close()
    assert decoder.routed["device"] == 2
    assert isinstance(items[0], DecodeError) and str(items[0]).startswith(
        f"aspect ratio too extreme: {wide_size}:8 (limit {MAX_ASPECT_RATIO}:1)"), items[0]
    assert isinstance(items[1], tuple) and items[1][0].shape == (3, 32, 32)


def test_extreme_aspect_ratio_is_refused_from_the_header():
    """decode refuses a 60000x1 PNG before decoding it (the same reason as the resize check)."""
    wide = encode(Image.fromarray(np.zeros((1, 60000), np.uint8)), "PNG")
    with pytest.raises(DecodeError, match=r"^aspect ratio too extreme: 60000:1 "):
        decode(wide)


def test_huge_header_is_a_failure_not_a_crash():
    """20000 x 20000 pixels declared in a few bytes: refused from the header (Pillow's limit), one line."""
    with pytest.raises(DecodeError, match=r"^decompression bomb: 400000000 pixels > limit"):
        decode(bomb_png())


@pytest.fixture
def mixed_dataset(tmp_path) -> Path:
    """A plain folder: an 8-bit PNG, the same picture as a 16-bit TIFF and PGM, float and int32 TIFFs, a wide PNG."""
    root = tmp_path / "images"
    root.mkdir()
    picture = reference_rgb(1)[..., 1]  # a grey ramp with detail
    Image.fromarray(picture).save(root / "grey8.png")
    (root / "grey16.tif").write_bytes(tiff(picture.astype(np.uint16) * 257))
    (root / "grey16.pgm").write_bytes(pgm16(picture.astype(np.uint16) * 257, 65535))
    (root / "float.tif").write_bytes(tiff(picture.astype(np.float32) / 255.0))
    (root / "int32.tif").write_bytes(tiff(picture.astype(np.int32) * 16843009))
    Image.fromarray(np.full((1, 4000, 3), 200, np.uint8)).save(root / "wide.png")
    return root


def test_explain_scales_sixteen_bit_and_lists_the_rest(mixed_dataset, tmp_path, artifact_cache, local_ray, capsys):
    """End to end: 16-bit files give the 8-bit file's prediction and map statistics; float, int32 and
    the 4000x1 image are failure rows with their reasons, and the run goes on (exit 1)."""
    out = tmp_path / "run"
    assert _cli(_args(mixed_dataset, out, artifact_cache)) == 1
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("3 explained, 3 failed: "), summary
    failures = pd.read_parquet(out / "failures.parquet").set_index("image_id").reason.to_dict()
    assert failures.keys() == {"float", "int32", "wide"}
    assert failures["float"].startswith("unsupported pixel mode F (32-bit float)")
    assert failures["int32"].startswith("unsupported pixel mode I (32-bit integer)")
    assert failures["wide"].startswith(f"aspect ratio too extreme: 4000:1 (limit {MAX_ASPECT_RATIO}:1)")
    stats = pd.read_parquet(out / "stats")
    stats["key"] = stats.path.map(lambda p: Path(p).name)
    stats = stats.set_index("key")
    reference = stats.loc["grey8.png"]
    for name in ("grey16.tif", "grey16.pgm"):  # the same pixels; a batch of another size rounds differently
        assert stats.loc[name, "pred"] == reference["pred"], name
        for column in ("pred_logit", "relevance_sum", "max_abs"):
            assert stats.loc[name, column] == pytest.approx(reference[column], rel=1e-4), (name, column)


def test_device_cuda_without_cuda_is_one_line_before_any_work(tmp_path, artifact_cache, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    root = tmp_path / "images"
    root.mkdir()
    Image.fromarray(reference_rgb(0)).save(root / "a.png")
    out, cache = tmp_path / "run", tmp_path / "cache"
    code = _cli(_args(root, out, cache, "--device", "cuda"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "device cuda" in err and "CUDA is not available" in err, err
    assert not out.exists() and not cache.exists()  # before any work: no artifact built, nothing written


def test_device_cuda_on_a_cluster_without_gpus_is_refused():
    """With RAY_ADDRESS the driver may have no GPU itself: the cluster's GPUs decide, never a silent CPU run."""
    class Cluster:
        @staticmethod
        def cluster_resources():
            return {"CPU": 8.0}

    with pytest.raises(RunError, match="device cuda: the Ray cluster has no GPU"):
        plan_actors(Cluster, load_config({"device": "cuda", "model": "vgg11", "weights": "random"}))
    assert plan_actors(Cluster, load_config({"device": "auto", "model": "vgg11", "weights": "random"})).device == "cpu"


@pytest.mark.parametrize("size", [MAX_SIZE + 1, 100000])
def test_size_has_an_upper_bound(size):
    with pytest.raises(ConfigError) as error:
        load_config({"size": size, "model": "vgg11", "weights": "random"})
    message = str(error.value)
    assert "size" in message and f"at most {MAX_SIZE}" in message and "\n" not in message


def test_size_at_the_bound_is_accepted():
    assert load_config({"size": MAX_SIZE, "model": "vgg11", "weights": "random"}).size == MAX_SIZE


def test_size_bound_on_the_command_line_is_one_line(capsys, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    assert _cli(["explain", "--dataset", str(root), "--size", "100000", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "size must be at most" in err, err
