"""A run's record as its readers see it (the report, SpRAy, the CLI, a resumed run): manifest.json, or for a run
that has not finished the identity run.json recorded when it started, as frozen dataclasses. `Manifest.from_record`
is the one reader: it checks each field's type and gives what an older run did not record its default, once; a
malformed file is one ManifestError naming the file and the field."""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from export.json_fields import Fields
from export.sidecar import ArtifactMetadata, WeightsRecord
from lrp_module.demo_model import NAMES as DEMO_MODELS

from .classes import ModelClasses, model_classes
from .errors import PipelineError
from .layout import RunLayout


class ManifestError(PipelineError, ValueError):
    """A run's manifest.json or run.json is unreadable or malformed; the message names the file and the field."""


@dataclass(frozen=True)
class RecordedConfig:
    """The run's configuration as recorded (manifest "config", run.json "identity"), as far as its readers show
    it; None: not recorded (run.json's identity has no `dataset`, a hand-made record may lack anything)."""

    dataset: str | None = None
    root: str | None = None
    model: str | None = None
    composite: str | None = None
    top_k: float | None = None
    target: str | int | None = None
    size: int | None = None  # None: the maps' side is the shards' (run_reader.map_size), never a guess
    map_dtype: str | None = None

    @classmethod
    def from_fields(cls, fields: Fields | None) -> RecordedConfig:
        if fields is None:
            return cls()
        return cls(dataset=fields.text("dataset", None), root=fields.text("root", None),
                   model=fields.text("model", None), composite=fields.text("composite", None),
                   top_k=fields.number("top_k", None), target=fields.text_or_integer("target", None),
                   size=fields.integer("size", None), map_dtype=fields.text("map_dtype", None))


@dataclass(frozen=True)
class Totals:
    """Images in the dataset (its limit), explained, and failed (rows of failures.parquet)."""

    images: int
    explained: int
    failed: int


@dataclass(frozen=True)
class ShardEntry:
    """What a resumed run keeps of a shard's entry: its statistics' hash and who explained it in which invocation."""

    shard: int
    stats_sha256: str | None = None
    worker: Mapping[str, Any] | None = None
    invocation: int = 1  # manifests written before invocations were counted: the first


@dataclass(frozen=True)
class Invocation:
    """One invocation of the run (`record` as written, kept whole by the next), its seconds and retry counts."""

    record: Mapping[str, Any]
    seconds: float = 0.0
    retries: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    """A run's manifest.json (`finished`), or only run.json's configuration (not finished: every other field
    empty), or neither (a folder holding only shards: nothing recorded)."""

    path: Path  # the file read, or the manifest.json a run would write
    finished: bool
    config: RecordedConfig = field(default_factory=RecordedConfig)
    weights: WeightsRecord = field(default_factory=WeightsRecord)
    random_weights: bool = False
    totals: Totals | None = None
    failure_reasons: Mapping[str, int] = field(default_factory=dict)
    precision: Mapping[str, Any] | None = None  # the float64 probe's record (lrp_module.oracle.probe_record)
    classes: ModelClasses | None = None  # None: a run made before the manifest recorded them (see `artifact`)
    artifact: ArtifactMetadata | None = None  # the artifact's sidecar metadata
    shards: tuple[ShardEntry, ...] = ()
    invocations: tuple[Invocation, ...] = ()

    @classmethod
    def from_record(cls, record: Any, path: Path, finished: bool = True) -> Manifest:
        """Check and read a manifest's record (`finished`) or run.json's (its "identity" only); ManifestError
        naming `path` and the field when one is malformed."""
        where = str(path)
        fields = Fields(record, where, ManifestError)
        if not finished:
            return cls(path, False, RecordedConfig.from_fields(fields.child("identity", None)))
        totals = fields.child("totals", None)
        artifact = fields.mapping("artifact", None)
        return cls(
            path, True, RecordedConfig.from_fields(fields.child("config", None)),
            weights=WeightsRecord.from_fields(fields.child("weights", None)),
            random_weights=fields.flag("random_weights", False),
            totals=Totals(totals.integer("images"), totals.integer("explained"), totals.integer("failed"))
            if totals else None,
            failure_reasons=_counts(fields.child("failure_reasons", None)),
            precision=fields.mapping("precision", None),
            classes=_classes(fields.child("classes", None)),
            artifact=ArtifactMetadata.from_record(artifact, where, ManifestError, "artifact") if artifact else None,
            shards=tuple(_shard(Fields(entry, where, ManifestError, f"shards[{i}]"))
                         for i, entry in enumerate(fields.items("shards", []))),
            invocations=tuple(_invocation(Fields(entry, where, ManifestError, f"invocations[{i}]"))
                              for i, entry in enumerate(fields.items("invocations", []))))


def read_manifest(layout: RunLayout) -> Manifest:
    """The run's manifest.json, else (a run not finished) its run.json, else an empty record."""
    for path, finished in ((layout.manifest, True), (layout.run_file, False)):
        if path.is_file():
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as problem:
                raise ManifestError(f"{path}: unreadable ({problem})") from None
            return Manifest.from_record(record, path, finished)
    return Manifest(layout.manifest, False)


def _counts(fields: Fields | None) -> dict[str, int]:
    return {name: fields.integer(name) for name in fields.record} if fields else {}


def _classes(fields: Fields | None) -> ModelClasses | None:
    if fields is None:
        return None
    return ModelClasses(fields.integer("count"), fields.texts("names", None) or None,
                        fields.texts("wnids", None) or None, fields.text("source", "none"))


def _shard(fields: Fields) -> ShardEntry:
    return ShardEntry(fields.integer("shard"), fields.text("stats_sha256", None), fields.mapping("worker", None),
                      fields.integer("invocation", 1))


def _invocation(fields: Fields) -> Invocation:
    retries = fields.child("retries", None)
    counts = {name: retries.number(name) for name in retries.record} if retries else {}
    return Invocation(fields.record, fields.number("seconds", 0.0), counts)


def class_table(manifest: Manifest, seen: int) -> tuple[list[str], list[str]]:
    """Exactly the model's classes: their names and ids as the run recorded them (manifest "classes"; for a run
    made before that, rebuilt from its artifact by the same rule, `seen` classes where the artifact does not say how
    many: one more than the largest class index the run's statistics hold). The id is the class's WordNet id where
    the model's classes have them (ImageNet's, a --classes TSV, the demos' own), else `class-<index>`; a class
    without a name is called `class <index>`: nothing is invented from the dataset or from ImageNet."""
    classes = manifest.classes
    if classes is None:
        artifact = manifest.artifact
        count = artifact.class_count if artifact and artifact.class_count else seen
        model = manifest.config.model or ""
        kind = artifact.weights.kind if artifact else None
        names = list(artifact.class_names) if artifact and artifact.class_names else None
        imagenet_head = model not in DEMO_MODELS and kind in (None, "random", "file")
        classes = model_classes(count, model, names, None, imagenet_head)
    names = list(classes.names) if classes.names else [f"class {i}" for i in range(classes.count)]
    wnids = list(classes.wnids) if classes.wnids else [f"class-{i}" for i in range(classes.count)]
    return names, wnids
