"""Cost of the model parameter randomisation test against the LRP it checks: VGG16 224x224 (random weights), a
batch of images; one LRP pass (the median of --repeats before and after the test, after a warm-up) and the
cascading randomisation of every weight layer as `python -m pipeline sanity` runs it (pipeline/sanity/mprt.py: the
original model and one model per layer, each explained on the whole batch, layer draws in place, one LRP engine
refreshed per layer and the forward below the randomised layers taken from the original's, the similarities), one
run. The target (issue 23): cascading <= (layers + 1) x one LRP pass per image. Prints a table,
writes JSON.

    python -m bench.sanity_speed [--model vgg16] [--images 4] [--modes cascading] [--device cpu]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

import lrp_module as lrp
from bench import write_results
from bench.lrp_speed import build_model
from pipeline.sanity.mprt import SanityParams, Timing, mprt
from pipeline.sanity.randomise import randomisable

DEFAULT_OUT = Path("bench/results/sanity_speed.json")


def median_seconds(fn, repeats: int) -> float:
    """Median of `repeats` timed calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--composite", default="epsilon_gamma_box")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=4, help="images, explained in one batch per model")
    parser.add_argument("--modes", default="cascading", help="cascading, independent or both (comma-separated)")
    parser.add_argument("--repeats", type=int, default=3, help="median of, before and after, for the single pass")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    model = build_model(args.model)
    layers = randomisable(model)
    torch.manual_seed(1)
    x = torch.randn(args.images, 3, args.size, args.size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explainer = lrp.LRPModel(model, args.composite).to(device)
    xd = x.to(device)
    targets = explainer.explain(xd)[0].argmax(1).cpu()

    def one_pass():
        out = explainer.explain(xd, targets.to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    before = median_seconds(one_pass, args.repeats) / args.images
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    rows = {}
    for mode in modes:
        timing = Timing()
        start = time.perf_counter()
        mprt(model, args.composite, 0.0, x, targets, SanityParams(modes=(mode,), batch_size=args.images), device,
             timing=timing)
        seconds = (time.perf_counter() - start) / args.images
        rows[mode] = {"label": f"{mode} MPRT, {len(layers)} layers + original", "seconds_per_image": seconds,
                      "passes": timing.passes, "target_ratio": len(layers) + 1,
                      "lrp_seconds_per_image": timing.lrp / args.images,
                      "randomise_seconds_per_image": timing.randomise / args.images,
                      "compare_seconds_per_image": timing.compare / args.images}
    after = median_seconds(one_pass, args.repeats) / args.images
    pass_seconds = (before + after) / 2  # the median before and after the test: a shared machine's load drifts
    rows = {"lrp": {"label": f"one LRP pass ({args.composite})", "seconds_per_image": pass_seconds,
                    "passes": 1, "ratio_to_lrp": 1.0, "before": before, "after": after}, **rows}
    for mode in modes:
        row = rows[mode]
        row["ratio_to_lrp"] = row["seconds_per_image"] / pass_seconds
        row["meets_target"] = row["ratio_to_lrp"] <= row["target_ratio"]
        row["lrp_seconds_per_pass_and_image"] = row["lrp_seconds_per_image"] / row["passes"]

    threads = torch.get_num_threads()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"\n{args.model} {args.size}x{args.size}, {args.images} images, {args.device}, {threads} threads, random "
          f"weights, {len(layers)} weight layers, load {load:.1f} (one pass: median of {args.repeats} before and "
          f"after, MPRT one run)")
    header = f"{'what':<44s} {'s/image':>8s} {'passes':>6s} {'x LRP':>7s} {'target':>7s}"
    print(header + "\n" + "-" * len(header))
    for row in rows.values():
        target = f"<= {row['target_ratio']}" if "target_ratio" in row else ""
        print(f"{row['label']:<44s} {row['seconds_per_image']:8.3f} {row['passes']:6d} {row['ratio_to_lrp']:7.2f} "
              f"{target:>7s}")
    for mode in modes:
        r = rows[mode]
        print(f"  {mode}: LRP {r['lrp_seconds_per_image']:.3f} s/image ({r['lrp_seconds_per_pass_and_image']:.3f} per "
              f"pass, the engines' builds and refreshes included), randomisation "
              f"{r['randomise_seconds_per_image']:.3f}, similarities {r['compare_seconds_per_image']:.3f}")
    report = {
        "setup": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                  "torch": torch.__version__, "threads": threads, "cpu": platform.processor(),
                  "machine": platform.machine(), "cores": os.cpu_count(), "load": load,
                  "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None},
        "results": rows,
    }
    write_results(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
