"""A P-ClArC-corrected model (lrp_module/projection.py) as files: its weights (a state dict that carries the
projection, so `build_model(name, file)` rebuilds it and every command taking WEIGHTS=<file> uses it), the LRP
artifacts (TorchScript, ONNX) verified in a fresh process against the float64 oracle like every export, and the
forward-only classifier checked against them.

    OUT/model.pt                   the corrected model's state dict (MODEL=<name> WEIGHTS=OUT/model.pt)
    OUT/lrp.torchscript.pt, lrp.onnx, lrp.json   the LRP artifacts and their sidecar (export/artifacts.py)
    OUT/classifier.torchscript.pt, classifier.onnx   the forward-only classifier (export/classifier.py)
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from lrp_module.files import atomic
from lrp_module.zoo import build_model

from .artifacts import FILENAMES, ExportConfig, ExportError, export_artifacts
from .classifier import CLASSIFIER_FILE, CLASSIFIER_ONNX, export_classifier, export_classifier_onnx
from .verify import relative_difference

WEIGHTS_FILE = "model.pt"
FORMATS = ("torchscript", "onnx")
ROUND_TRIP_TOLERANCE = 1e-6  # max |difference| / max |logit| between the in-memory model and the one rebuilt


def save_weights(model: nn.Module, path: Path) -> None:
    """The corrected model's state dict (float32, on the CPU), written atomically."""
    state = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
    with atomic(path) as tmp:
        torch.save(state, tmp)


def check_round_trip(model: nn.Module, name: str, weights: Path, size: int) -> float:
    """The model rebuilt from its weights file gives the in-memory model's logits (the file carries the projection);
    returns their relative difference, an ExportError beyond the tolerance."""
    rebuilt, _ = build_model(name, str(weights))
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        difference = relative_difference(rebuilt(x).numpy(), model.eval()(x).numpy())
    if not difference <= ROUND_TRIP_TOLERANCE:
        raise ExportError(f"{weights}: the model rebuilt from it differs from the corrected model by {difference:.2e}")
    return difference


def export_corrected(model: nn.Module, name: str, composite: str, size: int, out_dir: str | os.PathLike) -> dict:
    """Write the corrected `model` (built from zoo model `name`) into `out_dir`: weights, LRP artifacts (verified
    against float64 in a fresh process) and classifier. Returns what was written and the checks."""
    out = Path(out_dir)
    created = not out.exists()
    written = [out / WEIGHTS_FILE, *(out / FILENAMES[f] for f in FORMATS), out / "lrp.json", out / CLASSIFIER_FILE,
               out / CLASSIFIER_ONNX]
    if any(path.exists() for path in written):
        raise ExportError(f"{out} already holds a corrected model's files: choose another folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        weights = out / WEIGHTS_FILE
        save_weights(model, weights)
        round_trip = check_round_trip(model, name, weights, size)
        record = export_artifacts(ExportConfig(model=name, weights=str(weights), composite=composite, height=size,
                                               width=size, formats=FORMATS), out, verify=True)
        classifier = export_classifier(name, str(weights), size, out / CLASSIFIER_FILE,
                                       lrp_artifact=out / FILENAMES["torchscript"])
        classifier_onnx = export_classifier_onnx(name, str(weights), size, out / CLASSIFIER_ONNX)
    except BaseException:  # a failed export leaves none of its files (and not the folder it created)
        for path in written:
            path.unlink(missing_ok=True)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    return {"weights": WEIGHTS_FILE, "artifacts": record["artifacts"], "sidecar": "lrp.json",
            "classifier": CLASSIFIER_FILE, "classifier_onnx": CLASSIFIER_ONNX, "round_trip": round_trip,
            "verification": {fmt: {"ok": r["ok"], "message": r["message"]}
                             for fmt, r in (record["verification"] or {}).items()},
            "classifier_checks": {**classifier["checks"], "onnx_eager": classifier_onnx["checks"]["eager"]},
            "rules": [list(r) for r in record["metadata"]["rules"]
                                                                 if "pclarc" in r[0]]}
