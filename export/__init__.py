"""The LRP-augmented model (VGG or ResNet) as TorchScript, ONNX and torch.export artifacts, verified in a fresh
process."""
from .artifacts import FILENAMES, SIDECAR, ExportConfig, ExportError, export_artifacts
from .runner import ArtifactError, load_artifact, read_metadata

__all__ = ["FILENAMES", "SIDECAR", "ArtifactError", "ExportConfig", "ExportError", "export_artifacts",
           "load_artifact", "read_metadata"]
