"""Cost of pixel flipping against the LRP it evaluates, side by side in one run: VGG16 224x224, random weights,
one batch; plain forward, LRP (`epsilon_gamma_box`), and region perturbation as the pipeline runs it (traced
forward-only VGG, MoRF + random order, 2 x (steps + 1) forward passes per image). Prints a table, writes JSON.

    python -m bench.faithfulness_speed [--model vgg16] [--batch 4] [--steps 100] [--patch 9] [--device cpu]
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
from bench.lrp_speed import best_seconds, build_model
from pipeline.faithfulness import flip_statistics

DEFAULT_OUT = Path("bench/results/faithfulness_speed.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--composite", default="epsilon_gamma_box")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--patch", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=3, help="best of, for forward and LRP (flipping: one run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    model = build_model(args.model).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explainer = lrp.LRPModel(model, args.composite).to(device)
        classifier = torch.jit.trace(model, torch.randn(2, 3, args.size, args.size, device=device), check_trace=False)
    torch.manual_seed(1)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)

    def synchronised(fn):
        def run():
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return out
        return run

    def forward():
        with torch.inference_mode():
            return classifier(x)

    def explain():
        with torch.no_grad():
            return explainer.explain(x)

    rows: dict[str, dict] = {}
    rows["forward"] = {"label": "forward (traced VGG)",
                       "seconds_per_image": best_seconds(synchronised(forward), args.repeats) / args.batch}
    rows["lrp"] = {"label": f"LRP {args.composite}",
                   "seconds_per_image": best_seconds(synchronised(explain), args.repeats) / args.batch}
    logits, relevance = explain()
    target = logits.argmax(1)
    ids = [f"image-{i}" for i in range(args.batch)]
    start = time.perf_counter()
    values = synchronised(lambda: flip_statistics(classifier, x, relevance.sum(1), target, ids, args.steps,
                                                  args.patch, batch_size=args.batch))()
    flip = (time.perf_counter() - start) / args.batch
    rows["flip"] = {"label": f"pixel flipping {args.steps} steps, MoRF + random",
                    "seconds_per_image": flip, "forward_passes_per_image": 2 * (args.steps + 1)}
    lrp_seconds, forward_seconds = rows["lrp"]["seconds_per_image"], rows["forward"]["seconds_per_image"]
    for row in rows.values():
        row["ratio_to_lrp"] = row["seconds_per_image"] / lrp_seconds
        row["ratio_to_forward"] = row["seconds_per_image"] / forward_seconds
    rows["flip"]["aopc_morf_mean"] = float(values["aopc_morf"].mean())
    rows["flip"]["aopc_random_mean"] = float(values["aopc_random"].mean())

    threads = torch.get_num_threads()
    print(f"\n{args.model} {args.size}x{args.size}, batch {args.batch}, patch {args.patch}, {args.device}, "
          f"{threads} threads, random weights (forward / LRP best of {args.repeats}, flipping one run)")
    header = f"{'method':<44s} {'s/image':>8s} {'x LRP':>7s} {'x forward':>9s}"
    print(header + "\n" + "-" * len(header))
    for row in rows.values():
        print(f"{row['label']:<44s} {row['seconds_per_image']:8.3f} {row['ratio_to_lrp']:7.1f} "
              f"{row['ratio_to_forward']:9.1f}")
    report = {
        "setup": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                  "torch": torch.__version__, "threads": threads, "cpu": platform.processor(),
                  "machine": platform.machine(), "cores": os.cpu_count(),
                  "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None},
        "results": rows,
    }
    write_results(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
