"""lrp.json, the sidecar written beside the artifacts (export/artifacts.py), as frozen dataclasses.
`ArtifactSidecar.read` is the file's one reader and `ArtifactMetadata.from_record` the one reader of the metadata
it holds (which a run's manifest copies as "artifact"): each field's type is checked there, and a field that an
older export did not write takes its default there, once. A malformed sidecar is one SidecarError naming the file
and the field."""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .concepts import ConceptLayerRecord, ConceptsRecord
from .json_fields import Fields
from .runner import ArtifactError

SIDECAR = "lrp.json"
DEFAULT_START = "logit"  # what LRP starts from when the composite's record does not say (exports before `start`)


class SidecarError(ArtifactError):
    """An artifact's sidecar is unreadable or malformed; the message names the file and the field."""


@dataclass(frozen=True)
class WeightsRecord:
    """Where the model's weights came from (lrp_module.zoo.WeightsInfo.to_dict): kind imagenet | demo | file |
    random, the file or URL, its hash."""

    kind: str | None = None
    source: str | None = None
    sha256: str | None = None

    @classmethod
    def from_fields(cls, fields: Fields | None) -> WeightsRecord:
        if fields is None:
            return cls()
        return cls(fields.text("kind", None), fields.text("source", None), fields.text("sha256", None))


@dataclass(frozen=True)
class ArtifactMetadata:
    """The provenance an export records (the sidecar's "metadata", also stored inside each artifact), as a run and
    its readers use it; `record` is the metadata as written, copied into a run's manifest and HDF5 attributes."""

    record: Mapping[str, Any]
    weights: WeightsRecord
    start: str = DEFAULT_START  # LRP starts from the target's logit, or a softmax (the composite's `start`)
    class_count: int | None = None  # the logits' width; None only in a run manifest written before it was copied
    class_names: tuple[str, ...] | None = None
    input_size: tuple[int, int] | None = None  # (height, width) the artifact was exported for
    versions: Mapping[str, str] = field(default_factory=dict)
    concepts: ConceptsRecord | None = None  # the concept outputs it computes (export/concepts.py); None: none

    @classmethod
    def from_record(cls, record: Any, where: str, error: type[Exception] = SidecarError,
                    prefix: str = "metadata") -> ArtifactMetadata:
        """Check and read `record` (the object `prefix` of the file `where`); `error` names a malformed field."""
        fields = Fields(record, where, error, prefix)
        composite = fields.child("composite", None)
        outputs, model_input = fields.child("outputs", None), fields.child("input", None)
        logits = outputs.items("logits", None) if outputs else None
        shape = model_input.items("shape", None) if model_input else None
        if logits is not None and (len(logits) != 2 or not isinstance(logits[1], int) or logits[1] < 1):
            raise error(f"{where}: field '{prefix}.outputs.logits' must be [\"N\", classes], got {logits!r:.60}")
        if shape is not None and (len(shape) < 4 or not all(isinstance(side, int) for side in shape[-2:])):
            raise error(f"{where}: field '{prefix}.input.shape' must end in height, width, got {shape!r:.60}")
        versions = fields.mapping("versions", {})
        return cls(record=record, weights=WeightsRecord.from_fields(fields.child("weights")),
                   start=composite.text("start", DEFAULT_START) if composite else DEFAULT_START,
                   class_count=logits[1] if logits else None, class_names=fields.texts("class_names", None),
                   input_size=(shape[-2], shape[-1]) if shape else None,
                   versions={str(k): str(v) for k, v in versions.items()},
                   concepts=_concepts(fields.child("concepts", None)))


def _concepts(fields: Fields | None) -> ConceptsRecord | None:
    """The metadata's "concepts" (an export with concept outputs), each field checked."""
    if fields is None:
        return None
    layers = []
    for i, item in enumerate(fields.items("layers")):
        layer = Fields(item, fields.where, fields.error, f"{fields.prefix}.layers[{i}]")
        layers.append(ConceptLayerRecord(layer.text("name"), layer.integer("channels"), layer.integer("height"),
                                         layer.integer("width")))
    return ConceptsRecord(tuple(layers), fields.text("maps_layer", None), fields.integer("maps", 0),
                          fields.flag("exclude_parallel", True))


@dataclass(frozen=True)
class ArtifactSidecar:
    """lrp.json: the artifact files by format, their metadata, the fresh-process verification (None: not
    verified) and the precision probe of eager float32 against float64."""

    path: Path
    artifacts: Mapping[str, str]
    metadata: ArtifactMetadata
    verification: Mapping[str, Any] | None = None
    precision: Mapping[str, Any] | None = None

    @classmethod
    def read(cls, path: str | Path) -> ArtifactSidecar:
        """The sidecar at `path`; SidecarError naming the file (and the field) when it is unreadable or malformed."""
        path = Path(path)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as problem:
            raise SidecarError(f"{path}: unreadable artifact sidecar ({problem})") from None
        fields = Fields(record, str(path), SidecarError)
        artifacts = fields.mapping("artifacts")
        if not all(isinstance(name, str) for name in artifacts.values()):
            raise SidecarError(f"{path}: field 'artifacts' must map each format to a file name")
        metadata = ArtifactMetadata.from_record(fields.mapping("metadata"), str(path))
        if metadata.class_count is None:
            raise SidecarError(f"{path}: field 'metadata.outputs.logits' is missing")
        return cls(path, artifacts, metadata, fields.mapping("verification", None), fields.mapping("precision", None))
