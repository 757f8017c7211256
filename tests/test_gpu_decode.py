"""The device decode path run on the CPU (torchvision's decode_jpeg on CPU tensors, the same code the GPU runs):
routing sends CMYK, PNG, EXIF-rotated, progressive, truncated and corrupt files to Pillow; what it decodes
itself equals the Pillow path's crops and boxes (measured: 0 levels apart on the CPU, both are libjpeg-turbo);
the shard worker with it writes exactly what it writes without it."""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline import gpu_decode
from pipeline.datasets.records import ImageRecord
from pipeline.gpu_decode import DeviceDecoder, route
from pipeline.preprocess import DecodeError, Preprocessing, load

from .bad_inputs import encode, sample_files
from .helpers import worker_settings

pytestmark = pytest.mark.timeout(120)
PREP = Preprocessing(resize=73, crop=64)


def imagenet_like(seed: int, size: tuple[int, int] = (500, 375), **options) -> bytes:
    """A photograph-sized JPEG with detail (4:2:0 unless told): what the device decoder mostly sees."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    pixels = np.clip(np.asarray(base).astype(int) + rng.integers(-25, 25, (size[1], size[0], 3)), 0, 255)
    return encode(Image.fromarray(pixels.astype(np.uint8)), "JPEG", **{"quality": 80, **options})


def files() -> dict[str, bytes]:
    chosen = {k: v for k, v in sample_files().items() if k != "unreadable"}  # permissions: test_bad_inputs
    chosen["progressive"] = imagenet_like(1, progressive=True)
    chosen["photo"], chosen["photo_444"] = imagenet_like(2), imagenet_like(3, subsampling=0)
    chosen["portrait"] = imagenet_like(4, (333, 500))
    # scan data cut but an end marker: libjpeg-turbo (Pillow's and torchvision's) decodes it with a warning
    chosen["trailing_garbage_truncated"] = chosen["photo"][:-4000] + b"\xff\xd9"
    return chosen


DEVICE = {"good", "good2", "grey", "photo", "photo_444", "portrait", "trailing_garbage_truncated"}
ROUTES = {"cmyk": "mode CMYK", "exif": "EXIF orientation", "progressive": "progressive JPEG",
          "truncated": "no JPEG end marker", "empty": "not a JPEG", "text": "not a JPEG", "alpha": "not a JPEG",
          "palette": "not a JPEG", "grey16": "not a JPEG", "rgb16": "not a JPEG", "one_pixel": "not a JPEG",
          "bomb": "not a JPEG"}


@pytest.mark.parametrize("name", sorted(files()))
def test_routing_sends_to_pillow_what_the_device_decoder_cannot_read_as_pillow_does(name):
    reason = route(files()[name])
    if name in DEVICE:
        assert reason is None
    else:
        assert reason is not None and reason.startswith(ROUTES[name]), reason


def test_a_jpeg_header_pillow_refuses_is_routed_to_pillow():
    huge = bytearray(files()["good"])
    at = huge.index(b"\xff\xc0") + 5  # baseline SOF0: height, width follow the precision byte
    huge[at:at + 4] = (60000).to_bytes(2, "big") * 2  # 3.6 gigapixels: a decompression bomb
    assert route(bytes(huge)).startswith("header: decompression bomb")


@pytest.fixture()
def records(tmp_path) -> list[ImageRecord]:
    out = []
    for i, (name, data) in enumerate(sorted(files().items())):
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(data)
        boxes = ((10.0, 20.0, 300.0, 200.0), (0.0, 0.0, 5.0, 5.0)) if i % 2 else ()
        out.append(ImageRecord(image_id=name, path=str(path), boxes=boxes))
    out.append(ImageRecord(image_id="gone", path=str(tmp_path / "gone.jpg")))
    out.append(ImageRecord(image_id="listed_bad", path=str(tmp_path / "x.jpg"), problem="outside the dataset root"))
    return out


def cpu_item(record: ImageRecord):
    """What the worker's Pillow path gives for a record (its _decode, without fault injection)."""
    if record.problem:
        return DecodeError(record.problem)
    try:
        return load(record, PREP)
    except DecodeError as error:
        return error


def _assert_same_items(got: list, expected: list, records: list[ImageRecord]) -> None:
    assert len(got) == len(expected) == len(records)
    for record, mine, theirs in zip(records, got, expected):
        if isinstance(theirs, Exception):
            assert isinstance(mine, Exception) and str(mine) == str(theirs), record.image_id
        else:
            assert isinstance(mine, tuple), (record.image_id, mine)
            assert mine[0].dtype == theirs[0].dtype and mine[0].shape == theirs[0].shape
            assert torch.equal(mine[0], theirs[0]), record.image_id  # same libjpeg-turbo, same transforms
            assert mine[1] == theirs[1], record.image_id  # boxes identical


@pytest.mark.parametrize("batch", [1, 3, 64])
def test_device_path_on_cpu_equals_the_pillow_path(records, batch):
    decoder = DeviceDecoder(PREP, "cpu", batch_size=batch, threads=2)
    got = list(decoder.iterate(records, lambda at, record: cpu_item(record)))
    _assert_same_items(got, [cpu_item(r) for r in records], records)
    assert decoder.routed["device"] == len(DEVICE)
    decoder.close()


def test_images_the_device_decoder_refuses_go_to_pillow(records, monkeypatch):
    real = gpu_decode.decode_jpeg
    photo = Path(next(r.path for r in records if r.image_id == "photo")).read_bytes()

    def refuse_the_photo(data, **kwargs):
        blobs = data if isinstance(data, list) else [data]
        if any(bytes(b.numpy()) == photo for b in blobs):
            raise RuntimeError("nvjpeg: unsupported")
        return real(data, **kwargs)

    monkeypatch.setattr(gpu_decode, "decode_jpeg", refuse_the_photo)
    decoder = DeviceDecoder(PREP, "cpu", batch_size=4)
    got = list(decoder.iterate(records, lambda at, record: cpu_item(record)))
    _assert_same_items(got, [cpu_item(r) for r in records], records)
    assert decoder.routed["device_refused"] == 1


def test_skipped_positions_never_reach_the_decoder(records):
    skip = {0: "crashed the worker 3 times", 3: "timed out 3 times"}
    seen = []

    def fallback(at, record):
        seen.append(at)
        return RuntimeError(skip[at]) if at in skip else cpu_item(record)

    got = list(DeviceDecoder(PREP, "cpu", batch_size=2).iterate(records, fallback, skip))
    assert [str(got[at]) for at in skip] == list(skip.values())
    assert set(skip) <= set(seen)


# ---- the shard worker with the device decoder (on the CPU) ------------------------------------------------
class TinyExplainer(torch.nn.Module):
    """Stands in for the traced LRP module: (logits, relevance) from the pixels, so maps show any input change."""

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = torch.cat([x.mean((2, 3)), x.amax((2, 3))], 1) * torch.arange(1.0, 7.0)
        return logits, x.sum(1) * logits.amax(1)[:, None, None]


def test_shard_worker_with_the_device_decoder_writes_what_it_writes_without(records, tmp_path):
    from pipeline.worker import ShardExplainer

    artifact = tmp_path / "tiny.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(TinyExplainer(), (torch.rand(2, 3, 64, 64), torch.tensor([-1, -1]))), artifact)
    settings = worker_settings(batch_size=3, size=64, map_dtype="float32", compression=0, decode_threads=2,
                               threads=1, device="cpu")
    outputs = {}
    for mode in ("pillow", "device"):
        out = tmp_path / mode
        for sub in ("relevance", "stats", "failures"):
            (out / sub).mkdir(parents=True)
        explainer = ShardExplainer(str(artifact), settings)
        assert explainer.device_decoder is None  # the CPU default: Pillow
        if mode == "device":
            explainer.device_decoder = DeviceDecoder(explainer.preprocessing, "cpu", 3)
        outputs[mode] = dataclasses.asdict(explainer.explain_shard(0, records, str(out)))
        if mode == "device":
            assert explainer.device_decoder.routed["device"] == len(DEVICE)
    assert outputs["pillow"]["explained"] == outputs["device"]["explained"] > len(DEVICE)
    assert outputs["pillow"]["reasons"] == outputs["device"]["reasons"]
    with h5py.File(tmp_path / "pillow/relevance/shard-00000.h5") as a, \
            h5py.File(tmp_path / "device/relevance/shard-00000.h5") as b:
        assert np.array_equal(a["relevance"][:], b["relevance"][:])
        assert list(a["image_id"][:]) == list(b["image_id"][:])
    for table in ("stats", "failures"):
        a = pq.read_table(tmp_path / f"pillow/{table}/shard-00000.parquet").drop_columns(
            ["seconds"] if table == "stats" else []).to_pandas()
        b = pq.read_table(tmp_path / f"device/{table}/shard-00000.parquet").drop_columns(
            ["seconds"] if table == "stats" else []).to_pandas()
        a, b = a.drop(columns=["path"]), b.drop(columns=["path"])
        assert a.equals(b), table
