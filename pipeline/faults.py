"""Fault injection for tests and the reliability benchmark, off unless LRP_FAULT_INJECT=1 in the workers'
environment: an image file whose bytes start with `LRP-FAULT-INJECT crash` kills the worker process, one that
starts with `LRP-FAULT-INJECT hang` blocks it for good. Real dead and hung actors, no test-only code paths."""
from __future__ import annotations

import os
import time

ENV = "LRP_FAULT_INJECT"
MARKER = b"LRP-FAULT-INJECT "


def fault_file(kind: str) -> bytes:
    """The contents of an image file that triggers `kind` (crash | hang) when injection is on."""
    if kind not in ("crash", "hang"):
        raise ValueError(f"fault kind must be crash or hang, got {kind!r}")
    return MARKER + kind.encode()


def inject_fault(path: str) -> None:
    """Kill or hang this process if injection is on and the file asks for it; otherwise do nothing."""
    if os.environ.get(ENV) != "1":
        return
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(MARKER) + 5)
    except OSError:
        return
    if head == fault_file("crash"):
        os._exit(70)
    if head == fault_file("hang"):
        while True:
            time.sleep(3600)
