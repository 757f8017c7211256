"""Do LRP maps of vgg-shapes point at the shape? Pointing game and share of positive relevance inside the box and
inside the exact object mask, on the generated validation images, for LRP composites and for baselines that
know nothing of the image (random Gaussian maps, a uniform map) and LRP of the same network with random weights.

    python -m demo.localisation [--root data/shapes] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from lrp_module import LRPModel
from lrp_module.zoo import build_vgg
from pipeline.datasets import load_records
from pipeline.preprocess import Preprocessing, load
from pipeline.stats import localisation

from . import shapes

COMPOSITES = ("epsilon_gamma_box", "epsilon_plus_flat")


@dataclass
class ValidationSet:
    """The validation images as the pipeline sees them, with their labels, boxes and masks in map pixels."""

    images: torch.Tensor  # (N, 3, H, W) normalised
    labels: torch.Tensor  # (N,)
    boxes: list[list[tuple[float, float, float, float]]]
    masks: torch.Tensor  # (N, H, W) bool


def mask_view(mask: np.ndarray, preprocessing: Preprocessing) -> torch.Tensor:
    """A mask through the pipeline's resize (nearest) and centre crop, so it lines up with the map."""
    steps = v2.Compose([v2.Resize(preprocessing.resize, interpolation=v2.InterpolationMode.NEAREST),
                        v2.CenterCrop(preprocessing.crop)])
    return steps(tv_tensors.Mask(torch.from_numpy(mask)[None])).as_subclass(torch.Tensor)[0]


def validation_set(root: str | Path) -> ValidationSet:
    root = Path(root)
    preprocessing = Preprocessing.for_size(shapes.IMAGE_SIZE)
    masks = shapes.read_masks(root)
    images, labels, boxes, views = [], [], [], []
    for record in load_records(root, "imagenet_val"):
        tensor, record_boxes = load(record, preprocessing)
        images.append(tensor)
        labels.append(record.label)
        boxes.append(record_boxes)
        views.append(mask_view(masks[record.image_id], preprocessing))
    return ValidationSet(torch.stack(images), torch.tensor(labels), boxes, torch.stack(views))


def scores(relevance: torch.Tensor, data: ValidationSet) -> dict[str, float]:
    """Means over images: pointing game and positive share in the box (pipeline/stats.py), and the same for
    the exact mask."""
    boxed = localisation(relevance, data.boxes)
    flat, masks = relevance.flatten(1), data.masks.flatten(1)
    positive = flat.clamp(min=0)
    in_mask = (positive * masks).sum(1) / positive.sum(1).clamp(min=1e-30)
    mask_hit = masks.gather(1, flat.argmax(1, keepdim=True)).squeeze(1).float()
    return {"pointing_game_box": float(boxed["pointing_game_hit"].nanmean()),
            "positive_in_box": float(boxed["positive_in_box"].nanmean()),
            "pointing_game_mask": float(mask_hit.mean()), "positive_in_mask": float(in_mask.mean())}


def area_fractions(data: ValidationSet) -> dict[str, float]:
    """What a map that knows nothing scores on average: the box's and the mask's share of the image."""
    box_area = localisation(torch.ones(data.masks.shape), data.boxes)["positive_in_box"]
    return {"box": float(box_area.mean()), "mask": float(data.masks.flatten(1).float().mean(1).mean())}


def reinitialised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The same architecture with fresh random weights (and batch-norm statistics)."""
    untrained = copy.deepcopy(model)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    for module in untrained.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    torch.random.set_rng_state(state)
    return untrained.eval()


def evaluate(root: str | Path, model: torch.nn.Module, composites=COMPOSITES, seed: int = 0) -> dict:
    """Scores of LRP (trained and random weights) and of random and uniform maps, and the model's accuracy."""
    data = validation_set(root)
    model = model.eval()
    with torch.inference_mode():
        predicted = model(data.images).argmax(1)
    results = {"images": len(data.labels), "accuracy": float((predicted == data.labels).float().mean()),
               "area_fraction": area_fractions(data), "maps": {}}
    for composite in composites:
        results["maps"][f"lrp {composite}"] = scores(LRPModel(model, composite)(data.images, data.labels), data)
    untrained = reinitialised(model, seed)
    results["maps"][f"lrp {composites[0]}, random weights"] = scores(
        LRPModel(untrained, composites[0])(data.images, data.labels), data)
    generator = torch.Generator().manual_seed(seed)
    results["maps"]["random Gaussian map"] = scores(torch.randn(data.masks.shape, generator=generator), data)
    uniform = scores(torch.ones(data.masks.shape), data)
    uniform["pointing_game_box"] = uniform["pointing_game_mask"] = float("nan")  # no arg-max: undefined
    results["maps"]["uniform map"] = uniform
    return results


def table(results: dict) -> str:
    keys = ("pointing_game_box", "positive_in_box", "pointing_game_mask", "positive_in_mask")
    lines = [f"{results['images']} validation images, accuracy {results['accuracy']:.3f}; box covers "
             f"{results['area_fraction']['box']:.3f} of the image, mask {results['area_fraction']['mask']:.3f}",
             f"| map | {' | '.join(keys)} |", f"|---|{'---|' * len(keys)}"]
    for name, values in results["maps"].items():
        lines.append(f"| {name} | " + " | ".join(f"{values[k]:.3f}" for k in keys) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.localisation", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="validation split (default: generated into a temporary folder)")
    parser.add_argument("--weights", default="demo", help="vgg-shapes weights: demo (committed) or a file")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        root = args.root or shapes.write_split(Path(scratch) / "shapes")
        results = evaluate(root, build_vgg("vgg-shapes", args.weights)[0])
    print(table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
