"""A forward-only classifier beside the LRP artifact, as TorchScript (and ONNX for a corrected model, which a user
deploys). Pixel flipping needs hundreds of plain forward passes per image; the LRP module would compute a relevance
map on each, the traced model does not."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from lrp_module.files import atomic
from lrp_module.zoo import build_model

from .artifacts import ExportError
from .verify import relative_difference

CLASSIFIER_FILE = "classifier.torchscript.pt"
CLASSIFIER_ONNX = "classifier.onnx"
TOLERANCE = 1e-4  # max |difference| over max |reference logit|, as for the LRP artifacts


def export_classifier(model: str, weights: str, size: int, path: Path, lrp_artifact: Path | None = None) -> dict:
    """Trace `model` with `weights` at size x size, check it against eager PyTorch (and, when given, against the
    logits of the LRP artifact built from the same weights) on a batch of another size, write it atomically.
    Returns the checks; a failed check is an ExportError naming the difference and nothing is written."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights warn; tracing and TorchScript's deprecation warn
        vgg, info = build_model(model, weights)
        traced = torch.jit.trace(vgg, torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)),
                                 check_trace=False)
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = traced(x)
        checks = {"eager": relative_difference(logits.numpy(), vgg(x).numpy())}
        if lrp_artifact is not None:
            lrp_logits = torch.jit.load(str(lrp_artifact))(x, torch.full((3,), -1))[0]  # concept artifacts: more
            checks["lrp_artifact"] = relative_difference(logits.numpy(), lrp_logits.numpy())
    failed = {k: v for k, v in checks.items() if not v <= TOLERANCE}
    if failed:
        detail = ", ".join(f"{k} {v:.2e}" for k, v in failed.items())
        raise ExportError(f"{path.name}: traced classifier logits differ from {detail} (tolerance {TOLERANCE:.0e})")
    meta = {"model": model, "weights": info.to_dict(), "input": ["N", 3, size, size], "output": "logits (N, classes)",
            "checks": checks, "tolerance": TOLERANCE}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic(path) as tmp:
        torch.jit.save(traced, str(tmp), _extra_files={"classifier_metadata.json": json.dumps(meta)})
    return meta


def export_classifier_onnx(model: str, weights: str, size: int, path: Path) -> dict:
    """`model` with `weights` as an ONNX classifier (input `x` (N, 3, size, size), output `logits`, N dynamic),
    checked with onnxruntime against eager PyTorch on a batch of another size than the export's; written atomically,
    nothing written and an ExportError naming the difference when the check fails. Returns the check."""
    import onnx
    import onnxruntime

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net, info = build_model(model, weights)
        batch = torch.export.Dim("batch", min=1, max=4096)
        program = torch.onnx.export(net, (torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)),),
                                    dynamo=True, dynamic_shapes=({0: batch},), verbose=False, input_names=["x"],
                                    output_names=["logits"])
    proto = program.model_proto
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        difference = relative_difference(session.run(None, {"x": x.numpy()})[0], net(x).numpy())
    if not difference <= TOLERANCE:
        raise ExportError(f"{path.name}: ONNX classifier logits differ from eager PyTorch by {difference:.2e} "
                          f"(tolerance {TOLERANCE:.0e})")
    meta = {"model": model, "weights": info.to_dict(), "input": ["N", 3, size, size], "output": "logits (N, classes)",
            "checks": {"eager": difference}, "tolerance": TOLERANCE}
    entry = proto.metadata_props.add()
    entry.key, entry.value = "classifier_metadata", json.dumps(meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic(path) as tmp:
        onnx.save(proto, str(tmp))
    return meta
