"""Load and run an exported LRP artifact with torch / onnxruntime alone: no import of this project.

This file is also the fresh-process verifier: `python -I runner.py ARTIFACT INPUTS.npz OUTPUTS.npz` loads the
artifact, runs it on the saved batch, writes the outputs, and fails if any module of this project got imported.
Copy it next to your artifacts to use them anywhere:

    from runner import load_artifact
    explain = load_artifact("lrp.onnx")              # or lrp.torchscript.pt, lrp.pt2
    logits, relevance = explain(x, target)           # numpy in, numpy out; target -1 = predicted class

An artifact exported with concepts (`--concepts`) returns more outputs after these two, in the order of the keys of
its metadata's "outputs" (`output_names(path)`): concept relevance, most relevant neurons, channels and maps.
"""
from __future__ import annotations

import json
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

PROJECT_PACKAGES = ("lrp_module", "export", "pipeline")
FORMATS = {".pt": "torchscript", ".onnx": "onnx", ".pt2": "torch.export"}
METADATA_KEY = "lrp_metadata"


class ArtifactError(RuntimeError):
    """An artifact is missing, corrupt or of an unknown kind, or is given an input size it was not exported for;
    the message names the file."""


def artifact_format(path: str | Path) -> str:
    suffix = Path(path).suffix
    if suffix not in FORMATS:
        raise ArtifactError(f"{path}: unknown artifact type {suffix!r} (expected one of {', '.join(FORMATS)})")
    return FORMATS[suffix]


def load_artifact(path: str | Path, device: str = "cpu") -> Callable[[np.ndarray, np.ndarray], tuple]:
    """A function (x float32 (N,3,H,W), target int64 (N,)) -> (logits, relevance, ...) as numpy arrays (the
    outputs `output_names` lists). Every format runs at the exported input size only (the batch size is free);
    another size is an ArtifactError."""
    path = Path(path)
    kind = artifact_format(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such artifact file")
    try:
        run = _load_onnx(path, device) if kind == "onnx" else _load_torch(path, kind, device)
    except ArtifactError:
        raise
    except Exception as error:  # corrupt or truncated files fail deep inside the loaders
        detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise ArtifactError(f"{path}: cannot load {kind} artifact (corrupt or incomplete?): {detail}") from None
    return _size_checked(path, run)


def _size_checked(path: Path, run: Callable) -> Callable[[np.ndarray, np.ndarray], tuple]:
    """`run`, refusing in one line an input of another size than the one in the artifact's metadata: the
    exporters fix sizes (the top-k kept count among them) at the exported size."""
    height, width = read_metadata(path)["input"]["shape"][2:]

    def checked(x: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shape = tuple(np.shape(x))
        if len(shape) != 4 or shape[2:] != (height, width):
            size = " ".join(map(str, shape[2:])) if len(shape) == 4 else "H W"
            raise ArtifactError(f"{path}: exported for input size {height}x{width} (N, 3, {height}, {width}), got x "
                                f"of shape {shape}; export again with --size {size}")
        return run(x, target)
    return checked


def output_names(path: str | Path) -> list[str]:
    """The artifact's outputs in order: its metadata's "outputs" keys (logits, relevance, then any concept
    outputs)."""
    return list(read_metadata(path)["outputs"])


def read_metadata(path: str | Path) -> dict:
    """The provenance stored inside an artifact."""
    path = Path(path)
    kind = artifact_format(path)
    try:
        if kind == "onnx":
            import onnx

            model = onnx.load(str(path), load_external_data=False)
            props = {p.key: p.value for p in model.metadata_props}
            return json.loads(props[METADATA_KEY])
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith(f"{METADATA_KEY}.json"))
            return json.loads(archive.read(name))
    except Exception as error:
        raise ArtifactError(f"{path}: no readable metadata ({type(error).__name__})") from None


def _load_onnx(path: Path, device: str):
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(str(path), providers=providers)

    def run(x: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(session.run(None, {"x": np.ascontiguousarray(x, np.float32),
                                        "target": np.ascontiguousarray(target, np.int64)}))
    return run


def _load_torch(path: Path, kind: str, device: str):
    import torch

    if kind == "torchscript":
        module = torch.jit.load(str(path), map_location=device)
    else:
        module = torch.export.load(str(path)).module()
        module.to(device)

    def run(x: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, ...]:
        with torch.no_grad():
            outputs = module(torch.as_tensor(x, device=device), torch.as_tensor(target, device=device))
        return tuple(output.cpu().numpy() for output in outputs)
    return run


class _RefuseProjectImports:
    """Import hook: any import of this project's packages fails, proving the artifact stands alone."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in PROJECT_PACKAGES:
            raise ImportError(f"artifact check: {name} must not be imported")
        return None


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: runner.py ARTIFACT INPUTS.npz OUTPUTS.npz", file=sys.stderr)
        return 2
    sys.meta_path.insert(0, _RefuseProjectImports())
    artifact, inputs, saved = argv
    batch = np.load(inputs)
    try:
        outputs = load_artifact(artifact)(batch["x"], batch["target"])
        names = output_names(artifact)
    except ArtifactError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in PROJECT_PACKAGES)
    if leaked:
        print(f"error: project modules were imported: {leaked}", file=sys.stderr)
        return 1
    if len(names) != len(outputs):
        print(f"error: {artifact}: {len(outputs)} outputs, its metadata names {len(names)}", file=sys.stderr)
        return 1
    np.savez(saved, **dict(zip(names, outputs)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
