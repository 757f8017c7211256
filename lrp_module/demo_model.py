"""`vgg-shapes`: a narrow torchvision VGG trained by this project on the generated shapes dataset (demo/), so
that LRP can be checked on a trained model offline; `vgg-shapes-hans`: the same architecture trained on
`shapes-hans`, where a tag in the corner predicts one class (a planted Clever Hans for SpRAy to find). Their
weights and records are committed in weights/."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn
from torchvision.models.vgg import VGG, make_layers

NAME = "vgg-shapes"
HANS_NAME = "vgg-shapes-hans"
NAMES = (NAME, HANS_NAME)  # every demo model: same architecture family, own weights and record
CFG: list[int | str] = [8, "M", 16, "M", 32, "M", 32, "M", 32, "M"]
BATCH_NORM = True  # as vgg*_bn; LRP folds it into the convolutions
POOL = 1  # global average pooling: the classifier sees what, not where (a 64x64 input ends at 2x2)
HIDDEN = 64
DROPOUT = 0.25
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_FILE = WEIGHTS_DIR / f"{NAME}.pt"
RECORD_FILE = WEIGHTS_DIR / f"{NAME}.json"  # sha256, classes, input size, training seed / epochs / accuracy


def build(num_classes: int, cfg: list[int | str] | None = None, batch_norm: bool = BATCH_NORM, pool: int = POOL,
          hidden: int = HIDDEN) -> VGG:
    """The architecture: torchvision's VGG class with a narrow feature cfg and the standard classifier
    (Linear-ReLU-Dropout-Linear-ReLU-Dropout-Linear) at small widths; random initialisation."""
    cfg = list(cfg or CFG)
    model = VGG(make_layers(cfg, batch_norm=batch_norm), num_classes=num_classes, init_weights=True)
    channels = [c for c in cfg if c != "M"][-1]
    model.avgpool = nn.AdaptiveAvgPool2d((pool, pool))
    model.classifier = nn.Sequential(
        nn.Linear(channels * pool * pool, hidden), nn.ReLU(True), nn.Dropout(DROPOUT),
        nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(DROPOUT),
        nn.Linear(hidden, num_classes),
    )
    return model  # PyTorch's default Linear initialisation: without batch norm, VGG's N(0, 0.01) stalls


TRAIN_TARGETS = {NAME: "make train-demo", HANS_NAME: "make train-demo-hans"}


def weights_file(name: str = NAME) -> Path:
    """The committed weights of demo model `name` (read at call time, so tests can point NAME's elsewhere)."""
    return WEIGHTS_FILE if name == NAME else WEIGHTS_DIR / f"{name}.pt"


def record_file(name: str = NAME) -> Path:
    return RECORD_FILE if name == NAME else WEIGHTS_DIR / f"{name}.json"


@lru_cache(maxsize=len(NAMES))
def record(name: str = NAME) -> dict:
    """The committed weights' record (weights/<name>.json); an error names the file when it is missing."""
    path = record_file(name)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: train the demo model with `{TRAIN_TARGETS[name]}`")
    return json.loads(path.read_text())


def build_recorded(name: str = NAME) -> VGG:
    """The architecture the committed record describes (cfg, batch norm, classes), randomly initialised."""
    facts = record(name)
    return build(len(facts["classes"]), facts["cfg"], facts["batch_norm"], facts["pool"], facts["hidden"])


def class_names(name: str = NAME) -> list[str]:
    return list(record(name)["classes"])


def class_wnids(name: str = NAME) -> list[str]:
    return list(record(name)["wnids"])


def load_state(path: Path = WEIGHTS_FILE) -> dict[str, torch.Tensor]:
    """The committed state dict as float32 (it may be stored as float16)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {key: value.float() if value.is_floating_point() else value for key, value in state.items()}
