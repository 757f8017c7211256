"""Full disks and unwritable output directories (issue #5, item 4), and artifact safety (item 6).

Root ignores permission bits, so the unwritable directories here are ones the kernel refuses to root too: a path
through a regular file (ENOTDIR) and a read-only tmpfs (EROFS). A full disk is a real, small tmpfs mounted for
the test (root with CAP_SYS_ADMIN; skipped elsewhere), plus an in-process writer that raises ENOSPC, which runs
everywhere."""
from __future__ import annotations

import ast
import errno
import io
import os
import shutil
import subprocess
import tarfile
import warnings
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from lrp_module import zoo
from pipeline import artifact_cache, writers
from pipeline.artifact_cache import cached_artifact, cached_classifier
from pipeline.cli import main as cli_main
from pipeline.config import load_config
from pipeline.datasets import load_records
from pipeline.errors import RunError
from pipeline.output_checks import estimated_bytes
from pipeline.preprocess import load
from pipeline.shard_runner import stop_if_needed

from .bad_inputs import make_imagenet_val, reference_rgb
from .helpers import worker_settings

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.timeout(600)
SIZE = 32
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def good_dataset(tmp_path_factory):
    """Twelve small JPEGs in one ImageFolder class."""
    root = tmp_path_factory.mktemp("good") / "images"
    (root / "n01440764").mkdir(parents=True)
    for i in range(12):
        Image.fromarray(reference_rgb(i)).save(root / "n01440764" / f"img{i:02d}.JPEG", quality=90)
    return root


def _args(dataset: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return ["explain", "--dataset", str(dataset), "--model", "vgg11", "--weights", "random", "--size", str(SIZE),
            "--batch-size", "2", "--shard-size", "2", "--map-dtype", "float32", "--compression", "0",
            "--out", str(out), "--cache", str(cache), "--no-progress", *extra]


def _cli(args: list[str]) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cli_main(args)


def _remount(mount: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(mount)], check=True)


# ---- unwritable output ------------------------------------------------------------------------------------

def test_out_under_a_regular_file_is_refused_before_anything_is_written(good_dataset, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cache = tmp_path / "fresh-cache"
    assert _cli(_args(good_dataset, blocker / "run", cache)) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: run directory {blocker / 'run'} is not writable: Not a directory"
    assert not cache.exists()  # refused before the artifact was built


def test_read_only_out_is_refused(good_dataset, tmp_path, tmpfs, capsys):
    _remount(tmpfs, "ro")
    cache = tmp_path / "fresh-cache"
    assert _cli(_args(good_dataset, tmpfs / "run", cache)) == 2
    assert "is not writable: Read-only file system" in capsys.readouterr().err
    assert not cache.exists()


# ---- full disk ---------------------------------------------------------------------------------------------

def test_clearly_insufficient_space_is_refused_before_the_run(good_dataset, tmp_path, tmpfs, capsys):
    cache = tmp_path / "fresh-cache"
    assert estimated_bytes(12, SIZE, "float32", 0) > shutil.disk_usage(tmpfs).total
    assert _cli(_args(good_dataset, tmpfs / "run", cache)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: not enough free space for {tmpfs / 'run'}: about ")
    assert "--no-space-check" in err and "\n" not in err
    assert not (tmpfs / "run").exists() and not cache.exists()


def test_disk_full_while_writing_stops_cleanly_and_resumes(good_dataset, tmpfs, artifact_cache, local_ray, capsys):
    """A real ENOSPC mid-run: one line naming the file, exit 2, no temporary file, nothing half-written under a
    final name, no _SUCCESS; with room made, the same command resumes and keeps the shards already done."""
    out = tmpfs / "run"
    assert _cli(_args(good_dataset, out, artifact_cache, "--no-space-check")) == 2
    announced, err = capsys.readouterr().err.strip().rsplit("\n", 1)  # the dataset line at the start, the error
    assert announced.startswith("dataset ") and "layout imagefolder" in announced and "\n" not in announced
    assert err.startswith(f"error: cannot write {out}/") and "no space left on device" in err
    assert "make room and run the same command again" in err
    assert not list(out.rglob(".tmp-*")) and not (out / "_SUCCESS").exists()
    done = sorted(p.stem for p in (out / "stats").glob("*.parquet"))
    assert 0 < len(done) < 6, done  # some shards fit, not all
    for h5 in (out / "relevance").glob("*.h5"):  # every file under a final name is complete
        with h5py.File(h5) as handle:
            assert handle["relevance"].shape[0] == 2
    for table in [*(out / "stats").glob("*.parquet"), *(out / "failures").glob("*.parquet")]:
        pq.read_table(table)
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "stats").glob("*.parquet")}
    _remount(tmpfs, "size=8m")
    assert _cli(_args(good_dataset, out, artifact_cache)) == 0
    assert capsys.readouterr().out.startswith("12 explained, 0 failed")
    assert {p: (out / "stats" / p).stat().st_mtime_ns for p in kept} == kept  # resumed, not redone
    assert (out / "_SUCCESS").exists()


@pytest.fixture(scope="module")
def artifact(artifact_cache, good_dataset):
    config = load_config({"dataset": str(good_dataset), "model": "vgg11", "weights": "random", "size": SIZE,
                          "cache": str(artifact_cache)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cached_artifact(config, "random")[0]


def _explainer(artifact):
    from pipeline.worker import ShardExplainer

    return ShardExplainer(str(artifact), worker_settings(batch_size=2, size=SIZE, map_dtype="float32", compression=0,
                                                         decode_threads=1, threads=1))


def test_write_error_in_a_worker_is_not_an_image_failure(artifact, good_dataset, tmp_path, monkeypatch):
    """In process (no Ray, no mount): the statistics write hits ENOSPC after the maps were written."""
    out = tmp_path / "run"
    for sub in ("relevance", "stats", "failures"):
        (out / sub).mkdir(parents=True)
    real = writers.pq.write_table

    def full_disk(table, where, *args, **kwargs):
        if "stats" in str(where):
            Path(where).write_bytes(b"PAR1 half a file")  # what a full disk leaves behind
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, where, *args, **kwargs)

    monkeypatch.setattr(writers.pq, "write_table", full_disk)
    result = _explainer(artifact).explain_shard(0, load_records(good_dataset)[:2], str(out))
    assert result.write_error == f"cannot write {out}/stats/shard-00000.parquet: no space left on device"
    assert result.failed == 0 and not list(out.rglob(".tmp-*"))
    assert not (out / "stats" / "shard-00000.parquet").exists()  # the shard is not done: a rerun redoes it
    with pytest.raises(RunError, match="no space left on device .*the run stopped"):
        stop_if_needed(result, strict=False)


# ---- safety -----------------------------------------------------------------------------------------------

class _Payload:
    """Unpickling this creates a marker file: proof that a pickle's code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_malicious_pickle_weights_are_refused_and_never_run(tmp_path, good_dataset, capsys):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pth"
    torch.save({"features.0.weight": _Payload(str(marker))}, evil)  # a "state dict" whose unpickling runs code
    with pytest.raises(zoo.WeightsError, match="not a loadable state dict"):
        zoo.build_vgg("vgg11", evil)
    assert not marker.exists()
    out = tmp_path / "run"
    assert _cli(["explain", "--dataset", str(good_dataset), "--model", "vgg11", "--weights", str(evil), "--size",
                 str(SIZE), "--out", str(out), "--cache", str(tmp_path / "cache")]) == 2
    assert "not a loadable state dict" in capsys.readouterr().err
    assert not marker.exists() and not out.exists()
    torch.load(evil, weights_only=False)  # the control: loaded unsafely, the payload does run
    assert marker.exists()


def _calls(name: str) -> list[tuple[str, ast.Call]]:
    found = []
    for package in ("lrp_module", "export", "pipeline"):
        for source in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(source.read_text())):
                if isinstance(node, ast.Call) and ast.unparse(node.func) == name:
                    found.append((str(source.relative_to(REPO)), node))
    return found


def test_every_weights_load_is_weights_only_and_torchscript_loads_are_known():
    loads = _calls("torch.load")
    assert loads, "no torch.load found: the scan is broken"
    for where, call in loads:
        keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
        assert keywords.get("weights_only") == "True", f"{where}:{call.lineno} torch.load without weights_only=True"
    # TorchScript runs what is in the file: loaded only where the user named it (the standalone runner) or
    # where the pipeline built and recorded it (the worker's LRP module and classifier, through the trust checks of
    # cached_artifact / cached_classifier; the classifier's build compares with the LRP artifact just checked)
    assert sorted(where for where, _ in _calls("torch.jit.load")) == [
        "export/classifier.py", "export/runner.py", "pipeline/worker.py", "pipeline/worker.py"]


def test_cached_artifact_is_rebuilt_unless_it_is_what_we_built(artifact, good_dataset, tmp_path, monkeypatch,
                                                               capsys):
    cache = tmp_path / "cache"
    shutil.copytree(artifact.parent.parent, cache)
    config = load_config({"dataset": str(good_dataset), "model": "vgg11", "weights": "random", "size": SIZE,
                          "cache": str(cache)})
    built = []

    def fake_export(export, directory, verify=True):  # stands for a real rebuild: what we build, we trust
        built.append(directory)
        (Path(directory) / "lrp.torchscript.pt").write_bytes(artifact.read_bytes())

    monkeypatch.setattr(artifact_cache, "export_artifacts", fake_export)
    path, sidecar = cached_artifact(config, "random")
    assert built == [] and path.read_bytes() == artifact.read_bytes()  # trusted: used as it is
    planted = torch.jit.script(torch.nn.Identity())
    torch.jit.save(planted, str(path))  # someone else's TorchScript under our name
    cached_artifact(config, "random")
    assert len(built) == 1 and path.read_bytes() == artifact.read_bytes()
    assert "sha256 mismatch" in capsys.readouterr().err
    os.chmod(path, 0o666)  # anyone could have replaced it
    cached_artifact(config, "random")
    assert len(built) == 2 and "writable by anyone" in capsys.readouterr().err
    (path.parent / "lrp.sha256").unlink()  # a cache from elsewhere, without our record
    cached_artifact(config, "random")
    assert len(built) == 3 and "no lrp.sha256 record" in capsys.readouterr().err
    assert sidecar.metadata.weights.kind == "random"


def test_cached_classifier_is_rebuilt_unless_it_is_what_we_built(artifact, good_dataset, tmp_path, monkeypatch,
                                                                 capsys):
    """The forward-only classifier (pixel flipping) is TorchScript too: the same trust rule as the LRP artifact."""
    config = load_config({"dataset": str(good_dataset), "model": "vgg11", "weights": "random", "size": SIZE,
                          "cache": str(tmp_path / "cache")})
    lrp_artifact = tmp_path / "cache" / "key" / "lrp.torchscript.pt"
    lrp_artifact.parent.mkdir(parents=True)
    built = []

    def fake_export(model, weights, size, path, lrp_artifact=None):  # stands for a real build
        built.append(path)
        torch.jit.save(torch.jit.script(torch.nn.Identity()), str(path))

    monkeypatch.setattr(artifact_cache, "export_classifier", fake_export)
    path = cached_classifier(config, "random", lrp_artifact)
    assert len(built) == 1 and (path.parent / "classifier.sha256").is_file()
    cached_classifier(config, "random", lrp_artifact)
    assert len(built) == 1  # what we built and recorded is reused
    path.write_bytes(path.read_bytes() + b"planted")
    cached_classifier(config, "random", lrp_artifact)
    assert len(built) == 2 and "sha256 mismatch" in capsys.readouterr().err


def test_records_with_problems_are_never_opened(artifact, tmp_path, monkeypatch):
    """Label-file ids like ../../etc/passwd, links outside the root, missing images: the worker records them as
    failures without opening anything; every file it opens lies inside the dataset root."""
    root, expected, _ = make_imagenet_val(tmp_path, with_unreadable=False)
    from pipeline import preprocess

    opened = []
    real = preprocess.read_bytes
    monkeypatch.setattr(preprocess, "read_bytes", lambda path, *more: opened.append(path) or real(path, *more))
    records = load_records(root)
    result = _explainer(artifact).explain_shard(0, records, str(_run_dir(tmp_path)))
    assert result.explained == sum(v == "explained" for v in expected.values())
    assert opened and all(Path(p).resolve().is_relative_to(root.resolve()) for p in opened)
    never = {r.path for r in records if r.problem}
    assert never and not never & set(opened)


def _run_dir(tmp_path: Path) -> Path:
    out = tmp_path / "run"
    for sub in ("relevance", "stats", "failures"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    return out


def test_webdataset_member_named_outside_is_read_from_the_shard(tmp_path):
    root = tmp_path / "shards"
    root.mkdir()
    (tmp_path / "evil.jpg").write_text("the file outside the shard: not an image")
    buffer = io.BytesIO()
    Image.fromarray(reference_rgb(0)).save(buffer, format="JPEG")
    with tarfile.open(root / "shard-000000.tar", "w") as archive:
        info = tarfile.TarInfo("../evil.jpg")
        info.size = len(buffer.getvalue())
        archive.addfile(info, io.BytesIO(buffer.getvalue()))
    (record,) = load_records(root)
    assert record.image_id == "evil" and record.path == str(root / "shard-000000.tar")
    assert record.member.name == "../evil.jpg"
    tensor, _ = load(record)  # decodes: it read the member, not the text file the name points at
    assert tensor.shape == (3, 224, 224)


def test_webdataset_unknown_class_index_is_a_failure_not_unlabelled(tmp_path):
    root = tmp_path / "shards"
    root.mkdir()
    buffer = io.BytesIO()
    Image.fromarray(reference_rgb(0)).save(buffer, format="JPEG")
    with tarfile.open(root / "shard-000000.tar", "w") as archive:
        for name, payload in (("a.jpg", buffer.getvalue()), ("a.cls", b"5000"), ("b.jpg", buffer.getvalue()),
                              ("b.cls", b"tabby"), ("c.jpg", buffer.getvalue()), ("c.cls", b"281")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    records = {r.image_id: r for r in load_records(root)}
    assert records["a"].problem == "unknown class index: '5000' in a.cls"
    assert records["b"].problem == "unknown class index: 'tabby' in b.cls"
    assert records["c"].problem is None and records["c"].label == 281


def test_annotation_paths_are_ignored(tmp_path):
    """A devkit box XML may name any <filename> or <path>: images come from listing the root, never from it."""
    root, _, ids = make_imagenet_val(tmp_path, with_unreadable=False)
    (root / "LOC_val_solution.csv").unlink()
    import scipy.io

    from pipeline.classes import imagenet_classes

    wnids = imagenet_classes().wnids
    synsets = np.array([(i + 1, w, "w", "g", 0) for i, w in enumerate(wnids)],
                       dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"),
                              ("num_children", "O")])
    scipy.io.savemat(root / "meta.mat", {"synsets": synsets})
    numbers = sorted(int(i[-8:]) for i in ids.values())
    (root / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join("1" for _ in range(max(numbers))))
    good = ids["good"]
    (root / f"{good}.xml").write_text(
        "<annotation><filename>../../etc/passwd</filename><path>/etc/shadow</path><object><name>n01440764</name>"
        "<bndbox><xmin>1</xmin><ymin>2</ymin><xmax>10</xmax><ymax>12</ymax></bndbox></object></annotation>")
    records = {r.image_id: r for r in load_records(root)}
    assert records[good].path == str(root / f"{good}.JPEG") and records[good].boxes == ((1.0, 2.0, 10.0, 12.0),)
    assert all(Path(r.path).parent == root for r in records.values())
