"""Runs `python -m MODULE ARGS...` for the Makefile, with a `*_ARGS` make variable split as a shell would split it
(quotes respected) but never run by a shell: a value given to make is never pasted into a command line.

Usage: make_job.py VARIABLE_NAME 'VARIABLE VALUE' MODULE ARG...   (the Makefile quotes every word it passes)
"""
from __future__ import annotations

import os
import shlex
import sys


def command(argv: list[str]) -> list[str]:
    """The command to run: MODULE's arguments, then the variable's words (ValueError names the variable)."""
    name, extra, module, *args = argv
    try:
        words = shlex.split(extra)
    except ValueError as error:
        raise ValueError(f"{name}: {error} in {extra!r}") from None
    return [sys.executable, "-m", module, *args, *words]


def main() -> None:
    try:
        argv = command(sys.argv[1:])
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main()
