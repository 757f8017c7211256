"""PipelineError: every error the CLI turns into one line derives from it, and the CLI catches that base: the
pipeline's own errors and the layers' below (weights, export, artifact, write errors) are one line, exit code 2;
--strict's stop is exit code 1; anything else (a bug) keeps its traceback."""
from __future__ import annotations

import contextlib

import pytest

import pipeline.cli as cli
import pipeline.report.cli as report_cli
import pipeline.spray.cli as spray_cli
from export.artifacts import ExportError, VerificationError
from export.runner import ArtifactError
from lrp_module.files import OutputError
from lrp_module.zoo import WeightsError
from pipeline.classes import ClassesError
from pipeline.config import ConfigError
from pipeline.datasets import DatasetError
from pipeline.errors import PipelineError, RunError, StrictStop
from pipeline.output_checks import OutputCheckError
from pipeline.report.heatmap import ColourMapError
from pipeline.report.run_data import ReportError
from pipeline.run_lock import RunLockError
from pipeline.run_manifest import ManifestError
from pipeline.spray.inputs import SprayRunError

PIPELINE_ERRORS = [ConfigError, DatasetError, RunError, StrictStop, RunLockError, OutputCheckError, ClassesError,
                   ReportError, ColourMapError, SprayRunError, ManifestError]
LOWER_LAYER_ERRORS = [WeightsError, ExportError, VerificationError, ArtifactError, OutputError]


@pytest.mark.parametrize("kind", PIPELINE_ERRORS, ids=lambda kind: kind.__name__)
def test_every_one_line_error_of_the_pipeline_is_a_pipeline_error(kind):
    assert issubclass(kind, PipelineError)


def _raising(error: BaseException):
    def raise_it(*args, **kwargs):
        raise error
    return raise_it


@pytest.fixture
def explain_raises(monkeypatch):
    """`python -m pipeline explain` whose configuration loads and whose run raises the given error."""
    monkeypatch.setattr(cli, "load_config", lambda overrides: None)

    def run(error: BaseException, capsys) -> tuple[int, list[str]]:
        monkeypatch.setattr(cli, "explain", _raising(error))
        code = cli.main(["explain", "--no-progress"])
        return code, capsys.readouterr().err.strip().splitlines()
    return run


@pytest.mark.parametrize("kind", [*PIPELINE_ERRORS, *LOWER_LAYER_ERRORS], ids=lambda kind: kind.__name__)
def test_explain_turns_each_into_one_line(explain_raises, capsys, kind):
    code, err = explain_raises(kind("images/x.png: the culprit"), capsys)
    assert err == ["error: images/x.png: the culprit"]
    assert code == (1 if kind is StrictStop else 2)


def test_a_bug_keeps_its_traceback_and_exit_code_2(explain_raises, capsys):
    code, err = explain_raises(KeyError("not a one-line error"), capsys)
    assert code == 2 and err[0].startswith("Traceback") and err[-1] == "KeyError: 'not a one-line error'"


@pytest.mark.parametrize("command, module, function", [
    (["report", "RUN"], report_cli, "build_report"),
    (["heatmaps", "RUN", "--ids", "a"], report_cli, "write_heatmaps"),
    (["spray", "RUN", "--no-progress"], spray_cli, "spray"),
])
@pytest.mark.parametrize("kind", [ReportError, SprayRunError, ManifestError, OutputError, WeightsError],
                         ids=lambda kind: kind.__name__)
def test_report_heatmaps_and_spray_turn_each_into_one_line(monkeypatch, capsys, command, module, function, kind):
    monkeypatch.setattr(cli, "hold_run", lambda *args, **kwargs: contextlib.nullcontext())
    monkeypatch.setattr(module, function, _raising(kind("RUN/manifest.json: the culprit")))
    assert cli.main(command) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: RUN/manifest.json: the culprit"]


def test_a_run_locked_by_another_process_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(cli, "hold_run", _raising(RunLockError("RUN is in use by explain (pid 1)")))
    assert cli.main(["report", "RUN"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: RUN is in use by explain (pid 1)"]
