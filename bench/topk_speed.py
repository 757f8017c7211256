"""Top-k selection speed, side by side in one run: the k-th largest value per image by the sampled bracket
(`topk.kth_largest`, the CPU's), by radix selection (`topk_select.kth_largest_radix`, CUDA's) and by
`torch.topk`, at VGG16's relevance sizes; then VGG16 LRP with top-k 0.1 against plain LRP on the same device
(the filter's cost; target on CUDA: at most +15 %). Prints a table (ratios to the bracket) and writes JSON.

    python -m bench.topk_speed [--device cpu|cuda] [--batch 8] [--size 224] [--repeats 3] [--quick] [--out PATH]
"""
from __future__ import annotations

import argparse
import platform
import sys
import warnings
from pathlib import Path

import torch

from bench import write_results
from bench.lrp_speed import best_seconds, build_model
from lrp_module import LRPModel
from lrp_module.topk import kept_count, kth_largest
from lrp_module.topk_select import kth_largest_radix

DEFAULT_OUT = Path("bench/results/topk_speed.json")
CUDA_TARGET = 0.15  # the issue's: top-k 0.1 costs at most +15 % of the plain LRP on the GPU


def vgg16_relevance_shapes(size: int) -> list[tuple[int, ...]]:
    """The distinct per-image shapes the filter sees in VGG16 at `size` x `size` (conv blocks, then the head)."""
    shapes = [(c, size >> block, size >> block) for block, c in enumerate((64, 128, 256, 512, 512))]
    return shapes + [(512, size >> 5, size >> 5), (4096,), (1000,)]


def relu_like(shape: tuple[int, ...], batch: int, device: str) -> torch.Tensor:
    """Half exact zeros and a heavy positive tail, as relevance below a ReLU."""
    torch.manual_seed(0)
    return torch.randn(batch, *shape, device=device).clamp_(min=0).pow_(3).flatten(1)


def selection_rows(args: argparse.Namespace) -> list[dict]:
    rows = []
    for shape in vgg16_relevance_shapes(args.size):
        flat = relu_like(shape, args.batch, args.device)
        k = kept_count(0.1, flat.shape[1])
        contenders = {"bracket": lambda flat=flat, k=k: kth_largest(flat, k),
                      "radix": lambda flat=flat, k=k: kth_largest_radix(flat, k),
                      "torch.topk": lambda flat=flat, k=k: torch.topk(flat, k, dim=1, sorted=False).values.amin(1)}
        reference = torch.topk(flat, k, dim=1).values[:, -1:]
        assert torch.equal(kth_largest_radix(flat, k), reference), f"radix selection wrong at {shape}"
        seconds = {name: best_seconds(fn, args.repeats) for name, fn in contenders.items()}
        rows.append({"shape": list(shape), "values_per_image": flat.shape[1], "k": k,
                     "ms": {name: 1e3 * s for name, s in seconds.items()},
                     "ratio_to_bracket": {name: s / seconds["bracket"] for name, s in seconds.items()}})
    return rows


def lrp_cost(args: argparse.Namespace) -> dict:
    """Seconds per image of VGG16 LRP without and with top-k 0.1 on the device (the filter the device picks)."""
    model = build_model("vgg16").to(args.device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = LRPModel(model, "epsilon_gamma_box")
        filtered = LRPModel(model, "epsilon_gamma_box", top_k=0.1)
    base = best_seconds(lambda: plain.explain(x), args.repeats) / args.batch
    top = best_seconds(lambda: filtered.explain(x), args.repeats) / args.batch
    return {"plain_s_per_image": base, "top_k_0.1_s_per_image": top, "extra": top / base - 1}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="selection only at 64x64, batch 2, one repeat, no LRP")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if args.quick:
        args.size, args.batch, args.repeats = 64, 2, 1
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    report = {"setup": {**{k: str(v) for k, v in vars(args).items()}, "device_name": device_name,
                        "threads": torch.get_num_threads(), "torch": torch.__version__},
              "selection": selection_rows(args)}
    print(f"\nk-th largest of top-k 0.1, batch {args.batch}, {device_name} ({torch.get_num_threads()} threads)")
    print(f"  {'shape':<18}{'bracket ms':>12}{'radix ms':>12}{'topk ms':>12}{'radix/bracket':>15}{'topk/bracket':>14}")
    for row in report["selection"]:
        ms, ratio = row["ms"], row["ratio_to_bracket"]
        print(f"  {str(tuple(row['shape'])):<18}{ms['bracket']:>12.2f}{ms['radix']:>12.2f}{ms['torch.topk']:>12.2f}"
              f"{ratio['radix']:>15.2f}{ratio['torch.topk']:>14.2f}")
    if not args.quick:
        cost = report["lrp"] = lrp_cost(args)
        print(f"\nVGG16 epsilon_gamma_box {args.size}x{args.size}: "
              f"plain {1e3 * cost['plain_s_per_image']:.2f} ms/image, "
              f"top-k 0.1 {1e3 * cost['top_k_0.1_s_per_image']:.2f} ms/image ({100 * cost['extra']:+.1f} %)")
        if args.device == "cuda":
            met = cost["extra"] <= CUDA_TARGET
            report["targets"] = [{"target": "CUDA: top-k 0.1 costs <= +15 % of plain LRP",
                                  "value": round(cost["extra"], 3), "met": met}]
            print(f"  [{'met' if met else 'MISSED'}] top-k 0.1 <= +15 % of plain LRP on the GPU")
    write_results(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
