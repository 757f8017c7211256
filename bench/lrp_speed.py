"""LRP speed and memory, side by side in one run: plain forward, forward + input gradient, this project's LRP
for every composite and with the top-k filter, zennit for the same composites, captum's LRP, and the original
blog's algorithm. Prints a table (seconds per image, ratio to forward, speed-up over zennit) and writes JSON.

    python -m bench.lrp_speed [--model vgg16|resnet50|...] [--size 224] [--batch 8] [--repeats 3] [--quick]
                              [--device cuda] [--baseline main] [--out PATH]

--baseline REF also times the lrp_module of git revision REF (e.g. main, before the graph engine) in the same run,
so that a change to the engine is judged side by side. zennit runs with the canonizer the model needs
(ResNetCanonizer for ResNets, VGGCanonizer for VGGs with batch norm).

On CUDA every timed call ends with torch.cuda.synchronize(), TF32 is off unless --tf32, and peak memory is
torch.cuda.max_memory_allocated added by one call (in process). Contenders whose package is missing (zennit,
captum) are skipped with a note.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

import lrp_module as lrp
from bench import write_results
from bench.blog_lrp import BlogLRP  # the blog's algorithm, as the tests run it
from lrp_module.weights_recipe import IMAGENET_HIGH, IMAGENET_LOW

COMPOSITES = ["epsilon_gamma_box", "epsilon_plus", "epsilon_plus_flat", "epsilon_alpha2_beta1",
              "epsilon_alpha2_beta1_flat", "montavon", "seed"]
TOP_K = [0.1, 0.02]
DEFAULT_OUT = Path("bench/results/lrp_speed.json")


def zennit_canonizers(name: str) -> list:
    """What zennit needs to treat `name` as this project does: residual sums as Sum, batch norm merged."""
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    if name.startswith(("resnet", "wide_resnet", "resnext")):
        return [ResNetCanonizer()]
    return [VGGCanonizer()] if name.endswith("_bn") else []


def baseline_package(ref: str) -> object:
    """lrp_module as it is at git revision `ref`, imported under another name from a temporary copy."""
    import importlib
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="lrp-baseline-"))
    package = root / "lrp_baseline"
    package.mkdir()
    listing = subprocess.run(["git", "ls-tree", "-r", "--name-only", f"{ref}:lrp_module"], capture_output=True,
                             text=True, check=True).stdout.split()
    for name in (n for n in listing if n.endswith(".py")):  # subpackages too (lrp_module/rules/)
        source = subprocess.run(["git", "show", f"{ref}:lrp_module/{name}"], capture_output=True, text=True,
                                check=True).stdout
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(source)
    sys.path.insert(0, str(root))
    return importlib.import_module("lrp_baseline")


def build_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)().eval()


# ------------------------------------------------------------------------------------------ the contenders
def plain_forward(model: nn.Module) -> Callable[[torch.Tensor], object]:
    def run(x):
        with torch.inference_mode():
            return model(x)
    return run


def forward_and_input_gradient(model: nn.Module) -> Callable[[torch.Tensor], object]:
    model = copy.deepcopy(model).requires_grad_(False)  # only the input gradient, as saliency needs

    def run(x):
        x = x.clone().requires_grad_(True)
        out = model(x)
        return torch.autograd.grad(out.max(dim=1).values.sum(), x)[0]
    return run


def ours(model: nn.Module, composite: str, top_k: float = 0.0) -> Callable[[torch.Tensor], object]:
    explainer = lrp.LRPModel(model, composite, top_k=top_k)
    return explainer.explain


def baseline(model: nn.Module, composite: str, ref: str) -> Callable[[torch.Tensor], object]:
    return baseline_package(ref).LRPModel(model, composite).explain


def zennit_attribution(model: nn.Module, composite: str, canonizers: Callable[[], list] = list
                       ) -> Callable[[torch.Tensor], object]:
    from zennit import composites as zc
    from zennit.attribution import Gradient

    device = next(model.parameters()).device
    low = torch.tensor(IMAGENET_LOW, device=device)[None, :, None, None]
    high = torch.tensor(IMAGENET_HIGH, device=device)[None, :, None, None]
    factories = {
        "epsilon_gamma_box": lambda c: zc.EpsilonGammaBox(low=low, high=high, canonizers=c),
        "epsilon_plus": lambda c: zc.EpsilonPlus(canonizers=c),
        "epsilon_plus_flat": lambda c: zc.EpsilonPlusFlat(canonizers=c),
        "epsilon_alpha2_beta1": lambda c: zc.EpsilonAlpha2Beta1(canonizers=c),
        "epsilon_alpha2_beta1_flat": lambda c: zc.EpsilonAlpha2Beta1Flat(canonizers=c),
    }
    model = copy.deepcopy(model)

    def run(x):
        with Gradient(model, factories[composite](canonizers())) as attributor:
            logits = model(x)
            index = logits.argmax(1, keepdim=True)
            start = torch.zeros_like(logits).scatter_(1, index, logits.gather(1, index))
            return attributor(x.clone().requires_grad_(True), start)
    return run


def captum_lrp(model: nn.Module) -> Callable[[torch.Tensor], object]:
    from captum.attr import LRP

    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    if any(isinstance(m, torchvision.models.resnet.BasicBlock | torchvision.models.resnet.Bottleneck)
           for m in model.modules()):
        raise ImportError("captum's LRP has no rule for the residual addition (it would be a silent pass-through)")
    explainer = LRP(model)

    def run(x):
        with torch.no_grad():
            target = model(x).argmax(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return explainer.attribute(x.clone().requires_grad_(True), target=target)
    return run


def blog_code(model: nn.Module) -> Callable[[torch.Tensor], object]:
    if not isinstance(model, torchvision.models.VGG):
        raise ImportError("the blog's code is a VGG layer list")
    return BlogLRP(model)


# ---------------------------------------------------------------------------------------------- measuring
def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Best of `repeats` timed calls after one warm-up call (shared by the benchmarks); waits for queued CUDA
    work, so device timings are real."""
    fn()
    _synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def cuda_peak_memory_mb(fn: Callable, x: torch.Tensor) -> float:
    """GPU memory allocated at the peak of one call beyond what was allocated before it (MiB)."""
    fn(x[:1])  # allocate lazily created state before measuring
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(x)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def seconds_per_image(fn: Callable, x: torch.Tensor, repeats: int) -> float:
    return best_seconds(lambda: fn(x), repeats) / x.shape[0]


def peak_memory_mb(spec: str, args: argparse.Namespace) -> float | None:
    """Peak resident memory added by one call, measured in a fresh process (Linux VmHWM, reset before)."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    command = [sys.executable, "-m", "bench.lrp_speed", "--memory-probe", spec, "--model", args.model,
               "--size", str(args.size), "--batch", str(args.batch)] + (["--baseline", args.baseline] if args.baseline
                                                                         else [])
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        print(f"memory probe {spec} failed: {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return float(result.stdout.strip().splitlines()[-1])


def _memory_probe(spec: str, args: argparse.Namespace) -> None:
    model = build_model(args.model)
    x = torch.randn(args.batch, 3, args.size, args.size)
    fn = make(spec, model, args)

    def status(key: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return float(line.split()[1]) / 1024
        raise KeyError(key)

    fn(x[:1])  # allocate lazily created state before measuring
    before = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    fn(x)
    print(status("VmHWM") - before)


def make(spec: str, model: nn.Module, args: argparse.Namespace) -> Callable:
    kind, _, rest = spec.partition(":")
    if kind == "forward":
        return plain_forward(model)
    if kind == "gradient":
        return forward_and_input_gradient(model)
    if kind == "ours":
        composite, _, top_k = rest.partition("@")
        return ours(model, composite, float(top_k or 0))
    if kind == "zennit":
        return zennit_attribution(model, rest, lambda: zennit_canonizers(args.model))
    if kind == "baseline":
        return baseline(model, rest, args.baseline)
    if kind == "captum":
        return captum_lrp(model)
    if kind == "blog":
        return blog_code(model)
    raise ValueError(spec)


def plan(args: argparse.Namespace) -> list[tuple[str, str]]:
    composites = ["epsilon_gamma_box", "epsilon_plus_flat", "seed"] if args.quick else COMPOSITES
    rows = [("forward", "forward (inference mode)"), ("gradient", "forward + input gradient")]
    rows += [(f"ours:{c}", f"ours {c}") for c in composites]
    rows += [(f"ours:epsilon_gamma_box@{k}", f"ours epsilon_gamma_box top-k {k}") for k in TOP_K]
    if args.baseline:
        rows += [(f"baseline:{c}", f"{args.baseline}'s lrp_module {c}")
                 for c in ("epsilon_gamma_box", "epsilon_plus_flat")]
    zennit = [c for c in composites if c.startswith("epsilon")]
    rows += [(f"zennit:{c}", f"zennit {c}") for c in zennit]
    rows += [("captum:", "captum LRP (default rules)"), ("blog:", "blog code (z+ everywhere)")]
    if args.only:  # e.g. "ours:epsilon_gamma_box,baseline:": these specs, a trailing ':' meaning every one of a kind
        wanted = args.only.split(",")
        rows = [row for row in rows if row[0] == "forward" or row[0] in wanted
                or any(w.endswith(":") and row[0].startswith(w) for w in wanted)]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=None, help="best of (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="three composites, one repeat unless --repeats")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--tf32", action="store_true", help="CUDA: allow TF32 matmuls and convolutions")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--baseline", help="also time lrp_module from this git revision (e.g. main)")
    parser.add_argument("--only", help="comma-separated spec prefixes to run (forward always runs)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe:
        _memory_probe(args.memory_probe, args)
        return 0
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available")
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    model = build_model(args.model).to(args.device)
    torch.manual_seed(1)
    x = torch.randn(args.batch, 3, args.size, args.size).to(args.device)
    results: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    for spec, label in plan(args):
        try:
            fn = make(spec, model, args)
        except ImportError as error:  # zennit / captum not installed here
            skipped[spec] = f"{label}: skipped, {error}"
            print(f"  {label:<42s} skipped ({error})", flush=True)
            continue
        seconds = seconds_per_image(fn, x, args.repeats)
        results[spec] = {"label": label, "seconds_per_image": seconds}
        print(f"  {label:<42s} {seconds:8.3f} s/image", flush=True)
        del fn
    memory_specs = [] if args.no_memory else ["gradient", "ours:epsilon_gamma_box", "ours:epsilon_plus_flat",
                                              "ours:seed", "baseline:epsilon_gamma_box"]
    for spec in (s for s in memory_specs if s in results):
        if args.device == "cuda":
            results[spec]["peak_memory_mb"] = cuda_peak_memory_mb(make(spec, model, args), x)
        else:
            results[spec]["peak_memory_mb"] = peak_memory_mb(spec, args)

    forward = results["forward"]["seconds_per_image"]
    for spec, row in results.items():
        row["ratio_to_forward"] = row["seconds_per_image"] / forward
        composite = spec.partition(":")[2].partition("@")[0]
        if spec.startswith("ours:") and f"zennit:{composite}" in results:
            row["speedup_over_zennit"] = results[f"zennit:{composite}"]["seconds_per_image"] / row["seconds_per_image"]
        if spec.startswith("baseline:") and f"ours:{composite}" in results:
            results[f"ours:{composite}"]["speedup_over_baseline"] = row["seconds_per_image"] / \
                results[f"ours:{composite}"]["seconds_per_image"]
        if spec.startswith("ours:") and "blog:" in results:
            row["speedup_over_blog"] = results["blog:"]["seconds_per_image"] / row["seconds_per_image"]
    targets = check_targets(results, args.model)
    print_table(results, targets, args)
    for note in skipped.values():
        print(f"  note: {note}")
    report = {
        "setup": {"model": args.model, "size": args.size, "batch": args.batch, "repeats": args.repeats,
                  "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor(),
                  "machine": platform.machine(), "cores": os.cpu_count(),
                  "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                  "tf32": args.tf32 if args.device == "cuda" else None,
                  "peak_memory": "torch.cuda.max_memory_allocated, in process" if args.device == "cuda"
                  else "VmHWM of a fresh process"},
        "results": results,
        "skipped": skipped,
        "targets": targets,
    }
    write_results(args.out, report)
    return 0


def check_targets(results: dict[str, dict], model: str = "vgg16") -> list[dict]:
    """The issues' targets, each with its measured value (ResNets: issue 14's speed-up over zennit >= 3)."""
    targets = []

    def add(name: str, value: float | None, limit: float, at_most: bool) -> None:
        if value is None:
            return
        ok = value <= limit if at_most else value >= limit
        targets.append({"target": name, "value": round(value, 3), "limit": limit, "met": ok})

    for composite in ("epsilon_gamma_box", "epsilon_plus_flat", "seed"):
        row = results.get(f"ours:{composite}")
        if row:
            add(f"{composite}: time / forward <= 3.5", row["ratio_to_forward"], 3.5, True)
    resnet = model.startswith(("resnet", "wide_resnet", "resnext"))
    for composite, limit in (("epsilon_gamma_box", 3.0 if resnet else 5.0), ("epsilon_plus_flat", 2.5)):
        row = results.get(f"ours:{composite}", {})
        add(f"{composite}: speed-up over zennit >= {limit}", row.get("speedup_over_zennit"), limit, False)
    for composite in ("epsilon_gamma_box", "epsilon_plus_flat"):
        add(f"{composite}: speed-up over the baseline revision >= 1 (no slower)",
            results.get(f"ours:{composite}", {}).get("speedup_over_baseline"), 1.0, False)
    add("seed: speed-up over the blog's code >= 2", results.get("ours:seed", {}).get("speedup_over_blog"), 2.0, False)
    base, filtered = results.get("ours:epsilon_gamma_box"), results.get("ours:epsilon_gamma_box@0.1")
    if base and filtered:
        add("top-k 0.1: extra time <= 10 %", filtered["seconds_per_image"] / base["seconds_per_image"] - 1, 0.10, True)
    gradient_memory = results.get("gradient", {}).get("peak_memory_mb")
    for composite in ("epsilon_gamma_box", "epsilon_plus_flat", "seed"):
        memory = results.get(f"ours:{composite}", {}).get("peak_memory_mb")
        if gradient_memory and memory:
            add(f"{composite}: peak memory / forward+gradient <= 2.5", memory / gradient_memory, 2.5, True)
    return targets


def print_table(results: dict[str, dict], targets: list[dict], args: argparse.Namespace) -> None:
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"\n{args.model} {args.size}x{args.size}, batch {args.batch}, {where}, best of {args.repeats}")
    header = f"{'method':<42s} {'s/image':>8s} {'x forward':>9s} {'x zennit':>9s} {'x base':>7s} {'peak MB':>8s}"
    print(header + "\n" + "-" * len(header))
    for row in results.values():
        speedup = row.get("speedup_over_zennit")
        memory, base = row.get("peak_memory_mb"), row.get("speedup_over_baseline")
        print(f"{row['label']:<42s} {row['seconds_per_image']:8.3f} {row['ratio_to_forward']:9.2f} "
              f"{'' if speedup is None else f'{speedup:.1f}x':>9s} {'' if base is None else f'{base:.2f}x':>7s} "
              f"{'' if memory is None else f'{memory:.0f}':>8s}")
    print("\ntargets:")
    for target in targets:
        print(f"  [{'met' if target['met'] else 'MISSED'}] {target['target']}: {target['value']}")


if __name__ == "__main__":
    sys.exit(main())
