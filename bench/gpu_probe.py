"""The precision probe on a GPU: eager LRP in float32 on CUDA against the CPU float64 oracle, for the trained
vgg-shapes and a random VGG16, TF32 off / on and cuDNN benchmark off / on, on random and on smooth images (the
kind the open "1-4 %" GPU bug was seen on). Prints a table, writes JSON.

    python -m bench.gpu_probe [--device cuda] [--out bench/results/gpu_probe.json]

`--device cpu` is a dry run of the same code on the CPU (TF32 and cuDNN settings then have no effect).
"""
from __future__ import annotations

import argparse
import itertools
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from bench import write_results
from lrp_module import LRPModel
from lrp_module.oracle import Float64Oracle, numeric_settings, probe_record
from lrp_module.weights_recipe import IMAGENET_MEAN, IMAGENET_STD
from lrp_module.zoo import build_model

DEFAULT_OUT = Path("bench/results/gpu_probe.json")
CASES = [("vgg-shapes", "demo", 64), ("vgg16", "random", 224)]
COMPOSITES = ("epsilon_gamma_box", "epsilon_plus_flat")


def smooth_images(n: int, size: int) -> torch.Tensor:
    """Smooth gradients with one bright block (tests/bad_inputs.reference_rgb), ImageNet-normalised."""
    rows, cols = np.mgrid[0:size, 0:size]
    pictures = []
    for seed in range(n):
        red, green = 40 + 180 * cols / size, 30 + 200 * rows / size
        blue = np.where((rows < size // 2) & (cols < size // 3), 230, 40 + 10 * seed)
        pictures.append(np.stack([red, green, blue]) / 255.0)
    x = torch.tensor(np.stack(pictures), dtype=torch.float32)
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--models", default=",".join(c[0] for c in CASES), help="comma-separated subset")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    rows = []
    cases = [c for c in CASES if c[0] in args.models.split(",")]
    for (model_name, weights, size), composite in itertools.product(cases, COMPOSITES):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, _ = build_model(model_name, weights)
        inputs = {"random": torch.randn(args.images, 3, size, size, generator=torch.Generator().manual_seed(0)),
                  "smooth": smooth_images(args.images, size)}
        oracle = Float64Oracle(model, composite)
        references = {kind: oracle.explain(x)[1].sum(1) for kind, x in inputs.items()}
        del oracle
        explainer = LRPModel(model, composite).to(args.device)
        cpu = LRPModel(model, composite)
        for tf32, benchmark in itertools.product((False, True), (False, True)):
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
            torch.backends.cudnn.benchmark = benchmark
            for kind, x in inputs.items():
                relevance = explainer.explain(x.to(args.device))[1].sum(1).cpu()
                row = {"model": model_name, "composite": composite, "size": size, "inputs": kind,
                       "requested_tf32": tf32, "requested_cudnn_benchmark": benchmark,
                       **probe_record(relevance, references[kind], numeric_settings(args.device)),
                       "cpu_float32": probe_record(cpu.explain(x)[1].sum(1), references[kind],
                                                    numeric_settings("cpu"))}
                rows.append(row)
                print(f"{model_name:<11s}{composite:<19s}{kind:<7s} tf32={tf32!s:<5s} benchmark={benchmark!s:<5s} "
                      f"device {row['max_relative_error']['max']:.2e} corr {row['correlation']['min']:.6f}   "
                      f"cpu {row['cpu_float32']['max_relative_error']['max']:.2e}", flush=True)
        del explainer, cpu
        if args.device == "cuda":
            torch.cuda.empty_cache()
    write_results(args.out, {"torch": torch.__version__, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
