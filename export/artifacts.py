"""Write the LRP-augmented model (any VGG or ResNet) as TorchScript, ONNX and torch.export artifacts plus a metadata
sidecar.

The whole set is written and verified in a temporary folder inside the output directory and moved into place
when complete (artifacts, then the sidecar), so an interrupted or failed export leaves the output directory as it
was: no half-written set, no replaced artifact, and no folder it created itself; it never deletes anything else.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lrp_module import LRPModel
from lrp_module.composites import get_composite
from lrp_module.files import reason, temporary_name
from lrp_module.oracle import Float64Oracle, numeric_settings, probe_record
from lrp_module.weights_recipe import IMAGENET_MEAN, IMAGENET_RECIPE, IMAGENET_STD
from lrp_module.zoo import WeightsInfo, build_model

from .concept_check import ConceptReference
from .concepts import ConceptOutputs, ConceptRequest, concepts_record
from .runner import METADATA_KEY
from .sidecar import SIDECAR
from .verify import Reference, verify_artifacts

FILENAMES = {"torchscript": "lrp.torchscript.pt", "onnx": "lrp.onnx", "torch.export": "lrp.pt2"}
ONNX_LIMIT = 2 * 1024**3  # protobuf's limit for one self-contained file


class ExportError(RuntimeError):
    """The export cannot go ahead or did not complete; the message says why."""


class VerificationError(ExportError):
    """The artifacts were written but one differs from eager LRP (exit code 1, as a run with failed images)."""


@dataclass
class ExportConfig:
    """What to export: one model + weights + composite + top-k, for one input size."""

    model: str = "vgg16"
    weights: str = "imagenet"
    composite: str = "epsilon_gamma_box"
    top_k: float = 0.0
    rescale_top_k: bool = False
    height: int = IMAGENET_RECIPE.crop  # the weights' crop
    width: int = IMAGENET_RECIPE.crop
    channel_sum: bool = True
    formats: tuple[str, ...] = ("torchscript", "onnx", "torch.export")
    example_batch: int = 2
    num_classes: int | None = None
    composite_params: dict = field(default_factory=dict)
    concepts: ConceptRequest | None = None  # concept outputs (CRP) after logits and relevance (export/concepts.py)

    def validate(self) -> None:
        unknown = [f for f in self.formats if f not in FILENAMES]
        if unknown:
            raise ExportError(f"unknown format(s) {unknown}; choose from {', '.join(FILENAMES)}")
        get_composite(self.composite, **self.composite_params)  # unknown name or parameters: one clear line
        concepts = self.concepts
        if concepts is not None and (not concepts.layers or isinstance(concepts.maps, bool)
                                     or not isinstance(concepts.maps, int) or concepts.maps < 0):
            raise ExportError(f"concepts need at least one layer and maps >= 0, got {concepts}")
        if self.example_batch < 2:
            raise ExportError("example_batch must be >= 2 (a batch of 1 would be specialised by the exporters)")


def build_explainer(config: ExportConfig) -> tuple[LRPModel, WeightsInfo, nn.Module]:
    """The LRP model, where its weights came from, and the network it was built from (the float64 oracle's source)."""
    model, info = build_model(config.model, config.weights, config.num_classes)
    lrp = LRPModel(model, config.composite, top_k=config.top_k, rescale_top_k=config.rescale_top_k,
                   composite_params=config.composite_params)
    return lrp, info, model


def metadata(config: ExportConfig, lrp: LRPModel, info: WeightsInfo) -> dict:
    import onnx
    import onnxruntime

    record = {
        "format_version": 1,
        "model": config.model,
        "weights": info.to_dict(),
        "composite": lrp.composite.describe(),
        "rules": lrp.rule_table(),
        "top_k": config.top_k,
        "rescale_top_k": config.rescale_top_k,
        "input": {"shape": ["N", 3, config.height, config.width], "dtype": "float32",
                  "normalisation": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}},
        "target": "int64 (N,), class index; -1 means the predicted class",
        "outputs": {"logits": ["N", lrp.num_classes],
                    "relevance": ["N", config.height, config.width] if config.channel_sum
                    else ["N", 3, config.height, config.width]},
        "class_names": info.categories,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    if config.concepts is not None:  # the outputs after logits and relevance, in order (export/concepts.py)
        concepts = concepts_record(lrp, config.concepts, config.height, config.width)
        record["concepts"] = concepts.record()
        shapes = [*(["N", layer.channels] for layer in concepts.layers)] * 2
        if concepts.maps:
            maps = ["N", concepts.maps, config.height, config.width] if config.channel_sum \
                else ["N", concepts.maps, 3, config.height, config.width]
            shapes += [["N", concepts.maps], maps]
        record["outputs"].update(zip(concepts.output_names()[2:], shapes))
    return record


def example_inputs(config: ExportConfig, batch: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch: images and targets mixing explicit classes and -1."""
    generator = torch.Generator().manual_seed(seed)
    n = batch or config.example_batch
    x = torch.randn(n, 3, config.height, config.width, generator=generator)
    target = torch.arange(n) % 3 - 1  # -1, 0, 1, -1, ...
    return x, target


def prepare_output(out_dir: Path) -> tuple[Path, list[Path]]:
    """Create the directory (and its missing parents) and the temporary folder the set is written in, before any
    work is done: (that folder, the folders this created, deepest first)."""
    created, folder = [], out_dir.absolute()
    while not folder.exists() and folder != folder.parent:
        created.append(folder)
        folder = folder.parent
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=temporary_name("export-"), dir=out_dir)), created
    except OSError as error:
        remove_created(created)
        raise ExportError(f"output directory {out_dir} is not writable: {error.strerror or error}") from None


def remove_created(created: list[Path]) -> None:
    """Remove the folders an export created, deepest first, while they are empty (never anything in them)."""
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            return


def _check_input_size(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Refuse an input of another size than the export's (scripted, so the check stays in the traced graph)."""
    if x.dim() != 4 or x.size(2) != height or x.size(3) != width:
        raise ValueError("this LRP artifact was exported for input size " + str(height) + "x" + str(width)
                         + " (N, 3, " + str(height) + ", " + str(width) + "), got " + str(x.shape)
                         + "; export again with --size H W")
    return x


class SizeChecked(nn.Module):
    """The exportable module behind an input-size check, for TorchScript: a trace fixes every size-derived
    number (the top-k kept count, pooling windows) at the traced size but would accept any other size, where
    ONNX and torch.export refuse one; the traced artifact refuses it too."""

    def __init__(self, module: nn.Module, height: int, width: int) -> None:
        super().__init__()
        self.module, self.height, self.width = module, height, width
        self.check = torch.jit.script(_check_input_size)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.module(self.check(x, self.height, self.width), target)


def _export_torchscript(module, inputs, meta: str, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is deprecated (FutureWarning) and tracing warns on shapes
        height, width = inputs[0].shape[2:]
        traced = torch.jit.trace(SizeChecked(module, int(height), int(width)), inputs, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={f"{METADATA_KEY}.json": meta})


def _dynamic_batch() -> tuple[dict, dict]:
    batch = torch.export.Dim("batch", min=1, max=4096)
    return {0: batch}, {0: batch}


def _export_program(module, inputs, meta: str, path: Path) -> None:
    program = torch.export.export(module, inputs, dynamic_shapes=_dynamic_batch())
    torch.export.save(program, str(path), extra_files={f"{METADATA_KEY}.json": meta})


def _export_onnx(module, inputs, meta: str, path: Path) -> None:
    import onnx

    names = list(json.loads(meta)["outputs"])  # logits, relevance and any concept outputs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # optimize=False: the exporter's graph optimiser drops `z + 1e-9` as a no-op (seen with onnxscript
        # 0.7.2), which turns the montavon/seed stabilisers into 0/0; onnxruntime optimises the graph anyway
        program = torch.onnx.export(module, inputs, dynamo=True, dynamic_shapes=_dynamic_batch(), verbose=False,
                                    optimize=False, input_names=["x", "target"],
                                    output_names=names)
    proto = program.model_proto
    if proto.ByteSize() >= ONNX_LIMIT:
        raise ExportError(f"the ONNX model is {proto.ByteSize() / 2**30:.1f} GiB, over protobuf's 2 GiB for "
                          "one self-contained file; use the TorchScript or torch.export artifact")
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, meta
    onnx.save(proto, str(path))


EXPORTERS = {"torchscript": _export_torchscript, "onnx": _export_onnx, "torch.export": _export_program}


def export_artifacts(config: ExportConfig, out_dir: str | os.PathLike, verify: bool = True) -> dict:
    """Build the model the config names, then write and verify its artifacts (see `write_artifacts`)."""
    config.validate()
    lrp, info, model = build_explainer(config)  # bad weights fail here, before OUT exists
    return write_artifacts(lrp, info, config, out_dir, verify, source=model)


def reference_batch(lrp: LRPModel, source: nn.Module, config: ExportConfig) -> Reference:
    """The verification batch (another size than the export's) with its float64 and eager float32 outputs. The
    float64 pass goes one image at a time, and its oracle is dropped before eager float32 runs: the check holds the
    float64 weights and one image's float64 activations at once, not a batch's (issue 20.4)."""
    x, target = example_inputs(config, batch=config.example_batch + 1, seed=1)
    float64 = Float64Oracle.like(source, lrp).explain_each(x, target, channel_sum=config.channel_sum)
    eager_logits, eager_relevance = lrp.explain(x, target)
    eager = (eager_logits, eager_relevance.sum(1) if config.channel_sum else eager_relevance)
    outputs = {kind: {"logits": logits, "relevance": relevance}
               for kind, (logits, relevance) in (("float64", float64), ("eager", eager))}
    concepts = None
    if config.concepts is not None:  # each layer's relevance in float64 (one image at a time) and eager float32
        record = concepts_record(lrp, config.concepts, config.height, config.width)
        concepts = ConceptReference.build(lrp, source, config.concepts, record, x, target, config.channel_sum)
    return Reference(x, target, outputs["float64"], outputs["eager"], concepts)


def write_artifacts(lrp: LRPModel, info: WeightsInfo, config: ExportConfig, out_dir: str | os.PathLike,
                    verify: bool = True, *, source: nn.Module) -> dict:
    """Write the chosen artifacts and the sidecar into out_dir; verify each in a fresh process against the float64
    oracle built from `source` (the VGG `lrp` was built from) unless told not to; record the precision probe
    (eager float32 against float64 on the same batch) either way. Returns the sidecar record."""
    out_dir = Path(out_dir)
    config.validate()
    staging, created = prepare_output(out_dir)
    try:
        record = _write_set(lrp, info, config, staging, verify, source)
        for name in [*record["artifacts"].values(), SIDECAR]:  # the sidecar last: it describes the set
            os.replace(staging / name, out_dir / name)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)  # the export's own temporary folder
        remove_created(created)
        if isinstance(error, OSError):  # disk full, permissions: one line, as any other failed export
            raise ExportError(f"cannot write the artifacts in {out_dir}: {reason(error)}") from error
        raise
    staging.rmdir()
    failed = [r for r in (record["verification"] or {}).values() if not r["ok"]]
    if failed:
        raise VerificationError("verification failed: " + "; ".join(r["message"] for r in failed))
    return record


def _write_set(lrp: LRPModel, info: WeightsInfo, config: ExportConfig, out_dir: Path, verify: bool,
               source: nn.Module) -> dict:
    """Write and verify the artifacts and the sidecar into the (temporary) folder out_dir; the sidecar record."""
    meta = metadata(config, lrp, info)
    meta_json = json.dumps(meta)
    module = (ConceptOutputs(lrp, config.concepts, config.channel_sum) if config.concepts is not None
              else lrp.exportable(channel_sum=config.channel_sum)).eval()
    inputs = example_inputs(config)
    written: dict[str, str] = {}
    for fmt in config.formats:
        path = out_dir / FILENAMES[fmt]
        try:
            EXPORTERS[fmt](module, inputs, meta_json, path)
        except ExportError:
            raise
        except Exception as error:
            raise ExportError(f"{fmt} export failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}") \
                from error
        written[fmt] = path.name
    reference = reference_batch(lrp, source, config)
    record = {"artifacts": written, "metadata": meta, "config": asdict(config), "verification": None,
              "precision": probe_record(reference.eager["relevance"], reference.float64["relevance"],
                                        numeric_settings(lrp.steps[0].weight.device))}
    if verify:
        record["verification"] = verify_artifacts(reference, out_dir, written)
    (out_dir / SIDECAR).write_text(json.dumps(record, indent=2, default=_json_default), encoding="utf-8")
    return record


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value).__name__)
