"""Issue 11: nothing a user owns is ever lost (OUT placement, --overwrite removes only the run's own files), and
the mistakes users make with datasets and options are one clear line before anything is written."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from PIL import Image

from pipeline.layout import RunLayout

from .bad_inputs import reference_rgb
from .helpers import worker_settings
from .test_output_safety import SIZE, _args, _cli

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.timeout(600)


def _listing(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def dataset(tmp_path) -> Path:
    """Four small JPEGs in one ImageFolder class (a fresh copy per test: tests may try to harm it)."""
    root = tmp_path / "images"
    (root / "n01440764").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(reference_rgb(i)).save(root / "n01440764" / f"img{i:02d}.JPEG", quality=90)
    return root


def _refused(capsys, args: list[str], match: str) -> None:
    code = _cli(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and match in err, err


@pytest.mark.parametrize("where", ["the dataset", "inside the dataset", "contains the dataset"])
def test_out_overlapping_the_dataset_is_refused(dataset, tmp_path, artifact_cache, capsys, where):
    out = {"the dataset": dataset, "inside the dataset": dataset / "n01440764" / "run",
           "contains the dataset": dataset.parent}[where]
    before = _listing(tmp_path)
    _refused(capsys, _args(dataset, out, artifact_cache), where)
    assert _listing(tmp_path) == before and not (dataset / "n01440764" / "run").exists()


def test_existing_folder_that_is_not_a_run_is_refused(dataset, tmp_path, artifact_cache, capsys):
    out = tmp_path / "my-thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("years of work")
    _refused(capsys, _args(dataset, out, artifact_cache), "not a run folder")
    assert _listing(out) == {"chapter1.tex": b"years of work"}


def test_overwrite_removes_only_the_runs_own_files(dataset, tmp_path, artifact_cache, local_ray, capsys):
    out = tmp_path / "run"
    assert _cli(_args(dataset, out, artifact_cache)) == 0
    (out / "notes.txt").write_text("mine")
    (out / "stats" / "my-analysis.csv").write_text("mine too")
    (out / "relevance" / "shard-00000.h5.bak").write_text("a backup")
    (out / "plots").mkdir()
    (out / "plots" / "figure.png").write_bytes(b"png")
    assert _cli(_args(dataset, out, artifact_cache, "--composite", "epsilon_plus_flat")) == 2
    capsys.readouterr()
    assert _cli(_args(dataset, out, artifact_cache, "--composite", "epsilon_plus_flat", "--overwrite")) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "stats" / "my-analysis.csv").read_text() == "mine too"
    assert (out / "relevance" / "shard-00000.h5.bak").read_text() == "a backup"
    assert (out / "plots" / "figure.png").read_bytes() == b"png"
    assert '"composite": "epsilon_plus_flat"' in (out / "manifest.json").read_text()
    assert len(_listing(dataset)) == 4  # the dataset is untouched


def test_run_layout_knows_its_own_files_only(tmp_path):
    layout = RunLayout(tmp_path)
    layout.make_folders()
    own = [layout.run_file, layout.manifest, layout.success, layout.relevance_shard(3), layout.stats_shard(3),
           layout.failure_shard(3), layout.virtual_dataset, layout.failures,
           tmp_path / "stats" / ".tmp-12-shard-00004.parquet"]
    theirs = [tmp_path / "README.md", tmp_path / "stats" / "shard-3.parquet", tmp_path / "relevance" / "x.h5",
              tmp_path / ".tmp-notes", tmp_path / "deep" / "manifest.json"]
    for path in own + theirs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    assert sorted(layout.own_files()) == sorted(own)
    layout.remove_own()
    assert all(p.exists() for p in theirs) and not any(p.exists() for p in own)
    assert not (tmp_path / "failures").exists()  # emptied, so removed; stats/ and relevance/ hold user files


@pytest.fixture(scope="module")
def artifact(artifact_cache):
    from pipeline.artifact_cache import cached_artifact
    from pipeline.config import load_config

    config = load_config({"model": "vgg11", "weights": "random", "size": SIZE, "cache": str(artifact_cache)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cached_artifact(config, "random")[0]


def _explainer(artifact, **settings):
    from pipeline.worker import ShardExplainer

    return ShardExplainer(str(artifact), worker_settings(**{"batch_size": 2, "size": SIZE, "map_dtype": "float32",
                                                            "compression": 0, "decode_threads": 1, "threads": 1,
                                                            **settings}))


def _shard_tables(out: Path):
    import pandas as pd

    return (pd.read_parquet(out / "stats" / "shard-00000.parquet"),
            pd.read_parquet(out / "failures" / "shard-00000.parquet"))


def test_an_all_zero_map_is_a_failure_saying_why(artifact, dataset, tmp_path):
    """Whatever makes a map all zero (issue 11.2: the top-k filter did, silently), the image is not reported as
    explained with an empty map: it is a failure row with the reason, and its shard-mates keep their rows."""
    from pipeline.datasets import load_records

    explainer = _explainer(artifact, batch_size=3)  # one batch: the first image's map is wiped
    real = explainer.module

    def wipe_first(x, target):
        logits, relevance = real(x, target)
        relevance = relevance.clone()
        relevance[0] = 0.0
        return logits, relevance

    explainer.module = wipe_first
    out = tmp_path / "run"
    RunLayout(out).make_folders()
    records = load_records(dataset)[:3]
    result = explainer.explain_shard(0, records, str(out))
    stats, failures = _shard_tables(out)
    assert result.explained == 2 and result.failed == 1
    assert failures.image_id.tolist() == [records[0].image_id]
    assert failures.reason[0].startswith("all-zero relevance map")
    assert stats.image_id.tolist() == [r.image_id for r in records[1:]] and stats.row.tolist() == [0, 1]
    import h5py

    with h5py.File(out / "relevance" / "shard-00000.h5") as handle:
        assert handle["relevance"].shape[0] == 2 and (abs(handle["relevance"][:]).max(axis=(1, 2)) > 0).all()


def test_target_out_of_range_is_refused_before_anything(dataset, tmp_path, artifact_cache, capsys, monkeypatch):
    import pipeline.run as run

    monkeypatch.setattr(run, "cached_artifact", lambda *a: pytest.fail("the artifact was built"))
    out = tmp_path / "run"
    _refused(capsys, _args(dataset, out, artifact_cache, "--target", "1000"),
             "target 1000 is out of range: model vgg11 has 1000 classes")
    assert not out.exists()


def test_reruns_compare_normalised_configs_first_extend_with_a_larger_limit_and_keep_provenance(
        dataset, tmp_path, artifact_cache, local_ray, monkeypatch):
    """11.10 and 11.11: a trailing slash is the same dataset; another configuration is refused before the
    artifact is built; a larger limit extends the run (its shards are a prefix), a smaller one is refused; every
    shard keeps the worker and invocation that wrote it, and invocations are counted."""
    import json

    import pipeline.run as run
    from pipeline.config import load_config

    def config(**values):
        base = dict(dataset=str(dataset), model="vgg11", weights="random", size=SIZE, batch_size=2, shard_size=2,
                    map_dtype="float32", compression=0, out=str(tmp_path / "run"), cache=str(artifact_cache))
        return load_config({**base, **values})

    def explain(cfg, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return run.explain(cfg, progress=False, **kwargs)

    first = explain(config(limit=2))
    shard0 = tmp_path / "run" / "relevance" / "shard-00000.h5"
    written = shard0.stat().st_mtime_ns
    assert first["shards"][0]["worker"] is not None and first["shards"][0]["invocation"] == 1
    assert first["dataset"]["layout"] == "imagefolder" and first["dataset"]["images"] == str(dataset)
    explain(config(limit=2, dataset=str(dataset) + "/"))  # the same dataset: resumes, nothing to do
    real = run.cached_artifact
    monkeypatch.setattr(run, "cached_artifact", lambda *a: pytest.fail("the artifact was built before the check"))
    with pytest.raises(run.RunError, match="differs in composite"):
        explain(config(limit=2, composite="epsilon_plus_flat"))
    monkeypatch.setattr(run, "cached_artifact", real)
    extended = explain(config(limit=4))
    assert extended["totals"] == {"images": 4, "explained": 4, "failed": 0} and shard0.stat().st_mtime_ns == written
    assert [s["invocation"] for s in extended["shards"]] == [1, 3]
    assert extended["shards"][0]["worker"] == first["shards"][0]["worker"]
    assert len(extended["invocations"]) == 3 and extended["invocations"][0]["shards_explained"] == [0]
    with pytest.raises(run.RunError, match="limit"):
        explain(config(limit=2))
    again = explain(config(limit=4))
    assert [s["worker"] for s in again["shards"]] == [s["worker"] for s in extended["shards"]]
    assert len(again["invocations"]) == 4 and "retries" in again
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["invocations"][-1]["shards_explained"] == []
