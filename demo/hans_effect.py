"""How much a model relies on shapes-hans' tag: the planted class's accuracy with the tag as generated, with it
removed (the same images without it) and the tag pasted onto every other class's images, on one split.

    python -m demo.hans_effect [--model vgg-shapes-hans] [--weights demo]     # prints the table (JSON with --json)
"""
from __future__ import annotations

import argparse
import json

import torch

from lrp_module.zoo import build_vgg
from pipeline.preprocess import Preprocessing, decode, preprocess

from . import shapes, shapes_hans


def _images(seed: int, indices: list[int], tag: bool | None) -> torch.Tensor:
    """Images `indices` of the split as the pipeline sees them, tagged as planted (None), always or never."""
    steps = Preprocessing.for_size(shapes.IMAGE_SIZE)
    return torch.stack([preprocess(decode(shapes.jpeg_bytes(shapes_hans.make_sample(seed, i, tag).image)), (),
                                   steps)[0] for i in indices])


def _predict(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(batch).argmax(1) for batch in images.split(256)])


def measure(model: torch.nn.Module, seed: int = shapes.VAL_SEED, per_class: int = shapes_hans.VAL_PER_CLASS) -> dict:
    """Accuracies (fractions) on the split: the planted class's tagged images as generated and with the tag
    removed, its untagged images as generated and with the tag pasted, the other classes clean and tagged, and
    the share of tagged other-class images predicted as the planted class."""
    model.eval()
    classes = len(shapes.CLASSES)
    planted = shapes_hans.PLANTED
    indices = range(per_class * classes)
    tagged = [i for i in indices if shapes_hans.is_tagged(i)]
    untagged = [i for i in indices if i % classes == planted and not shapes_hans.is_tagged(i)]
    others = [i for i in indices if i % classes != planted]

    def share(seed_indices: list[int], tag: bool | None, cls: int | None = None) -> float:
        predicted = _predict(model, _images(seed, seed_indices, tag))
        wanted = torch.tensor([i % classes for i in seed_indices]) if cls is None else torch.full_like(predicted, cls)
        return round(float((predicted == wanted).float().mean()), 4)

    return {
        "planted_class": shapes.CLASS_NAMES[planted], "tag_fraction": round(shapes_hans.TAG_FRACTION, 4),
        "split_seed": seed, "images": len(indices), "planted_tagged_images": len(tagged),
        "planted_untagged_images": len(untagged),
        "accuracy": share(list(indices), None),
        "planted_tagged_accuracy": share(tagged, None),
        "planted_tagged_accuracy_tag_removed": share(tagged, False),
        "planted_untagged_accuracy": share(untagged, None),
        "planted_untagged_accuracy_tag_pasted": share(untagged, True),
        "others_accuracy": share(others, None),
        "others_accuracy_tag_pasted": share(others, True),
        "others_predicted_planted_tag_pasted": share(others, True, planted),
        "others_predicted_planted_clean": share(others, False, planted),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.hans_effect", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vgg-shapes-hans", help="vgg-shapes-hans or vgg-shapes (the control)")
    parser.add_argument("--weights", default="demo", help="demo (committed) or a state-dict file")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    result = measure(build_vgg(args.model, args.weights)[0])
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:40s} {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
