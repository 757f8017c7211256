"""Pipeline throughput and memory, side by side in one run: end-to-end images/s (decode, Ray, writing) against
bare LRPModel on the same preprocessed images on the same device; where an image's time goes (read + decode +
preprocess, host-device copies, LRP, statistics, writing; each stage timed alone, in process); on CUDA the GPU
utilisation during the run and a TF32 run side by side with float32 against the card's peak FLOP rate; on the
CPU driver and actor peak memory at two dataset sizes; stored bytes per map; WebDataset reading cost per image at
two shard sizes, .tar and .tar.gz (bench/tar_reading.py). Prints a table and writes JSON.

    python -m bench.pipeline_speed [--device cpu|cuda] [--images N] [--quick] [--no-tf32] [--no-memory]
                                   [--flat-small 256] [--flat-large 4096] [--tar-members 500 5000] [--no-tar]
                                   [--out PATH]

--device cuda defaults to a few thousand ImageNet-sized (500x375) JPEGs, batch 32, GPU decoding on; --quick is
a small CPU-sized run (vgg11 at 32x32, 24 images) that checks the script works.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench import write_results
from bench.tar_reading import print_table, tar_reading

DEFAULT_OUT = Path("bench/results/pipeline_speed.json")
LRP_FORWARDS = 3  # LRP costs about three forward passes (docs/benchmarks.md: 3.1x on an H200)
PEAK_TFLOPS = {"H200": {"float32": 67.0, "tf32": 495.0}, "H100": {"float32": 67.0, "tf32": 495.0}}  # dense


def make_images(root: Path, count: int, size: tuple[int, int], seed: int = 0) -> Path:
    """A plain folder of JPEGs: smooth random colour fields (compress and decode like photographs, not noise)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize(size, Image.BICUBIC)
        image.save(root / f"img{i:06d}.jpg", quality=90)
    return root


def run_pipeline(dataset: Path, out: Path, cache: Path, model: str, size: int, batch: int, device: str = "cpu",
                 tf32: bool = False, shard_size: int = 64) -> dict:
    from pipeline.config import load_config
    from pipeline.run import explain

    config = load_config({"dataset": str(dataset), "model": model, "weights": "random", "size": size,
                          "batch_size": batch, "shard_size": shard_size, "out": str(out), "cache": str(cache),
                          "device": device, "precision": "tf32" if tf32 else "fp32"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return explain(config, progress=False)


def _explainer(model: str, device: str):
    from lrp_module import LRPModel
    from lrp_module.zoo import build_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LRPModel(build_model(model, "random")[0], "epsilon_gamma_box").to(device)


def _preprocessed(dataset: Path, size: int, limit: int | None = None) -> torch.Tensor:
    from pipeline.datasets import load_records
    from pipeline.preprocess import Preprocessing, load

    prep = Preprocessing.for_size(size)
    return torch.stack([load(r, prep)[0] for r in load_records(dataset)[:limit]])


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on


def bare_lrp(x: torch.Tensor, model: str, batch: int, device: str = "cpu", tf32: bool = False) -> float:
    """images/s of LRPModel alone on already preprocessed images, already on the device (the pipeline's ceiling)."""
    set_tf32(tf32)
    lrp = _explainer(model, device)
    x = x.to(device)
    lrp.explain(x[:batch])
    _sync(device)
    start = time.perf_counter()
    for i in range(0, len(x), batch):
        lrp.explain(x[i:i + batch])
    _sync(device)
    seconds = time.perf_counter() - start
    set_tf32(False)
    return len(x) / seconds


def stage_breakdown(dataset: Path, model: str, size: int, batch: int, device: str, limit: int) -> dict:
    """Seconds per image of each stage, each timed alone in this process on the first `limit` images: read +
    decode + preprocess (on the device where the pipeline does it there), host-device copies, LRP, statistics,
    writing (HDF5 gzip 4 float16 + Parquet)."""
    from pipeline import stats as statistics
    from pipeline.datasets import load_records
    from pipeline.gpu_decode import DeviceDecoder
    from pipeline.preprocess import DecodeError, Preprocessing, load
    from pipeline.writers import write_relevance

    records = load_records(dataset)[:limit]
    prep = Preprocessing.for_size(size)

    def pillow(at, record):
        try:
            return load(record, prep)
        except DecodeError as error:
            return error

    start = time.perf_counter()
    if device == "cuda":
        decoder = DeviceDecoder(prep, device, batch, threads=2)
        items = list(decoder.iterate(records, pillow))
        decoder.close()
        routed = dict(decoder.routed)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:  # the worker's default decode_threads
            items = list(pool.map(pillow, range(len(records)), records))
        routed = {"cpu": len(records)}
    _sync(device)
    times = {"decode": time.perf_counter() - start}
    x = torch.stack([item[0].cpu() for item in items if isinstance(item, tuple)])
    lrp = _explainer(model, device)
    lrp.explain(x[:batch].to(device))
    times.update(copy=0.0, lrp=0.0, stats=0.0)
    maps = []
    for i in range(0, len(x), batch):
        chunk = x[i:i + batch]
        _sync(device)
        begun = time.perf_counter()
        chunk = chunk.to(device)
        _sync(device)
        moved = time.perf_counter()
        logits, relevance = lrp.explain(chunk)
        relevance = relevance.sum(1)
        _sync(device)
        explained = time.perf_counter()
        logits, relevance = logits.float().cpu(), relevance.float().cpu()
        returned = time.perf_counter()
        used = logits.argmax(1)
        statistics.map_statistics(relevance), statistics.prediction(logits, used)
        statistics.localisation(relevance, [[] for _ in range(len(chunk))])
        done = time.perf_counter()
        times["copy"] += (moved - begun) + (returned - explained)
        times["lrp"] += explained - moved
        times["stats"] += done - returned
        maps.append(relevance.numpy())
    with tempfile.TemporaryDirectory(prefix="bench-write-") as scratch:
        start = time.perf_counter()
        array = np.concatenate(maps)
        write_relevance(Path(scratch) / "maps.h5", array, {"image_id": [str(i) for i in range(len(array))]}, {})
        times["write"] = time.perf_counter() - start
    count = len(x)
    return {"images": count, "routed": routed, "seconds_per_image": {k: v / count for k, v in times.items()},
            "images_per_second_if_serial": count / sum(times.values())}


class UtilisationSampler:
    """GPU utilisation (%) sampled every 0.25 s in a thread: torch.cuda.utilization (pynvml), else nvidia-smi."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.source: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> float | None:
        try:
            value = float(torch.cuda.utilization())
            self.source = "torch.cuda.utilization"
            return value
        except Exception:  # noqa: BLE001  (pynvml missing: ask nvidia-smi)
            pass
        if shutil.which("nvidia-smi") is None:
            return None
        result = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                 "-i", "0"], capture_output=True, text=True, timeout=10)
        self.source = "nvidia-smi"
        return float(result.stdout.split()[0]) if result.returncode == 0 and result.stdout.strip() else None

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            value = self._sample()
            if value is None:
                return
            self.samples.append(value)

    def __enter__(self) -> UtilisationSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def summary(self) -> dict:
        if not self.samples:
            return {"source": self.source, "mean_percent": None, "max_percent": None, "samples": 0}
        return {"source": self.source, "mean_percent": float(np.mean(self.samples)),
                "max_percent": float(np.max(self.samples)), "samples": len(self.samples)}


def forward_flops(model: str, size: int) -> float:
    """FLOPs (2 x multiply-adds) of one forward pass of the torchvision VGG at size x size."""
    import torchvision

    net = getattr(torchvision.models, model)().eval()
    flops = []

    def count(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            per_out = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            flops.append(2 * output.numel() * per_out)
        elif isinstance(module, torch.nn.Linear):
            flops.append(2 * output.numel() * module.in_features)

    hooks = [m.register_forward_hook(count) for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        net(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    return float(sum(flops))


def physical_limit(device_name: str, flops: float, peaks: dict | None) -> dict:
    """images/s the card's dense peak allows for one forward and for an LRP of LRP_FORWARDS forwards."""
    peaks = peaks or next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)
    if not peaks:
        return {"peak_tflops": None, "note": f"no peak FLOP rate known for {device_name!r} (--peak-tflops)"}
    return {"peak_tflops": peaks, "forward_gflop": flops / 1e9, "lrp_forwards": LRP_FORWARDS,
            **{f"lrp_limit_images_per_s_{mode}": peak * 1e12 / (LRP_FORWARDS * flops) for mode, peak in peaks.items()}}


def _memory_probe(dataset: str, out: str, cache: str) -> None:
    """In a fresh process: one pipeline run on a small VGG; prints driver and actor peak RSS in MB."""
    manifest = run_pipeline(Path(dataset), Path(out), Path(cache), "vgg11", 32, 16)
    driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"driver_peak_mb": driver, "actor_peak_mb": manifest["timings"]["actor_peak_rss_mb"]}))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--images", type=int, default=None, help="default 256 on the CPU, 3000 on CUDA")
    parser.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("W", "H"),
                        help="generated JPEGs' size (default 320x240 on the CPU, 500x375 on CUDA)")
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=None, help="default 8 on the CPU, 32 on CUDA")
    parser.add_argument("--breakdown-images", type=int, default=512, help="images the stage breakdown times")
    parser.add_argument("--no-tf32", action="store_true", help="CUDA: skip the TF32 runs")
    parser.add_argument("--peak-tflops", type=float, nargs=2, default=None, metavar=("FP32", "TF32"),
                        help="the card's dense peaks (known: " + ", ".join(PEAK_TFLOPS) + ")")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory probes (always skipped on CUDA)")
    parser.add_argument("--flat-small", type=int, default=256)
    parser.add_argument("--flat-large", type=int, default=4096)
    parser.add_argument("--tar-members", type=int, nargs="+", default=None,
                        help="WebDataset shard sizes whose reading cost is measured (default 500 5000)")
    parser.add_argument("--no-tar", action="store_true", help="skip the WebDataset reading table")
    parser.add_argument("--quick", action="store_true", help="vgg11 at 32x32, 24 small images, no memory probes, "
                        "shards of 100 and 1000 members")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--memory-probe", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if args.quick:
        args.model, args.size, args.no_memory = "vgg11", 32, True
        args.images = args.images or 24
        args.image_size = args.image_size or [64, 48]
        args.batch = args.batch or 4
        args.breakdown_images = min(args.breakdown_images, args.images)
        args.tar_members = args.tar_members or [100, 1000]
    args.tar_members = args.tar_members or [500, 5000]
    args.images = args.images or (3000 if cuda else 256)
    args.image_size = tuple(args.image_size or ((500, 375) if cuda else (320, 240)))
    args.batch = args.batch or (32 if cuda else 8)
    args.no_memory = args.no_memory or cuda
    return args


def _end_to_end(args: argparse.Namespace, data: Path, scratch: Path, modes: list[str], x: torch.Tensor) -> dict:
    """Pipeline (Ray actor, decode, write) and bare LRP images/s per precision mode, same device, same run."""
    import ray

    results: dict = {}
    ray.init(num_cpus=None, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        run_pipeline(data, scratch / "warm", scratch / "cache", args.model, args.size, args.batch, args.device)
        for mode in modes:
            sampler = UtilisationSampler() if args.device == "cuda" else None
            if sampler:
                sampler.__enter__()
            try:
                manifest = run_pipeline(data, scratch / f"run-{mode}", scratch / "cache", args.model, args.size,
                                        args.batch, args.device, tf32=mode == "tf32")
            finally:
                if sampler:
                    sampler.__exit__()
            timings = manifest["timings"]
            results[mode] = {"pipeline_images_per_s": timings["images_per_second"],
                             "pipeline_wall_images_per_s": args.images / timings["seconds_this_invocation"],
                             "gpu_utilisation": sampler.summary() if sampler else None}
    finally:
        ray.shutdown()
    for mode in modes:
        bare = bare_lrp(x, args.model, args.batch, args.device, tf32=mode == "tf32")
        results[mode].update(bare_lrp_images_per_s=bare, ratio=results[mode]["pipeline_images_per_s"] / bare)
    return results


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.memory_probe:
        _memory_probe(*args.memory_probe)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    cuda = args.device == "cuda"
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    modes = ["float32"] + (["tf32"] if cuda and not args.no_tf32 else [])
    report: dict = {"setup": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                              "device_name": device_name, "torch": torch.__version__}}
    memory = {}
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as scratch:
        scratch = Path(scratch)
        data = make_images(scratch / "images", args.images, args.image_size)
        x = _preprocessed(data, args.size)
        report["throughput"] = _end_to_end(args, data, scratch, modes, x)
        stored = sum(p.stat().st_size for p in (scratch / "run-float32" / "relevance").glob("*.h5")) / args.images
        report["stored_bytes_per_map"] = stored
        report["breakdown"] = stage_breakdown(data, args.model, args.size, args.batch, args.device,
                                              min(args.breakdown_images, args.images))
        if not args.no_tar:
            report["tar_reading"] = tar_reading(scratch, tuple(args.tar_members))
        if not args.no_memory:
            for count in (args.flat_small, args.flat_large):
                folder = make_images(scratch / f"flat{count}", count, (48, 48))
                command = [sys.executable, "-m", "bench.pipeline_speed", "--memory-probe", str(folder),
                           str(scratch / f"flat-run{count}"), str(scratch / "cache-small")]
                result = subprocess.run(command, capture_output=True, text=True, timeout=3600)
                if result.returncode != 0:
                    raise SystemExit(result.stderr[-2000:])
                memory[count] = json.loads(result.stdout.strip().splitlines()[-1])
            report["memory"] = memory
    if cuda:
        peaks = dict(zip(("float32", "tf32"), args.peak_tflops)) if args.peak_tflops else None
        report["limit"] = physical_limit(device_name, forward_flops(args.model, args.size), peaks)
    report["targets"] = _targets(args, report, memory, stored)
    _print(args, report, device_name)
    write_results(args.out, report)
    return 0


def _targets(args: argparse.Namespace, report: dict, memory: dict, stored: float) -> list[dict]:
    runs = report["throughput"]
    targets = [{"target": f"end-to-end images/s >= 85 % of bare LRPModel ({mode}, {args.device})",
                "value": round(run["ratio"], 3), "met": run["ratio"] >= 0.85} for mode, run in runs.items()]
    if args.device == "cuda" and args.model == "vgg16" and args.size == 224:
        best = max(run["pipeline_images_per_s"] for run in runs.values())
        targets.append({"target": "end to end >= 1,000 images/s on one GPU (best mode)", "value": round(best, 1),
                        "met": best >= 1000})
    if memory:
        small, large = memory[args.flat_small], memory[args.flat_large]
        targets += [
            {"target": f"driver peak memory {args.flat_large} vs {args.flat_small} images within 10 %",
             "value": round(large["driver_peak_mb"] / small["driver_peak_mb"], 3),
             "met": large["driver_peak_mb"] <= 1.1 * small["driver_peak_mb"]},
            {"target": f"actor peak memory {args.flat_large} vs {args.flat_small} images within 10 %",
             "value": round(large["actor_peak_mb"] / small["actor_peak_mb"], 3),
             "met": large["actor_peak_mb"] <= 1.1 * small["actor_peak_mb"]}]
    targets.append({"target": "stored size per map <= 60 KB", "value": round(stored / 1024, 1),
                    "met": stored <= 60 * 1024})
    for kind in (".tar", ".tar.gz"):
        rows = sorted((row for row in report.get("tar_reading", []) if row["kind"] == kind),
                      key=lambda row: row["members"])
        if len(rows) >= 2:
            ratio = rows[-1]["read_ms_per_image"] / rows[0]["read_ms_per_image"]
            targets.append({"target": f"{kind} reading per image, {rows[-1]['members']} vs {rows[0]['members']} "
                                      "members, within 2x (independent of the shard's size)",
                            "value": round(ratio, 2), "met": ratio <= 2.0})
    return targets


def _print(args: argparse.Namespace, report: dict, device_name: str) -> None:
    print(f"\n{args.model} {args.size}x{args.size}, batch {args.batch}, {args.images} JPEGs {args.image_size[0]}x"
          f"{args.image_size[1]}, {device_name}, {torch.get_num_threads()} threads")
    for mode, run in report["throughput"].items():
        utilisation = run["gpu_utilisation"]
        busy = (f", GPU busy {utilisation['mean_percent']:.0f} % (mean)"
                if utilisation and utilisation["samples"] else "")
        print(f"  {mode:<8} pipeline {run['pipeline_images_per_s']:.2f} images/s "
              f"({run['pipeline_wall_images_per_s']:.2f} with start-up), bare LRPModel "
              f"{run['bare_lrp_images_per_s']:.2f} images/s: {100 * run['ratio']:.0f} %{busy}")
    limit = report.get("limit")
    if limit and limit.get("peak_tflops"):
        for mode in report["throughput"]:
            bound = limit[f"lrp_limit_images_per_s_{mode}"]
            best = report["throughput"][mode]["bare_lrp_images_per_s"]
            print(f"  {mode:<8} physical limit {bound:.0f} images/s ({limit['peak_tflops'][mode]:.0f} TFLOPS, "
                  f"{LRP_FORWARDS} x {limit['forward_gflop']:.1f} GFLOP): bare LRP at {100 * best / bound:.0f} %")
    breakdown = report["breakdown"]
    print(f"  stages, each alone, {breakdown['images']} images (ms/image): " + ", ".join(
        f"{k} {1e3 * v:.2f}" for k, v in breakdown["seconds_per_image"].items()) + f"; routed {breakdown['routed']}")
    print(f"  stored per map {report['stored_bytes_per_map'] / 1024:.1f} KB")
    if report.get("tar_reading"):
        print_table(report["tar_reading"])
    for count, row in report.get("memory", {}).items():
        print(f"  vgg11 32x32, {count:>5d} images: driver peak {row['driver_peak_mb']:.0f} MB, "
              f"actor peak {row['actor_peak_mb']:.0f} MB")
    print("\ntargets:")
    for target in report["targets"]:
        print(f"  [{'met' if target['met'] else 'MISSED'}] {target['target']}: {target['value']}")


if __name__ == "__main__":
    sys.exit(main())
