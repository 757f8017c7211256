"""Verify exported artifacts in a fresh Python process that cannot import this project, against the float64 oracle.

Each artifact's outputs are compared with eager LRP recomputed in float64 on the CPU (`lrp_module.oracle`), and
must be no further from it than `oracle.bound` of eager float32's own distance on the same batch: float32 LRP is
ill-conditioned on random weights, so a fixed bound between two float32 implementations holds on one CPU only.
Imports nothing of export/artifacts.py (which calls it): the dependency runs one way, artifacts -> verify -> runner.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lrp_module import oracle

from . import runner
from .concept_check import ConceptReference, check_concepts

OUTPUTS = ("logits", "relevance")
FLOORS = {"logits": oracle.LOGITS_FLOOR, "relevance": oracle.FLOOR}


def relative_difference(ours: np.ndarray, reference: np.ndarray) -> float:
    scale = float(np.abs(reference).max()) or 1.0
    return float(np.abs(ours - reference).max()) / scale


@dataclass
class Reference:
    """One fixed batch, its float64 outputs and eager float32's: what every artifact is checked against."""

    x: torch.Tensor
    target: torch.Tensor
    float64: dict[str, torch.Tensor]
    eager: dict[str, torch.Tensor]
    concepts: ConceptReference | None = None  # an artifact with concept outputs (export/concept_check.py)

    def eager_error(self, key: str) -> float:
        return oracle.compare(self.eager[key], self.float64[key]).worst


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


def check_outputs(name: str, got: dict[str, np.ndarray], reference: Reference) -> dict:
    """One artifact's outputs against float64: ok when each is within the bound derived from eager float32 (the
    concept outputs too, where the artifact has them)."""
    entry: dict = {"ok": True, "reference": "float64-cpu", "outputs": {}}
    problems, details = [], []
    for key in OUTPUTS:
        agreement = oracle.compare(torch.from_numpy(np.asarray(got[key])), reference.float64[key])
        eager = reference.eager_error(key)
        limit = oracle.bound(eager, FLOORS[key])
        entry["outputs"][key] = {**agreement.summary(), "eager_float32": eager, "bound": limit}
        details.append(f"{key} {agreement.worst:.2e}")
        if not agreement.worst <= limit:  # NaN fails too
            problems.append(f"{key} {agreement.worst:.2e} exceeds the bound {limit:.1e} ({oracle.MULTIPLE:g} x eager "
                            f"float32's {eager:.1e}, floor {FLOORS[key]:.0e})")
    if reference.concepts is not None:
        outputs, concept_problems, concept_details = check_concepts(got, reference.concepts)
        entry["outputs"].update(outputs)
        problems += concept_problems
        details += concept_details
    entry["ok"] = not problems
    entry["message"] = f"{name}: max relative difference to float64 " + (
        "; ".join(problems) if problems else ", ".join(details) + " (within the bounds)")
    return entry


def verify_artifacts(reference: Reference, out_dir: Path, written: dict[str, str]) -> dict[str, dict]:
    """Each artifact, run in a fresh process on the reference batch (a size other than the export's)."""
    results = {}
    for fmt, name in written.items():
        try:
            got = run_fresh(out_dir / name, reference.x.numpy(), reference.target.numpy())
        except (runner.ArtifactError, subprocess.TimeoutExpired) as error:
            results[fmt] = {"ok": False, "message": f"{name}: {error}"}
            continue
        results[fmt] = check_outputs(name, got, reference)
    return results
