"""On a CUDA device: LRP is as close to the CPU float64 oracle as the CPU's own float32 is (within
`oracle.bound` of its distance) for every composite, the top-k filter (radix selection on CUDA) and the traced
module equal their CPU / eager counterparts, zennit agrees on the GPU too, the GPU decode path's crops are within a
few levels of Pillow's with identical boxes and routing, and the pipeline's shard worker (in process, no Ray)
writes maps as close to float64 with device="cuda" as on the CPU. Skipped without CUDA.

LRP_TEST_DEVICE=cpu runs the same checks on the CPU (float32 against float64): a dry run of the file's logic."""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import lrp_module as lrp
from lrp_module import topk
from lrp_module.oracle import Float64Oracle, bound
from lrp_module.topk import relevance_filter
from lrp_module.topk_select import kth_largest_radix
from lrp_module.weights_recipe import IMAGENET_HIGH, IMAGENET_LOW

from .bad_inputs import reference_rgb
from .helpers import make_vgg, relative_error, worker_settings

DEVICE = os.environ.get("LRP_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.timeout(240),
]


def cpu_bound(model, composite, x, target, reference, top_k=0.0) -> float:
    """The bound for the device: derived from the CPU's eager float32 distance to float64 on the same inputs."""
    cpu = lrp.LRPModel(model, composite, top_k=top_k).explain(x, target)[1]
    return bound(relative_error(cpu.double(), reference).max())


@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 would round matmul / convolution inputs to 10 bits: the comparisons below need real float32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("composite", sorted(lrp.COMPOSITES))
@pytest.mark.parametrize("arch,size", [("vgg11", (64, 64)), ("vgg16_bn", (64, 96))])
def test_device_float32_matches_cpu_float64(composite, arch, size):
    model = make_vgg(arch)
    torch.manual_seed(2)
    x = torch.randn(3, 3, *size)
    target = torch.tensor([1, -1, 7])
    ref_logits, reference = Float64Oracle(model, composite).explain(x, target)
    limit = cpu_bound(model, composite, x, target, reference)
    logits, ours = lrp.LRPModel(model, composite).to(DEVICE).explain(x.to(DEVICE), target.to(DEVICE))
    assert ours.device.type == DEVICE and ours.dtype == torch.float32
    torch.testing.assert_close(logits.cpu().double(), ref_logits, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(ours).all()
    error = relative_error(ours.cpu().double(), reference)
    assert (error <= limit).all(), f"{composite} {arch}: relative error per image {error.tolist()}, bound {limit:.1e}"


@pytest.mark.parametrize("top_k", [0.1, 0.02, 0.001])
@pytest.mark.parametrize("shape", [(4, 64, 56, 56), (3, 512, 14, 14), (2, 4096)])
def test_top_k_filter_on_device_equals_cpu(top_k, shape):
    torch.manual_seed(3)
    relevance = torch.randn(shape)
    relevance[0].clamp_(min=0)  # mostly exact zeros, as after arg-max pooling: the zero-counting path
    expected = relevance_filter(relevance, top_k)
    for traceable in (False, True):
        got = relevance_filter(relevance.to(DEVICE), top_k, traceable=traceable)
        assert got.device.type == DEVICE
        torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_radix_selection_on_device_equals_topk(dtype):
    """Adversarial rows (ties, zeros, -0.0, all negative, subnormals, infinities) at k from 1 to all."""
    from .test_topk_select import N, _adversarial

    rows = _adversarial(N, dtype)
    reference = torch.sort(rows.double(), dim=1, descending=True).values.to(dtype)
    on_device = rows.to(DEVICE)
    for k in (1, 2, 17, N // 10, N // 2, N):
        assert torch.equal(kth_largest_radix(on_device, k).cpu(), reference[:, k - 1:k]), k
    finite = rows[torch.isfinite(rows).all(1)].float()
    for top_k in (0.5, 0.1, 1e-4):
        torch.testing.assert_close(relevance_filter(finite.to(DEVICE), top_k).cpu(), relevance_filter(finite, top_k),
                                   rtol=0, atol=0)


@pytest.mark.skipif(DEVICE != "cuda", reason="the dispatch is by device: the CPU keeps the bracket")
def test_cuda_tensors_use_the_radix_selection(monkeypatch):
    def fail(*args):
        raise AssertionError("the bracket selection ran on a CUDA tensor")

    monkeypatch.setattr(topk, "kth_largest", fail)
    relevance = torch.randn(2, 64, 56, 56, device=DEVICE)
    kept = relevance_filter(relevance, 0.1)
    assert ((kept != 0).flatten(1).sum(1) == int(0.1 * 64 * 56 * 56)).all()


@pytest.mark.parametrize("composite", ["epsilon_gamma_box", "seed"])
def test_top_k_model_on_device_matches_cpu(composite):
    model = make_vgg("vgg11")
    torch.manual_seed(4)
    x = torch.randn(2, 3, 64, 64)
    reference = Float64Oracle(model, composite, top_k=0.1).explain(x)[1]
    limit = cpu_bound(model, composite, x, None, reference, top_k=0.1)
    ours = lrp.LRPModel(model, composite, top_k=0.1).to(DEVICE).explain(x.to(DEVICE))[1]
    error = relative_error(ours.cpu().double(), reference)
    assert (error <= limit).all(), f"relative error per image {error.tolist()}, bound {limit:.1e}"


def _zennit_composite(name: str, device: str):
    zc = pytest.importorskip("zennit.composites")
    low = torch.tensor(IMAGENET_LOW, device=device)[None, :, None, None]
    high = torch.tensor(IMAGENET_HIGH, device=device)[None, :, None, None]
    return {"epsilon_gamma_box": lambda: zc.EpsilonGammaBox(low=low, high=high),
            "epsilon_plus": zc.EpsilonPlus, "epsilon_plus_flat": zc.EpsilonPlusFlat,
            "epsilon_alpha2_beta1": zc.EpsilonAlpha2Beta1,
            "epsilon_alpha2_beta1_flat": zc.EpsilonAlpha2Beta1Flat}[name]()


@pytest.mark.parametrize("name", ["epsilon_gamma_box", "epsilon_plus", "epsilon_plus_flat", "epsilon_alpha2_beta1",
                                  "epsilon_alpha2_beta1_flat"])
def test_zennit_agrees_on_device(name):
    composite = _zennit_composite(name, DEVICE)
    from zennit.attribution import Gradient

    model = make_vgg("vgg11")
    torch.manual_seed(5)
    x = torch.randn(3, 3, 64, 64)
    reference = Float64Oracle(model, name).explain(x)[1]
    model, x = model.to(DEVICE), x.to(DEVICE)
    logits, ours = lrp.LRPModel(model, name).explain(x)
    with Gradient(model, composite) as attributor:
        ref_logits = model(x)
        index = ref_logits.argmax(1, keepdim=True)
        start = torch.zeros_like(ref_logits).scatter_(1, index, ref_logits.gather(1, index))
        _, theirs = attributor(x.clone().requires_grad_(True), start)
    torch.testing.assert_close(logits, ref_logits.detach(), rtol=1e-4, atol=1e-5)
    ours_error = relative_error(ours.cpu().double(), reference).max()
    theirs_error = relative_error(theirs.cpu().double(), reference).max()
    assert ours_error <= bound(theirs_error) and theirs_error <= bound(ours_error), (ours_error, theirs_error)


@pytest.mark.parametrize("traced_on", ["device", "cpu"])
def test_traced_module_on_device_equals_eager(traced_on, tmp_path):
    """Traced where it runs, and traced on the CPU then loaded onto the device (what the pipeline does)."""
    explainer = lrp.LRPModel(make_vgg("vgg11"), "epsilon_gamma_box", top_k=0.1)
    where = DEVICE if traced_on == "device" else "cpu"
    example = (torch.randn(2, 3, 64, 64, device=where), torch.tensor([-1, 3], device=where))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(explainer.to(where).exportable(), example, check_trace=False)
        torch.jit.save(traced, tmp_path / "lrp.pt")
        loaded = torch.jit.load(tmp_path / "lrp.pt", map_location=DEVICE)
    explainer = explainer.to(DEVICE)
    torch.manual_seed(6)
    x, target = torch.randn(3, 3, 64, 64, device=DEVICE), torch.tensor([-1, 2, -1], device=DEVICE)
    logits, relevance = loaded(x, target)
    ref_logits, reference = explainer.explain(x, target)
    assert relevance.device.type == DEVICE
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(relevance, reference.sum(1), rtol=1e-4, atol=1e-6)


# ---- the shard worker, in process (no Ray) -----------------------------------------------------------------
SIZE = 64


@pytest.fixture(scope="module")
def shard_inputs(tmp_path_factory):
    """Six small JPEGs in one ImageFolder class and the traced vgg11 artifact the pipeline builds for them."""
    from pipeline.artifact_cache import cached_artifact
    from pipeline.config import load_config
    from pipeline.datasets import load_records

    base = tmp_path_factory.mktemp("cuda-shard")
    root = base / "images" / "n01440764"
    root.mkdir(parents=True)
    for i in range(6):
        Image.fromarray(reference_rgb(i)).save(root / f"img{i}.JPEG", quality=90)
    config = load_config({"dataset": str(base / "images"), "model": "vgg11", "weights": "random", "size": SIZE,
                          "cache": str(base / "cache")})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        artifact = cached_artifact(config, "random")[0]
    return artifact, load_records(base / "images")


def _run_shard(artifact: Path, records, device: str, out: Path, gpu_decode: bool = False) -> dict:
    """gpu_decode off by default: the LRP comparison needs the same pixels on both sides."""
    from pipeline.worker import ShardExplainer

    for sub in ("relevance", "stats", "failures"):
        (out / sub).mkdir(parents=True)
    explainer = ShardExplainer(str(artifact), worker_settings(batch_size=4, size=SIZE, map_dtype="float32",
                                                              compression=0, decode_threads=1, threads=2,
                                                              device=device, gpu_decode=gpu_decode))
    assert explainer.device == device
    assert (explainer.device_decoder is not None) == (gpu_decode and device == "cuda")
    result = dataclasses.asdict(explainer.explain_shard(0, records, str(out)))
    if explainer.device_decoder is not None:
        result["routed"] = dict(explainer.device_decoder.routed)
    return result


def test_shard_worker_on_device_writes_what_the_cpu_writes(shard_inputs, tmp_path):
    """Both workers' maps against float64 on the same preprocessed images: the device's within the bound of the
    CPU's distance; the statistics agree to the same bound."""
    from lrp_module.zoo import build_vgg
    from pipeline.preprocess import Preprocessing, load

    artifact, records = shard_inputs
    results = {where: _run_shard(artifact, records, device, tmp_path / where)
               for where, device in (("cpu", "cpu"), ("device", DEVICE))}
    assert [r["explained"] for r in results.values()] == [6, 6], results
    with h5py.File(tmp_path / "cpu" / "relevance" / "shard-00000.h5") as cpu, \
            h5py.File(tmp_path / "device" / "relevance" / "shard-00000.h5") as gpu:
        cpu_maps, maps = torch.from_numpy(cpu["relevance"][:]), torch.from_numpy(gpu["relevance"][:])
        assert list(cpu["image_id"][:]) == list(gpu["image_id"][:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vgg = build_vgg("vgg11", "random")[0]
    x = torch.stack([load(r, Preprocessing.for_size(SIZE))[0] for r in records])
    reference = Float64Oracle(vgg).explain(x)[1].sum(1)
    limit = bound(relative_error(cpu_maps.double(), reference).max())
    error = relative_error(maps.double(), reference)
    assert (error <= limit).all(), f"relative error per image {error.tolist()}, bound {limit:.1e}"
    cpu_stats = pq.read_table(tmp_path / "cpu" / "stats" / "shard-00000.parquet").to_pandas()
    gpu_stats = pq.read_table(tmp_path / "device" / "stats" / "shard-00000.parquet").to_pandas()
    assert list(gpu_stats["pred"]) == list(cpu_stats["pred"])
    for column in ("target_logit", "target_probability"):
        np.testing.assert_allclose(gpu_stats[column], cpu_stats[column], rtol=1e-4, atol=1e-6, err_msg=column)
    for column in ("relevance_sum", "positive_sum", "negative_sum", "conservation"):
        scale = float(np.abs(cpu_stats[column]).max())
        np.testing.assert_allclose(gpu_stats[column], cpu_stats[column], rtol=2 * limit, atol=limit * scale,
                                   err_msg=column)


def test_shard_worker_with_gpu_decoding_explains_and_fails_the_same_images(shard_inputs, tmp_path):
    artifact, records = shard_inputs
    cpu = _run_shard(artifact, records, "cpu", tmp_path / "cpu")
    device = _run_shard(artifact, records, DEVICE, tmp_path / "device", gpu_decode=True)
    assert (device["explained"], device["reasons"]) == (cpu["explained"], cpu["reasons"])
    if DEVICE == "cuda":
        assert device["routed"]["device"] == len(records)  # baseline RGB JPEGs: all decoded on the GPU
    stats = pq.read_table(tmp_path / "device" / "stats" / "shard-00000.parquet").to_pandas()
    assert np.isfinite(stats["relevance_sum"]).all()


# ---- the GPU decode path against Pillow ----------------------------------------------------------------------
DECODE_MEAN_LEVELS = 2.0  # nvJPEG vs libjpeg-turbo, plus float vs uint8 resizing: mean |difference| per image
DECODE_MAX_LEVELS = 48  # at sharp colour edges (chroma upsampling differs); the measured figures are written out


def test_gpu_decode_matches_pillow_within_a_few_levels(tmp_path):
    from pipeline.datasets.records import ImageRecord
    from pipeline.gpu_decode import DeviceDecoder
    from pipeline.preprocess import Preprocessing

    from .test_gpu_decode import DEVICE as ON_DEVICE
    from .test_gpu_decode import cpu_item, files

    prep = Preprocessing(resize=73, crop=64)
    records = []
    for i, (name, data) in enumerate(sorted(files().items())):
        (tmp_path / f"{name}.jpg").write_bytes(data)
        boxes = ((10.0, 20.0, 300.0, 200.0),) if i % 2 else ()
        records.append(ImageRecord(image_id=name, path=str(tmp_path / f"{name}.jpg"), boxes=boxes))
    decoder = DeviceDecoder(prep, DEVICE, batch_size=4)
    got = list(decoder.iterate(records, lambda at, record: cpu_item(record)))
    assert decoder.routed["device"] == len(ON_DEVICE)
    assert decoder.routed["device_refused"] <= 1  # only the damaged file may be refused (then Pillow decodes it)
    std = torch.tensor(prep.std)[:, None, None] * 255
    measured = {}
    for record, mine in zip(records, got):
        theirs = cpu_item(record)
        if isinstance(theirs, Exception):
            assert isinstance(mine, Exception) and str(mine) == str(theirs), record.image_id
            continue
        assert mine[0].device.type == DEVICE and mine[1] == theirs[1], record.image_id  # boxes identical
        levels = ((mine[0].cpu() - theirs[0]) * std).abs()
        measured[record.image_id] = {"mean_levels": float(levels.mean()), "max_levels": float(levels.max())}
    out = os.environ.get("GPU_CHECK_OUT")
    if out:
        Path(out, "gpu_decode_difference.json").write_text(json.dumps(measured, indent=2))
    for name, figures in measured.items():
        if name == "trailing_garbage_truncated":  # damaged scan data: each decoder conceals it its own way
            continue
        assert figures["mean_levels"] <= DECODE_MEAN_LEVELS, (name, figures)
        assert figures["max_levels"] <= DECODE_MAX_LEVELS, (name, figures)
