"""Verify exported artifacts in a fresh Python process that cannot import this project, against eager LRP."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from lrp_module import LRPModel

from . import runner

TOLERANCE = 1e-4  # max |difference| over max |eager value|, for logits and for relevance


def relative_difference(ours: np.ndarray, reference: np.ndarray) -> float:
    scale = float(np.abs(reference).max()) or 1.0
    return float(np.abs(ours - reference).max()) / scale


def run_fresh(artifact: Path, x: np.ndarray, target: np.ndarray, timeout_s: float = 900) -> dict[str, np.ndarray]:
    """Run `artifact` in `python -I runner.py` from an empty directory: isolated mode drops PYTHONPATH, the
    user site and the script directory from sys.path, and the runner refuses any import of this project."""
    with tempfile.TemporaryDirectory(prefix="lrp-verify-") as scratch:
        inputs, outputs = Path(scratch) / "inputs.npz", Path(scratch) / "outputs.npz"
        np.savez(inputs, x=x, target=target)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        command = [sys.executable, "-I", str(Path(runner.__file__).resolve()), str(artifact.resolve()),
                   str(inputs), str(outputs)]
        result = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True, timeout=timeout_s)
        if result.returncode != 0:
            lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
            raise runner.ArtifactError(lines[-1] if lines else f"runner exited with {result.returncode}")
        with np.load(outputs) as data:
            return {key: data[key] for key in data.files}


def verify_artifacts(lrp: LRPModel, config, out_dir: Path, written: dict[str, str]) -> dict[str, dict]:
    """Each artifact against eager `LRPModel` on a fixed batch of a size other than the export's."""
    from .artifacts import example_inputs

    x, target = example_inputs(config, batch=config.example_batch + 1, seed=1)
    logits, relevance = lrp.explain(x, target)
    if config.channel_sum:
        relevance = relevance.sum(dim=1)
    expected = {"logits": logits.numpy(), "relevance": relevance.numpy()}
    results = {}
    for fmt, name in written.items():
        try:
            got = run_fresh(out_dir / name, x.numpy(), target.numpy())
        except (runner.ArtifactError, subprocess.TimeoutExpired) as error:
            results[fmt] = {"ok": False, "message": f"{name}: {error}"}
            continue
        differences = {key: relative_difference(got[key], expected[key]) for key in expected}
        ok = all(d <= TOLERANCE for d in differences.values())
        detail = ", ".join(f"{k} {v:.2e}" for k, v in differences.items())
        results[fmt] = {"ok": ok, "differences": differences, "tolerance": TOLERANCE,
                        "message": f"{name}: max relative difference to eager {detail}"
                                   + ("" if ok else f" exceeds {TOLERANCE:.0e}")}
    return results

