"""The artifact cache: the traced LRP module (and pixel flipping's traced classifier) for a configuration, built
and verified once, reused by later runs, and loaded only while its hashes say this project built it
(pipeline/artifact_trust.py). Also which weights 'auto' means."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

from export.artifacts import FILENAMES, ExportConfig, export_artifacts
from export.classifier import CLASSIFIER_FILE, export_classifier
from export.concepts import ConceptRequest
from export.sidecar import SIDECAR, ArtifactSidecar
from lrp_module.files import sha256_file, temporary_name
from lrp_module.zoo import WeightsError, build_model, default_weights, weights_file

from .artifact_trust import record_trust, untrusted_reason
from .config import RunConfig

RANDOM_WARNING = ("NO IMAGENET WEIGHTS: this run uses RANDOM weights; its maps say nothing about a trained "
                  "model. Put the torchvision checkpoint in the torch hub cache, or pass WEIGHTS=<file>.")
CLASSIFIER_TRUST_FILE = "classifier.sha256"


class ResolvedWeights(NamedTuple):
    """The weights a run uses, and the loud warning when 'auto' had to fall back to random ones."""

    choice: str
    warning: str | None


def resolve_weights(config: RunConfig) -> ResolvedWeights:
    """'auto' means the model's trained weights (ImageNet's; vgg-shapes' committed ones) where obtainable and
    random (loudly) where not; anything else is taken as asked, and fails when missing."""
    if config.weights != "auto":
        return ResolvedWeights(config.weights, None)
    trained = default_weights(config.model)
    try:
        build_model(config.model, trained)
        return ResolvedWeights(trained, None)
    except WeightsError as error:
        return ResolvedWeights("random", f"{RANDOM_WARNING} ({error})")


def cache_key(config: RunConfig, weights: str) -> str:
    """The cache entry's name: the model (a known name) and a hash of what shapes the artifact (composite, top-k,
    size, and the weights: their choice, or a file's content). Never user text: a weights path cannot name or
    escape a folder of the cache."""
    source = weights_file(config.model, weights)
    # a state-dict file is keyed by content, so a replaced file is never served stale
    weights_id = {"sha256": sha256_file(source)} if source is not None else {"choice": str(weights)}
    identity = {"model": config.model, "composite": config.composite, "top_k": config.top_k, "size": config.size,
                "weights": weights_id}
    request = concept_request(config)
    if request is not None:  # absent without concepts: the entries built before them keep their names
        identity["concepts"] = request.identity()
    return f"{config.model}-{hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]}"


def is_cached(config: RunConfig, weights: str) -> bool:
    """Whether the cache holds this configuration's artifact and sidecar (trusted or not: a cheap look)."""
    directory = Path(config.cache) / cache_key(config, weights)
    return (directory / FILENAMES["torchscript"]).is_file() and (directory / SIDECAR).is_file()


def cached_artifact(config: RunConfig, weights: str) -> tuple[Path, ArtifactSidecar]:
    """The traced LRP module for this configuration and its sidecar (a malformed one: SidecarError). A build
    happens in a temporary folder of the cache, moved into place when complete: a failed one leaves nothing."""
    cache = Path(config.cache)
    directory = cache / cache_key(config, weights)
    artifact, sidecar = directory / FILENAMES["torchscript"], directory / SIDECAR
    if artifact.is_file() and sidecar.is_file():
        _drop_if_untrusted("artifact", [artifact, sidecar])
    if not (artifact.is_file() and sidecar.is_file()):
        export = ExportConfig(model=config.model, weights=weights, composite=config.composite, top_k=config.top_k,
                              height=config.size, width=config.size, formats=("torchscript",),
                              concepts=concept_request(config))
        _build_entry(cache, directory, export)
        record_trust([artifact, sidecar])
    return artifact, ArtifactSidecar.read(sidecar)


def concept_request(config: RunConfig) -> ConceptRequest | None:
    """The concept outputs the run's artifact computes (None: concepts off)."""
    concepts = config.concepts
    if not concepts.enabled:
        return None
    return ConceptRequest(tuple(concepts.layers), concepts.maps_layer, concepts.maps, concepts.exclude_parallel)


def cached_classifier(config: RunConfig, weights: str, artifact: Path) -> Path:
    """The forward-only traced model for pixel flipping, beside the LRP artifact (same cache key), built once and
    checked against eager PyTorch and the LRP artifact's logits."""
    path = artifact.parent / CLASSIFIER_FILE
    if path.is_file():
        _drop_if_untrusted("classifier", [path], CLASSIFIER_TRUST_FILE)
    if not path.is_file():
        export_classifier(config.model, weights, config.size, path, lrp_artifact=artifact)
        record_trust([path], CLASSIFIER_TRUST_FILE)
    return path


def _drop_if_untrusted(what: str, files: list[Path], *record: str) -> None:
    """Never load TorchScript this project did not build (loading runs what is in the file): delete the module
    (the first file), so that it is rebuilt."""
    reason = untrusted_reason(files, *record)
    if reason:
        print(f"rebuilding the cached {what} {files[0]}: {reason}", file=sys.stderr, flush=True)
        files[0].unlink()


def _build_entry(cache: Path, directory: Path, export: ExportConfig) -> None:
    """Export and verify into a temporary folder of the cache, then move what it wrote into `directory`; on any
    failure remove the temporary folder and every cache folder this build created."""
    created = [p for p in (cache.absolute(), *cache.absolute().parents) if not p.exists()]
    building = cache / temporary_name(directory.name)
    try:
        building.mkdir(parents=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_artifacts(export, building, verify=True)
        directory.mkdir(parents=True, exist_ok=True)
        for path in sorted(building.iterdir()):  # what the build wrote: the artifact and its sidecar
            os.replace(path, directory / path.name)
    finally:
        shutil.rmtree(building, ignore_errors=True)  # our own temporary folder
        for folder in created:  # folders this build created, if the build left them empty
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
