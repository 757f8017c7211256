"""Benchmarks: each prints a table and writes its figures as JSON (bench/results/ by default)."""
from __future__ import annotations

import json
from pathlib import Path


def write_results(path: Path, result: dict) -> None:
    """The benchmark's figures as JSON at `path` (folders made as needed), and a line saying where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"written to {path}")
