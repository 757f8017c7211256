"""Does the CAV audit find shapes-hans' tag as a concept? Explains a split with concepts at the last convolutions,
marks a few tagged images (as an auditor who noticed them would), runs `python -m pipeline cav` with hans.csv as the
truth and the tag's box as the mask, and reports: the best channel (chosen by its AUROC for the marked images) and
its AUROC for all tagged images, the CAVs' AUROC / AP, and the share of positive relevance of that channel's
conditional maps inside the tag's box on the tagged images. With the clean model (`--model vgg-shapes`) the same
analysis is the control: no channel should retrieve the tag; `--dataset shapes` runs it on the images without any
tag (the plain shapes of the same seed and index), the truth naming those that shapes-hans tags.

    python -m demo.hans_cav --out runs/hans-cav [--model vgg-shapes-hans] [--dataset shapes-hans] [--per-class 60]
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.audit.cav_run import CavOptions, cav_audit
from pipeline.config import load_config
from pipeline.layout import RunLayout
from pipeline.run import explain

from . import shapes, shapes_hans

LAYERS = ("features.16", "features.12", "features.8")  # vgg-shapes' last three convolutions: 4x4, 8x8, 16x16 at 64
MAPS_LAYER = "features.12"
MARKED = 5  # tagged images the auditor marks
MAPS = 8  # conditional maps per image (the run's K)


def tag_mask() -> np.ndarray:
    """(64, 64) bool: the tag's box in the image's pixels (demo/shapes_hans.tag_box), one mask for every image."""
    x0, y0, x1, y1 = shapes_hans.tag_box()
    mask = np.zeros((shapes.IMAGE_SIZE, shapes.IMAGE_SIZE), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def write_data(data: Path, dataset: str, per_class: int) -> None:
    """The split with hans.csv: shapes-hans as generated, or (`shapes`) the same images without the tag."""
    if dataset == "shapes-hans":
        shapes_hans.write_split(data, per_class)
        return
    shapes.write_split(data, per_class)
    pd.DataFrame({"image_id": [shapes.image_id(i + 1) for i in range(per_class * len(shapes.CLASSES))],
                  "tag": [int(shapes_hans.is_tagged(i)) for i in range(per_class * len(shapes.CLASSES))]}
                 ).to_csv(data / shapes_hans.HANS_FILE, index=False)


def explain_split(data: Path, out: Path, model: str, maps_layer: str, cache: str | None) -> float:
    """Explain the split at `data` with concepts at LAYERS (maps at `maps_layer`); seconds taken."""
    values = {"dataset": "shapes-hans", "model": model, "out": str(out), "batch_size": 32, "shard_size": 128,
              "concepts": {"layers": list(LAYERS), "maps_layer": maps_layer, "maps": MAPS, "top": 8, "relmax": 8}}
    if cache:
        values["cache"] = cache
    config = load_config(values)
    config.root = str(data)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explain(config, overwrite=True, progress=False)
    return time.perf_counter() - started


def audit(data: Path, run: Path, layer: str, marked: int = MARKED, name: str = "tag") -> dict:
    """`cav` on the run with the first `marked` tagged images marked, hans.csv as truth, the tag's box as mask."""
    tags = pd.read_csv(data / shapes_hans.HANS_FILE, dtype={"image_id": str})
    inputs = run.parent / f"{run.name}-inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    tags[tags["tag"] == 1].head(marked)[["image_id"]].to_csv(inputs / "marked.csv", index=False)
    np.savez(inputs / "tag.npz", mask=tag_mask())
    summary = cav_audit(run, CavOptions(layer=layer, marked=str(inputs / "marked.csv"),
                                        truth=str(data / shapes_hans.HANS_FILE), masks=str(inputs / "tag.npz"),
                                        name=name))
    images = pd.read_parquet(RunLayout(run).cav_images(name))
    channels = pd.read_parquet(RunLayout(run).cav_channels(name))
    tagged = images["truth"].fillna(False).to_numpy(bool)
    best = summary["best_channels"][0]
    retrieval = summary["truth"]["retrieval"]
    return {
        "layer": layer, "images": summary["images"], "tagged": int(tagged.sum()), "marked": marked,
        "best_channel": best["channel"], "best_channel_auroc_marked": best["auroc_marked"],
        "best_channel_auroc_truth": best["auroc_truth"],
        "best_channel_auroc_truth_marked_classes": best["auroc_truth_marked_classes"],
        "best_auroc_truth_any_channel": float(channels["auroc_truth"].max()),
        "best_auroc_truth_marked_classes_any_channel": float(channels["auroc_truth_marked_classes"].max()),
        "cav_pattern": retrieval["cav_pattern"], "cav_classifier": retrieval["cav_classifier"],
        "r_bias_concept_tagged": summary["masks"]["r_bias_concept_mean"]["truth"],
        "r_bias_concept_tagged_images": int(images.loc[tagged, "r_bias_concept"].notna().sum()),
        "r_bias_map_tagged": summary["masks"]["r_bias_mean"]["truth"],
        "r_bias_map_clean": summary["masks"]["r_bias_mean"]["clean"],
        "seconds": summary["seconds"]["total"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.hans_cav", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the split, the run and the inputs")
    parser.add_argument("--model", default="vgg-shapes-hans", help="vgg-shapes-hans, or vgg-shapes (the control)")
    parser.add_argument("--dataset", choices=("shapes-hans", "shapes"), default="shapes-hans",
                        help="shapes-hans (tagged) or shapes (the same images, no tag)")
    parser.add_argument("--maps-layer", default=MAPS_LAYER, help=f"the run's conditional maps layer ({MAPS_LAYER})")
    parser.add_argument("--per-class", type=int, default=shapes_hans.VAL_PER_CLASS)
    parser.add_argument("--cache", help="traced-module cache (default: configs/run.yaml's)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    data = out / f"data-{args.dataset}"
    if not (data / shapes_hans.HANS_FILE).is_file():
        write_data(data, args.dataset, args.per_class)
    run = out / f"run-{args.model}-{args.dataset}"
    seconds = explain_split(data, run, args.model, args.maps_layer, args.cache)
    results = {"model": args.model, "dataset": args.dataset, "explain_seconds": round(seconds, 1),
               "layers": {layer: audit(data, run, layer, name=f"tag-{layer}") for layer in LAYERS}}
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
