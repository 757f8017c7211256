"""Exported ONNX LRP in onnxruntime (CPU) against eager LRPModel, side by side in one run, VGG16 224x224 batch 8.

    python -m bench.export_speed [--model vgg16] [--composite epsilon_gamma_box] [--batch 8] [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from bench.lrp_speed import best_seconds
from export import load_artifact
from export.artifacts import ExportConfig, build_explainer, write_artifacts

DEFAULT_OUT = Path("bench/results/export_speed.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--composite", default="epsilon_gamma_box")
    parser.add_argument("--top-k", type=float, default=0.0)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    config = ExportConfig(model=args.model, weights="random", composite=args.composite, top_k=args.top_k,
                          height=args.size, width=args.size, formats=("onnx", "torchscript"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lrp, info, model = build_explainer(config)
    x = torch.randn(args.batch, 3, args.size, args.size)
    target = torch.full((args.batch,), -1)
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        write_artifacts(lrp, info, config, scratch, verify=False, source=model)
        runners = {"eager LRPModel": lambda: lrp.explain(x, target)}
        for fmt, name in (("onnxruntime (ONNX)", "lrp.onnx"), ("TorchScript", "lrp.torchscript.pt")):
            run = load_artifact(Path(scratch) / name)
            runners[fmt] = lambda run=run: run(x.numpy(), target.numpy())
        for label, fn in runners.items():
            rows[label] = {"seconds_per_image": best_seconds(fn, args.repeats) / args.batch}
    eager = rows["eager LRPModel"]["seconds_per_image"]
    print(f"\n{args.model} {args.composite} top-k {args.top_k}, {args.size}x{args.size}, batch {args.batch}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'runtime':<22s} {'s/image':>8s} {'x eager':>8s}")
    for label, row in rows.items():
        row["ratio_to_eager"] = row["seconds_per_image"] / eager
        print(f"{label:<22s} {row['seconds_per_image']:8.3f} {row['ratio_to_eager']:8.2f}")
    ratio = rows["onnxruntime (ONNX)"]["ratio_to_eager"]
    target_row = {"target": "ONNX in onnxruntime <= 1.2x eager", "value": round(ratio, 3), "met": ratio <= 1.2}
    print(f"\ntargets:\n  [{'met' if target_row['met'] else 'MISSED'}] {target_row['target']}: {ratio:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"setup": vars(args) | {"out": str(args.out)}, "results": rows,
                                    "targets": [target_row]}, indent=2))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
