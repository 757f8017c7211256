"""The evaluation metrics (pipeline/metrics) against Quantus 0.6.0's batched calls on the same images, maps and
boxes, one run each: VGG16 224x224 (random weights, float32 on both sides), LRP `epsilon_gamma_box` maps (not
timed). Map metrics on `--images` (256), the model metrics with Quantus's default parameters on `--model-images`
(their cost is forward passes, the same count on both sides; seconds per image extrapolate linearly). Quantus runs
in .venv-quantus (`make quantus-venv`) through tests/tools/quantus_reference.py. Prints a table, writes JSON.

    python -m bench.metrics_speed [--quick] [--images 256] [--model-images 4]  (--quick: 16 and 1)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import lrp_module as lrp
from bench import write_results
from bench.lrp_speed import build_model
from pipeline.metrics import maps
from pipeline.metrics import model as metrics
from pipeline.stats import box_mask

ROOT = Path(__file__).resolve().parent.parent
QUANTUS_PYTHON = ROOT / ".venv-quantus" / "bin" / "python"
CHILD = ROOT / "tests" / "tools" / "quantus_reference.py"
DEFAULT_OUT = Path("bench/results/metrics_speed.json")
PER_IMAGE = {"normalise_func_kwargs": {"normalise_axes": [1, 2, 3]}}
ROAD_PERCENTAGES = tuple(range(1, 100, 2))

MAP_METRICS = {  # name: (Quantus class, its arguments, ours)
    "pointing_game": ("PointingGame", {}, lambda a, s: maps.pointing_game(a, s)),
    "relevance_rank_accuracy": ("RelevanceRankAccuracy", {}, maps.relevance_rank_accuracy),
    "top_k_intersection": ("TopKIntersection", {"k": 1000}, lambda a, s: maps.top_k_intersection(a, s, 1000)),
    "attribution_localisation": ("AttributionLocalisation", {}, maps.attribution_localisation),
    "sparseness": ("Sparseness", {}, lambda a, s: maps.sparseness(a)),
    "complexity": ("Complexity", {}, lambda a, s: maps.complexity(a)),
    "effective_complexity": ("EffectiveComplexity", {}, lambda a, s: maps.effective_complexity(a)),
}


def _quantus(arrays: dict, spec: list, model_file: Path | None) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        np.savez(folder / "in.npz", **arrays)
        (folder / "spec.json").write_text(json.dumps(spec))
        command = [str(QUANTUS_PYTHON), str(CHILD), str(folder / "in.npz"), str(folder / "spec.json"),
                   str(folder / "out.npz")]
        if model_file is not None:
            command += [str(model_file), "float32"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"Quantus failed: {done.stderr[-2000:]}")
        return dict(np.load(folder / "out.npz"))


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="images for the map metrics")
    parser.add_argument("--model-images", type=int, default=4, help="images for the model metrics")
    parser.add_argument("--quick", action="store_true", help="16 and 1 images, ROAD at 5 percentages")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if not QUANTUS_PYTHON.exists():
        print(f"error: {QUANTUS_PYTHON} missing: run `make quantus-venv`", file=sys.stderr)
        return 2
    if args.quick:
        args.images, args.model_images = 16, 1
    percentages = ROAD_PERCENTAGES[::10] if args.quick else ROAD_PERCENTAGES
    load_before = os.getloadavg()
    net = build_model("vgg16").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explainer = lrp.LRPModel(net, "epsilon_gamma_box")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.images, 3, 224, 224, generator=generator)
    with torch.no_grad():
        y = net(x).argmax(1)
        relevance = torch.cat([explainer(x[i:i + 8], y[i:i + 8]) for i in range(0, len(x), 8)])
    boxes = [[(float(b), float(b), float(b) + 100, float(b) + 120)] for b in torch.randint(0, 100, (len(x),),
                                                                                            generator=generator)]
    masks = torch.stack([box_mask(b, 224, 224) for b in boxes])
    a64 = relevance.double()
    arrays = {"x": x.double().numpy(), "y": y.numpy(), "a": a64[:, None].numpy(), "s": masks[:, None].numpy() * 1.0}
    rows: dict[str, dict] = {}
    spec = [{"name": name, "metric": q, "init": {**init, **PER_IMAGE}} for name, (q, init, _) in MAP_METRICS.items()]
    theirs = _quantus(arrays, spec, None)
    for name, (_, _, ours) in MAP_METRICS.items():
        seconds, _ = _timed(lambda ours=ours: ours(relevance, masks))
        rows[name] = {"images": len(x), "ours_s_per_image": seconds / len(x),
                      "quantus_s_per_image": float(theirs[f"{name}_seconds"]) / len(x)}
        print(name, rows[name], flush=True)

    m = args.model_images
    xm, ym, am = x[:m], y[:m], relevance[:m]
    # Quantus RandomLogit's own draw (seed 42), so that it asks for the maps computed here
    other = metrics.other_classes(ym, 1000, torch.from_numpy(np.random.RandomState(42).randint(0, 999, m)))
    with torch.no_grad():
        other_a = explainer(xm, other)
    chosen = dict(metrics.road_pixels(am, percentages))
    model_arrays = {**{k: v[:m] for k, v in arrays.items()}, "other_a": other_a[:, None].double().numpy(),
                    "other_y": other.numpy()}
    model_spec = [
        {"name": "faithfulness_correlation", "metric": "FaithfulnessCorrelation", "seed": 1,
         "init": {"return_aggregate": False, **PER_IMAGE}},
        *({"name": f"region_{order}", "metric": "RegionPerturbation", "init": {"order": order, **PER_IMAGE}}
          for order in ("morf", "lerf")),
        {"name": "road", "metric": "road", "noise": 0.01,
         "pixels": [[chosen[p][i].tolist() for i in range(m)] for p in range(len(percentages))]},
        {"name": "random_logit", "metric": "RandomLogit", "init": {"num_classes": 1000, **PER_IMAGE}},
    ]
    with tempfile.TemporaryDirectory() as folder:
        traced = Path(folder) / "vgg16.pt"
        torch.jit.trace(net, x[:1]).save(str(traced))
        theirs = _quantus(model_arrays, model_spec, traced)
    print("Quantus model metrics:", {k: float(v) for k, v in theirs.items() if k.endswith("_seconds")}, flush=True)
    classifier = torch.jit.trace(net, x[:1])
    gens = [torch.Generator().manual_seed(i) for i in range(m)]
    ours = {
        "faithfulness_correlation": lambda: metrics.faithfulness_correlation(
            classifier, xm, am, ym, metrics.draw_subsets(gens, xm[0].numel(), 100, 224)),
        "region_morf": lambda: metrics.region_perturbation(classifier, xm, am, ym, order="morf"),
        "region_lerf": lambda: metrics.region_perturbation(classifier, xm, am, ym, order="lerf"),
        "road": lambda: metrics.road(classifier, xm, am, ym, percentages, 0.01),
        "random_logit": lambda: metrics.random_logit(am, other_a),
    }
    for name, fn in ours.items():
        seconds, _ = _timed(fn)
        rows[name] = {"images": m, "ours_s_per_image": seconds / m,
                      "quantus_s_per_image": float(theirs[f"{name}_seconds"]) / m}
        print(name, rows[name], flush=True)
    for row in rows.values():
        row["ratio"] = row["quantus_s_per_image"] / max(row["ours_s_per_image"], 1e-12)
    total_ours = sum(r["ours_s_per_image"] for r in rows.values()) * 256
    total_quantus = sum(r["quantus_s_per_image"] for r in rows.values()) * 256
    load_after = os.getloadavg()
    print(f"\nVGG16 224x224, random weights, float32, {torch.get_num_threads()} threads; load average "
          f"{load_before[0]:.1f} before, {load_after[0]:.1f} after; one run; ROAD at {len(percentages)} percentages")
    header = f"{'metric':<26s} {'images':>6s} {'ours s/img':>11s} {'Quantus s/img':>14s} {'ratio':>7s}"
    print(header + "\n" + "-" * len(header))
    for name, row in rows.items():
        print(f"{name:<26s} {row['images']:6d} {row['ours_s_per_image']:11.4f} {row['quantus_s_per_image']:14.4f} "
              f"{row['ratio']:7.1f}")
    print(f"{'all, per 256 images':<26s} {'':6s} {total_ours:11.1f} {total_quantus:14.1f} "
          f"{total_quantus / total_ours:7.1f}   (seconds, extrapolated)")
    report = {"setup": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                        "torch": torch.__version__, "threads": torch.get_num_threads(),
                        "cpu": platform.processor(), "cores": os.cpu_count(), "load_before": load_before,
                        "load_after": load_after, "road_percentages": list(percentages)},
              "results": rows, "all_256_images": {"ours_s": total_ours, "quantus_s": total_quantus,
                                                  "ratio": total_quantus / total_ours}}
    write_results(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
