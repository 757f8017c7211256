"""Model builders (every torchvision VGG, ResNet, Wide ResNet, ResNeXt-50, and vgg-shapes) and their weights:
torchvision's ImageNet weights (hub cache or download), a local state-dict file, or random initialisation on
explicit request. Missing weights are an error that says what to put where;
random weights are never a silent fallback.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import nn

from . import demo_model
from .files import sha256_file
from .projection import ProjectionError, with_gate_defaults, with_projections

log = logging.getLogger(__name__)

VGG_NAMES = ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn")
RESNET_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "wide_resnet101_2",
                "resnext50_32x4d")
# every model name accepted (vgg-shapes*: lrp_module/demo_model.py)
MODEL_NAMES = VGG_NAMES + RESNET_NAMES + demo_model.NAMES
HEADS = {"vgg": "classifier.6.weight", "resnet": "fc.weight"}  # the last layer's weight: its rows are the classes
IMAGENET_CHOICES = ("imagenet", "DEFAULT", "IMAGENET1K_V1")
DEMO_CHOICES = ("demo", "auto", "DEFAULT")  # vgg-shapes, vgg-shapes-hans: the committed trained weights
OFFLINE_ENV = "LRP_OFFLINE"  # set to 1 to never try a download


class WeightsError(RuntimeError):
    """The requested weights cannot be loaded; the message says what to do."""


@dataclass
class WeightsInfo:
    """Provenance of a model's weights, for manifests and artifact metadata."""

    model: str
    kind: str  # "imagenet" | "demo" (vgg-shapes' committed weights) | "file" | "random"
    source: str | None = None  # file path or URL
    sha256: str | None = None
    categories: list[str] | None = field(default=None, repr=False)

    @property
    def is_random(self) -> bool:
        return self.kind == "random"

    def to_dict(self) -> dict:
        record = asdict(self)
        record.pop("categories")
        return record


def imagenet_weights(name: str) -> torchvision.models.WeightsEnum:
    return torchvision.models.get_model_weights(name).DEFAULT


def hub_checkpoint_path(name: str) -> Path:
    """Where torchvision's loader looks for (and downloads) the ImageNet weights of `name`."""
    url = imagenet_weights(name).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _check_name(name: str) -> None:
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")


def default_weights(name: str) -> str:
    """The trained weights a model has by default: torchvision's ImageNet ones, or vgg-shapes' committed ones."""
    return "demo" if name in demo_model.NAMES else "imagenet"


def weights_file(name: str, weights: str | os.PathLike) -> Path | None:
    """The local file a weights choice loads (a path, or vgg-shapes' committed file), None for the others."""
    if name in demo_model.NAMES and str(weights) in DEMO_CHOICES:
        return demo_model.weights_file(name)
    return Path(weights) if Path(weights).is_file() else None


def _load_demo(name: str) -> tuple[dict, WeightsInfo]:
    """A demo model's committed weights, checked against the sha256 in their record."""
    path = demo_model.weights_file(name)
    if not path.is_file():
        raise WeightsError(f"{path} is missing: restore it from git or train it with "
                           f"`{demo_model.TRAIN_TARGETS[name]}`")
    expected = demo_model.record(name)["sha256"]
    digest = sha256_file(path)
    if digest != expected:
        raise WeightsError(f"{path} is not the committed file (sha256 {digest[:12]}..., its record "
                           f"{demo_model.record_file(name).name} says {expected[:12]}...): restore it or retrain")
    return demo_model.load_state(path), WeightsInfo(name, "demo", str(path), digest, demo_model.class_names(name))


# The global RNG is the one torch's initialisers draw from: a seeded build holds it under this lock, so that two
# threads building random models at once (the driver's artifact build and its precision probe) each get the seed's
# weights, not an interleaving of both.
_SEEDED_INIT = threading.Lock()


def _seeded(build: Callable[[], nn.Module], name: str, seed: int, warn: bool, stacklevel: int = 3) -> nn.Module:
    """`build()` with the global RNG seeded with `seed` (its state restored afterwards); warns loudly unless the
    caller has said so already (warn=False), at `stacklevel`: build_model's caller."""
    with _SEEDED_INIT:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            model = build()
        finally:
            torch.random.set_rng_state(generator_state)
    if warn:
        message = f"{name} uses RANDOM weights (seed {seed}): its explanations say nothing about a trained model"
        warnings.warn(message, stacklevel=stacklevel)
        log.warning(message)
    return model


def _build_demo(name: str, weights: str | os.PathLike, seed: int, warn: bool) -> tuple[nn.Module, WeightsInfo]:
    """vgg-shapes with its committed weights ("demo"/"auto"/"DEFAULT"), a state-dict file, or "random"."""
    try:
        classes = demo_model.class_names(name)
    except FileNotFoundError as error:  # its record defines the classes and the architecture
        raise WeightsError(str(error)) from None
    if str(weights) in set(IMAGENET_CHOICES) - set(DEMO_CHOICES):
        raise WeightsError(f"{name} has no ImageNet weights: use 'demo' (the committed trained weights), "
                           "a state-dict file, or 'random'")
    if str(weights) == "random":
        model = _seeded(lambda: demo_model.build_recorded(name), name, seed, warn, stacklevel=4)
        return model.eval(), WeightsInfo(name, "random", f"seed={seed}", categories=classes)
    if str(weights) in DEMO_CHOICES:
        state, info = _load_demo(name)
    else:
        state, info = _load_file(name, Path(weights))
        state = {key: value.float() if value.is_floating_point() else value for key, value in state.items()}
        info.categories = classes
    model = demo_model.build_recorded(name)
    return _loaded(model, state, info, name)


def _loaded(model: nn.Module, state: dict, info: WeightsInfo, name: str) -> tuple[nn.Module, WeightsInfo]:
    """`model` with `state` loaded strictly, in eval mode; a state of another architecture is one clear error.
    A corrected model's state (P-ClArC, lrp_module/projection.py) brings its projection layers with it."""
    try:
        model = with_projections(model, state)
        state = with_gate_defaults(model, state)
    except ProjectionError as error:
        raise WeightsError(f"weights {info.source} do not match {name}: {error}") from None
    mismatch = _mismatch(model.state_dict(), state)
    if mismatch:
        raise WeightsError(f"weights {info.source} do not match {name}: {mismatch}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = " ".join(str(error).split("\n\t")[:2]).replace("\n", " ")
        raise WeightsError(f"weights {info.source} do not match {name}: {first[:200]}") from None
    return model.eval(), info


def _mismatch(expected: dict, found: dict) -> str | None:
    """Expected vs found in a short line: the first tensor of another shape, or the tensors missing / extra."""
    for key, tensor in expected.items():
        other = found.get(key)
        if other is not None and hasattr(other, "shape") and tuple(other.shape) != tuple(tensor.shape):
            return f"{key} expected {list(tensor.shape)}, found {list(other.shape)}"
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    if missing or extra:
        return (f"expected {len(expected)} tensors, found {len(found)} ({len(missing)} missing, e.g. "
                f"{missing[0] if missing else '-'}; {len(extra)} unexpected, e.g. {extra[0] if extra else '-'})")
    return None


def _load_imagenet(name: str) -> tuple[dict, WeightsInfo]:
    weights = imagenet_weights(name)
    path = hub_checkpoint_path(name)
    if not path.exists():
        if os.environ.get(OFFLINE_ENV) == "1":
            reason = f"{OFFLINE_ENV}=1 forbids downloading"
        else:
            reason = _try_download(weights)
        if not path.exists():
            raise WeightsError(
                f"ImageNet weights for {name} are not available ({reason}): put {path.name} from {weights.url} "
                f"at {path} (or set TORCH_HOME), or pass a local state-dict file as the weights"
            )
    digest = sha256_file(path)
    expected = path.stem.rsplit("-", 1)[-1]  # torchvision names files <name>-<sha256 prefix>.pth
    if not digest.startswith(expected):
        raise WeightsError(f"{path} is corrupt: sha256 {digest[:12]}... does not start with {expected}; delete it")
    state = torch.load(path, map_location="cpu", weights_only=True)
    info = WeightsInfo(name, "imagenet", weights.url, digest, list(weights.meta["categories"]))
    return state, info


def _try_download(weights: torchvision.models.WeightsEnum, timeout_s: float = 30.0) -> str:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        weights.get_state_dict(progress=True, check_hash=True)
        return "downloaded"
    except Exception as error:  # no network, proxy, HTTP error: report it, do not fall back
        return f"download failed: {type(error).__name__}: {str(error)[:120]}"
    finally:
        socket.setdefaulttimeout(previous)


def _load_file(name: str, path: Path) -> tuple[dict, WeightsInfo]:
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # never repeat PyTorch's advice to load with weights_only=False: that runs code
        if "Weights only load failed" in str(error):
            raise WeightsError(f"weights file {path} is not a loadable state dict: it holds pickled Python objects, "
                               "not only tensors (a whole saved model?); save model.state_dict() instead") from None
        raise WeightsError(f"weights file {path} is not a loadable state dict (not a PyTorch file: "
                           f"{type(error).__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"weights file {path} holds a {type(state).__name__}, not a state dict")
    return state, WeightsInfo(name, "file", str(path), sha256_file(path))


def _classes_in(name: str, state: dict) -> int | None:
    """The number of classes a state dict was trained for (rows of its last layer), None if it has no such key."""
    head = state.get(HEADS["resnet" if name in RESNET_NAMES else "vgg"])
    return None if head is None else head.shape[0]


def head_classes(name: str, path: Path) -> int | None:
    """The number of classes a state-dict file was trained for, read without loading its tensors (memory-mapped),
    so a run can check its dataset's labels before building anything; None when the file does not say."""
    if name in demo_model.NAMES:
        return len(demo_model.class_names(name))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a plain state dict (or not a zip file): building the model says why, in one line
        return None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return _classes_in(name, state) if isinstance(state, dict) else None


def build_model(name: str, weights: str | os.PathLike | None, num_classes: int | None = None,
                seed: int = 0, warn: bool = True) -> tuple[nn.Module, WeightsInfo]:
    """A torchvision VGG / ResNet (or vgg-shapes) in eval mode and where its weights came from.

    weights: "imagenet" (torchvision's, from the hub cache or downloaded), a path to a state-dict file, or
    "random" (seeded initialisation; warns loudly unless warn=False, for a caller that has said so already). None is
    an error: weights are always chosen explicitly.
    vgg-shapes (the demo model) takes "demo" / "auto" (its committed trained weights), a file or "random".
    """
    _check_name(name)
    if weights is None:
        raise WeightsError(f"no weights given for {name}: use 'imagenet', a state-dict file, or 'random'")
    if name in demo_model.NAMES:
        return _build_demo(name, weights, seed, warn)
    builder = getattr(torchvision.models, name)
    if str(weights) in IMAGENET_CHOICES:
        state, info = _load_imagenet(name)
        model = builder(num_classes=1000)
    elif str(weights) == "random":
        model = _seeded(lambda: builder(num_classes=num_classes or 1000), name, seed, warn)
        return model.eval(), WeightsInfo(name, "random", f"seed={seed}")
    else:
        state, info = _load_file(name, Path(weights))
        model = builder(num_classes=num_classes or _classes_in(name, state) or 1000)
    return _loaded(model, state, info, name)


build_vgg = build_model  # the name it had when every model was a VGG
