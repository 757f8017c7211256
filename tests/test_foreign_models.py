"""Issue 19.3 and 19.15 (--target label): a model whose head is not ImageNet's (a 10-class vgg11 fine-tune given as
a state-dict file). Its class count is the artifact's logits; its names are its own, a --classes file's, or none
(predictions are indices only); a labelled dataset whose labels it cannot have is refused before any work; with
--target label an unlabelled image is a failure row, never explained for its prediction; ViRelAy's label map lists
exactly the model's classes."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from PIL import Image

from .test_output_safety import SIZE, _args, _cli

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.timeout(600)

FOLDER_CLASSES = ["cat", "dog"]  # an ImageFolder of the fine-tune's own classes: 0 and 1 in sorted order
TEN_NAMES = ["cat", "dog", "bird", "fish", "frog", "horse", "ship", "truck", "plane", "car"]


def _images(folder: Path, count: int, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(generator.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"img{i}.png")


@pytest.fixture(scope="module")
def ten_class_weights(tmp_path_factory) -> Path:
    """A vgg11 state dict with a 10-class head (random: what matters is its shape)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "vgg11-10-classes.pth"
    torch.save(torchvision.models.vgg11(num_classes=10).state_dict(), path)
    return path


@pytest.fixture
def imagenet_labelled(tmp_path) -> Path:
    """An ImageNet-style ImageFolder (wnid folders): tench (class 0) and brambling (class 10)."""
    root = tmp_path / "imagenet-style"
    _images(root / "n01440764", 1)
    _images(root / "n01530575", 1, seed=1)
    return root


def _stats(out: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted((out / "stats").glob("*.parquet"))], ignore_index=True)


def _one_line_refusal(capsys, args: list[str], match: str) -> str:
    code = _cli(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and match in err, err
    return err


@pytest.mark.parametrize("classes", ["tench", "brambling"])
def test_imagenet_labels_on_a_ten_class_model_are_refused_before_any_work(
        classes, imagenet_labelled, ten_class_weights, tmp_path, artifact_cache, capsys, monkeypatch):
    """Brambling is ImageNet's class 10: no class of a 10-class model; tench is class 0, which the model has, but
    the dataset means ImageNet's tench and the model's classes have no names: refused too (before this fix the
    run was accepted, its predictions named with ImageNet's names and scored against ImageNet's labels)."""
    import pipeline.run as run

    other = imagenet_labelled / ("n01530575" if classes == "tench" else "n01440764")
    for path in other.iterdir():
        path.unlink()
    other.rmdir()
    monkeypatch.setattr(run, "cached_artifact", lambda *a: pytest.fail("the artifact was built"))
    out = tmp_path / "run"
    args = _args(imagenet_labelled, out, artifact_cache, "--weights", str(ten_class_weights))
    match = "an ImageNet class, but model vgg11's 10 classes have no names" if classes == "tench" \
        else "'brambling' (n01530575) but model vgg11 has 10 classes (0-9)"
    _one_line_refusal(capsys, args, match)
    # naming the model's classes does not make them ImageNet's: still refused, naming both classes
    names = tmp_path / "names.txt"
    names.write_text("\n".join(TEN_NAMES) + "\n")
    match = "'tench' (n01440764) but model vgg11's is 'cat'" if classes == "tench" else "has 10 classes"
    _one_line_refusal(capsys, [*args, "--classes", str(names)], match)
    assert not out.exists()


def test_bad_classes_files_and_target_label_without_labels_are_one_line_before_any_work(
        ten_class_weights, tmp_path, artifact_cache, capsys, monkeypatch):
    import pipeline.run as run

    monkeypatch.setattr(run, "cached_artifact", lambda *a: pytest.fail("the artifact was built"))
    plain = tmp_path / "photos"
    _images(plain, 2)
    out = tmp_path / "run"
    base = _args(plain, out, artifact_cache, "--weights", str(ten_class_weights))
    three = tmp_path / "three.txt"
    three.write_text("a\nb\nc\n")
    _one_line_refusal(capsys, [*base, "--classes", str(three)], "lists 3 classes but model vgg11 has 10 (its logits)")
    _one_line_refusal(capsys, [*base, "--classes", str(tmp_path / "missing.txt")], "missing.txt: cannot read")
    bad_tsv = tmp_path / "bad.tsv"
    bad_tsv.write_text("0\tn01440764\ttench\n2\tn01443537\tgoldfish\n")
    _one_line_refusal(capsys, [*base, "--classes", str(bad_tsv)], "bad.tsv:2: expected 1<TAB>wnid<TAB>name")
    _one_line_refusal(capsys, [*base, "--target", "label"], "--target label, but the dataset has no labels")
    assert not out.exists()


@pytest.fixture(scope="module")
def foreign_runs(tmp_path_factory, ten_class_weights, ten_class_artifact, artifact_cache, local_ray
                 ) -> dict[str, Path]:
    """The fine-tune on an ImageFolder of its own classes (folder names, sorted): without --classes, and with a
    --classes file of its ten names."""
    base = tmp_path_factory.mktemp("foreign")
    root = base / "pets"
    for i, name in enumerate(FOLDER_CLASSES):
        _images(root / name, 2, seed=i)
    names = base / "classes.txt"
    names.write_text("# my fine-tune's classes, in training order\n" + "\n".join(TEN_NAMES) + "\n")
    runs = {}
    for key, extra in (("unnamed", []), ("named", ["--classes", str(names)])):
        runs[key] = base / key
        args = _args(root, runs[key], artifact_cache, "--weights", str(ten_class_weights), "--layout",
                     "imagefolder", *extra)
        assert _cli(args) == 0, key
    return runs


def test_a_ten_class_model_is_explained_with_its_own_classes_and_no_imagenet_names(foreign_runs):
    """Without names: predictions are indices 0-9, no name (before this fix: ImageNet's, e.g. 'tench', and the
    dataset's 'cat' was refused as not ImageNet's class 0); with --classes: the file's names."""
    unnamed, named = (_stats(foreign_runs[k]) for k in ("unnamed", "named"))
    assert len(unnamed) == len(named) == 4
    assert unnamed.pred.between(0, 9).all() and unnamed.pred_name.isna().all()
    assert sorted(set(unnamed.label_name)) == FOLDER_CLASSES and unnamed.label.tolist() == [0, 0, 1, 1]
    assert named.pred_name.tolist() == [TEN_NAMES[p] for p in named.pred]
    assert named.pred.tolist() == unnamed.pred.tolist()  # the names change nothing else
    manifests = {k: json.loads((foreign_runs[k] / "manifest.json").read_text()) for k in foreign_runs}
    assert manifests["unnamed"]["classes"] == {"count": 10, "source": "none", "names": None, "wnids": None}
    assert manifests["named"]["classes"]["names"] == TEN_NAMES and manifests["named"]["classes"]["wnids"] is None
    assert manifests["unnamed"]["artifact"]["class_names"] is None


@pytest.fixture(scope="module")
def ten_class_artifact(ten_class_weights, artifact_cache) -> Path:
    """The fine-tune's traced LRP module, from the session's cache (the runs below use the same entry)."""
    from pipeline.artifact_cache import cached_artifact
    from pipeline.config import load_config

    config = load_config({"model": "vgg11", "weights": str(ten_class_weights), "size": SIZE,
                          "cache": str(artifact_cache)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cached_artifact(config, str(ten_class_weights))[0]


def test_target_label_makes_unlabelled_images_failure_rows(ten_class_artifact, tmp_path):
    """--target label on an image without a label: a failure row "no label", never a map of its prediction;
    the labelled images of the shard are explained for their label."""
    from pipeline.datasets.records import ImageRecord
    from pipeline.layout import RunLayout
    from pipeline.worker import ShardExplainer

    from .helpers import worker_settings

    _images(tmp_path / "images", 3)
    paths = sorted(str(p) for p in (tmp_path / "images").iterdir())
    records = [ImageRecord("a", paths[0], "cat", 0, "cat"), ImageRecord("b", paths[1]),
               ImageRecord("c", paths[2], "dog", 1, "dog")]
    explainer = ShardExplainer(str(ten_class_artifact), worker_settings(
        batch_size=2, size=SIZE, map_dtype="float32", compression=0, decode_threads=1, threads=1, target="label"))
    out = tmp_path / "run"
    RunLayout(out).make_folders()
    result = explainer.explain_shard(0, records, str(out))
    stats = pd.read_parquet(out / "stats" / "shard-00000.parquet")
    failures = pd.read_parquet(out / "failures" / "shard-00000.parquet")
    assert result.explained == 2 and result.failed == 1
    assert failures.image_id.tolist() == ["b"] and failures.reason[0].startswith("no label: --target label")
    assert stats.image_id.tolist() == ["a", "c"] and stats.target.tolist() == [0, 1]


def test_virelay_label_map_lists_exactly_the_models_classes(foreign_runs, tmp_path):
    """The label map of the fine-tune: its ten classes, the --classes names, ids that are not made-up wnids."""
    from pipeline.spray.inputs import open_run_index
    from pipeline.spray.virelay import write_label_map

    for key, names in (("named", TEN_NAMES), ("unnamed", [f"class {i}" for i in range(10)])):
        path = tmp_path / f"{key}.json"
        write_label_map(path, open_run_index(foreign_runs[key]))
        assert json.loads(path.read_text()) == [{"index": i, "word_net_id": f"class-{i}", "name": name}
                                                for i, name in enumerate(names)], key


def test_label_map_of_an_imagenet_model_has_its_1000_classes_whatever_was_predicted(tmp_path):
    """A run of a (randomly initialised) ImageNet vgg11 whose predictions reach class 967 only, made before the
    manifest recorded its classes: 1000 entries with ImageNet's real wnids and names (it showed 968 classes with
    invented wnids)."""
    from pipeline.classes import imagenet_classes
    from pipeline.run_manifest import Manifest, class_table

    manifest = Manifest.from_record(
        {"config": {"model": "vgg11"},
         "artifact": {"outputs": {"logits": ["N", 1000]}, "class_names": None, "weights": {"kind": "random"}}},
        tmp_path / "manifest.json")
    names, wnids = class_table(manifest, seen=968)  # the largest class index the run's statistics hold: 967
    imagenet = imagenet_classes()
    assert names == list(imagenet.names) and wnids == list(imagenet.wnids)


def test_an_edited_classes_file_is_another_configuration(foreign_runs, artifact_cache, ten_class_weights, capsys):
    """The same --classes path with other names is not the same run: resuming would mix names across shards."""
    named = foreign_runs["named"]
    names = named.parent / "classes.txt"
    before = names.read_text()
    args = _args(named.parent / "pets", named, artifact_cache, "--weights", str(ten_class_weights), "--layout",
                 "imagefolder", "--classes", str(names))
    try:
        names.write_text(before.replace("bird", "sparrow"))
        _one_line_refusal(capsys, args, "differs in classes")
    finally:
        names.write_text(before)
    assert _cli(args) == 0  # the same file again: the same run, nothing to redo
