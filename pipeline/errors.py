"""The driver's errors: the run cannot start or finish (exit code 2), or --strict stopped it (exit code 1)."""
from __future__ import annotations


class RunError(RuntimeError):
    """The run cannot start or finish; the message says why."""


class StrictStop(RunError):
    """--strict: an image could not be explained; the message names it and the reason."""
