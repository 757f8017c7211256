"""The float32 error budget: distance to the float64 oracle of eager float32, zennit float32, TorchScript and
onnxruntime, on random and trained weights, under every oneDNN kernel path of this CPU (one child process each).

    python -m bench.precision_budget [--quick] [--out bench/results/precision_budget.json]

Each child runs under one path (default = what this CPU picks, ONEDNN_MAX_CPU_ISA=AVX2, =SSE41, mkldnn off) and
prints JSON rows; the parent prints the table and, per row, the ratio to eager float32 on the same path, which is
what `lrp_module.oracle.bound` is derived from (docs/correctness.md).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from bench import write_results

DEFAULT_OUT = Path("bench/results/precision_budget.json")
PATHS = {"default": {}, "AVX2": {"ONEDNN_MAX_CPU_ISA": "AVX2"}, "SSE41": {"ONEDNN_MAX_CPU_ISA": "SSE41"},
         "mkldnn-off": {"LRP_MKLDNN": "0"}}
# (model, weights, composite, top-k, size, batch, with onnxruntime)
CASES = [
    ("vgg11", "random", "epsilon_plus_flat", 0.1, 224, 2, True),
    ("vgg16", "random", "epsilon_gamma_box", 0.0, 224, 2, True),
    ("vgg11_bn", "random", "epsilon_alpha2_beta1", 0.0, 64, 3, False),
    ("vgg-shapes", "demo", "epsilon_gamma_box", 0.0, 64, 4, True),
    ("vgg-shapes", "demo", "epsilon_plus_flat", 0.0, 64, 4, False),
]
QUICK = [CASES[0], CASES[3]]


def _zennit(model, composite: str, x: torch.Tensor) -> torch.Tensor | None:
    try:
        from zennit import composites as zc
        from zennit.attribution import Gradient
        from zennit.torchvision import VGGCanonizer
    except ImportError:
        return None
    from lrp_module.weights_recipe import IMAGENET_HIGH, IMAGENET_LOW

    canonizers = [VGGCanonizer()]
    low, high = (torch.tensor(v)[None, :, None, None] for v in (IMAGENET_LOW, IMAGENET_HIGH))
    make = {"epsilon_gamma_box": lambda: zc.EpsilonGammaBox(low=low, high=high, canonizers=canonizers),
            "epsilon_plus_flat": lambda: zc.EpsilonPlusFlat(canonizers=canonizers),
            "epsilon_alpha2_beta1": lambda: zc.EpsilonAlpha2Beta1(canonizers=canonizers)}.get(composite)
    if make is None:
        return None
    with Gradient(model, make()) as attributor:
        logits = model(x)
        index = logits.argmax(1, keepdim=True)
        start = torch.zeros_like(logits).scatter_(1, index, logits.gather(1, index))
        _, relevance = attributor(x.clone().requires_grad_(True), start)
    return relevance.sum(1)


def child(quick: bool) -> list[dict]:
    """Rows for the kernel path this process runs under."""
    if os.environ.get("LRP_MKLDNN") == "0":
        torch.backends.mkldnn.enabled = False
    from export import load_artifact
    from export.artifacts import ExportConfig, write_artifacts
    from lrp_module import LRPModel
    from lrp_module.oracle import Float64Oracle, compare
    from lrp_module.zoo import build_model

    rows = []
    for model_name, weights, composite, top_k, size, batch, with_onnx in (QUICK if quick else CASES):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, info = build_model(model_name, weights)
        lrp = LRPModel(model, composite, top_k=top_k)
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
        target = torch.full((batch,), -1)
        logits64, reference = Float64Oracle.like(model, lrp).explain(x, target)
        reference = reference.sum(1)
        logits, eager = lrp.explain(x, target)
        results = {"eager float32": (logits, eager.sum(1))}
        if top_k == 0.0:
            zennit = _zennit(model, composite, x)
            if zennit is not None:
                results["zennit float32"] = (None, zennit)
        with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            formats = ("torchscript", "onnx") if with_onnx else ("torchscript",)
            config = ExportConfig(model=model_name, weights=weights, composite=composite, top_k=top_k, height=size,
                                  width=size, formats=formats)
            write_artifacts(lrp, info, config, scratch, verify=False, source=model)
            for fmt, name in (("TorchScript", "lrp.torchscript.pt"), ("onnxruntime", "lrp.onnx")):
                if (Path(scratch) / name).is_file():
                    out_logits, out = load_artifact(Path(scratch) / name)(x.numpy(), target.numpy())
                    results[fmt] = (torch.from_numpy(out_logits), torch.from_numpy(out))
        for implementation, (out_logits, relevance) in results.items():
            agreement = compare(relevance, reference)
            rows.append({"model": model_name, "weights": weights, "composite": composite, "top_k": top_k,
                         "size": size, "images": batch, "implementation": implementation,
                         "relevance_error": agreement.worst, "correlation_min": float(agreement.correlation.min()),
                         "logits_error": None if out_logits is None else compare(out_logits, logits64).worst})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two cases instead of five")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {', '.join(PATHS)}")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.child:
        print("ROWS " + json.dumps(child(args.quick)))
        return 0
    rows = []
    for path in args.paths.split(","):
        env = {**os.environ, **PATHS[path]}
        command = [sys.executable, "-m", "bench.precision_budget", "--child"] + (["--quick"] if args.quick else [])
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        line = next((line for line in result.stdout.splitlines() if line.startswith("ROWS ")), None)
        if result.returncode or line is None:
            print(f"{path}: failed\n{result.stderr[-2000:]}", file=sys.stderr)
            return 1
        rows += [{"path": path, **row} for row in json.loads(line[5:])]
    eager = {(r["path"], r["model"], r["composite"]): r["relevance_error"] for r in rows
             if r["implementation"] == "eager float32"}
    print(f"{'path':<11s}{'model':<11s}{'composite':<22s}{'implementation':<16s}{'rel. error':>11s}"
          f"{'x eager':>9s}{'corr. min':>12s}{'logits':>10s}")
    for row in rows:
        row["ratio_to_eager"] = row["relevance_error"] / max(eager[(row["path"], row["model"], row["composite"])],
                                                             1e-300)
        logits = "" if row["logits_error"] is None else f"{row['logits_error']:.1e}"
        print(f"{row['path']:<11s}{row['model']:<11s}{row['composite']:<22s}{row['implementation']:<16s}"
              f"{row['relevance_error']:11.2e}{row['ratio_to_eager']:9.2f}{row['correlation_min']:12.7f}{logits:>10s}")
    write_results(args.out, {"torch": torch.__version__, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
