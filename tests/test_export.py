"""Export: TorchScript, ONNX and torch.export artifacts that run without this project and equal eager LRP."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import lrp_module as lrp
from export import ArtifactError, ExportConfig, ExportError, export_artifacts, load_artifact, read_metadata
from export.artifacts import FILENAMES, SIDECAR, VerificationError, write_artifacts
from export.concepts import ConceptRequest
from export.runner import output_names
from export.sidecar import ArtifactSidecar
from export.verify import run_fresh
from lrp_module.oracle import FLOOR, LOGITS_FLOOR, Float64Oracle, bound, compare
from lrp_module.zoo import WeightsError, WeightsInfo

from .helpers import make_tiny_vgg

ALL = tuple(FILENAMES)
INFO = WeightsInfo("tiny-vgg", "random", "tests")


def _export(tmp_path, composite="epsilon_gamma_box", top_k=0.0, size=(64, 64), channel_sum=True, formats=ALL,
            verify=True, batch_norm=False, concepts=None):
    """(LRPModel, sidecar record, the VGG it was built from)."""
    vgg = make_tiny_vgg(batch_norm=batch_norm)
    model = lrp.LRPModel(vgg, composite, top_k=top_k)
    config = ExportConfig(model="tiny-vgg", weights="random", composite=composite, top_k=top_k, height=size[0],
                          width=size[1], channel_sum=channel_sum, formats=formats, concepts=concepts)
    record = write_artifacts(model, INFO, config, tmp_path, verify=verify, source=vgg)
    return model, record, vgg


def _compare(path, model, vgg, batch, size, channel_sum=True):
    """The artifact at another batch size: no further from float64 than the bound of eager float32's distance."""
    x = torch.randn(batch, 3, *size)
    target = torch.tensor([-1, 2, 5, -1, 9][:batch])
    logits, relevance = load_artifact(path)(x.numpy(), target.numpy())
    eager_logits, eager_relevance = model.explain(x, target)
    ref_logits, reference = Float64Oracle.like(vgg, model).explain(x, target)
    if channel_sum:
        eager_relevance, reference = eager_relevance.sum(1), reference.sum(1)
    assert relevance.shape == tuple(eager_relevance.shape)
    for ours, eager, ref, floor in ((logits, eager_logits, ref_logits, LOGITS_FLOOR),
                                   (relevance, eager_relevance, reference, FLOOR)):
        limit = bound(compare(eager, ref).worst, floor)
        assert compare(torch.from_numpy(ours), ref).worst <= limit


@pytest.mark.precision
@pytest.mark.parametrize("top_k", [0.0, 0.1])
def test_all_formats_round_trip_with_dynamic_batch(tmp_path, top_k):
    """Exported at batch 2, run at 1 and 5, top-k on and off; the built-in fresh-process check passed. Another
    input size is refused in one line by every format (issue 19.4: a trace fixed top-k's kept count at the traced
    size and returned wrong maps at another)."""
    model, record, vgg = _export(tmp_path, top_k=top_k, batch_norm=True)
    assert all(check["ok"] for check in record["verification"].values())
    for name in record["artifacts"].values():
        for batch in (1, 5):
            _compare(tmp_path / name, model, vgg, batch, (64, 64))
        x, target = np.zeros((2, 3, 96, 96), np.float32), np.array([-1, 2])
        with pytest.raises(ArtifactError, match=rf"{name}: exported for input size 64x64 \(N, 3, 64, 64\), got x of "
                                                r"shape \(2, 3, 96, 96\); export again with --size 96 96$"):
            load_artifact(tmp_path / name)(x, target)
    with pytest.raises(Exception, match="exported for input size 64x64"):  # the TorchScript module itself
        torch.jit.load(str(tmp_path / "lrp.torchscript.pt"))(torch.from_numpy(x), torch.from_numpy(target))
    with pytest.raises(Exception, match=r"x.size\(\)\[2\] == 64"):  # as torch.export's own guard does
        torch.export.load(str(tmp_path / "lrp.pt2")).module()(torch.from_numpy(x), torch.from_numpy(target))


@pytest.mark.timeout(900)  # five exports, each checked against float64; loaded CI machines are slow
def test_non_default_size_per_channel_and_other_composites(tmp_path):
    model, record, vgg = _export(tmp_path, composite="epsilon_plus_flat", size=(80, 48), channel_sum=False,
                                 formats=("onnx", "torch.export"))
    for name in record["artifacts"].values():
        _compare(tmp_path / name, model, vgg, 3, (80, 48), channel_sum=False)
    for composite in ("montavon", "seed", "epsilon_alpha2_beta1"):
        model, record, vgg = _export(tmp_path / composite, composite=composite, formats=("onnx",), top_k=0.05)
        _compare(tmp_path / composite / "lrp.onnx", model, vgg, 2, (64, 64))


def test_the_sidecar_reads_back_as_the_export_wrote_it(tmp_path):
    """export/sidecar.py reads what export/artifacts.py writes: the artifact's classes, input size and start."""
    model, record, _ = _export(tmp_path, composite="epsilon_plus_flat", size=(48, 64), formats=("torchscript",),
                               verify=False)
    sidecar = ArtifactSidecar.read(tmp_path / SIDECAR)
    assert sidecar.artifacts == record["artifacts"] and sidecar.verification is None
    assert sidecar.metadata.class_count == model.num_classes and sidecar.metadata.input_size == (48, 64)
    assert sidecar.metadata.start == model.composite.start and sidecar.metadata.weights.kind == INFO.kind
    assert sidecar.metadata.record == json.loads(json.dumps(record["metadata"]))  # as JSON keeps it: lists
    assert set(sidecar.precision) == set(record["precision"])


def test_metadata_inside_each_artifact_and_sidecar(tmp_path):
    _, record, _ = _export(tmp_path, top_k=0.1, verify=False)
    sidecar = json.loads((tmp_path / SIDECAR).read_text())
    assert sidecar["artifacts"] == record["artifacts"] and sidecar["verification"] is None
    probe = sidecar["precision"]  # recorded with or without verification
    assert set(probe) == {"reference", "images", "device", "dtype", "tf32", "cudnn_benchmark", "cudnn_deterministic",
                          "onednn", "max_relative_error", "correlation"}
    assert probe["reference"] == "float64-cpu" and probe["images"] == 3 and probe["device"].startswith("cpu")
    assert probe["dtype"] == "float32" and probe["tf32"] is False
    assert probe["onednn"] is torch.backends.mkldnn.enabled
    assert 0 <= probe["max_relative_error"]["median"] <= probe["max_relative_error"]["max"] < 1e-3
    assert 0.999 < probe["correlation"]["min"] <= probe["correlation"]["median"] <= 1.0
    for name in record["artifacts"].values():
        meta = read_metadata(tmp_path / name)
        assert meta["composite"]["name"] == "epsilon_gamma_box" and meta["top_k"] == 0.1
        assert meta["weights"]["kind"] == "random" and meta["input"]["shape"] == ["N", 3, 64, 64]
        assert meta["versions"]["torch"] == torch.__version__ and meta["exported_at"]


def test_fresh_process_really_lacks_the_project(tmp_path):
    """The runner refuses imports of this project; an artifact that needed them would fail there."""
    _export(tmp_path, formats=("torchscript",), verify=False)
    runner = os.path.join(os.path.dirname(__import__("export").__file__), "runner.py")
    probe = (f"import runpy, sys; sys.argv = ['runner.py']; g = runpy.run_path({runner!r}, run_name='probe'); "
             "sys.meta_path.insert(0, g['_RefuseProjectImports']()); import lrp_module")
    result = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0 and "must not be imported" in result.stderr
    out = run_fresh(tmp_path / "lrp.torchscript.pt", np.zeros((1, 3, 64, 64), np.float32), np.array([-1]))
    assert out["relevance"].shape == (1, 64, 64)


def test_verification_reports_a_differing_artifact(tmp_path, monkeypatch):
    """A check that fails names the artifact and the difference, and deletes nothing."""
    import export.verify as verify

    real = verify.run_fresh

    def tampered(artifact, x, target, timeout_s=900):
        out = real(artifact, x, target, timeout_s)
        if artifact.suffix == ".onnx":
            out["relevance"] = out["relevance"] * 1.1
        return out

    monkeypatch.setattr(verify, "run_fresh", tampered)
    with pytest.raises(ExportError, match=r"lrp.onnx: max relative difference to float64 relevance 1.0\de-01 "
                                          r"exceeds the bound 1.0e-02 \(10 x eager float32's .*, floor 1e-02\)"):
        _export(tmp_path, formats=("torchscript", "onnx"))
    assert (tmp_path / "lrp.onnx").exists() and (tmp_path / "lrp.torchscript.pt").exists()
    sidecar = json.loads((tmp_path / SIDECAR).read_text())
    assert sidecar["verification"]["onnx"]["ok"] is False and sidecar["verification"]["torchscript"]["ok"]
    checked = sidecar["verification"]["torchscript"]["outputs"]["relevance"]
    assert checked["bound"] == max(10 * checked["eager_float32"], 1e-2)
    assert checked["max_relative_error"]["max"] <= checked["bound"]


@pytest.mark.parametrize("name", list(FILENAMES.values()))
def test_corrupt_and_missing_artifacts_fail_clearly(tmp_path, name):
    with pytest.raises(ArtifactError, match="no such artifact file"):
        load_artifact(tmp_path / name)
    (tmp_path / name).write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ArtifactError, match=f"{name}: cannot load") as error:
        load_artifact(tmp_path / name)
    assert "\n" not in str(error.value)
    with pytest.raises(ArtifactError, match="unknown artifact type"):
        load_artifact(tmp_path / "model.bin")


def test_truncated_artifact_fails_clearly(tmp_path):
    _export(tmp_path, formats=("torchscript", "onnx"), verify=False)
    for name in ("lrp.torchscript.pt", "lrp.onnx"):
        path = tmp_path / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        with pytest.raises(ArtifactError, match="cannot load"):
            load_artifact(path)


def test_bad_requests_fail_before_writing(tmp_path):
    with pytest.raises(ValueError, match="unknown composite"):
        export_artifacts(ExportConfig(model="vgg11", weights="random", composite="nope"), tmp_path / "a")
    with pytest.raises(ValueError, match="unknown model"):
        export_artifacts(ExportConfig(model="vgg12", weights="random"), tmp_path / "b")
    with pytest.raises(ExportError, match="unknown format"):
        export_artifacts(ExportConfig(model="vgg11", weights="random", formats=("tflite",)), tmp_path / "c")
    wrong = tmp_path / "vgg13.pt"
    torch.save(__import__("torchvision").models.vgg13().state_dict(), wrong)
    with pytest.raises(WeightsError, match="do not match vgg11"):
        export_artifacts(ExportConfig(model="vgg11", weights=str(wrong)), tmp_path / "d")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ExportError, match="is not writable"):
        export_artifacts(ExportConfig(model="vgg11", weights="random"), blocker / "out")
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.rglob("*"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_failed_export_leaves_out_as_it_was(tmp_path, monkeypatch):
    """A failed export removes the folders it created (parents too) and leaves an existing OUT untouched: a previous
    set is not half-replaced, a user's file stays, no temporary file remains (issue 19.15)."""
    import export.artifacts as artifacts

    out = tmp_path / "new" / "out"
    result = subprocess.run([sys.executable, "-m", "export", "--model", "vgg-shapes", "--weights", "demo",
                             "--size", "8", "8", "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: torchscript export")
    assert not (tmp_path / "new").exists()
    previous = {"lrp.torchscript.pt": b"old set", "lrp.json": b"{}", "notes.txt": b"the user's"}
    for name, content in previous.items():
        (tmp_path / name).write_bytes(content)

    def failing(module, inputs, meta, path):
        raise RuntimeError("exporter broke")

    monkeypatch.setitem(artifacts.EXPORTERS, "onnx", failing)
    with pytest.raises(ExportError, match="onnx export failed: RuntimeError: exporter broke"):
        _export(tmp_path, formats=("torchscript", "onnx"), verify=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == previous


def test_cli_one_line_errors(tmp_path):
    result = subprocess.run([sys.executable, "-m", "export", "--model", "vgg11", "--weights", "random",
                             "--composite", "nope", "--out", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2  # could not export: the same code as explain's
    assert result.stderr.strip().splitlines()[-1].startswith("error: unknown composite 'nope'")


@pytest.mark.slow
def test_vgg11_by_name_all_formats(tmp_path):
    """The real entry point on a full-size VGG (random weights), verified in fresh processes."""
    config = ExportConfig(model="vgg11", weights="random", num_classes=10, height=64, width=64, top_k=0.1)
    with pytest.warns(UserWarning, match="RANDOM"):
        record = export_artifacts(config, tmp_path)
    assert set(record["artifacts"]) == set(ALL)
    assert all(check["ok"] for check in record["verification"].values())
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())


@pytest.mark.slow
def test_vgg16_224_all_formats(tmp_path):
    config = ExportConfig(model="vgg16", weights="random")
    with pytest.warns(UserWarning, match="RANDOM"):
        record = export_artifacts(config, tmp_path)
    assert all(check["ok"] for check in record["verification"].values()), record["verification"]


# the maps layer, a layer below it (read from the unconditional row) and a dense one (no space: neuron 0)
CONCEPTS = ConceptRequest(("features.8", "features.3", "classifier.3"), None, 2)


@pytest.mark.precision
def test_concept_outputs_in_every_format_match_float64(tmp_path):
    """An artifact with concept outputs (#21): every format passes the fresh-process check of each concept output
    against float64 (the choices by value, the maps for the chosen channels), names its outputs in its metadata,
    records the concepts in the sidecar, and runs at another batch size."""
    model, record, vgg = _export(tmp_path, concepts=CONCEPTS, top_k=0.1)
    assert all(check["ok"] for check in record["verification"].values()), record["verification"]
    expected = ["logits", "relevance", "concept_relevance_0", "concept_relevance_1", "concept_relevance_2",
                "concept_position_0", "concept_position_1", "concept_position_2", "concept_channels", "concept_maps"]
    for check in record["verification"].values():
        assert set(check["outputs"]) == set(expected)
    concepts = ArtifactSidecar.read(tmp_path / SIDECAR).metadata.concepts
    assert [(layer.name, layer.channels, layer.height, layer.width) for layer in concepts.layers] == \
        [("features.8", 16, 16, 16), ("features.3", 16, 32, 32), ("classifier.3", 64, 1, 1)]
    assert concepts.maps_layer == "features.8" and concepts.maps == 2 and concepts.exclude_parallel
    x, target = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(3)), torch.tensor([-1, 2, 5, -1])
    oracle = Float64Oracle.like(vgg, model).lrp
    float64 = oracle.concept_relevance(x.double(), target, list(CONCEPTS.layers))
    eager = model.concept_relevance(x, target, list(CONCEPTS.layers))
    for name in record["artifacts"].values():
        assert output_names(tmp_path / name) == expected
        outputs = dict(zip(expected, load_artifact(tmp_path / name)(x.numpy(), target.numpy())))
        assert outputs["concept_maps"].shape == (4, 2, 64, 64) and outputs["concept_channels"].shape == (4, 2)
        assert (outputs["concept_position_2"] == 0).all()
        for i, layer in enumerate(CONCEPTS.layers):
            ours = torch.from_numpy(outputs[f"concept_relevance_{i}"])
            assert compare(ours, float64[layer]).worst <= bound(compare(eager[layer], float64[layer]).worst)


def test_a_differing_concept_output_fails_its_check(tmp_path, monkeypatch):
    """A concept map off by 10 %, or channels that are not the most relevant, fail the check by name."""
    import export.verify as verify

    real = verify.run_fresh

    def tampered(artifact, x, target, timeout_s=900):
        out = real(artifact, x, target, timeout_s)
        if artifact.suffix == ".onnx":
            out["concept_maps"] = out["concept_maps"] * 1.1
        else:
            out["concept_channels"] = out["concept_channels"][:, ::-1].copy()  # least relevant of the two first
        return out

    monkeypatch.setattr(verify, "run_fresh", tampered)
    with pytest.raises(VerificationError) as error:
        _export(tmp_path, formats=("torchscript", "onnx"), concepts=CONCEPTS)
    assert re.search(r"lrp.torchscript.pt: max relative difference to float64 concept_channels \S+ exceeds the bound",
                     str(error.value))
    assert re.search(r"lrp.onnx: max relative difference to float64 concept_maps 1.0\de-01 exceeds the bound",
                     str(error.value))


def test_an_unknown_concept_layer_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "export", "--model", "vgg-shapes", "--weights", "demo", "--size",
                             "32", "32", "--concepts", "features.12,features.99", "--out", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: unknown layer 'features.99': concepts can be taken at features.0, ")
    assert not out.exists()


@pytest.mark.parametrize("exclude_parallel", [True, False])
def test_concept_outputs_of_a_resnet_match_float64(tmp_path, exclude_parallel):
    """A ResNet's concept artifact: the maps layer inside a block (its skip connection goes around it), a layer
    below it and the container `layer4`; checked in a fresh process against float64 with either exclude_parallel."""
    from .helpers import randomize

    torch.manual_seed(0)
    net = randomize(__import__("torchvision").models.resnet18(num_classes=10))
    model = lrp.LRPModel(net, "epsilon_plus")
    request = ConceptRequest(("layer3.0.conv1", "layer2.1.conv2", "layer4"), None, 2, exclude_parallel)
    config = ExportConfig(model="resnet18", weights="random", composite="epsilon_plus", height=32, width=32,
                          formats=("torchscript",), concepts=request)
    record = write_artifacts(model, INFO, config, tmp_path, verify=True, source=net)
    check = record["verification"]["torchscript"]
    assert check["ok"] and {"concept_maps", "concept_relevance_2"} <= set(check["outputs"]), check
    assert record["metadata"]["concepts"]["exclude_parallel"] is exclude_parallel
