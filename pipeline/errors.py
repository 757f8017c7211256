"""The pipeline's errors. `PipelineError` is the base of every failure the CLI prints as one line naming the culprit
(configuration, dataset, run folder, report, SpRAy: exit code 2; StrictStop: 1). The layers below (lrp_module,
export) cannot derive from it: `lower_layer_errors` raises their one-line errors again as a `PipelineError`, so the
CLI catches the one base."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


def lower_layer_error_types() -> tuple[type[Exception], ...]:
    """The one-line errors of lrp_module and export: weights, an export or its sidecar, a file that cannot be
    written. Imported here, not at the top: this module stays light (run_lock's second processes import it)."""
    from export.artifacts import ExportError
    from export.runner import ArtifactError
    from lrp_module.files import OutputError
    from lrp_module.zoo import WeightsError
    return WeightsError, ExportError, ArtifactError, OutputError


class PipelineError(Exception):
    """A failure the CLI reports as one line (`error: <message>`); the message names the culprit."""


class RunError(PipelineError, RuntimeError):
    """The run cannot start or finish; the message says why."""


class StrictStop(RunError):
    """--strict: an image could not be explained; the message names it and the reason."""


class LowerLayerError(PipelineError):
    """A one-line error of lrp_module or export (its `__cause__`), as a PipelineError."""


@contextmanager
def lower_layer_errors() -> Iterator[None]:
    """Raise the lower layers' one-line errors (`lower_layer_error_types`) again as LowerLayerError, message
    unchanged."""
    try:
        yield
    except lower_layer_error_types() as error:
        raise LowerLayerError(str(error)) from error
