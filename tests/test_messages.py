"""Issue 11.8, 11.13, 11.14: exit codes through make, one-line messages for the mistakes people make, and an
artifact cache that user text cannot name or escape."""
from __future__ import annotations

import os
import shlex
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lrp_module import zoo
from pipeline.cli import main as cli_main
from pipeline.config import load_config
from pipeline.datasets import DatasetError, detect_layout

from .helpers import make_vgg

pytestmark = pytest.mark.timeout(600)
REPO = Path(__file__).resolve().parent.parent
SIZE = 32


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Two good PNGs and one that is not an image: a run of it exits 1."""
    root = tmp_path_factory.mktemp("messages") / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    (root / "broken.png").write_bytes(b"not an image")
    return root


def _make_env() -> dict[str, str]:
    """This environment less what would tie the make under test to this run's Ray or make."""
    return {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "MAKEFLAGS", "MAKELEVEL")}


def _make(*args: str, timeout: int = 560) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, env=_make_env(),
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_make_explain_keeps_the_documented_exit_codes(folder, tmp_path, artifact_cache):
    """1 when some images failed (make alone would say 2), the summary on stdout, no Ray token banner on a local
    run; 2 for a bad option, named in one line. Output redirected to a log keeps every line in place (`>` and `>>`),
    and a folder named with an apostrophe and `$(...)` is a folder, never a command."""
    out = tmp_path / "Bob's $(touch pwned) `touch pwned` run"
    common = [f"DATASET={folder}", "MODEL=vgg11", "WEIGHTS=random"]
    args = [*common, f"OUT={out}", f"EXPLAIN_ARGS=--size {SIZE} --cache '{artifact_cache}' --no-progress"]
    log = tmp_path / "run.log"
    result = _make_logged(log, ">", "explain", *args)
    assert result.returncode == 1, log.read_text()[-2000:]
    first = log.read_text()
    # the run's first line of its own (the random-weights banner comes only when the artifact is built, not from a
    # warm cache), whole, before the summary: the summary overwrote the log's start when make reopened its stdout
    assert f"dataset {folder}: layout plain, 3 images; no label files" in first.splitlines(), first[:400]
    assert first.strip().splitlines()[-1].startswith("2 explained, 1 failed: not an image")
    assert "Token authentication" not in first and (out / "_SUCCESS").exists()
    assert not list(REPO.glob("pwned")) and not list(tmp_path.glob("pwned"))
    again = _make_logged(log, ">>", "explain", *args)  # done already: resumes nothing, appends its lines
    assert again.returncode == 1 and log.read_text().startswith(first), log.read_text()[:400]
    assert log.read_text().strip().splitlines()[-1].startswith("2 explained, 1 failed: not an image")
    bad = _make("explain", *common, "TOPK=abc", f"OUT={tmp_path / 'other'}")
    assert bad.returncode == 2
    ours = [line for line in bad.stderr.splitlines() if not line.startswith("make")]
    assert ours == ["error: argument --top-k: invalid float value: 'abc'"], bad.stderr
    assert not (tmp_path / "other").exists()


def _make_logged(log: Path, redirect: str, *args: str) -> subprocess.CompletedProcess:
    """`make ARGS {redirect} LOG 2>&1` through a shell, as a user logs a run."""
    command = " ".join(shlex.quote(word) for word in ["make", "--no-print-directory", *args])
    return subprocess.run(["bash", "-c", f"{command} {redirect} {shlex.quote(str(log))} 2>&1"], cwd=REPO,
                          env=_make_env(), timeout=560, check=False)


def test_make_variables_are_data_not_code(tmp_path):
    """An apostrophe or `$(...)` in a make variable is part of a name; `*_ARGS` are split into words, not run."""
    marker = tmp_path / "pwned"
    run = tmp_path / f"x'; touch {marker}; echo '$(shell touch {marker})$$(touch {marker})"
    result = _make("report", f"RUN={run}", f"REPORT_ARGS=--out 'a b' ; touch {marker}")
    assert result.returncode == 2 and not marker.exists(), result.stderr
    assert "unrecognized arguments: ; touch" in result.stderr
    unbalanced = _make("report", f"RUN={run}", "REPORT_ARGS=--out 'a b")
    assert unbalanced.returncode == 2 and "error: REPORT_ARGS: No closing quotation" in unbalanced.stderr
    missing = _make("report", f"RUN={run}")
    assert f"error: {run}: no such run directory" in missing.stderr and not marker.exists()


def test_make_export_with_bad_weights_exits_2_and_leaves_no_out(tmp_path):
    out = tmp_path / "artifacts"
    result = _make("export", "MODEL=vgg11", f"WEIGHTS={tmp_path / 'missing.pth'}", f"OUT={out}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "missing.pth does not exist" in result.stderr and not out.exists()


def test_bad_option_value_is_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        cli_main(["explain", "--top-k", "abc"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: argument --top-k: invalid float value: 'abc'"]


def test_ctrl_c_is_one_line_saying_the_same_command_resumes(monkeypatch, capsys):
    import pipeline.cli as cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "explain", interrupted)
    assert cli_main(["explain", "--dataset", "sample", "--no-progress"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "same command" in err[0] and "resume" in err[0], err


def test_an_image_file_given_as_dataset_says_so(tmp_path, folder):
    with pytest.raises(DatasetError, match="img0.png: an image file, not a dataset folder"):
        detect_layout(folder / "img0.png")


def test_weights_that_are_not_a_state_dict_never_suggest_weights_only_false(tmp_path):
    pickled_model = tmp_path / "whole-model.pth"
    torch.save(make_vgg("vgg11", num_classes=10), pickled_model)  # a pickled module, not a state dict
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights")
    import pickle

    objects = tmp_path / "objects.pth"
    objects.write_bytes(pickle.dumps({"layer": object}))
    for path in (pickled_model, text, objects):
        with pytest.raises(zoo.WeightsError) as error:
            zoo.build_vgg("vgg11", path)
        message = str(error.value)
        assert "weights_only" not in message and "trust" not in message and "\x1b" not in message, message
        assert "state dict" in message and len(message.splitlines()) == 1 and len(message) < 300, message


def test_wrong_architecture_names_expected_and_found_in_a_short_line(tmp_path):
    path = tmp_path / "vgg11.pth"
    torch.save(make_vgg("vgg11", num_classes=1000).state_dict(), path)
    with pytest.raises(zoo.WeightsError) as error:
        zoo.build_vgg("vgg13", path)
    message = str(error.value)
    assert len(message.splitlines()) == 1 and len(message) < 400, message
    assert "expected" in message and "found" in message and "vgg13" in message


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("weights", ["../../outside/missing.pth", "no-such-file.pth", "x/../../y"])
def test_bad_weights_leave_nothing_in_or_outside_the_cache(tmp_path, weights):
    from pipeline.artifact_cache import cached_artifact

    base = tmp_path / "work"
    cache = base / "deep" / "cache"
    cache.mkdir(parents=True)
    before = _tree(tmp_path)
    config = load_config({"model": "vgg11", "weights": weights, "size": SIZE, "cache": str(cache)})
    with pytest.raises(zoo.WeightsError):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cached_artifact(config, weights)
    assert _tree(tmp_path) == before


def test_cache_entries_are_named_by_a_hash(tmp_path, artifact_cache):
    from pipeline.artifact_cache import cache_key

    weights = tmp_path / "my weights; rm -rf.pth"
    torch.save(make_vgg("vgg11", num_classes=1000).state_dict(), weights)
    config = load_config({"model": "vgg11", "weights": str(weights), "size": SIZE, "cache": str(artifact_cache)})
    key = cache_key(config, str(weights))
    assert "my" not in key and "rm" not in key and key.startswith("vgg11-")
    other = load_config({"model": "vgg11", "weights": "random", "size": SIZE, "cache": str(artifact_cache)})
    assert cache_key(other, "random") != key and len(key.split("-")[-1]) == 16
