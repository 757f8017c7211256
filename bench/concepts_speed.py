"""Concept relevance propagation (CRP), speed and memory, side by side in one run, as ratios to a plain LRP pass:
(a) the plain pass (`LRPModel.explain`), (b) concept relevance vectors in the same pass (`explain_concepts`),
(c) the map and each image's K most relevant channels' conditional maps in one pass (`top_concept_maps`), the same
K maps with our engine one concept at a time (the map and relevance, then K `concept_maps` calls), and (d) the
zennit way, as zennit-crp's `CondAttribution.generate` does it: zennit 1.0.0, one forward with the graph retained,
the relevance at the layer by one backward, then one backward from the layer per concept with the gradient masked
at the layer's output (the full map and K concept maps: K + 1; the part above the layer is not repeated, which
favours zennit). Then RelMax (pipeline/concepts/relmax.py) fed with simulated images at two sizes: its memory
does not grow with the number of images. Prints tables and writes bench/results/concepts_speed.json.

    python -m bench.concepts_speed [--models vgg16,resnet50] [--size 224] [--batch 8] [--k 8] [--repeats 3]
                                   [--quick] [--baseline REF] [--no-memory] [--skip-relmax] [--out PATH]

The physical bound of (c): with F a forward pass, D the rules' denominators (about one more forward: gamma's
modified conv; shared by the K conditions) and T one transposed pass (the only part that runs K + 1 times), the
plain pass costs F + D + T and the K maps at least F + D + (K + 1) T, so (c) / (a) >= (2 + (K + 1) t) / (2 + t),
t = T / F = plain / forward - 2 (D taken as one forward). The part above the layer runs once, so this is a lower
bound only where nearly all of the work lies below the layer (VGG16 `features.28`, ResNet-50 `layer4`).

Peak memory: the resident memory a call adds, in a fresh process (Linux VmHWM reset before the call, after a warm-up
call on one image). --baseline REF also times the K-map pass of lrp_module at git revision REF in the same run.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

import lrp_module as lrp
from bench import write_results
from bench.lrp_speed import baseline_package, build_model, zennit_canonizers
from lrp_module.weights_recipe import IMAGENET_HIGH, IMAGENET_LOW

LAYERS = {"vgg16": "features.28", "resnet50": "layer4", "vgg11": "features.18", "resnet18": "layer4"}
COMPOSITE = "epsilon_gamma_box"
DEFAULT_OUT = Path("bench/results/concepts_speed.json")
ROWS = [("forward", "forward (inference mode)"), ("plain", "(a) plain LRP pass"),
        ("relevance", "(b) concept relevance vectors"), ("kmaps", "(c) map + K concept maps, one pass"),
        ("one_at_a_time", "ours, K maps one concept at a time"), ("zennit", "(d) zennit, one masked backward each")]


# ------------------------------------------------------------------------------------------ the contenders
def plain_forward(model: nn.Module) -> Callable[[torch.Tensor], object]:
    def run(x):
        with torch.inference_mode():
            return model(x)
    return run


def ours(explainer: lrp.LRPModel, kind: str, layer: str, k: int) -> Callable[[torch.Tensor], object]:
    if kind == "plain":
        return explainer.explain
    if kind == "relevance":
        return lambda x: explainer.explain_concepts(x, layers=[layer])
    if kind == "kmaps":
        return lambda x: explainer.top_concept_maps(x, layer=layer, k=k)
    if kind == "one_at_a_time":
        def run(x):
            _, relevance, found = explainer.explain_concepts(x, layers=[layer])
            channels = torch.topk(found[layer], k, dim=1).indices.tolist()
            maps = [explainer.concept_maps(x, conditions=[[{layer: [row[j]]}] for row in channels], channel_sum=False)
                    for j in range(k)]
            return relevance, torch.cat(maps, dim=1)
        return run
    raise ValueError(kind)


def zennit_way(model: nn.Module, name: str, layer: str, k: int) -> Callable[[torch.Tensor], object]:
    """zennit-crp's `generate` with zennit 1.0.0: one forward (graph retained), the relevance at `layer`'s output,
    then K + 1 backward passes from there (the full map, and each image's k-th most relevant channel masked in)."""
    from zennit.composites import EpsilonGammaBox

    model = copy.deepcopy(model).requires_grad_(False)
    module = dict(model.named_modules())[layer]
    low = torch.tensor(IMAGENET_LOW)[None, :, None, None]
    high = torch.tensor(IMAGENET_HIGH)[None, :, None, None]
    composite = EpsilonGammaBox(low=low, high=high, canonizers=zennit_canonizers(name))

    def run(x):
        kept: list[torch.Tensor] = []
        handle = module.register_forward_hook(lambda _m, _i, out: kept.append(out))
        try:
            with composite.context(model) as modified:
                x = x.clone().requires_grad_(True)
                logits = modified(x)
                index = logits.argmax(1, keepdim=True)
                start = torch.zeros_like(logits).scatter_(1, index, logits.gather(1, index))
                out = kept[-1]
                at_layer, = torch.autograd.grad(logits, out, start, retain_graph=True)
                channels = torch.topk(at_layer.flatten(2).sum(2), k, dim=1).indices
                maps = [torch.autograd.grad(out, x, at_layer, retain_graph=True)[0]]
                for j in range(k):
                    mask = torch.zeros_like(at_layer[:, :, :1, :1]).scatter_(1, channels[:, j, None, None, None], 1.0)
                    maps.append(torch.autograd.grad(out, x, at_layer * mask, retain_graph=j < k - 1)[0])
        finally:
            handle.remove()
        return torch.stack(maps, dim=1)
    return run


def make(spec: str, model: nn.Module, args: argparse.Namespace) -> Callable:
    if spec == "forward":
        return plain_forward(model)
    if spec == "zennit":
        return zennit_way(model, args.model, args.layer, args.k)
    if spec == "baseline_kmaps":
        explainer = baseline_package(args.baseline).LRPModel(model, COMPOSITE)
        return lambda x: explainer.top_concept_maps(x, layer=args.layer, k=args.k)
    return ours(lrp.LRPModel(model, COMPOSITE), spec, args.layer, args.k)


# ---------------------------------------------------------------------------------------------- measuring
def load() -> str:
    """The 1-, 5- and 15-minute load averages (the machine is shared: compare only within one run)."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def peak_memory_mb(spec: str, args: argparse.Namespace) -> float | None:
    """Peak resident memory added by one call of `spec`, in a fresh process (Linux VmHWM, reset before)."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    command = [sys.executable, "-m", "bench.concepts_speed", "--memory-probe", spec, "--models", args.model,
               "--size", str(args.size), "--batch", str(args.batch), "--k", str(args.k)] + \
        (["--threads", str(args.threads)] if args.threads else []) + \
        (["--baseline", args.baseline] if args.baseline else [])
    result = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        print(f"memory probe {spec} failed: {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return float(result.stdout.strip().splitlines()[-1])


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return float(line.split()[1]) / 1024
    raise KeyError(key)


def _memory_probe(spec: str, args: argparse.Namespace) -> None:
    model = build_model(args.model)
    torch.manual_seed(1)
    x = torch.randn(args.batch, 3, args.size, args.size)
    fn = make(spec, model, args)
    fn(x[:1])  # allocate lazily created state before measuring
    before = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    fn(x)
    print(_status_mb("VmHWM") - before)


def best_seconds(fn: Callable[[torch.Tensor], object], x: torch.Tensor, repeats: int) -> float:
    """Best of `repeats` timed calls on the batch, after a warm-up call on one image (lazily created state; the
    allocator's first pages)."""
    fn(x[:1])
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - started)
    return min(times)


def physical_bound(forward: float, plain: float, k: int) -> dict:
    """(c) / (a) >= (2 + (K + 1) t) / (2 + t), t = T / F = plain / forward - 2 (see the module docstring)."""
    t = max(plain / forward - 2.0, 0.0)
    return {"t_transposed_over_forward": round(t, 3), "bound_kmaps_over_plain": round((2 + (k + 1) * t) / (2 + t), 3)}


def bench_model(args: argparse.Namespace) -> dict:
    """Every row for one model, side by side, with the load before and after."""
    model = build_model(args.model)
    torch.manual_seed(1)
    x = torch.randn(args.batch, 3, args.size, args.size)
    specs = [spec for spec, _ in ROWS] + (["baseline_kmaps"] if args.baseline else [])
    labels = dict(ROWS) | {"baseline_kmaps": f"{args.baseline}'s engine, map + K concept maps"}
    results: dict[str, dict] = {}
    load_before = load()
    for spec in specs:
        fn = make(spec, model, args)
        seconds = best_seconds(fn, x, args.repeats)
        results[spec] = {"label": labels[spec], "seconds": seconds, "seconds_per_image": seconds / args.batch,
                         "load_after": load()}
        print(f"  {labels[spec]:<46s} {seconds / args.batch:8.3f} s/image  (load {results[spec]['load_after']})",
              flush=True)
        del fn
    if not args.no_memory:
        for spec in ("plain", "kmaps") + (("baseline_kmaps",) if args.baseline else ()) + \
                (("zennit",) if args.memory_zennit else ()):
            results[spec]["peak_memory_mb"] = peak_memory_mb(spec, args)
    plain = results["plain"]["seconds"]
    for row in results.values():
        row["x_plain"] = row["seconds"] / plain
    zennit = results["zennit"]["seconds"]
    for spec in ("kmaps", "one_at_a_time", "baseline_kmaps"):
        if spec in results:
            results[spec]["speedup_over_zennit"] = zennit / results[spec]["seconds"]
    bound = physical_bound(results["forward"]["seconds"], plain, args.k)
    return {"model": args.model, "layer": args.layer, "size": args.size, "batch": args.batch, "k": args.k,
            "load_before": load_before, "load_after": load(), "results": results, "bound": bound,
            "targets": check_targets(results)}


def check_targets(results: dict[str, dict]) -> list[dict]:
    """Issue 21's targets, each with its measured value."""
    targets = []

    def add(name: str, value: float, limit: float, at_most: bool) -> None:
        targets.append({"target": name, "value": round(value, 3), "limit": limit,
                        "met": value <= limit if at_most else value >= limit})

    add("concept relevance / plain <= 1.1", results["relevance"]["x_plain"], 1.1, True)
    add("K concept maps / plain <= 4", results["kmaps"]["x_plain"], 4.0, True)
    add("K concept maps: speed-up over the zennit way >= 3", results["kmaps"]["speedup_over_zennit"], 3.0, False)
    return targets


def print_table(report: dict, repeats: int) -> None:
    print(f"\n{report['model']} {report['size']}x{report['size']} at {report['layer']}, batch {report['batch']}, "
          f"K = {report['k']}, {COMPOSITE}, {torch.get_num_threads()} threads, best of {repeats}, "
          f"load {report['load_before']} -> {report['load_after']}")
    header = f"{'method':<46s} {'s/image':>8s} {'x plain':>8s} {'x zennit':>9s} {'peak MB':>8s}"
    print(header + "\n" + "-" * len(header))
    for row in report["results"].values():
        speedup, memory = row.get("speedup_over_zennit"), row.get("peak_memory_mb")
        print(f"{row['label']:<46s} {row['seconds_per_image']:8.3f} {row['x_plain']:8.2f} "
              f"{'' if speedup is None else f'{speedup:.1f}x':>9s} {'' if memory is None else f'{memory:.0f}':>8s}")
    bound = report["bound"]
    print(f"physical bound of (c): >= {bound['bound_kmaps_over_plain']}x plain "
          f"(t = transposed pass / forward = {bound['t_transposed_over_forward']})")
    for target in report["targets"]:
        print(f"  [{'met' if target['met'] else 'MISSED'}] {target['target']}: {target['value']}")


# ------------------------------------------------------------------------------------------------- RelMax
def relmax_child(images: int, channels: int, n: int, classes: int, batch: int) -> dict:
    """RelMax fed `images` simulated images in batches: peak memory (tracemalloc: every numpy allocation; and the
    resident set) and time."""
    import tracemalloc

    from pipeline.concepts.relmax import RelMax, image_key

    rng = np.random.default_rng(0)
    table = RelMax.empty(channels, n)
    before = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    tracemalloc.start()
    started = time.perf_counter()
    for first in range(0, images, batch):
        rows = min(batch, images - first)
        values = rng.standard_normal((rows, channels))
        values /= np.abs(values).sum(axis=1, keepdims=True)
        keys = image_key(first // batch, np.arange(rows))
        table.update(values, keys, rng.integers(0, 196, (rows, channels)), rng.integers(0, classes, rows))
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"images": images, "channels": channels, "n": n, "classes": classes, "batch": batch,
            "seconds": round(seconds, 2), "tracemalloc_peak_mb": round(peak / 2**20, 1),
            "rss_added_mb": round(_status_mb("VmHWM") - before, 1), "classes_seen": len(table.per_class)}


def bench_relmax(args: argparse.Namespace) -> list[dict]:
    """Two sizes, each in a fresh process."""
    rows = []
    for images in args.relmax_images:
        command = [sys.executable, "-m", "bench.concepts_speed", "--relmax-probe", str(images),
                   "--relmax-classes", str(args.relmax_classes)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=7200, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  RelMax, {images:,} images: {rows[-1]}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vgg16,resnet50", help="comma-separated, '' for none (layers: " +
                        ", ".join(f"{m} {layer}" for m, layer in LAYERS.items()) + ")")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=None, help="best of (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a smoke test (its ratios mean nothing: fixed costs "
                        "dominate at this size): vgg11 and resnet18 at 64 px, batch 2, "
                        "K = 3, RelMax with 2,000 and 4,000 images")
    parser.add_argument("--baseline", help="also time the K-map pass of lrp_module from this git revision")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-zennit", action="store_true", help="also the zennit way's peak memory")
    parser.add_argument("--skip-relmax", action="store_true")
    parser.add_argument("--relmax-images", default="10000,100000")
    parser.add_argument("--relmax-classes", type=int, default=1000)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    parser.add_argument("--relmax-probe", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.relmax_probe:
        print(json.dumps(relmax_child(args.relmax_probe, 512, 40, args.relmax_classes, 1000)))
        return 0
    if args.quick:
        args.models = "vgg11,resnet18" if args.models == "vgg16,resnet50" else args.models
        args.size, args.batch, args.k = min(args.size, 64), min(args.batch, 2), min(args.k, 3)
        args.relmax_images = "2000,4000"
        args.relmax_classes = min(args.relmax_classes, 10)
    args.relmax_images = [int(v) for v in str(args.relmax_images).split(",")]
    if args.memory_probe:
        args.model = args.models
        args.layer = LAYERS[args.model]
        _memory_probe(args.memory_probe, args)
        return 0
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    report: dict = {"setup": {
        "composite": COMPOSITE, "repeats": args.repeats, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "cpu": platform.processor(), "machine": platform.machine(),
        "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": _commit(), "peak_memory": "VmHWM of a fresh process, added by one call after a warm-up call",
        "weights": "random (torchvision's initialisation, seed 0)"}, "models": {}}
    for name in filter(None, args.models.split(",")):
        if name not in LAYERS:
            parser.error(f"--models: no layer known for {name!r} (known: {', '.join(LAYERS)})")
        args.model, args.layer = name, LAYERS[name]
        report["models"][name] = bench_model(args)
        print_table(report["models"][name], args.repeats)
    if not args.skip_relmax:
        report["relmax"] = bench_relmax(args)
    write_results(args.out, report)
    return 0


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "lrp_module", "bench"], capture_output=True, text=True)
    return done.stdout.strip() + (" (uncommitted changes)" if dirty.stdout.strip() else "")


if __name__ == "__main__":
    sys.exit(main())
