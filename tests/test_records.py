"""The readers of a run's manifest (pipeline/run_manifest.py) and of an export's sidecar (export/sidecar.py): a
record an older version wrote reads with the defaults filled in (its optional fields stay optional), an unfinished
run reads from run.json, and a malformed file is one line naming the file and the field."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from export.sidecar import SIDECAR, ArtifactSidecar, SidecarError
from pipeline.errors import PipelineError
from pipeline.layout import RunLayout
from pipeline.run_manifest import ManifestError, read_manifest

# a manifest as the version before invocations, classes and the precision probe were recorded wrote it
OLD_MANIFEST = {
    "config": {"dataset": "sample", "root": "data/sample", "model": "vgg16", "composite": "epsilon_plus",
               "top_k": 0.0, "target": "predicted", "size": 96, "map_dtype": "float16"},
    "weights": {"model": "vgg16", "kind": "imagenet", "source": "hub", "sha256": "ab" * 32},
    "random_weights": False,
    "artifact": {"format_version": 1, "model": "vgg16", "weights": {"kind": "imagenet"},
                 "composite": {"name": "epsilon_plus"}, "outputs": {"logits": ["N", 1000], "relevance": ["N", 96, 96]},
                 "input": {"shape": ["N", 3, 96, 96]}},
    "totals": {"images": 10, "explained": 9, "failed": 1},
    "failure_reasons": {"not an image": 1},
    "shards": [{"shard": 0, "images": 10, "explained": 9, "failed": 1, "stats_sha256": "cd" * 32}],
}


def _layout(tmp_path: Path, manifest: object = None, run: object = None) -> RunLayout:
    layout = RunLayout(tmp_path)
    for path, record in ((layout.manifest, manifest), (layout.run_file, run)):
        if record is not None:
            path.write_text(record if isinstance(record, str) else json.dumps(record))
    return layout


def test_a_manifest_an_older_version_wrote_reads_with_its_defaults(tmp_path):
    manifest = read_manifest(_layout(tmp_path, OLD_MANIFEST))
    assert manifest.finished and manifest.path == tmp_path / "manifest.json"
    assert (manifest.config.model, manifest.config.size, manifest.config.top_k) == ("vgg16", 96, 0.0)
    assert (manifest.weights.kind, manifest.weights.sha256) == ("imagenet", "ab" * 32)
    assert (manifest.totals.images, manifest.totals.explained, manifest.totals.failed) == (10, 9, 1)
    assert manifest.failure_reasons == {"not an image": 1}
    assert manifest.classes is None and manifest.precision is None and manifest.invocations == ()
    (shard,) = manifest.shards
    assert (shard.shard, shard.worker, shard.invocation) == (0, None, 1)  # before invocations: the first
    artifact = manifest.artifact
    assert (artifact.start, artifact.class_count, artifact.class_names, artifact.input_size) == (
        "logit", 1000, None, (96, 96))
    assert artifact.versions == {} and artifact.record == OLD_MANIFEST["artifact"]


def test_an_unfinished_run_reads_its_configuration_from_run_json(tmp_path):
    manifest = read_manifest(_layout(tmp_path, run={"digest": "x", "identity": {"model": "vgg11", "size": 64}}))
    assert not manifest.finished and manifest.path == tmp_path / "run.json"
    assert (manifest.config.model, manifest.config.size, manifest.config.dataset) == ("vgg11", 64, None)
    assert manifest.totals is None and manifest.artifact is None and manifest.shards == ()


def test_a_folder_without_either_record_reads_as_nothing_recorded(tmp_path):
    manifest = read_manifest(_layout(tmp_path))
    assert not manifest.finished and manifest.config.size is None and manifest.weights.kind is None


@pytest.mark.parametrize("change, culprit", [
    ({"totals": {"images": "many", "explained": 9, "failed": 1}},
     "field 'totals.images' must be an integer, got 'many'"),
    ({"totals": {"images": 10, "failed": 1}}, "field 'totals.explained' is missing"),
    ({"config": {"size": "96"}}, "field 'config.size' must be an integer, got '96'"),
    ({"config": {"size": True}}, "field 'config.size' must be an integer, got True"),
    ({"config": ["vgg16"]}, "field 'config' must be a JSON object"),
    ({"classes": {"names": ["a"]}}, "field 'classes.count' is missing"),
    ({"classes": {"count": 2, "names": ["a", 2]}}, "field 'classes.names' must be a list of strings"),
    ({"random_weights": "no"}, "field 'random_weights' must be true or false"),
    ({"shards": [OLD_MANIFEST["shards"][0], {"shard": "1"}]}, "field 'shards[1].shard' must be an integer"),
    ({"artifact": {"weights": {"kind": 3}}}, "field 'artifact.weights.kind' must be a string, got 3"),
    ({"artifact": {"weights": {}, "outputs": {"logits": ["N"]}}}, "field 'artifact.outputs.logits' must be"),
])
def test_a_malformed_manifest_is_one_line_naming_the_file_and_the_field(tmp_path, change, culprit):
    layout = _layout(tmp_path, {**OLD_MANIFEST, **change})
    with pytest.raises(ManifestError) as caught:
        read_manifest(layout)
    assert str(caught.value).startswith(f"{layout.manifest}: {culprit}") and "\n" not in str(caught.value)
    assert isinstance(caught.value, PipelineError)  # the CLI's one-line errors


@pytest.mark.parametrize("text, culprit", [("{not json", "unreadable"), ("[1, 2]", "the file is not a JSON object")])
def test_a_manifest_that_is_not_a_json_object_says_so(tmp_path, text, culprit):
    with pytest.raises(ManifestError, match=f"^{tmp_path / 'run.json'}: {culprit}"):
        read_manifest(_layout(tmp_path, run=text))


SIDECAR_RECORD = {
    "artifacts": {"torchscript": "lrp.torchscript.pt"},
    "metadata": {"format_version": 1, "model": "vgg11", "weights": {"model": "vgg11", "kind": "random"},
                 "composite": {"name": "epsilon_plus_flat", "start": "logit"}, "top_k": 0.0,
                 "input": {"shape": ["N", 3, 224, 224]}, "outputs": {"logits": ["N", 10], "relevance": ["N", 224, 224]},
                 "class_names": [f"c{i}" for i in range(10)], "versions": {"torch": "2.9"}},
    "config": {}, "verification": None,
}


def _sidecar(tmp_path: Path, record: object) -> Path:
    path = tmp_path / SIDECAR
    path.write_text(record if isinstance(record, str) else json.dumps(record))
    return path


def test_a_sidecar_reads_with_its_fields_checked(tmp_path):
    sidecar = ArtifactSidecar.read(_sidecar(tmp_path, SIDECAR_RECORD))
    metadata = sidecar.metadata
    assert sidecar.artifacts == {"torchscript": "lrp.torchscript.pt"} and sidecar.verification is None
    assert (metadata.class_count, metadata.input_size, metadata.weights.kind) == (10, (224, 224), "random")
    assert metadata.class_names == tuple(f"c{i}" for i in range(10)) and metadata.versions == {"torch": "2.9"}


def test_a_sidecar_an_older_export_wrote_starts_from_the_logit(tmp_path):
    """Exports before the composite recorded `start` (nor class names, versions or the precision probe)."""
    old = json.loads(json.dumps(SIDECAR_RECORD))
    for key in ("class_names", "versions"):
        del old["metadata"][key]
    del old["metadata"]["composite"]["start"]
    sidecar = ArtifactSidecar.read(_sidecar(tmp_path, old))
    assert sidecar.metadata.start == "logit" and sidecar.metadata.class_names is None
    assert sidecar.metadata.versions == {} and sidecar.precision is None


@pytest.mark.parametrize("change, culprit", [
    ({"metadata": {**SIDECAR_RECORD["metadata"], "outputs": {}}}, "field 'metadata.outputs.logits' is missing"),
    ({"metadata": {**SIDECAR_RECORD["metadata"], "weights": None}}, "field 'metadata.weights' is missing"),
    ({"metadata": {**SIDECAR_RECORD["metadata"], "input": {"shape": ["N", 3, "H", 224]}}},
     "field 'metadata.input.shape' must end in height, width"),
    ({"artifacts": {"onnx": 1}}, "field 'artifacts' must map each format to a file name"),
    ({"artifacts": None}, "field 'artifacts' is missing"),
])
def test_a_malformed_sidecar_is_one_line_naming_the_file_and_the_field(tmp_path, change, culprit):
    path = _sidecar(tmp_path, {**SIDECAR_RECORD, **change})
    with pytest.raises(SidecarError) as caught:
        ArtifactSidecar.read(path)
    assert str(caught.value).startswith(f"{path}: {culprit}") and "\n" not in str(caught.value)


def test_an_unreadable_sidecar_names_the_file(tmp_path):
    with pytest.raises(SidecarError, match=f"^{tmp_path / SIDECAR}: unreadable artifact sidecar"):
        ArtifactSidecar.read(_sidecar(tmp_path, "{"))


@pytest.mark.parametrize("command", [["report"], ["spray", "--no-progress"]])
def test_report_and_spray_of_a_run_with_a_malformed_manifest_say_which_field_in_one_line(tmp_path, capsys, command):
    from bench.synthetic_run import stats_table, synthesise_run
    from pipeline.cli import main

    run = synthesise_run(tmp_path / "run", stats_table(8, 2, ["none.jpg"], size=16, shard_size=8), size=16,
                         shard_size=8)
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "totals": {**manifest["totals"], "failed": "0"}}))
    assert main([command[0], str(run), *command[1:]]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {run / 'manifest.json'}: field 'totals.failed' must be an integer, got '0'"]
