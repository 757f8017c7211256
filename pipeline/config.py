"""Run configuration: configs/run.yaml, then configs/datasets/<name>.yaml, then command-line values. Every key
is checked before anything is written; a bad or unknown key names the key and the file."""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from lrp_module.composites import COMPOSITES
from lrp_module.files import sha256_file
from lrp_module.topk import validate_top_k
from lrp_module.weights_recipe import IMAGENET_RECIPE
from lrp_module.zoo import MODEL_NAMES

from .classes import ClassesError, read_classes_file
from .datasets.layouts import LAYOUTS
from .errors import PipelineError
from .faithfulness import region_count
from .metrics import METRICS, ROAD_PERCENTAGES, MetricSettings, expand
from .metrics.model import SCORES

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(PipelineError, ValueError):
    """A configuration value is wrong; the message names the key and where it came from."""


@dataclass
class ConceptsConfig:
    """Concepts (CRP) over the dataset, off while `layers` is empty: per image each layer's concept relevance and
    top channels, `maps` conditional maps at `maps_layer` (None: the first layer; 0 maps: none), and relevance
    maximisation (`relmax` most relevant images per channel, overall and per class). docs/datasets.md#concepts."""

    layers: list[str] = field(default_factory=list)
    maps: int = 8
    maps_layer: str | None = None
    top: int = 8
    relmax: int = 40
    exclude_parallel: bool = True

    @property
    def enabled(self) -> bool:
        return bool(self.layers)

    def identity(self) -> dict[str, Any]:
        """What shapes a run's concept outputs (absent from the run's identity while off)."""
        return {"layers": list(self.layers), "maps": self.maps, "maps_layer": self.maps_layer or self.layers[0],
                "top": self.top, "relmax": self.relmax, "exclude_parallel": self.exclude_parallel}


CONCEPT_KEYS = {f.name for f in fields(ConceptsConfig)}


@dataclass
class RunConfig:
    dataset: str = "sample"
    root: str = ""
    layout: str | None = None
    limit: int | None = None
    model: str = "vgg16"
    weights: str = "auto"
    composite: str = "epsilon_gamma_box"
    top_k: float = 0.0
    target: str | int = "predicted"
    size: int = IMAGENET_RECIPE.crop  # the weights' crop; configs/run.yaml says it too
    batch_size: int = 8
    shard_size: int = 64
    map_dtype: str = "float16"
    compression: int = 4
    actors: str | int = "auto"
    decode_threads: int = 2
    max_image_bytes: int = 256 * 1024 * 1024  # an image file or tar member over this is a failure row, never read
    device: str = "auto"
    precision: str = "fp32"
    gpu_decode: bool = True
    shard_timeout_s: float | None = None
    shard_retries: int = 2
    out: str | None = None
    cache: str = ".cache/artifacts"
    faithfulness: bool = False
    flip_steps: int = 100
    flip_patch: int = 9
    # the evaluation metrics (pipeline/metrics/, docs/metrics.md): names or groups, and their parameters
    metrics: list[str] | str | None = ()  # off by default: a run costs what it did and earlier runs still resume
    # their parameters' defaults are MetricSettings' (one place); configs/run.yaml states them
    pointing_tolerance: float = MetricSettings.pointing_tolerance
    top_k_pixels: int = MetricSettings.top_k_pixels
    effective_complexity_eps: float = MetricSettings.effective_complexity_eps
    correlation_runs: int = MetricSettings.correlation_runs
    correlation_subset: int = MetricSettings.correlation_subset
    region_patch: int = MetricSettings.region_patch
    region_steps: int = MetricSettings.region_steps
    region_score: str = MetricSettings.region_score
    road_percentages: list[float] | None = None  # None: MetricSettings' ROAD_PERCENTAGES
    road_noise: float = MetricSettings.road_noise
    metric_seed: int = MetricSettings.seed
    labels: str | None = None  # label file (Kaggle CSV or devkit ground truth), else searched for
    boxes: str | None = None  # folder of VOC box XMLs, else searched for
    synsets: str | None = None  # meta.mat or LOC_synset_mapping.txt, else searched for
    classes: str | None = None  # the model's class names (one per line, or index<TAB>wnid<TAB>name), else its own
    concepts: ConceptsConfig = field(default_factory=ConceptsConfig)  # CRP over the dataset (off: no layers)

    def identity(self) -> dict[str, Any]:
        """What makes two runs produce the same outputs (not how fast or where they run)."""
        keys = ("root", "layout", "limit", "model", "weights", "composite", "top_k", "target", "size",
                "shard_size", "map_dtype", "compression", "labels", "boxes", "synsets", "classes")
        identity = {k: getattr(self, k) for k in keys}
        identity["faithfulness"] = self.faithfulness and {"steps": self.flip_steps, "patch": self.flip_patch}
        if self.concepts.enabled:  # absent while off: runs made before concepts still match
            identity["concepts"] = self.concepts.identity()
        settings = self.metric_settings()
        if settings.names:  # absent without metrics: runs made before them still match
            identity["metrics"] = {k: v for k, v in asdict(settings).items() if k != "classifier"}
        # absent unless named: runs made before these keys still match
        for key in ("labels", "boxes", "synsets", "classes"):
            if identity[key] is None:
                del identity[key]
        if self.classes is not None and Path(self.classes).is_file():  # an edited list must not mix names in a run
            identity["classes"] = {"file": self.classes, "sha256": sha256_file(self.classes)}
        return identity

    def metric_settings(self, classifier: str | None = None) -> MetricSettings:
        """The metrics' settings as the workers take them (checked by `validate` first)."""
        percentages = ROAD_PERCENTAGES if self.road_percentages is None else tuple(self.road_percentages)
        return MetricSettings(
            names=expand(self.metrics), pointing_tolerance=float(self.pointing_tolerance),
            top_k_pixels=self.top_k_pixels, effective_complexity_eps=float(self.effective_complexity_eps),
            correlation_runs=self.correlation_runs, correlation_subset=self.correlation_subset,
            region_patch=self.region_patch, region_steps=self.region_steps, region_score=self.region_score,
            road_percentages=percentages, road_noise=float(self.road_noise), seed=self.metric_seed,
            classifier=classifier)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]


KEYS = {f.name for f in fields(RunConfig)}
# fp32: exact float32 everywhere; tf32: CUDA may round matmul / convolution inputs to TF32 (no effect on a CPU).
# bf16 is not offered: its probe correlation on vgg-shapes has not been measured on a GPU yet.
PRECISIONS = ("fp32", "tf32")
# LRP's memory grows with the crop's pixels: VGG16 needs about 150 MB per image at 224 px (docs/benchmarks.md, GPU:
# 4,993 MB for a batch of 32), so about 50 GB per image at 4096 px: one image still fits an 80 GB GPU; at 8192
# (200 GB) none would. Larger sizes are refused in one line instead of failing deep inside the trace.
MAX_SIZE = 4096
# a dataset of small images (the shapes) sets its own crop size and pixel-flipping regions
DATASET_KEYS = {"root", "layout", "size", "flip_patch", "flip_steps", "labels", "boxes", "synsets"}
PATH_KEYS = ("root", "labels", "boxes", "synsets")


def _read_yaml(path: Path, allowed: set[str]) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(allowed))})")
    return data


def _expand(value: str, key: str, source: str) -> str:
    expanded = os.path.expandvars(value)
    if "$" in expanded:
        names = re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", value)
        unset = [n for n in names if n not in os.environ] or names
        raise ConfigError(f"{source}: {key} is {value}, and {', '.join(unset)} is not set: "
                          f"export {unset[0]}=/path/to/the/images (or give the folder: DATASET=/path/to/the/images)")
    return expanded


def normal_path(path: str) -> str:
    """One spelling per place (absolute, no trailing slash, no '..'): 'data/x/' and 'data/x' are the same run."""
    return os.path.normpath(os.path.abspath(os.path.expanduser(path)))


def load_config(overrides: dict[str, Any] | None = None, config_dir: Path = CONFIG_DIR) -> RunConfig:
    """Defaults file, dataset file, then overrides (None values are ignored)."""
    values = _read_yaml(config_dir / "run.yaml", KEYS - {"root"})
    sources = {k: str(config_dir / "run.yaml") for k in values}
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(overrides) - KEYS)
    if unknown:
        raise ConfigError(f"command line: unknown key {unknown[0]!r}")
    dataset = str(overrides.get("dataset", values.get("dataset", "sample")))
    dataset_file = config_dir / "datasets" / f"{dataset}.yaml"
    if dataset_file.is_file():
        found = _read_yaml(dataset_file, DATASET_KEYS)
        if "root" not in found:
            raise ConfigError(f"{dataset_file}: missing key 'root'")
        values.update(found)
        sources.update({k: str(dataset_file) for k in found})
        root_base = Path(__file__).resolve().parent.parent
        for key in PATH_KEYS:  # ${VARIABLES} expand; relative paths are the checkout's
            if found.get(key) is not None:
                values[key] = _expand(str(found[key]), key, str(dataset_file))
                if not Path(values[key]).is_absolute():
                    values[key] = str(root_base / values[key])
    else:
        if not any(ch in dataset for ch in "/*?[") and not Path(dataset).exists():
            known = ", ".join(sorted(p.stem for p in (config_dir / "datasets").glob("*.yaml")))
            raise ConfigError(f"dataset {dataset!r}: not a dataset name ({known}; configs/datasets/*.yaml) nor an "
                              "existing folder or tar-shard glob")
        values["root"] = dataset
        sources["root"] = "command line"
    if "concepts" in overrides:  # CONCEPTS=features.28,features.25: the layers; the rest from run.yaml
        given = overrides["concepts"]
        overrides["concepts"] = {**(values.get("concepts") or {}),
                                 **(dict(given) if isinstance(given, Mapping) else {"layers": given})}
    values.update(overrides)
    sources.update({k: "command line" for k in overrides})
    values["dataset"] = dataset
    values["concepts"] = _concepts(values.get("concepts"), sources.get("concepts", "default"))
    for key in (*PATH_KEYS, "classes"):
        if isinstance(values.get(key), str) and values[key]:
            values[key] = normal_path(values[key])
    config = RunConfig(**values)
    validate(config, sources)
    if config.out is None:  # a readable directory name, also for a tar glob
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(dataset).name.replace(".tar", "")).strip("_") or "dataset"
        config.out = f"runs/{name}-{config.model}-{config.composite}"
    return config


def _concepts(value: Any, source: str) -> ConceptsConfig:
    """The `concepts:` block (a mapping; `layers` also a comma-separated string), each key checked."""
    if value is None:
        return ConceptsConfig()
    if isinstance(value, ConceptsConfig):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: concepts must be a mapping of {', '.join(sorted(CONCEPT_KEYS))}, got {value!r}")
    unknown = sorted(set(value) - CONCEPT_KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown key 'concepts.{unknown[0]}' (known: {', '.join(sorted(CONCEPT_KEYS))})")
    values = dict(value)
    layers = values.get("layers") or []
    if isinstance(layers, str):
        layers = [name.strip() for name in layers.split(",") if name.strip()]
    if not isinstance(layers, list) or not all(isinstance(name, str) and name for name in layers):
        raise ConfigError(f"{source}: concepts.layers must be a list of layer names (module names such as "
                          f"features.28), got {layers!r}")
    values["layers"] = list(dict.fromkeys(layers))
    concepts = ConceptsConfig(**values)
    for key, low in (("maps", 0), ("top", 1), ("relmax", 1)):
        number = getattr(concepts, key)
        if isinstance(number, bool) or not isinstance(number, int) or number < low:
            raise ConfigError(f"{source}: concepts.{key} must be an integer >= {low}, got {number!r}")
    if not isinstance(concepts.exclude_parallel, bool):
        raise ConfigError(f"{source}: concepts.exclude_parallel must be true or false, got "
                          f"{concepts.exclude_parallel!r}")
    if concepts.maps_layer is not None and (not isinstance(concepts.maps_layer, str)
                                            or concepts.maps_layer not in concepts.layers):
        raise ConfigError(f"{source}: concepts.maps_layer must be one of concepts.layers "
                          f"({', '.join(concepts.layers) or 'none given'}), got {concepts.maps_layer!r}")
    return concepts


def validate(config: RunConfig, sources: dict[str, str]) -> None:
    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{sources.get(key, 'default')}: {key} {message}")

    def positive_int(key: str, allow_none: bool = False) -> None:
        value = getattr(config, key)
        if value is None and allow_none:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            fail(key, f"must be a positive integer, got {value!r}")

    if config.model not in MODEL_NAMES:
        fail("model", f"must be one of {', '.join(MODEL_NAMES)}, got {config.model!r}")
    if config.composite not in COMPOSITES:
        fail("composite", f"must be one of {', '.join(COMPOSITES)}, got {config.composite!r}")
    if config.layout is not None and config.layout not in LAYOUTS:
        fail("layout", f"must be one of {', '.join(LAYOUTS)} or null, got {config.layout!r}")
    try:
        config.top_k = validate_top_k(config.top_k)
    except (TypeError, ValueError):
        fail("top_k", f"must be a fraction in [0, 1], got {config.top_k!r}")
    target = config.target
    if not (target in ("predicted", "label") or (isinstance(target, int) and not isinstance(target, bool)
                                                 and 0 <= target)):
        if isinstance(target, str) and target.isdigit():
            config.target = int(target)
        else:
            fail("target", f"must be predicted, label or a class index, got {target!r}")
    for key in ("size", "batch_size", "shard_size", "decode_threads", "max_image_bytes"):
        positive_int(key)
    positive_int("limit", allow_none=True)
    if config.size < 32:
        fail("size", f"must be at least 32 (VGG's five poolings), got {config.size}")
    if config.size > MAX_SIZE:
        fail("size", f"must be at most {MAX_SIZE} (LRP needs about 50 GB per image at {MAX_SIZE} px), "
                     f"got {config.size}")
    if config.map_dtype not in ("float16", "float32"):
        fail("map_dtype", f"must be float16 or float32, got {config.map_dtype!r}")
    if isinstance(config.compression, bool) or not isinstance(config.compression, int) or \
            not 0 <= config.compression <= 9:
        fail("compression", f"must be an integer 0-9, got {config.compression!r}")
    if config.actors != "auto":
        if isinstance(config.actors, str) and config.actors.isdigit():
            config.actors = int(config.actors)
        positive_int("actors")
    if config.device not in ("auto", "cpu", "cuda"):
        fail("device", f"must be auto, cpu or cuda, got {config.device!r}")
    if config.precision not in PRECISIONS:
        fail("precision", f"must be one of {', '.join(PRECISIONS)}, got {config.precision!r}")
    if not isinstance(config.gpu_decode, bool):
        fail("gpu_decode", f"must be true or false, got {config.gpu_decode!r}")
    timeout = config.shard_timeout_s
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        fail("shard_timeout_s", f"must be a positive number of seconds or null, got {timeout!r}")
    retries = config.shard_retries
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 10:
        fail("shard_retries", f"must be an integer 0-10, got {retries!r}")
    _validate_faithfulness(config, fail, positive_int)
    _validate_metrics(config, fail, positive_int)
    if config.classes is not None:
        if not isinstance(config.classes, str) or not config.classes:
            fail("classes", f"must be a file of class names or null, got {config.classes!r}")
        try:
            read_classes_file(config.classes)  # its count is checked against the model's logits later
        except ClassesError as error:
            fail("classes", f"is not a usable class list: {error}")


def _validate_faithfulness(config: RunConfig, fail, positive_int) -> None:
    """Pixel flipping: on/off, and (when on) steps no more than the image has patch x patch regions."""
    if not isinstance(config.faithfulness, bool):
        fail("faithfulness", f"must be true or false, got {config.faithfulness!r}")
    positive_int("flip_steps")
    positive_int("flip_patch")
    if config.faithfulness and config.flip_patch > config.size:
        fail("flip_patch", f"must be at most size ({config.size}), got {config.flip_patch}")
    regions = region_count(config.size, config.size, config.flip_patch)
    if config.faithfulness and config.flip_steps > regions:
        fail("flip_steps", f"must be at most {regions} (the {config.flip_patch}x{config.flip_patch} regions of a "
                           f"{config.size}x{config.size} image), got {config.flip_steps}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _validate_metrics(config: RunConfig, fail, positive_int) -> None:
    """The evaluation metrics: known names, and each parameter in its range for the crop size."""
    if isinstance(config.metrics, str):  # the command line's comma-separated list
        config.metrics = [name.strip() for name in config.metrics.split(",") if name.strip()]
    if config.metrics is not None and not isinstance(config.metrics, (list, tuple)):
        fail("metrics", f"must be a list of metric or group names, got {config.metrics!r}")
    if config.metrics is not None and not all(isinstance(name, str) for name in config.metrics):
        fail("metrics", f"must be a list of metric or group names, got {config.metrics!r}")
    try:
        names = expand(config.metrics)
    except ValueError as error:
        fail("metrics", f"names an {error}")
    pixels = config.size * config.size
    if not _number(config.pointing_tolerance) or config.pointing_tolerance < 0:
        fail("pointing_tolerance", f"must be a number of pixels >= 0 (Quantus 0, TorchRay 15), "
                                   f"got {config.pointing_tolerance!r}")
    for key in ("top_k_pixels", "correlation_runs", "correlation_subset", "region_patch", "region_steps"):
        positive_int(key)
    if not _number(config.effective_complexity_eps) or config.effective_complexity_eps < 0:
        fail("effective_complexity_eps", f"must be a number >= 0, got {config.effective_complexity_eps!r}")
    if not _number(config.road_noise) or config.road_noise < 0:
        fail("road_noise", f"must be a number >= 0, got {config.road_noise!r}")
    if isinstance(config.metric_seed, bool) or not isinstance(config.metric_seed, int) or config.metric_seed < 0:
        fail("metric_seed", f"must be an integer >= 0, got {config.metric_seed!r}")
    if config.region_score not in SCORES:
        fail("region_score", f"must be one of {', '.join(SCORES)}, got {config.region_score!r}")
    percentages = config.road_percentages
    if percentages is not None and (not isinstance(percentages, (list, tuple)) or not percentages or
                                    not all(_number(p) and 0 < p < 100 for p in percentages)):
        fail("road_percentages", f"must be a list of percentages in (0, 100) or null, got {percentages!r}")
    if "top_k_intersection" in names and config.top_k_pixels > pixels:
        fail("top_k_pixels", f"must be at most {pixels} (the pixels of a {config.size}x{config.size} map), "
                             f"got {config.top_k_pixels}")
    if "faithfulness_correlation" in names:
        if config.correlation_runs < 2:
            fail("correlation_runs", f"must be at least 2 (a correlation), got {config.correlation_runs}")
        if config.correlation_subset > 3 * pixels:
            fail("correlation_subset", f"must be at most {3 * pixels} (the input values of a {config.size}x"
                                       f"{config.size} image), got {config.correlation_subset}")
    if "region_perturbation" in names:
        if config.region_patch > config.size:
            fail("region_patch", f"must be at most size ({config.size}), got {config.region_patch}")
        regions = region_count(config.size, config.size, config.region_patch)
        if config.region_steps > regions:
            fail("region_steps", f"must be at most {regions} (the {config.region_patch}x{config.region_patch} "
                                 f"regions of a {config.size}x{config.size} image), got {config.region_steps}")
    unknown = set(names) - set(METRICS)
    assert not unknown, unknown


def as_dict(config: RunConfig) -> dict[str, Any]:
    return asdict(config)
